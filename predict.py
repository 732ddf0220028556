"""Predict the class of new images (e.g. a camera trap's folder) with trained runs.

    python3 predict.py --run saved_runs/proposed/1_0.01/run_3 --images ./new_photos --out predictions.csv

Each run uses its best checkpoint, chosen as validation.py chooses it; with several runs the class
probabilities are averaged (an ensemble). Images are decoded, resized and normalised exactly as in
training and evaluation. --out gets one CSV row per image (path, predicted class, the probability of
every class, status) as they are computed, and a JSON file beside it; running the same command again
continues where it stopped. --threshold CLASS=P, or --calibrate on a labelled folder for a recall
target, sets the decision rule for a rare class; --sort_into copies (hard-links) images by class.

With --detections (MegaDetector's batch-output JSON for the --images folder) each animal detection at
or above --min_conf is classified as a crop of its photo, one row per detection; a photo without one
gets one row with the status empty, person or vehicle (or the detector's failure) and no class.
--html writes a review page: the counts, and the rare class's candidates as thumbnails sorted by its
probability, with the line where the decision rule falls. --md_out writes the detections file again
with each animal's classes added, for the tools that read MegaDetector's format. Every row carries
its site (the first folder below --images) and EXIF capture time. --select picks each run's epoch by
one of validation.py's rules. No output may be an input or another program's file.
"""
import csv
import filecmp
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch
import torchvision
from tqdm import tqdm

import camtrap
import data
from devices import DEVICES, resolve_device
from model import build_trained, use_exact_float32
from runs import SELECT_RULES, RunNotReady, file_sha256, load_best
from utils import (UserError, command_line, decoding_workers, ensure_output_dir, load_checkpoint, run_main,
                   write_json_atomic)

CHUNK = 256   # images decoded, predicted and written at a time: an interruption loses at most these


def get_args_parser():
    p = command_line(__doc__)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", nargs="+", help="one or more run folders (several: probabilities averaged)")
    g.add_argument("--checkpoint", help="a train.py checkpoint file (best.pth or last.pth) instead of a run")
    p.add_argument("--select", default="train_acc", choices=SELECT_RULES, help="the epoch of each --run, as "
                   "validation.py --select: train_acc (the paper's rule: the highest Train Acc), balanced_train_acc "
                   "(the highest mean of the per-class training accuracies: the rare class weighs as much as the "
                   "common one) or last")
    p.add_argument("--images", required=True, help="a folder (searched recursively, hidden files and folders "
                   "skipped) or a text file with one image path per line")
    p.add_argument("--out", required=True, help="CSV file of predictions; a JSON file with the same name beside it")
    p.add_argument("--threshold", help="CLASS=P: predict CLASS whenever its probability is at least P")
    p.add_argument("--calibrate", metavar="LABELLED_DIR", help="an ImageFolder with the runs' classes: choose "
                   "the largest threshold for --rare whose recall there reaches --target_recall")
    p.add_argument("--target_recall", type=float, default=0.95, help="recall target of --calibrate (0.95)")
    p.add_argument("--rare", help="the class --calibrate sets a threshold for")
    p.add_argument("--sort_into", metavar="DIR", help="hard-link (or copy) each readable image into "
                   "DIR/<predicted class>/ (with --detections: into the folder of each class predicted for "
                   "one of its animals, or DIR/empty, person, vehicle); originals are never moved or changed")
    p.add_argument("--detections", metavar="FILE", help="MegaDetector's batch-output JSON for --images (a folder, "
                   "which its 'file' paths are relative to): classify each animal detection as a crop")
    p.add_argument("--min_conf", type=float, default=camtrap.MIN_CONF, help="with --detections: the smallest "
                   "detection confidence kept (MegaDetector v5's typical threshold; 0.05 is its conservative one)")
    p.add_argument("--md_out", metavar="FILE", help="with --detections: write the detections file again with "
                   "every classified animal's class probabilities added in the format's 'classifications' "
                   "(and 'classification_categories', the classifier in 'info'), every other field and image as "
                   "it was: for Timelapse, AddaxAI and the other tools that read MegaDetector's format")
    p.add_argument("--html", metavar="FILE", help="a review page: counts per class, and the candidates of the "
                   "rare class (--rare, or the class of --threshold) as thumbnails sorted by its probability "
                   "(thumbnails in FILE's name + _thumbs/)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto (cuda if available), cpu or cuda")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass (256)")
    p.add_argument("--num_workers", type=int, default=None, help="decoding workers (default: min(8, CPUs))")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32 (default, exact) or bf16")
    return p


# ---------------------------------------------------------------- models

def load_models(args, device):
    """-> [(model, source, epoch)], classes, image sizes: every model in eval mode on device."""
    sources = []
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
            raise UserError(f"--checkpoint {args.checkpoint}: not a train.py checkpoint (needs 'model' and 'config')")
        sources.append((args.checkpoint, ckpt["config"], ckpt))
    else:
        for run_dir in args.run:
            try:
                cfg, ckpt, _, _ = load_best(run_dir, args.select)
            except RunNotReady as e:
                raise UserError(f"--run {run_dir}: {e}")
            sources.append((run_dir, cfg, ckpt))
    classes = sources[0][1]["classes"]
    for src, cfg, _ in sources:
        if cfg["classes"] != classes:
            raise UserError(f"--run: {src} has classes {cfg['classes']}, {sources[0][0]} has {classes}; "
                            f"an ensemble needs the same classes in the same order")
    models = []
    for src, cfg, ckpt in sources:
        model = build_trained(cfg, ckpt["model"])
        model = model.to(device, memory_format=torch.channels_last)         # as validation.py: faster on CPU and CUDA
        models.append((model.eval(), src, ckpt.get("epoch"), cfg["args"]["img_size"], weights_sha256(ckpt["model"])))
    return models, classes


def weights_sha256(state):
    """sha256 of a state_dict's tensors (names, dtypes, shapes and bytes, in key order): which weights
    decided a row, whatever file or folder they came from."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.inference_mode()
def probabilities(models, pixels, device, batch_size, precision):
    """{image size: uint8 (N, 3, S, S)} -> (N, K) class probabilities, averaged over the models."""
    total = None
    for model, _, _, size, _ in models:
        x_all, to_input, out = pixels[size], data.ModelInput(device, channels_last=True), []
        for start in range(0, len(x_all), batch_size):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(to_input(x_all[start:start + batch_size]))
            out.append(torch.softmax(logits.float(), dim=1).cpu())
        p = torch.cat(out).double()                                      # (N, K)
        total = p if total is None else total + p
    return total / len(models)


def predict_paths(paths, models, device, args, workers, progress=None):
    """Yield (item, probabilities (K,) or None, status) for items (paths, or (path, box) crops) in order,
    CHUNK at a time. Each image size the models need is decoded by one stream of parallel workers for
    the whole job."""
    sizes = sorted({m[3] for m in models})
    streams = {s: iter(data.decode_batches(paths, s, batch_size=CHUNK, num_workers=workers)) for s in sizes}
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start:start + CHUNK]
        pixels, status = {}, {}
        for size in sizes:
            batch = next(streams[size])                      # [(index in paths, (S, S, 3) uint8 or None, reason)]
            status.update({i: why for i, arr, why in batch if arr is None})
            good = [torch.from_numpy(arr).permute(2, 0, 1) for _, arr, _ in batch if arr is not None]
            pixels[size] = torch.stack(good) if good else None   # (n_good, 3, S, S)
        good = [i for i in range(start, start + len(chunk)) if i not in status]
        probs = probabilities(models, pixels, device, args.batch_size, args.precision) if good else None
        row = {i: k for k, i in enumerate(good)}
        for i, path in enumerate(chunk, start):
            yield (path, probs[row[i]].numpy(), "ok") if i in row else (path, None, f"unreadable: {status[i]}")
        if progress is not None:
            progress.update(len(chunk))


# ---------------------------------------------------------------- decision rule

def parse_threshold(text, classes):
    cls, _, value = (text or "").rpartition("=")         # a class name may hold '='; a probability cannot
    try:
        p = float(value)
    except ValueError:
        p = float("nan")
    if cls not in classes or not 0 <= p <= 1:
        raise UserError(f"--threshold {text!r}: give CLASS=P with CLASS one of {', '.join(classes)} and 0 <= P <= 1")
    return cls, p


def decide(probs, classes, threshold):
    """The predicted class: with threshold (CLASS, P), CLASS when its probability is at least P, else
    the most probable other class; without, the most probable class."""
    if threshold is None:
        return classes[int(np.argmax(probs))]
    k = classes.index(threshold[0])
    if probs[k] >= threshold[1]:
        return threshold[0]
    others = [j for j in range(len(classes)) if j != k]
    return classes[max(others, key=lambda j: probs[j])]


def calibrate(folder, rare, target, models, classes, device, args, workers):
    """The largest threshold on P(rare) whose recall for rare on the labelled folder reaches target;
    -> dict with the threshold, its recall and precision there, and the counts."""
    images = data.find_class_images(folder, classes, flag="--calibrate")
    paths = [p for c in classes for p in images[c]]
    labels = [k for k, c in enumerate(classes) for _ in images[c]]
    k = classes.index(rare)
    scores, truth = [], []
    for (path, probs, status), y in zip(predict_paths(paths, models, device, args, workers), labels):
        if probs is not None:
            scores.append(probs[k])
            truth.append(y == k)
    scores, truth = np.array(scores), np.array(truth, dtype=bool)
    if not truth.any():
        raise UserError(f"--calibrate {folder}: no readable image of {rare!r} there; recall cannot be measured")
    chosen = threshold_for_recall(scores, truth, target)
    return ({"class": rare, **chosen, "target_recall": target, "n_images": int(len(scores)),
             "n_rare": int(truth.sum()), "folder": os.path.abspath(folder)}, scores, truth)


def threshold_for_recall(scores, truth, target):
    """The largest threshold t such that flagging every score >= t finds at least target of the true
    images, with the recall and precision it gives -> {'threshold', 'recall', 'precision'}.

    With n true images, t must flag need = ceil(target n) of them: t is the need-th highest true score
    (ties flag every image at t, so the recall can exceed the target). target n is rounded to 9
    decimals before the ceiling, so that a product such as 0.07 x 100 = 7.000000000000001 asks for 7.
    scores (N,) float, truth (N,) bool with at least one True, 0 < target <= 1."""
    true_scores = np.sort(scores[truth])[::-1]                               # highest first
    need = max(1, math.ceil(round(target * len(true_scores), 9)))
    t = float(true_scores[need - 1])
    flagged = scores >= t
    tp = int((flagged & truth).sum())
    return {"threshold": t, "recall": tp / len(true_scores), "precision": tp / int(flagged.sum())}


def threshold_figure(scores, truth, result, path):
    """Precision and recall of the rare class on the labelled folder against the threshold, with the
    chosen threshold marked -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ts = np.linspace(0, 1, 201)
    flagged = scores[None, :] >= ts[:, None]                                  # (T, N)
    tp = (flagged & truth[None, :]).sum(1)
    recall = tp / max(1, truth.sum())
    precision = np.where(flagged.sum(1) > 0, tp / np.maximum(1, flagged.sum(1)), np.nan)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ts, recall, label="recall")
    ax.plot(ts, precision, label="precision")
    ax.axvline(result["threshold"], color="grey", ls="--",
               label=f"chosen {result['threshold']:.3f} (recall {result['recall']:.2f})")
    ax.axvline(0.5, color="black", lw=0.5, ls=":", label="0.5 (argmax, 2 classes)")
    ax.set_xlabel(f"threshold on P({result['class']})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{result['class']}: {result['n_rare']} of {result['n_images']} labelled images")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- inputs and outputs

def list_inputs(spec):
    if os.path.isdir(spec):
        return data.list_images(spec)
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    raise UserError(f"--images {spec}: neither a folder nor a text file of paths")


def plan_rows(paths, args):
    """The rows to write, in order: [(key, item to classify or None, fixed cells)]. Without
    --detections one per image (key: the path). With, one per animal detection at or above --min_conf
    (key: path and detection index; item: (path, box)), and one per other image with its status: empty,
    person, vehicle, the detector's failure, 'not in --detections' for an image of the folder the file
    does not name, 'missing' for a file it names that is not in the folder."""
    if not args.detections:
        return [((p, ""), p, {}) for p in paths]
    if not os.path.isdir(args.images):
        raise UserError(f"--detections needs --images to be the folder the detector ran on (its 'file' paths are "
                        f"relative to it); {args.images} is not a folder")
    entries = camtrap.read_detections(args.detections)
    matched, unmatched = camtrap.match_detections(entries, paths, args.images, f"--detections {args.detections}")
    planned = []
    for path in paths:
        record = matched.get(path)
        if record is None:
            planned.append(((path, ""), None, {"status": "not in --detections"}))
            continue
        animals, status = camtrap.image_status(record, args.min_conf)
        if not animals:
            planned.append(((path, ""), None, {"status": status}))
        for k, conf, bbox in animals:
            planned.append(((path, str(k)), (path, bbox), {"detection": str(k), "bbox": json.dumps(bbox),
                                                           "detection_conf": f"{conf:.4f}"}))
    for e in unmatched:
        planned.append(((camtrap.resolve_file(e["file"], args.images), ""), None,
                        {"status": "missing: not in --images"}))
    return planned


def output_paths(args):
    """{what: path} of every file predict.py writes (not the folders)."""
    out = os.path.abspath(args.out)
    found = {"--out": out, "the JSON beside --out": os.path.splitext(out)[0] + ".json"}
    if args.calibrate:
        found["the calibration figure"] = os.path.splitext(out)[0] + "_threshold.png"
    if args.html:
        found["--html"] = os.path.abspath(args.html)
    if args.md_out:
        found["--md_out"] = os.path.abspath(args.md_out)
    return found


def own_outputs_left_out(paths, args):
    """The input images without those predict.py wrote itself into the --images folder: its
    thumbnails (--html's _thumbs folder) and the images it sorted (--sort_into), which a re-run would
    otherwise classify too."""
    mine = [os.path.realpath(d) + os.sep for d in
            ([os.path.splitext(os.path.abspath(args.html))[0] + "_thumbs"] if args.html else [])
            + ([args.sort_into] if args.sort_into else [])]
    return [p for p in paths if not any(os.path.realpath(p).startswith(d) for d in mine)]


def check_outputs(args, paths):
    """Refuse, before anything is written, an output that is an input (the detections file, the list
    of images, the checkpoint, a photo), that is another output, or that exists and is another
    program's file (only predict.py's own JSON record and review page are rewritten)."""
    outputs = output_paths(args)
    if os.path.splitext(outputs["--out"])[1].lower() == ".json":
        raise UserError(f"--out {args.out}: give a .csv name; the JSON record beside it takes the same name with "
                        f".json, which would be this file")
    inputs = {"--detections": args.detections, "--checkpoint": args.checkpoint,
              "--images": args.images if os.path.isfile(args.images) else None}
    photos = {os.path.normcase(os.path.realpath(p)) for p in paths}
    seen = {}
    for what, path in outputs.items():
        real = os.path.normcase(os.path.realpath(path))
        for flag, given in inputs.items():
            if given and os.path.exists(given) and os.path.exists(path) and os.path.samefile(given, path):
                raise UserError(f"{what} would be {path}, the file given to {flag}; give outputs other names "
                                f"(e.g. --out {os.path.splitext(args.out)[0]}_predictions.csv)")
        if real in photos:
            raise UserError(f"{what} would be {path}, one of the images to classify; give it another name")
        if real in seen:
            raise UserError(f"{what} and {seen[real]} would both be {path}; give them different names")
        seen[real] = what
    meta = outputs["the JSON beside --out"]
    if os.path.isfile(meta) and not is_own_record(meta):
        raise UserError(f"--out {args.out}: its JSON record would be {meta}, which exists and is not predict.py's "
                        f"(another program's file is never overwritten); give --out another name")
    if args.md_out and not args.detections:
        raise UserError("--md_out writes the detections file with classifications added: give --detections too")
    if args.md_out and os.path.isfile(args.md_out) and not camtrap.is_own_output(args.md_out):
        raise UserError(f"--md_out {args.md_out} exists and was not written by predict.py; give another name "
                        f"(another program's file is never overwritten)")
    if args.html and os.path.isfile(args.html) and not is_own_page(args.html):
        raise UserError(f"--html {args.html} exists and is not a review page of predict.py; give another name "
                        f"(another program's file is never overwritten)")


def is_own_record(path):
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return isinstance(doc, dict) and {"csv", "classes", "models"} <= set(doc)
    except (OSError, ValueError):
        return False


def is_own_page(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
        return camtrap.PAGE_GENERATOR in head or ('id="classes"' in head and "candidates</title>" in head)
    except OSError:
        return False


def row_key(path, detection=""):
    """A row's identity, whatever spelling of the --images folder it was listed under."""
    return os.path.normcase(os.path.realpath(path)), detection


def done_paths(out, header):
    """Keys (row_key) of the rows already in the CSV (an earlier, interrupted run of the same command).
    The file is first recognised as predict.py's predictions with these columns (its first line is
    their header), and left untouched otherwise; then a last line cut off by the interruption is
    removed, so that no row is ever written twice."""
    if not os.path.isfile(out) or os.path.getsize(out) == 0:
        return set()
    with open(out, "rb") as f:
        content = f.read()
    first = content.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        found = next(csv.reader([first.decode("utf-8")]))
    except (UnicodeDecodeError, csv.Error, StopIteration):
        found = None
    if found != header:
        what = (f"holds predictions with other columns ({', '.join(found)})" if found and found[0] == "path"
                else "is not a predictions CSV of predict.py (its first line is not the header "
                     f"{','.join(header[:2])},...)")
        raise UserError(f"--out {out} {what}; it was left as it is. Give a new --out for these predictions")
    if not content.endswith(b"\n"):
        with open(out, "rb+") as f:
            f.truncate(content.rfind(b"\n") + 1)
    with open(out, newline="", encoding="utf-8") as f:
        return {row_key(row["path"], row.get("detection", "")) for row in csv.DictReader(f)}


def sort_into(folder, path, label):
    """Hard-link (else copy) path into folder/label/, keeping its name; a clash with another file gets
    _1, _2, ... A destination that already is this image (its hard link, or a copy with the same bytes,
    left by a job interrupted between sorting an image and writing its row) is kept as it is."""
    dest_dir = os.path.join(folder, label)
    os.makedirs(dest_dir, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    dest, n = os.path.join(dest_dir, stem + ext), 0
    while os.path.exists(dest):
        if os.path.samefile(path, dest) or filecmp.cmp(path, dest, shallow=False):
            return dest
        n += 1
        dest = os.path.join(dest_dir, f"{stem}_{n}{ext}")
    try:
        os.link(path, dest)
    except OSError:
        shutil.copy2(path, dest)
    return dest


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    use_exact_float32()
    device = resolve_device(args.device)
    workers = decoding_workers(args.num_workers)
    paths = own_outputs_left_out(list_inputs(args.images), args)
    check_outputs(args, paths)
    ensure_output_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    if args.sort_into:
        ensure_output_dir(args.sort_into, "--sort_into")
    models, classes = load_models(args, device)
    threshold, calibration = parse_threshold(args.threshold, classes) if args.threshold else None, None
    if args.calibrate:
        if args.rare not in classes or not 0 < args.target_recall <= 1:
            raise UserError(f"--calibrate needs --rare (one of {', '.join(classes)}) and 0 < --target_recall <= 1")
        calibration, scores, truth = calibrate(args.calibrate, args.rare, args.target_recall, models, classes,
                                               device, args, workers)
        calibration["figure"] = os.path.abspath(os.path.splitext(args.out)[0] + "_threshold.png")
        threshold_figure(scores, truth, calibration, calibration["figure"])
        threshold = (args.rare, calibration["threshold"])
        print(f"calibrated on {args.calibrate}: P({args.rare}) >= {calibration['threshold']:.4f} gives recall "
              f"{calibration['recall']:.3f} (target {args.target_recall}) at precision {calibration['precision']:.3f}; "
              f"figure: {calibration['figure']}")
    if args.detections:
        camtrap.check_min_conf(args.min_conf)
    rare = args.rare or (threshold[0] if threshold else None)
    if args.html and rare not in classes:
        raise UserError(f"--html needs the rare class whose candidates it shows: give --rare CLASS (one of "
                        f"{', '.join(classes)}) or --threshold CLASS=P")
    planned = plan_rows(paths, args)
    rule = decision_rule(args, models, threshold, calibration)
    extra = ["detection", "bbox", "detection_conf"] if args.detections else []
    header = ["path", "site", "capture_time", *extra, "predicted", *(f"prob[{c}]" for c in classes), "status"]
    meta_path = os.path.splitext(args.out)[0] + ".json"
    done = done_paths(args.out, header)
    if done:
        check_same_rule(args.out, meta_path, rule, len(done))
    todo = [row for row in planned if row_key(*row[0]) not in done]
    new_file = not os.path.isfile(args.out) or os.path.getsize(args.out) == 0
    meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "csv": os.path.abspath(args.out), "classes": classes,
            **rule, "calibration": calibration, "images": os.path.abspath(args.images),
            "detections_file": os.path.abspath(args.detections) if args.detections else None,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()}
    if not done:
        write_json_atomic(meta_path, {**meta, "finished": False})    # the rule is on disk before any row
    with open(args.out, "a", newline="", encoding="utf-8") as f, \
            tqdm(total=len(todo), desc="predict", disable=None, file=sys.stderr) as bar:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(header)
        for (path, _), probs, cells in classified(todo, models, device, args, workers, bar):
            label = decide(probs, classes, threshold) if probs is not None else ""
            if args.sort_into and (probs is not None or cells["status"] in ("empty", *camtrap.NON_ANIMAL)):
                sort_into(args.sort_into, path, label or cells["status"])   # before its row: a row means sorted
            writer.writerow([path, site_of(path, args.images), capture_text(path), *(cells.get(c, "") for c in extra),
                             label, *(f"{v:.6f}" for v in (probs if probs is not None else [])),
                             *([""] * len(classes) if probs is None else []), cells["status"]])
            f.flush()
    counts = summarise(args.out, classes, len(done))
    if args.md_out:
        n = camtrap.write_classified(args.detections, args.images, args.out, args.md_out, classes,
                                          {**rule, "threshold": meta["threshold"]})
        counts["md_out"] = {"path": os.path.abspath(args.md_out), "classified_detections": n}
        print(f"{args.md_out}: {n} animal detection(s) classified, in MegaDetector's format")
    if args.html:
        shown = camtrap.review_page(args.out, args.html, classes, rare, threshold)
        counts["html"] = os.path.abspath(args.html)
        print(f"review page: {args.html} ({shown['candidates']} candidate(s) for {rare})")
    write_json_atomic(meta_path, {**meta, "finished": True, "counts": counts})


def classified(todo, models, device, args, workers, progress):
    """Yield (key, probabilities or None, cells) for the planned rows in order: rows with an item to
    classify through predict_paths, the others with their fixed status."""
    items = [item for _, item, _ in todo if item is not None]
    stream = predict_paths(items, models, device, args, workers)
    for key, item, cells in todo:
        if item is None:
            yield key, None, cells
        else:
            _, probs, status = next(stream)
            yield key, probs, {**cells, "status": status}
        progress.update(1)


def decision_rule(args, models, threshold, calibration):
    """Everything that decides a row of the CSV: the models (where from, which epoch, the sha256 of
    their weights, their image size), the threshold, the calibration that chose it, the precision."""
    return {"models": [{"source": os.path.abspath(src), "epoch": epoch, "img_size": size, "weights_sha256": sha}
                       for _, src, epoch, size, sha in models],
            "threshold": {"class": threshold[0], "p": threshold[1]} if threshold else None,
            "calibration_rule": ({"folder": calibration["folder"], "rare": calibration["class"],
                             "target_recall": calibration["target_recall"]} if calibration else None),
            "precision": args.precision, "select": None if args.checkpoint else args.select,
            "detections": ({"sha256": file_sha256(args.detections), "min_conf": args.min_conf}
                           if args.detections else None)}


def check_same_rule(out, meta_path, rule, n_done):
    """A CSV that already holds rows is continued only under the rule that made them (recorded in the
    JSON beside it when the CSV was created); UserError naming what differs otherwise."""
    try:
        with open(meta_path, encoding="utf-8") as f:
            recorded = json.load(f)
        recorded = {k: recorded.get(k) if k == "detections" else recorded[k]
                    for k in ("models", "threshold", "calibration_rule", "precision", "detections")}
        recorded["select"] = recorded_select(recorded, meta_path)
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--out {out} already holds {n_done} prediction(s), but {meta_path} does not record the "
                        f"models, threshold and precision that made them, so they cannot be continued under this "
                        f"command's; give a new --out (or delete {out} to start again)")
    diff = rule_differences(recorded, rule)
    if diff:
        raise UserError(f"--out {out} already holds {n_done} prediction(s) made under another decision rule "
                        f"({'; '.join(diff)}; recorded vs now); continuing would mix the two in one file. Give a "
                        f"new --out for this rule (or delete {out} to start again)")


def recorded_select(recorded, meta_path):
    """The rule of model selection a record was made under (records before --select: the paper's)."""
    with open(meta_path, encoding="utf-8") as f:
        doc = json.load(f)
    return doc.get("select", None if recorded["models"] and recorded["models"][0]["source"].endswith(".pth")
                   else "train_acc")


def rule_differences(a, b, prefix=""):
    """'key: A vs B' for every leaf where two nested rule dicts (or lists) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in dict.fromkeys([*a, *b]) for d in rule_differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in rule_differences(x, y, f"{prefix}{i}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} vs {b!r}"]


def site_of(path, images):
    """The photo's site: the first folder below the --images folder (as prepare.py split --by folder
    groups); empty for a photo directly in it, outside it, or with a list of paths as --images."""
    if not os.path.isdir(images):
        return ""
    rel = camtrap.relative_key(path, images)
    return rel.split("/", 1)[0] if "/" in rel and not rel.startswith("../") else ""


def capture_text(path):
    """The photo's EXIF capture time as YYYY-MM-DD HH:MM:SS, empty when it has none (or is not there)."""
    t = camtrap.capture_time(path) if os.path.isfile(path) else None
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else ""


def summarise(out, classes, resumed):
    """Print and return the CSV's counts: rows, per predicted class, and per status of the rows
    without a class (empty, person, vehicle, failure, unreadable, ...), in all and per site."""
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    counts, status = camtrap.count_rows(rows, classes)
    per_site = {}
    for site in sorted({r["site"] for r in rows}):
        c, s = camtrap.count_rows([r for r in rows if r["site"] == site], classes)
        per_site[site] = {"per_class": c, "without_class": s}
    what = "row(s) (detections and images)" if rows and "detection" in rows[0] else "image(s)"
    print(f"{len(rows)} {what} in {out}" + (f" ({resumed} from an earlier run)" if resumed else "") + ": "
          + ", ".join(f"{c} {n}" for c, n in counts.items())
          + f"; {status.get('unreadable', 0)} could not be read"
          + "".join(f"; {k} {n}" for k, n in sorted(status.items()) if k != "unreadable"))
    for r in [r for r in rows if r["status"] != "ok"
              and r["status"].split(":", 1)[0] in ("unreadable", "failure", "missing")][:20]:
        print(f"  {r['path']}: {r['status']}")
    return {"rows": len(rows), "per_class": counts, "without_class": status, "per_site": per_site}


if __name__ == "__main__":
    run_main(main, interrupted="interrupted: the rows written so far are kept; run the same command again to "
                               "continue")
