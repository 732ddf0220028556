"""Model selection under three rules (train_acc, balanced_train_acc, last) and the study's pretrained
backbone: each rule's pick, the weights evaluated under it, and fine-tuning from a backbone built here."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import runs
import train
import validation
from conftest import train_args
from model import build_trained, confusion_matrix
from test_reproduce import write_idx
from utils import UserError

# Train Acc and per-class accuracies forced per epoch, so that the rules disagree:
#   train_acc picks epoch 1 (0.9), balanced_train_acc epoch 2 (0.8), last epoch 3
FORCED = {1: (0.9, [1.0, 0.0]), 2: (0.8, [0.8, 0.8]), 3: (0.7, [0.7, 0.7])}


@pytest.fixture
def forced_epochs(monkeypatch):
    real = train.epoch_metrics

    def forced(*a, **k):
        m = real(*a, **k)
        epoch = len(forced.seen) + 1
        forced.seen.append(epoch)
        acc, per_class = forced.values[epoch]
        m.update(train_acc=acc, per_class_acc=dict(zip(m["per_class_acc"], per_class)))
        return m
    forced.seen, forced.values = [], FORCED
    monkeypatch.setattr(train, "epoch_metrics", forced)
    return forced


def evaluate_file(path, test_root):
    """The confusion matrix of one weight file on the test folder, directly."""
    ckpt = torch.load(path, weights_only=True)
    cfg = ckpt["config"]
    images, labels = validation.TestImages(test_root, 0).get(cfg["args"]["img_size"], cfg["classes"])
    model = build_trained(cfg, ckpt["model"])
    return ckpt["epoch"], confusion_matrix(model, images, labels, 2, torch.device("cpu")).tolist()


def test_each_rule_picks_its_epoch_and_is_evaluated_with_that_epochs_weights(image_data, tmp_path, forced_epochs):
    run = train.main(train_args(image_data["train"], tmp_path, "--num_epochs", "3", "--no-keep_last"))
    assert json.load(open(os.path.join(run, "summary.json")))["selected"] == \
        {"train_acc": 1, "balanced_train_acc": 2, "last": 3}
    epochs = runs.parse_epochs(os.path.join(run, "train.log"))
    assert [(e, a, b) for e, a, b in epochs] == [(1, 0.9, 0.5), (2, 0.8, 0.8), (3, 0.7, 0.7)]
    files = {name: evaluate_file(os.path.join(run, name), image_data["valid"])
             for name in ("best.pth", "best_balanced.pth", "final.pth")}
    assert [files[n][0] for n in ("best.pth", "best_balanced.pth", "final.pth")] == [1, 2, 3]
    assert not os.path.exists(os.path.join(run, "last.pth"))
    weights = [torch.load(os.path.join(run, n), weights_only=True)["model"]["fc.weight"]
               for n in ("best.pth", "best_balanced.pth", "final.pth")]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    variant = os.path.dirname(os.path.dirname(run))
    for rule, name in (("train_acc", "best.pth"), ("balanced_train_acc", "best_balanced.pth"), ("last", "final.pth")):
        validation.main(["--model_root", variant, "--test_data_root", image_data["valid"], "--select", rule])
        out = "results.json" if rule == "train_acc" else f"results_{rule}.json"
        res = json.load(open(os.path.join(variant, out)))
        assert res["select"] == rule
        r = res["variants"]["baseline"]["1_0.1"]["runs"][0]
        assert r["best_epoch"] == files[name][0] and r["metrics"]["confusion_matrix"] == files[name][1], rule
        log = "result_log.txt" if rule == "train_acc" else f"result_log_{rule}.txt"
        assert f"--select {rule}" in open(os.path.join(variant, log)).read()


def test_a_file_is_kept_once_when_rules_agree_and_a_rule_not_kept_is_skipped_with_the_reason(
        image_data, tmp_path, forced_epochs):
    forced_epochs.values = {1: (0.6, [0.6, 0.6]), 2: (0.9, [0.9, 0.9]), 3: (0.7, [0.7, 0.7])}
    run = train.main(train_args(image_data["train"], tmp_path, "--num_epochs", "3", "--no-keep_last",
                                "--keep_selected", "train_acc", "balanced_train_acc"))
    assert sorted(f for f in os.listdir(run) if f.endswith(".pth")) == ["best.pth"]     # epoch 2 for both rules
    cfg, ckpt, epoch, value = runs.load_best(run, "balanced_train_acc")
    assert epoch == 2 == ckpt["epoch"] and value == 0.9
    with pytest.raises(runs.RunNotReady, match=r"kept the weights of train_acc, balanced_train_acc only"):
        runs.load_best(run, "last")


def test_an_epoch_that_two_rules_pick_is_evaluated_once_per_process_with_the_same_numbers(
        image_data, tmp_path, forced_epochs, monkeypatch):
    """train_acc and balanced_train_acc both pick epoch 2, last picks epoch 3: evaluating under the three
    rules in one process (as reproduce.py does) evaluates two sets of weights, and each rule's results
    equal a direct evaluation of its epoch's weight file; --reevaluate and a fresh process evaluate again."""
    forced_epochs.values = {1: (0.6, [0.6, 0.6]), 2: (0.9, [0.9, 0.9]), 3: (0.7, [0.7, 0.7])}
    run = train.main(train_args(image_data["train"], tmp_path, "--num_epochs", "3", "--no-keep_last"))
    files = {2: evaluate_file(os.path.join(run, "best.pth"), image_data["valid"])[1],
             3: evaluate_file(os.path.join(run, "final.pth"), image_data["valid"])[1]}
    real, calls = validation.evaluate_run, []

    def counted(cfg, ckpt, *a):
        calls.append(ckpt["epoch"])
        return real(cfg, ckpt, *a)
    monkeypatch.setattr(validation, "evaluate_run", counted)
    monkeypatch.setattr(validation, "_EVALUATED", {})
    monkeypatch.setattr(validation, "_TEST_IMAGES", {})
    loads, decodes, real_inspect, real_decode = [], [], validation.inspect_run, validation.data.decode_all
    monkeypatch.setattr(validation, "inspect_run", lambda *a: loads.append(a[2]) or real_inspect(*a))
    monkeypatch.setattr(validation.data, "decode_all", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    variant = os.path.dirname(os.path.dirname(run))
    for rule, epoch in (("train_acc", 2), ("balanced_train_acc", 2), ("last", 3)):
        validation.main(["--model_root", variant, "--test_data_root", image_data["valid"], "--select", rule])
        res = json.load(open(os.path.join(variant, validation.results_name(rule))))
        r = res["variants"]["baseline"]["1_0.1"]["runs"][0]
        assert r["best_epoch"] == epoch and r["metrics"]["confusion_matrix"] == files[epoch], rule
        assert r["best_train_acc"] == forced_epochs.values[epoch][0], rule
    assert calls == [2, 3]
    assert loads == ["train_acc", "last"]         # the repeat read no weights
    assert decodes == [1]                         # the test images decoded once for the three calls
    validation.main(["--model_root", variant, "--test_data_root", image_data["valid"], "--select",
                     "balanced_train_acc", "--reevaluate"])                 # asked for: evaluated afresh
    monkeypatch.setattr(validation, "_EVALUATED", {})             # another process
    os.remove(os.path.join(variant, validation.results_name("last")))
    validation.main(["--model_root", variant, "--test_data_root", image_data["valid"], "--select", "last"])
    assert calls == [2, 3, 2, 3]


def test_the_paper_rule_stays_the_default_and_results_name_the_rule(four_variants):
    save, run_dirs = four_variants
    cfg, ckpt, epoch, acc = runs.load_best(run_dirs["baseline"])
    assert (epoch, acc) == runs.best_epoch(runs.parse_train_log(os.path.join(run_dirs["baseline"], "train.log")))
    with pytest.raises(UserError, match="--select 'best' is not valid"):
        runs.load_best(run_dirs["baseline"], "best")


def test_balanced_train_acc_is_the_mean_of_the_logged_per_class_accuracies():
    assert runs.balanced_train_acc([0.9, 0.1]) == 0.5 and runs.balanced_train_acc([1.0, None, 0.5]) == 0.75
    assert runs.select_epoch([(1, 0.9, 0.5), (2, 0.8, 0.8), (3, 0.7, 0.8)], "balanced_train_acc") == (2, 0.8)
    assert runs.select_epoch([(1, 0.9, 0.5), (2, 0.9, 0.8)], "train_acc") == (1, 0.9)      # ties: the earliest
    assert runs.select_epoch([(1, 0.9, 0.5), (2, 0.9, 0.8)], "last") == (2, 0.9)


def fake_fashion_mnist(root, per_label_train=12, per_label_test=4):
    rng = np.random.default_rng(0)
    os.makedirs(root)
    for split, n in (("train", 10 * per_label_train), ("t10k", 10 * per_label_test)):
        labels = np.arange(n) % 10
        base = (labels[:, None, None] * 25).astype(np.int64)            # each label its own grey level
        write_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"),
                  np.clip(base + rng.integers(-10, 10, (n, 28, 28)), 0, 255))
        write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz"), labels)
    return root


def test_a_tiny_backbone_is_built_once_recorded_and_fine_tuned_through_weights(tmp_path, monkeypatch, image_data):
    import study
    src = fake_fashion_mnist(str(tmp_path / "src"))
    monkeypatch.setattr(study, "BACKBONE", {**study.BACKBONE, "images_per_class": 6, "num_epochs": 1, "batch_size": 8})
    monkeypatch.chdir(tmp_path)
    args = study.resolve(study.get_args_parser().parse_args(["--regime", "pretrained", "--source", src]))
    path = study.build_backbone(args)
    meta = json.load(open(os.path.join(args.backbone_dir, "backbone.json")))
    assert meta["settings"]["classes"] == list(study.BACKBONE_CLASSES) and meta["settings"]["num_epochs"] == 1
    assert meta["sha256"] == runs.file_sha256(path) and 0 <= meta["test_accuracy"] <= 1
    assert set(meta["test_per_class_accuracy"]) == set(study.BACKBONE_CLASSES)
    assert "--ratio all" in meta["command"] and "--classes pullover dress coat" in meta["command"]
    state = torch.load(path, weights_only=True)
    assert state["fc.weight"].shape == (7, 512)
    mtime = os.stat(path).st_mtime_ns
    assert study.build_backbone(args) == path and os.stat(path).st_mtime_ns == mtime      # reused, not rebuilt
    run = train.main(train_args(image_data["train"], tmp_path / "ft", "--weights", path))   # fine-tuned from it
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["fingerprint_settings"]["weights"] == "sha256:" + meta["sha256"]
    ft = torch.load(os.path.join(run, "best.pth"), weights_only=True)["model"]
    assert ft["fc.weight"].shape == (2, 512)                                       # a new head for the task
    assert not torch.equal(ft["conv1.weight"], state["conv1.weight"])              # and the backbone trained on


def test_the_study_plans_both_regimes(capsys):
    import study
    study.main(["--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("--num_epochs 3" in l and "--weights none" in l for l in lines)
    assert all("--select train_acc balanced_train_acc last" in l for l in lines)
    study.main(["--dry_run", "--regime", "pretrained"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "--ratios 0.1 0.01 0.005" in lines[0] and "backbone.pth" in lines[0]
    assert "--classes tshirt-top shirt" in lines[0] and " focal " not in lines[0]


def test_the_study_records_its_time_machine_and_the_cpus_it_may_use(tmp_path, monkeypatch):
    import study
    import utils
    monkeypatch.setattr(study.demo, "build_image_folders", lambda *a: {})
    monkeypatch.setattr(study, "reproduce_command", lambda *a: [sys.executable, "-c", "pass"])
    monkeypatch.setattr(study, "available_cpus", lambda: 1)           # e.g. a Slurm or taskset limit of one CPU
    study.main(["--save_root", str(tmp_path / "runs"), "--data_dir", str(tmp_path / "data"), "--conditions", "fine"])
    log = json.load(open(tmp_path / "runs" / "study_time.json"))
    assert log["cpus"] == 1 and log["machine_cpus"] == os.cpu_count() and log["cpu"] == utils.cpu_name()
    assert log["regime"] == "scratch" and log["conditions"]["fine"]["exit"] == 0 and log["seconds"] >= 0


def test_the_study_caps_the_cpu_kernels_as_the_demo_does(capsys, tmp_path, monkeypatch):
    """study.py --cpu_isa avx2 (the default) runs reproduce.py, the backbone's training and the probe with
    the variables demo.py sets, so that results/ repeats on x86-64 CPUs with AVX-512; native sets none."""
    import platform
    import study
    for k in study.demo.CPU_ISA["avx2"]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    study.main(["--dry_run", "--conditions", "fine"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ")
    study.main(["--dry_run", "--conditions", "fine", "--cpu_isa", "native"])
    assert capsys.readouterr().out.startswith(sys.executable)
    seen = []
    monkeypatch.setattr(study.demo, "build_image_folders", lambda *a: {})
    monkeypatch.setattr(study, "reproduce_command", lambda *a: [sys.executable, "-c", "import os; print(os.environ['MKL_CBWR'])"])
    real_run = study.subprocess.run
    monkeypatch.setattr(study.subprocess, "run", lambda cmd, env, **kw: seen.append(env["MKL_CBWR"]) or real_run(cmd, env=env, **kw))
    study.main(["--save_root", str(tmp_path / "runs"), "--data_dir", str(tmp_path / "data"), "--conditions", "fine"])
    assert seen == ["AVX2"]
    assert json.load(open(tmp_path / "runs" / "study_time.json"))["isa_env"]["MKL_CBWR"] == "AVX2"
