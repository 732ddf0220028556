"""Prepare one's own labelled camera-trap photos for train.py: the animals a detector found as crops,
and a train/valid split that keeps near-duplicates on one side.

    python3 prepare.py crops --images labelled/ --detections labelled_md.json --out crops/
    python3 prepare.py split --images crops/ --out my_data/ --valid_fraction 0.2 --by folder

crops: labelled/<class>/... plus MegaDetector's batch-output JSON for that folder -> crops/<class>/...,
one PNG per animal detection at or above --min_conf, cut exactly as predict.py --detections cuts the
photos it classifies (a square around the box with a 10% margin), so that training and prediction see
animals the same way. crops/crops.csv lists every photo: its crops, or why it has none (empty,
person, vehicle, the detector's failure, not in the detections file); those are not trained on.

split: a labelled folder -> out/train/<class>/, out/valid/<class>/ and, with --calibration_fraction,
out/calibration/<class>/ (hard links, else copies),
seeded, keeping groups whole: frames of one burst (EXIF capture times at most --burst_seconds apart
in one folder) and, with --by folder, every folder directly below a class folder with all below it
(e.g. one per camera site, whatever cards or months it holds). Photos
of one burst or site are near-duplicates; split across train and valid they make every accuracy and
every calibrated threshold optimistic. out/split.csv records each image's group and side.
"""
import csv
import os
import sys

import camtrap
import data
from utils import UserError, command_line, ensure_output_dir, run_main, write_json_atomic


def get_args_parser():
    p = command_line(__doc__)
    sub = p.add_subparsers(dest="job", required=True, metavar="{crops,split}")
    c = sub.add_parser("crops", help="crops of the animals a detector found, as an ImageFolder",
                       formatter_class=p.formatter_class, allow_abbrev=False)
    c.add_argument("--images", required=True, help="labelled folder: <class>/... images")
    c.add_argument("--detections", required=True, help="MegaDetector's batch-output JSON for --images")
    c.add_argument("--out", required=True, help="new folder for <class>/<crop>.png and crops.csv")
    c.add_argument("--min_conf", type=float, default=camtrap.MIN_CONF,
                   help="the smallest detection confidence kept (MegaDetector v5's typical threshold)")
    c.add_argument("--classes", nargs="+", default=None, help="class folders to use (default: all)")
    s = sub.add_parser("split", help="a grouped, seeded train/valid split of a labelled folder",
                       formatter_class=p.formatter_class, allow_abbrev=False)
    s.add_argument("--images", required=True, help="labelled folder: <class>/... images (photos or crops)")
    s.add_argument("--out", required=True, help="new folder for train/<class>/, valid/<class>/ and split.csv")
    s.add_argument("--valid_fraction", type=float, default=0.2, help="share of each class's images for valid "
                   "(reached or passed by whole groups)")
    s.add_argument("--calibration_fraction", type=float, default=0.0, help="share for a third part, out/calibration/: "
                   "labelled images apart from valid for predict.py --calibrate (0: none)")
    s.add_argument("--by", choices=("burst", "folder"), default="burst", help="burst: frames at most "
                   "--burst_seconds apart in one folder stay together; folder: each folder directly below a "
                   "class folder (a camera site), with every folder below it (its cards, its months), stays "
                   "together, images directly in the class folder by burst")
    s.add_argument("--burst_seconds", type=float, default=10.0, help="largest gap between two frames of a burst")
    s.add_argument("--seed", type=int, default=0, help="which groups go to valid")
    s.add_argument("--classes", nargs="+", default=None, help="class folders to use (default: all)")
    return p


def new_output_dir(path):
    if os.path.isdir(path) and any(not n.startswith(".") for n in os.listdir(path)):
        raise UserError(f"--out {path} already holds files; give a new or empty folder (nothing there is changed)")
    return ensure_output_dir(path, "--out")


def crops(args):
    camtrap.check_min_conf(args.min_conf)
    detections = camtrap.read_detections(args.detections)
    new_output_dir(args.out)
    summary = camtrap.write_crops(args.images, detections, args.out, args.min_conf, args.classes,
                                  f"--detections {args.detections}")
    summary.update({"images_root": os.path.abspath(args.images), "detections": os.path.abspath(args.detections),
                    "min_conf": args.min_conf, "margin": data.CROP_MARGIN})
    write_json_atomic(os.path.join(args.out, "crops.json"), summary)
    skipped = sum(summary["no_animal"].values()) + summary["not_in_detections"]
    why = [f"{k} {n}" for k, n in sorted(summary["no_animal"].items())]
    why += [f"not in --detections {summary['not_in_detections']}"] if summary["not_in_detections"] else []
    print(f"{summary['crops']} crop(s) of {summary['images']} photo(s) in {args.out}: "
          + ", ".join(f"{c} {n}" for c, n in summary["per_class"].items())
          + f"; {skipped} photo(s) without an animal at or above {args.min_conf} not used"
          + (f" ({', '.join(why)})" if why else "") + f": listed in {os.path.join(args.out, 'crops.csv')}")
    if summary["missing_images"]:
        print(f"{len(summary['missing_images'])} file(s) of --detections are not in --images, e.g. "
              + ", ".join(summary["missing_images"][:5]))


def split(args):
    if not 0 < args.valid_fraction < 1 or not 0 <= args.calibration_fraction < 1 \
            or args.valid_fraction + args.calibration_fraction >= 1:
        raise UserError(f"--valid_fraction {args.valid_fraction} and --calibration_fraction "
                        f"{args.calibration_fraction}: give shares above 0 (calibration: 0 or more) whose sum is "
                        f"below 1, e.g. 0.2 and 0.2")
    if args.seed < 0 or args.burst_seconds < 0:
        raise UserError("--seed and --burst_seconds must be 0 or more")
    classes = args.classes or data.list_class_folders(args.images)
    images = data.find_class_images(args.images, classes, flag="--images")
    fractions = {"valid": args.valid_fraction, **({"calibration": args.calibration_fraction}
                                                  if args.calibration_fraction else {})}
    parts = ["train", *fractions]
    side, groups, notes = camtrap.grouped_split(images, fractions, args.seed, args.by, args.burst_seconds,
                                                args.images)
    new_output_dir(args.out)
    rows = [["image", "class", "group", "side"]]
    counts = {c: {k: v for part in parts for k, v in ((part, 0), ("groups_" + part, set()))} for c in classes}
    for c in classes:
        for path in images[c]:
            rel = os.path.relpath(path, os.path.join(args.images, c))
            camtrap.link_or_copy(path, os.path.join(args.out, side[path], c, rel))
            rows.append([camtrap.relative_key(path, args.images), c, groups[path], side[path]])
            counts[c][side[path]] += 1
            counts[c]["groups_" + side[path]].add(groups[path])
    with open(os.path.join(args.out, "split.csv"), "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    summary = {c: {k: len(n) if isinstance(n, set) else n for k, n in v.items()} for c, v in counts.items()}
    write_json_atomic(os.path.join(args.out, "split.json"), {
        "images_root": os.path.abspath(args.images), "valid_fraction": args.valid_fraction,
        "calibration_fraction": args.calibration_fraction, "by": args.by,
        "burst_seconds": args.burst_seconds, "seed": args.seed, "classes": summary, "notes": notes})
    for c, v in summary.items():
        print(f"{c}: " + ", ".join(f"{part} {v[part]} image(s) in {v['groups_' + part]} group(s)" for part in parts))
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print("  ".join(f"{part}: {os.path.join(args.out, part)}" for part in parts))


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    (crops if args.job == "crops" else split)(args)


if __name__ == "__main__":
    run_main(main)
