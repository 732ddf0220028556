"""The study: which remedy for class imbalance wins on the demo's data, and by how much, with paired
statistics, under each rule of model selection, in two regimes.

    python3 study.py                          # regime 1: from scratch, 3 epochs (both conditions)
    python3 study.py --regime pretrained      # regime 2: from a pretrained backbone, a converged schedule
    python3 study.py --regime pretrained --probe 20   # the convergence probe that chose regime 2's epochs

Re-run the same command to continue where it stopped. Every run keeps the weights each rule of model
selection chooses (train.py --keep_selected; best.pth only where the epochs coincide), and reproduce.py
evaluates and compares the methods under each rule (validation.py and report.py --select): the paper's
train_acc in <save_root>/<condition>/, the others in <save_root>/<condition>/select_<rule>/.

Regime 1, 'scratch': both Fashion-MNIST conditions of demo.py (fine: Shirt vs T-shirt/top; coarse:
Trouser vs T-shirt/top), the paper's four variants, every long-tail baseline (focal, cb, ldam_drw, la,
sqrt), oversample+supcon and oversample+fscl_neg1, ratios 0.1 and 0.01, 10 runs per cell, at the demo's
CPU-sized settings (32 px, 600 majority images, 3 epochs, random initialisation).

Regime 2, 'pretrained': the same data, image size, majority count, seeds (so the same images) and 10
runs per cell, but each run fine-tunes a backbone pretrained on the seven Fashion-MNIST classes that
neither condition uses (built once by this script with train.py, see --backbone_dir), for a schedule
that converges (--num_epochs, chosen by the probe: docs/results.md), on the fine condition, at ratios
0.1, 0.01 and the paper's 0.005, with the methods of REGIMES['pretrained'].
"""
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import demo
from losses import METHODS
from runs import SELECT_RULES, file_sha256
from utils import UserError, available_cpus, command_line, cpu_name, ensure_output_dir, run_main, write_json_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
# The seven Fashion-MNIST classes that neither condition uses: the backbone's pretraining data.
BACKBONE_CLASSES = ("pullover", "dress", "coat", "sandal", "sneaker", "bag", "ankle-boot")
BACKBONE = {"classes": list(BACKBONE_CLASSES), "images_per_class": 2000, "num_epochs": 4, "img_size": 32, "seed": 0,
            "batch_size": 64, "lr": 0.001}
REGIMES = {
    "scratch": {"conditions": ["fine", "coarse"], "methods": list(METHODS), "ratios": ["0.1", "0.01"],
                "num_epochs": 3, "weights": "none", "save_root": "study_runs"},
    # the fine condition only (the paper's question) and the 9 methods the study needs at least; focal left out
    # (behind class-balanced weights and logit adjustment in regime 1), oversample+fscl_neg1 too (within 0.002
    # balanced accuracy of the paper's T = 0 in regime 1). At 20 epochs this is 4.4 million training images:
    # about 11 h 20 min on the AMD EPYC without AVX-512 (2026-11-30, in parts; docs/performance.md). Kept:
    # fewer methods would drop ones the study needs, fewer epochs would leave LDAM-DRW no re-weighted epochs
    # (the probe)
    "pretrained": {"conditions": ["fine"], "methods": ["baseline", "contrastive", "oversampling", "proposed", "la",
                                                       "ldam_drw", "cb", "sqrt", "oversample+supcon"],
                   "ratios": ["0.1", "0.01", "0.005"], "num_epochs": 20, "weights": "backbone",
                   "save_root": "study_runs_pretrained"},
}
PROBE_METHODS = ("ldam_drw", "proposed", "la")     # the slowest to converge: DRW's late phase, the auxiliary term


def get_args_parser():
    p = command_line(__doc__)
    p.add_argument("--regime", choices=list(REGIMES), default="scratch", help="scratch (regime 1, the default) or "
                   "pretrained (regime 2); the other defaults below follow the regime")
    p.add_argument("--conditions", nargs="+", default=None, choices=list(demo.CONDITIONS),
                   help="fine and/or coarse (scratch: both; pretrained: fine)")
    p.add_argument("--methods", "--variants", dest="methods", nargs="+", default=None, help="(--variants: the same, "
                   "as reproduce.py names it) scratch: " + " ".join(REGIMES["scratch"]["methods"])
                   + "; pretrained: " + " ".join(REGIMES["pretrained"]["methods"]))
    p.add_argument("--reference", default="proposed", help="the method every other one is compared with")
    p.add_argument("--ratios", nargs="+", default=None, help="minority fractions (scratch: 0.1 0.01; pretrained: "
                   "0.1 0.01 0.005)")
    p.add_argument("--runs", type=int, default=10, help="runs per cell (10, as the paper: with n pairs the exact "
                   "sign-flip test's smallest p is 2 / 2^n, 0.002 for 10, which can pass Holm's correction over the "
                   "20 cells of a table; 8 pairs (0.008) could not)")
    p.add_argument("--num_epochs", type=int, default=None, help="epochs per run (scratch: 3, the demo's; pretrained: "
                   "20, from --probe 20: docs/results.md; paper: 100)")
    p.add_argument("--max_per_class", type=int, default=600, help="majority images (the demo's; paper: 10,000)")
    p.add_argument("--img_size", type=int, default=32, help="image size (the demo's; paper: 224)")
    p.add_argument("--save_root", default=None, help="<save_root>/<condition>/... (default: study_runs/ or "
                   "study_runs_pretrained/ in the working folder)")
    p.add_argument("--data_dir", default=os.path.join("dataset", "fashion-mnist"),
                   help="where demo.py's ImageFolders are (written when missing)")
    p.add_argument("--backbone_dir", default=os.path.join("dataset", "fashion-mnist", "backbone"),
                   help="the pretrained backbone (regime 2): backbone.pth and backbone.json, built here when missing")
    p.add_argument("--source", default=demo.DEBIAN_DIR, help="folder with Fashion-MNIST's idx .gz files")
    p.add_argument("--jobs", type=int, default=None, help="cells at once (reproduce.py --jobs; default: as many as the "
                   "CPUs allow at one thread each)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (reproduce.py --threads; default 1)")
    p.add_argument("--probe", type=int, metavar="EPOCHS", default=None, help="instead of the study: train "
                   f"{', '.join(PROBE_METHODS)} at 1:0.01 (fine, seed 1) for EPOCHS epochs in the regime's "
                   "initialisation and plot their training loss and balanced Train Acc per epoch "
                   "(<save_root>/probe/convergence.png)")
    p.add_argument("--cpu_isa", choices=tuple(demo.CPU_ISA), default="avx2", help="the instruction set the runs' "
                   "CPU kernels may use, as demo.py --cpu_isa: avx2 (the default) gives results/'s numbers on x86-64 "
                   "CPUs with AVX-512 too; native lets each kernel use the CPU's best, which changes the last bits "
                   "and, through training, the accuracies. A variable already set in the environment wins")
    p.add_argument("--dry_run", action="store_true", help="print the reproduce.py commands only")
    return p


def run_capped(cmd, args, **kw):
    """subprocess.run with the variables of --cpu_isa (demo.isa_env) -> its exit status."""
    return subprocess.run(cmd, env={**os.environ, **demo.isa_env(args)}, **kw).returncode


def resolve(args):
    """The regime's defaults for every option left unset."""
    regime = REGIMES[args.regime]
    for key in ("conditions", "methods", "ratios", "num_epochs", "save_root"):
        if getattr(args, key) is None:
            setattr(args, key, regime[key])
    if args.reference not in args.methods:
        raise UserError(f"--reference {args.reference} is not among --methods ({' '.join(args.methods)})")
    return args


def reproduce_command(args, cond, roots, weights):
    return [sys.executable, os.path.join(HERE, "reproduce.py"),
            "--train_data_root", roots[cond]["train"], "--test_data_root", roots[cond]["valid"],
            "--classes", *demo.CONDITIONS[cond], "--save_root", os.path.join(args.save_root, cond),
            "--variants", *args.methods, "--ratios", *args.ratios, "--runs", str(args.runs),
            "--num_epochs", str(args.num_epochs), "--max_per_class", str(args.max_per_class),
            "--img_size", str(args.img_size), "--weights", weights, "--device", "cpu", "--no-keep_last",
            "--reference", args.reference, "--select", *SELECT_RULES,
            *(["--jobs", str(args.jobs)] if args.jobs else []), *(["--threads", str(args.threads)] if args.threads else [])]


# ---------------------------------------------------------------- the pretrained backbone

def build_backbone(args):
    """ResNet-18 trained with train.py on the seven classes neither condition uses (their train split,
    BACKBONE's images per class, epochs and seed) -> path of backbone.pth (a state_dict; its 7-class head
    is replaced when a run fine-tunes it, as with ImageNet weights). backbone.json beside it records
    the classes, images, epochs, seed, the command, the accuracy on those classes' test images and the
    sha256. Reused when present and made with the same settings."""
    out = ensure_output_dir(args.backbone_dir, "--backbone_dir")
    pth, meta_path = os.path.join(out, "backbone.pth"), os.path.join(out, "backbone.json")
    settings = {**BACKBONE, "img_size": args.img_size}
    if os.path.isfile(pth) and os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("settings") == settings and meta.get("sha256") == file_sha256(pth):
            print(f"backbone: reusing {pth} (test accuracy {meta['test_accuracy']:.3f} on the 7 classes)", flush=True)
            return pth
    t0 = time.time()
    roots = demo.build_image_folders(args.source, out, ["data"], limit=settings["images_per_class"],
                                     classes={"data": BACKBONE_CLASSES})["data"]
    runs = os.path.join(out, "runs")
    shutil.rmtree(runs, ignore_errors=True)
    train_cmd = [sys.executable, os.path.join(HERE, "train.py"), "--train_data_root", roots["train"],
                 "--classes", *BACKBONE_CLASSES, "--ratio", "all", "--save_root", runs,
                 "--num_epochs", str(settings["num_epochs"]), "--img_size", str(settings["img_size"]),
                 "--batch_size", str(settings["batch_size"]), "--lr", str(settings["lr"]), "--weights", "none",
                 "--seed", str(settings["seed"]), "--device", "cpu", "--keep_selected", "train_acc", "--no-keep_last"]
    print(f"backbone: training on {len(BACKBONE_CLASSES)} classes x {settings['images_per_class']} images\n$ "
          + " ".join(train_cmd), flush=True)
    if run_capped(train_cmd, args) != 0:
        raise UserError("the backbone's training stopped (its message is above); re-run to try again")
    val_cmd = [sys.executable, os.path.join(HERE, "validation.py"), "--model_root", os.path.join(runs, "baseline"),
               "--test_data_root", roots["valid"], "--device", "cpu"]
    if run_capped(val_cmd, args, stdout=subprocess.DEVNULL) != 0:
        raise UserError("the backbone's evaluation failed (its message is above)")
    with open(os.path.join(runs, "baseline", "results.json"), encoding="utf-8") as f:
        run = json.load(f)["variants"]["baseline"]["all"]["runs"][0]
    import torch
    ckpt = torch.load(os.path.join(run["run_dir"], "best.pth"), weights_only=True)
    torch.save(ckpt["model"], pth)
    meta = {"settings": settings, "sha256": file_sha256(pth), "test_accuracy": run["metrics"]["accuracy"],
            "test_per_class_accuracy": run["metrics"]["per_class_acc"], "epoch": run["best_epoch"],
            "train_images": roots["train"], "test_images": roots["valid"], "command": " ".join(train_cmd[1:]),
            "seconds": round(time.time() - t0), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node()}
    write_json_atomic(meta_path, meta)
    shutil.rmtree(runs, ignore_errors=True)
    print(f"backbone: {pth}, test accuracy {meta['test_accuracy']:.3f} on the 7 classes ({meta['seconds']}s)", flush=True)
    return pth


# ---------------------------------------------------------------- the convergence probe

def probe(args, roots, weights):
    """Train PROBE_METHODS at 1:0.01 (fine, seed 1) for --probe epochs and plot the training loss and the
    balanced Train Acc per epoch -> the figure's path."""
    from runs import balanced_train_acc
    save = os.path.join(args.save_root, "probe")
    cmd = reproduce_command(args, "fine", roots, weights)
    cmd[cmd.index("--save_root") + 1] = save
    cmd[cmd.index("--variants") + 1:cmd.index("--ratios")] = list(PROBE_METHODS)
    cmd[cmd.index("--ratios") + 1:cmd.index("--runs")] = ["0.01"]
    cmd[cmd.index("--runs") + 1] = "1"
    cmd[cmd.index("--num_epochs") + 1] = str(args.probe)
    cmd[cmd.index("--test_data_root"):cmd.index("--test_data_root") + 2] = []      # training only
    print("$ " + " ".join(cmd), flush=True)
    if run_capped(cmd, args) != 0:
        raise UserError("the probe stopped (its message is above); re-run to continue")
    curves = {}
    for name in PROBE_METHODS:
        with open(os.path.join(save, name, "1_0.01", "run_1", "metrics.jsonl"), encoding="utf-8") as f:
            epochs = [json.loads(line) for line in f]
        curves[name] = [(m["epoch"], m["loss"], balanced_train_acc(m["per_class_acc"].values())) for m in epochs]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, c in curves.items():
        ax1.plot([e for e, _, _ in c], [l for _, l, _ in c], marker="o", ms=3, label=name)
        ax2.plot([e for e, _, _ in c], [b for _, _, b in c], marker="o", ms=3, label=name)
    ax1.set(xlabel="epoch", ylabel="training loss (all terms)", yscale="log")
    ax2.set(xlabel="epoch", ylabel="balanced Train Acc", ylim=(0.4, 1.01))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.regime}: fine 1:0.01, seed 1, {args.img_size} px")
    fig.tight_layout()
    path = os.path.join(save, "convergence.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    write_json_atomic(os.path.join(save, "convergence.json"), curves)
    print(f"probe: {path}", flush=True)
    return path


def main(argv=None):
    args = resolve(get_args_parser().parse_args(argv))
    if args.dry_run:
        roots = {c: {s: os.path.join(args.data_dir, c, s) for s in demo.SPLITS} for c in args.conditions}
        weights = "none" if REGIMES[args.regime]["weights"] == "none" else os.path.join(args.backbone_dir,
                                                                                         "backbone.pth")
        prefix = demo.isa_prefix(args)
        for cond in args.conditions:
            print(prefix + " ".join(reproduce_command(args, cond, roots, weights)))
        return
    ensure_output_dir(args.save_root, "--save_root")
    ensure_output_dir(args.data_dir, "--data_dir")
    t0 = time.time()
    weights = "none" if REGIMES[args.regime]["weights"] == "none" else build_backbone(args)
    roots = demo.build_image_folders(args.source, args.data_dir, sorted(set(args.conditions) | {"fine"}))
    if args.probe:
        return probe(args, roots, weights)
    log = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpu": cpu_name(),
           "cpus": available_cpus(), "machine_cpus": os.cpu_count(), "regime": args.regime,
           "argv": sys.argv[1:] if argv is None else list(argv), "isa_env": demo.isa_env(args), "conditions": {}}
    failed = []
    for cond in args.conditions:
        cmd = reproduce_command(args, cond, roots, weights)
        prefix = demo.isa_prefix(args)
        print(f"\n== {cond}: {' vs '.join(demo.CONDITIONS[cond])}\n$ {prefix}{' '.join(cmd)}", flush=True)
        t = time.time()
        rc = run_capped(cmd, args)
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
