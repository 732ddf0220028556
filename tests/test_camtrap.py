"""Camera-trap photos as they come: MegaDetector's detections in predict.py, the same crops for training
(prepare.py crops), the grouped train/valid split (prepare.py split) and the review page, opened in a
real (headless) browser."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import camtrap
import data
import predict
import prepare
from utils import UserError

CLASSES = ["water-deer", "roe-deer"]


def rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def photo(path, colour, size=(64, 48), seed=0, when=None, orientation=None):
    """A noisy photo of one colour (width x height), with an EXIF capture time when given."""
    rng = np.random.default_rng(seed)
    a = (rng.integers(-30, 30, (size[1], size[0], 3)) + np.array(colour)).clip(0, 255).astype(np.uint8)
    exif = Image.Exif()
    if when:
        exif.get_ifd(0x8769)[0x9003] = when                    # DateTimeOriginal
    if orientation:
        exif[0x0112] = orientation
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a).save(path, exif=exif.tobytes() if (when or orientation) else b"")
    return str(path)


def detections_file(path, images, info=True):
    """A MegaDetector batch-output file (format 1.4) with images as given."""
    doc = {"images": images, "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"}}
    if info:
        doc["info"] = {"format_version": "1.4", "detector": "md_v5a.0.0.pt",
                       "detector_metadata": {"typical_detection_threshold": 0.2}}
    path.write_text(json.dumps(doc))
    return str(path)


# ---------------------------------------------------------------- the crop

@pytest.mark.parametrize("box, expected", [
    ([0.1, 0.1, 0.2, 0.1], (8, 0, 32, 24)),      # 20 x 8 px box -> a 24 px square (10% margin), moved down to y=0
    ([0.9, 0.9, 0.1, 0.1], (88, 68, 100, 80)),   # at the bottom-right border: moved inside, still 12 x 12
    ([0.0, 0.0, 1.0, 1.0], (0, 0, 100, 80)),     # larger than the image: the whole image
    ([0.5, 0.5, 0.0, 0.0], (50, 40, 51, 41)),    # an empty box: one pixel
    ([0.25, 0.25, 0.5, 0.5], (20, 10, 80, 70)),  # 50 x 40 px -> 60 px square centred at (50, 40)
])
def test_a_box_becomes_a_square_with_a_margin_inside_the_image(box, expected):
    assert data.crop_box(100, 80, box) == expected


def test_a_crop_is_decoded_as_the_photo_cut_to_its_box_then_resized(tmp_path):
    path = photo(tmp_path / "a.jpg", (120, 80, 60), size=(100, 80))
    box = [0.25, 0.25, 0.5, 0.5]
    with Image.open(path) as im:
        expected = np.array(im.convert("RGB").crop((20, 10, 80, 70)).resize((16, 16), Image.BILINEAR))
    assert (data.load_image(path, 16, box) == expected).all()
    assert (data.load_image(path, 16) != data.load_image(path, 16, box)).any()
    # a photo stored sideways with an EXIF orientation is cut as the detector saw it: upright
    turned = photo(tmp_path / "b.jpg", (120, 80, 60), size=(80, 100), orientation=6)
    with Image.open(turned) as im:
        upright = im.convert("RGB").transpose(Image.Transpose.ROTATE_270)   # what orientation 6 means
    assert upright.size == (100, 80)
    assert (data.load_image(turned, 16, box) == np.array(upright.crop((20, 10, 80, 70)).resize(
        (16, 16), Image.BILINEAR))).all()


@pytest.mark.parametrize("content, message", [
    ("not json", "not JSON"),
    ('{"images": []}', "detection_categories"),
    ('{"images": [{"detections": []}], "detection_categories": {}}', r"images\[0\] has no 'file'"),
    ('{"images": [{"file": "a.jpg"}], "detection_categories": {}}', "neither a 'detections' list nor a 'failure'"),
    ('{"images": [{"file": "a.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0, 0, 1]}]}], '
     '"detection_categories": {"1": "animal"}}', r"bbox \[0, 0, 1\]"),
    ('{"images": [{"file": "a.jpg", "detections": [{"category": "1", "bbox": [0, 0, 1, 1]}]}], '
     '"detection_categories": {"1": "animal"}}', "needs 'category', 'conf' and 'bbox'"),
])
def test_a_file_that_is_not_megadetector_output_is_refused_by_name(tmp_path, content, message):
    path = tmp_path / "md.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        camtrap.read_detections(str(path))
    assert str(path) in str(e.value)


def test_image_status_follows_the_threshold_and_the_categories():
    rec = lambda *dets, failure=None: {"failure": failure, "detections": list(dets)}  # noqa: E731
    animal_low, person = (0, "animal", 0.1, [0, 0, .1, .1]), (1, "person", 0.5, [0, 0, .1, .1])
    assert camtrap.image_status(rec(animal_low, person), 0.2) == ([], "person")
    assert camtrap.image_status(rec(animal_low, person), 0.05) == ([(0, 0.1, [0, 0, .1, .1])], None)
    assert camtrap.image_status(rec((0, "vehicle", 0.9, [0, 0, 1, 1])), 0.2) == ([], "vehicle")
    assert camtrap.image_status(rec((0, "unknown", 0.9, [0, 0, 1, 1])), 0.2) == ([], "empty")   # not a detection
    assert camtrap.image_status(rec(), 0.2) == ([], "empty")
    assert camtrap.image_status(rec(failure="Failure image access"), 0.2) == ([], "failure: Failure image access")


# ---------------------------------------------------------------- predict.py --detections and prepare.py crops

@pytest.fixture(scope="module")
def card(tmp_path_factory):
    """An SD card's folder of photos and MegaDetector's file for it: two animals in one photo (one at
    the border), an empty frame, a person, a vehicle, an animal below the threshold, a photo the
    detector failed on, a photo the file does not name, and a file it names that is not there."""
    base = tmp_path_factory.mktemp("card")
    root = base / "card"
    red, blue = (200, 60, 40), (40, 60, 200)
    names = {"site-a/two.jpg": red, "site-a/empty.jpg": (90, 90, 90), "site-a/person.jpg": red,
             "site-b/vehicle.jpg": blue, "site-b/faint.jpg": blue, "site-b/failed.jpg": red,
             "site-b/unlisted.jpg": blue, "site-b/one.jpg": blue}
    for i, (n, colour) in enumerate(names.items()):
        photo(root / n, colour, size=(96, 64), seed=i)
    md = detections_file(base / "md.json", [
        {"file": "site-a/two.jpg", "detections": [
            {"category": "1", "conf": 0.93, "bbox": [0.1, 0.2, 0.3, 0.4]},
            {"category": "2", "conf": 0.15, "bbox": [0.0, 0.0, 0.1, 0.1]},
            {"category": "1", "conf": 0.61, "bbox": [0.85, 0.7, 0.15, 0.3]}]},     # at the border
        {"file": "site-a/empty.jpg", "detections": []},
        {"file": "site-a/person.jpg", "detections": [{"category": "2", "conf": 0.88, "bbox": [0.4, 0.1, 0.2, 0.8]},
                                                    {"category": "1", "conf": 0.12, "bbox": [0, 0, 0.2, 0.2]}]},
        {"file": "site-b/vehicle.jpg", "detections": [{"category": "3", "conf": 0.7, "bbox": [0.1, 0.1, 0.8, 0.8]}]},
        {"file": "site-b/faint.jpg", "detections": [{"category": "1", "conf": 0.19, "bbox": [0.3, 0.3, 0.2, 0.2]}]},
        {"file": "site-b\\failed.jpg", "failure": "Failure image access", "detections": None},
        {"file": "site-b/one.jpg", "detections": [{"category": "1", "conf": 0.2, "bbox": [0.4, 0.3, 0.2, 0.3]}]},
        {"file": "site-c/gone.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0, 0, 1, 1]}]},
    ])
    return root, md


def test_detections_give_one_row_per_animal_and_a_status_per_other_photo(four_variants, card, tmp_path, capsys):
    _, runs = four_variants
    root, md = card
    out = tmp_path / "p.csv"
    predict.main(["--run", runs["proposed"], "--images", str(root), "--detections", md, "--out", str(out),
                  "--num_workers", "0"])
    got = {(os.path.relpath(r["path"], root).replace(os.sep, "/"), r["detection"]): r for r in rows(out)}
    assert set(got) == {("site-a/two.jpg", "0"), ("site-a/two.jpg", "2"), ("site-a/empty.jpg", ""),
                        ("site-a/person.jpg", ""), ("site-b/vehicle.jpg", ""), ("site-b/faint.jpg", ""),
                        ("site-b/failed.jpg", ""), ("site-b/unlisted.jpg", ""), ("site-b/one.jpg", "0"),
                        ("site-c/gone.jpg", "")}
    status = {k: r["status"] for k, r in got.items()}
    assert status[("site-a/two.jpg", "0")] == status[("site-a/two.jpg", "2")] == status[("site-b/one.jpg", "0")] == "ok"
    assert status[("site-a/empty.jpg", "")] == status[("site-b/faint.jpg", "")] == "empty"   # 0.19 < 0.2
    assert status[("site-a/person.jpg", "")] == "person" and status[("site-b/vehicle.jpg", "")] == "vehicle"
    assert status[("site-b/failed.jpg", "")] == "failure: Failure image access"
    assert status[("site-b/unlisted.jpg", "")] == "not in --detections"
    assert status[("site-c/gone.jpg", "")].startswith("missing")
    for k, r in got.items():
        assert (r["predicted"] in CLASSES) == (r["status"] == "ok")
        assert (r["prob[roe-deer]"] != "") == (r["status"] == "ok")
    assert json.loads(got[("site-a/two.jpg", "2")]["bbox"]) == [0.85, 0.7, 0.15, 0.3]
    assert got[("site-a/two.jpg", "0")]["detection_conf"] == "0.9300"
    counts = json.load(open(tmp_path / "p.json"))["counts"]
    assert counts["rows"] == 10 and sum(counts["per_class"].values()) == 3
    assert counts["without_class"] == {"empty": 2, "person": 1, "vehicle": 1, "failure": 1, "not in --detections": 1,
                                       "missing": 1}
    assert "10 row(s)" in capsys.readouterr().out
    # the same command again adds nothing; another --min_conf is another rule and is refused
    predict.main(["--run", runs["proposed"], "--images", str(root), "--detections", md, "--out", str(out)])
    assert len(rows(out)) == 10
    with pytest.raises(UserError, match="min_conf"):
        predict.main(["--run", runs["proposed"], "--images", str(root), "--detections", md, "--out", str(out),
                      "--min_conf", "0.1"])
    # a lower threshold keeps the faint animal and the person photo's animal
    predict.main(["--run", runs["proposed"], "--images", str(root), "--detections", md, "--out",
                  str(tmp_path / "low.csv"), "--min_conf", "0.1"])
    low = rows(tmp_path / "low.csv")
    # two.jpg's 2 animals (its person at 0.15 is no animal), person.jpg's animal (0.12), faint (0.19), one (0.2)
    assert sum(r["status"] == "ok" for r in low) == 5
    assert {os.path.basename(r["path"]): r["status"] for r in low}["person.jpg"] == "ok"


def test_training_crops_are_the_pixels_prediction_classifies(four_variants, card, tmp_path):
    """prepare.py crops on a labelled folder, then predict.py on those crop files, gives the same
    probabilities as predict.py --detections on the photos."""
    _, runs = four_variants
    root, md = card
    labelled = tmp_path / "labelled"
    for n in ("two.jpg", "one.jpg", "empty.jpg"):
        src = next(p for p in (root / "site-a" / n, root / "site-b" / n) if p.exists())
        dest = labelled / ("water-deer" if n != "one.jpg" else "roe-deer") / "site-x" / n
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    records = json.load(open(md))
    mine = [dict(r, file=("water-deer" if "one" not in r["file"] else "roe-deer") + "/site-x/"
                 + r["file"].replace("\\", "/").split("/")[-1])
            for r in records["images"] if r["file"].split("/")[-1] in ("two.jpg", "one.jpg", "empty.jpg")]
    mine.append({"file": "roe-deer/site-x/elsewhere.jpg", "detections": []})
    md2 = detections_file(tmp_path / "labelled_md.json", mine)
    prepare.main(["crops", "--images", str(labelled), "--detections", md2, "--out", str(tmp_path / "crops")])
    made = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "crops").replace(os.sep, "/")
                  for d, _, fs in os.walk(tmp_path / "crops") for f in fs if f.endswith(".png"))
    assert made == ["roe-deer/site-x/one.jpg__det0.png", "water-deer/site-x/two.jpg__det0.png",
                    "water-deer/site-x/two.jpg__det2.png"]
    listed = {r["image"]: r for r in rows(tmp_path / "crops" / "crops.csv")}
    assert listed["water-deer/site-x/empty.jpg"]["status"] == "empty"
    summary = json.load(open(tmp_path / "crops" / "crops.json"))
    assert summary["crops"] == 3 and summary["no_animal"] == {"empty": 1}
    assert summary["missing_images"] == ["roe-deer/site-x/elsewhere.jpg"]
    with Image.open(tmp_path / "crops" / "water-deer" / "site-x" / "two.jpg__det2.png") as im:
        left, top, right, bottom = data.crop_box(96, 64, [0.85, 0.7, 0.15, 0.3])
        assert im.size == (right - left, bottom - top) and right == 96 and bottom == 64      # at the border
    predict.main(["--run", runs["proposed"], "--images", str(labelled), "--detections", md2,
                  "--out", str(tmp_path / "d.csv")])
    predict.main(["--run", runs["proposed"], "--images", str(tmp_path / "crops"), "--out", str(tmp_path / "c.csv")])
    by_crop = {os.path.basename(r["path"]): r for r in rows(tmp_path / "c.csv")}
    for r in rows(tmp_path / "d.csv"):
        if r["status"] == "ok":
            twin = by_crop[os.path.basename(r["path"]) + f"__det{r['detection']}.png"]
            assert [r[f"prob[{c}]"] for c in CLASSES] == [twin[f"prob[{c}]"] for c in CLASSES]
    with pytest.raises(UserError, match="already holds files"):
        prepare.main(["crops", "--images", str(labelled), "--detections", md2, "--out", str(tmp_path / "crops")])


# ---------------------------------------------------------------- prepare.py split

def test_the_split_keeps_bursts_and_sites_on_one_side(tmp_path, capsys):
    root = tmp_path / "labelled"
    # water deer: three bursts of 4 frames in one folder (2 s apart inside, 10 min between bursts), one
    # frame without EXIF; roe deer: two camera sites of 3 photos
    for b in range(3):
        for f in range(4):
            photo(root / "water-deer" / f"b{b}_{f}.jpg", (200, 60, 40), seed=10 * b + f,
                  when=f"2026:05:01 10:{10 * b:02d}:{2 * f:02d}")
    photo(root / "water-deer" / "no_time.jpg", (200, 60, 40), seed=99)
    for s in ("site-1", "site-2"):
        for f in range(3):
            photo(root / "roe-deer" / s / f"{f}.jpg", (40, 60, 200), seed=f, when=f"2026:05:0{f + 1} 08:00:00")
    groups = camtrap.groups_of(data.list_images(root / "water-deer"), str(root / "water-deer"), "burst", 10)
    assert len(set(groups.values())) == 4 and groups[str(root / "water-deer" / "b1_0.jpg")] == \
        groups[str(root / "water-deer" / "b1_3.jpg")] != groups[str(root / "water-deer" / "b2_0.jpg")]
    assert camtrap.groups_of(data.list_images(root / "water-deer"), str(root / "water-deer"), "burst", 1) \
        [str(root / "water-deer" / "b0_0.jpg")] != \
        camtrap.groups_of(data.list_images(root / "water-deer"), str(root / "water-deer"), "burst", 1) \
        [str(root / "water-deer" / "b0_1.jpg")]                                    # 2 s apart > 1 s: not one burst
    prepare.main(["split", "--images", str(root), "--out", str(tmp_path / "s"), "--by", "folder",
                  "--valid_fraction", "0.25", "--seed", "3"])
    split = rows(tmp_path / "s" / "split.csv")
    sides = {}
    for r in split:
        sides.setdefault(r["group"], set()).add(r["side"])
        assert os.path.isfile(tmp_path / "s" / r["side"] / r["image"])
    assert all(len(s) == 1 for s in sides.values())                   # no group on both sides
    assert len(split) == 19 and {r["side"] for r in split} == {"train", "valid"}
    roe = [r for r in split if r["class"] == "roe-deer"]
    assert {r["group"] for r in roe} == {"folder:site-1", "folder:site-2"}
    assert sorted(r["side"] for r in roe) == ["train"] * 3 + ["valid"] * 3
    water_valid = [r for r in split if r["class"] == "water-deer" and r["side"] == "valid"]
    assert len(water_valid) >= 3                                      # round(0.25 x 13), by whole groups
    summary = json.load(open(tmp_path / "s" / "split.json"))
    assert summary["classes"]["roe-deer"] == {"train": 3, "valid": 3, "groups_train": 1, "groups_valid": 1}
    # seeded: the same command gives the same split; it refuses a folder that already holds one
    prepare.main(["split", "--images", str(root), "--out", str(tmp_path / "t"), "--by", "folder",
                  "--valid_fraction", "0.25", "--seed", "3"])
    assert rows(tmp_path / "t" / "split.csv") == split
    with pytest.raises(UserError, match="already holds files"):
        prepare.main(["split", "--images", str(root), "--out", str(tmp_path / "s")])
    with pytest.raises(UserError, match="--valid_fraction"):
        prepare.main(["split", "--images", str(root), "--out", str(tmp_path / "u"), "--valid_fraction", "1"])


# ---------------------------------------------------------------- the review page, in a real browser

def browser():
    """A headless chromium driven by selenium, or skip when this machine has none (.ci/run installs
    Debian's chromium and chromium-driver)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    driver_path = shutil.which("chromedriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not driver_path or not binary:
        pytest.skip("no chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--allow-file-access-from-files", "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_the_review_page_opens_in_a_browser_with_every_thumbnail_and_the_csvs_counts(four_variants, card,
                                                                                   tmp_path):
    _, runs = four_variants
    root, md = card
    out, page = tmp_path / "p.csv", tmp_path / "review" / "roe.html"
    page.parent.mkdir()
    with pytest.raises(UserError, match="--html needs the rare class"):
        predict.main(["--run", runs["proposed"], "--images", str(root), "--out", str(out), "--html", str(page)])
    predict.main(["--run", runs["proposed"], "--images", str(root), "--detections", md, "--out", str(out),
                  "--threshold", "roe-deer=0.5", "--html", str(page)])
    got = rows(out)
    ok = sorted((r for r in got if r["status"] == "ok"), key=lambda r: -float(r["prob[roe-deer]"]))
    driver = browser()
    try:
        driver.get(page.as_uri())
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")     # lazy images below the fold
        driver.implicitly_wait(2)
        import time
        deadline = time.time() + 20
        while time.time() < deadline and not driver.execute_script(
                "return [...document.images].every(i => i.complete)"):
            time.sleep(0.2)
        images = driver.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth, i.alt])")
        assert len(images) == len(ok) and all(c and w > 0 for c, w, _ in images), images   # none broken
        counts = {e.get_attribute("data-class"): int(e.text)
                  for e in driver.find_elements("css selector", "#classes td.count")}
        assert counts == {c: sum(r["predicted"] == c for r in got) for c in CLASSES}
        others = {e.get_attribute("data-status"): int(e.text)
                  for e in driver.find_elements("css selector", "#others td.count")}
        assert others == {"empty": 2, "person": 1, "vehicle": 1, "failure": 1, "not in --detections": 1, "missing": 1}
        shown = [float(e.text) for e in driver.find_elements("css selector", ".card .p")]
        assert shown == [round(float(r["prob[roe-deer]"]), 4) for r in ok]          # highest first
        order = driver.execute_script(
            "return [...document.querySelector('.grid').children].map(e => e.className)")
        line = order.index("line")
        assert all("rare" in c for c in order[:line]) and not any("rare" in c for c in order[line + 1:])
        assert line == sum(float(r["prob[roe-deer]"]) >= 0.5 for r in ok)
        links = driver.execute_script("return [...document.querySelectorAll('.card')].map(a => a.href)")
        assert all(link.startswith("file://") and os.path.isfile(link[len("file://"):]) for link in links)
        shot = tmp_path / "review.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()
    assert json.load(open(tmp_path / "p.json"))["counts"]["html"] == str(page)


def test_crops_keep_the_photos_capture_time_so_that_a_split_by_burst_still_works(tmp_path):
    root = tmp_path / "labelled"
    photo(root / "roe-deer" / "a.jpg", (40, 60, 200), when="2026:05:01 10:00:00", orientation=6)
    photo(root / "roe-deer" / "b.jpg", (40, 60, 200), when="2026:05:01 10:00:04")
    photo(root / "roe-deer" / "c.jpg", (40, 60, 200), when="2026:05:01 11:00:00")
    box = [{"category": "1", "conf": 0.9, "bbox": [0.2, 0.2, 0.3, 0.3]}]
    md = detections_file(tmp_path / "md.json", [{"file": f"roe-deer/{n}.jpg", "detections": box} for n in "abc"])
    summary = camtrap.write_crops(str(root), camtrap.read_detections(md), str(tmp_path / "crops"), 0.2)
    assert summary["crops"] == 3
    crops = sorted(data.list_images(tmp_path / "crops" / "roe-deer"))
    assert [camtrap.capture_time(c) for c in crops] == [camtrap.capture_time(str(root / "roe-deer" / f"{n}.jpg"))
                                                        for n in "abc"]
    with Image.open(crops[0]) as im:
        assert 0x0112 not in im.getexif()                     # the crop is upright already
    groups = camtrap.groups_of(crops, str(tmp_path / "crops" / "roe-deer"), "burst", 10)
    assert groups[crops[0]] == groups[crops[1]] != groups[crops[2]]
