"""report.py's paired statistics on hand-made results with known answers: the sign-flip p-value by
enumeration, the t-interval by hand, Holm's correction by hand, and the pairing of runs by number."""
import csv
import itertools
import json
import os

import numpy as np
import pytest

import report
from utils import UserError


def test_sign_flip_p_value_equals_enumeration_of_all_sign_assignments():
    for d in ([0.3, -0.1, 0.2, 0.5, 0.4], [0.02, 0.01, -0.03, 0.05, 0.04, 0.0, 0.01], [1.0, -1.0]):
        observed = abs(np.mean(d))
        flips = list(itertools.product([1, -1], repeat=len(d)))
        extreme = sum(abs(np.mean(np.multiply(s, d))) >= observed - 1e-12 for s in flips)
        assert report.sign_flip_p(d) == pytest.approx(extreme / len(flips)), d
    assert report.sign_flip_p([0.3, -0.1, 0.2, 0.5, 0.4]) == pytest.approx(4 / 32)    # by hand: 4 of 32
    assert report.sign_flip_p([0.1] * 8) == pytest.approx(2 / 256)   # the smallest p with 8 pairs
    assert report.sign_flip_p([0.1] * 10) == pytest.approx(2 / 1024)
    assert np.isnan(report.sign_flip_p([0.3])) and np.isnan(report.sign_flip_p([]))   # nothing to test


def test_t_interval_by_hand():
    # d = 1, 2, 3, 4: mean 2.5, s = 1.290994, s / sqrt(4) = 0.645497, t(0.975, 3) = 3.182446
    lo, hi = report.t_interval([1, 2, 3, 4])
    assert lo == pytest.approx(2.5 - 3.182446 * 0.645497, abs=1e-5) and hi == pytest.approx(4.554260, abs=1e-5)
    assert report.t_interval([0.2, 0.2, 0.2]) == (0.2, 0.2)
    assert all(np.isnan(report.t_interval([0.5])))


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 x 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert report.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert report.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = report.holm([0.01, float("nan"), 0.02])
    assert out[0] == pytest.approx(0.02) and np.isnan(out[1]) and out[2] == pytest.approx(0.02)


def write_results(save_root, method, cells):
    """<save_root>/<method>/results.json as validation.py writes it; cells {ratio: {run k: (bal, maj, min)}}."""
    from validation import summarise
    ratios = {}
    for r, runs in cells.items():
        entry = {"ratio": [1.0, r], "classes": ["tshirt", "shirt"], "runs": [
            {"run_dir": f"/x/{method}/1_{r:g}/run_{k}", "best_train_acc": 0.5,
             "metrics": {"per_class_acc": {"tshirt": maj, "shirt": mino}, "balanced_accuracy": bal,
                         "accuracy": bal, "macro_f1": bal}} for k, (bal, maj, mino) in runs.items()]}
        ratios[f"1_{r:g}"] = {**entry, "summary": summarise(entry["runs"])}
    os.makedirs(save_root / method, exist_ok=True)
    (save_root / method / "results.json").write_text(json.dumps({"variants": {method: ratios}}))


def test_comparison_pairs_runs_by_number_and_marks_significance_after_holm(tmp_path):
    ref = {k: (0.70 + 0.01 * k, 0.9, 0.5 + 0.01 * k) for k in range(1, 11)}
    better = {k: (v[0] + 0.05 + 0.001 * k, v[1] - 0.01, v[2] + 0.1) for k, v in ref.items()}    # +0.05.. in all 10
    mixed = {k: (v[0] + (0.02 if k % 2 else -0.02), v[1], v[2]) for k, v in ref.items() if k != 10}   # 9 pairs
    write_results(tmp_path, "proposed", {0.1: ref, 0.01: ref})
    write_results(tmp_path, "la", {0.1: better, 0.01: better})
    write_results(tmp_path, "focal", {0.1: mixed, 0.01: dict(reversed(list(mixed.items())))})
    report.main(["--save_root", str(tmp_path)])
    rows = {(r["method"], r["ratio"], r["metric"]): r for r in csv.DictReader(open(tmp_path / "comparison.csv"))}
    la = rows[("la", "0.1", "balanced_accuracy")]
    d = [better[k][0] - ref[k][0] for k in range(1, 11)]
    assert int(la["n_pairs"]) == 10 and float(la["mean_diff"]) == pytest.approx(np.mean(d), abs=1e-5)
    assert float(la["p_value"]) == pytest.approx(2 / 1024, rel=1e-4)
    assert float(la["p_holm"]) == pytest.approx(4 * 2 / 1024, rel=1e-4)        # 4 cells: 2 methods x 2 ratios
    assert la["verdict"] == "better"
    assert rows[("la", "0.1", "majority")]["verdict"] == "worse"
    focal = rows[("focal", "0.01", "balanced_accuracy")]
    assert int(focal["n_pairs"]) == 9 and focal["verdict"] == "n.s."            # run 10 has no pair
    d = [mixed[k][0] - ref[k][0] for k in range(1, 10)]
    lo, hi = report.t_interval(d)
    assert float(focal["ci_low"]) == pytest.approx(lo, abs=1e-5) and float(focal["ci_high"]) == pytest.approx(hi, abs=1e-5)
    md = open(tmp_path / "comparison.md").read()
    assert "**better**" in md and "**worse**" in md and "n=9" in md
    assert (tmp_path / "comparison.png").stat().st_size > 10_000


def test_another_reference_and_a_missing_one(tmp_path):
    runs = {k: (0.6 + 0.01 * k, 0.9, 0.3) for k in range(1, 4)}
    write_results(tmp_path, "proposed", {0.1: runs})
    write_results(tmp_path, "oversampling", {0.1: runs})
    report.main(["--save_root", str(tmp_path), "--reference", "oversampling"])
    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert {r["method"] for r in rows} == {"proposed"} and float(rows[0]["mean_diff"]) == 0.0
    with pytest.raises(UserError, match="--reference la: no such method"):
        report.main(["--save_root", str(tmp_path), "--reference", "la"])


def test_a_single_pair_is_reported_without_a_test(tmp_path):
    write_results(tmp_path, "proposed", {0.1: {1: (0.7, 0.9, 0.5)}})
    write_results(tmp_path, "la", {0.1: {1: (0.8, 0.8, 0.8)}})
    report.main(["--save_root", str(tmp_path)])
    row = next(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert row["n_pairs"] == "1" and row["p_value"] == "nan" and row["verdict"] == "n.s."
    assert "+0.100 (n=1: no test)" in open(tmp_path / "comparison.md").read()
