"""Evaluate the best checkpoint of every run under a variant folder (or a whole saved_runs root).

    python3 validation.py --model_root ./saved_runs/baseline --test_data_root ./dataset/valid \
        --classes water-deer roe-deer

Each run's best model is the epoch with the highest 'Train Acc' in its train.log (ties: the earliest),
the paper's rule; --select balanced_train_acc or last evaluates the epoch another rule chooses (no rule
looks at the test images). Writes <model_root>/result_log.txt (for people) and results.json (for
programs, read by report.py), or result_log_<rule>.txt and results_<rule>.json under another rule;
with a saved_runs root, also one pair per variant folder. Test images are decoded once per image size
and shared by every run.
"""
import copy
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

import data
from devices import DEVICES, check_threads, resolve_device, use_threads
from model import (build_model, confusion_matrix, head_of, metrics_from_confusion, set_small_map_convs,
                   small_map_convs_of, use_exact_float32)
from runs import (CELL_EXCLUDES, RUN_DIR_RE, SELECT_RULES, WEIGHT_FILES, WEIGHTS_REMOVED, RunNotReady, fingerprint,
                  chosen_epoch, is_complete, load_best, parse_train_log, run_number, run_settings, setting_differences)
from utils import (UserError, command_line, decoding_workers, ensure_output_dir, run_main, write_json_atomic,
                   write_text_atomic)


def get_args_parser():
    p = command_line(__doc__)
    p.add_argument("--model_root", "--save_root", dest="model_root", required=True,
                   help="a variant folder (saved_runs/baseline) or saved_runs itself (--save_root: the same, as "
                   "reproduce.py and report.py name it)")
    p.add_argument("--test_data_root", required=True, help="ImageFolder root of the test images")
    p.add_argument("--classes", nargs="+", help="class names; must match each run's config.json (default: the run's)")
    p.add_argument("--batch_size", type=int, default=256, help="evaluation batch size (256)")
    p.add_argument("--num_workers", type=int, default=None, help="decoding workers (default: min(8, CPUs this process "
                   "may use); 0 = decode in this process")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto (cuda if available), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the evaluation (default: torch's; "
                   "reproduce.py passes its cells' --threads). Like training's, the count can move a logit's last bits")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 (default): exact float32 (TF32 off on CUDA), the same predictions on every "
                        "machine up to its float32 kernels; bf16: bf16 autocast, faster where the hardware runs "
                        "bf16 (CUDA, CPUs with AMX), and moves logits by about 1e-2")
    p.add_argument("--select", default="train_acc", choices=SELECT_RULES,
                   help="the epoch each run is evaluated at: train_acc (default; the paper's rule, the highest Train "
                   "Acc), balanced_train_acc (the highest mean of the per-class training accuracies) or last (the "
                   "last epoch); results of another rule than train_acc go to results_<rule>.json")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any run was skipped")
    p.add_argument("--reevaluate", action="store_true",
                   help="evaluate every run afresh; by default a run whose files are unchanged since its recorded "
                   "evaluation (same test folder, precision, rule, device and batch size) keeps that evaluation")
    return p


class Skip(Exception):
    """A run that cannot be evaluated; the message is the reason."""


# ---------------------------------------------------------------- finding runs

def _subdirs(path):
    return sorted(e.path for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _has_runs(variant_dir):
    return any(RUN_DIR_RE.match(os.path.basename(r)) for d in _subdirs(variant_dir) for r in _subdirs(d))


def find_variant_dirs(model_root):
    """[variant folders]: model_root itself, or its sub-folders when it is a saved_runs root."""
    if not os.path.isdir(model_root):
        raise UserError(f"--model_root {model_root} does not exist or is not a folder")
    if _has_runs(model_root):
        return [model_root]
    variants = [d for d in _subdirs(model_root) if _has_runs(d)]
    if not variants:
        raise UserError(f"--model_root {model_root}: no run folders found; expected "
                        f"<variant>/<ratio>/run_X (a variant folder) or <ratio>/run_X inside it")
    return variants


def list_runs(variant_dir):
    """[(ratio folder name, run_dir)] sorted by ratio folder then run number."""
    runs = []
    for ratio_dir in _subdirs(variant_dir):
        for r in _subdirs(ratio_dir):
            if RUN_DIR_RE.match(os.path.basename(r)):
                runs.append((os.path.basename(ratio_dir), r))
    return sorted(runs, key=lambda t: (t[0], run_number(t[1])))


def inspect_run(run_dir, classes=None, select="train_acc"):
    """-> (config, checkpoint dict, best epoch, best Train Acc); Skip with the reason otherwise.
    A --classes list that disagrees with the run's is a UserError, not a skip."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise Skip(f"config.json missing or unreadable ({type(e).__name__})")
    check_classes(classes, cfg, run_dir)
    try:
        return load_best(run_dir, select)
    except RunNotReady as e:
        raise Skip(str(e))


# ---------------------------------------------------------------- evaluation

def cell_settings(cfg):
    """The settings of a run that the runs of one cell share (all but seed and subset): recorded in
    config.json, or for runs made before fingerprints existed, derived from their arguments."""
    if "fingerprint_settings" in cfg:
        return cfg["fingerprint_settings"]
    return run_settings(cfg["args"], cfg["ratio"], cfg.get("seed"), None)


def check_one_cell(ratio_dir, runs):
    """All runs of one ratio folder must share a cell fingerprint: never a silent mix of unlike runs
    in one row. UserError naming the folder, the runs and the differing settings otherwise."""
    groups = {}
    for r in runs:
        groups.setdefault(fingerprint(r["settings"], exclude=CELL_EXCLUDES), []).append(r)
    if len(groups) > 1:
        (first, *_), (other, *_) = list(groups.values())[:2]
        diff = setting_differences(first["settings"], other["settings"], exclude=CELL_EXCLUDES)
        listing = "; ".join(", ".join(os.path.basename(r["run_dir"]) for r in g) for g in groups.values())
        raise UserError(f"{ratio_dir} holds runs of different settings ({listing}), which would be averaged "
                        f"as one cell: {'; '.join(diff)}. Move the unlike runs to their own save root.")


def check_cells(variant_dir):
    """Before anything is evaluated: check_one_cell on the finished runs of every ratio folder (their
    config.json alone; runs that cannot be read are skipped later with their reason)."""
    by_ratio = {}
    for ratio_name, run_dir in list_runs(variant_dir):
        try:
            with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
            settings = cell_settings(cfg)
        except (OSError, ValueError, KeyError):
            continue
        if is_complete(run_dir):
            by_ratio.setdefault(ratio_name, []).append({"run_dir": run_dir, "settings": settings})
    for ratio_name, runs in by_ratio.items():
        check_one_cell(os.path.join(variant_dir, ratio_name), runs)


class TestImages:
    """Test images decoded once per (image size, classes) and shared by every run that needs them."""

    def __init__(self, root, num_workers, mp_context=None):
        self.root, self.num_workers, self.mp_context, self.cache = root, num_workers, mp_context, {}

    def get(self, size, classes):
        key = (size, tuple(classes))
        if key not in self.cache:
            try:
                images = data.find_class_images(self.root, classes, flag="--test_data_root")
            except UserError as e:
                raise UserError(f"the test folder does not match the run's classes {list(classes)}: {e}")
            paths = [p for c in classes for p in images[c]]
            labels = [k for k, c in enumerate(classes) for _ in images[c]]
            pixels, bad = data.decode_all(paths, size, num_workers=self.num_workers, mp_context=self.mp_context)
            for _, p, why in bad:
                print(f"warning: skipping broken test image {p}: {why}", file=sys.stderr)
            bad_idx = {i for i, _, _ in bad}
            self.cache[key] = (pixels, [y for i, y in enumerate(labels) if i not in bad_idx])
        return self.cache[key]


_TEST_IMAGES = {}      # (test folder, its folder_stamp) -> the TestImages last made in this process


def test_images(root, stamp, num_workers):
    """root's TestImages, kept across calls in this process while the folder's listing is unchanged
    (reproduce.py evaluates under each rule in turn): its images are decoded once. Only the last
    folder is kept."""
    key = (os.path.abspath(root), stamp)
    if key not in _TEST_IMAGES:
        _TEST_IMAGES.clear()
        _TEST_IMAGES[key] = TestImages(root, num_workers)
    return _TEST_IMAGES[key]


class Models:
    """One resnet18 per (number of classes, head), on the device in channels_last (faster on CPU and
    CUDA); each run only loads its weights into it, instead of building and initialising a new model,
    and computes its convolutions on small maps as the run was trained to (model.small_map_convs_of)."""

    def __init__(self, device):
        self.device, self.by_kind = device, {}

    def load(self, cfg, state):
        kind = (len(cfg["classes"]), head_of(cfg["args"]))
        if kind not in self.by_kind:
            model = build_model(kind[0], "none", kind[1])
            self.by_kind[kind] = model.to(self.device, memory_format=torch.channels_last)
        self.by_kind[kind].load_state_dict(state)
        return set_small_map_convs(self.by_kind[kind], small_map_convs_of(cfg["args"]))


def evaluate_run(cfg, ckpt, tests, models, batch_size, precision):
    classes = cfg["classes"]
    model = models.load(cfg, ckpt["model"])
    images, labels = tests.get(cfg["args"]["img_size"], classes)
    cm = confusion_matrix(model, images, labels, len(classes), models.device, batch_size, channels_last=True,
                          amp=precision == "bf16")
    return metrics_from_confusion(cm, classes)


def check_classes(given, cfg, run_dir):
    if given is not None and list(given) != list(cfg["classes"]):
        raise UserError(f"--classes {' '.join(given)} disagrees with {run_dir}, which was trained on "
                        f"{' '.join(cfg['classes'])} (in that order)")


def flat_metrics(m):
    out = {f"acc[{c}]": v for c, v in m["per_class_acc"].items()}
    out.update(accuracy=m["accuracy"], balanced_accuracy=m["balanced_accuracy"], macro_f1=m["macro_f1"])
    return out


def summarise(runs):
    """Mean and sample std (ddof=1; None for a single run) of each metric over runs."""
    keys = list(flat_metrics(runs[0]["metrics"]))
    values = {k: np.array([flat_metrics(r["metrics"])[k] for r in runs], dtype=float) for k in keys}
    pick = max(runs, key=lambda r: (r["best_train_acc"], -run_number(r["run_dir"])))
    return {"n_runs": len(runs),
            "mean": {k: float(v.mean()) for k, v in values.items()},
            "std": {k: float(v.std(ddof=1)) if len(v) > 1 else None for k, v in values.items()},
            "authors_pick": {"run_dir": pick["run_dir"], "best_train_acc": pick["best_train_acc"],
                             **flat_metrics(pick["metrics"])}}


STAMPED_FILES = ("config.json", "train.log", "summary.json") + WEIGHT_FILES


def run_stamp(run_dir):
    """{file: [size, mtime_ns]} of the files an evaluation of the run reads: a run whose stamp is
    unchanged since its recorded evaluation would be evaluated to the same numbers."""
    stamp = {}
    for name in STAMPED_FILES:
        try:
            st = os.stat(os.path.join(run_dir, name))
        except OSError:
            continue
        stamp[name] = [st.st_size, st.st_mtime_ns]
    return stamp


def folder_stamp(root):
    """sha256 of every file's relative path, size and mtime under a test folder (a listing, not the bytes)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "replace"))
    return h.hexdigest()


def recorded_evaluations(variant_dir, args):
    """-> ({run_dir: run entry}, reusable) from the variant's results file for this rule when it was made
    on the same test folder and precision: what a run whose weights were removed after evaluation still
    has. reusable: the file was also made on the same test files (folder_stamp), device and batch size,
    so a run whose run_stamp is unchanged keeps its entry."""
    try:
        with open(os.path.join(variant_dir, results_name(args.select)), encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}, False
    if old.get("test_data_root") != os.path.abspath(args.test_data_root) or old.get("precision") != args.precision \
            or old.get("select", "train_acc") != args.select:
        return {}, False
    reusable = (not args.reevaluate and old.get("test_stamp") == args.test_stamp
                and old.get("device") == args.device_type and old.get("batch_size") == args.batch_size)
    return {run["run_dir"]: run for ratios in old.get("variants", {}).values() for entry in ratios.values()
            for run in entry["runs"]}, reusable


# (run, its files' stamp, epoch, test folder and its stamp, precision, batch size, device, threads) ->
# (the metrics of that evaluation, the epoch's Train Acc): where rules pick the same epoch of a run, its
# weights are read and evaluated once per process (reproduce.py and study.py evaluate under each rule in
# turn, in one process; so does each of reproduce.py's worker slots); not with --reevaluate
_EVALUATED = {}


def evaluate_variant(variant_dir, args, tests, models):
    """Evaluate every run of one variant -> (results dict, skipped list). A run whose weights were
    removed after evaluation (runs.remove_weights), or whose files are unchanged since it was evaluated
    in the same conditions (recorded_evaluations), keeps its recorded evaluation."""
    ratios, skipped = {}, []
    recorded, reusable = recorded_evaluations(variant_dir, args)
    for ratio_name, run_dir in list_runs(variant_dir):
        stamp = run_stamp(run_dir)
        removed = os.path.isfile(os.path.join(run_dir, WEIGHTS_REMOVED))
        run = recorded.get(run_dir)
        if run is not None and (removed or (reusable and run.get("stamp") == stamp)):
            with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
            check_classes(args.classes, cfg, run_dir)
            ratio = cfg["observed_ratio"] if cfg["ratio"] == "all" else cfg["ratio"]
            entry = ratios.setdefault(ratio_name, {"ratio": ratio, "classes": cfg["classes"], "runs": []})
            entry["runs"].append(run)
            why = "weights removed after it" if removed else "its files unchanged since"
            print(f"recorded evaluation of {run_dir} (epoch {run['best_epoch']}; {why})", file=sys.stderr)
            args.reused += 1
            continue
        def key(epoch):
            return (os.path.abspath(run_dir), json.dumps(stamp, sort_keys=True), epoch,
                    os.path.abspath(args.test_data_root), args.test_stamp, args.precision, args.batch_size,
                    args.device_type, torch.get_num_threads())
        pick = chosen_epoch(run_dir, args.select)         # from train.log: a repeat reads no weights
        again = pick is not None and key(pick[0]) in _EVALUATED and not args.reevaluate   # --reevaluate: afresh
        if again:
            with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
            check_classes(args.classes, cfg, run_dir)
            epoch = pick[0]
        else:
            try:
                cfg, ckpt, epoch, _ = inspect_run(run_dir, args.classes, args.select)
            except Skip as e:
                skipped.append({"run_dir": run_dir, "reason": str(e)})
                print(f"skipped {run_dir}: {e}", file=sys.stderr)
                continue
            _EVALUATED[key(epoch)] = (evaluate_run(cfg, ckpt, tests, models, args.batch_size, args.precision),
                                      ckpt.get("train_acc", acc_at(run_dir, epoch)))
        metrics, train_acc = copy.deepcopy(_EVALUATED[key(epoch)])
        ratio = cfg["observed_ratio"] if cfg["ratio"] == "all" else cfg["ratio"]   # 'all': what the folder held
        entry = ratios.setdefault(ratio_name, {"ratio": ratio, "classes": cfg["classes"], "runs": []})
        entry["runs"].append({"run_dir": run_dir, "best_epoch": epoch, "best_train_acc": train_acc,
                              "img_size": cfg["args"]["img_size"], "fingerprint": cfg.get("fingerprint"),
                              "settings": cell_settings(cfg), "metrics": metrics, "stamp": stamp,
                              "threads": torch.get_num_threads()})
        print(f"evaluated {run_dir} (epoch {epoch}{'; evaluated under another rule in this process' if again else ''}"
              f"): " + " ".join(
            f"{k} {v:.4f}" for k, v in flat_metrics(metrics).items()), file=sys.stderr)
    ratios = dict(sorted(ratios.items(), key=lambda kv: [-r for r in kv[1]["ratio"]]))
    for ratio_name, entry in ratios.items():
        entry["cell_fingerprint"] = fingerprint(entry["runs"][0]["settings"], exclude=CELL_EXCLUDES)
        entry["summary"] = summarise(entry["runs"])
    return ratios, skipped


# ---------------------------------------------------------------- output

PRECISION_TEXT = {"bf16": "bf16 autocast (--precision fp32, the default, for exact float32 predictions)",
                  "fp32": "float32 (exact; TF32 off on CUDA)"}


def _fmt(mean, std):
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def format_table(variants):
    lines = []
    for variant, ratios in variants.items():
        for ratio_name, entry in ratios.items():
            s = entry["summary"]
            cols = " | ".join(f"{k} {_fmt(s['mean'][k], s['std'][k])}" for k in s["mean"])
            pick = s["authors_pick"]
            lines.append(f"{variant:<12} ratio {ratio_name:<10} n={s['n_runs']:<3} | {cols} | "
                         f"best-Train-Acc run {os.path.basename(pick['run_dir'])}")
    return "\n".join(lines)


def results_name(select, stem="results", ext=".json"):
    """results.json (result_log.txt) under the paper's rule, results_<rule>.json under another."""
    return f"{stem}{ext}" if select == "train_acc" else f"{stem}_{select}{ext}"


def acc_at(run_dir, epoch):
    """Train Acc of an epoch, from train.log."""
    return dict(parse_train_log(os.path.join(run_dir, "train.log"))).get(epoch)


SELECT_TEXT = {"train_acc": "the highest Train Acc (the paper's rule)",
               "balanced_train_acc": "the highest balanced Train Acc (mean of the per-class training accuracies)",
               "last": "the last epoch"}


def write_outputs(folder, variants, skipped, args):
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    result = {"created": stamp, "model_root": os.path.abspath(folder),
              "test_data_root": os.path.abspath(args.test_data_root), "precision": args.precision,
              "select": args.select, "test_stamp": args.test_stamp, "device": args.device_type,
              "batch_size": args.batch_size, "variants": variants, "skipped": skipped}
    text = [f"# validation.py, {stamp}", f"# test data: {os.path.abspath(args.test_data_root)}",
            f"# precision: {PRECISION_TEXT[args.precision]}",
            f"# model selection (--select {args.select}): each run at the epoch of {SELECT_TEXT[args.select]}",
            "# per ratio: mean ± sample std over runs", format_table(variants)]
    text += [f"skipped {s['run_dir']}: {s['reason']}" for s in skipped]
    write_json_atomic(os.path.join(folder, results_name(args.select)), result)
    write_text_atomic(os.path.join(folder, results_name(args.select, "result_log", ".txt")), "\n".join(text) + "\n")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_threads(args.threads)
    before = torch.get_num_threads()
    try:
        use_threads(args.threads)
        evaluate_all(args)
    finally:
        torch.set_num_threads(before)    # reproduce.py evaluates in its own process: its count back


def evaluate_all(args):
    use_exact_float32()
    device = resolve_device(args.device)
    variant_dirs = find_variant_dirs(args.model_root)
    if not os.path.isdir(args.test_data_root):
        raise UserError(f"--test_data_root {args.test_data_root} does not exist or is not a folder")
    workers = decoding_workers(args.num_workers)
    for folder in dict.fromkeys([args.model_root, *variant_dirs]):   # results go there: fail before evaluating
        ensure_output_dir(folder, "--model_root")
    for vdir in variant_dirs:
        check_cells(vdir)
    args.test_stamp, args.device_type, args.reused = folder_stamp(args.test_data_root), device.type, 0
    tests, models = test_images(args.test_data_root, args.test_stamp, workers), Models(device)
    all_variants, all_skipped = {}, []
    for vdir in variant_dirs:
        ratios, skipped = evaluate_variant(vdir, args, tests, models)
        name = os.path.basename(os.path.normpath(vdir))
        all_variants[name] = ratios
        all_skipped += skipped
        write_outputs(vdir, {name: ratios}, skipped, args)
    if len(variant_dirs) > 1 or os.path.normpath(variant_dirs[0]) != os.path.normpath(args.model_root):
        write_outputs(args.model_root, all_variants, all_skipped, args)
    print(format_table(all_variants))
    for s in all_skipped:
        print(f"skipped {s['run_dir']}: {s['reason']}")
    n = sum(len(e["runs"]) for r in all_variants.values() for e in r.values())
    reused = f" ({args.reused} from their recorded evaluation)" if args.reused else ""
    print(f"{n} run(s) evaluated{reused}, {len(all_skipped)} skipped; results in "
          f"{os.path.join(args.model_root, results_name(args.select, 'result_log', '.txt'))}")
    if n == 0 or (args.strict and all_skipped):
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
