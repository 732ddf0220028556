"""Shared helpers: user errors and file-system refusals, output folders, atomic files, signals, the
background checkpoint writer, ratios.

Everything here is plain Python (plus torch for checkpoints); run folders and their configuration live
in runs.py, the data pipeline in data.py, the model and loss in model.py.
"""
import argparse
import contextlib
import errno
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """A mistake in the user's input: printed as one clear message, never as a traceback."""


class WriteError(UserError):
    """An output file or folder that the file system refused (read-only, full, a file in the way)."""


# errno values of a file system that says no, rather than of a bug
REFUSALS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST, errno.ENOTDIR,
            errno.EISDIR, errno.ENAMETOOLONG, errno.EFBIG}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help as written (the docstring keeps its lines), with each flag's default appended unless its
    help already states it or it has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def command_line(doc):
    """The argument parser of every script: its docstring as the description, each flag's default in
    --help, and no abbreviated flags (`--max_par` for `--max_parallel` would be taken here but not by
    the commands a script passes its flags on to, such as a Slurm job's)."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter, allow_abbrev=False)


def run_main(main, interrupted="interrupted"):
    """Call main(); turn UserError, and an OSError of a file system that refused (read-only, full, a
    file in the way), into 'error: ...' on stderr and exit code 2, and Ctrl-C into the line
    interrupted and exit code 130 (no traceback)."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in REFUSALS:
            raise
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        sys.exit(2)


def describe_os_error(e, path=None):
    """'<path>: <reason>' of an OSError, naming the path even where the error itself does not."""
    where = e.filename or path
    why = e.strerror or str(e) or type(e).__name__
    hint = {errno.ENOSPC: " (the disk is full)", errno.EDQUOT: " (over the disk quota)",
            errno.EROFS: " (a read-only file system)"}.get(e.errno, "")
    return f"{where}: {why}{hint}" if where else f"{why}{hint}"


def available_cpus():
    """CPUs this process may run on: os.sched_getaffinity where it exists (it respects Slurm, cgroup
    and taskset limits), else os.cpu_count()."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name, for the records of where a figure was measured: 'model name' in
    /proc/cpuinfo on Linux (where platform.processor() is usually empty), else platform.processor(),
    else the architecture (platform.machine())."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def decoding_workers(num_workers):
    """--num_workers for decoding: as given (0 = decode in this process), else min(8, CPUs this process
    may use); UserError when negative."""
    if num_workers is not None and num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {num_workers}")
    return num_workers if num_workers is not None else min(8, available_cpus())


def ensure_output_dir(path, flag):
    """Create path if needed and check that a file can be written there -> path; WriteError naming
    flag and path otherwise (a file in the way, a read-only folder or file system, a full disk)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise WriteError(f"{flag} {path} cannot be used for output: {describe_os_error(e, path)}; "
                         f"give a writable folder")
    return path


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


def parse_ratio_or_all(text, classes):
    """None or 'all' -> 'all' (every image of each class, the folder as it is); else parse_ratio."""
    return "all" if text in (None, "all") else parse_ratio(text, classes)


def ratio_folder_name(ratio):
    """[1.0, 0.01] -> '1_0.01': the ratio's folder name, valid on every OS (no ':'); 'all' -> 'all'."""
    return "all" if ratio == "all" else "_".join(f"{r:g}" for r in ratio)


def ratio_text(ratio):
    """[1.0, 0.01] -> '1:0.01'; 'all' stays 'all'."""
    return "all" if ratio == "all" else ":".join(f"{r:g}" for r in ratio)


# ---------------------------------------------------------------- atomic files

def _atomic_replace(path, write):
    """Write to a temporary file in the same folder, fsync, then rename over path. A refusing file
    system raises WriteError naming path; path keeps its previous complete version."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise WriteError(f"could not write {path}: {describe_os_error(e, path)}") from e
        raise


def write_text_atomic(path, text):
    _atomic_replace(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path, ckpt):
    """torch.save straight into a temporary file: path always holds a complete checkpoint. Each tensor
    goes to the file's write, which lets go of the GIL while the OS copies it: serialising to memory
    first held the GIL for about 0.1 s per last.pth and slowed the training thread beside the background
    writer (docs/performance.md, "The data path at 32 px").
    A refusing file system surfaces as the write's OSError (WriteError), not as the RuntimeError
    ('unexpected pos') that torch.save makes of it."""
    def write(f):
        out = _Writes(f)
        try:
            with no_crc32():
                torch.save(ckpt, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error
            raise
    _atomic_replace(path, write)


class _Writes:
    """A file's write and flush, keeping the OSError that a write raised."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


@contextlib.contextmanager
def no_crc32():
    """torch.save without the zip records' CRC-32 (torch.utils.serialization.config.save.compute_crc32):
    40% of the CPU time of writing a checkpoint, which a short CPU epoch pays for every epoch; the files
    load as before (torch.load does not need it) and a cut-off file is still refused by its zip directory."""
    from torch.utils.serialization import config
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


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
        self.written = None   # the tag of the last batch of files that is completely on disk

    def save(self, jobs, tag=None):
        """jobs: [(path, checkpoint)], written in order with save_checkpoint(); tag (e.g. the epoch),
        unless None, becomes self.written once they all are."""
        self.wait()

        def work():
            try:
                for path, ckpt in jobs:
                    save_checkpoint(path, ckpt)
                if tag is not None:
                    self.written = tag
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
    """Append one line and flush it to disk, so a crash loses at most the line being written.
    A refusing file system raises WriteError naming path."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(f"could not append to {path}: {describe_os_error(e, path)}") from e


# ---------------------------------------------------------------- run folders


# ---------------------------------------------------------------- run fingerprints


# ---------------------------------------------------------------- train.log


