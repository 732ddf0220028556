"""MegaDetector's output as MegaDetector writes it, and nothing a user gave lost: the paths it writes,
the boxes and confidences the format allows, outputs that would overwrite an input or another
program's file, re-runs, the split by site, crops of photos that share a name, the review page's
markup, thumbnails and decision-rule line."""
import json
import os
import struct
import subprocess
import sys
import zlib

import pytest

import camtrap
import predict
import prepare
from conftest import ROOT
from test_camtrap import detections_file, photo, rows
from utils import UserError, run_main

RED, BLUE = (200, 60, 40), (40, 60, 200)
ANIMAL = {"category": "1", "conf": 0.9, "bbox": [0.2, 0.2, 0.4, 0.5]}


@pytest.fixture
def small_card(tmp_path):
    """card/site-1/a.jpg, card/site-1/b.jpg, card/site-2/c.jpg, each with one animal."""
    root = tmp_path / "card"
    for i, n in enumerate(("site-1/a.jpg", "site-1/b.jpg", "site-2/c.jpg")):
        photo(root / n, RED if i % 2 else BLUE, size=(80, 60), seed=i)
    return root


def run_predict(runs, root, out, *extra):
    predict.main(["--run", runs["proposed"], "--images", str(root), "--out", str(out), "--num_workers", "0", *extra])
    return rows(out)


def snapshot(*paths):
    return [open(p, "rb").read() for p in paths]


# ---------------------------------------------------------------- 1, 2: no input or foreign file overwritten

def test_an_output_that_is_an_input_or_another_output_is_refused_before_anything_is_written(four_variants,
                                                                                         small_card, tmp_path):
    _, runs = four_variants
    md = detections_file(tmp_path / "new_photos.json", [{"file": "site-1/a.jpg", "detections": [ANIMAL]}])
    before = snapshot(md, small_card / "site-1" / "a.jpg")
    cases = [(["--detections", md, "--out", str(tmp_path / "new_photos.csv")], "--detections"),
             (["--out", str(tmp_path / "preds.json")], "give a .csv name"),
             (["--out", str(small_card / "site-1" / "a.jpg")], "one of the images to classify"),
             (["--out", str(tmp_path / "p.csv"), "--html", str(tmp_path / "p.json"), "--rare", "roe-deer"],
              "would both be")]
    for extra, message in cases:
        argv = ["--run", runs["proposed"], "--images", str(small_card), *extra]
        if "--out" not in extra:
            argv += ["--out", str(tmp_path / "x.csv")]
        with pytest.raises(UserError, match=message):
            predict.main(argv)
    assert snapshot(md, small_card / "site-1" / "a.jpg") == before
    assert not (tmp_path / "new_photos.csv").exists() and not (tmp_path / "preds.json").exists()


def test_an_existing_file_that_is_not_predict_pys_is_left_as_it_was(four_variants, small_card, tmp_path):
    """A user's own CSV whose last line has no newline, a JPEG, a JSON of another program beside --out,
    an HTML page of another program: refused, byte for byte unchanged."""
    _, runs = four_variants
    mine = tmp_path / "counts.csv"
    mine.write_text("site,count\nsite-1,3")                                    # no newline at the end
    jpeg = photo(tmp_path / "elsewhere" / "keep.jpg", RED)
    other = tmp_path / "report.csv"
    (tmp_path / "report.json").write_text('{"species": ["roe deer"]}')
    page = tmp_path / "index.html"
    page.write_text("<html><body>my notes</body></html>")
    before = snapshot(mine, jpeg, tmp_path / "report.json", page)
    for out, extra, message in ((mine, [], "not a predictions CSV"), (jpeg, [], "not a predictions CSV"),
                                (other, [], "not predict.py's"),
                                (tmp_path / "q.csv", ["--html", str(page), "--rare", "roe-deer"], "not a review page")):
        with pytest.raises(UserError, match=message):
            run_predict(runs, small_card, out, *extra)
    assert snapshot(mine, jpeg, tmp_path / "report.json", page) == before
    out = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), "--run", runs["proposed"], "--images",
                          str(small_card), "--out", str(jpeg)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "not a predictions CSV" in out.stderr


# ---------------------------------------------------------------- 3: MegaDetector's own paths

def test_absolute_dot_and_backslash_paths_give_one_row_per_detection_and_crops_for_every_animal(four_variants,
                                                                                               small_card, tmp_path):
    """MegaDetector writes absolute paths unless told otherwise; './' and Windows separators occur too."""
    _, runs = four_variants
    md = detections_file(tmp_path / "md.json", [
        {"file": str(small_card / "site-1" / "a.jpg"), "detections": [ANIMAL]},
        {"file": "./site-1/b.jpg", "detections": [ANIMAL, {**ANIMAL, "bbox": [0.6, 0.1, 0.3, 0.3]}]},
        {"file": "site-2\\c.jpg", "detections": []}])
    got = run_predict(runs, small_card, tmp_path / "p.csv", "--detections", md)
    keys = sorted((os.path.relpath(r["path"], small_card), r["detection"], r["status"]) for r in got)
    assert keys == [(os.path.join("site-1", "a.jpg"), "0", "ok"), (os.path.join("site-1", "b.jpg"), "0", "ok"),
                    (os.path.join("site-1", "b.jpg"), "1", "ok"), (os.path.join("site-2", "c.jpg"), "", "empty")]
    labelled = tmp_path / "labelled" / "roe-deer"
    os.makedirs(labelled)
    for n in ("a.jpg", "b.jpg"):
        os.link(small_card / "site-1" / n, labelled / n)
    md2 = detections_file(tmp_path / "md2.json", [
        {"file": str(labelled / "a.jpg"), "detections": [ANIMAL]},
        {"file": ".\\roe-deer\\b.jpg", "detections": [ANIMAL, {**ANIMAL, "bbox": [0.6, 0.1, 0.3, 0.3]}]}])
    prepare.main(["crops", "--images", str(tmp_path / "labelled"), "--detections", md2, "--out", str(tmp_path / "c")])
    assert sorted(os.listdir(tmp_path / "c" / "roe-deer")) == ["a.jpg__det0.png", "b.jpg__det0.png", "b.jpg__det1.png"]


def test_megadetectors_own_paths_through_crops_split_and_predict_to_a_classified_file_its_validator_accepts(
        four_variants, tmp_path, monkeypatch):
    """Absolute, './' and backslash entries: crops for every animal, a split of them, one row per
    detection or photo with its site and capture time, and --md_out: the file with classifications,
    which MegaDetector's own validator accepts, every other field as it was."""
    from PIL import ImageFile
    # megadetector's visualization_utils, imported by the validator, sets PIL's LOAD_TRUNCATED_IMAGES for
    # the whole process when imported; the tests of truncated files that follow need PIL's default back
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", ImageFile.LOAD_TRUNCATED_IMAGES)
    from megadetector.postprocessing.validate_batch_results import ValidateBatchResultsOptions, validate_batch_results
    _, runs = four_variants
    lab = tmp_path / "labelled"
    for c, colour in (("water-deer", RED), ("roe-deer", BLUE)):
        for s in ("site-1", "site-2"):
            for i in range(2):
                photo(lab / c / s / f"{i}.jpg", colour, size=(80, 60), seed=i, when=f"2026:05:0{i + 1} 10:00:00")
    spellings = [lambda rel: str(lab / rel), lambda rel: "./" + rel, lambda rel: rel.replace("/", "\\")]
    entries = [{"file": spellings[n % 3](f"{c}/{s}/{i}.jpg"), "detections": [ANIMAL]}
               for n, (c, s, i) in enumerate((c, s, i) for c in ("water-deer", "roe-deer")
                                             for s in ("site-1", "site-2") for i in range(2))]
    prepare.main(["crops", "--images", str(lab), "--detections", detections_file(tmp_path / "lab.json", entries),
                  "--out", str(tmp_path / "crops")])
    crops = [r for r in rows(tmp_path / "crops" / "crops.csv") if r["status"] == "ok"]
    assert len(crops) == 8 and all(os.path.isfile(tmp_path / "crops" / r["crop"]) for r in crops)
    prepare.main(["split", "--images", str(tmp_path / "crops"), "--out", str(tmp_path / "split"), "--by", "folder"])
    assert len(rows(tmp_path / "split" / "split.csv")) == 8

    card = tmp_path / "card"
    photo(card / "site-1" / "a.jpg", RED, size=(80, 60), when="2026:06:01 04:30:00")
    photo(card / "site-1" / "b.jpg", BLUE, size=(80, 60))
    photo(card / "site-2" / "c.jpg", BLUE, size=(80, 60))
    md = detections_file(tmp_path / "card.json", [
        {"file": str(card / "site-1" / "a.jpg"), "detections": [ANIMAL, {**ANIMAL, "bbox": [0.6, 0.1, 0.3, 0.3]}]},
        {"file": "./site-1/b.jpg", "detections": [{**ANIMAL, "category": "2"}]},
        {"file": "site-2\\c.jpg", "detections": [{**ANIMAL, "conf": 0.7}], "custom": "kept"}])
    got = run_predict(runs, card, tmp_path / "p.csv", "--detections", md, "--md_out", str(tmp_path / "classified.json"))
    assert sorted((r["site"], r["detection"], r["status"]) for r in got) == [
        ("site-1", "", "person"), ("site-1", "0", "ok"), ("site-1", "1", "ok"), ("site-2", "0", "ok")]
    assert {r["capture_time"] for r in got if r["path"].endswith("a.jpg")} == {"2026-06-01 04:30:00"}
    counts = json.load(open(tmp_path / "p.json"))["counts"]
    assert sum(counts["per_site"]["site-1"]["per_class"].values()) == 2
    assert counts["per_site"]["site-1"]["without_class"] == {"person": 1} and counts["md_out"]["classified_detections"] == 3
    out = json.load(open(tmp_path / "classified.json"))
    options = ValidateBatchResultsOptions()
    options.raise_errors = True
    assert validate_batch_results(str(tmp_path / "classified.json"), options)["validation_results"]["errors"] == []
    original = json.load(open(md))
    assert out["classification_categories"] == {"0": "water-deer", "1": "roe-deer"}
    assert out["images"][2]["custom"] == "kept" and out["info"]["detector"] == original["info"]["detector"]
    for before, after in zip(original["images"], out["images"]):
        assert before["file"] == after["file"]
        for d0, d1 in zip(before["detections"], after["detections"]):
            assert {k: v for k, v in d1.items() if k != "classifications"} == d0
    first = out["images"][0]["detections"][0]["classifications"]
    row = next(r for r in got if r["path"].endswith("a.jpg") and r["detection"] == "0")
    assert sorted(first, key=lambda c: c[0]) == [["0", float(row["prob[water-deer]"])], ["1", float(row["prob[roe-deer]"])]]
    assert first[0][1] >= first[1][1] and "classifications" not in out["images"][1]["detections"][0]
    with pytest.raises(UserError, match="the file given to --detections"):
        run_predict(runs, card, tmp_path / "q.csv", "--detections", md, "--md_out", md)
    with pytest.raises(UserError, match="--md_out .* was not written by predict.py"):
        run_predict(runs, card, tmp_path / "q.csv", "--detections", md, "--md_out", str(tmp_path / "lab.json"))
    run_predict(runs, card, tmp_path / "p.csv", "--detections", md, "--md_out", str(tmp_path / "classified.json"))


def test_predict_selects_each_runs_epoch_by_the_rule_given_and_resumes_only_under_it(four_variants, small_card,
                                                                                    tmp_path, monkeypatch):
    _, runs = four_variants
    seen = []
    real = predict.load_best
    monkeypatch.setattr(predict, "load_best", lambda run, rule="train_acc": seen.append(rule) or real(run, rule))
    run_predict(runs, small_card, tmp_path / "p.csv", "--select", "balanced_train_acc")
    assert seen == ["balanced_train_acc"] and json.load(open(tmp_path / "p.json"))["select"] == "balanced_train_acc"
    with pytest.raises(UserError, match="select: 'balanced_train_acc' vs 'last'"):
        run_predict(runs, small_card, tmp_path / "p.csv", "--select", "last")


def test_a_detections_file_that_names_no_photo_of_the_folder_is_an_error(four_variants, small_card, tmp_path):
    _, runs = four_variants
    md = detections_file(tmp_path / "md.json", [{"file": "/cards/2024/site-1/a.jpg", "detections": [ANIMAL]},
                                                {"file": "D:\\cards\\b.jpg", "detections": []}])
    with pytest.raises(UserError, match="none of its 2 entries names a photo"):
        run_predict(runs, small_card, tmp_path / "p.csv", "--detections", md)
    os.makedirs(tmp_path / "lab" / "roe-deer")
    photo(tmp_path / "lab" / "roe-deer" / "x.jpg", RED)
    with pytest.raises(UserError, match="--output_relative_filenames"):
        prepare.main(["crops", "--images", str(tmp_path / "lab"), "--detections", md, "--out", str(tmp_path / "c")])


# ---------------------------------------------------------------- 9, 10: what the format allows

@pytest.mark.parametrize("detection, message", [
    ({"category": "1", "conf": 0.9, "bbox": [10, 20, 300, 200]}, "looks like pixels"),
    ({"category": "1", "conf": 0.9, "bbox": [1.2, 0.1, 0.1, 0.1]}, "inside the image"),
    ({"category": "1", "conf": 0.9, "bbox": [0.95, 0.95, 0.0, 0.0]}, "positive width"),
    ({"category": "1", "conf": 0.9, "bbox": "0123"}, "four numbers"),
    ({"category": "1", "conf": float("nan"), "bbox": [0.1, 0.1, 0.2, 0.2]}, "conf nan"),
    ({"category": "1", "conf": 1.5, "bbox": [0.1, 0.1, 0.2, 0.2]}, "conf 1.5"),
    ({"category": "1", "conf": float("inf"), "bbox": [0.1, 0.1, 0.2, 0.2]}, "conf inf"),
    ({"category": "1", "conf": "0.9", "bbox": [0.1, 0.1, 0.2, 0.2]}, "conf '0.9'"),
])
def test_boxes_and_confidences_the_format_does_not_allow_are_refused_by_file_entry_and_field(tmp_path, detection,
                                                                                          message):
    md = detections_file(tmp_path / "md.json", [{"file": "a.jpg", "detections": []},
                                                {"file": "b.jpg", "detections": [ANIMAL, detection]}])
    with pytest.raises(UserError, match=message) as e:
        camtrap.read_detections(md)
    assert f"--detections {md}: images[1] (b.jpg) detections[1]" in str(e.value)


def test_a_box_a_hair_past_the_border_is_clipped_as_megadetector_rounds():
    names = {"1": "animal"}
    assert camtrap.read_detection({"category": "1", "conf": 0.5, "bbox": [0.9, -0.0004, 0.1003, 0.5]}, names, "x") \
        == ("animal", 0.5, [0.9, 0.0, 0.09999999999999998, 0.5])


def test_two_entries_for_one_photo_are_refused_naming_both(four_variants, small_card, tmp_path):
    _, runs = four_variants
    md = detections_file(tmp_path / "md.json", [{"file": "site-1/a.jpg", "detections": [ANIMAL]},
                                                {"file": "./site-1/a.jpg", "detections": []}])
    with pytest.raises(UserError, match=r"images\[0\] \(site-1/a.jpg\) and images\[1\] \(./site-1/a.jpg\)"):
        run_predict(runs, small_card, tmp_path / "p.csv", "--detections", md)


# ---------------------------------------------------------------- 12: re-runs

def test_a_rerun_under_another_spelling_of_the_folder_or_with_outputs_inside_it_adds_no_row(four_variants,
                                                                                         small_card, tmp_path):
    _, runs = four_variants
    out = tmp_path / "p.csv"
    extra = ["--html", str(small_card / "review.html"), "--rare", "roe-deer", "--sort_into", str(small_card / "sorted")]
    first = run_predict(runs, small_card, out, *extra)
    assert len(first) == 3 and os.listdir(small_card / "review_thumbs")
    again = run_predict(runs, str(small_card) + os.sep + "." + os.sep, out, *extra)
    os.symlink(small_card, tmp_path / "link")
    third = run_predict(runs, tmp_path / "link", out, *extra)
    assert len(again) == len(third) == 3


# ---------------------------------------------------------------- 4, 7, 8: prepare.py

def test_a_site_with_several_cards_is_one_group_of_the_split(tmp_path):
    root = tmp_path / "labelled"
    for month in ("card-2024-05", "card-2024-06"):
        for i in range(3):
            photo(root / "roe-deer" / "site-1" / month / f"{i}.jpg", BLUE, seed=i)
    for i in range(3):
        photo(root / "roe-deer" / "site-2" / f"{i}.jpg", BLUE, seed=i)
    prepare.main(["split", "--images", str(root), "--out", str(tmp_path / "s"), "--by", "folder"])
    split = rows(tmp_path / "s" / "split.csv")
    site1 = {(r["group"], r["side"]) for r in split if "site-1" in r["image"]}
    assert len(site1) == 1 and site1.pop()[0] == "folder:site-1"


def test_crops_of_photos_that_share_a_name_before_the_extension_are_all_kept(tmp_path):
    root = tmp_path / "labelled" / "roe-deer"
    photo(root / "IMG_0100.jpg", RED)
    photo(root / "IMG_0100.png", BLUE)
    md = detections_file(tmp_path / "md.json", [{"file": f"roe-deer/IMG_0100.{e}", "detections": [ANIMAL]}
                                                for e in ("jpg", "png")])
    prepare.main(["crops", "--images", str(tmp_path / "labelled"), "--detections", md, "--out", str(tmp_path / "c")])
    listed = [r["crop"] for r in rows(tmp_path / "c" / "crops.csv")]
    assert len(set(listed)) == 2 and all(os.path.isfile(tmp_path / "c" / c) for c in listed)


def bomb_png(path, side=20000):
    """A PNG whose header claims side x side pixels (over PIL's decompression-bomb limit), with no data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_a_bomb_sized_image_header_is_listed_not_fatal_in_crops_and_split(tmp_path, capsys):
    root = tmp_path / "labelled" / "roe-deer"
    photo(root / "ok.jpg", RED, when="2026:05:01 10:00:00")
    bomb_png(root / "bomb.png")
    md = detections_file(tmp_path / "md.json", [{"file": f"roe-deer/{n}", "detections": [ANIMAL]}
                                                for n in ("ok.jpg", "bomb.png")])
    prepare.main(["crops", "--images", str(tmp_path / "labelled"), "--detections", md, "--out", str(tmp_path / "c")])
    status = {r["image"]: r["status"] for r in rows(tmp_path / "c" / "crops.csv")}
    assert status["roe-deer/ok.jpg"] == "ok" and status["roe-deer/bomb.png"].startswith("unreadable")
    assert "not used" in capsys.readouterr().out
    prepare.main(["split", "--images", str(tmp_path / "labelled"), "--out", str(tmp_path / "s")])
    assert len(rows(tmp_path / "s" / "split.csv")) == 2


def test_the_crops_summary_line_lists_only_the_reasons_there_are(tmp_path, capsys):
    root = tmp_path / "labelled" / "roe-deer"
    photo(root / "a.jpg", RED)
    photo(root / "b.jpg", RED)
    md = detections_file(tmp_path / "md.json", [{"file": "roe-deer/a.jpg", "detections": [ANIMAL]}])
    prepare.main(["crops", "--images", str(tmp_path / "labelled"), "--detections", md, "--out", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert "not used (not in --detections 1)" in out and "(," not in out


# ---------------------------------------------------------------- 5, 6, 11: the review page

def predictions_csv(path, classes, entries):
    """A predictions CSV as predict.py writes it: entries (photo path, probabilities, predicted)."""
    lines = [",".join(["path", "predicted", *(f"prob[{c}]" for c in classes), "status"])]
    for p, probs, predicted in entries:
        lines.append(",".join([json.dumps(str(p)), json.dumps(predicted), *(f"{v:.6f}" for v in probs), "ok"]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_class_names_and_file_names_are_escaped_and_encoded_on_the_review_page(tmp_path):
    rare = "<img src=x onerror=alert(1)>&"
    a = photo(tmp_path / "photos" / "a#1?%.jpg", RED)
    csv_path = predictions_csv(tmp_path / "p.csv", ["deer", rare], [(a, [0.2, 0.8], rare)])
    page = tmp_path / "review.html"
    camtrap.review_page(str(csv_path), str(page), ["deer", rare], rare, (rare, 0.5))
    text = page.read_text()
    assert rare not in text and "&lt;img src=x onerror=alert(1)&gt;&amp;" in text
    assert 'href="photos/a%231%3F%25.jpg"' in text


def test_thumbnails_of_a_new_card_with_the_same_file_names_and_of_a_changed_box_are_new(tmp_path):
    a = photo(tmp_path / "card" / "IMG_0001.JPG", RED)
    first = camtrap.thumb_name(a, "0", [0.1, 0.1, 0.2, 0.2])
    assert camtrap.thumb_name(a, "0", [0.1, 0.1, 0.3, 0.2]) != first           # another box
    os.utime(a, ns=(10**18, 10**18))
    photo(tmp_path / "card" / "IMG_0001.JPG", BLUE, seed=7)                       # the next card's photo
    assert camtrap.thumb_name(a, "0", [0.1, 0.1, 0.2, 0.2]) != first


def test_a_detections_thumbnail_is_the_crop_the_model_classified(tmp_path):
    from PIL import Image
    a = photo(tmp_path / "a.jpg", RED, size=(400, 300))
    assert camtrap.thumbnail(a, [0.1, 0.2, 0.1, 0.1], str(tmp_path / "crop.jpg"))
    assert camtrap.thumbnail(a, None, str(tmp_path / "whole.jpg"))
    with Image.open(tmp_path / "crop.jpg") as crop, Image.open(tmp_path / "whole.jpg") as whole:
        assert crop.size == (48, 48) and whole.size == (192, 144)    # 1.2 x 40 px square; the photo at 192 px


def test_the_review_page_draws_a_line_only_where_the_rule_is_a_cut_on_the_rare_class(tmp_path):
    classes = ["water-deer", "roe-deer", "wild-boar"]
    photos = [photo(tmp_path / f"{i}.jpg", RED, seed=i) for i in range(3)]
    # P(roe) 0.45 predicted roe (argmax), 0.5 predicted boar: not monotone in P(roe)
    entries = [(photos[0], [0.3, 0.45, 0.25], "roe-deer"), (photos[1], [0.0, 0.5, 0.5], "wild-boar"),
               (photos[2], [0.1, 0.4, 0.5], "wild-boar")]
    csv_path = predictions_csv(tmp_path / "p.csv", classes, entries)
    for threshold in (None, ("wild-boar", 0.5)):
        page = tmp_path / "r.html"
        camtrap.review_page(str(csv_path), str(page), classes, "roe-deer", threshold)
        text = page.read_text()
        assert 'id="threshold"' not in text and 'id="rule"' in text
    assert "wild-boar when P(wild-boar)" in text
    camtrap.review_page(str(csv_path), str(page), classes, "roe-deer", ("roe-deer", 0.42))
    text = page.read_text()
    assert 'id="threshold"' in text and 'id="rule"' not in text


# ---------------------------------------------------------------- 13: smaller

def test_a_class_with_an_equals_sign_in_its_name_can_be_thresholded_and_ctrl_c_is_no_traceback(capsys):
    assert predict.parse_threshold("a=b=0.25", ["a=b", "c"]) == ("a=b", 0.25)

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        run_main(interrupted, interrupted="interrupted: run it again to continue")
    assert e.value.code == 130 and "run it again to continue" in capsys.readouterr().err


def test_the_review_page_of_a_card_of_fashion_mnist_garments_in_a_browser(tmp_path):
    """The docs' screenshot: a model trained for 3 epochs on 150 T-shirts and 150 shirts (32 px), a
    'card' of 24 scenes with one garment each where a detector would put its box, predict.py's review
    page for the shirts, opened in headless chromium: every thumbnail (the crops) loads.
    REVIEW_SCREENSHOT=docs/review_page.png writes the screenshot there."""
    import shutil

    import numpy as np
    from PIL import Image

    import demo
    from conftest import run_train
    from test_camtrap import browser
    if not os.path.isdir(demo.DEBIAN_DIR):
        pytest.skip("no Fashion-MNIST here (Debian: apt-get install dataset-fashion-mnist)")
    roots = demo.build_image_folders(demo.DEBIAN_DIR, str(tmp_path / "fmnist"), ["fine"], limit=150)["fine"]
    run = run_train(roots["train"], tmp_path / "runs", "--num_epochs", "3", ratio="1:1",
                    classes=("tshirt-top", "shirt"))
    rng, card, entries = np.random.default_rng(0), tmp_path / "card", []
    garments = [os.path.join(roots["valid"], c, f) for c in ("tshirt-top", "shirt")
                for f in sorted(os.listdir(os.path.join(roots["valid"], c)))[:12]]
    for i, g in enumerate(garments):
        low = rng.integers(60, 140, (6, 8, 3)) * np.array([0.8, 1.0, 0.6])          # grass and soil
        scene = Image.fromarray(low.astype(np.uint8)).resize((320, 240), Image.BICUBIC)
        side = int(rng.integers(60, 120))
        x, y = int(rng.integers(0, 320 - side)), int(rng.integers(0, 240 - side))
        scene.paste(Image.open(g).convert("RGB").resize((side, side), Image.BILINEAR), (x, y))
        rel = f"site-{i % 3}/IMG_{i:04d}.JPG"
        os.makedirs(card / os.path.dirname(rel), exist_ok=True)
        scene.save(card / rel, quality=90)
        entries.append({"file": rel, "detections": [{"category": "1", "conf": round(float(rng.uniform(0.5, 0.99)), 3),
                                                     "bbox": [x / 320, y / 240, side / 320, side / 240]}]})
    md = detections_file(tmp_path / "card_md.json", entries)
    page = tmp_path / "review" / "shirts.html"
    predict.main(["--run", run, "--images", str(card), "--detections", md, "--out", str(tmp_path / "review" / "p.csv"),
                  "--threshold", "shirt=0.5", "--html", str(page), "--num_workers", "0"])
    driver = browser()
    try:
        driver.get(page.as_uri())
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        import time
        deadline = time.time() + 20
        while time.time() < deadline and not driver.execute_script(
                "return [...document.images].every(i => i.complete)"):
            time.sleep(0.2)
        loaded = driver.execute_script("return [...document.images].map(i => i.naturalWidth)")
        assert len(loaded) == 24 and all(w > 0 for w in loaded)
        driver.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "review.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("REVIEW_SCREENSHOT"):
            shutil.copy(shot, os.environ["REVIEW_SCREENSHOT"])
    finally:
        driver.quit()
