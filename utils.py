"""Shared helpers: user errors, atomic files, run folders, ratios and train.log parsing.

Everything here is plain Python (plus torch for checkpoints); the data pipeline lives in data.py and
the model and loss in model.py.
"""
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading

import torch

VARIANTS = ("baseline", "contrastive", "oversampling", "proposed")
RUN_DIR_RE = re.compile(r"^run_(\d+)$")
# One whole epoch line of train.log, from "Epoch 3/100 | Train Acc 0.981250 | " to its fixed ending
# "... 12.3s 190 img/s data_wait 1.5%": a line cut off by a crash does not match.
EPOCH_LINE_RE = re.compile(r"^Epoch (\d+)/(\d+) \| Train Acc (\d+\.\d+|nan) \| .* \| "
                           r"[\d.]+s [\d.]+ img/s data_wait [\d.]+%\n$")
ACC_DECIMALS = 6  # Train Acc is logged and compared at this precision, so train.log decides as train.py did


_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """A mistake in the user's input: printed as one clear message, never as a traceback."""


def run_main(main):
    """Call main(); turn UserError into 'error: ...' on stderr and exit code 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- ratios and variants

def parse_ratio(text, classes):
    """'1:0.01' -> [1.0, 0.01]; one positive finite part per class, else UserError."""
    parts = str(text).split(":")
    if len(parts) != len(classes):
        raise UserError(f"--ratio {text!r} has {len(parts)} part(s) but --classes names {len(classes)} "
                        f"class(es) ({' '.join(classes)}); give one part per class, e.g. "
                        f"{':'.join(['1'] + ['0.01'] * (len(classes) - 1))}")
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            v = float("nan")
        if not (math.isfinite(v) and v > 0):
            raise UserError(f"--ratio {text!r}: part {p!r} is not a positive number; "
                            f"valid parts are numbers > 0, e.g. 1:0.01")
        values.append(v)
    return values


def ratio_folder_name(ratio):
    """[1.0, 0.01] -> '1_0.01': the ratio's folder name, valid on every OS (no ':')."""
    return "_".join(f"{r:g}" for r in ratio)


def variant_name(contrastive, oversampling):
    return VARIANTS[int(bool(contrastive)) + 2 * int(bool(oversampling))]


# ---------------------------------------------------------------- atomic files

def _atomic_replace(path, write):
    """Write to a temporary file in the same folder, fsync, then rename over path."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path, text):
    _atomic_replace(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path, ckpt):
    """torch.save through a temporary file: path always holds a complete checkpoint."""
    _atomic_replace(path, lambda f: torch.save(ckpt, f))


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM arriving inside the block take effect when it ends (re-raised to whatever
    handler was there before), so that the work inside is done entirely or not at all. Only the main
    thread can hold signals; elsewhere the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    for s in dict.fromkeys(caught):
        signal.raise_signal(s)


class BackgroundSaver:
    """Writes checkpoints in a background thread, one batch of files at a time, so that training does
    not wait on the disk. The caller hands over snapshots (tensors it will not modify); wait() returns
    once the last batch is on disk and re-raises any error from writing it."""

    def __init__(self):
        self._thread, self._error = None, None

    def save(self, jobs):
        """jobs: [(path, checkpoint)], written in order with save_checkpoint()."""
        self.wait()

        def work():
            try:
                for path, ckpt in jobs:
                    save_checkpoint(path, ckpt)
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e
        self._thread = threading.Thread(target=work, name="checkpoint-writer")
        self._thread.start()

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True, never retried without it. A file that is cut off, or that
    carries pickled code, raises UserError naming the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist")
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (truncated zip), EOFError...
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        why = next((l for l in lines if "WeightsUnpickler error" in l), lines[0])
        raise UserError(f"checkpoint {path} could not be loaded safely with weights_only=True, and is not "
                        f"loaded any other way: {why[:300]}")


def append_line(path, line):
    """Append one line and flush it to disk, so a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- run folders

def claim_run_dir(parent, run_id=None):
    """Create and return parent/run_X. X is the lowest free number, claimed with an atomic mkdir, so
    trainings started together never share a folder. With run_id, exactly run_<run_id>."""
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
            x += 1


def run_number(run_dir):
    m = RUN_DIR_RE.match(os.path.basename(os.path.normpath(run_dir)))
    return int(m.group(1)) if m else None


def is_complete(run_dir):
    """A run is complete once train.py wrote summary.json, after its last epoch."""
    return os.path.isfile(os.path.join(run_dir, "summary.json"))


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- train.log

def parse_train_log(path):
    """Read train.log -> list of (epoch, train_acc) from its well-formed epoch lines.

    Lines that are cut off, malformed or not valid UTF-8 are ignored (a crash can leave half a line).
    When an epoch appears twice (a resumed run redid it), the later line wins.
    """
    by_epoch = {}
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", errors="replace")
            m = EPOCH_LINE_RE.match(line)
            if not m:
                continue
            acc = float(m.group(3))
            if math.isfinite(acc):
                by_epoch[int(m.group(1))] = acc
    return sorted(by_epoch.items())


def best_epoch(epochs):
    """The epoch with the highest Train Acc; ties go to the earliest such epoch (the rule train.py
    uses when it writes best.pth: only a strictly higher accuracy replaces the best)."""
    best = None
    for epoch, acc in epochs:
        if best is None or acc > best[1]:
            best = (epoch, acc)
    return best
