"""reproduce.py --slurm against a real single-node Slurm cluster (slurm_local_cluster.sh), not a mock."""
import json
import os
import shutil
import subprocess
import time

import pytest

import reproduce
import slurm
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "slurm_local_cluster.sh")
HAVE_SLURM = all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "mungekey", "sbatch"))


def test_array_spec_and_the_argv_every_job_runs():
    assert slurm.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and slurm.array_spec([3], 2) == "3%2"
    argv = ["--save_root", "s", "--slurm", "--slurm_args=--time=1:00:00 --mem=2G", "--max_parallel", "4",
            "--dry_run", "--num_epochs", "5"]
    assert slurm.grid_argv(argv) == ["--save_root", "s", "--num_epochs", "5"]


def test_an_abbreviated_flag_is_refused_before_any_job_is_written(image_data, tmp_path):
    import importlib
    argv = ["--train_data_root", image_data["train"], "--classes", "water-deer", "roe-deer", "--save_root",
            str(tmp_path), "--ratios", "0.1", "--runs", "1", "--slurm", "--max_par", "2", "--dry_run"]
    with pytest.raises(reproduce.UserError, match="--max_par 2: neither a reproduce.py flag nor a train.py flag"):
        reproduce.main(argv)
    assert not (tmp_path / "slurm").exists()
    for name in ("train", "validation", "reproduce", "report", "predict", "demo", "study", "bench", "prepare"):
        parser = importlib.import_module(name).get_args_parser()
        assert parser.allow_abbrev is False, name
    train = importlib.import_module("train").get_args_parser()
    assert train.parse_args(["--num_epochs", "3"]).num_epochs == 3
    with pytest.raises(SystemExit):                                      # argparse: unrecognized argument
        train.parse_args(["--num_epoch", "3"])


def test_dry_run_writes_plain_scripts_and_prints_the_sbatch_commands(image_data, tmp_path, capsys):
    argv = ["--train_data_root", image_data["train"], "--test_data_root", image_data["valid"], "--classes",
            "water-deer", "roe-deer", "--save_root", str(tmp_path), "--ratios", "0.1", "--runs", "2",
            "--num_epochs", "7", "--slurm", "--slurm_args=--partition=gpu --gres=gpu:1", "--max_parallel", "3",
            "--dry_run"]
    reproduce.main(argv)
    out = capsys.readouterr().out
    train = (tmp_path / "slurm" / "train_array.sbatch").read_text()
    evaluation = (tmp_path / "slurm" / "eval.sbatch").read_text()
    assert "#SBATCH --array=0-7%3" in train and "#SBATCH --partition=gpu" in train and "#SBATCH --gres=gpu:1" in train
    command = train.splitlines()[-1]
    assert command.endswith('--num_epochs 7 --task_id "$SLURM_ARRAY_TASK_ID"') and "--slurm" not in command
    assert "--eval_only" in evaluation and "#SBATCH --gres=gpu:1" in evaluation and "--array" not in evaluation
    assert f"sbatch --parsable {tmp_path / 'slurm' / 'train_array.sbatch'}" in out
    assert "sbatch --parsable '--dependency=afterany:<array job id>'" in out
    with pytest.raises(reproduce.UserError, match="--task_id"):
        reproduce.main(argv + ["--task_id", "1"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A single-node Slurm cluster for this module; stopped and removed afterwards, whatever happened."""
    if not HAVE_SLURM or os.geteuid() != 0:
        pytest.skip("needs root and Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge)")
    folder = str(tmp_path_factory.mktemp("slurm") / "cluster")
    out = subprocess.run([SCRIPT, "start", folder], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    try:
        yield os.path.join(folder, "slurm.conf")
    finally:
        subprocess.run([SCRIPT, "stop", folder], capture_output=True, timeout=60)


def wait_for(jobs, conf, timeout=600):
    env = dict(os.environ, SLURM_CONF=conf)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], capture_output=True, text=True, env=env)
        if out.returncode == 0 and not out.stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"jobs {jobs} still queued or running after {timeout} s")


def submitted(text):
    """The array and evaluation job ids that reproduce.py --slurm printed."""
    array = next((l.split()[3].rstrip(":") for l in text.splitlines() if l.startswith("submitted array job")), None)
    evaluation = next(l.split()[3].rstrip(",") for l in text.splitlines() if l.startswith("submitted evaluation job"))
    return array, evaluation


def run_metrics(save_root):
    """{(variant, ratio, run): confusion matrix} from the save root's results.json."""
    res = json.load(open(os.path.join(save_root, "results.json")))
    return {(v, r, os.path.basename(run["run_dir"])): run["metrics"]["confusion_matrix"]
            for v, ratios in res["variants"].items() for r, e in ratios.items() for run in e["runs"]}


def test_the_grid_on_a_real_scheduler_equals_the_in_process_grid_and_resubmits_only_what_failed(
        cluster, image_data, tmp_path, capsys, monkeypatch):
    grid = ["--train_data_root", image_data["train"], "--test_data_root", image_data["valid"], "--classes",
            "water-deer", "roe-deer", "--variants", "baseline", "proposed", "--ratios", "0.5", "0.1", "--runs", "2",
            "--num_epochs", "1", "--img_size", "32", "--weights", "none", "--batch_size", "16", "--device", "cpu",
            "--threads", "1"]                      # the same thread count in an array task as side by side here
    reproduce.main(grid + ["--save_root", str(tmp_path / "local")])               # the same grid, in-process

    on_slurm = tmp_path / "slurm_runs"
    blocked = on_slurm / "proposed" / "1_0.1" / "run_2"                          # this cell's first attempt fails:
    blocked.parent.mkdir(parents=True)                                           # a file is where its folder goes
    blocked.write_text("in the way")
    monkeypatch.setenv("SLURM_CONF", cluster)
    capsys.readouterr()
    reproduce.main(grid + ["--save_root", str(on_slurm), "--slurm", "--max_parallel", "2"])
    array, evaluation = submitted(capsys.readouterr().out)
    wait_for([array, evaluation], cluster)
    logs = on_slurm / "slurm" / "logs"
    failed_log = (logs / f"{array}_7.out").read_text()                           # cell 7: proposed, 1:0.1, run 2
    assert "cannot create a run folder" in failed_log
    eval_log = (logs / f"eval_{evaluation}.out").read_text()
    assert f"missing {blocked}" in eval_log and "7 run(s) evaluated" in eval_log
    assert len(run_metrics(on_slurm)) == 7
    cfg = json.load(open(on_slurm / "baseline" / "1_0.5" / "run_1" / "config.json"))
    assert cfg["slurm"]["array_job_id"] == array and cfg["slurm"]["array_task_id"] == "0" and cfg["slurm"]["node"]

    blocked.unlink()                                                             # fixed: resubmit the same command
    reproduce.main(grid + ["--save_root", str(on_slurm), "--slurm", "--max_parallel", "2"])
    out = capsys.readouterr().out
    assert "1 cell(s) to train, 7 already complete" in out
    assert "#SBATCH --array=7%2" in (on_slurm / "slurm" / "train_array.sbatch").read_text()
    array2, evaluation2 = submitted(out)
    wait_for([array2, evaluation2], cluster)
    assert sorted(os.listdir(logs)) == sorted([f"{array}_{i}.out" for i in range(8)] + [f"{array2}_7.out"]
                                              + [f"eval_{evaluation}.out", f"eval_{evaluation2}.out"])
    assert run_metrics(on_slurm) == run_metrics(tmp_path / "local")              # bit-identical on CPU
    assert (on_slurm / "table1.md").read_text() == (tmp_path / "local" / "table1.md").read_text()
