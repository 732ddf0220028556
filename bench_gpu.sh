#!/usr/bin/env bash
# The GPU figures of the README's Performance section in one prepared run, most important first, each
# stage's output in its own file under $OUT (default ./bench_gpu_out), so that a run stopped by a time
# limit still leaves the stages it finished. On one H200 (2026-11-30): tests 15 s, bf16 176 s, float32
# 87 s, the concurrent stage over 5 min; the --compile stages not yet timed. Give it 15 min.
#
#     bash bench_gpu.sh                 # PEAK_TFLOPS=989 (H100 SXM / H200 dense bf16) unless set
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-bench_gpu_out}
peak=${PEAK_TFLOPS:-989}
work=${WORK_DIR:-/tmp/fscl_bench}
mkdir -p "$out"
common=(--device cuda --img_sizes 224 --peak_tflops "$peak" --images_per_class 2048 --test_per_class 500
        --work_dir "$work")

stage() {   # stage NAME COMMAND...: run it, keep its output, note its exit code and time
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$out/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$out/stages.txt"
}

stage machine bash -c 'nvidia-smi; python3 -c "import torch, torchvision; print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"CUDA\", torch.version.cuda, torch.cuda.get_device_name())"'
# no host sync inside a training step but the planned check (runs only where CUDA is present)
stage sync_test python3 -m pytest -q tests/test_portable.py -k "cuda or float32"
# train.py at the paper's settings: bf16 (default), batch 64 and 256, with the naive loop and evaluation
stage train_bf16 python3 bench.py "${common[@]}" --batch_sizes 64 256
stage train_fp32 python3 bench.py "${common[@]}" --batch_sizes 64 256 --train_flags="--no-amp" --skip naive eval
stage train_bf16_compile python3 bench.py "${common[@]}" --batch_sizes 64 256 --train_flags="--compile" --skip naive eval
stage train_fp32_compile python3 bench.py "${common[@]}" --batch_sizes 64 --train_flags="--no-amp --compile" --skip naive eval
# several runs on one card (reproduce.py --jobs_per_gpu): total img/s with 1, 2, 4 and 8 runs; last, as
# the longest (4 runs gave less than 2 on one H200 with 16 CPU cores)
stage concurrent python3 bench.py "${common[@]}" --batch_sizes 64 --skip naive eval --concurrent 1 2 4 8
