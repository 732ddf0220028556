"""Speed and memory of training and evaluation, side by side on one generated JPEG folder.

    python3 bench.py --quick                       # a few minutes on 2 CPU cores
    python3 bench.py --img_sizes 64 224 --batch_sizes 64 256 --device cuda

For each image size and batch size it measures, each in a fresh process (so that peak RSS belongs to
one configuration):
  compute    the model's compute-only limit: train steps of the same model, optimizer and loss on one
             ready tensor batch already on the device (no loader), alternating rounds of the baseline
             and of each loss of --losses (the paper's feature-similarity loss and the baselines'):
             loss_overhead, each a step's time over the baseline's (contrastive_overhead: the paper's)
  train      train.py itself (in-process main()), 6 epochs, with the compute-only limit timed in the
             same process before the first epoch and after each one; each epoch's img/s is divided by
             the mean of the limits around it: train_vs_compute_limit = the median over epochs 2-6
  naive      a naive loop: torchvision ImageFolder + PIL + the same transforms + a default DataLoader
             + the same model and optimizer
and once: validation.py over 8 runs vs evaluating the same 8 runs one by one with fresh decoding.
From the rates it also reports TFLOP/s (img/s x 10.9 GFLOP per 224 px training image, scaled by
size^2), the fraction of --peak_tflops, and the hours the paper's full grid (3.2 x 10^8 training
images) would take at train.py's rate.
The last line printed is one JSON object with every figure.
"""
import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

from utils import UserError, available_cpus, command_line, cpu_name, run_main

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = ("class-a", "class-b")
LOSS_METHODS = ("contrastive", "focal", "cb", "ldam_drw", "la", "oversample+supcon")   # timed against baseline
GFLOP_PER_TRAIN_IMAGE_224 = 10.9   # ResNet-18 forward + backward on one 224 px image (3 x 1.82 GFLOP, rounded)


def paper_grid_images():
    """Training images the paper's full grid visits: 4 variants x 5 ratios x 10 runs x 100 epochs, with
    10,000 majority images; oversampled epochs hold 2 x 10,000 images."""
    n, per_grid_epoch = 10000, 0
    for r in (1, 0.1, 0.01, 0.005, 0.001):
        per_grid_epoch += 2 * (n + round(r * n)) + 2 * (2 * n)   # baseline, contrastive; oversampling, proposed
    return per_grid_epoch * 10 * 100


def get_args_parser():
    p = command_line(__doc__)
    p.add_argument("--img_sizes", nargs="*", type=int, default=[64, 224], help="image sizes of the compute, train and "
                   "naive measurements (none: skip them, e.g. to measure --jobs_threads alone)")
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[64], help="paper: 64")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto (cuda if available), cpu "
                   "or cuda")
    p.add_argument("--num_workers", type=int, default=None, help="as train.py (default: its own default)")
    p.add_argument("--images_per_class", type=int, default=320, help="training JPEGs per class")
    p.add_argument("--test_per_class", type=int, default=100, help="test JPEGs per class")
    p.add_argument("--steps", type=int, default=20, help="timed steps of the compute and naive loops")
    p.add_argument("--eval_runs", type=int, default=8)
    p.add_argument("--eval_sizes", nargs="+", type=int, default=None, help="image sizes of the evaluation "
                   "test (default: the --img_sizes)")
    p.add_argument("--quick", action="store_true", help="on CPU: batch 16 and a quarter of the steps at sizes "
                   "over 128 px, and 64 training images per class there")
    p.add_argument("--work_dir", "--save_root", dest="work_dir", default="bench_out", help="scratch folder for the "
                   "generated images and runs, and bench.json (relative paths: to the working folder; --save_root: "
                   "the same, as the other scripts name their output folder)")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's bf16 dense peak in TFLOP/s "
                   "(e.g. 989 for an H100 SXM), to report the fraction of it that training reaches")
    p.add_argument("--train_flags", default="", help="extra train.py flags for the train measurement, mirrored "
                   "in its compute-only limit where they change it: e.g. --train_flags=\"--no-amp --compile\"")
    p.add_argument("--skip", nargs="+", default=[], choices=["compute", "train", "naive", "eval"],
                   help="leave out the compute measurement (the train measurement still times the compute-only "
                   "limit), the train measurement (with compute and naive: only --concurrent and --jobs_threads), "
                   "the naive loop and/or the evaluation comparison")
    p.add_argument("--concurrent", nargs="+", type=int, default=[], help="also measure the total training img/s "
                   "of N train.py processes started together on the device (first image and batch size), "
                   "e.g. 1 2 4 8")
    p.add_argument("--jobs_threads", nargs="*", default=None, metavar="JxT", help="total training img/s of J train.py "
                   "processes side by side with T threads each (--threads T --num_workers 0, as reproduce.py runs "
                   "cells on a CPU), at 32 and 64 px; default with --jobs_threads alone: 1xN, (N/2)x2 and Nx1 for the "
                   "N CPUs this process may use; the JSON reports the table, the fastest and reproduce.py's default")
    p.add_argument("--losses", nargs="*", default=list(LOSS_METHODS), help="methods whose loss is timed against "
                   "the baseline's step in the compute measurement: loss_overhead (default: " + " ".join(LOSS_METHODS)
                   + "; none: give --losses alone)")
    g = p.add_argument_group("one measurement in this process (what bench.py runs for each size in a fresh "
                             "process; useful to repeat one figure)")
    g.add_argument("--measure", choices=("compute", "train", "naive", "eval"), help="the measurement: compute "
                   "(the compute-only limit and each loss's step overhead), train (train.py), naive, eval")
    g.add_argument("--img_size", type=int, help="its image size")
    g.add_argument("--batch_size", type=int, help="its batch size")
    p.add_argument("--train_cap", type=int, default=0, help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------- data

def photo_like(rng, h, w):
    """A smooth random 'photo' (low-frequency colour field plus fine noise): decodes like a real JPEG."""
    from PIL import Image
    low = rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-12, 12, (h, w, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_jpeg_folder(root, per_class, seed, workers=None):
    """root/<class>/<i>.jpg, 400-600 px photos at JPEG quality 90, each from its own seed (seed, class,
    i), written by a pool of processes (one per CPU); kept between calls."""
    from concurrent.futures import ProcessPoolExecutor
    jobs = []
    for k, c in enumerate(CLASSES):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        jobs += [(os.path.join(root, c, f"{i:05d}.jpg"), (seed, k, i)) for i in range(per_class)
                 if not os.path.exists(os.path.join(root, c, f"{i:05d}.jpg"))]
    chunks = [jobs[i:i + 64] for i in range(0, len(jobs), 64)]
    if chunks:
        with ProcessPoolExecutor(max_workers=min(workers or available_cpus(), len(chunks))) as pool:
            list(pool.map(write_photos, chunks))
    return root


def write_photos(jobs):
    for path, key in jobs:
        rng = np.random.default_rng(key)
        h, w = (int(v) for v in rng.integers(400, 601, 2))
        photo_like(rng, h, w).save(path, quality=90)


# ---------------------------------------------------------------- measurements (one per process)

def _device(name):
    from devices import resolve_device
    return resolve_device(name)


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_and_optimizer(device):
    """train.py's model and optimizer at its defaults (channels_last on CUDA), for the reference loops."""
    import torch
    from model import build_model
    from train import make_optimizer
    torch.manual_seed(0)
    model = build_model(2, "none").to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, make_optimizer("adam", model.parameters(), 1e-3)


def reference_transform(img_size, augment):
    """The naive pipeline's torchvision transforms on PIL images: Resize, [RandAugment, ColorJitter],
    ToTensor, Normalize, with train.py's parameters."""
    from torchvision import transforms as T
    from data import COLOR_JITTER, IMAGENET_MEAN, IMAGENET_STD
    aug = [T.RandAugment(), T.ColorJitter(**COLOR_JITTER)] if augment else []
    return T.Compose([T.Resize((img_size, img_size)), *aug, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_options(args, device):
    """(bf16 autocast, torch.compile) as train.py runs them with --train_flags on this device."""
    import train
    t = train.get_args_parser().parse_args(shlex.split(args.train_flags))
    return device.type == "cuda" and t.amp, t.compile


def compute_stepper(args, device):
    """-> step(method): one train step of the same model, optimizer and loss on one ready batch
    already on the device (no loader, no decoding): the model's compute-only limit, with train.py's
    autocast and compile choices (--train_flags). method: 'baseline' or one of LOSS_METHODS, with its
    loss as train.py builds it (DRW's weights on; LDAM on its cosine head, a second model); the
    sampler does not enter a step."""
    import torch
    import train
    from losses import Criterion, method_flags
    from model import build_model, head_of
    cuda = device.type == "cuda"
    amp, compiled = train_options(args, device)
    model, opt = model_and_optimizer(device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if cuda else x
    y = torch.arange(args.batch_size, device=device) % 2
    steps = {}
    for method in ("baseline", *args.losses):
        a = vars(train.get_args_parser().parse_args(method_flags(method) + ["--num_epochs", "1", "--drw_start", "0.5"]))
        criterion = Criterion(a, [args.images_per_class, max(1, args.images_per_class // 100)], device)
        criterion.set_epoch(1)
        net, optimizer = model, opt
        if head_of(a) != "linear":
            net = build_model(2, "none", head_of(a)).to(device, memory_format=torch.channels_last if cuda else
                                                       torch.contiguous_format)
            optimizer = train.make_optimizer("adam", net.parameters(), 1e-3)
        tapped = train.Tapped(net, a["contrastive_layers"] if criterion.aux != "none" else ())
        steps[method] = (train.compiled(tapped, compiled), criterion, optimizer)

    def step(method):
        net, criterion, optimizer = steps[method]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits, feats = net(x)
        loss, _ = criterion(logits, feats, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def time_steps(step, method, n, device):
    """Seconds per step over n steps."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step(method)
    _sync(device)
    return (time.perf_counter() - t0) / n


def measure_compute(args, rounds=5):
    """Compute-only img/s of the baseline and of each loss of --losses, in alternating rounds so that all
    see the same machine state; loss_overhead[method] = median over rounds of (its step / baseline's
    step); contrastive_overhead = that of the paper's loss."""
    device = _device(args.device)
    step = compute_stepper(args, device)
    n = max(1, args.steps // rounds)
    methods = ["baseline", *args.losses]
    for m in methods * 2:
        step(m)                                  # warm-up
    t = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            t[m].append(time_steps(step, m, n, device))
    overhead = {m: float(np.median([a / b for a, b in zip(t[m], t["baseline"])])) for m in args.losses}
    out = {"img_per_s": args.batch_size / float(np.median(t["baseline"])), "loss_overhead": overhead}
    if "contrastive" in overhead:
        out.update(contrastive_img_per_s=args.batch_size / float(np.median(t["contrastive"])),
                   contrastive_overhead=overhead["contrastive"])
    return out


def measure_train(args, epochs=6):
    """train.py's main() on the JPEG folder, with the compute-only limit timed in this same process
    before the first epoch and after every epoch (train.py's epoch_done hook, before the checkpoint
    is handed over): each epoch is compared with the mean of the limits just before and after it,
    so that a slow or fast spell of the machine hits both sides. Epoch 1 is the warm-up; figures are
    medians over the others."""
    import train
    save = os.path.join(args.work_dir, f"train_runs_{args.img_size}_{args.batch_size}")
    shutil.rmtree(save, ignore_errors=True)
    argv = ["--train_data_root", os.path.join(args.work_dir, "train"), "--classes", *CLASSES, "--ratio", "1:1",
            "--save_root", save, "--num_epochs", str(epochs), "--img_size", str(args.img_size), "--weights",
            "none", "--batch_size", str(args.batch_size), "--device", args.device, "--seed", "0",
            "--max_per_class", str(args.train_cap), *shlex.split(args.train_flags)]
    if args.num_workers is not None:
        argv += ["--num_workers", str(args.num_workers)]
    device = _device(args.device)
    step = compute_stepper(argparse.Namespace(**{**vars(args), "losses": []}), device)
    step("baseline")
    n = max(3, args.steps // 4)
    limit = [time_steps(step, "baseline", n, device)]     # limit[e]: seconds per step after epoch e

    def epoch_done(epoch, metrics):
        limit.append(time_steps(step, "baseline", n, device))
    t0 = time.perf_counter()
    run = train.main(argv, epoch_done=epoch_done)
    total = time.perf_counter() - t0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        per_epoch = [json.loads(l) for l in f]
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    steady = range(2, epochs + 1)
    limit_rate = {e: args.batch_size / ((limit[e - 1] + limit[e]) / 2) for e in steady}
    return {"img_per_s": float(np.median([per_epoch[e - 1]["img_per_s"] for e in steady])),
            "compute_img_per_s": float(np.median(list(limit_rate.values()))),
            "vs_compute_limit": float(np.median([per_epoch[e - 1]["img_per_s"] / limit_rate[e] for e in steady])),
            "data_wait_fraction": float(np.median([per_epoch[e - 1]["data_wait_fraction"] for e in steady])),
            "cache_MiB": cfg["cache_bytes"] / 2 ** 20, "whole_run_s": total, "data_path": cfg.get("data_path_used")}


def measure_naive(args):
    """The reference loop most repositories use: ImageFolder + PIL transforms + a default DataLoader."""
    import torch
    import torchvision
    device = _device(args.device)
    cuda = device.type == "cuda"
    workers = args.num_workers if args.num_workers is not None else (min(8, available_cpus()) if cuda else 0)
    ds = torchvision.datasets.ImageFolder(os.path.join(args.work_dir, "train"),
                                          transform=reference_transform(args.img_size, augment=True))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=workers)
    model, opt = model_and_optimizer(device)
    warmup, steps, done, t0 = 2, args.steps, 0, None
    while done < warmup + steps:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == warmup:
                _sync(device)
                t0, seen = time.perf_counter(), 0
            elif done > warmup:
                seen += len(y)
            if done == warmup + steps:
                break
    _sync(device)
    return {"img_per_s": seen / (time.perf_counter() - t0)}


def _correct_per_run(root):
    with open(os.path.join(root, "results.json")) as f:
        runs = json.load(f)["variants"]["baseline"]["1_1"]["runs"]
    return [sum(r["metrics"]["confusion_matrix"][k][k] for k in range(len(CLASSES))) for r in runs]


def measure_eval(args):
    """validation.py over N copies of one run, at its default precision (fp32) and at --precision bf16, vs the
    same N runs evaluated one by one in float32, decoding afresh; also whether they agree."""
    import torch
    import torchvision
    import predict
    import train
    import validation
    from model import build_model
    device = _device(args.device)
    root = os.path.join(args.work_dir, f"eval_runs_{args.img_size}")
    shutil.rmtree(root, ignore_errors=True)
    run = train.main(["--train_data_root", os.path.join(args.work_dir, "train"), "--classes", *CLASSES,
                      "--ratio", "1:1", "--max_per_class", "16", "--save_root", os.path.join(root, "src"),
                      "--num_epochs", "1", "--img_size", str(args.img_size), "--weights", "none",
                      "--device", args.device, "--seed", "0"])
    variant = os.path.join(root, "baseline")
    for k in range(1, args.eval_runs + 1):
        shutil.copytree(run, os.path.join(variant, "1_1", f"run_{k}"))
    test = os.path.join(args.work_dir, "test")
    ours, correct = {}, {}
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        validation.main(["--model_root", variant, "--test_data_root", test, "--device", args.device,
                         "--precision", precision])
        ours[precision] = time.perf_counter() - t0
        correct[precision] = _correct_per_run(variant)

    single = os.path.join(root, "single", "baseline")                     # predict.py vs validation.py, one run
    shutil.copytree(os.path.join(variant, "1_1", "run_1"), os.path.join(single, "1_1", "run_1"))
    t0 = time.perf_counter()
    validation.main(["--model_root", single, "--test_data_root", test, "--device", args.device])
    one_run_validation = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict.main(["--run", os.path.join(single, "1_1", "run_1"), "--images", test, "--out",
                  os.path.join(root, "predictions.csv"), "--device", args.device])
    one_run_predict = time.perf_counter() - t0

    t0 = time.perf_counter()
    workers = min(8, available_cpus())
    tf = reference_transform(args.img_size, augment=False)
    naive_correct = []
    for k in range(1, args.eval_runs + 1):
        model = build_model(2, "none")
        model.load_state_dict(torch.load(os.path.join(variant, "1_1", f"run_{k}", "best.pth"),
                                         weights_only=True)["model"])
        model.to(device).eval()
        loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(test, transform=tf),
                                             batch_size=256, num_workers=workers)
        n = 0
        with torch.inference_mode():
            for x, y in loader:
                n += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        naive_correct.append(n)
    naive = time.perf_counter() - t0
    return {"validation_s": ours["fp32"], "validation_bf16_s": ours["bf16"],
            "one_by_one_s": naive, "eval_speedup": naive / ours["fp32"], "eval_speedup_bf16": naive / ours["bf16"],
            "fp32_same_correct_as_one_by_one": correct["fp32"] == naive_correct,
            "bf16_correct_minus_one_by_one": [a - b for a, b in zip(correct["bf16"], naive_correct)],
            "predict_s": one_run_predict, "validation_one_run_s": one_run_validation,
            "predict_vs_validation": one_run_validation / one_run_predict,
            "runs": args.eval_runs, "test_images": sum(1 for c in CLASSES for _ in os.scandir(os.path.join(test, c)))}


def run_measure(args):
    if args.img_size is None or args.batch_size is None:
        raise UserError("--measure needs --img_size and --batch_size")
    if not os.path.isdir(os.path.join(args.work_dir, "train")):
        raise UserError(f"--measure: --work_dir {args.work_dir} holds no generated images (no train/ folder); run "
                        f"python3 bench.py once with --work_dir {args.work_dir} (without --measure) to make them")
    import torch
    fn = {"compute": lambda: measure_compute(args), "train": lambda: measure_train(args), "naive": lambda: measure_naive(args),
          "eval": lambda: measure_eval(args)}[args.measure]
    out = fn()
    out["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["peak_cuda_MiB"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("BENCH " + json.dumps(out))


# ---------------------------------------------------------------- the driver

def child(args, name, size, batch, steps, train_cap=0):
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", name, "--img_size", str(size),
           "--batch_size", str(batch), "--steps", str(steps), "--device", args.device, "--work_dir", args.work_dir,
           "--eval_runs", str(args.eval_runs), "--train_cap", str(train_cap), f"--train_flags={args.train_flags}",
           "--images_per_class", str(args.images_per_class), "--losses", *args.losses]
    if args.num_workers is not None:
        cmd += ["--num_workers", str(args.num_workers)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("BENCH ")]
    if out.returncode != 0 or not line:
        sys.exit(f"bench: measurement {name} at {size} px failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][6:])


def measure_eval_size(args, size):
    """The evaluation comparison at one image size, in a child process; printed and returned."""
    e = child(args, "eval", size, 64, args.steps)
    e["img_size"] = size
    images = e["runs"] * e["test_images"]
    e["validation_img_per_s"], e["validation_bf16_img_per_s"] = images / e["validation_s"], images / e["validation_bf16_s"]
    print(f"evaluation of {e['runs']} runs at {size} px: validation.py {e['validation_s']:.1f}s (fp32, the "
          f"default; {e['validation_img_per_s']:.0f} img/s), {e['validation_bf16_s']:.1f}s (--precision bf16; "
          f"{e['validation_bf16_img_per_s']:.0f} img/s); one by one (fp32) {e['one_by_one_s']:.1f}s; "
          f"speedup {e['eval_speedup']:.2f}x ({e['eval_speedup_bf16']:.2f}x with bf16); fp32 predictions equal "
          f"one by one: {e['fp32_same_correct_as_one_by_one']}; correct per run, bf16 minus one by one: "
          f"{e['bf16_correct_minus_one_by_one']}", flush=True)
    n = e["test_images"]
    print(f"one run at {size} px: predict.py {n / e['predict_s']:.0f} img/s, validation.py "
          f"{n / e['validation_one_run_s']:.0f} img/s (predict/validation speed {e['predict_vs_validation']:.2f})",
          flush=True)
    return e


def measure_config(args, size, batch, cpu):
    """compute, train and naive for one image size and batch size -> dict with the ratios."""
    big = args.quick and cpu and size > 128
    b, steps, cap = (min(batch, 16), max(3, args.steps // 4), 64) if big else (batch, args.steps, 0)
    r = {"img_size": size, "batch_size": b}
    for m in [m for m in ("compute", "train", "naive") if m not in args.skip]:
        r[m] = child(args, m, size, b, steps, cap)
        print(f"{size} px, batch {b}, {m:<7}: {r[m]['img_per_s']:8.1f} img/s, peak RSS {r[m]['peak_rss_MiB']:.0f} MiB"
              + (f", CUDA {r[m]['peak_cuda_MiB']:.0f} MiB" if "peak_cuda_MiB" in r[m] else ""), flush=True)
    r["train_vs_compute_limit"] = r["train"]["vs_compute_limit"]
    r["train_vs_naive"] = r["train"]["img_per_s"] / r["naive"]["img_per_s"] if "naive" in r else None
    r["contrastive_overhead"] = r.get("compute", {}).get("contrastive_overhead")
    r["loss_overhead"] = r.get("compute", {}).get("loss_overhead", {})
    print(f"{size} px, batch {b}{' ' + args.train_flags if args.train_flags else ''}: train "
          f"{r['train']['img_per_s']:.1f} img/s vs compute limit "
          f"{r['train']['compute_img_per_s']:.1f} img/s in the same process = {r['train_vs_compute_limit']:.3f}; "
          + (f"train/naive {r['train_vs_naive']:.2f}x; " if r["train_vs_naive"] else "")
          + "loss overhead " + (", ".join(f"{m} {v:.3f}" for m, v in r["loss_overhead"].items()) or "not timed")
          + "; "
          f"data wait {r['train']['data_wait_fraction']:.1%}; image cache {r['train']['cache_MiB']:.0f} MiB, augmented on "
          f"the {r['train'].get('data_path')}", flush=True)
    return r


def jobs_threads_configs(spec, cpus):
    """--jobs_threads -> [(jobs, threads)]: as given ('2x1'), or 1xN, (N/2)x2, Nx1 for N CPUs."""
    if spec:
        return [tuple(int(v) for v in c.lower().split("x")) for c in spec]
    return list(dict.fromkeys([(1, cpus), *([(cpus // 2, 2)] if cpus >= 4 and cpus % 2 == 0 else []), (cpus, 1)]))


def measure_jobs_threads(args, sizes=(32, 64), batch=64):
    """Total training img/s of J x T for each configuration at each size -> table, fastest per size."""
    table = []
    for size in sizes:
        for jobs, threads in jobs_threads_configs(args.jobs_threads, available_cpus()):
            c = measure_concurrent(args, size, batch, jobs, epochs=4,
                                   extra=["--threads", str(threads), "--num_workers", "0"])
            table.append({"img_size": size, "jobs": jobs, "threads": threads, "total_img_per_s": c["total_img_per_s"],
                          "whole_job_img_per_s": c["whole_job_img_per_s"]})
            print(f"{jobs} job(s) x {threads} thread(s) at {size} px, batch {batch}: {c['total_img_per_s']:.1f} img/s "
                  f"in all (whole job {c['whole_job_img_per_s']:.1f})", flush=True)
    fastest = {size: max((r for r in table if r["img_size"] == size), key=lambda r: r["total_img_per_s"])
               for size in sizes}
    return table, {f"{s}px": f"{r['jobs']}x{r['threads']}" for s, r in fastest.items()}


def measure_concurrent(args, size, batch, n, epochs=6, extra=()):
    """Total training img/s of n train.py processes started together on the device, each in its own
    run folder and seed: the sum over runs of each run's median epoch rate over epochs 2..epochs (while
    all of them train), and the whole job's images / wall time (start-up and decoding included)."""
    save = os.path.join(args.work_dir, f"concurrent_{size}_{batch}_{n}")
    shutil.rmtree(save, ignore_errors=True)
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--train_data_root", os.path.join(args.work_dir, "train"),
           "--classes", *CLASSES, "--ratio", "1:1", "--save_root", save, "--num_epochs", str(epochs),
           "--img_size", str(size), "--weights", "none", "--batch_size", str(batch), "--device", args.device,
           *shlex.split(args.train_flags), *extra]
    env = dict(os.environ)
    if "--threads" in extra:
        env.update(OMP_NUM_THREADS=extra[extra.index("--threads") + 1])
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd + ["--run_id", str(k), "--seed", str(k)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env) for k in range(1, n + 1)]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        sys.exit(f"bench: {n} concurrent train.py runs failed:\n{errors[0][-3000:]}")
    rates, images = [], 0
    for k in range(1, n + 1):
        with open(os.path.join(save, "baseline", "1_1", f"run_{k}", "metrics.jsonl")) as f:
            per_epoch = [json.loads(l) for l in f]
        rates.append(float(np.median([m["img_per_s"] for m in per_epoch[1:]])))
        images += sum(m["images"] for m in per_epoch)
    return {"runs": n, "img_size": size, "batch_size": batch, "total_img_per_s": sum(rates),
            "per_run_img_per_s": rates, "whole_job_img_per_s": images / wall}


def throughput_figures(c, peak_tflops):
    """img/s x GFLOP per image as TFLOP/s (and as a fraction of peak_tflops), and the paper's full grid
    in hours at train.py's measured rate (meaningful at 224 px, the paper's size)."""
    gflop = GFLOP_PER_TRAIN_IMAGE_224 * (c["img_size"] / 224) ** 2
    out = {"paper_grid_hours_at_train_rate": paper_grid_images() / c["train"]["img_per_s"] / 3600}
    for m in ("compute", "train"):
        rate = c["train"]["compute_img_per_s"] if m == "compute" else c["train"]["img_per_s"]
        out[f"{m}_tflops"] = rate * gflop / 1000
        if peak_tflops:
            out[f"{m}_fraction_of_peak"] = out[f"{m}_tflops"] / peak_tflops
    return out


def _round(d):
    return {k: round(v, 3) if isinstance(v, float) else _round(v) if isinstance(v, dict) else v for k, v in d.items()}


def main():
    args = get_args_parser().parse_args()
    if args.measure:
        return run_measure(args)
    per_class = args.images_per_class      # train.py's epoch: 2 x this, enough steps for a steady state
    test_per_class = args.test_per_class
    t0 = time.time()
    make_jpeg_folder(os.path.join(args.work_dir, "train"), per_class, seed=0)
    make_jpeg_folder(os.path.join(args.work_dir, "test"), test_per_class, seed=1)
    print(f"JPEG folders ready in {args.work_dir} ({time.time() - t0:.0f}s)", flush=True)
    import torch
    from devices import resolve_device
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({available_cpus()} cores, {cpu_name()})"
    configs = [] if "train" in args.skip else [measure_config(args, size, batch, device.type == "cpu")
                                               for size in args.img_sizes for batch in args.batch_sizes]
    evals = [] if "eval" in args.skip else [measure_eval_size(args, size) for size in args.eval_sizes or args.img_sizes]
    concurrent = []
    for n in args.concurrent:
        c = measure_concurrent(args, args.img_sizes[0], args.batch_sizes[0], n)
        concurrent.append(c)
        print(f"{n} concurrent train.py run(s) at {c['img_size']} px, batch {c['batch_size']}: "
              f"{c['total_img_per_s']:.1f} img/s in all ({c['total_img_per_s'] / concurrent[0]['total_img_per_s']:.2f}x "
              f"the first count's), whole job {c['whole_job_img_per_s']:.1f} img/s; paper grid at this rate: "
              f"{paper_grid_images() / c['total_img_per_s'] / 3600:.1f} h", flush=True)
    side_by_side = fastest = None
    if args.jobs_threads is not None and device.type == "cpu":
        side_by_side, fastest = measure_jobs_threads(args)
    first = configs[0] if configs else None
    summary = {"device": name, "img_size": args.img_sizes, "train_flags": args.train_flags,
               "train_vs_naive": round(first["train_vs_naive"], 3) if first and first["train_vs_naive"] else None,
               "train_vs_compute_limit": round(first["train_vs_compute_limit"], 3) if first else None,
               "contrastive_overhead": first and first["contrastive_overhead"] and round(first["contrastive_overhead"], 3),
               "loss_overhead": _round(first["loss_overhead"]) if first else None,
               "eval_speedup": round(evals[0]["eval_speedup"], 3) if evals else None,
               "eval_img_size": evals[0]["img_size"] if evals else None,
               "per_config": [_round({
                   "img_size": c["img_size"], "batch_size": c["batch_size"],
                   "train_img_per_s": c["train"]["img_per_s"], "compute_img_per_s": c["train"]["compute_img_per_s"],
                   "naive_img_per_s": c["naive"]["img_per_s"] if "naive" in c else None,
                   "train_vs_compute_limit": c["train_vs_compute_limit"],
                   "train_vs_naive": c["train_vs_naive"], "contrastive_overhead": c["contrastive_overhead"],
                   "loss_overhead": c["loss_overhead"], "data_wait_fraction": c["train"]["data_wait_fraction"],
                   "cache_MiB": c["train"]["cache_MiB"], "data_path": c["train"].get("data_path"),
                   "peak_rss_MiB": {m: c[m]["peak_rss_MiB"] for m in ("compute", "train", "naive") if m in c},
                   "peak_cuda_MiB": {m: c[m].get("peak_cuda_MiB") for m in ("compute", "train", "naive") if m in c},
                   **throughput_figures(c, args.peak_tflops)})
                   for c in configs],
               "eval": [_round(e) for e in evals],
               "concurrent": [_round({**c, "paper_grid_hours": paper_grid_images() / c["total_img_per_s"] / 3600})
                              for c in concurrent],
               "jobs_threads": side_by_side and [_round(r) for r in side_by_side],
               "jobs_threads_fastest": fastest,
               "reproduce_default_on_cpu": f"{available_cpus()}x1"}
    print(json.dumps(summary))


if __name__ == "__main__":
    run_main(main)
