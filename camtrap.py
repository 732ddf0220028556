"""Camera-trap photos as they come: a detector's output (MegaDetector's batch-output JSON, which
SpeciesNet, Timelapse and AddaxAI read and write too), the animals it found as crops, train/valid
splits that keep a site's or a burst's near-duplicates on one side, and the review page of predict.py.

The detections file is the documented MegaDetector format (lila.science/megadetector-output-format):
    {"detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
     "images": [{"file": "site-a/IMG_0001.JPG",          # relative to the image folder (or absolute)
                 "detections": [{"category": "1", "conf": 0.93, "bbox": [x, y, width, height]}]},
                {"file": "site-a/IMG_0002.JPG", "detections": []},                      # empty
                {"file": "site-b/IMG_0003.JPG", "failure": "Failure image access"}]}    # unread
bbox is normalised to the image's width and height, (x, y) its upper-left corner. Categories other
than animal, person and vehicle count as no detection, as the format says.
"""
import csv
import datetime
import hashlib
import html
import io
import json
import math
import os
import shutil
import urllib.parse

import numpy as np
from PIL import Image, ImageDraw, ImageOps

import data
from utils import UserError, write_text_atomic

# MegaDetector v5's "typical_detection_threshold" (the value its batch files recommend to downstream
# tools, and its documentation's usual starting point for review); 0.05 is its "conservative" one.
MIN_CONF = 0.2
NON_ANIMAL = ("person", "vehicle")          # their statuses, in this order of precedence


# ---------------------------------------------------------------- the detections file

BOX_SLACK = 0.005   # how far past the image's border a normalised box may reach (MegaDetector rounds to 4
                    # decimals); such a box is clipped to the border, any further one refused


def read_detections(path):
    """-> [entry] in the file's order, each {'index': its place in 'images', 'file': as written, 'failure':
    text or None, 'detections': [(index in the entry's list, category name, conf, bbox)]}; UserError
    naming the file, the entry and the field when it is not a MegaDetector batch-output file or holds
    what the format does not allow (a conf outside 0..1, a bbox not normalised to the image)."""
    flag = f"--detections {path}"
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise UserError(f"{flag}: cannot be read ({e.strerror or e})")
    except ValueError as e:
        raise UserError(f"{flag}: not JSON ({e}); give MegaDetector's batch-output file")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("detection_categories"), dict):
        raise UserError(f"{flag}: not a MegaDetector batch-output file (it needs 'images', a list, and "
                        f"'detection_categories', e.g. {{\"1\": \"animal\", \"2\": \"person\", \"3\": \"vehicle\"}})")
    names = {str(k): str(v).strip().lower() for k, v in doc["detection_categories"].items()}
    entries = []
    for n, entry in enumerate(doc["images"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not entry["file"].strip():
            raise UserError(f"{flag}: images[{n}] has no 'file'")
        failure = entry.get("failure")
        dets = entry.get("detections")
        if failure is None and not isinstance(dets, list):
            raise UserError(f"{flag}: images[{n}] ({entry['file']}) has neither a 'detections' list nor a 'failure'")
        found = [read_detection(d, names, f"{flag}: images[{n}] ({entry['file']}) detections[{k}]") + (k,)
                 for k, d in enumerate(dets if failure is None else [])]
        entries.append({"index": n, "file": entry["file"], "failure": None if failure is None else str(failure),
                        "detections": [(k, category, conf, bbox) for category, conf, bbox, k in found]})
    return entries


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_detection(d, names, where):
    """One detection -> (category name, conf, bbox with a hair past the border clipped); UserError
    (where: the file, image entry and detection) for anything else."""
    if not isinstance(d, dict) or "category" not in d or "conf" not in d or "bbox" not in d:
        raise UserError(f"{where} needs 'category', 'conf' and 'bbox' [x, y, width, height]")
    conf, bbox = d["conf"], d["bbox"]
    if not _number(conf) or not 0 <= conf <= 1:
        raise UserError(f"{where} has conf {conf!r}; give the detector's confidence, a number from 0 to 1")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
        raise UserError(f"{where} has bbox {bbox!r}; give [x, y, width, height], four numbers normalised to "
                        f"the image (0..1)")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0 or x < -BOX_SLACK or y < -BOX_SLACK or x + w > 1 + BOX_SLACK or y + h > 1 + BOX_SLACK:
        pixels = " (it looks like pixels: MegaDetector's boxes are fractions of the width and height)" \
            if max(x + w, y + h) > 2 else ""
        raise UserError(f"{where} has bbox {bbox!r}; a box is [x, y, width, height] with a positive width and "
                        f"height, inside the image: each value from 0 to 1, x + width and y + height at most 1"
                        f"{pixels}")
    x, y = max(x, 0.0), max(y, 0.0)
    return names.get(str(d["category"]), "unknown"), float(conf), [x, y, min(w, 1 - x), min(h, 1 - y)]


def resolve_file(name, root):
    """The path on disk of a detections file's 'file' entry: relative to root (with '/' or '\\'
    separators, './' or not) or absolute."""
    name = name.replace("\\", "/")
    return os.path.normpath(name if os.path.isabs(name) else os.path.join(root, name))


def relative_key(path, root):
    """A path's name relative to root, with '/' separators (as the files' tables show it)."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def _real(path):
    return os.path.normcase(os.path.realpath(path))


def match_detections(entries, paths, root, flag):
    """Entries of a detections file matched to the photos of paths by the file each names (relative to
    root or absolute, './', '\\' separators; the case as the file system has it) -> ({path: entry}, [the
    entries that name no photo of paths]). UserError when two entries name one photo (the format has one
    entry per image; merging them could count an animal twice) and when none of them names a photo of
    paths (the detector ran on another folder, or its absolute paths are another machine's)."""
    on_disk, lower = {}, {}
    for p in paths:
        on_disk[_real(p)] = p
        lower.setdefault(_real(p).lower(), []).append(p)
    matched, unmatched, by_photo = {}, [], {}
    for e in entries:
        target = resolve_file(e["file"], root)
        p = on_disk.get(_real(target))
        if p is None and os.path.exists(target):       # another case on a case-insensitive file system
            same = [q for q in lower.get(_real(target).lower(), []) if os.path.samefile(q, target)]
            p = same[0] if len(same) == 1 else None
        if p is None:
            unmatched.append(e)
            continue
        if p in by_photo:
            first = by_photo[p]
            raise UserError(f"{flag}: images[{first['index']}] ({first['file']}) and images[{e['index']}] "
                            f"({e['file']}) are the same photo, {p}; the format has one entry per image. Keep one "
                            f"(a file merged from two runs of the detector would count its animals twice)")
        by_photo[p], matched[p] = e, e
    if entries and paths and not matched:
        e = entries[0]
        raise UserError(f"{flag}: none of its {len(entries)} entries names a photo in {root} (its first, "
                        f"{e['file']!r}, would be {resolve_file(e['file'], root)}; a photo there is "
                        f"{paths[0]}). Give the folder MegaDetector ran on as --images; where it wrote absolute "
                        f"paths of another machine, run it again with --output_relative_filenames")
    return matched, unmatched


CLASSIFIER = "fscl predict.py"      # info.classifier of the files --md_out writes: how it knows its own


def is_own_output(path):
    """Whether path is a detections file with classifications that predict.py --md_out wrote."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return isinstance(doc, dict) and str(doc.get("info", {}).get("classifier", "")).startswith(CLASSIFIER)
    except (OSError, ValueError, AttributeError):
        return False


def write_classified(detections_path, images_root, csv_path, out_path, classes, rule):
    """The detections file again, each classified animal detection of the predictions CSV with its
    'classifications': [[class id, probability], ...] for every class, most probable first (the
    format's convention), 'classification_categories' {id: class} and, in 'info', the classifier,
    the time and the decision rule (which the CSV's 'predicted' column applies: with a threshold it
    can differ from the first classification). Every other field and image as they were. -> the
    number of detections classified."""
    with open(detections_path, encoding="utf-8") as f:
        doc = json.load(f)
    if doc.get("classification_categories"):
        raise UserError(f"--md_out: {detections_path} already holds another classifier's classifications; "
                        f"this one's cannot be added beside them in one file (the format has one category list)")
    with open(csv_path, newline="", encoding="utf-8") as f:
        probs = {(_real(r["path"]), r["detection"]): [float(r[f"prob[{c}]"]) for c in classes]
                 for r in csv.DictReader(f) if r["status"] == "ok" and r.get("detection", "") != ""}
    n = 0
    for entry in doc["images"]:
        real = _real(resolve_file(entry["file"], images_root))
        for k, det in enumerate(entry.get("detections") or []):
            p = probs.get((real, str(k)))
            if p is not None:
                det["classifications"] = sorted(([str(j), round(v, 6)] for j, v in enumerate(p)),
                                                key=lambda c: -c[1])
                n += 1
    info = doc.setdefault("info", {})
    info.setdefault("format_version", "1.4")
    info.update(classifier=f"{CLASSIFIER}: ResNet-18 trained by train.py on {', '.join(classes)}",
                classification_completion_time=datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
                classifier_metadata={"decision_rule": rule, "predictions_csv": os.path.abspath(csv_path)})
    doc["classification_categories"] = {str(j): c for j, c in enumerate(classes)}
    write_text_atomic(out_path, json.dumps(doc, indent=1))
    return n


def image_status(record, min_conf):
    """(animal detections at or above min_conf as [(index, conf, bbox)], status of the image when it
    has none): 'failure: ...' for an image the detector could not read, else 'person' or 'vehicle'
    when one of those is at or above min_conf, else 'empty'."""
    if record["failure"] is not None:
        return [], f"failure: {record['failure']}"
    kept = [d for d in record["detections"] if d[2] >= min_conf]
    animals = [(k, conf, bbox) for k, cat, conf, bbox in kept if cat == "animal"]
    if animals:
        return animals, None
    for name in NON_ANIMAL:
        if any(cat == name for _, cat, _, _ in kept):
            return [], name
    return [], "empty"


def check_min_conf(value):
    if not 0 <= value <= 1:
        raise UserError(f"--min_conf {value}: give a detection confidence between 0 and 1 "
                        f"(MegaDetector v5's typical threshold is {MIN_CONF})")
    return value


# ---------------------------------------------------------------- crops for training

def write_crops(images_root, detections, out, min_conf, classes=None, flag="--detections"):
    """One PNG per animal detection at or above min_conf of every image in the labelled folder
    images_root/<class>/... -> out/<class>/<path below the class, its extension kept>__det<k>.png (the
    crop_box of data.load_image, lossless, so that training sees the pixels prediction does), plus
    out/crops.csv (every image: its crops or why it has none) -> summary dict. Images with no animal
    are listed, not trained on. detections: read_detections' entries, matched to the photos by
    match_detections."""
    classes = classes or data.list_class_folders(images_root)
    images = data.find_class_images(images_root, classes, flag="--images")
    matched, unmatched = match_detections(detections, [p for c in classes for p in images[c]], images_root, flag)
    rows, summary = [], {"images": 0, "crops": 0, "per_class": {c: 0 for c in classes}, "no_animal": {},
                         "not_in_detections": 0, "missing_images": []}
    for c in classes:
        for path in images[c]:
            key = relative_key(path, images_root)
            summary["images"] += 1
            record = matched.get(path)
            if record is None:
                rows.append([key, c, "", "", "", "not in --detections"])
                summary["not_in_detections"] += 1
                continue
            animals, status = image_status(record, min_conf)
            if not animals:
                rows.append([key, c, "", "", "", status])
                summary["no_animal"][status] = summary["no_animal"].get(status, 0) + 1
                continue
            rel = os.path.relpath(path, os.path.join(images_root, c))
            for k, conf, bbox in animals:
                dest = os.path.join(out, c, f"{rel}__det{k}.png")
                try:
                    crop = data.open_rgb(path, bbox)     # load_image's crop, before its resize
                except data.BadImage as e:
                    rows.append([key, c, k, f"{conf:.4f}", "", f"unreadable: {e}"])
                    continue
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                crop.save(dest + ".tmp", format="PNG", exif=photo_exif(path))
                os.replace(dest + ".tmp", dest)
                rows.append([key, c, k, f"{conf:.4f}", os.path.relpath(dest, out).replace(os.sep, "/"), "ok"])
                summary["crops"] += 1
                summary["per_class"][c] += 1
    inside = [os.path.join(os.path.abspath(images_root), c) + os.sep for c in classes]
    summary["missing_images"] = sorted(relative_key(resolve_file(e["file"], images_root), images_root)
                                       for e in unmatched
                                       if any(os.path.abspath(resolve_file(e["file"], images_root)).startswith(d)
                                              for d in inside))
    lines = [["image", "class", "detection", "detection_conf", "crop", "status"], *rows]
    write_text_atomic(os.path.join(out, "crops.csv"), "".join(_csv_line(r) for r in lines))
    return summary


def photo_exif(path):
    """The photo's EXIF for its crops (capture times, for prepare.py split's bursts), without the
    orientation, which the crop already applied -> bytes (empty when none)."""
    try:
        with Image.open(path) as im:
            exif = im.getexif()
            if 0x0112 in exif:
                del exif[0x0112]
            return exif.tobytes() if len(exif) or exif.get_ifd(0x8769) else b""
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return b""


def _csv_line(row):
    buf = io.StringIO()
    csv.writer(buf).writerow(row)
    return buf.getvalue()


# ---------------------------------------------------------------- grouped train/valid split

def capture_time(path):
    """EXIF DateTimeOriginal (else DateTime) of an image as a datetime, or None."""
    try:
        with Image.open(path) as im:
            exif = im.getexif()
            text = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    try:
        return datetime.datetime.strptime(str(text).strip("\x00 "), "%Y:%m:%d %H:%M:%S") if text else None
    except ValueError:
        return None


def groups_of(paths, class_root, by, burst_seconds):
    """{path: group id}. by='burst': images in the same folder whose capture times are at most
    burst_seconds apart (each from the one before it, in time order) are one group; by='folder':
    every folder directly below the class folder (a camera site), with everything below it (its cards,
    its months), is one group, and images directly in the class folder are grouped by burst. An image
    without a capture time is a group of its own."""
    by_dir = {}
    for p in paths:
        by_dir.setdefault(os.path.dirname(p), []).append(p)
    group = {}
    for d, files in sorted(by_dir.items()):
        rel_dir = os.path.relpath(d, class_root).replace(os.sep, "/")
        if by == "folder" and rel_dir != ".":
            group.update({p: f"folder:{rel_dir.split('/')[0]}" for p in files})
            continue
        times = {p: capture_time(p) for p in files}
        timed = sorted((t, p) for p, t in times.items() if t is not None)
        group.update({p: f"file:{relative_key(p, class_root)}" for p, t in times.items() if t is None})
        burst, last = 0, None
        for t, p in timed:
            if last is not None and (t - last).total_seconds() > burst_seconds:
                burst += 1
            group[p] = f"burst:{rel_dir}#{burst}"
            last = t
    return group


def grouped_split(images, fractions, seed, by, burst_seconds, root):
    """{class: [paths]}, {part: fraction} (e.g. {'valid': 0.2, 'calibration': 0.2}) -> ({path: part or
    'train'}, {path: group}, notes). Per class, the groups in one seeded order (numpy PCG64 of (seed,
    class name), as data.subsample) fill each part in turn until it holds at least round(fraction x
    images) (half up, at least 1); the rest go to train. At least one group always stays in train; a
    part left without a group is noted."""
    side, groups, notes = {}, {}, []
    for c, paths in images.items():
        g = groups_of(paths, os.path.join(root, c), by, burst_seconds)
        groups.update(g)
        names = sorted(set(g.values()))
        members = {n: [p for p in paths if g[p] == n] for n in names}
        order = [names[i] for i in data.class_permutation(len(names), seed, c)]
        part_of = {}
        for part, fraction in fractions.items():
            target, count = max(1, math.floor(fraction * len(paths) + 0.5)), 0
            while count < target and len(order) > 1:
                name = order.pop(0)
                part_of[name] = part
                count += len(members[name])
            if count == 0:
                notes.append(f"{c}: no group left for {part} ({len(names)} group(s) of {len(paths)} image(s)); "
                             f"it has no {c} image")
        side.update({p: part_of.get(g[p], "train") for p in paths})
    return side, groups, notes


def link_or_copy(src, dest):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


# ---------------------------------------------------------------- the review page

def count_rows(rows, classes):
    """Rows of a predictions CSV -> ({class: rows predicted it}, {status kind: rows without a class}),
    the kind being the status up to its first ':' ('unreadable', 'failure', 'missing', 'empty', ...)."""
    per_class = {c: sum(r["predicted"] == c for r in rows) for c in classes}
    other = {}
    for r in rows:
        if r["status"] != "ok":
            kind = r["status"].split(":", 1)[0]
            other[kind] = other.get(kind, 0) + 1
    return per_class, other


THUMB = 192     # the thumbnails' longer side in pixels
PAGE_GENERATOR = "predict.py review page"      # in every page's head: how predict.py knows a page as its own


def thumbnail(path, bbox, dest):
    """A small JPEG of what the model classified: the whole photo, or with bbox the detection's crop
    (data.crop_box: a small animal far from the camera is a few pixels of the whole photo), the
    detection's box drawn in it -> True, or False when the photo cannot be read. Kept when it already
    exists."""
    if os.path.isfile(dest):
        return True
    try:
        with Image.open(path) as im:
            if im.width * im.height > data.MAX_PIXELS:
                return False
            if bbox is None:
                im.draft("RGB", (THUMB * 2, THUMB * 2))   # JPEG: decode at a reduced scale, much faster
            im = data._to_rgb(ImageOps.exif_transpose(im))
            if bbox is not None:
                left, top, right, bottom = data.crop_box(im.width, im.height, bbox)
                x, y, w, h = bbox
                ImageDraw.Draw(im).rectangle([x * im.width, y * im.height, (x + w) * im.width - 1,
                                              (y + h) * im.height - 1], outline=(255, 215, 0),
                                             width=max(1, (right - left) // 96))
                im = im.crop((left, top, right, bottom))
            im.thumbnail((THUMB, THUMB))
            im.save(dest + ".tmp", format="JPEG", quality=80)
            os.replace(dest + ".tmp", dest)
            return True
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return False


def rule_text(classes, threshold):
    """The decision rule in words: threshold (CLASS, P) or None (the most probable class)."""
    if threshold is None:
        return "the most probable class"
    return f"{threshold[0]} when P({threshold[0]}) \u2265 {threshold[1]:.4g}, else the most probable other class"


def thumb_name(path, detection, bbox):
    """A thumbnail's file name: a hash of the photo (its path, size and modification time) and of the
    detection's index and box, so that the next card's IMG_0001.JPG, or a changed box, gets its own."""
    try:
        st = os.stat(path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "unread"
    key = f"{os.path.abspath(path)}#{detection}#{json.dumps(bbox)}#{stamp}"
    return hashlib.sha1(key.encode()).hexdigest()[:20] + ".jpg"


def href(path, page_dir):
    """A link from the page to path: relative, its characters URL-encoded (a name with '#', '?' or '%'
    opens that file), then HTML-escaped."""
    rel = os.path.relpath(os.path.abspath(path), page_dir).replace(os.sep, "/")
    return html.escape(urllib.parse.quote(rel, safe="/"))


def review_page(csv_path, html_path, classes, rare, threshold):
    """Write the review page of a predictions CSV -> counts shown on it. Per predicted class a count
    (and the images without an animal, by status, as counts only); then the rare class's candidates,
    every classified row sorted by P(rare), highest first, as lazily loaded thumbnails (in
    <page>_thumbs/ beside it) with the probability under each, each linking to its photo. threshold:
    the rule's (CLASS, P) or None (the most probable class). Where the rule is a cut on P(rare) (a
    threshold on rare, or the most probable of two classes) a line marks where it stops predicting
    rare; otherwise (three or more classes, or a threshold on another class) no single line can, and
    the page says so: the cards predicted rare have a red frame either way."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    page_dir = os.path.dirname(os.path.abspath(html_path))
    thumbs = os.path.splitext(os.path.abspath(html_path))[0] + "_thumbs"
    os.makedirs(thumbs, exist_ok=True)
    ok = [r for r in rows if r["status"] == "ok"]
    per_class, other = count_rows(rows, classes)
    col = f"prob[{rare}]"
    ok.sort(key=lambda r: -float(r[col]))
    rule = html.escape(rule_text(classes, threshold))
    monotone = (threshold[0] == rare) if threshold is not None else len(classes) == 2
    cards, line_drawn = [], not monotone
    for r in ok:
        p, is_rare = float(r[col]), r["predicted"] == rare
        if not is_rare and not line_drawn:
            cards.append(f'<div class="line" id="threshold">decision rule ({rule}): above this line '
                         f'{html.escape(rare)}, below it another class</div>')
            line_drawn = True
        bbox = json.loads(r["bbox"]) if r.get("bbox") else None
        name = thumb_name(r["path"], r.get("detection", ""), bbox)
        thumb_ok = thumbnail(r["path"], bbox, os.path.join(thumbs, name))
        label = html.escape(os.path.basename(r["path"]) + (f" #{r['detection']}" if r.get("detection") else ""))
        img = (f'<img src="{href(os.path.join(thumbs, name), page_dir)}" loading="lazy" alt="{label}">' if thumb_ok
               else '<span class="noimg">no thumbnail</span>')
        cls = "card rare" if is_rare else "card"
        cards.append(f'<a class="{cls}" href="{href(r["path"], page_dir)}" title="{html.escape(r["path"])}">{img}'
                     f'<span class="p">{p:.4f}</span><span class="name">{label}</span>'
                     f'<span class="pred">{html.escape(r["predicted"])}</span></a>')
    if monotone and not line_drawn:
        cards.append('<div class="line" id="threshold">every image above is predicted '
                     f'{html.escape(rare)}</div>')
    note = ("" if monotone else f'<p id="rule">Decision rule: {rule}. With it the predicted class does not follow '
            f'P({html.escape(rare)}) alone, so no line separates the cards: those predicted {html.escape(rare)} '
            f'have a red frame.</p>')
    class_rows = "".join(f'<tr><td>{html.escape(c)}</td><td class="count" data-class="{html.escape(c)}">{n}</td></tr>'
                         for c, n in per_class.items())
    other_rows = "".join(f'<tr><td>{html.escape(s)}</td><td class="count" data-status="{html.escape(s)}">{n}</td></tr>'
                         for s, n in sorted(other.items()))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{PAGE_GENERATOR}"><title>Review: {html.escape(rare)} candidates</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }} td {{ padding: 2px 10px; border-bottom: 1px solid #ddd; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.card {{ display: flex; flex-direction: column; width: {THUMB}px; text-decoration: none; color: #222;
         border: 2px solid #ccc; padding: 2px; font-size: 12px; }}
.card.rare {{ border-color: #d33; }}
.card img {{ width: {THUMB}px; height: {THUMB * 3 // 4}px; object-fit: contain; background: #eee; }}
.p {{ font-weight: bold; }} .name {{ overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }}
.line {{ flex-basis: 100%; border-top: 3px dashed #d33; color: #d33; padding-top: 4px; margin: 6px 0; }}
</style></head><body>
<h1>{html.escape(rare)} candidates</h1>
<p><a href="{href(csv_path, page_dir)}">{html.escape(os.path.relpath(os.path.abspath(csv_path), page_dir))}</a>:
{len(rows)} row(s).</p>
<h2>Predicted classes</h2><table id="classes">{class_rows}</table>
<h2>Without an animal to classify</h2><table id="others">{other_rows or '<tr><td>none</td><td></td></tr>'}</table>
<h2>Sorted by P({html.escape(rare)}), highest first ({len(ok)})</h2>
<p>Red frame: predicted {html.escape(rare)}. With detections a thumbnail is the crop the model classified
(the detector's box in yellow); each thumbnail opens its whole photo.</p>{note}
<div class="grid">
{chr(10).join(cards)}
</div></body></html>
"""
    write_text_atomic(html_path, page)
    return {"per_class": per_class, "other": other, "candidates": len(ok)}
