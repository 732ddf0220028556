"""Bad input, faults and unsafe checkpoints: a clear message, never a lost run or a silent mislabel."""
import json
import multiprocessing as mp
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import data
import runs
import utils
from conftest import ROOT, make_image_folder, run_train, train_args
from utils import UserError


def cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def default_sigint():
    """In a child: SIGINT's default disposition, whatever was inherited (a shell's background job or nohup
    starts it ignored, and Python then raises no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def sigint_raises():
    """In this process: Ctrl-C raises KeyboardInterrupt, whatever disposition the test run inherited."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


# ---------------------------------------------------------------- bad flags and folders

@pytest.mark.parametrize("ratio", ["1:x", "1:-0.1", "1:0", "0:1", "1:0.1:0.1"])
def test_malformed_ratio_is_a_clear_error_without_traceback(image_data, tmp_path, ratio):
    out = cli("train.py", *train_args(image_data["train"], tmp_path, ratio=ratio))
    assert out.returncode == 2 and "error: --ratio" in out.stderr and "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "baseline")   # nothing created


def test_unknown_or_repeated_class_and_hidden_folders(image_data, tmp_path):
    root = tmp_path / "train"
    shutil.copytree(image_data["train"], root)
    os.makedirs(root / ".ipynb_checkpoints")
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "x.jpg")
    os.makedirs(root / "water-deer" / ".git")
    Image.new("RGB", (8, 8)).save(root / "water-deer" / ".git" / "hidden.jpg")
    assert data.list_class_folders(str(root)) == ["roe-deer", "water-deer", "wild-boar"]
    assert len(data.list_images(str(root / "water-deer"))) == 40
    out = cli("train.py", *train_args(str(root), tmp_path, classes=("water-deer", "red-deer")))
    assert out.returncode == 2 and "no folder 'red-deer'" in out.stderr
    assert "roe-deer, water-deer, wild-boar" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(UserError, match="twice"):
        run_train(str(root), tmp_path, classes=("water-deer", "water-deer"))
    with pytest.raises(UserError, match="no folder '.ipynb_checkpoints'"):
        run_train(str(root), tmp_path, classes=("water-deer", ".ipynb_checkpoints"))


def test_empty_class_folder_and_a_ratio_that_would_leave_zero_images(image_data, tmp_path, capsys):
    root = tmp_path / "train"
    shutil.copytree(image_data["train"], root)
    os.makedirs(root / "empty")
    with pytest.raises(UserError, match="empty hold no image"):
        run_train(str(root), tmp_path, classes=("water-deer", "empty"))
    run = run_train(str(root), tmp_path, ratio="1:0.001")
    assert "keeping 1" in capsys.readouterr().err
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["counts"]["roe-deer"]["used"] == 1 and any("keeping 1" in n for n in cfg["notes"])


# ---------------------------------------------------------------- broken and unusual images

def png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_broken_files(folder):
    """Four broken files and a decompression bomb; returns their paths."""
    good = folder / "000.jpg"
    paths = {"random.jpg": os.urandom(2000), "truncated.jpg": good.read_bytes()[:300],
             "document.png": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", "empty.jpg": b"",
             "bomb.png": b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
             + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")}
    for name, content in paths.items():
        (folder / name).write_bytes(content)
    return sorted(str(folder / n) for n in paths)


def test_broken_files_are_skipped_listed_and_recorded_or_refused_with_strict(image_data, tmp_path):
    root = tmp_path / "train"
    shutil.copytree(image_data["train"], root)
    broken = write_broken_files(root / "roe-deer")
    out = cli("train.py", *train_args(str(root), tmp_path, ratio="1:1"))
    assert out.returncode == 0, out.stderr
    assert "skipping 5 broken image file(s)" in out.stderr and all(p in out.stderr for p in broken)
    cfg = json.load(open(tmp_path / "baseline" / "1_1" / "run_1" / "config.json"))
    assert cfg["n_bad_images"] == 5 and sorted(cfg["bad_images"]) == broken
    assert cfg["counts"]["roe-deer"]["used"] == 30
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    out = cli("train.py", *train_args(str(root), tmp_path, "--strict", ratio="1:1"))
    assert out.returncode == 2 and "--strict: 5 broken image file(s)" in out.stderr
    assert "Traceback" not in out.stderr and not os.path.exists(tmp_path / "baseline" / "1_1" / "run_2")


def test_every_image_mode_becomes_rgb_and_16_bit_is_scaled(tmp_path):
    grey16 = np.full((10, 12), 30000, dtype=np.uint16)
    images = {"cmyk.jpg": Image.new("CMYK", (12, 10), (0, 255, 255, 0)),
              "rgba.png": Image.new("RGBA", (12, 10), (10, 20, 30, 128)),
              "palette.png": Image.new("RGB", (12, 10), (200, 10, 10)).convert("P"),
              "grey.png": Image.new("L", (12, 10), 77),
              "grey16.png": Image.fromarray(grey16)}
    for name, im in images.items():
        im.save(tmp_path / name)
    for name in images:
        arr = data.load_image(str(tmp_path / name), 8)
        assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8, name
    assert (data.load_image(str(tmp_path / "grey16.png"), 8) == round(30000 * 255 / 65535)).all()  # 117, not 255
    assert (data.load_image(str(tmp_path / "grey.png"), 8) == 77).all()
    assert data.load_image(str(tmp_path / "cmyk.jpg"), 8)[..., 0].mean() > 200       # CMYK cyan=0: red


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    write_broken_files_dir = tmp_path / "x"
    write_broken_files_dir.mkdir()
    make_image_folder(tmp_path / "y", {"a": 1})
    shutil.copy(tmp_path / "y" / "a" / "000.jpg", write_broken_files_dir / "000.jpg")
    write_broken_files(write_broken_files_dir)
    with pytest.raises(data.BadImage):
        data.load_image(str(write_broken_files_dir / "bomb.png"), 32)


# ---------------------------------------------------------------- interruptions and concurrency

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(train.py arguments, last.pth weights) of a 2-epoch run that nothing interrupts."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    train_root = make_image_folder(tmp / "imgs", {"water-deer": 300, "roe-deer": 300}, size=(32, 32))
    args = ["--classes", "water-deer", "roe-deer", "--ratio", "1:1", "--num_epochs", "2", "--img_size", "32",
            "--weights", "none", "--batch_size", "16", "--seed", "11", "--train_data_root", train_root]
    assert cli("train.py", *args, "--save_root", str(tmp / "a")).returncode == 0
    return args, torch.load(tmp / "a" / "baseline" / "1_1" / "run_1" / "last.pth", weights_only=True)["model"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])   # kill, and Ctrl-C
def test_a_signal_mid_epoch_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, sig, uninterrupted):
    args, a = uninterrupted
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--save_root", str(tmp_path / "b")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=default_sigint)
    run = tmp_path / "b" / "baseline" / "1_1" / "run_1"
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "train.log").exists():
        time.sleep(0.05)
    proc.send_signal(sig)                                # during epoch 2
    assert proc.wait(timeout=60) == 130
    log = (run / "train.log").read_text()
    assert "Interrupted during epoch 2" in log and f"--resume {run}" in log and "Epoch 2/2" not in log
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1
    assert not (run / "summary.json").exists()
    out = cli("train.py", "--resume", str(run))
    assert out.returncode == 0, out.stderr
    b = torch.load(run / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "Resumed from last.pth at epoch 1" in (run / "train.log").read_text()


def _claim(parent, barrier, out):
    barrier.wait()
    out.put(runs.claim_run_dir(parent))


def test_runs_started_together_get_distinct_folders(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(tmp_path), barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    claimed = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join()
    assert claimed == [str(tmp_path / f"run_{i}") for i in range(1, 5)]


def test_four_train_processes_at_once_get_four_run_folders(image_data, tmp_path):
    procs = [subprocess.Popen([sys.executable, "train.py", *train_args(image_data["train"], tmp_path)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    runs = sorted(os.listdir(tmp_path / "baseline" / "1_0.1"))
    assert runs == ["run_1", "run_2", "run_3", "run_4"]
    seeds = {json.load(open(tmp_path / "baseline" / "1_0.1" / r / "config.json"))["seed"] for r in runs}
    assert seeds == {1, 2, 3, 4}


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "best.pth"
    utils.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["best.pth"]       # no temporary file left behind


def test_a_disk_that_fills_while_torch_save_writes_gives_a_write_error_naming_the_file(tmp_path, monkeypatch):
    """torch.save writes straight into the temporary file; a write that fails half-way (a full disk)
    is reported as that OSError, naming the checkpoint, not as torch's 'unexpected pos' RuntimeError."""
    import errno
    import io
    path = tmp_path / "last.pth"
    utils.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    class FillingFile(io.BufferedWriter):
        written = 0

        def write(self, b):
            n = memoryview(b).nbytes
            if self.written + n > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += n
            return super().write(b)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FillingFile(io.FileIO(fd, "wb")))
    with pytest.raises(utils.WriteError) as e:
        utils.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(100_000)})
    assert f"could not write {path}" in str(e.value) and "disk is full" in str(e.value)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]       # no temporary file left behind


# ---------------------------------------------------------------- unsafe checkpoints

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_a_pickled_callable_is_refused_without_running_it(tmp_path, four_variants, image_data):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload(marker)}, evil)
    with pytest.raises(UserError, match="weights_only=True"):
        utils.load_checkpoint(evil)
    out = cli("train.py", *train_args(image_data["train"], tmp_path / "s"), "--weights", str(evil))
    assert out.returncode == 2 and "could not be loaded safely" in out.stderr and "Traceback" not in out.stderr
    save, runs = four_variants
    variant = tmp_path / "v"
    shutil.copytree(os.path.dirname(runs["baseline"]), variant / "1_0.1")
    for name in ("best.pth", "last.pth"):
        shutil.copy(evil, variant / "1_0.1" / "run_1" / name)
    out = cli("validation.py", "--model_root", str(variant), "--test_data_root", image_data["valid"])
    assert out.returncode == 1 and "could not be loaded safely" in out.stdout
    assert not marker.exists()


def test_requirements_keep_a_torch_with_the_weights_only_fixes():
    reqs = open(os.path.join(ROOT, "requirements.txt")).read().split()
    assert "torch>=2.10" in reqs


def test_offline_imagenet_weights_leave_no_run_folder(image_data, tmp_path, monkeypatch):
    import urllib.error
    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, "get_state_dict", offline)
    args = [a for a in train_args(image_data["train"], tmp_path) if a != "none"]
    args[args.index("--weights"):args.index("--weights") + 1] = ["--weights", "imagenet"]
    import train
    with pytest.raises(UserError, match="--weights none"):
        train.main(args)
    assert os.listdir(tmp_path / "baseline" / "1_0.1") == []


def test_a_signal_inside_signals_deferred_takes_effect_at_its_end(sigint_raises):
    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with utils.signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)                      # a handler would have run by now
            done.append("the whole block")
    assert done == ["the whole block"] and signal.getsignal(signal.SIGINT) is before


def test_an_interrupt_while_an_epoch_is_recorded_waits_until_it_is_recorded(image_data, tmp_path, monkeypatch,
                                                                           sigint_raises):
    import train
    real = train.append_line

    def append_then_interrupt(path, line):
        real(path, line)
        if line.startswith("Epoch 1/"):               # between train.log's line and metrics.jsonl's
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    monkeypatch.setattr(train, "append_line", append_then_interrupt)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(image_data["train"], str(tmp_path), "--num_epochs", "2"))
    assert e.value.code == 130
    run = tmp_path / "baseline" / "1_0.1" / "run_1"
    log = (run / "train.log").read_text()
    assert "Epoch 1/2" in log and "Interrupted during epoch 2 (KeyboardInterrupt); last.pth holds epoch 1" in log
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------- file systems that say no

def test_an_output_location_that_cannot_be_used_is_named_before_any_work(image_data, four_variants, tmp_path):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("not a folder")
    out = cli("train.py", *train_args(image_data["train"], in_the_way))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--save_root" in out.stderr and str(in_the_way) in out.stderr
    save, _ = four_variants
    out = cli("report.py", "--save_root", str(save), "--out", str(in_the_way))
    assert out.returncode == 2 and f"error: --out {in_the_way} cannot be used" in out.stderr
    assert "Traceback" not in out.stderr
    out = cli("reproduce.py", "--train_data_root", image_data["train"], "--classes", "water-deer", "roe-deer",
              "--save_root", str(in_the_way / "runs"), "--runs", "1", "--ratios", "0.1")
    assert out.returncode == 2 and str(in_the_way) in out.stderr and "Traceback" not in out.stderr
    assert in_the_way.read_text() == "not a folder"                 # nothing already written is lost


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_evaluating(four_variants, image_data, tmp_path):
    save, _ = four_variants
    variant = tmp_path / "baseline"
    shutil.copytree(save / "baseline", variant)
    os.chmod(variant, 0o555)
    try:
        out = cli("validation.py", "--model_root", str(variant), "--test_data_root", image_data["valid"])
    finally:
        os.chmod(variant, 0o755)
    assert out.returncode == 2 and f"--model_root {variant} cannot be used" in out.stderr
    assert "evaluated" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds the file being written through /proc")
def test_a_full_disk_while_saving_a_checkpoint_stops_the_run_cleanly_and_resume_continues(image_data, tmp_path,
                                                                                           monkeypatch):
    """The background writer's write of epoch 2's last.pth (--checkpoint_every 0: after every epoch) fails
    as a full disk does (at fsync): the run stops with a message naming the file, last.pth still holds
    epoch 1, and --resume finishes the run."""
    import errno
    import train
    real_fsync, failed = os.fsync, []
    run = tmp_path / "baseline" / "1_0.1" / "run_1"

    def full_disk(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".last.pth." in name and (run / "last.pth").exists():       # the second last.pth: epoch 2's
            failed.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UserError) as e:
        train.main(train_args(image_data["train"], str(tmp_path), "--num_epochs", "3", "--checkpoint_every", "0"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    msg = str(e.value)
    assert failed and "could not write" in msg and str(run / "last.pth") in msg and "disk is full" in msg
    assert "last.pth holds epoch 1" in msg and f"--resume {run}" in msg
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]          # no half-written file left
    assert "Stopped:" in (run / "train.log").read_text() and not (run / "summary.json").exists()
    train.main(["--resume", str(run)])
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 3 and (run / "summary.json").exists()
