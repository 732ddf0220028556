#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one prepared run of at most 8 minutes on one H200, each
# stage's output in its own file under $OUT (default ./bench_gpu_out) as it is made, so that a run
# stopped by a time limit still leaves the stages it finished; each stage also has a limit of its own.
# In order: the CUDA-only tests (GPU pixels against CPU pixels, no host sync), train.py at 224 px with
# batch 64 and 256 on the device path and on the host path, then --compile and --compile
# reduce-overhead (CUDA graphs), then one and two runs per card.
#
#     bash bench_gpu.sh                 # PEAK_TFLOPS=989 (H100 SXM / H200 dense bf16) unless set
#     STAGES="cuda_tests device_path" bash bench_gpu.sh     # only the stages named
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-bench_gpu_out}
peak=${PEAK_TFLOPS:-989}
work=${WORK_DIR:-/tmp/fscl_bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# 2 x 2,048 generated training JPEGs (an epoch of 4,096 images), 224 px, bf16 autocast (train.py's
# default on CUDA); the train measurement times the compute-only limit in its own process
common=(--device cuda --img_sizes 224 --peak_tflops "$peak" --images_per_class 2048 --test_per_class 8
        --work_dir "$work" --skip compute naive eval)

stage() {   # stage NAME SECONDS COMMAND...: run it for at most SECONDS, keep its output, note exit code and time
  local name=$1 limit=$2; shift 2
  [[ -z ${STAGES:-} || " $STAGES " == *" $name "* ]] || return 0
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$out/stages.txt"
}

stage machine 30 bash -c 'nvidia-smi; nproc; python3 -c "import torch, torchvision; print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"CUDA\", torch.version.cuda, torch.cuda.get_device_name())"'
stage cuda_tests 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_feed.py tests/test_portable.py -k "cuda or float32"
stage device_path 120 python3 bench.py "${common[@]}" --batch_sizes 64 256 --train_flags="--data_path device"
stage host_path 120 python3 bench.py "${common[@]}" --batch_sizes 64 256 --train_flags="--data_path host"
stage compile 100 python3 bench.py "${common[@]}" --batch_sizes 64 --train_flags="--data_path device --compile"
stage cudagraphs 130 python3 bench.py "${common[@]}" --batch_sizes 64 256 --train_flags="--data_path device --compile reduce-overhead"
stage two_per_card 90 python3 bench.py "${common[@]}" --skip compute train naive eval --batch_sizes 64 \
  --train_flags="--data_path device" --concurrent 1 2
