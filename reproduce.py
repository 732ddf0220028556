"""Reproduce the paper's whole ablation: variants x ratios x runs, then validation.py and report.py.

    python3 reproduce.py --train_data_root D --test_data_root V --classes water-deer roe-deer \
        --save_root ./saved_runs [any train.py flag, e.g. --num_epochs 100]

Cell (variant, ratio, k) trains into <save_root>/<variant>/<ratio>/run_k. Re-running the same command
trains only what is missing: finished runs (summary.json) are skipped, interrupted ones resumed from
their last.pth. --dry_run prints the plan, one train.py command per line. --task_id I runs the I-th
cell of the full grid only (one Slurm array task); --slurm writes and submits the array job and its
evaluation job (slurm.py; see docs/reproducing.md).
"""
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import queue
import shlex
import subprocess
import sys
import threading
import time

import slurm
from runs import SELECT_RULES, is_complete, planned_settings, setting_differences
from losses import PAPER_NAMES, method_flags, parse_method
from utils import (UserError, available_cpus, command_line, ensure_output_dir, parse_ratio_or_all, ratio_folder_name,
                   run_main)

HERE = os.path.dirname(os.path.abspath(__file__))
METHOD_FLAGS = ("--contrastive", "--oversampling", "--loss", "--sampler", "--drw", "--aux", "--fscl_negative")


def get_args_parser():
    p = command_line(__doc__)
    p.add_argument("--train_data_root", required=True)
    p.add_argument("--test_data_root", help="test ImageFolder for validation.py (omit to train only)")
    p.add_argument("--classes", nargs="+", required=True, help="the first is the majority class")
    p.add_argument("--save_root", default="./saved_runs", help="runs go to <save_root>/<method>/<ratio>/run_X, "
                   "results and tables to <save_root>/")
    p.add_argument("--variants", "--methods", dest="variants", nargs="+", default=list(PAPER_NAMES.values()),
                   help="(--methods: the same, as study.py names it) methods (docs/method.md): default the paper's four (baseline contrastive oversampling "
                   "proposed); also focal cb ldam_drw la sqrt oversample+supcon oversample+fscl_neg1, or any "
                   "combination named as losses.method_name names it")
    p.add_argument("--ratios", nargs="+", default=["1", "0.1", "0.01", "0.005", "0.001"],
                   help="minority fractions; every non-reference class gets it (paper: 1 0.1 0.01 0.005 0.001); "
                   "'all' trains on the folder as it is")
    p.add_argument("--runs", type=int, default=10, help="runs per cell (paper: 10)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids, e.g. 0,1: cells run side by side, "
                   "each pinned to one GPU with CUDA_VISIBLE_DEVICES")
    p.add_argument("--jobs_per_gpu", type=int, default=1, help="cells at once on each GPU (ResNet-18 leaves room)")
    p.add_argument("--jobs", type=int, default=None, help="cells at once without --gpus. On a CPU (default): as many as "
                   "the CPUs this process may use allow at --threads each (bench.py measured 2 cells x 1 thread at "
                   "1.4-1.6x the throughput of 1 x 2 on 2 cores); on one CUDA device: 1")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each cell (train.py --threads). On a "
                   "CPU (default): 1, or the CPUs / --jobs when --jobs is given; jobs x threads may not exceed the CPUs. "
                   "With --gpus: the CPUs / the cells at once. With --task_id (one cell): all the CPUs. The thread "
                   "count changes the last bits of CPU-trained weights (recorded in each config.json)")
    p.add_argument("--dry_run", action="store_true", help="print the plan, one train.py command per line")
    p.add_argument("--task_id", type=int, default=None, help="run only cell I (0-based) of the full grid")
    p.add_argument("--eval_only", action="store_true", help="skip training; run validation.py and report.py")
    p.add_argument("--eval_precision", "--precision", dest="eval_precision", choices=("fp32", "bf16"),
                   default="fp32", help="(--precision: the same, as validation.py and predict.py name it) "
                   "validation.py --precision (default fp32: exact float32; bf16 is faster where native)")
    p.add_argument("--paper", choices=["coarse", "fine"], default=None, help="show the paper's Table 1 beside ours")
    p.add_argument("--select", nargs="+", default=["train_acc"], choices=SELECT_RULES,
                   help="rules of model selection to evaluate and report under (validation.py and report.py --select; "
                   "default the paper's, train_acc); each rule after the first reports into <save_root>/select_<rule>/")
    p.add_argument("--reference", default=None, help="report.py --reference: the method every other one is "
                   "compared with, run by run (default: proposed, when among --variants)")
    g = p.add_argument_group("Slurm")
    g.add_argument("--slurm", action="store_true", help="write <save_root>/slurm/train_array.sbatch (one task per "
                   "cell still to train) and eval.sbatch (after the array, afterany), and submit both with sbatch; "
                   "with --dry_run only write them and print the sbatch commands")
    g.add_argument("--slurm_args", default="", help="the site's #SBATCH options for both jobs, one string, "
                   "e.g. --slurm_args=\"--partition=gpu --gres=gpu:1 --time=04:00:00 --mem=32G\"")
    g.add_argument("--max_parallel", type=int, default=None, help="at most N array tasks at once (the array's %%N)")
    return p


def parse(argv):
    """-> (reproduce args, train.py flags passed through unchanged)."""
    args, passthrough = get_args_parser().parse_known_args(argv)
    for v in args.variants:
        try:
            parse_method(v)
        except UserError as e:
            raise UserError(f"--variants: {e}")
    for flag in ("--seed", "--run_id", "--resume", "--ratio", *METHOD_FLAGS):
        if any(a == flag or a.startswith(flag + "=") for a in passthrough):
            raise UserError(f"{flag} cannot be passed through reproduce.py: it sets it per cell "
                            f"(each run_k is seeded with k; the method comes from --variants)")
    if args.runs < 1 or (args.jobs or 1) < 1 or args.jobs_per_gpu < 1 or (args.max_parallel or 1) < 1 \
            or (args.threads or 1) < 1:
        raise UserError("--runs, --jobs, --threads, --jobs_per_gpu and --max_parallel must be at least 1")
    if args.slurm and (args.task_id is not None or args.eval_only or args.gpus):
        raise UserError("--slurm submits the whole grid; it cannot be combined with --task_id, --eval_only or --gpus")
    if (args.slurm_args or args.max_parallel) and not args.slurm:
        raise UserError("--slurm_args and --max_parallel go with --slurm")
    for r in args.ratios:
        parse_ratio_or_all(ratio_string(r, args.classes), args.classes)
    import train
    args.cell, unknown = train.get_args_parser().parse_known_args(passthrough)   # train.py's flags, as it reads them
    if unknown:
        raise UserError(f"{' '.join(unknown)}: neither a reproduce.py flag nor a train.py flag (flags are spelt in "
                        f"full); see python3 reproduce.py --help and python3 train.py --help")
    return args, passthrough


def ratio_string(r, classes):
    """'0.01' with 2 classes -> '1:0.01'; with 3 classes -> '1:0.01:0.01'; 'all' stays 'all'."""
    return "all" if r == "all" else ":".join(["1"] + [r] * (len(classes) - 1))


def grid(args):
    """The full grid, in a fixed order: [(variant, ratio string, k)]."""
    return [(v, ratio_string(r, args.classes), k) for v in args.variants for r in args.ratios
            for k in range(1, args.runs + 1)]


def cell_command(args, passthrough, cell):
    """-> (run_dir, train.py argv or None when the run is already complete)."""
    variant, ratio, k = cell
    run_dir = os.path.join(args.save_root, variant, ratio_folder_name(parse_ratio_or_all(ratio, args.classes)), f"run_{k}")
    if is_complete(run_dir):
        return run_dir, None
    if os.path.isfile(os.path.join(run_dir, "last.pth")):
        return run_dir, ["train.py", "--resume", run_dir]
    return run_dir, fresh_command(args, passthrough, cell)


def fresh_command(args, passthrough, cell):
    variant, ratio, k = cell
    return ["train.py", "--train_data_root", args.train_data_root, "--classes", *args.classes,
            "--ratio", ratio, "--save_root", args.save_root, "--run_id", str(k), *method_flags(variant), *passthrough]


def mismatch(args, passthrough, cell, run_dir):
    """None when the run in run_dir (finished, or resumable from its last.pth) was made with the settings
    the plan gives this cell; else why not (the differing settings, by name)."""
    import train
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        recorded = cfg["fingerprint_settings"]
    except (OSError, ValueError, KeyError):
        return "its config.json is missing, unreadable or has no fingerprint (made by an older version)"
    argv = fresh_command(args, passthrough, cell)[1:]
    a = train.resolved_args(train.get_args_parser().parse_args(argv), train.given_flags(argv))
    planned = planned_settings(a, parse_ratio_or_all(a["ratio"], a["classes"]), cell[2])
    diff = setting_differences(recorded, planned)
    return "; ".join(f"{d} (recorded vs planned)" for d in diff) or None


def on_cpu(args):
    """Whether the cells train on the CPU: no --gpus, and train.py's --device cpu, or auto without CUDA."""
    if args.gpus:
        return False
    device = args.cell.device
    if device != "auto":
        return device == "cpu"
    import torch
    return not torch.cuda.is_available()


def side_by_side(args, cpus=None):
    """-> (cells at once, torch threads of each cell or None for torch's default). On a CPU, jobs x
    threads never exceeds the CPUs this process may use (os.sched_getaffinity): more would make every
    cell spin on every core, several times slower than one at a time."""
    cpus = cpus or available_cpus()
    if args.gpus:
        n = len(args.gpus.split(",")) * args.jobs_per_gpu
        return n, args.threads or (max(1, cpus // n) if n > 1 else None)
    if args.task_id is not None:
        return 1, args.threads or (cpus if on_cpu(args) else None)
    if not on_cpu(args):
        return args.jobs or 1, args.threads
    jobs, threads = args.jobs, args.threads
    if jobs is None and threads is None:
        jobs, threads = cpus, 1                     # bench.py's jobs x threads measurement (docs/performance.md)
    elif jobs is None:
        jobs = max(1, cpus // threads)
    elif threads is None:
        threads = max(1, cpus // jobs)
    if jobs * threads > cpus:
        raise UserError(f"--jobs {jobs} x --threads {threads} = {jobs * threads} threads on the {cpus} CPU(s) this "
                        f"process may use: each cell would spin on the others' cores, several times slower than one "
                        f"at a time; choose jobs x threads <= {cpus}")
    return jobs, threads


def machine_flags(args, jobs, threads):
    """train.py flags that place a cell on the machine: its threads and, for cells side by side on a CPU,
    decoding and augmentation in the cell's own process (--num_workers 0, unless given), so that no
    worker process takes a core another cell counts on."""
    flags = ["--threads", str(threads)] if threads else []
    if jobs > 1 and on_cpu(args) and args.cell.num_workers is None:
        flags += ["--num_workers", "0"]
    return flags


def plan(args, passthrough):
    cells = grid(args)
    if args.task_id is not None:
        if not 0 <= args.task_id < len(cells):
            raise UserError(f"--task_id {args.task_id}: the grid has cells 0..{len(cells) - 1}")
        cells = [cells[args.task_id]]
    extra = machine_flags(args, *side_by_side(args))
    todo, done, unlike = [], 0, []
    for cell in cells:
        run_dir, cmd = cell_command(args, passthrough, cell)
        if cmd is None or cmd[1] == "--resume":
            why = mismatch(args, passthrough, cell, run_dir)
            if why:
                unlike.append(f"  {run_dir}: {why}")
                continue
        if cmd is None:
            done += 1
        else:
            todo.append((cell, run_dir, cmd + extra))
    if unlike:
        raise UserError(f"{len(unlike)} run folder(s) under {args.save_root} hold runs made with other settings "
                        f"than this command plans, so they cannot count as its cells; nothing was trained:\n"
                        + "\n".join(unlike[:20]) + ("\n  ..." if len(unlike) > 20 else "")
                        + "\nUse a new --save_root for these settings, or re-run with the settings those runs were "
                          "made with.")
    return todo, done


# ---------------------------------------------------------------- running

def run_in_process(cmd):
    """Sequential cells run train.main (cmd[0] 'train.py'; 'validation.py' for the evaluation side by
    side) in this process: the same code, without re-importing torch."""
    import importlib
    script = importlib.import_module(os.path.splitext(cmd[0])[0])
    try:
        script.main(cmd[1:])
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if e.code == 130:   # Ctrl-C or SIGTERM inside the run: stop the whole grid, not just this cell
            raise KeyboardInterrupt
        return e.code if isinstance(e.code, int) else 1


def run_subprocess(cmd, gpu, log_path, threads=None):
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if threads:                     # native libraries' pools too, from the interpreter's start
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, "ab") as log:
        return subprocess.run([sys.executable, os.path.join(HERE, cmd[0]), *cmd[1:]], env=env,
                              stdout=log, stderr=subprocess.STDOUT).returncode


def run_logged(cmd, log_path):
    """One cell in this process (a worker of run_side_by_side), its output (Python's and the native
    libraries') appended to log_path -> train.py's exit code (130: interrupted)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            return run_in_process(cmd)
        except KeyboardInterrupt:
            return 130
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


def cpu_slot():
    """A slot for cells side by side on a CPU: one worker process that stays for the whole grid (torch
    is imported once per slot, not once per cell) and runs each cell as run_in_process does, with the
    cell's --threads. Started with 'spawn' on every OS: no state of this process is inherited."""
    return cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))


def in_slots(slots, items, work):
    """work(item, slot) -> (progress line, exit code) for every item, as many at once as there are slots,
    each item holding one slot while it runs; each line is printed as [k/n] line. An exit code of 130
    (interrupted) stops the rest. The worker-process slots (cpu_slot) are shut down at the end."""
    free, lock, count = queue.Queue(), threading.Lock(), [0]
    for slot in slots:
        free.put(slot)

    def one(item):
        slot = free.get()
        try:
            line, rc = work(item, slot)
        finally:
            free.put(slot)
        with lock:
            count[0] += 1
            print(f"[{count[0]}/{len(items)}] {line}", flush=True)
        if rc == 130:
            raise KeyboardInterrupt

    try:
        if len(slots) > 1:
            with cf.ThreadPoolExecutor(len(slots)) as pool:
                list(pool.map(one, items))
        else:
            for item in items:
                one(item)
    finally:
        for slot in slots:
            if isinstance(slot, cf.Executor):
                slot.shutdown(cancel_futures=True)


def train_all(args, todo, jobs, threads):
    """Run the planned cells: one at a time in this process, or side by side (--jobs on a CPU: a worker
    process per slot; --gpus: a train.py process per cell, pinned to its GPU), each cell's output in
    <save_root>/reproduce_logs/. -> failed cells."""
    gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else [None]
    parallel = (args.jobs_per_gpu if args.gpus else jobs) * len(gpus) > 1
    slots = [g if args.gpus or not parallel else cpu_slot()
             for g in gpus for _ in range(args.jobs_per_gpu if args.gpus else jobs)]
    log_dir = os.path.join(args.save_root, "reproduce_logs")  # one output file per cell run side by side
    if parallel:
        os.makedirs(log_dir, exist_ok=True)
    failed = []

    def work(item, slot):
        cell, run_dir, cmd = item
        t0 = time.time()
        log = os.path.join(log_dir, "_".join(run_dir.split(os.sep)[-3:]) + ".txt")
        if not parallel:
            rc = run_in_process(cmd)
        elif isinstance(slot, cf.Executor):
            rc = slot.submit(run_logged, cmd, log).result()
        else:
            rc = run_subprocess(cmd, slot, log, threads)
        if rc != 0:
            failed.append(run_dir)
        status = "done" if rc == 0 else f"FAILED (exit {rc})"
        return (f"{status} {run_dir} in {time.time() - t0:.0f}s" + (f" on GPU {slot}" if args.gpus else ""), rc)

    in_slots(slots, todo, work)
    return failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, passthrough = parse(argv)
    todo, done = plan(args, passthrough) if not args.eval_only else ([], 0)
    if args.slurm:
        ensure_output_dir(args.save_root, "--save_root")
        index = {cell: i for i, cell in enumerate(grid(args))}
        print(f"{len(todo)} cell(s) to train, {done} already complete, under {args.save_root}", flush=True)
        slurm.submit(args.save_root, argv, [index[cell] for cell, _, _ in todo], args.slurm_args,
                     args.max_parallel, evaluate=bool(args.test_data_root), dry_run=args.dry_run)
        return
    if args.dry_run:
        for _, _, cmd in todo:
            print(shlex.join(["python3", *cmd]))
        print(f"# {len(todo)} train.py command(s) to run, {done} cell(s) already complete", file=sys.stderr)
        return
    ensure_output_dir(args.save_root, "--save_root")
    jobs, threads = side_by_side(args)
    print(f"{len(todo)} run(s) to train, {done} already complete, under {args.save_root}; {jobs} at once"
          + (f", {threads} thread(s) each" if threads else ""), flush=True)
    failed = train_all(args, todo, jobs, threads) if todo else []
    if args.task_id is None and args.test_data_root:
        evaluate(args, jobs, threads)
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {' '.join(failed)}; re-run the same command to retry them")


def evaluate(args, jobs=1, threads=None):
    """validation.py on the whole save root under each rule, then report.py; first, the planned cells
    without a finished run. Cells side by side on a CPU are evaluated side by side too, with their
    threads (evaluate_side_by_side); the pass over the whole root then finds their recorded evaluations."""
    import report
    import validation
    missing = [d for d in (cell_command(args, [], cell)[0] for cell in grid(args)) if not is_complete(d)]
    if missing:
        print(f"{len(missing)} planned cell(s) have no finished run (failed, or not run yet), left out of the "
              f"tables:\n" + "\n".join(f"  missing {d}" for d in missing), flush=True)
    rules = list(dict.fromkeys(args.select))
    cpu = on_cpu(args)
    base = ["--test_data_root", args.test_data_root, "--classes", *args.classes, "--precision", args.eval_precision,
            *(["--threads", str(threads)] if cpu and threads else [])]
    if cpu and jobs > 1:
        evaluate_side_by_side(args, base, rules, jobs)
    for rule in rules:
        try:
            validation.main(["--model_root", args.save_root, *base, "--select", rule])
        except SystemExit as e:
            if e.code:
                raise UserError(f"validation.py --select {rule} evaluated nothing under {args.save_root}")
        report.main(["--save_root", args.save_root, "--select", rule]
                    + (["--reference", args.reference] if args.reference else [])
                    + (["--paper", args.paper] if args.paper else []))


def evaluate_side_by_side(args, base, rules, jobs):
    """Each variant folder evaluated under every rule in a worker slot, jobs at once, with the cells'
    threads (base) and decoding in the slot's own process; output in reproduce_logs/evaluate_<variant>.txt.
    A slot evaluates an epoch that two rules choose once (validation.py's per-process reuse). Nothing
    here is final: a variant that fails is evaluated, or reported, by the pass over the whole root."""
    import validation
    try:
        variants = validation.find_variant_dirs(args.save_root)
    except UserError:
        return                                          # the pass over the whole root says what is wrong
    if len(variants) < 2:
        return
    base = base + ["--num_workers", "0"]
    log_dir = os.path.join(args.save_root, "reproduce_logs")
    os.makedirs(log_dir, exist_ok=True)
    slots, t_all = [cpu_slot() for _ in range(min(jobs, len(variants)))], time.time()

    def work(vdir, slot):
        t0 = time.time()
        log = os.path.join(log_dir, f"evaluate_{os.path.basename(os.path.normpath(vdir))}.txt")
        try:
            codes = [slot.submit(run_logged, ["validation.py", "--model_root", vdir, *base, "--select", rule],
                                 log).result() for rule in rules]
        except cf.process.BrokenProcessPool:    # the worker died (out of memory, killed): left to the pass below
            codes = [1]
        status = "done" if not any(codes) else f"left to the pass below (exit {max(codes)}, see {log})"
        return (f"evaluated {vdir} under {len(rules)} rule(s): {status} in {time.time() - t0:.0f}s",
                130 if 130 in codes else max(codes))

    print(f"evaluating {len(variants)} variant(s), {len(slots)} at once", flush=True)
    in_slots(slots, variants, work)
    print(f"evaluated side by side in {time.time() - t_all:.0f}s", flush=True)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run_main(main)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
