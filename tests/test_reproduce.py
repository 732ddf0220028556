"""reproduce.py's plan and resumption, report.py's tables and figure, demo.py's dataset builder."""
import gzip
import json
import os
import sys

import numpy as np
import pytest

import demo
import report
import reproduce
from utils import UserError

GRID = ["--train_data_root", "D", "--test_data_root", "V", "--classes", "water-deer", "roe-deer"]


def plan_lines(capsys, argv):
    capsys.readouterr()   # drop what earlier calls printed
    reproduce.main(argv + ["--dry_run"])
    return [l for l in capsys.readouterr().out.splitlines() if l.strip()]



def test_dry_run_of_the_default_grid_has_200_train_commands(capsys, tmp_path):
    lines = plan_lines(capsys, GRID + ["--save_root", str(tmp_path), "--num_epochs", "7"])
    assert len(lines) == 200 and all(l.startswith("python3 train.py ") for l in lines)
    assert sum("--contrastive --oversampling" in l for l in lines) == 50
    assert sum("--ratio 1:0.005 " in l for l in lines) == 40
    assert all(l.endswith("--num_epochs 7 --threads 1") for l in lines)   # other flags pass through unchanged,
                                                                   # then the machine's (conftest: 1 CPU)
    assert len({l for l in lines}) == 200


def fake_run(run_dir, argv, cell, *files):
    """A run folder whose config.json carries the fingerprint the plan gives cell, plus empty files."""
    import runs
    import train
    args, passthrough = reproduce.parse(argv)
    command = reproduce.fresh_command(args, passthrough, cell)[1:]
    a = train.resolved_args(train.get_args_parser().parse_args(command), train.given_flags(command))
    settings = runs.planned_settings(a, [1.0, float(cell[1].split(":")[1])], cell[2])
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"fingerprint_settings": settings}))
    for name in files:
        (run_dir / name).write_bytes(b"x")


def test_completed_cells_are_skipped_and_interrupted_ones_resumed(capsys, tmp_path, image_data):
    argv = ["--train_data_root", image_data["train"], "--classes", "water-deer", "roe-deer",
            "--save_root", str(tmp_path)]
    fake_run(tmp_path / "baseline" / "1_0.1" / "run_1", argv, ("baseline", "1:0.1", 1), "summary.json")
    half = tmp_path / "proposed" / "1_0.01" / "run_3"
    fake_run(half, argv, ("proposed", "1:0.01", 3), "last.pth")
    lines = plan_lines(capsys, argv)
    assert len(lines) == 199
    assert f"python3 train.py --resume {half} --threads 1" in lines
    assert not any("--ratio 1:0.1 " in l and "--run_id 1 " in l and "--contrastive" not in l
                   and "--oversampling" not in l for l in lines)


def test_a_real_grid_trains_once_then_skips(image_data, tmp_path, capsys):
    argv = ["--train_data_root", image_data["train"], "--test_data_root", image_data["valid"],
            "--classes", "water-deer", "roe-deer", "--save_root", str(tmp_path), "--variants", "baseline",
            "proposed", "--ratios", "0.1", "--runs", "1", "--num_epochs", "1", "--img_size", "32",
            "--weights", "none", "--batch_size", "16"]
    reproduce.main(argv)
    for v in ("baseline", "proposed"):
        assert os.path.isfile(tmp_path / v / "1_0.1" / "run_1" / "summary.json")
        assert os.path.isfile(tmp_path / v / "results.json")
    assert json.load(open(tmp_path / "results.json"))["precision"] == "fp32"            # the default
    for name in ("table1.md", "table1.csv", "figure3.png"):
        assert os.path.getsize(tmp_path / name) > 0
    assert plan_lines(capsys, argv) == []
    reproduce.main(argv + ["--eval_only", "--eval_precision", "bf16"])
    assert json.load(open(tmp_path / "results.json"))["precision"] == "bf16"


def test_task_id_selects_one_cell_and_bad_flags_are_refused(capsys, tmp_path):
    lines = plan_lines(capsys, GRID + ["--save_root", str(tmp_path), "--task_id", "57"])
    full = plan_lines(capsys, GRID + ["--save_root", str(tmp_path)])
    assert lines == [full[57]]
    with pytest.raises(UserError, match="--task_id"):
        reproduce.main(GRID + ["--task_id", "200", "--dry_run"])
    with pytest.raises(UserError, match="--seed"):
        reproduce.main(GRID + ["--seed", "3", "--dry_run"])
    with pytest.raises(UserError, match="--variants"):
        reproduce.main(GRID + ["--variants", "fancy", "--dry_run"])


def fake_results(root, variant, per_ratio):
    """<root>/<variant>/results.json with runs of given roe-deer accuracies per minority ratio."""
    from validation import summarise
    ratios = {}
    for r, accs in per_ratio.items():
        runs = [{"run_dir": f"/x/run_{i}", "best_train_acc": 0.9,
                 "metrics": {"per_class_acc": {"water-deer": 1.0, "roe-deer": a}, "accuracy": a,
                             "balanced_accuracy": a, "macro_f1": a}} for i, a in enumerate(accs, 1)]
        ratios[f"1_{r:g}"] = {"ratio": [1.0, r], "classes": ["water-deer", "roe-deer"], "runs": runs,
                              "summary": summarise(runs)}
    os.makedirs(root / variant, exist_ok=True)
    (root / variant / "results.json").write_text(json.dumps({"variants": {variant: ratios}}))


def test_report_gives_hand_computed_means_and_stds_and_writes_the_png(tmp_path):
    fake_results(tmp_path, "baseline", {1.0: [1.0, 0.8], 0.01: [0.1, 0.2, 0.6]})
    fake_results(tmp_path, "proposed", {1.0: [0.9], 0.01: [0.5, 0.7]})
    report.main(["--save_root", str(tmp_path), "--paper", "fine"])
    md = (tmp_path / "table1.md").read_text()
    # baseline 0.01: mean 0.3, sample std sqrt(((.2)^2 + (.1)^2 + (.3)^2) / 2) = 0.264575
    assert "| baseline | 0.9000 ± 0.1414 (n=2) | 0.3000 ± 0.2646 (n=3) |" in md
    assert "| proposed | 0.9000 (n=1) | 0.6000 ± 0.1414 (n=2) |" in md
    assert "| proposed (paper, roe deer) | 0.9944 | 0.8859 |" in md
    rows = (tmp_path / "table1.csv").read_text().splitlines()
    assert "baseline,0.01,acc[roe-deer],0.300000,0.264575,3" in rows
    png = (tmp_path / "figure3.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_demo_builder_gives_the_right_classes_and_counts(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for split, n in (("train", 60), ("t10k", 30)):
        labels = np.arange(n) % 10                      # 6 (train) or 3 (test) images of each label
        write_idx(src / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(src / f"{split}-labels-idx1-ubyte.gz", labels)
    roots = demo.build_image_folders(str(src), str(tmp_path / "out"), ["fine", "coarse"], limit=4)
    for cond, classes in (("fine", {"tshirt-top", "shirt"}), ("coarse", {"tshirt-top", "trouser"})):
        assert set(os.listdir(roots[cond]["train"])) == classes
        for c in classes:
            assert len(os.listdir(os.path.join(roots[cond]["train"], c))) == 4
            assert len(os.listdir(os.path.join(roots[cond]["valid"], c))) == 3
    shirt = sorted(os.listdir(os.path.join(roots["fine"]["train"], "shirt")))
    assert shirt == ["00006.png", "00016.png", "00026.png", "00036.png"]     # label 6 in the idx file


@pytest.mark.skipif(not os.path.isdir(demo.DEBIAN_DIR), reason="dataset-fashion-mnist is not installed")
def test_demo_reads_the_debian_copy_of_fashion_mnist():
    images, labels = demo.load_fashion_mnist(demo.DEBIAN_DIR, "t10k")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10


def test_the_demo_removes_its_weights_after_evaluation_and_a_rerun_reuses_the_recorded_evaluation(tmp_path,
                                                                                                  capfd):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for split, n in (("train", 200), ("t10k", 40)):
        write_idx(src / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(src / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    argv = ["--source", str(src), "--data_dir", str(tmp_path / "data"), "--save_root", str(tmp_path / "runs"),
            "--conditions", "fine", "--ratios", "0.5", "--runs", "1", "--num_epochs", "1", "--max_per_class", "10",
            "--jobs", "1", "--threads", "1"]
    demo.main(argv)
    fine = tmp_path / "runs" / "fine"
    weights = [os.path.join(d, f) for d, _, fs in os.walk(fine) for f in fs if f.endswith(".pth")]
    records = [os.path.join(d, f) for d, _, fs in os.walk(fine) for f in fs if f == "weights_removed.json"]
    assert weights == [] and len(records) == 4                       # 4 variants, every run
    removed = json.load(open(records[0]))["removed"]
    assert list(removed) == ["best.pth"] and len(removed["best.pth"]) == 64
    table = (fine / "table1.md").read_text()
    results = json.load(open(fine / "results.json"))
    capfd.readouterr()
    demo.main(argv)                                                   # nothing trained again, the same table
    err = capfd.readouterr().err
    assert "recorded evaluation of" in err and "evaluated " + str(fine) not in err
    assert (fine / "table1.md").read_text().split("\n", 3)[3] == table.split("\n", 3)[3]
    again = json.load(open(fine / "results.json"))
    assert again["variants"] == results["variants"]
    # another test folder cannot reuse it: the runs are skipped, saying why
    import validation
    other = tmp_path / "data" / "fine" / "valid"
    with pytest.raises(SystemExit):
        validation.main(["--model_root", str(fine / "proposed"), "--test_data_root", str(other), "--precision", "bf16"])
    assert "weights were removed after its evaluation" in capfd.readouterr().err


def test_the_demo_caps_its_runs_kernels_at_avx2_unless_told_otherwise(capsys, monkeypatch):
    """--cpu_isa avx2 (the default) runs reproduce.py with torch's, oneDNN's and MKL's kernels capped at
    AVX2 (the docs' tables on any x86-64 CPU with AVX2); native sets nothing; a variable already set wins."""
    import platform
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for k in demo.CPU_ISA["avx2"]:
        monkeypatch.delenv(k, raising=False)
    demo.main(["--dry_run", "--conditions", "fine"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ")
    demo.main(["--dry_run", "--conditions", "fine", "--cpu_isa", "native"])
    assert capsys.readouterr().out.startswith(sys.executable)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    demo.main(["--dry_run", "--conditions", "fine"])
    assert "ATEN_CPU_CAPABILITY" not in capsys.readouterr().out
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    demo.main(["--dry_run", "--conditions", "fine"])
    assert capsys.readouterr().out.startswith(sys.executable)
