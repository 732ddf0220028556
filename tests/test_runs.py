"""Runs are tied to what produced them: fingerprints, reproduce.py's and validation.py's checks, --resume."""
import json
import os
import shutil

import pytest
import torch

import reproduce
import train
import validation
from conftest import train_args
from runs import fingerprint
from utils import UserError


def grid_argv(image_data, save_root, *extra):
    return ["--train_data_root", image_data["train"], "--test_data_root", image_data["valid"],
            "--classes", "water-deer", "roe-deer", "--save_root", str(save_root), "--variants", "baseline",
            "--ratios", "0.1", "--runs", "1", "--num_epochs", "1", "--img_size", "32", "--weights", "none",
            "--batch_size", "16", *extra]


def test_config_records_a_fingerprint_of_every_result_changing_setting(four_variants):
    _, runs = four_variants
    cfg = json.load(open(os.path.join(runs["proposed"], "config.json")))
    s = cfg["fingerprint_settings"]
    for key in ("train_data_root", "classes", "ratio", "img_size", "num_epochs", "batch_size", "lr", "optimizer",
                "weights", "augment", "contrastive_layers", "contrastive_weight", "max_per_class", "seed",
                "planned_subset_sha1"):
        assert key in s, key
    for key in ("device", "num_workers", "save_root", "cache", "compile"):
        assert key not in s, key
    assert os.path.isabs(s["train_data_root"]) and cfg["fingerprint"] == fingerprint(s)
    base = json.load(open(os.path.join(runs["baseline"], "config.json")))
    assert "contrastive_layers" not in base["fingerprint_settings"]      # only where the term is on
    assert base["fingerprint"] != cfg["fingerprint"]


def test_reproduce_refuses_a_save_root_holding_runs_of_other_settings(image_data, tmp_path, capsys):
    reproduce.main(grid_argv(image_data, tmp_path))
    run = tmp_path / "baseline" / "1_0.1" / "run_1"
    before = sorted(os.listdir(run))
    reproduce.main(grid_argv(image_data, tmp_path, "--dry_run"))              # same settings: nothing to do
    assert "0 train.py command(s) to run, 1 cell(s) already complete" in capsys.readouterr().err
    for changed, text in ((["--img_size", "48"], "img_size: 32 vs 48"), (["--lr", "0.01"], "lr: 0.001 vs 0.01"),
                          (["--max_per_class", "20"], "max_per_class: 10000 vs 20")):
        argv = grid_argv(image_data, tmp_path, *changed)
        with pytest.raises(UserError) as e:
            reproduce.main(argv)
        assert text in str(e.value) and str(run) in str(e.value) and "new --save_root" in str(e.value)
    other = tmp_path / "other_classes"
    shutil.copytree(tmp_path / "baseline", other / "baseline")
    with pytest.raises(UserError, match="classes"):
        reproduce.main(grid_argv(image_data, other)[:4] + ["--classes", "water-deer", "wild-boar"]
                       + grid_argv(image_data, other)[7:])
    assert sorted(os.listdir(run)) == before                              # nothing was trained or moved
    # device, workers and the cache are not part of the result: the cell still counts as done
    reproduce.main(grid_argv(image_data, tmp_path, "--device", "cpu", "--num_workers", "0", "--no-cache", "--dry_run"))
    assert "1 cell(s) already complete" in capsys.readouterr().err


def test_validation_never_pools_runs_of_different_settings_in_one_row(image_data, tmp_path, monkeypatch):
    train.main(train_args(image_data["train"], tmp_path))
    train.main(train_args(image_data["train"], tmp_path, "--img_size", "40"))       # run_2 of the same cell folder
    evaluated, real = [], validation.evaluate_run
    monkeypatch.setattr(validation, "evaluate_run", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    with pytest.raises(UserError) as e:
        validation.main(["--model_root", str(tmp_path / "baseline"), "--test_data_root", image_data["valid"]])
    assert evaluated == []                                       # refused before evaluating anything
    msg = str(e.value)
    assert "1_0.1" in msg and "img_size: 32 vs 40" in msg and "run_1" in msg and "run_2" in msg
    shutil.rmtree(tmp_path / "baseline" / "1_0.1" / "run_2")
    train.main(train_args(image_data["train"], tmp_path))                            # seed 2: a real second run
    validation.main(["--model_root", str(tmp_path / "baseline"), "--test_data_root", image_data["valid"]])
    entry = json.load(open(tmp_path / "baseline" / "results.json"))["variants"]["baseline"]["1_0.1"]
    assert entry["summary"]["n_runs"] == 2 and len({r["fingerprint"] for r in entry["runs"]}) == 2
    assert len(entry["cell_fingerprint"]) == 16


def interrupt_after_epoch(n):
    def epoch_done(epoch, metrics):
        if epoch == n + 1:
            raise KeyboardInterrupt
    return epoch_done


def test_resume_works_from_any_folder_refuses_result_changing_flags_and_keeps_provenance(image_data, tmp_path,
                                                                                         monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    rel = os.path.relpath(image_data["train"], work)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(rel, "runs", "--num_epochs", "2", "--seed", "4"), epoch_done=interrupt_after_epoch(1))
    assert e.value.code == 130
    run = work / "runs" / "baseline" / "1_0.1" / "run_1"
    cfg = json.load(open(run / "config.json"))
    assert cfg["args"]["train_data_root"] == image_data["train"] and os.path.isabs(cfg["args"]["save_root"])

    monkeypatch.chdir(elsewhere)
    for flag in (["--num_epochs", "5"], ["--lr", "0.1"], ["--contrastive"], ["--img_size", "64"]):
        with pytest.raises(UserError, match=f"{flag[0]} would change its result"):
            train.main(["--resume", str(run), *flag])
    original = {k: cfg[k] for k in ("git_commit", "torch", "host", "device", "cpu")}
    train.main(["--resume", str(run), "--num_workers", "0", "--device", "cpu"])     # speed flags are taken
    cfg = json.load(open(run / "config.json"))
    assert os.path.isfile(run / "summary.json") and not os.path.exists(elsewhere / "runs")
    assert {k: cfg[k] for k in original} == original                                  # provenance kept
    assert len(cfg["resumed"]) == 1 and cfg["resumed"][0]["from_epoch"] == 1
    assert cfg["resumed"][0]["cwd"] == str(elsewhere) and cfg["args"]["num_workers"] == 0

    monkeypatch.chdir(work)                                                           # the same run, uninterrupted
    straight = train.main(train_args(rel, "straight", "--num_epochs", "2", "--seed", "4"))
    a = torch.load(run / "last.pth", weights_only=True)["model"]
    b = torch.load(os.path.join(straight, "last.pth"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_when_the_chosen_images_changed(image_data, tmp_path):
    folder = tmp_path / "train"
    shutil.copytree(image_data["train"], folder)
    with pytest.raises(SystemExit):
        train.main(train_args(str(folder), tmp_path / "runs", "--num_epochs", "2"), epoch_done=interrupt_after_epoch(1))
    run = tmp_path / "runs" / "baseline" / "1_0.1" / "run_1"
    shutil.copy(folder / "water-deer" / "000.jpg", folder / "water-deer" / "new.jpg")   # 41 majority images now
    with pytest.raises(UserError, match="differ from those .* started with"):
        train.main(["--resume", str(run)])
    assert not (run / "summary.json").exists()


def test_a_weights_file_enters_the_fingerprint_by_its_content(tmp_path):
    import runs
    path = tmp_path / "init.pth"
    args = {"train_data_root": "/d", "classes": ["a", "b"], "max_per_class": 10, "img_size": 32, "num_epochs": 1,
            "batch_size": 16, "lr": 0.001, "optimizer": "adam", "weights": str(path), "augment": "paper",
            "amp": True, "contrastive": False, "oversampling": False}
    torch.save({"w": torch.zeros(3)}, path)
    first = runs.run_settings(args, [1.0, 0.1], 1, "x")
    assert first["weights"].startswith("sha256:")
    torch.save({"w": torch.ones(3)}, path)
    os.utime(path, ns=(1, 10 ** 18))                            # another mtime, whatever the clock's resolution
    assert runs.run_settings(args, [1.0, 0.1], 1, "x")["weights"] != first["weights"]
    assert runs.run_settings({**args, "weights": "none"}, [1.0, 0.1], 1, "x")["weights"] == "none"


def test_a_run_begun_with_the_loop_optimizer_resumes_with_it_and_says_so(image_data, tmp_path):
    # a checkpoint of a version before the fused optimizer: its param_groups say fused None
    with pytest.raises(SystemExit):
        train.main(train_args(image_data["train"], str(tmp_path), "--num_epochs", "2"),
                   epoch_done=interrupt_after_epoch(1))
    run = tmp_path / "baseline" / "1_0.1" / "run_1"
    assert json.load(open(run / "config.json"))["optimizer_impl"] == "fused"
    state = torch.load(run / "last.pth", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    state["optimizer"]["param_groups"][0]["fused"] = None
    torch.save(state, run / "last.pth")
    train.main(["--resume", str(run)])
    cfg = json.load(open(run / "config.json"))
    assert cfg["optimizer_impl"] == "fused" and cfg["resumed"][0]["optimizer_impl"] == "loop"
    assert not torch.load(run / "last.pth", weights_only=True)["optimizer"]["param_groups"][0]["fused"]


@pytest.mark.parametrize("earlier", [{"one_pixel_convs": "matmul"}, {}], ids=["one_pixel_matmul", "nothing"])
def test_a_run_of_an_earlier_version_resumes_and_is_evaluated_with_the_convolutions_it_was_trained_with(
        image_data, tmp_path, earlier):
    """Versions before --small_map_convs recorded one_pixel_convs 'matmul' (one-pixel outputs as matrix
    products) or, before that, nothing (torch's convolution)."""
    from model import OnePixelConv2d, SmallMapConv2d, small_map_convs_of
    how = "one_pixel" if earlier else "conv"
    kind = OnePixelConv2d if earlier else torch.nn.Conv2d

    def weights(run):
        return torch.load(os.path.join(run, "last.pth"), weights_only=True)["model"]
    two = ("--num_epochs", "2", "--seed", "3")
    fast = train.main(train_args(image_data["train"], str(tmp_path / "fast"), *two))
    alone = train.main(train_args(image_data["train"], str(tmp_path / how), *two, "--small_map_convs", how))
    assert json.load(open(os.path.join(fast, "config.json")))["args"]["small_map_convs"] == "matmul"
    a, b = weights(fast), weights(alone)
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)   # last bits differ
    # the same run by the earlier version, interrupted, its config.json as that version wrote it
    flag = ("--one_pixel_convs", "matmul" if earlier else "conv")             # the earlier flag, still accepted
    with pytest.raises(SystemExit):
        train.main(train_args(image_data["train"], str(tmp_path / "old"), *two, *flag),
                   epoch_done=interrupt_after_epoch(1))
    old = tmp_path / "old" / "baseline" / "1_0.1" / "run_1"
    cfg = json.load(open(old / "config.json"))
    assert cfg["args"].pop("small_map_convs") == how
    cfg["args"].update(earlier)
    json.dump(cfg, open(old / "config.json", "w"))
    train.main(["--resume", str(old)])
    c = weights(old)
    assert all(torch.equal(b[k], c[k]) for k in b)
    cfg = json.load(open(old / "config.json"))
    assert small_map_convs_of(cfg["args"]) == how
    models = validation.Models(torch.device("cpu"))
    model = models.load(cfg, c)
    assert all(type(m) is kind for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    model = models.load(json.load(open(os.path.join(fast, "config.json"))), a)
    assert all(type(m) is SmallMapConv2d for m in model.modules() if isinstance(m, torch.nn.Conv2d))
