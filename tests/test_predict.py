"""predict.py: the same predictions as validation.py, ensembles, thresholds, resumption, odd files."""
import csv
import json
import os
import shutil

import numpy as np
import pytest

import predict
import validation
from conftest import ROOT, make_image_folder
from test_robustness import write_broken_files
from utils import UserError

CLASSES = ["water-deer", "roe-deer"]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def probs(row):
    return np.array([float(row[f"prob[{c}]"]) for c in CLASSES])


@pytest.fixture(scope="module")
def labelled(image_data, tmp_path_factory):
    """The test folder's two classes, as a labelled folder and as a flat folder of new images."""
    base = tmp_path_factory.mktemp("predict")
    for c in CLASSES:
        shutil.copytree(os.path.join(image_data["valid"], c), base / "labelled" / c)
    return base / "labelled"


def test_predictions_on_a_labelled_folder_equal_validation(four_variants, labelled, tmp_path):
    save, runs = four_variants
    out = tmp_path / "p.csv"
    predict.main(["--run", runs["baseline"], "--images", str(labelled), "--out", str(out), "--num_workers", "0"])
    got = rows(out)
    assert len(got) == 16 and all(r["status"] == "ok" for r in got)
    cm = np.zeros((2, 2), dtype=int)
    for r in got:
        cm[CLASSES.index(os.path.basename(os.path.dirname(r["path"]))), CLASSES.index(r["predicted"])] += 1
    variant = tmp_path / "baseline"
    shutil.copytree(os.path.dirname(runs["baseline"]), variant / "1_0.1")
    validation.main(["--model_root", str(variant), "--test_data_root", str(labelled)])
    expected = json.load(open(variant / "results.json"))["variants"]["baseline"]["1_0.1"]["runs"][0]
    assert cm.tolist() == expected["metrics"]["confusion_matrix"]
    assert all(abs(probs(r).sum() - 1) < 1e-5 for r in got)
    meta = json.load(open(tmp_path / "p.json"))
    assert meta["classes"] == CLASSES and meta["models"][0]["epoch"] == 1 and meta["threshold"] is None


def test_an_ensemble_averages_the_runs_probabilities(four_variants, labelled, tmp_path):
    _, runs = four_variants
    single = {}
    for v in ("baseline", "proposed"):
        predict.main(["--run", runs[v], "--images", str(labelled), "--out", str(tmp_path / f"{v}.csv")])
        single[v] = {r["path"]: probs(r) for r in rows(tmp_path / f"{v}.csv")}
    predict.main(["--run", runs["baseline"], runs["proposed"], "--images", str(labelled),
                  "--out", str(tmp_path / "both.csv")])
    for r in rows(tmp_path / "both.csv"):
        mean = (single["baseline"][r["path"]] + single["proposed"][r["path"]]) / 2
        assert np.allclose(probs(r), mean, atol=2e-6)
        assert r["predicted"] == CLASSES[int(np.argmax(probs(r)))]


def test_an_interrupted_job_continues_to_the_csv_of_an_uninterrupted_one(four_variants, labelled, tmp_path,
                                                                          monkeypatch):
    _, runs = four_variants
    argv = ["--run", runs["proposed"], "--images", str(labelled), "--num_workers", "0"]
    # the same chunks in both jobs: a float32 forward pass of 16 images and one of 5 may differ in the last
    # bits on some CPUs (oneDNN picks its kernels by batch size), and the CSV prints 6 decimals
    monkeypatch.setattr(predict, "CHUNK", 5)
    predict.main(argv + ["--out", str(tmp_path / "straight.csv")])
    real, calls = predict.probabilities, []

    def dies_on_the_third_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(predict, "probabilities", dies_on_the_third_chunk)
    out = tmp_path / "resumed.csv"
    with pytest.raises(KeyboardInterrupt):
        predict.main(argv + ["--out", str(out)])
    assert len(rows(out)) == 10
    with open(out, "a") as f:
        f.write(rows(tmp_path / "straight.csv")[10]["path"] + ",water-de")       # a line cut off mid-write
    monkeypatch.setattr(predict, "probabilities", real)
    predict.main(argv + ["--out", str(out)])
    assert out.read_text() == (tmp_path / "straight.csv").read_text()


def test_broken_files_are_listed_never_fatal_and_a_list_file_works(four_variants, image_data, tmp_path, capsys):
    _, runs = four_variants
    folder = tmp_path / "new"
    make_image_folder(folder, {"cam1": 3})
    shutil.copy(os.path.join(image_data["valid"], "roe-deer", "000.jpg"), folder / "000.jpg")
    broken = write_broken_files(folder)
    os.makedirs(folder / ".hidden")
    shutil.copy(folder / "000.jpg", folder / ".hidden" / "skip.jpg")
    predict.main(["--run", runs["baseline"], "--images", str(folder), "--out", str(tmp_path / "p.csv")])
    got = {r["path"]: r for r in rows(tmp_path / "p.csv")}
    assert len(got) == 9 and not any(".hidden" in p for p in got)
    assert all(got[p]["status"].startswith("unreadable") and got[p]["predicted"] == "" for p in broken)
    assert "5 could not be read" in capsys.readouterr().out
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(sorted(got)[:3]) + "\n")
    predict.main(["--run", runs["baseline"], "--images", str(listing), "--out", str(tmp_path / "l.csv")])
    assert [r["path"] for r in rows(tmp_path / "l.csv")] == sorted(got)[:3]


def test_threshold_calibration_and_sorting(four_variants, labelled, tmp_path, capsys):
    _, runs = four_variants
    base = ["--run", runs["proposed"], "--images", str(labelled)]
    predict.main(base + ["--out", str(tmp_path / "t.csv"), "--threshold", "roe-deer=0",
                         "--sort_into", str(tmp_path / "sorted")])
    assert {r["predicted"] for r in rows(tmp_path / "t.csv")} == {"roe-deer"}
    sorted_files = sorted(os.listdir(tmp_path / "sorted" / "roe-deer"))
    assert os.listdir(tmp_path / "sorted") == ["roe-deer"] and len(sorted_files) == 16   # 000..007 of each class:
    assert "000.jpg" in sorted_files and "000_1.jpg" in sorted_files                     # clashes renamed
    assert sorted(os.listdir(labelled / "roe-deer")) == [f"{i:03d}.jpg" for i in range(8)]   # originals kept
    predict.main(base + ["--out", str(tmp_path / "c.csv"), "--calibrate", str(labelled), "--rare", "roe-deer",
                         "--target_recall", "1.0"])
    cal = json.load(open(tmp_path / "c.json"))["calibration"]
    got = rows(tmp_path / "c.csv")
    rare = [probs(r)[1] for r in got if "/roe-deer/" in r["path"]]
    assert cal["threshold"] == pytest.approx(min(rare), abs=1e-6) and cal["recall"] == 1.0
    assert all(r["predicted"] == "roe-deer" for r in got if "/roe-deer/" in r["path"])
    flagged = [r for r in got if r["predicted"] == "roe-deer"]
    assert cal["precision"] == pytest.approx(8 / len(flagged))
    assert "calibrated on" in capsys.readouterr().out
    assert (tmp_path / "c_threshold.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and cal["figure"].endswith(".png")
    with pytest.raises(UserError, match="--threshold"):
        predict.main(base + ["--out", str(tmp_path / "x.csv"), "--threshold", "elk=0.3"])
    with pytest.raises(UserError, match="--num_workers must be 0 or more"):
        predict.main(base + ["--out", str(tmp_path / "y.csv"), "--num_workers", "-1"])


def test_the_calibrated_threshold_is_the_largest_that_reaches_the_target_recall():
    # 100 rare images scoring 1.00, 0.99, ..., 0.01: 7% recall needs the 7 highest, threshold 0.94
    # (0.07 x 100 = 7.000000000000001 in floating point; a bare ceil asked for 8 and gave 0.93)
    rare = np.round(np.arange(100, 0, -1) / 100, 2)
    got = predict.threshold_for_recall(rare, np.ones(100, bool), 0.07)
    assert 0.07 * 100 > 7 and got == {"threshold": 0.94, "recall": 0.07, "precision": 1.0}
    # a target between two achievable recalls: 5 rare images, 0.5 needs 3 (2.5 rounded up): t = 0.5,
    # recall 0.6; the 2 other images at 0.6 and 0.2, one of them flagged
    scores = np.array([0.9, 0.7, 0.5, 0.3, 0.1, 0.6, 0.2])
    truth = np.array([1, 1, 1, 1, 1, 0, 0], bool)
    assert predict.threshold_for_recall(scores, truth, 0.5) == {"threshold": 0.5, "recall": 0.6, "precision": 0.75}
    assert predict.threshold_for_recall(scores, truth, 0.4)["threshold"] == 0.7      # exactly 2 of 5
    assert predict.threshold_for_recall(scores, truth, 1.0) == {"threshold": 0.1, "recall": 1.0, "precision": 5 / 7}
    # ties at the threshold: every image at t is flagged, so the recall can pass the target
    scores = np.array([0.9, 0.8, 0.8, 0.8, 0.3, 0.85, 0.8, 0.1])
    truth = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    assert predict.threshold_for_recall(scores, truth, 0.5) == {"threshold": 0.8, "recall": 0.8, "precision": 4 / 6}


@pytest.mark.parametrize("change,named", [
    (["--threshold", "roe-deer=0.3"], "threshold: None vs {'class': 'roe-deer', 'p': 0.3}"),
    (["--precision", "bf16"], "precision: 'fp32' vs 'bf16'"),
    (["--other_run"], "models.0.source"),
    (["--calibrate"], "calibration_rule: None vs")])
def test_resuming_under_another_decision_rule_is_refused(four_variants, labelled, tmp_path, change, named,
                                                         monkeypatch):
    _, runs = four_variants
    monkeypatch.setattr(predict, "CHUNK", 5)   # rows are written a chunk at a time: the cut below is where a job stops
    argv = ["--run", runs["proposed"], "--images", str(labelled), "--out", str(tmp_path / "p.csv")]
    predict.main(argv)
    lines = (tmp_path / "p.csv").read_text().splitlines(keepends=True)
    (tmp_path / "p.csv").write_text("".join(lines[:6]))                       # cut after 5 rows
    if change == ["--other_run"]:
        argv[1], change = runs["baseline"], []
    elif change == ["--calibrate"]:
        change = ["--calibrate", str(labelled), "--rare", "roe-deer", "--target_recall", "0.5"]
    with pytest.raises(UserError, match="made under another decision rule") as e:
        predict.main(argv + change)
    assert named in str(e.value) and "new --out" in str(e.value)
    assert (tmp_path / "p.csv").read_text() == "".join(lines[:6])            # nothing written, nothing lost
    predict.main(argv if change else ["--run", runs["proposed"], *argv[2:]])  # the same rule continues
    assert (tmp_path / "p.csv").read_text() == "".join(lines)
    (tmp_path / "p.json").unlink()                                          # a rule that was never recorded
    (tmp_path / "p.csv").write_text("".join(lines[:6]))
    with pytest.raises(UserError, match="does not record the models, threshold and precision"):
        predict.main(["--run", runs["proposed"], *argv[2:]])


def test_sorting_resumed_after_an_interruption_between_link_and_row_leaves_no_duplicate(four_variants, labelled,
                                                                                         tmp_path):
    _, runs = four_variants
    argv = ["--run", runs["proposed"], "--images", str(labelled), "--out", str(tmp_path / "p.csv"),
            "--threshold", "roe-deer=0", "--sort_into", str(tmp_path / "sorted")]
    predict.main(argv)
    before = sorted(os.listdir(tmp_path / "sorted" / "roe-deer"))
    assert len(before) == 16 and "000_1.jpg" in before                       # a real clash: two 000.jpg
    lines = (tmp_path / "p.csv").read_text().splitlines(keepends=True)
    (tmp_path / "p.csv").write_text("".join(lines[:-1]))     # the last image was linked, its row not written
    assert lines[-1].startswith(str(labelled / "water-deer" / "007.jpg"))        # sorted as 007_1.jpg
    predict.main(argv)
    assert sorted(os.listdir(tmp_path / "sorted" / "roe-deer")) == before
    assert (tmp_path / "p.csv").read_text() == "".join(lines)


def test_training_on_a_folder_as_it_is(image_data, tmp_path):
    import train
    run = train.main(["--train_data_root", image_data["train"], "--classes", "water-deer", "roe-deer",
                      "--save_root", str(tmp_path), "--num_epochs", "1", "--img_size", "32", "--weights", "none",
                      "--batch_size", "16"])                                     # no --ratio
    assert run == os.path.join(str(tmp_path), "baseline", "all", "run_1")
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["ratio"] == "all" and cfg["args"]["max_per_class"] == 0 and cfg["observed_ratio"] == [1.0, 0.75]
    assert [cfg["counts"][c]["used"] for c in CLASSES] == [40, 30]
    capped = train.main(["--train_data_root", image_data["train"], "--classes", "water-deer", "roe-deer",
                         "--save_root", str(tmp_path), "--ratio", "all", "--max_per_class", "20", "--num_epochs", "1",
                         "--img_size", "32", "--weights", "none", "--batch_size", "16"])
    assert [json.load(open(os.path.join(capped, "config.json")))["counts"][c]["used"] for c in CLASSES] == [20, 20]
    import reproduce
    argv = ["--train_data_root", image_data["train"], "--test_data_root", image_data["valid"], "--classes",
            *CLASSES, "--save_root", str(tmp_path / "grid"), "--variants", "baseline", "--ratios", "all", "0.1",
            "--runs", "1", "--num_epochs", "1", "--img_size", "32", "--weights", "none", "--batch_size", "16"]
    reproduce.main(argv)
    res = json.load(open(tmp_path / "grid" / "results.json"))["variants"]["baseline"]
    assert set(res) == {"all", "1_0.1"} and res["all"]["ratio"] == [1.0, 0.75]
    assert "| baseline | " in (tmp_path / "grid" / "table1.md").read_text()
    reproduce.main(argv + ["--dry_run"])                                        # done cells match their plan


def readme_commands(section):
    """The commands of a README section's bash blocks (up to its first sub-section), continuation lines
    joined."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in body.split("```bash\n")[1:]]
    return [c.strip() for b in blocks for c in b.replace("\\\n", " ").splitlines() if c.strip()]


def test_the_readme_camera_trap_commands_run_as_written(tmp_path):
    """The front page's recipe, from MegaDetector's files to a sorted folder and a review page, on a
    generated card: labelled photos of three or more camera sites per species (one animal each, some
    frames empty), and new photos (two deer in one, an empty frame, a person)."""
    import subprocess
    import sys
    import torch
    import torchvision
    from test_camtrap import detections_file, photo
    commands = readme_commands("Your own camera-trap images")
    assert [c.split()[1:3] for c in commands] == [["prepare.py", "crops"], ["prepare.py", "split"], ["train.py", "--train_data_root"],
                                                ["validation.py", "--model_root"], ["predict.py", "--run"]]
    base, entries = tmp_path / "camera_traps", []
    for c, sites, per_site, colour in (("water-deer", 5, 6, (200, 60, 40)), ("roe-deer", 3, 3, (40, 60, 200))):
        for s in range(sites):
            for i in range(per_site):
                rel = f"{c}/site-{s}/{i}.jpg"
                photo(base / "labelled" / rel, colour, size=(80, 60), seed=100 * s + i,
                      when=f"2026:05:0{s + 1} 10:{i:02d}:00")
                entries.append({"file": rel, "detections": [] if i == per_site - 1 and c == "water-deer" else
                                [{"category": "1", "conf": 0.9, "bbox": [0.2, 0.2, 0.5, 0.6]}]})
    detections_file(base / "labelled_md.json", entries)
    new = []
    for i, colour in enumerate([(200, 60, 40)] * 4 + [(40, 60, 200)] * 3):
        photo(base / "new_photos" / "site-x" / f"{i}.jpg", colour, size=(80, 60), seed=1000 + i)
        new.append({"file": f"site-x/{i}.jpg", "detections": [{"category": "1", "conf": 0.8, "bbox": [0.1, 0.1, 0.4, 0.5]}]})
    new[0]["detections"].append({"category": "1", "conf": 0.5, "bbox": [0.6, 0.5, 0.3, 0.4]})    # two deer
    new[1]["detections"] = []                                                                   # empty
    new[2]["detections"] = [{"category": "2", "conf": 0.9, "bbox": [0.3, 0.1, 0.2, 0.8]}]          # a person
    detections_file(base / "new_photos_md.json", new)
    # --weights imagenet (the default) loads torchvision's file from the hub cache, which this test fills
    # with a resnet18 state_dict of its own (no download here)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    torch.save(torchvision.models.resnet18().state_dict(), hub / os.path.basename(url))
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    for command in commands:
        argv = [sys.executable, os.path.join(ROOT, command.split()[1]), *command.split()[2:]]
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (command, out.stderr[-2000:])
    split = rows(base / "split" / "split.csv")
    sides = {}
    for r in split:
        sides.setdefault((r["class"], r["group"]), set()).add(r["side"])
    assert all(len(v) == 1 for v in sides.values())                       # a site never on two sides
    for c in CLASSES:
        assert {r["side"] for r in split if r["class"] == c} == {"train", "valid", "calibration"}
    assert len(split) == 5 * 5 + 3 * 3                                     # every crop; 5 empty frames not cropped
    got = rows(tmp_path / "predictions.csv")
    assert sorted(r["status"] for r in got) == sorted(["empty", "person"] + ["ok"] * 6)
    meta = json.load(open(tmp_path / "predictions.json"))
    assert meta["calibration"]["recall"] >= 0.95 and meta["calibration"]["folder"].endswith("calibration")
    assert meta["counts"]["without_class"] == {"empty": 1, "person": 1}
    linked = {c: sorted(os.listdir(tmp_path / "sorted_photos" / c)) for c in os.listdir(tmp_path / "sorted_photos")}
    assert linked["empty"] == ["1.jpg"] and linked["person"] == ["2.jpg"]
    assert sum(len(v) for c, v in linked.items() if c in CLASSES) >= 5     # 5 photos with an animal, by class
    assert "roe-deer candidates" in (tmp_path / "review.html").read_text()
    cfg = json.load(open(tmp_path / "my_runs" / "oversampling" / "all" / "run_1" / "config.json"))
    assert json.load(open(tmp_path / "predictions.json"))["select"] == "balanced_train_acc"
    classified = json.load(open(tmp_path / "new_photos_classified.json"))
    assert sum("classifications" in d for im in classified["images"] for d in im["detections"]) == 6
    train_rows = [r for r in split if r["side"] == "train"]
    assert [cfg["counts"][c]["used"] for c in CLASSES] == [sum(r["class"] == c for r in train_rows) for c in CLASSES]
