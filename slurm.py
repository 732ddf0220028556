"""The grid on a Slurm cluster: reproduce.py --slurm writes two plain sbatch scripts into
<save_root>/slurm/ and submits them.

  train_array.sbatch  one array task per cell still to train; task I runs `reproduce.py ... --task_id I`,
                      cell I of the same fixed plan as the in-process grid (finished cells are skipped,
                      interrupted ones resumed from last.pth)
  eval.sbatch         `reproduce.py ... --eval_only` (validation.py, then report.py), submitted with
                      --dependency=afterany:<array job>, so it runs even when some tasks failed

Both scripts can also be submitted by hand: `sbatch <save_root>/slurm/train_array.sbatch`.
"""
import os
import shlex
import shutil
import subprocess
import sys

from utils import UserError, WriteError, describe_os_error, write_text_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
# reproduce.py flags that configure the submission itself, not the grid: (flag, takes a value)
SUBMIT_FLAGS = (("--slurm", False), ("--slurm_args", True), ("--max_parallel", True), ("--dry_run", False))


def grid_argv(argv):
    """reproduce.py's command line without the submission flags: what every job runs."""
    out, skip = [], False
    values = {f for f, v in SUBMIT_FLAGS if v}
    plain = {f for f, v in SUBMIT_FLAGS if not v}
    for a in argv:
        if skip:
            skip = False
        elif a in values:
            skip = True
        elif a in plain or a.split("=", 1)[0] in values:
            continue
        else:
            out.append(a)
    return out


def array_spec(indices, max_parallel=None):
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (with '%N' when at most N tasks may run at once)."""
    parts, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            parts.append(f"{start}" if start == k else f"{start}-{k}")
            start = None
    return ",".join(parts) + (f"%{max_parallel}" if max_parallel else "")


def script(name, directives, command, comment):
    """A plain sbatch file: #SBATCH lines, then cd to the submitting folder and the command."""
    lines = ["#!/bin/bash", *(f"# {c}" for c in comment), f"#SBATCH --job-name={name}"]
    lines += [f"#SBATCH {d}" for d in directives]
    lines += ["set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", "exec " + " ".join(command)]
    return "\n".join(lines) + "\n"


def write_scripts(save_root, argv, task_ids, slurm_args, max_parallel, evaluate):
    """-> (path of the array script or None when nothing is left to train, path of eval script or None)."""
    folder = os.path.join(os.path.abspath(save_root), "slurm")
    try:
        os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    except OSError as e:
        raise WriteError(f"--save_root: cannot create {folder}: {describe_os_error(e, folder)}")
    site = [shlex.quote(d) for d in shlex.split(slurm_args or "")]
    python = [shlex.quote(sys.executable), shlex.quote(os.path.join(HERE, "reproduce.py"))]
    args = [shlex.quote(a) for a in grid_argv(argv)]
    train = evalp = None
    if task_ids:
        train = os.path.join(folder, "train_array.sbatch")
        write_text_atomic(train, script(
            "fscl-grid", [f"--array={array_spec(task_ids, max_parallel)}",
                          f"--output={shlex.quote(os.path.join(folder, 'logs', '%A_%a.out'))}", *site],
            python + args + ['--task_id "$SLURM_ARRAY_TASK_ID"'],
            ["Written by reproduce.py --slurm: one array task per cell still to train; task I trains cell I",
             "of the fixed plan (reproduce.py ... --dry_run lists it). Re-run the reproduce.py command to",
             "resubmit only what is missing."]))
    if evaluate:
        evalp = os.path.join(folder, "eval.sbatch")
        write_text_atomic(evalp, script(
            "fscl-eval", [f"--output={shlex.quote(os.path.join(folder, 'logs', 'eval_%j.out'))}", *site],
            python + args + ["--eval_only"],
            ["Written by reproduce.py --slurm: validation.py and report.py over the whole save root, once",
             "the array job has ended (submitted with --dependency=afterany:<array job id>)."]))
    return train, evalp


def sbatch(path, dependency=None, dry_run=False):
    """Submit one script -> its job id ('<dry run>' with dry_run, after printing the command)."""
    cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterany:{dependency}"] if dependency else []) + [path]
    if dry_run:
        print(shlex.join(cmd))
        return "<array job id>"
    if shutil.which("sbatch") is None:
        raise UserError("--slurm: sbatch was not found on this machine; run on a Slurm login node, or use "
                        "--dry_run to write the scripts only (see slurm_local_cluster.sh to try Slurm locally)")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"sbatch refused {path}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def submit(save_root, argv, task_ids, slurm_args, max_parallel, evaluate, dry_run):
    """Write both scripts, submit them (the evaluation after the array), print how to follow them."""
    train, evalp = write_scripts(save_root, argv, task_ids, slurm_args, max_parallel, evaluate)
    for p in (train, evalp):
        if p:
            print(f"wrote {p}")
    array = sbatch(train, dry_run=dry_run) if train else None
    evaluation = sbatch(evalp, dependency=array, dry_run=dry_run) if evalp else None
    if dry_run:
        return array, evaluation
    logs = os.path.join(os.path.abspath(save_root), "slurm", "logs")
    if array:
        print(f"submitted array job {array}: {len(task_ids)} task(s)"
              + (f", at most {max_parallel} at once" if max_parallel else ""))
    if evaluation:
        print(f"submitted evaluation job {evaluation}" + (f", to run once job {array} has ended" if array else ""))
    ids = ",".join(j for j in (array, evaluation) if j)
    print(f"follow with: squeue -j {ids}; logs in {logs}")
    return array, evaluation
