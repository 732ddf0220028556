"""The same command gives the same run on any machine: start methods, worker counts, batch sizes that
leave one image over, seeds, float32 and CUDA steps without host syncs."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import train
import validation
from conftest import ROOT, make_image_folder, run_train, train_args
from utils import UserError, available_cpus, cpu_name

START_METHODS = ["fork", "spawn", "forkserver"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("portable")
    return make_image_folder(base / "imgs", {"water-deer": 24, "roe-deer": 9}, size=(36, 30))


def _loader_cfg(workers, oversampling, seed=3):
    return {"seed": seed, "args": {"num_workers": workers, "batch_size": 8, "classes": ["water-deer", "roe-deer"],
                                   "oversampling": oversampling}}


def _epoch(dataset, labels, workers, oversampling, epoch, mp_context=None):
    loader, batches = train.make_loader(dataset, labels, _loader_cfg(workers, oversampling), torch.device("cpu"),
                                        mp_context=mp_context)
    batches.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("method", START_METHODS)
def test_every_loader_runs_under_each_start_method_and_gives_the_same_data(folder, method):
    """Decoding, training and evaluation loaders with 2 workers started by fork, spawn or forkserver
    give exactly what 0 workers give: the uint8 training batches of an epoch included."""
    images = data.find_class_images(folder, ["water-deer", "roe-deer"])
    paths = images["water-deer"] + images["roe-deer"]
    labels = [0] * 24 + [1] * 9
    cache, bad = data.decode_all(paths, 32, num_workers=0)
    cache2, bad2 = data.decode_all(paths, 32, num_workers=2, mp_context=method)        # decoding
    assert bad == bad2 == [] and torch.equal(cache, cache2)

    dataset = data.ImageSet(labels, 32, images=cache, transform=data.build_augment("paper"))
    for oversampling in (False, True):                                                 # training
        inline = _epoch(dataset, labels, 0, oversampling, epoch=2)
        workers = _epoch(dataset, labels, 2, oversampling, epoch=2, mp_context=method)
        assert len(inline) == len(workers) > 1
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(inline, workers))
        assert inline[0][0].dtype == torch.uint8

    ref = validation.TestImages(folder, 0).get(32, ["water-deer", "roe-deer"])        # evaluation
    got = validation.TestImages(folder, 2, mp_context=method).get(32, ["water-deer", "roe-deer"])
    assert torch.equal(ref[0], got[0]) and ref[1] == got[1]


def test_the_training_stream_does_not_depend_on_the_global_generator(folder):
    images = data.find_class_images(folder, ["water-deer", "roe-deer"])
    cache, _ = data.decode_all(images["water-deer"] + images["roe-deer"], 32)
    labels = [0] * 24 + [1] * 9
    dataset = data.ImageSet(labels, 32, images=cache, transform=data.build_augment("paper"))
    torch.manual_seed(1)
    a = _epoch(dataset, labels, 0, True, epoch=1)
    torch.manual_seed(2)
    b = _epoch(dataset, labels, 0, True, epoch=1)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    c = _epoch(dataset, labels, 0, True, epoch=2)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_train_and_validation_run_end_to_end_when_python_defaults_to_spawn(folder, tmp_path):
    """What macOS, Windows and (forkserver) Python 3.14 users get: the default start method is not fork."""
    script = (
        "import multiprocessing as mp, sys\n"
        "mp.set_start_method('spawn')\n"
        "import train, validation\n"
        f"run = train.main({train_args(folder, str(tmp_path), '--num_workers', '2', ratio='1:1')!r})\n"
        f"validation.main(['--model_root', {str(tmp_path / 'baseline')!r}, '--test_data_root', {folder!r},"
        " '--num_workers', '2'])\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.load(open(tmp_path / "baseline" / "results.json"))
    assert res["variants"]["baseline"]["1_1"]["summary"]["n_runs"] == 1


def test_a_last_batch_of_one_image_never_reaches_the_model_at_32_px(image_data, tmp_path):
    # 40 + 4 = 44 images; at batch 43 the last batch would hold 1 image, and layer4's output is 1x1 at 32 px
    run = run_train(image_data["train"], tmp_path, "--batch_size", "79", "--oversampling", "--contrastive")
    assert json.loads(open(os.path.join(run, "metrics.jsonl")).readline())["images"] == 79     # 2 x 40 = 1 mod 79
    run = run_train(image_data["train"], tmp_path, "--batch_size", "43", "--num_epochs", "2")
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    assert [json.loads(l)["images"] for l in lines] == [43, 43]
    with pytest.raises(UserError, match="--batch_size must be at least 2"):
        run_train(image_data["train"], tmp_path, "--batch_size", "1")


def test_a_negative_seed_is_a_clear_error(image_data, tmp_path):
    out = subprocess.run([sys.executable, "train.py", *train_args(image_data["train"], tmp_path, "--seed", "-1")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error: --seed must be a non-negative integer" in out.stderr
    assert "Traceback" not in out.stderr and not os.path.exists(tmp_path / "baseline")


def test_worker_defaults_use_the_cpus_this_process_may_use(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        assert available_cpus() == len(os.sched_getaffinity(0))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert available_cpus() == 1
    cfg = _loader_cfg(None, False)
    loader, _ = train.make_loader([0] * 4, [0, 0, 1, 1], cfg, torch.device("cpu"))
    assert loader.num_workers == 0                               # CPU training: no workers by default


def test_the_cpu_is_named_by_its_model_where_linux_says_it_and_by_platform_elsewhere(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n")
    assert cpu_name(str(info)) == "AMD EPYC 7B13"
    import platform
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")            # ARM Linux: no model name line
    assert cpu_name(str(info)) == "aarch64"
    assert cpu_name(str(tmp_path / "absent")) == "aarch64"             # no /proc (macOS, Windows)
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert cpu_name(str(tmp_path / "absent")) == "arm"


def test_float32_means_ieee_float32_in_training_and_evaluation(four_variants, image_data, monkeypatch):
    """TF32 is switched off (cuDNN convolutions and matmuls) before any float32 work; on CPU the flags
    are inert, on CUDA they make fp32 evaluation and --no-amp training exact float32."""
    save, _ = four_variants
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"            # the leaves set on their own, as
    torch.backends.cudnn.rnn.fp32_precision = "tf32"             # their defaults are
    validation.main(["--model_root", str(save / "baseline"), "--test_data_root", image_data["valid"]])
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cudnn.rnn.fp32_precision == "ieee"
    res = json.load(open(save / "baseline" / "results.json"))
    assert res["precision"] == "fp32"
    calls = []
    monkeypatch.setattr(train, "use_exact_float32", lambda: calls.append(1))
    with pytest.raises(UserError):
        train.main(["--resume", str(save / "nowhere")])
    assert calls == [1]                                          # train.py sets it first thing


def _in_sync_mode(fn, mode, then):
    """fn run under torch.cuda.set_sync_debug_mode(mode), which is set to then afterwards."""
    def wrapped(*a, **k):
        torch.cuda.set_sync_debug_mode(mode)
        try:
            return fn(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode(then)
    return wrapped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_training_epoch_makes_no_host_sync_but_the_planned_check(image_data, tmp_path, monkeypatch):
    """Inside the epoch every host sync is an error, except the planned finiteness check every
    FINITE_CHECK_EVERY steps and the epoch's summary after its last step."""
    monkeypatch.setattr(train, "train_one_epoch", _in_sync_mode(train.train_one_epoch, "error", "default"))
    monkeypatch.setattr(train, "check_finite", _in_sync_mode(train.check_finite, "default", "error"))
    monkeypatch.setattr(train, "epoch_metrics", _in_sync_mode(train.epoch_metrics, "default", "default"))
    run = run_train(image_data["train"], tmp_path, "--device", "cuda", "--contrastive", "--oversampling",
                    "--num_workers", "0")
    assert json.loads(open(os.path.join(run, "metrics.jsonl")).readline())["images"] == 80
