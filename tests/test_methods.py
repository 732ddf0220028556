"""Methods as data: the table, the folder names, the flags' checks, the square-root sampler, and
every new method end to end through reproduce.py, validation.py, report.py and predict.py."""
import csv
import json
import os

import numpy as np
import pytest
import torch

import data
import losses
from conftest import run_train
from utils import UserError

NEW_METHODS = ["focal", "cb", "ldam_drw", "la", "sqrt", "oversample+supcon", "oversample+fscl_neg1"]


def test_the_method_table_names_each_entry_as_its_choices_do():
    for name, choices in losses.METHODS.items():
        assert losses.method_name(choices) == name and losses.parse_method(name) == {**losses.DEFAULT_CHOICES, **choices}
    assert losses.method_flags("proposed") == ["--contrastive", "--oversampling"]
    assert losses.method_flags("baseline") == []
    assert losses.method_name({"loss": "focal", "drw": True, "sampler": "sqrt", "aux": "supcon"}) == "focal_drw+sqrt+supcon"
    assert losses.parse_method("ce_drw") == {**losses.DEFAULT_CHOICES, "drw": True}
    for bad in ("foo", "la+la", "oversampling+fscl", "cb_drw", "sqrt+oversample"):
        with pytest.raises(UserError, match="not valid"):
            losses.parse_method(bad)


def test_the_paper_flags_and_their_general_forms_are_one_method(image_data, tmp_path):
    a = run_train(image_data["train"], tmp_path, "--contrastive", "--oversampling", "--run_id", "1", "--seed", "1")
    b = run_train(image_data["train"], tmp_path, "--aux", "fscl", "--sampler", "oversample", "--run_id", "2", "--seed", "1")
    assert os.path.dirname(a) == os.path.dirname(b) == str(tmp_path / "proposed" / "1_0.1")
    cfg = [json.load(open(os.path.join(r, "config.json"))) for r in (a, b)]
    assert cfg[0]["fingerprint"] == cfg[1]["fingerprint"]
    assert cfg[0]["method"] == {"loss": "ce", "sampler": "oversample", "drw": False, "aux": "fscl", "fscl_negative": 0}
    assert torch.equal(torch.load(os.path.join(a, "best.pth"))["model"]["fc.weight"],
                       torch.load(os.path.join(b, "best.pth"))["model"]["fc.weight"])


@pytest.mark.parametrize("flags,message", [
    (["--contrastive", "--aux", "supcon"], "--contrastive is --aux fscl"),
    (["--oversampling", "--sampler", "sqrt"], "--oversampling is --sampler oversample"),
    (["--fscl_negative", "-1"], "--fscl_negative sets T"),
    (["--loss", "cb", "--drw"], "changes nothing"),
    (["--loss", "focal", "--focal_gamma", "-1"], "--focal_gamma must be >= 0"),
    (["--cb_beta", "1"], r"--cb_beta must be in \[0, 1\)"),
    (["--drw", "--drw_start", "1.5"], r"--drw_start must be in \(0, 1\)")])
def test_combinations_that_would_not_do_what_they_say_are_refused(image_data, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        run_train(image_data["train"], tmp_path, *flags)
    assert not os.listdir(tmp_path)


def test_square_root_sampling_draws_classes_in_proportion_to_the_square_root_of_their_counts():
    labels = [0] * 900 + [1] * 100
    batches = data.EpochBatches(labels, 2, 64, "sqrt", seed=0)
    orders = []
    for epoch in range(1, 6):
        batches.set_epoch(epoch)
        order, _ = batches.order()
        assert len(order) == 1000 and len(batches) == 16               # epoch = number of training images
        orders.append(order)
    drawn = np.concatenate(orders)
    assert abs(float((drawn >= 900).mean()) - 10 / (30 + 10)) < 0.02  # sqrt(100) / (sqrt(900) + sqrt(100))
    per_image = np.bincount(drawn, minlength=1000)
    assert per_image[900:].min() >= 3 and per_image[900:].max() <= 30  # each rare image ~12.5 times in 5 epochs
    assert abs(per_image[:900].mean() - 3750 / 900) < 0.5                # each common one ~4.2 times


def test_every_new_method_trains_evaluates_reports_and_predicts(image_data, tmp_path, monkeypatch):
    import predict
    import reproduce
    drw = []
    real = losses.Criterion.set_epoch

    def spy(self, epoch):
        real(self, epoch)
        drw.append((self.choices["loss"], epoch, self.weight is not None))
    monkeypatch.setattr(losses.Criterion, "set_epoch", spy)
    save = tmp_path / "runs"
    reproduce.main(["--train_data_root", image_data["train"], "--test_data_root", image_data["valid"],
                    "--classes", "water-deer", "roe-deer", "--save_root", str(save), "--variants", "baseline",
                    *NEW_METHODS, "--ratios", "0.1", "--runs", "1", "--num_epochs", "2", "--img_size", "32",
                    "--weights", "none", "--batch_size", "16", "--drw_start", "0.5"])
    assert ("ldam", 1, False) in drw and ("ldam", 2, True) in drw     # DRW from epoch 2 of 2 at 0.5
    results = json.load(open(save / "results.json"))["variants"]
    assert set(results) == {"baseline", *NEW_METHODS}
    table = open(save / "table1.md").read()
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["baseline", *NEW_METHODS]                     # the table's order
    for name in NEW_METHODS:
        run = save / name / "1_0.1" / "run_1"
        cfg = json.load(open(run / "config.json"))
        assert cfg["variant"] == name and cfg["method"] == losses.parse_method(name)
        epoch_line = next(l for l in open(run / "train.log") if l.startswith("Epoch 1/2 "))
        terms = epoch_line.split(" | ")[-2].split()[::2]                  # "loss 0.69 ce 0.69 ..." -> names
        expected = {"focal": ["focal"], "cb": ["cb"], "ldam_drw": ["ldam"], "la": ["la"], "sqrt": ["ce"],
                    "oversample+supcon": ["ce", "L_supcon[layer3]", "L_supcon[layer4]"],
                    "oversample+fscl_neg1": ["ce", "L_c[layer3]", "L_c[layer4]"]}[name]
        assert terms == ["loss", *expected], (name, epoch_line)
    epochs = {n: [json.loads(l)["images"] for l in open(save / n / "1_0.1" / "run_1" / "metrics.jsonl")]
              for n in ("baseline", "sqrt", "oversample+supcon")}
    assert epochs["sqrt"] == epochs["baseline"] == [44, 44] and epochs["oversample+supcon"] == [80, 80]
    ldam = save / "ldam_drw" / "1_0.1" / "run_1"
    state = torch.load(ldam / "best.pth", weights_only=True)["model"]
    assert "fc.scale" in state and "fc.bias" not in state              # the cosine-normalised head
    cm = np.array(results["ldam_drw"]["1_0.1"]["runs"][0]["metrics"]["confusion_matrix"])
    out = tmp_path / "pred.csv"
    valid = [os.path.join(image_data["valid"], c, f) for c in ("water-deer", "roe-deer")
             for f in sorted(os.listdir(os.path.join(image_data["valid"], c)))]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(valid) + "\n")
    predict.main(["--run", str(ldam), "--images", str(listing), "--out", str(out)])
    rows = list(csv.DictReader(open(out, newline="")))
    truth = ["water-deer" if "/water-deer/" in r["path"] else "roe-deer" for r in rows]
    pred_cm = np.zeros((2, 2), int)
    for t, r in zip(truth, rows):
        pred_cm[["water-deer", "roe-deer"].index(t), ["water-deer", "roe-deer"].index(r["predicted"])] += 1
    assert (pred_cm == cm).all()                                       # predict.py agrees with validation.py


def test_reproduce_refuses_an_unknown_method_and_method_flags_passed_through(image_data, tmp_path):
    import reproduce
    base = ["--train_data_root", image_data["train"], "--classes", "water-deer", "roe-deer",
            "--save_root", str(tmp_path), "--dry_run"]
    with pytest.raises(UserError, match="--variants: method 'lda' is not valid"):
        reproduce.main(base + ["--variants", "lda"])
    with pytest.raises(UserError, match="--loss cannot be passed through"):
        reproduce.main(base + ["--loss", "la"])


def test_the_study_plans_every_method_on_both_conditions(capsys):
    import study
    study.main(["--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("--runs 10" in l and "--ratios 0.1 0.01" in l and "--reference proposed" in l
                                   for l in lines)
    for name in losses.METHODS:
        assert all(f" {name} " in l for l in lines)
    with pytest.raises(UserError, match="--reference la is not among --methods"):
        study.main(["--dry_run", "--methods", "baseline", "proposed", "--reference", "la"])


def test_a_weights_file_initialises_the_network_but_never_sets_the_ldam_scale(image_data, tmp_path):
    from model import build_model
    trained = build_model(2, "none", "cosine", scale=30.0)
    path = tmp_path / "ldam_s30.pth"
    torch.save(trained.state_dict(), path)
    m = build_model(2, str(path), "cosine", scale=10.0)
    assert float(m.fc.scale) == 10.0                                   # --ldam_scale, not the file's 30
    assert torch.equal(m.fc.weight, trained.fc.weight) and torch.equal(m.conv1.weight, trained.conv1.weight)
    run = run_train(image_data["train"], tmp_path / "runs", "--loss", "ldam", "--drw", "--ldam_scale", "10",
                    "--weights", str(path))
    assert float(torch.load(os.path.join(run, "best.pth"))["model"]["fc.scale"]) == 10.0
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["fingerprint_settings"]["ldam_scale"] == 10.0
