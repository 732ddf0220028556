"""train.py end to end on tiny generated images, one epoch at 32 px."""
import json
import os

import pytest
import torch

import train
from conftest import run_train, train_args
from runs import parse_train_log

RUN_FILES = {"config.json", "train.log", "metrics.jsonl", "best.pth", "last.pth", "summary.json"}


def test_each_variant_leaves_a_complete_run_folder(four_variants):
    save, runs = four_variants
    for variant, run_dir in runs.items():
        assert run_dir == os.path.join(str(save), variant, "1_0.1", "run_1")
        assert RUN_FILES <= set(os.listdir(run_dir))
        cfg = json.load(open(os.path.join(run_dir, "config.json")))
        assert cfg["variant"] == variant and cfg["classes"] == ["water-deer", "roe-deer"] and cfg["seed"] == 1
        assert cfg["counts"]["water-deer"]["used"] == 40 and cfg["counts"]["roe-deer"]["used"] == 4
        for key in ("git_commit", "torch", "torchvision", "subset_sha1"):
            assert key in cfg
        epochs = parse_train_log(os.path.join(run_dir, "train.log"))
        assert [e for e, _ in epochs] == [1]
        line = open(os.path.join(run_dir, "train.log")).readline()
        assert "acc[water-deer]" in line and "acc[roe-deer]" in line and " ce " in line
        assert ("L_c[layer3]" in line and "L_c[layer4]" in line) == (variant in ("contrastive", "proposed"))
        for name in ("best.pth", "last.pth"):
            ckpt = torch.load(os.path.join(run_dir, name), weights_only=True)
            assert ckpt["epoch"] == 1 and "conv1.weight" in ckpt["model"]
        assert "optimizer" in torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)


def test_oversampling_epoch_is_classes_times_majority(four_variants):
    _, runs = four_variants
    images = {v: json.loads(open(os.path.join(r, "metrics.jsonl")).readline())["images"] for v, r in runs.items()}
    assert images == {"baseline": 44, "contrastive": 44, "oversampling": 80, "proposed": 80}


def test_runs_number_themselves_and_seed_defaults_to_the_run_number(image_data, tmp_path):
    first = run_train(image_data["train"], tmp_path, "--augment", "plain")
    second = run_train(image_data["train"], tmp_path, "--augment", "plain")
    assert first.endswith("run_1") and second.endswith("run_2")
    seeds = [json.load(open(os.path.join(r, "config.json")))["seed"] for r in (first, second)]
    subsets = [json.load(open(os.path.join(r, "config.json")))["subset_sha1"] for r in (first, second)]
    assert seeds == [1, 2] and subsets[0] != subsets[1]
    third = run_train(image_data["train"], tmp_path, "--augment", "plain", "--seed", "1", "--run_id", "7")
    assert third.endswith("run_7")
    a, b = (torch.load(os.path.join(r, "last.pth"), weights_only=True)["model"] for r in (first, third))
    assert all(torch.equal(a[k], b[k]) for k in a)   # same seed, same data: the same weights


def test_cache_off_gives_the_same_weights_as_cache_on(image_data, tmp_path):
    on = run_train(image_data["train"], tmp_path / "on", "--seed", "3")
    off = run_train(image_data["train"], tmp_path / "off", "--seed", "3", "--no-cache")
    a, b = (torch.load(os.path.join(r, "last.pth"), weights_only=True)["model"] for r in (on, off))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(os.path.join(off, "config.json")))["cache_bytes"] == 0


def test_flags_change_what_they_claim(image_data, tmp_path):
    run = run_train(image_data["train"], tmp_path, "--contrastive", "--contrastive_layers", "layer2",
                    "--optimizer", "sgd", "--max_per_class", "20", "--contrastive_weight", "0")
    line = open(os.path.join(run, "train.log")).readline()
    assert "L_c[layer2]" in line and "L_c[layer3]" not in line
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["counts"]["water-deer"]["used"] == 20 and cfg["counts"]["roe-deer"]["used"] == 2
    opt = torch.load(os.path.join(run, "last.pth"), weights_only=True)["optimizer"]
    assert opt["param_groups"][0]["momentum"] == 0.9      # SGD, not Adam
    three = run_train(image_data["train"], tmp_path, ratio="1:0.5:0.25",
                      classes=("wild-boar", "water-deer", "roe-deer"))
    assert three.endswith(os.path.join("baseline", "1_0.5_0.25", "run_1"))
    counts = json.load(open(os.path.join(three, "config.json")))["counts"]
    assert [counts[c]["used"] for c in ("wild-boar", "water-deer", "roe-deer")] == [30, 15, 8]


def test_contrastive_weight_changes_the_training(image_data, tmp_path):
    runs = [run_train(image_data["train"], tmp_path / w, "--contrastive", "--seed", "5", "--contrastive_weight", w,
                      "--augment", "plain") for w in ("0", "1")]
    a, b = (torch.load(os.path.join(r, "last.pth"), weights_only=True)["model"] for r in runs)
    assert not torch.equal(a["layer3.0.conv1.weight"], b["layer3.0.conv1.weight"])
    base = run_train(image_data["train"], tmp_path / "base", "--seed", "5", "--augment", "plain")
    c = torch.load(os.path.join(base, "last.pth"), weights_only=True)["model"]
    assert all(torch.equal(a[k], c[k]) for k in a)  # weight 0: exactly the baseline


def test_help_states_the_paper_defaults(capsys):
    import train
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    for text in ("paper: batch size 64".replace("batch size ", ""), "paper: 0.001", "paper: 100", "layer3 layer4"):
        assert text in out


def test_lr_and_num_workers_reach_the_optimizer_and_loader(image_data, tmp_path):
    run = run_train(image_data["train"], tmp_path, "--lr", "0.01", "--num_workers", "1", "--seed", "2")
    opt = torch.load(os.path.join(run, "last.pth"), weights_only=True)["optimizer"]
    assert opt["param_groups"][0]["lr"] == 0.01
    import train
    cfg = json.load(open(os.path.join(run, "config.json")))
    # the optimizer that trained is the one config.json names (the fused and the loop implementations
    # differ in the last bits)
    assert opt["param_groups"][0]["fused"] is True and cfg["optimizer_impl"] == "fused"
    loader, _ = train.make_loader([0] * 4, [0, 0, 1, 1], cfg, torch.device("cpu"))
    assert loader.num_workers == 1 and not loader.pin_memory


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_every_optimizer_is_torchs_fused_one_and_steps_like_the_loop_to_1e_6(name):
    torch.manual_seed(0)
    models = [torch.nn.Linear(20, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [train.make_optimizer(name, models[0].parameters(), 0.01),
            {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name](
                models[1].parameters(), lr=0.01, **({"momentum": 0.9} if name == "sgd" else {}))]
    assert opts[0].defaults["fused"] is True and not opts[1].defaults.get("fused")
    x, y = torch.randn(32, 20), torch.arange(32) % 3
    for _ in range(20):
        for m, o in zip(models, opts):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_compile_wraps_the_forward_pass(image_data, tmp_path, monkeypatch):
    import train
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module
    monkeypatch.setattr(torch, "compile", fake_compile)
    run_train(image_data["train"], tmp_path, "--compile", "--contrastive")
    assert len(compiled) == 1 and isinstance(compiled[0], train.Tapped)
    assert compiled[0].taps == ("layer3", "layer4")
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: modes.append(mode) or module)
    net = torch.nn.Linear(2, 2)
    assert train.compiled(net, False) is net and modes == []
    for mode in (True, "default", "reduce-overhead", "max-autotune-no-cudagraphs"):   # True: runs before modes
        assert train.compiled(net, mode) is net
    assert modes == [None, None, "reduce-overhead", "max-autotune-no-cudagraphs"]
    args = train.get_args_parser().parse_args
    assert args([]).compile is False and args(["--compile"]).compile == "default"
    assert args(["--compile", "reduce-overhead", "--contrastive"]).compile == "reduce-overhead"


def test_amp_and_channels_last_apply_on_cuda_only(monkeypatch):
    import train
    seen = {}
    real = torch.autocast

    def spy(device_type, dtype=None, enabled=True):
        seen["autocast"] = (device_type, enabled)
        return real(device_type, dtype=dtype, enabled=enabled)
    monkeypatch.setattr(torch, "autocast", spy)
    cfg = {"args": {"classes": ["a", "b"], "amp": True, "channels_last": True, "contrastive_weight": 1.0}}
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    net = lambda x: (model(x), {})
    loader = [(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train = lambda mode=True: model
    net.train = lambda: None
    from losses import Criterion
    criterion = Criterion({"contrastive_weight": 1.0, "num_epochs": 1}, [2, 2], torch.device("cpu"))
    train.train_one_epoch(net, loader, opt, criterion, torch.device("cpu"), cfg, "t")
    assert seen["autocast"] == ("cpu", False)      # --amp is a CUDA option: off on CPU


def test_a_non_finite_loss_stops_the_run_with_a_clear_message(image_data, tmp_path, monkeypatch):
    import losses
    from utils import UserError
    real = losses.Criterion.__call__

    def nan_loss(*a, **k):
        total, terms = real(*a, **k)
        return total * float("nan"), terms
    monkeypatch.setattr(losses.Criterion, "__call__", nan_loss)
    with pytest.raises(UserError, match="non-finite"):
        run_train(image_data["train"], tmp_path)
    log = open(os.path.join(tmp_path, "baseline", "1_0.1", "run_1", "train.log")).read()
    assert "Stopped:" in log and "non-finite" in log


def test_epoch_done_is_called_after_each_epoch_before_its_checkpoint(image_data, tmp_path):
    calls = []

    def epoch_done(epoch, metrics):
        last = tmp_path / "baseline" / "1_0.1" / "run_1" / "last.pth"
        saved_epoch = torch.load(last, weights_only=True)["epoch"] if last.exists() else None
        calls.append((epoch, metrics["images"], saved_epoch))
    train.main(train_args(image_data["train"], str(tmp_path), "--num_epochs", "2"), epoch_done=epoch_done)
    # the current epoch's checkpoint is never written yet (the previous one may still be in flight)
    assert [c[:2] for c in calls] == [(1, 44), (2, 44)] and calls[0][2] is None and calls[1][2] in (None, 1)


def test_no_keep_last_leaves_best_pth_only_and_the_run_still_evaluates(image_data, tmp_path):
    from runs import load_best
    run = run_train(image_data["train"], tmp_path, "--num_epochs", "2", "--no-keep_last", "--keep_selected", "train_acc")
    assert sorted(f for f in os.listdir(run) if f.endswith(".pth")) == ["best.pth"]
    cfg, ckpt, epoch, _ = load_best(run)
    assert ckpt["epoch"] == epoch and cfg["args"]["keep_last"] is False
    kept = run_train(image_data["train"], tmp_path / "kept", "--num_epochs", "2")
    assert os.path.isfile(os.path.join(kept, "last.pth"))
    a, b = (json.load(open(os.path.join(r, "config.json")))["fingerprint"] for r in (run, kept))
    assert a == b                                            # the same run, only a file less


def written_checkpoints(monkeypatch):
    """[(file name, epoch)] of every checkpoint train.py writes from now on, in order."""
    import utils
    real, written = utils.save_checkpoint, []

    def record(path, ckpt):
        written.append((os.path.basename(path), ckpt["epoch"]))
        real(path, ckpt)
    monkeypatch.setattr(utils, "save_checkpoint", record)
    monkeypatch.setattr(train, "save_checkpoint", record)
    return written


def test_checkpoints_are_held_in_memory_between_writes_and_the_weights_do_not_depend_on_it(image_data, tmp_path,
                                                                                          monkeypatch):
    written = written_checkpoints(monkeypatch)
    held = run_train(image_data["train"], tmp_path / "held", "--num_epochs", "3")     # 60 s: 3 short epochs
    assert [w for w in written if w[0] == "last.pth"] == [("last.pth", 3)]
    best = json.load(open(os.path.join(held, "summary.json")))["best_epoch"]
    assert torch.load(os.path.join(held, "best.pth"), weights_only=True)["epoch"] == best
    assert [w for w in written if w[0] == "best.pth"] == [("best.pth", best)]         # the newest only
    del written[:]
    every = run_train(image_data["train"], tmp_path / "every", "--num_epochs", "3", "--checkpoint_every", "0")
    assert [w for w in written if w[0] == "last.pth"] == [("last.pth", 1), ("last.pth", 2), ("last.pth", 3)]
    a, b = (torch.load(os.path.join(r, "last.pth"), weights_only=True) for r in (held, every))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.load(open(os.path.join(held, "config.json")))["args"]["checkpoint_every"] == 60.0


def test_no_keep_last_never_writes_the_last_epochs_last_pth(image_data, tmp_path, monkeypatch):
    written = written_checkpoints(monkeypatch)
    run = run_train(image_data["train"], tmp_path, "--num_epochs", "2", "--no-keep_last", "--checkpoint_every", "0",
                    "--keep_selected", "train_acc")
    assert ("last.pth", 1) in written and ("last.pth", 2) not in written
    assert sorted(f for f in os.listdir(run) if f.endswith(".pth")) == ["best.pth"]


def test_an_interrupt_writes_the_held_epoch_and_resume_gives_the_weights_of_an_uninterrupted_run(image_data,
                                                                                                tmp_path):
    def interrupt(epoch, metrics):
        if epoch == 3:                       # epoch 3 trained, not recorded; epochs 1 and 2 only held so far
            raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        train.main(train_args(image_data["train"], tmp_path / "a", "--num_epochs", "3"), epoch_done=interrupt)
    assert e.value.code == 130
    run = tmp_path / "a" / "baseline" / "1_0.1" / "run_1"
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 2
    assert "Interrupted during epoch 3 (KeyboardInterrupt); last.pth holds epoch 2" in (run / "train.log").read_text()
    train.main(["--resume", str(run)])
    straight = run_train(image_data["train"], tmp_path / "b", "--num_epochs", "3")
    a, b = (torch.load(os.path.join(r, "last.pth"), weights_only=True)["model"] for r in (run, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(l)["epoch"] for l in open(run / "metrics.jsonl")] == [1, 2, 3]


def test_a_run_killed_outright_between_writes_trains_its_unsaved_epochs_again(image_data, tmp_path):
    class Killed(Exception):
        """Stands for SIGKILL: nothing of train.py runs after it."""

    def kill(epoch, metrics):
        if epoch == 3:
            raise Killed
    with pytest.raises(Killed):
        train.main(train_args(image_data["train"], tmp_path / "a", "--num_epochs", "3"), epoch_done=kill)
    run = tmp_path / "a" / "baseline" / "1_0.1" / "run_1"
    assert not (run / "last.pth").exists() and len(open(run / "metrics.jsonl").readlines()) == 2
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "trai')                                  # a line cut off by the kill
    train.main(["--resume", str(run)])
    straight = run_train(image_data["train"], tmp_path / "b", "--num_epochs", "3")
    a, b = (torch.load(os.path.join(r, "last.pth"), weights_only=True)["model"] for r in (run, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert [m["epoch"] for m in epochs] == [1, 2, 3]
    assert [m["train_acc"] for m in epochs] == [json.loads(l)["train_acc"] for l in open(straight + "/metrics.jsonl")]
    assert "metrics.jsonl: 3 line(s) of epoch 1 or later dropped" in (run / "train.log").read_text()


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_checkpoint_every_must_be_a_non_negative_number_of_seconds(image_data, tmp_path, value):
    from utils import UserError
    with pytest.raises(UserError, match="--checkpoint_every must be a number of seconds, 0 or more"):
        run_train(image_data["train"], tmp_path, "--checkpoint_every", value)
    assert not os.path.exists(tmp_path / "baseline")
