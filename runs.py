"""Runs: claiming a run folder, what its config.json records (paths, fingerprint, provenance) and
reading its train.log. train.py writes runs, reproduce.py plans them, validation.py reads them."""
import functools
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import time

import torch
import torchvision

import data
from losses import method_settings
from utils import UserError, WriteError, cpu_name, describe_os_error, load_checkpoint

RUN_DIR_RE = re.compile(r"^run_(\d+)$")
# One whole epoch line of train.log, from "Epoch 3/100 | Train Acc 0.981250 | " to its fixed ending
# "... 12.3s 190 img/s data_wait 1.5%": a line cut off by a crash does not match.
EPOCH_LINE_RE = re.compile(r"^Epoch (\d+)/(\d+) \| Train Acc (\d+\.\d+|nan) \| .* \| "
                           r"[\d.]+s [\d.]+ img/s data_wait [\d.]+%\n$")
ACC_DECIMALS = 6  # Train Acc is logged and compared at this precision, so train.log decides as train.py did
CELL_EXCLUDES = ("seed", "planned_subset_sha1")   # what differs between the runs of one cell by design


# ---------------------------------------------------------------- run folders

def claim_run_dir(parent, run_id=None):
    """Create and return parent/run_X. X is the lowest free number, claimed with an atomic mkdir, so
    trainings started together never share a folder (mkdir is atomic on local and NFS file systems
    alike). With run_id, exactly run_<run_id>. A folder that cannot be made raises WriteError."""
    try:
        os.makedirs(parent, exist_ok=True)
        if run_id is not None:
            path = os.path.join(parent, f"run_{run_id}")
            os.makedirs(path, exist_ok=True)
            return path
        x = 1
        while True:
            path = os.path.join(parent, f"run_{x}")
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                if not os.path.isdir(path):
                    raise
                x += 1
    except OSError as e:
        raise WriteError(f"--save_root: cannot create a run folder under {parent}: {describe_os_error(e, parent)}; "
                         f"give a writable --save_root")


def set_aside_previous_attempt(run_dir):
    """--run_id on a folder that an earlier attempt left: refuse a finished run, keep an unfinished
    one's files under attempt_<time>/ (nothing is deleted) and start afresh."""
    if is_complete(run_dir):
        raise UserError(f"{run_dir} already holds a finished run; choose another --run_id")
    old = [n for n in os.listdir(run_dir) if not n.startswith("attempt_")]
    if old:
        keep = os.path.join(run_dir, f"attempt_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}")
        os.makedirs(keep)
        for n in old:
            os.replace(os.path.join(run_dir, n), os.path.join(keep, n))


def run_number(run_dir):
    m = RUN_DIR_RE.match(os.path.basename(os.path.normpath(run_dir)))
    return int(m.group(1)) if m else None


def is_complete(run_dir):
    """A run is complete once train.py wrote summary.json, after its last epoch."""
    return os.path.isfile(os.path.join(run_dir, "summary.json"))


def absolute_paths(a, base=None):
    """The run's input and output paths made absolute (against base, else the working folder), so that
    config.json names them wherever --resume is later started."""
    a = dict(a)
    for key in ("train_data_root", "save_root"):
        if a.get(key):
            a[key] = os.path.abspath(os.path.join(base or os.getcwd(), a[key]))
    if a.get("weights") not in (None, "imagenet", "none"):
        a["weights"] = os.path.abspath(os.path.join(base or os.getcwd(), a["weights"]))
    return a


# ---------------------------------------------------------------- fingerprints

def file_sha256(path):
    """sha256 of a file; remembered per (path, size, mtime), so that planning a grid of many cells that
    share one --weights file reads it once."""
    st = os.stat(path)
    return _sha256_of(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path, size, mtime_ns):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_settings(args, ratio, seed, subset_sha1):
    """Everything that changes a run's result, as plain values: the data (absolute root, classes, ratio,
    cap, the planned subset's sha1), the method (losses.method_settings: the paper's two flags, the
    baselines' choices and each hyperparameter only where it is used), the optimisation (epochs, batch, lr, optimizer, image size,
    initial weights: a file by its sha256, augmentation, bf16 autocast) and the seed. Not the device,
    workers, cache, compile, channels_last or where outputs go: they change how fast, not what.
    args: train.py's arguments as a dict (paths already absolute)."""
    weights = args["weights"]
    if weights not in ("imagenet", "none") and os.path.isfile(weights):
        weights = "sha256:" + file_sha256(weights)
    s = {"train_data_root": args["train_data_root"], "classes": list(args["classes"]),
         "ratio": ratio if ratio == "all" else list(ratio),
         "max_per_class": args["max_per_class"], "img_size": args["img_size"], "num_epochs": args["num_epochs"],
         "batch_size": args["batch_size"], "lr": args["lr"], "optimizer": args["optimizer"], "weights": weights,
         "augment": args["augment"], "amp": args["amp"]}
    s.update(method_settings(args))
    s.update(seed=seed, planned_subset_sha1=subset_sha1)
    return s


def fingerprint(settings, exclude=()):
    """sha256 (first 16 hex digits) of the settings' canonical JSON, leaving out the keys in exclude."""
    kept = {k: v for k, v in settings.items() if k not in exclude}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def setting_differences(a, b, exclude=()):
    """'name: A vs B' for every setting that differs between two settings dicts."""
    keys = [k for k in dict.fromkeys([*a, *b]) if k not in exclude and a.get(k) != b.get(k)]
    return [f"{k}: {a.get(k, '(unset)')!r} vs {b.get(k, '(unset)')!r}" for k in keys]


def planned_subset(a, ratio, seed):
    """(paths, labels, counts, notes) of the images the run is to use, before any is decoded."""
    images = data.find_class_images(a["train_data_root"], a["classes"])
    return data.subsample(images, a["classes"], ratio, a["max_per_class"] or None, seed)


def planned_settings(a, ratio, seed):
    """run_settings of a run with train.py arguments a (a dict, paths absolute): what
    reproduce.py compares with a finished run's config.json."""
    paths = planned_subset(a, ratio, seed)[0]
    return run_settings(a, ratio, seed, data.subset_id(paths, a["train_data_root"]))


def set_fingerprint(cfg, settings):
    cfg.update(fingerprint_settings=settings, fingerprint=fingerprint(settings),
               cell_fingerprint=fingerprint(settings, exclude=CELL_EXCLUDES))


# ---------------------------------------------------------------- provenance

def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


SLURM_ENV = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
             "node": "SLURMD_NODENAME"}


# the environment variables that cap the instruction set of the CPU's float32 kernels (demo.py --cpu_isa)
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")


def record_provenance(cfg, device, state, threads, optimizer):
    """Where and with what the run was made (with the Slurm job, array task and node when it ran as one,
    and torch's thread count, the CPU's model, the instruction set torch's kernels use and the variables
    that cap it, and the optimizer's implementation, as the optimizer about
    to train has it: these change the last bits of training); a resume appends its own entry and keeps
    the original."""
    here = {"git_commit": git_commit(), "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version(), "device": str(device), "threads": threads, "host": platform.node(),
            "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "optimizer_impl": "fused" if optimizer.param_groups[0].get("fused") else "loop"}
    isa = {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ}
    if isa:
        here["isa_caps"] = isa
    if "SLURM_JOB_ID" in os.environ:
        here["slurm"] = {k: os.environ.get(v) for k, v in SLURM_ENV.items()}
    if "git_commit" not in cfg:
        cfg.update(here)
    else:
        resumed_at = state["epoch"] if state else 0
        cfg.setdefault("resumed", []).append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "from_epoch": resumed_at,
                                              **here, "cwd": os.getcwd()})


# ---------------------------------------------------------------- train.log and model selection

# Rules that choose the epoch a run is evaluated at. None looks at the test images.
#   train_acc           the highest Train Acc in train.log (the paper's rule; ties: the earliest). Train Acc is
#                       measured on the training stream: 99% majority for a uniform sampler at 1:0.01.
#   balanced_train_acc  the highest mean of the per-class training accuracies train.log records (ties: the
#                       earliest): the same measure for every sampler.
#   last                the last epoch: every method gets its whole schedule (DRW's phase included).
SELECT_RULES = ("train_acc", "balanced_train_acc", "last")
# The weight files of a run, each holding the model of one epoch; a rule's epoch is looked up in them.
WEIGHT_FILES = ("best.pth", "best_balanced.pth", "final.pth", "last.pth")
WEIGHTS_REMOVED = "weights_removed.json"     # a run whose weights were removed after its evaluation


def remove_weights(run_dir, reason):
    """Delete a finished run's weight files, recording in WEIGHTS_REMOVED which (with their sha256) and
    why -> bytes freed. validation.py then reuses the run's recorded evaluation (results*.json of its
    variant) for the same test folder, precision and rule, and says so; predict.py cannot use it."""
    removed, freed = {}, 0
    for name in WEIGHT_FILES:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            removed[name] = file_sha256(path)
            freed += os.path.getsize(path)
    if not removed:
        return 0
    record = os.path.join(run_dir, WEIGHTS_REMOVED)
    with open(record + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"removed": removed, "reason": reason, "when": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)
    os.replace(record + ".tmp", record)                 # the record first: never weights gone without it
    for name in removed:
        os.remove(os.path.join(run_dir, name))
    return freed
PER_CLASS_RE = re.compile(r"acc\[(.+?)\] (\S+)")


def balanced_train_acc(per_class):
    """Mean of the per-class training accuracies as train.log records them (4 decimals; a class not
    seen in the epoch, None, left out), rounded to ACC_DECIMALS: train.py and the log reader compute
    it from the same values, so they choose the same epoch."""
    values = [float(v) for v in per_class if v not in (None, "None")]
    values = [v for v in values if math.isfinite(v)]
    return round(sum(values) / len(values), ACC_DECIMALS) if values else float("nan")


def parse_epochs(path):
    """Read train.log -> [(epoch, Train Acc, balanced Train Acc)] from its well-formed epoch lines.

    Lines that are cut off, malformed or not valid UTF-8 are ignored (a crash can leave half a line).
    When an epoch appears twice (a resumed run redid it), the later line wins."""
    by_epoch = {}
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", errors="replace")
            m = EPOCH_LINE_RE.match(line)
            if not m:
                continue
            acc = float(m.group(3))
            if math.isfinite(acc):
                per_class = line.split(" | ")[2]
                by_epoch[int(m.group(1))] = (acc, balanced_train_acc([v for _, v in PER_CLASS_RE.findall(per_class)]))
    return [(e, acc, bal) for e, (acc, bal) in sorted(by_epoch.items())]


def parse_train_log(path):
    """-> [(epoch, Train Acc)] of train.log (parse_epochs without the balanced value)."""
    return [(e, acc) for e, acc, _ in parse_epochs(path)]


def best_epoch(epochs):
    """The epoch with the highest Train Acc; ties go to the earliest such epoch (the rule train.py
    uses when it writes best.pth: only a strictly higher accuracy replaces the best)."""
    best = None
    for epoch, acc in epochs:
        if best is None or acc > best[1]:
            best = (epoch, acc)
    return best


def select_epoch(epochs, rule):
    """[(epoch, Train Acc, balanced Train Acc)] -> (epoch, the value the rule chose it by) under rule
    (SELECT_RULES); None when there is no epoch."""
    if not epochs:
        return None
    if rule == "last":
        e = max(epochs)
        return e[0], e[1]
    k = 1 if rule == "train_acc" else 2
    return best_epoch([(e[0], e[k]) for e in epochs if math.isfinite(e[k])])


def chosen_epoch(run_dir, rule="train_acc"):
    """The epoch load_best chooses under rule, from train.log alone (no weights read) -> (epoch, the
    value the rule chose it by), or None where train.log is missing or holds no complete epoch."""
    try:
        return select_epoch(parse_epochs(os.path.join(run_dir, "train.log")), rule)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- loading a trained run

class RunNotReady(Exception):
    """A run folder whose selected model cannot be loaded (yet); the message is the reason."""


def load_best(run_dir, rule="train_acc"):
    """The one loader of a trained run (validation.py and predict.py): -> (config, checkpoint, epoch,
    the value the rule chose it by). The epoch is chosen from train.log by rule (SELECT_RULES; default
    the paper's: the highest Train Acc, ties to the earliest); its weights come from whichever of the
    run's weight files holds that epoch, loaded with weights_only=True. RunNotReady with the reason
    otherwise."""
    if rule not in SELECT_RULES:
        raise UserError(f"--select {rule!r} is not valid; choose one of: {', '.join(SELECT_RULES)}")
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise RunNotReady(f"config.json missing or unreadable ({type(e).__name__})")
    if not is_complete(run_dir):
        raise RunNotReady("unfinished (no summary.json): still training or interrupted; resume with "
                          f"python3 train.py --resume {run_dir}")
    log = os.path.join(run_dir, "train.log")
    if not os.path.isfile(log):
        raise RunNotReady("train.log missing")
    chosen = select_epoch(parse_epochs(log), rule)
    if chosen is None:
        raise RunNotReady("train.log has no complete epoch line")
    reasons = []
    for name in WEIGHT_FILES:
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            ckpt = load_checkpoint(path)
        except UserError as e:
            reasons.append(str(e))
            continue
        if ckpt.get("epoch") == chosen[0]:
            return cfg, ckpt, chosen[0], chosen[1]
        reasons.append(f"{name} holds epoch {ckpt.get('epoch')}")
    if os.path.isfile(os.path.join(run_dir, WEIGHTS_REMOVED)):
        raise RunNotReady(f"its weights were removed after its evaluation ({WEIGHTS_REMOVED}: demo.py keeps them "
                          f"with --keep_weights); its recorded evaluation serves the same test folder, precision "
                          f"and rule only")
    kept = cfg["args"].get("keep_selected", ["train_acc"])
    hint = (f" (the run kept the weights of {', '.join(kept)} only: train.py --keep_selected)"
            if rule not in kept else "")
    raise RunNotReady(f"train.log's epoch under --select {rule} is {chosen[0]}, but no weight file holds it{hint}: "
                      f"{'; '.join(reasons) or 'no weight file'}")
