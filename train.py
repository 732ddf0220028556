"""Train ResNet-18 on an imbalanced ImageFolder subsample, with the paper's feature-similarity loss.

    python3 train.py --train_data_root ./dataset/train --classes water-deer roe-deer \
        --ratio 1:0.01 --save_root ./saved_runs --num_epochs 100 [--contrastive] [--oversampling]

Each run lands in <save_root>/<variant>/<ratio>/run_X/ with config.json, train.log, metrics.jsonl,
best.pth, last.pth and, once finished, summary.json. See docs/training.md for every flag.
"""
import argparse
import copy
import json
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import feed as feeds
from devices import DATA_PATHS, DEVICES, check_threads, data_path, resolve_device, use_threads
from losses import (AUX_LOSSES, CLASSIFICATION_LOSSES, DEFAULTS, SAMPLERS, Criterion, check_method, method_choices,
                    method_name)
from model import (SMALL_MAP_CONVS, TAPPABLE, build_model, forward_with_taps, head_of, small_map_convs_of,
                   use_exact_float32)
from runs import (ACC_DECIMALS, SELECT_RULES, absolute_paths, balanced_train_acc, claim_run_dir, is_complete,
                  planned_subset, record_provenance, run_number, run_settings, set_aside_previous_attempt,
                  set_fingerprint)
from utils import (BackgroundSaver, UserError, WriteError, append_line, available_cpus, command_line, decoding_workers,
                   load_checkpoint, parse_ratio_or_all, ratio_folder_name, ratio_text, run_main, save_checkpoint,
                   signals_deferred, write_json_atomic, write_text_atomic)

FINITE_CHECK_EVERY = 20  # steps between host syncs that check the loss is finite
# flags that --resume accepts: they change how fast a run goes, not its result (see runs.run_settings)
RESUME_FLAGS = ("device", "num_workers", "threads", "cache", "compile", "channels_last", "keep_last", "keep_selected",
                "checkpoint_every", "data_path")


def get_args_parser():
    p = command_line(__doc__)
    g = p.add_argument_group("data (as in the paper's README)")
    g.add_argument("--train_data_root", help="required (except with --resume): ImageFolder root, one sub-folder per "
                   "class")
    g.add_argument("--classes", nargs="+", help="required (except with --resume): class folder names, in order; the first is the ratio's reference "
                   "(majority) class and labels follow this order")
    g.add_argument("--ratio", help="one part per class, colon-separated, e.g. 1:0.01 or 1:0.1:0.01; omitted or "
                   "'all': every image of each class, the folder as it is (run folder 'all')")
    g.add_argument("--max_per_class", type=int, default=10000,
                   help="cap on the reference class's images before the ratio applies (paper: 10,000; 0 = no cap); "
                   "with --ratio all, a cap on every class, and only when given")
    g.add_argument("--save_root", default="./saved_runs", help="runs go to <save_root>/<variant>/<ratio>/run_X")
    g = p.add_argument_group("method")
    g.add_argument("--contrastive", action="store_true", help="add the feature-similarity loss (eq. 3); "
                   "the same as --aux fscl")
    g.add_argument("--oversampling", action="store_true", help="the same as --sampler oversample (the paper's)")
    g.add_argument("--loss", default="ce", choices=list(CLASSIFICATION_LOSSES),
                   help="classification loss: ce (paper), focal (Lin et al. 2017), cb (class-balanced, Cui et al. "
                   "2019), ldam (Cao et al. 2019; cosine-normalised head), la (logit adjustment, Menon et al. 2021)")
    g.add_argument("--sampler", default="uniform", choices=list(SAMPLERS),
                   help="uniform: every image once per epoch; oversample: 1:1 class balance, draws with replacement "
                   "at probability 1 / class count (as WeightedRandomSampler), epoch = #classes x largest class "
                   "count; sqrt: class probability proportional to sqrt(class count) (Mahajan et al. 2018), "
                   "draws with replacement, epoch = number of training images")
    g.add_argument("--drw", action="store_true", help="deferred re-weighting (Cao et al. 2019): class-balanced "
                   "weights (--cb_beta) on the classification loss from --drw_start of the epochs on")
    g.add_argument("--aux", default="none", choices=list(AUX_LOSSES),
                   help="auxiliary loss on the tapped stages: none, fscl (the paper's, eq. 3), supcon (supervised "
                   "contrastive, Khosla et al. 2020)")
    g.add_argument("--fscl_negative", type=int, default=0, choices=(0, -1),
                   help="T_ij for different classes in eq. (2) (paper: 0)")
    g.add_argument("--contrastive_layers", nargs="+", default=["layer3", "layer4"],
                   help="ResNet stages tapped for the auxiliary loss (paper: layer3 layer4)")
    g.add_argument("--contrastive_weight", type=float, default=1.0, help="weight of sum_l of the auxiliary loss "
                   "(paper: 1 for L_c^l)")
    g = p.add_argument_group("hyperparameters of the baselines (published defaults)")
    g.add_argument("--focal_gamma", type=float, default=DEFAULTS["focal_gamma"], help="focal loss gamma (2)")
    g.add_argument("--cb_beta", type=float, default=DEFAULTS["cb_beta"],
                   help="class-balanced beta, for --loss cb and --drw (0.9999)")
    g.add_argument("--ldam_max_margin", type=float, default=DEFAULTS["ldam_max_margin"],
                   help="LDAM's largest margin, that of the rarest class (0.5)")
    g.add_argument("--ldam_scale", type=float, default=DEFAULTS["ldam_scale"], help="LDAM's scale s (30)")
    g.add_argument("--la_tau", type=float, default=DEFAULTS["la_tau"], help="logit adjustment tau (1)")
    g.add_argument("--drw_start", type=float, default=DEFAULTS["drw_start"],
                   help="fraction of the epochs before DRW's weights start (0.8: epochs 81-100 of 100)")
    g.add_argument("--supcon_temperature", type=float, default=DEFAULTS["supcon_temperature"],
                   help="supervised contrastive temperature (0.1)")
    g.add_argument("--augment", default="paper", choices=data.AUGMENTS, help="paper = RandAugment + ColorJitter per image (paper); "
                   "plain = resize only")
    g = p.add_argument_group("optimisation")
    g.add_argument("--num_epochs", type=int, default=100, help="paper: 100")
    g.add_argument("--batch_size", type=int, default=64, help="paper: 64 (at least 2; a last batch of a single "
                   "image is left out of its epoch)")
    g.add_argument("--lr", type=float, default=0.001, help="paper: 0.001")
    g.add_argument("--optimizer", default="adam", choices=OPTIMIZERS, help="adam (default; the paper names none), adamw, or sgd "
                   "(momentum 0.9)")
    g.add_argument("--img_size", type=int, default=224, help="images are resized to img_size x img_size (224)")
    g.add_argument("--weights", default="imagenet", help="imagenet (torchvision IMAGENET1K_V1, default), none "
                   "(random init), or a path to a resnet18 state_dict")
    g.add_argument("--seed", type=int, default=None, help="seeds subset, init, sampling order and augmentation, "
                   "a non-negative integer (default: the run's number X, so run_1, run_2... differ and each is "
                   "reproducible)")
    g = p.add_argument_group("machine")
    g.add_argument("--device", default="auto", choices=DEVICES, help="auto (cuda if available), cpu or cuda")
    g.add_argument("--num_workers", type=int, default=None, help="DataLoader workers for training and for the "
                   "first decoding pass (default: training 0 on CPU, where the model needs the cores, min(8, CPUs) "
                   "on CUDA; decoding min(8, CPUs)); 0 = everything in this process. The results do not depend on it")
    g.add_argument("--threads", type=int, default=None, help="torch threads of this run (intra- and inter-op), "
                   "at most the CPUs this process may use (default: torch's own, all of them). Changes the last bits "
                   "of the weights on a CPU, not the experiment: recorded in config.json, not in the fingerprint. "
                   "reproduce.py sets it for cells run side by side")
    g.add_argument("--small_map_convs", default="matmul", choices=SMALL_MAP_CONVS, help="how a convolution on "
                   "a map no larger than its kernel is computed (ResNet-18's last two stages at 32 px, the last at "
                   "64 px): matmul (default), as the matrix product of the input pixels with the taps that reach "
                   "them; one_pixel, the same for one-pixel outputs only (--one_pixel_convs matmul; the default from "
                   "commit ef15a16 to 6a7b7fc); conv, torch's convolution over all taps (the default before ef15a16). "
                   "Faster on a CPU "
                   "(docs/performance.md); the same model and math; they differ in the weights' last bits, not the "
                   "experiment: recorded in config.json, not in the fingerprint")
    g.add_argument("--one_pixel_convs", dest="small_map_convs", choices=("matmul", "conv"), action=OnePixelFlag,
                   default=argparse.SUPPRESS, help="the earlier spelling: matmul = --small_map_convs one_pixel, "
                   "conv = --small_map_convs conv")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (default on; ignored on CPU); --no-amp trains in exact float32 "
                   "(TF32 off)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format on CUDA (default on; ignored on CPU)")
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the decoded, resized uint8 training images in memory (N x 3 x S x S bytes; "
                   "the size is printed); --no-cache decodes each image on every visit")
    g.add_argument("--data_path", default="auto", choices=DATA_PATHS, help="where the training images are "
                   "augmented: device, the decoded images copied to the GPU once and augmented there batch by batch "
                   "(the draws still made on the CPU: the same pixels); host, in DataLoader workers on the CPU; "
                   "auto, device on CUDA when the cache takes at most a quarter of the GPU's free memory, else "
                   "host (docs/training.md). The results do not depend on it")
    g.add_argument("--compile", nargs="?", const="default", default=False, choices=COMPILE_MODES,
                   help="torch.compile the forward pass (and with it the backward), in torch.compile's mode: "
                   "default (--compile alone), reduce-overhead (with CUDA graphs) or max-autotune-no-cudagraphs; "
                   "off when not given (docs/performance.md has what each gave on one GPU)")
    g.add_argument("--keep_last", action=argparse.BooleanOptionalAction, default=True,
                   help="keep last.pth (weights, optimizer and RNG states, 3x the size of best.pth) once the run has "
                   "finished (default); --no-keep_last deletes it then: best.pth holds the evaluated model, and a "
                   "finished run is never resumed")
    g.add_argument("--checkpoint_every", type=float, default=60.0, metavar="SECONDS",
                   help="how often the checkpoints go to disk: after the first epoch that ends SECONDS or more after "
                   "the last write (default 60), after the last epoch, and when the run is interrupted (Ctrl-C, "
                   "SIGTERM) or stopped; 0 = after every epoch (the default before commit 60716b0). Every epoch is still kept in "
                   "memory until then, so an interruption loses no finished epoch; a hard kill (SIGKILL, power loss) "
                   "loses at most SECONDS of training, which --resume trains again to the same weights. Short epochs "
                   "(the demo's, seconds on a CPU) then do not each pay for writing last.pth's 135 MB "
                   "(docs/performance.md)")
    g.add_argument("--keep_selected", nargs="+", default=list(SELECT_RULES), choices=SELECT_RULES,
                   help="the rules of model selection whose epoch's weights the run keeps, for validation.py --select "
                   "(default: all three): train_acc (best.pth, the paper's rule, always kept), balanced_train_acc "
                   "(best_balanced.pth) and last (last.pth, or final.pth, weights only, with --no-keep_last); a file "
                   "whose epoch another one already holds is not kept twice")
    g = p.add_argument_group("runs")
    g.add_argument("--strict", action="store_true", help="refuse to train when an image file is broken "
                   "(default: skip it with a warning)")
    g.add_argument("--run_id", type=int, default=None, help="use run_<run_id> instead of the next free run_X")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pth")
    return p


# ---------------------------------------------------------------- configuration

class OnePixelFlag(argparse.Action):
    """--one_pixel_convs matmul|conv, the earlier flag: stored as --small_map_convs one_pixel|conv."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, "one_pixel" if value == "matmul" else "conv")


OPTIMIZERS = ("adam", "adamw", "sgd")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def check_args(args):
    """Validate the options that argparse cannot; UserError names the flag and the valid values."""
    for flag in ("train_data_root", "classes"):
        if getattr(args, flag) is None:
            raise UserError(f"--{flag} is required (or --resume RUN_DIR)")
    if len(args.classes) < 2:
        raise UserError(f"--classes needs at least two class folders, got {args.classes}")
    bad = [l for l in args.contrastive_layers if l not in TAPPABLE]
    if bad or len(set(args.contrastive_layers)) != len(args.contrastive_layers):
        raise UserError(f"--contrastive_layers {' '.join(args.contrastive_layers)}: choose distinct stages "
                        f"from {' '.join(TAPPABLE)}")
    if args.optimizer not in ("adam", "adamw", "sgd"):
        raise UserError(f"--optimizer {args.optimizer!r} is not valid; choose adam, adamw or sgd")
    for flag, low in (("num_epochs", 1), ("batch_size", 2), ("img_size", 8), ("max_per_class", 0)):
        if getattr(args, flag) < low:
            raise UserError(f"--{flag} must be at least {low}, got {getattr(args, flag)}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    check_checkpoint_every(args.checkpoint_every)
    decoding_workers(args.num_workers)   # refuses a negative value before anything is made
    check_threads(args.threads)
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed must be a non-negative integer (0, 1, 2, ...), got {args.seed}")
    check_method(args)
    data.build_augment(args.augment)
    parse_ratio_or_all(args.ratio, args.classes)


def check_checkpoint_every(seconds):
    if not 0 <= seconds < float("inf"):
        raise UserError(f"--checkpoint_every must be a number of seconds, 0 or more (0: after every epoch), "
                        f"got {seconds}")


def given_flags(argv):
    """The dests of the options given on the command line, as opposed to filled in by argparse."""
    probe, unset = get_args_parser(), object()
    probe.set_defaults(**{dest: unset for dest in vars(probe.parse_args([]))})
    return {dest for dest, v in vars(probe.parse_args(argv)).items() if v is not unset}


def resolved_args(args, given):
    """train.py's arguments as a run records them (reproduce.py plans with the same): paths absolute;
    with --ratio all (or none), no cap unless --max_per_class was given, so the folder is used as it is."""
    a = absolute_paths({k: v for k, v in vars(args).items() if k != "resume"})
    if parse_ratio_or_all(args.ratio, args.classes) == "all" and "max_per_class" not in given:
        a["max_per_class"] = 0
    return a


def prepare_run(args, given):
    """Return (run_dir, config, start_state): a new run folder, or the one given to --resume."""
    if args.resume:
        return prepare_resume(args, given)
    check_args(args)
    ratio = parse_ratio_or_all(args.ratio, args.classes)
    variant = method_name(method_choices(vars(args)))
    data.find_class_images(args.train_data_root, args.classes)  # fail before creating a folder
    run_dir = claim_run_dir(os.path.join(args.save_root, variant, ratio_folder_name(ratio)), args.run_id)
    if args.run_id is not None:
        set_aside_previous_attempt(run_dir)
    cfg = {"args": resolved_args(args, given),
           "variant": variant, "method": method_choices(vars(args)), "classes": list(args.classes), "ratio": ratio,
           "seed": args.seed if args.seed is not None else run_number(run_dir), "cwd": os.getcwd()}
    return run_dir, cfg, None


def prepare_resume(args, given):
    """The run's own configuration from its config.json; of the flags given with --resume only those
    that do not change the result (RESUME_FLAGS) are taken, any other is refused."""
    run_dir = args.resume
    refused = sorted(given - {"resume", *RESUME_FLAGS})
    if refused:
        raise UserError(f"--resume {run_dir} continues the run with the settings in its config.json; "
                        f"{' '.join('--' + f for f in refused)} would change its result and cannot be combined "
                        f"with --resume (allowed: {' '.join('--' + f for f in RESUME_FLAGS)}). "
                        f"Start a new run for other settings.")
    decoding_workers(args.num_workers)   # refuses a negative value before anything is made
    check_threads(args.threads)
    check_checkpoint_every(args.checkpoint_every)
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"--resume {run_dir}: no config.json there; give a run folder made by train.py")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if is_complete(run_dir):
        raise UserError(f"--resume {run_dir}: this run already finished (summary.json exists)")
    cfg["args"] = absolute_paths(cfg["args"], base=cfg.get("cwd"))   # runs recorded with relative paths
    cfg["args"].update({f: getattr(args, f) for f in given & set(RESUME_FLAGS)})
    last = os.path.join(run_dir, "last.pth")
    state = load_checkpoint(last) if os.path.isfile(last) else None
    return run_dir, cfg, state


def build_train_data(cfg, run_dir):
    """Subsample, check (and cache) the images once; record counts, broken files and, for a new run,
    the fingerprint of its settings in cfg."""
    a = cfg["args"]
    paths, labels, counts, notes = planned_subset(a, cfg["ratio"], cfg["seed"])
    if "fingerprint" not in cfg:
        set_fingerprint(cfg, run_settings(a, cfg["ratio"], cfg["seed"], data.subset_id(paths, a["train_data_root"])))
    for n in notes:
        print(f"warning: {n}", file=sys.stderr)
    workers = decoding_workers(a["num_workers"])
    with tqdm(total=len(paths), desc="decode+check", disable=None, file=sys.stderr) as bar:
        cache, bad = data.decode_all(paths, a["img_size"], num_workers=workers, keep=a["cache"], progress=bar)
    if bad:
        listing = "\n".join(f"  {p}: {why}" for _, p, why in bad)
        if a["strict"]:
            raise UserError(f"--strict: {len(bad)} broken image file(s) among the chosen training images:\n{listing}")
        print(f"warning: skipping {len(bad)} broken image file(s):\n{listing}", file=sys.stderr)
    bad_idx = {i for i, _, _ in bad}
    paths = [p for i, p in enumerate(paths) if i not in bad_idx]
    labels = [y for i, y in enumerate(labels) if i not in bad_idx]
    for k, c in enumerate(a["classes"]):
        counts[c]["used"] = labels.count(k)
        if counts[c]["used"] == 0:
            raise UserError(f"class {c!r} has no readable image left in {a['train_data_root']}")
    used = data.subset_id(paths, a["train_data_root"])
    if cfg.get("subset_sha1") not in (None, used):
        raise UserError(f"the images chosen from {a['train_data_root']} differ from those {run_dir} started with "
                        f"(the folder changed, or the run was made by a version that chose images differently); "
                        f"start a new run instead of --resume")
    n_ref = counts[a["classes"][0]]["used"]
    cfg.update(counts=counts, notes=notes, subset_sha1=used, n_bad_images=len(bad),
               observed_ratio=[round(counts[c]["used"] / n_ref, 6) for c in a["classes"]],
               bad_images=[p for _, p, _ in bad], cache_bytes=int(cache.numel()) if cache is not None else 0)
    dataset = data.ImageSet(labels, a["img_size"], images=cache, paths=None if a["cache"] else paths,
                            transform=data.build_augment(a["augment"]))
    return dataset, labels


def loader_workers(a, device):
    """--num_workers of the training loader: as given, else min(8, CPUs) on CUDA and 0 on a CPU."""
    return a["num_workers"] if a["num_workers"] is not None else (min(8, available_cpus())
                                                                  if device.type == "cuda" else 0)


def epoch_batches(labels, cfg):
    a = cfg["args"]
    return data.EpochBatches(labels, len(a["classes"]), a["batch_size"], method_choices(a)["sampler"], cfg["seed"])


def make_feed(dataset, labels, cfg, device, path, start, mp_context=None):
    """-> the run's feed.Feed for epochs start..num_epochs on the given path ('host' or 'device'). The
    stream is a pure function of (seed, epoch) whatever the path and workers; mp_context is the
    workers' start method (None: Python's default)."""
    return feeds.Feed(dataset, epoch_batches(labels, cfg), start, cfg["args"]["num_epochs"], device, path,
                      loader_workers(cfg["args"], device), mp_context)


def make_loader(dataset, labels, cfg, device, mp_context=None):
    """-> (DataLoader of one epoch, its EpochBatches: set_epoch before iterating), the host path's loader
    as one epoch at a time."""
    a = cfg["args"]
    workers = loader_workers(a, device)
    batches = epoch_batches(labels, cfg)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                                         persistent_workers=workers > 0,
                                         multiprocessing_context=mp_context if workers else None)
    return loader, batches


def compiled(net, mode):
    """net through torch.compile in mode (True, recorded by runs before --compile took a mode, is 'default');
    False: net."""
    if not mode:
        return net
    return torch.compile(net) if mode in (True, "default") else torch.compile(net, mode=mode)


def make_optimizer(name, params, lr):
    """Adam, AdamW or SGD with momentum 0.9, in torch's fused implementation (one kernel over all
    parameters, on CPU and CUDA). torch's default on a CPU is a loop over the parameters that reads and
    writes each of Adam's buffers in a separate pass; at 32 px with one thread the fused step is 1.2-1.3x
    as fast on a 2-core Intel Xeon, and the demo 1.16-1.18x (docs/performance.md). The two
    implementations agree to about 1e-8 but not to the last bit, so config.json records which one
    trained (optimizer_impl)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True)


def seed_epoch(seed, epoch, batches):
    """Every epoch draws from a fresh, fixed seed: a resumed run repeats an uninterrupted one. The data
    stream (order and augmentation) comes from batches, seeded by (seed, epoch) alone."""
    s = seed * 1_000_003 + epoch
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    batches.set_epoch(epoch)


# ---------------------------------------------------------------- one epoch

class Tapped(torch.nn.Module):
    """model -> (logits, {layer: pooled features}); a module so that torch.compile can take it whole."""

    def __init__(self, model, taps):
        super().__init__()
        self.model, self.taps = model, tuple(taps)

    def forward(self, x):
        return forward_with_taps(self.model, x, self.taps)


def train_one_epoch(net, loader, optimizer, criterion, device, cfg, desc):
    """One pass over the loader; returns a dict of metrics for the epoch."""
    a = cfg["args"]
    K = len(a["classes"])
    use_cuda = device.type == "cuda"
    amp, channels_last = use_cuda and a["amp"], use_cuda and a["channels_last"]
    net.train()
    to_input = data.ModelInput(device, channels_last)
    # per-class counts stay on the device and are added without a host sync (scatter_add_, not bincount)
    sums, seen, correct = None, torch.zeros(K, device=device, dtype=torch.long), torch.zeros(K, device=device,
                                                                                             dtype=torch.long)
    t0, data_s = time.perf_counter(), 0.0
    it = iter(loader)
    bar = tqdm(total=len(loader), desc=desc, disable=None, file=sys.stderr, leave=False)
    for step in range(len(loader)):
        t = time.perf_counter()
        x, y = next(it)
        data_s += time.perf_counter() - t
        x, y = to_input(x), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits, feats = net(x)
        loss, terms = criterion(logits, feats, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        names = ["loss"] + list(terms)
        batch = torch.stack([loss.detach()] + [v.detach() for v in terms.values()]) * len(y)
        sums = batch if sums is None else sums + batch
        seen.scatter_add_(0, y, torch.ones_like(y))                           # (K,)
        correct.scatter_add_(0, y, (logits.argmax(1) == y).long())            # (K,)
        if step % FINITE_CHECK_EVERY == 0 or step == len(loader) - 1:
            check_finite(sums, names, step, desc)
        bar.update()
    bar.close()
    return epoch_metrics(sums, names, seen, correct, a["classes"], time.perf_counter() - t0, data_s)


def epoch_metrics(sums, names, seen, correct, classes, seconds, data_s):
    """The epoch's dict of metrics from the device-side sums: the epoch's one host sync after its last step."""
    seen, correct, sums = seen.tolist(), correct.tolist(), sums.tolist()
    n = sum(seen)
    out = {"train_acc": round(sum(correct) / n, ACC_DECIMALS),
           "per_class_acc": {c: round(correct[k] / seen[k], 4) if seen[k] else None for k, c in enumerate(classes)}}
    out.update({name: v / n for name, v in zip(names, sums)}, loss_terms=names)
    out.update(images=int(n), seconds=round(seconds, 2), img_per_s=round(n / seconds, 1),
               data_wait_fraction=round(data_s / seconds, 4))
    return out


def check_finite(sums, names, step, desc):
    vals = sums.tolist()
    if not all(np.isfinite(vals)):
        raise FloatingPointError(f"{desc}: the loss became non-finite by step {step + 1} "
                                 f"({', '.join(f'{n}={v}' for n, v in zip(names, vals))}); stopping. "
                                 f"Try a lower --lr or --no-amp.")


def epoch_line(epoch, total, m, classes):
    per_class = " ".join(f"acc[{c}] {m['per_class_acc'][c]}" for c in classes)
    losses = " ".join(f"{k} {m[k]:.4f}" for k in m["loss_terms"])
    return (f"Epoch {epoch}/{total} | Train Acc {m['train_acc']:.{ACC_DECIMALS}f} | {per_class} | {losses} | "
            f"{m['seconds']:.1f}s {m['img_per_s']:.0f} img/s data_wait {m['data_wait_fraction']:.1%}")


# ---------------------------------------------------------------- main

def main(argv=None, epoch_done=None):
    """Train one run -> its folder. epoch_done(epoch, metrics), if given, is called after each epoch,
    before that epoch's checkpoint is handed to the background writer (bench.py times the model's
    compute-only limit there, between epochs)."""
    args = get_args_parser().parse_args(argv)
    use_exact_float32()   # float32 means IEEE float32 on CUDA too (no TF32); bf16 only under --amp
    run_dir, cfg, state = prepare_run(args, given_flags(argv))
    before = torch.get_num_threads()
    try:
        threads = use_threads(cfg["args"].get("threads"))
        return train_run(run_dir, cfg, state, threads, epoch_done)
    finally:
        torch.set_num_threads(before)    # a grid that runs cells in this process gets its own count back


def train_run(run_dir, cfg, state, threads, epoch_done):
    a = cfg["args"]
    device = resolve_device(a["device"])
    try:
        torch.manual_seed(cfg["seed"])
        model = build_model(len(a["classes"]), "none" if state else a["weights"], head_of(a),
                            a.get("ldam_scale", DEFAULTS["ldam_scale"]), small_map_convs_of(a)).to(device)
        dataset, labels = build_train_data(cfg, run_dir)
    except UserError:
        if not state and not os.listdir(run_dir):
            os.rmdir(run_dir)  # nothing was written: give the number back
        raise
    if device.type == "cuda" and a["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(a["optimizer"], model.parameters(), a["lr"])
    if state:
        optimizer.load_state_dict(state["optimizer"])   # with the implementation the checkpoint was written with
    record_provenance(cfg, device, state, threads, optimizer)
    cfg["data_path_used"] = data_path(a.get("data_path", "auto"), device, cfg["cache_bytes"], a["cache"])
    write_json_atomic(os.path.join(run_dir, "config.json"), cfg)
    counts = ", ".join(f"{c}: {v['used']}" for c, v in cfg["counts"].items())
    print(f"{run_dir}: {cfg['variant']} ratio {ratio_text(cfg['ratio'])}, images {counts}, "
          f"seed {cfg['seed']}, device {device}, {threads} thread(s), cache {cfg['cache_bytes'] / 2**20:.0f} MiB, "
          f"augmented on the {cfg['data_path_used']}", file=sys.stderr)

    start, best = 1, {"train_acc": (None, -1.0), "balanced_train_acc": (None, -1.0)}
    if state:
        model.load_state_dict(state["model"])
        start = state["epoch"] + 1
        best = {"train_acc": (state["best_epoch"], state["best_train_acc"]),
                "balanced_train_acc": tuple(state.get("best_balanced", (None, -1.0)))}
        append_line(os.path.join(run_dir, "train.log"), f"Resumed from last.pth at epoch {state['epoch']}")
    forget_epochs_from(run_dir, start)
    criterion = Criterion(a, [cfg["counts"][c]["used"] for c in a["classes"]], device)
    net = Tapped(model, a["contrastive_layers"] if criterion.aux != "none" else ())
    net = compiled(net, a["compile"])
    feed = make_feed(dataset, labels, cfg, device, cfg["data_path_used"], start)
    try:
        best = train_epochs(run_dir, cfg, net, model, optimizer, criterion, feed, device, start, best, epoch_done)
    finally:
        feed.close()
    (epoch, acc), n = best["train_acc"], a["num_epochs"]
    selected = {"train_acc": epoch, "balanced_train_acc": best["balanced_train_acc"][0], "last": n}
    keep_selected_weights(run_dir, model, cfg, selected)
    summary = {"best_epoch": epoch, "best_train_acc": acc, "epochs": n, "selected": selected}
    append_line(os.path.join(run_dir, "train.log"), f"Finished: best epoch {epoch} (Train Acc {acc:.{ACC_DECIMALS}f})")
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    if not a.get("keep_last", True) and os.path.isfile(os.path.join(run_dir, "last.pth")):
        os.remove(os.path.join(run_dir, "last.pth"))    # after summary.json: the run is complete without it
    print(f"finished {run_dir}: best epoch {epoch}, Train Acc {acc:.{ACC_DECIMALS}f}", file=sys.stderr)
    return run_dir


def forget_epochs_from(run_dir, start):
    """metrics.jsonl without its lines for epochs start and later: a run killed outright (SIGKILL, power
    loss) may have recorded epochs that its last.pth, written at most every --checkpoint_every seconds,
    does not hold; they are trained again now, to the same numbers. A line cut off half-way goes too.
    train.log keeps its lines, followed by a note."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()

    def before_start(line):
        try:
            return json.loads(line)["epoch"] < start
        except (ValueError, KeyError, TypeError):
            return False
    kept = [line for line in lines if before_start(line)]
    if len(kept) < len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))
        append_line(os.path.join(run_dir, "train.log"), f"metrics.jsonl: {len(lines) - len(kept)} line(s) of epoch "
                                                        f"{start} or later dropped (not in last.pth); trained again")


def keep_selected_weights(run_dir, model, cfg, selected):
    """Once the last epoch is recorded: best_balanced.pth is removed when best.pth holds its epoch (or
    it is not to be kept); with --no-keep_last and 'last' kept, the last epoch's weights go to final.pth
    unless best.pth or best_balanced.pth holds that epoch already."""
    a = cfg["args"]
    keep = a.get("keep_selected", SELECT_RULES)
    balanced = os.path.join(run_dir, "best_balanced.pth")
    if os.path.isfile(balanced) and (selected["balanced_train_acc"] == selected["train_acc"]
                                     or "balanced_train_acc" not in keep):
        os.remove(balanced)
    held = {selected["train_acc"]} | ({selected["balanced_train_acc"]} if os.path.isfile(balanced) else set())
    if "last" in keep and not a.get("keep_last", True) and selected["last"] not in held:
        weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        save_checkpoint(os.path.join(run_dir, "final.pth"), {"model": weights, "epoch": selected["last"],
                                                              "config": cfg})


def train_epochs(run_dir, cfg, net, model, optimizer, criterion, feed, device, start, best, epoch_done):
    """Epochs start..num_epochs, each recorded (train.log, metrics.jsonl, its checkpoints) as a whole.
    Each epoch's checkpoints are snapshots held in memory and written by the background saver after
    the first epoch that ends --checkpoint_every seconds after the last write, after the last epoch
    (without last.pth under --no-keep_last: it would be deleted at once), and, synchronously, when
    the run is interrupted or its loss becomes non-finite: last.pth then holds the last finished epoch.
    An interrupt exits with 130; a refused write or a non-finite loss stops with a UserError; both say
    which epoch last.pth holds and how to continue. -> {rule: (best epoch, its value)}."""
    a, log, n = cfg["args"], os.path.join(run_dir, "train.log"), cfg["args"]["num_epochs"]
    every = a.get("checkpoint_every", 0)          # runs of earlier versions wrote after every epoch
    done, saver = start - 1, BackgroundSaver()   # done: the last epoch whose log lines are recorded
    held, written_at = Held(run_dir), time.monotonic()
    try:
        for epoch in range(start, n + 1):
            seed_epoch(cfg["seed"], epoch, feed.batches)
            criterion.set_epoch(epoch)
            m = train_one_epoch(net, feed.epoch(epoch), optimizer, criterion, device, cfg, f"epoch {epoch}/{n}")
            if epoch_done is not None:
                epoch_done(epoch, m)
            line = epoch_line(epoch, n, m, a["classes"])
            with signals_deferred():   # an interrupt here waits until the epoch is fully recorded
                final = epoch == n
                best = save_epoch(held, model, optimizer, epoch, m, best, cfg,
                                  last=not final or a.get("keep_last", True))
                if final or time.monotonic() - written_at >= every:
                    saver.save(*held.take())
                    written_at = time.monotonic()
                append_line(log, line)
                append_line(os.path.join(run_dir, "metrics.jsonl"), json.dumps({"epoch": epoch, **m}))
                done = epoch
            print(line, file=sys.stderr)
        saver.wait()
    except (KeyboardInterrupt, Interrupted) as e:
        saver.wait()  # the checkpoints in flight complete; a half-written one is never renamed in
        held.write_now(saver)    # the last finished epoch's, if not written yet
        on_disk = saver.written if saver.written is not None else start - 1
        append_line(log, f"Interrupted during epoch {done + 1} ({type(e).__name__}); last.pth holds epoch {on_disk}; "
                         f"continue with: python3 train.py --resume {run_dir}")
        print(f"interrupted; continue with: python3 train.py --resume {run_dir}", file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as e:
        saver.wait()
        held.write_now(saver)
        append_line(log, f"Stopped: {e}")
        raise UserError(str(e))
    except WriteError as e:
        try:
            saver.wait()
        except WriteError:
            pass
        on_disk = saver.written if saver.written is not None else start - 1
        saved = f"last.pth holds epoch {on_disk}, complete" if on_disk else "no epoch was saved"
        msg = (f"{e}. The run stopped; {saved}"
               f". Make room or fix the permissions, then continue with: python3 train.py --resume {run_dir}")
        try:
            append_line(log, f"Stopped: {msg}")
        except WriteError:
            pass
        raise WriteError(msg)
    return best


class Held:
    """The checkpoints of the epochs since the last write, in memory: the newest of each file
    (best.pth, best_balanced.pth, last.pth), handed to the writer in that order, so that last.pth's
    record of the best epoch is never ahead of best.pth."""
    ORDER = ("best.pth", "best_balanced.pth", "last.pth")

    def __init__(self, run_dir):
        self.run_dir, self.files = run_dir, {}

    def put(self, name, ckpt):
        self.files[name] = ckpt

    def drop(self, name):
        self.files.pop(name, None)

    def take(self):
        """-> ([(path, checkpoint)] to write, in ORDER; the epoch of the last.pth among them, else None);
        nothing is held afterwards."""
        jobs = [(os.path.join(self.run_dir, f), self.files[f]) for f in self.ORDER if f in self.files]
        tag = self.files["last.pth"]["epoch"] if "last.pth" in self.files else None
        self.files = {}
        return jobs, tag

    def write_now(self, saver):
        """Write what is held through the saver and wait until it is on disk (after an interrupt or a
        stop); the saver records the epoch of last.pth as written. A refused write is reported as the
        interrupted run's last line."""
        saver.save(*self.take())
        try:
            saver.wait()
        except WriteError as e:
            print(f"error: {e}; the checkpoints of the last finished epoch were not all written", file=sys.stderr)


def save_epoch(held, model, optimizer, epoch, m, best, cfg, last=True):
    """best.pth when Train Acc is strictly higher than before (ties keep the earlier epoch);
    best_balanced.pth likewise for the balanced Train Acc (when kept, --keep_selected); last.pth
    unless last is False (the final epoch under --no-keep_last, where an older last.pth held is
    dropped too). All hold tensors and plain types only and load with torch.load(weights_only=True).
    They are snapshots (copies), held until written (train_epochs)."""
    weights, best = None, dict(best)

    def snapshot():
        nonlocal weights
        if weights is None:
            weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        return weights
    if m["train_acc"] > best["train_acc"][1]:
        best["train_acc"] = (epoch, m["train_acc"])
        held.put("best.pth", {"model": snapshot(), "epoch": epoch, "train_acc": m["train_acc"], "config": cfg})
    balanced = balanced_train_acc(m["per_class_acc"].values())
    if balanced > best["balanced_train_acc"][1]:
        best["balanced_train_acc"] = (epoch, balanced)
        if "balanced_train_acc" in cfg["args"].get("keep_selected", SELECT_RULES):
            held.put("best_balanced.pth", {"model": snapshot(), "epoch": epoch, "balanced_train_acc": balanced,
                                           "config": cfg})
    if not last:
        held.drop("last.pth")
        return best
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    sd = optimizer.state_dict()
    opt_state = {"state": {k: {n: t.to("cpu", copy=True) if torch.is_tensor(t) else t for n, t in v.items()}
                           for k, v in sd["state"].items()},
                 "param_groups": copy.deepcopy(sd["param_groups"])}
    held.put("last.pth", {"model": snapshot(), "optimizer": opt_state, "epoch": epoch, "train_acc": m["train_acc"],
                          "best_epoch": best["train_acc"][0], "best_train_acc": best["train_acc"][1],
                          "best_balanced": list(best["balanced_train_acc"]), "rng": rng, "config": cfg})
    return best


class Interrupted(Exception):
    """SIGTERM, turned into an exception so the run can log it and exit cleanly."""


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    run_main(main)
