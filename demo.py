"""The main job on real data, offline: a reduced ablation on Fashion-MNIST, with table and figure.

    python3 demo.py

1. Builds ImageFolders from Fashion-MNIST (Zalando, MIT licence), train and valid from the dataset's own
   train/test split, for two conditions like the paper's:
     fine   = T-shirt/top (majority) vs Shirt (minority), a notoriously confusable pair
     coarse = T-shirt/top (majority) vs Trouser (minority)
   It reads Debian's copy (package dataset-fashion-mnist, /usr/share/datasets/fashion-mnist) when
   present, else torchvision's FashionMNIST download.
2. Runs reproduce.py on each condition with CPU-sized settings (32 px, few epochs, fewer images,
   ratios and runs than the paper), which trains, evaluates (validation.py) and reports (report.py).
"""
import gzip
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from runs import remove_weights
from utils import UserError, command_line, ensure_output_dir, run_main

HERE = os.path.dirname(os.path.abspath(__file__))
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
LABELS = {0: "tshirt-top", 1: "trouser", 2: "pullover", 3: "dress", 4: "coat", 5: "sandal", 6: "shirt", 7: "sneaker",
          8: "bag", 9: "ankle-boot"}                                  # Fashion-MNIST's ten classes
CONDITIONS = {"fine": ("tshirt-top", "shirt"), "coarse": ("tshirt-top", "trouser")}
SPLITS = {"train": "train", "valid": "t10k"}


def get_args_parser():
    p = command_line(__doc__)
    p.add_argument("--conditions", nargs="+", default=["fine", "coarse"], help="fine and/or coarse")
    p.add_argument("--data_dir", default=os.path.join("dataset", "fashion-mnist"),
                   help="where the ImageFolders are written (relative paths: to the working folder)")
    p.add_argument("--source", default=DEBIAN_DIR, help="folder with the idx .gz files (Debian's copy)")
    p.add_argument("--save_root", default="demo_runs", help="runs, tables and figures (<save_root>/<condition>/)")
    p.add_argument("--ratios", nargs="+", default=["1", "0.1", "0.01"], help="minority fractions (paper: 5)")
    p.add_argument("--runs", type=int, default=2, help="runs per cell (paper: 10)")
    p.add_argument("--num_epochs", type=int, default=3, help="epochs per run (paper: 100)")
    p.add_argument("--max_per_class", type=int, default=600, help="majority images (paper: 10,000)")
    p.add_argument("--img_size", type=int, default=32, help="image size (paper: 224)")
    p.add_argument("--jobs", type=int, default=None, help="cells at once (reproduce.py --jobs; default: as many as the "
                   "CPUs allow at one thread each, measured fastest on 2 cores)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (reproduce.py --threads; "
                   "default 1); the thread count changes the last bits of the weights, so the tables too")
    p.add_argument("--cpu_isa", choices=tuple(CPU_ISA), default="avx2", help="the instruction set the runs' "
                   "CPU kernels may use (torch's vectorised kernels, oneDNN, MKL): avx2 gives the tables of "
                   "docs/results.md on CPUs with AVX-512 too (measured: an AVX-512 AMD EPYC gave the AVX2 one's "
                   "tables number for number); native lets each kernel use the CPU's best, which changes the last "
                   "bits and, through 3 epochs, the accuracies. A variable already set in the environment wins")
    p.add_argument("--keep_weights", action="store_true", help="keep each run's best.pth (45 MB each, 2.1 GB for the "
                   "48 runs) after its evaluation, e.g. for predict.py; by default a condition's weights are removed "
                   "once its tables are written (runs.remove_weights records which), and a re-run reuses the recorded "
                   "evaluation")
    p.add_argument("--keep_last", action="store_true", help="also keep each run's last.pth (135 MB each) and the "
                   "weights of the other rules of model selection (implies --keep_weights)")
    p.add_argument("--build_only", action="store_true", help="only write the ImageFolders")
    p.add_argument("--dry_run", action="store_true", help="print the reproduce.py command of each condition; "
                   "write and train nothing")
    return p


# ---------------------------------------------------------------- Fashion-MNIST -> ImageFolder

def read_idx(path):
    """An idx .gz file -> numpy array (images (N, 28, 28) uint8 or labels (N,) uint8)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(source, split):
    """(images, labels) of 'train' or 't10k' from source, else from torchvision's download."""
    images = os.path.join(source, f"{split}-images-idx3-ubyte.gz")
    labels = os.path.join(source, f"{split}-labels-idx1-ubyte.gz")
    if os.path.isfile(images) and os.path.isfile(labels):
        return read_idx(images), read_idx(labels)
    try:
        from torchvision.datasets import FashionMNIST
        ds = FashionMNIST(os.path.join(HERE, "dataset", "torchvision"), train=split == "train", download=True)
        return ds.data.numpy(), ds.targets.numpy()
    except Exception as e:
        raise UserError(f"Fashion-MNIST is neither in {source} (install it offline with: apt-get install "
                        f"dataset-fashion-mnist) nor downloadable by torchvision ({type(e).__name__}: {e})")


def build_image_folders(source, data_dir, conditions, limit=None, classes=None):
    """Write <data_dir>/<condition>/<train|valid>/<class>/<index>.png; returns {condition: {split: root}}.
    Files already there are kept (a second call writes nothing). limit caps the images per class (the
    first ones of the split); classes {condition: class names} for conditions other than CONDITIONS."""
    roots, classes = {}, {**CONDITIONS, **(classes or {})}
    for split, prefix in SPLITS.items():
        images, labels = load_fashion_mnist(source, prefix)
        for cond in conditions:
            root = os.path.join(data_dir, cond, split)
            roots.setdefault(cond, {})[split] = root
            for name in classes[cond]:
                label = next(k for k, v in LABELS.items() if v == name)
                index = np.flatnonzero(labels == label)[:limit]
                folder = os.path.join(root, name)
                os.makedirs(folder, exist_ok=True)
                for i in index:
                    path = os.path.join(folder, f"{i:05d}.png")
                    if not os.path.exists(path):
                        Image.fromarray(images[i], mode="L").save(path)
    return roots


# ---------------------------------------------------------------- the reduced ablation

# environment variables that cap the kernels at AVX2 (runs.ISA_VARIABLES, recorded in each run's
# config.json): torch's own vectorised kernels, oneDNN's convolutions, MKL's matrix products (its
# conditional numerical reproducibility, the same code path on Intel and AMD)
CPU_ISA = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
           "native": {}}


def isa_env(args):
    """-> the variables --cpu_isa sets for reproduce.py, those not already set in this environment (none
    on a processor other than x86-64, where they mean nothing)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return {k: v for k, v in CPU_ISA[args.cpu_isa].items() if k not in os.environ}


def isa_prefix(args):
    """The variables of isa_env as a shell prefix ('' when none), for the commands printed."""
    return "".join(f"{k}={v} " for k, v in isa_env(args).items())


def reproduce_command(args, cond, roots):
    return [sys.executable, os.path.join(HERE, "reproduce.py"),
            "--train_data_root", roots[cond]["train"], "--test_data_root", roots[cond]["valid"],
            "--classes", *CONDITIONS[cond], "--save_root", os.path.join(args.save_root, cond),
            "--ratios", *args.ratios, "--runs", str(args.runs),
            "--num_epochs", str(args.num_epochs), "--max_per_class", str(args.max_per_class),
            "--img_size", str(args.img_size), "--weights", "none", "--device", "cpu",
            *(["--jobs", str(args.jobs)] if args.jobs else []), *(["--threads", str(args.threads)] if args.threads else []),
            *([] if args.keep_last else ["--no-keep_last", "--keep_selected", "train_acc"])]


def drop_weights(cond_root):
    """Remove the weights of every evaluated run under cond_root (reproduce.py's save root of one
    condition) -> bytes freed. A run counts as evaluated when results.json of its variant lists it."""
    freed = 0
    for variant in sorted(os.listdir(cond_root)):
        try:
            with open(os.path.join(cond_root, variant, "results.json"), encoding="utf-8") as f:
                results = json.load(f)
        except (OSError, ValueError):
            continue
        for ratios in results.get("variants", {}).values():
            for entry in ratios.values():
                for run in entry["runs"]:
                    freed += remove_weights(run["run_dir"], "demo.py: evaluated (results.json of its variant)")
    return freed


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    bad = [c for c in args.conditions if c not in CONDITIONS]
    if bad:
        raise UserError(f"--conditions {' '.join(bad)}: choose from {' '.join(CONDITIONS)}")
    env, prefix = isa_env(args), isa_prefix(args)
    if args.dry_run:
        roots = {c: {s: os.path.join(args.data_dir, c, s) for s in SPLITS} for c in args.conditions}
        for cond in args.conditions:
            print(prefix + " ".join(reproduce_command(args, cond, roots)))
        return
    ensure_output_dir(args.data_dir, "--data_dir")
    if not args.build_only:
        ensure_output_dir(args.save_root, "--save_root")
    t0 = time.time()
    roots = build_image_folders(args.source, args.data_dir, args.conditions)
    print(f"Fashion-MNIST ImageFolders ready under {args.data_dir} ({time.time() - t0:.0f}s)", flush=True)
    if args.build_only:
        return
    for cond in args.conditions:
        cmd = reproduce_command(args, cond, roots)
        print(f"\n== {cond}-grained condition: {' vs '.join(CONDITIONS[cond])}\n$ {prefix}{' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, env={**os.environ, **env}).returncode != 0:
            raise UserError(f"reproduce.py stopped on the {cond} condition (its message is above); re-run "
                            f"python3 demo.py to continue where it stopped")
        if not (args.keep_weights or args.keep_last):
            freed = drop_weights(os.path.join(args.save_root, cond))
            print(f"removed the {cond} runs' weights after their evaluation ({freed / 1e9:.2f} GB; "
                  f"--keep_weights keeps them)", flush=True)
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min; tables and figures: "
          + ", ".join(os.path.join(args.save_root, c, "table1.md") for c in args.conditions))


if __name__ == "__main__":
    run_main(main)
