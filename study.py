"""The study: which remedy for class imbalance wins on the demo's data, and by how much, with paired
statistics.

    python3 study.py            # about 70 min on 2 CPU cores; re-run the same command to continue

On both Fashion-MNIST conditions of demo.py (fine: Shirt vs T-shirt/top; coarse: Trouser vs
T-shirt/top) it runs reproduce.py with the paper's four variants, every long-tail baseline (focal, cb,
ldam_drw, la, sqrt), oversample+supcon (the standard contrastive loss in the paper's place) and
oversample+fscl_neg1 (the paper's method with target -1), at ratios 0.1 and 0.01, 10 runs per cell,
at the demo's CPU-sized settings (32 px, 600 majority images, 3 epochs, random initialisation).
reproduce.py evaluates every run (validation.py) and report.py compares every method with the paper's
method run by run (comparison.md, comparison.csv, comparison.png in each condition's folder).
Finished runs are kept: an interrupted study continues where it stopped. Each finished run keeps its
best.pth only (--no-keep_last): 440 x 45 MB = 20 GB of disk, where last.pth as well would take 80 GB.
"""
import os
import platform
import subprocess
import sys
import time

import demo
from losses import METHODS
from utils import UserError, command_line, ensure_output_dir, run_main, write_json_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
STUDY_METHODS = list(METHODS)   # the paper's four, the five baselines, oversample+supcon, oversample+fscl_neg1


def get_args_parser():
    p = command_line(__doc__)
    p.add_argument("--conditions", nargs="+", default=["fine", "coarse"], help="fine and/or coarse")
    p.add_argument("--methods", nargs="+", default=STUDY_METHODS, help="default: " + " ".join(STUDY_METHODS))
    p.add_argument("--reference", default="proposed", help="the method every other one is compared with")
    p.add_argument("--ratios", nargs="+", default=["0.1", "0.01"], help="minority fractions")
    p.add_argument("--runs", type=int, default=10, help="runs per cell (10, as the paper: with n pairs the exact "
                   "sign-flip test's smallest p is 2 / 2^n, 0.002 for 10, which can pass Holm's correction over the "
                   "20 cells of a table; 8 pairs (0.008) could not)")
    p.add_argument("--num_epochs", type=int, default=3, help="epochs per run (the demo's; paper: 100)")
    p.add_argument("--max_per_class", type=int, default=600, help="majority images (the demo's; paper: 10,000)")
    p.add_argument("--img_size", type=int, default=32, help="image size (the demo's; paper: 224)")
    p.add_argument("--save_root", default=os.path.join(HERE, "study_runs"), help="<save_root>/<condition>/...")
    p.add_argument("--data_dir", default=os.path.join(HERE, "dataset", "fashion-mnist"),
                   help="where demo.py's ImageFolders are (written when missing)")
    p.add_argument("--source", default=demo.DEBIAN_DIR, help="folder with Fashion-MNIST's idx .gz files")
    p.add_argument("--jobs", type=int, default=None, help="cells at once (reproduce.py --jobs; default: as many as the "
                   "CPUs allow at one thread each)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (reproduce.py --threads; default 1)")
    p.add_argument("--dry_run", action="store_true", help="print the reproduce.py commands only")
    return p


def reproduce_command(args, cond, roots):
    return [sys.executable, os.path.join(HERE, "reproduce.py"),
            "--train_data_root", roots[cond]["train"], "--test_data_root", roots[cond]["valid"],
            "--classes", *demo.CONDITIONS[cond], "--save_root", os.path.join(args.save_root, cond),
            "--variants", *args.methods, "--ratios", *args.ratios, "--runs", str(args.runs),
            "--num_epochs", str(args.num_epochs), "--max_per_class", str(args.max_per_class),
            "--img_size", str(args.img_size), "--weights", "none", "--device", "cpu", "--no-keep_last",
            "--reference", args.reference, *(["--jobs", str(args.jobs)] if args.jobs else []),
            *(["--threads", str(args.threads)] if args.threads else [])]


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    bad = [c for c in args.conditions if c not in demo.CONDITIONS]
    if bad:
        raise UserError(f"--conditions {' '.join(bad)}: choose from {' '.join(demo.CONDITIONS)}")
    if args.reference not in args.methods:
        raise UserError(f"--reference {args.reference} is not among --methods ({' '.join(args.methods)})")
    if args.dry_run:
        roots = {c: {s: os.path.join(args.data_dir, c, s) for s in demo.SPLITS} for c in args.conditions}
        for cond in args.conditions:
            print(" ".join(reproduce_command(args, cond, roots)))
        return
    ensure_output_dir(args.save_root, "--save_root")
    ensure_output_dir(args.data_dir, "--data_dir")
    t0 = time.time()
    roots = demo.build_image_folders(args.source, args.data_dir, args.conditions)
    log = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpu": platform.processor(),
           "cpus": os.cpu_count(), "argv": sys.argv[1:] if argv is None else list(argv), "conditions": {}}
    failed = []
    for cond in args.conditions:
        cmd = reproduce_command(args, cond, roots)
        print(f"\n== {cond}: {' vs '.join(demo.CONDITIONS[cond])}\n$ {' '.join(cmd)}", flush=True)
        t = time.time()
        rc = subprocess.run(cmd).returncode
        log["conditions"][cond] = {"seconds": round(time.time() - t), "exit": rc}
        if rc != 0:
            failed.append(cond)
    log["seconds"] = round(time.time() - t0)
    write_json_atomic(os.path.join(args.save_root, "study_time.json"), log)
    print(f"\nstudy finished in {log['seconds'] / 60:.1f} min; comparisons: "
          + ", ".join(os.path.join(args.save_root, c, "comparison.md") for c in args.conditions), flush=True)
    if failed:
        raise UserError(f"reproduce.py stopped on {' '.join(failed)} (its message is above); re-run python3 study.py "
                        f"to continue where it stopped")


if __name__ == "__main__":
    run_main(main)
