"""reproduce.py's cells side by side on a CPU: jobs x threads never above the CPUs, each cell with its
share of the cores, and every run equal to the same run trained alone with the same thread count."""
import json
import os

import pytest
import torch

import reproduce
from utils import UserError

CLASSES = ["water-deer", "roe-deer"]


def resolved(argv, cpus, monkeypatch, cuda=False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    args, _ = reproduce.parse(["--train_data_root", "D", "--classes", *CLASSES, *argv])
    return reproduce.side_by_side(args, cpus=cpus)


def test_jobs_times_threads_never_exceeds_the_cpus(monkeypatch):
    assert resolved([], 2, monkeypatch) == (2, 1)                      # the measured default: one thread each
    assert resolved([], 16, monkeypatch) == (16, 1)
    assert resolved(["--jobs", "1"], 2, monkeypatch) == (1, 2)
    assert resolved(["--threads", "2"], 2, monkeypatch) == (1, 2)
    assert resolved(["--jobs", "4"], 16, monkeypatch) == (4, 4)
    assert resolved(["--threads", "3"], 16, monkeypatch) == (5, 3)
    for jobs, threads, cpus in ((2, 2, 2), (3, None, 2), (None, 3, 2), (5, 4, 16)):
        argv = [*(["--jobs", str(jobs)] if jobs else []), *(["--threads", str(threads)] if threads else [])]
        with pytest.raises(UserError, match=f"threads on the {cpus} CPU"):
            resolved(argv, cpus, monkeypatch)
    for argv, cpus in (([], 2), (["--jobs", "1"], 2), (["--threads", "2"], 2), (["--jobs", "4"], 16), ([], 16)):
        jobs, threads = resolved(argv, cpus, monkeypatch)
        assert jobs * threads <= cpus
    assert resolved(["--task_id", "3"], 4, monkeypatch) == (1, 4)      # one cell (a Slurm task): all its CPUs
    assert resolved([], 8, monkeypatch, cuda=True) == (1, None)        # one CUDA device: as before
    assert resolved(["--gpus", "0,1", "--jobs_per_gpu", "2"], 8, monkeypatch, cuda=True) == (4, 2)


def grid(image_data, save, *extra):
    return ["--train_data_root", image_data["train"], "--classes", *CLASSES, "--save_root", str(save),
            "--variants", "baseline", "proposed", "--ratios", "0.1", "--runs", "2", "--num_epochs", "2",
            "--img_size", "32", "--weights", "none", "--batch_size", "16", "--device", "cpu", *extra]


def test_cells_side_by_side_equal_the_same_cells_one_at_a_time(image_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "available_cpus", lambda: 2)
    reproduce.main(grid(image_data, tmp_path / "alone", "--jobs", "1", "--threads", "1"))
    assert "4 run(s) to train, 0 already complete" in capsys.readouterr().out
    assert not (tmp_path / "alone" / "reproduce_logs").exists()         # in this process, one at a time
    reproduce.main(grid(image_data, tmp_path / "together"))             # the default here: 2 jobs x 1 thread
    out = capsys.readouterr().out
    assert "2 at once, 1 thread(s) each" in out and out.count("] done ") == 4
    assert len(os.listdir(tmp_path / "together" / "reproduce_logs")) == 4
    for variant in ("baseline", "proposed"):
        for k in (1, 2):
            runs = [tmp_path / root / variant / "1_0.1" / f"run_{k}" for root in ("alone", "together")]
            cfgs = [json.load(open(r / "config.json")) for r in runs]
            assert [c["threads"] for c in cfgs] == [1, 1] and cfgs[0]["fingerprint"] == cfgs[1]["fingerprint"]
            assert cfgs[1]["args"]["num_workers"] == 0                 # decoding in the cell's own process
            a, b = (torch.load(r / "best.pth", weights_only=True)["model"] for r in runs)
            assert all(torch.equal(a[n], b[n]) for n in a), (variant, k)
    reproduce.main(grid(image_data, tmp_path / "together"))             # resumes: nothing left to train
    assert "0 run(s) to train, 4 already complete" in capsys.readouterr().out


def test_evaluation_side_by_side_equals_the_same_evaluation_one_at_a_time(image_data, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.setattr(reproduce, "available_cpus", lambda: 2)
    evaluate = ["--test_data_root", image_data["valid"], "--select", "train_acc", "last"]
    reproduce.main(grid(image_data, tmp_path / "alone", "--jobs", "1", "--threads", "1", *evaluate))
    out = capsys.readouterr().out
    assert "evaluating" not in out and not (tmp_path / "alone" / "reproduce_logs").exists()
    reproduce.main(grid(image_data, tmp_path / "together", *evaluate))   # 2 jobs x 1 thread
    out = capsys.readouterr().out
    assert "evaluating 2 variant(s), 2 at once" in out and out.count("under 2 rule(s): done") == 2
    assert out.count("4 run(s) evaluated (4 from their recorded evaluation)") == 2   # the pass over the root
    for variant in ("baseline", "proposed"):
        log = (tmp_path / "together" / "reproduce_logs" / f"evaluate_{variant}.txt").read_text()
        assert log.count("evaluated ") >= 2 and "evaluated under another rule in this process" in log
    for name in ("results.json", "results_last.json"):
        alone, together = (json.load(open(tmp_path / root / name)) for root in ("alone", "together"))
        runs = [{r["run_dir"].replace(root, ""): (r["best_epoch"], r["metrics"], r["threads"])
                 for ratios in res["variants"].values() for e in ratios.values() for r in e["runs"]}
                for root, res in ((str(tmp_path / "alone"), alone), (str(tmp_path / "together"), together))]
        assert len(runs[0]) == 4 and runs[0] == runs[1], name        # 1 thread each: the same numbers
        assert all(t == 1 for _, _, t in runs[0].values())


def test_a_cell_run_in_this_process_gives_back_the_thread_count(image_data, tmp_path):
    import train
    before = torch.get_num_threads()
    run = train.main(["--train_data_root", image_data["train"], "--classes", *CLASSES, "--ratio", "1:0.1",
                      "--save_root", str(tmp_path), "--num_epochs", "1", "--img_size", "32", "--weights", "none",
                      "--batch_size", "16", "--threads", "1"])
    assert torch.get_num_threads() == before and json.load(open(os.path.join(run, "config.json")))["threads"] == 1
    with pytest.raises(UserError, match="--threads must be between 1 and"):
        train.main(["--train_data_root", image_data["train"], "--classes", *CLASSES, "--save_root", str(tmp_path),
                    "--threads", "100000"])
