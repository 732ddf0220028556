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


def write_results(save_root, method, cells, classes=("tshirt", "shirt"), seeds=None, subsets=None,
                  test_root="/data/valid", precision="fp32"):
    """<save_root>/<method>/results.json as validation.py writes it; cells {ratio: {run k: (bal, maj, min)}}
    (a ratio is the minority fraction, or a whole tuple for more classes). Run k has seed seeds.get(k, k)
    and planned subset subsets.get(k, 'subset-k') unless given."""
    from validation import summarise
    seeds, subsets = seeds or {}, subsets or {}
    ratios = {}
    for r, runs in cells.items():
        ratio = list(r) if isinstance(r, tuple) else [1.0, r]
        name = "_".join(f"{x:g}" for x in ratio)
        entry = {"ratio": ratio, "classes": list(classes), "runs": [
            {"run_dir": f"/x/{method}/{name}/run_{k}", "best_train_acc": 0.5,
             "settings": {"seed": seeds.get(k, k), "planned_subset_sha1": subsets.get(k, f"subset-{k}")},
             "metrics": {"per_class_acc": dict(zip(classes, (maj, *([mino] * (len(classes) - 1))))),
                         "balanced_accuracy": bal, "accuracy": bal, "macro_f1": bal}} for k, (bal, maj, mino) in runs.items()]}
        ratios[name] = {**entry, "summary": summarise(entry["runs"])} if entry["runs"] else entry
    os.makedirs(save_root / method, exist_ok=True)
    (save_root / method / "results.json").write_text(json.dumps(
        {"test_data_root": test_root, "precision": precision, "variants": {method: ratios}}))


def comparison_rows(path):
    return {(r["method"], r["ratio"], r["metric"]): r for r in csv.DictReader(open(path / "comparison.csv"))}


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
    assert row["n_pairs"] == "1" and row["p_value"] == "nan" and row["verdict"] == "no test"
    assert "+0.100 (n=1: no test)" in open(tmp_path / "comparison.md").read()


def test_a_non_finite_difference_gets_no_test_and_no_mark(tmp_path):
    # run 3 of la had no readable shirt image: its shirt accuracy is NaN (validation.py writes NaN)
    ref = {k: (0.7, 0.9, 0.5) for k in range(1, 11)}
    la = {k: (0.6, 0.8, float("nan") if k == 3 else 0.3) for k in range(1, 11)}
    write_results(tmp_path, "proposed", {0.1: ref})
    write_results(tmp_path, "la", {0.1: la})
    assert np.isnan(report.sign_flip_p([-0.2, float("nan"), -0.2])) and all(np.isnan(report.t_interval([1, np.inf])))
    report.main(["--save_root", str(tmp_path)])
    rows = comparison_rows(tmp_path)
    minority = rows[("la", "0.1", "minority")]
    assert minority["p_value"] == "nan" and minority["p_holm"] == "nan" and minority["verdict"] == "no test"
    assert rows[("la", "0.1", "majority")]["verdict"] == "worse"          # the finite metrics are still tested
    md = (tmp_path / "comparison.md").read_text().split("### minority accuracy")[1].split("###")[0]
    assert "**" not in md and "no test (n=10: a run has no readable test image of a class)" in md


def test_a_method_without_any_evaluated_run_is_listed_not_a_traceback(tmp_path, capsys):
    write_results(tmp_path, "baseline", {})                                # every run of it failed
    runs = {k: (0.6 + 0.01 * k, 0.9, 0.3) for k in range(1, 4)}
    write_results(tmp_path, "proposed", {0.1: runs})
    write_results(tmp_path, "la", {0.1: runs})
    report.main(["--save_root", str(tmp_path)])
    table = (tmp_path / "table1.md").read_text()
    assert "| baseline | – | (no evaluated run)" in table and "| proposed | 0.3000 ± 0.0000 (n=3) |" in table
    assert "no evaluated run (see each result_log.txt for why): baseline" in capsys.readouterr().out
    assert {r[0] for r in comparison_rows(tmp_path)} == {"la"}
    write_results(tmp_path, "proposed", {})
    write_results(tmp_path, "la", {})
    with pytest.raises(UserError, match="no method under --save_root has an evaluated run"):
        report.main(["--save_root", str(tmp_path)])


def test_one_evaluated_method_beside_one_without_any_cell_writes_its_tables_and_no_comparison(tmp_path, capsys):
    write_results(tmp_path, "proposed", {0.1: {k: (0.6 + 0.01 * k, 0.9, 0.3) for k in range(1, 4)}})
    write_results(tmp_path, "baseline", {})
    report.main(["--save_root", str(tmp_path)])
    assert (tmp_path / "table1.md").is_file() and not (tmp_path / "comparison.png").exists()
    assert "no comparison with proposed: no other method has an evaluated run" in capsys.readouterr().out


def test_runs_are_paired_by_recorded_seed_and_planned_images_not_by_folder_number(tmp_path):
    ref = {k: (0.50 + 0.01 * k, 0.9, 0.5) for k in range(1, 5)}                 # seed k in run_k
    # la's run_7 was trained with --seed 1, run_8 with --seed 2; run_3 has seed 3 but other images
    la = {7: (0.60, 0.9, 0.5), 8: (0.70, 0.9, 0.5), 3: (0.90, 0.9, 0.5)}
    write_results(tmp_path, "proposed", {0.1: ref})
    write_results(tmp_path, "la", {0.1: la}, seeds={7: 1, 8: 2}, subsets={7: "subset-1", 8: "subset-2", 3: "other"})
    report.main(["--save_root", str(tmp_path)])
    row = comparison_rows(tmp_path)[("la", "0.1", "balanced_accuracy")]
    assert int(row["n_pairs"]) == 2                                          # seeds 1 and 2; seed 3 left out
    assert float(row["mean_diff"]) == pytest.approx(((0.60 - 0.51) + (0.70 - 0.52)) / 2, abs=1e-6)
    md = (tmp_path / "comparison.md").read_text()
    assert "seed 3: /x/la/1_0.1/run_3 and /x/proposed/1_0.1/run_3 trained on different images" in md


def test_minority_flag_chooses_the_class_the_comparison_calls_minority(tmp_path):
    classes = ("tshirt", "shirt", "trouser")
    ref = {k: (0.7, 0.9, 0.5) for k in range(1, 4)}
    la = {k: (0.7, 0.8, 0.6) for k in range(1, 4)}
    for name, runs in (("proposed", ref), ("la", la)):
        write_results(tmp_path, name, {(1.0, 0.5, 0.1): runs}, classes=classes)
        data = json.loads((tmp_path / name / "results.json").read_text())
        for r in data["variants"][name]["1_0.5_0.1"]["runs"]:
            r["metrics"]["per_class_acc"]["shirt"] -= 0.25 if name == "la" else 0.0    # shirt: la - ref = -0.15
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    report.main(["--save_root", str(tmp_path), "--minority", "shirt"])
    rows = comparison_rows(tmp_path)
    assert float(rows[("la", "1:0.5:0.1", "minority")]["mean_diff"]) == pytest.approx(-0.15, abs=1e-6)
    assert float(rows[("la", "1:0.5:0.1", "majority")]["mean_diff"]) == pytest.approx(-0.1, abs=1e-6)
    assert "### minority accuracy (shirt)" in (tmp_path / "comparison.md").read_text()
    report.main(["--save_root", str(tmp_path)])                                 # default: the last class
    assert float(comparison_rows(tmp_path)[("la", "1:0.5:0.1", "minority")]["mean_diff"]) == pytest.approx(0.1)


def test_ratios_with_the_same_ends_stay_separate_cells(tmp_path):
    classes = ("tshirt", "shirt", "trouser")
    a = {k: (0.7, 0.9, 0.5) for k in range(1, 3)}
    b = {k: (0.6, 0.9, 0.2) for k in range(1, 3)}
    write_results(tmp_path, "proposed", {(1.0, 0.5, 0.1): a, (1.0, 0.2, 0.1): b}, classes=classes)
    write_results(tmp_path, "la", {(1.0, 0.5, 0.1): a, (1.0, 0.2, 0.1): b}, classes=classes)
    report.main(["--save_root", str(tmp_path)])
    cells = {(r["variant"], r["ratio"]) for r in csv.DictReader(open(tmp_path / "table1.csv"))}
    assert cells == {(v, r) for v in ("proposed", "la") for r in ("1:0.5:0.1", "1:0.2:0.1")}
    table = (tmp_path / "table1.md").read_text()
    assert "| variant | 1:0.5:0.1 | 1:0.2:0.1 |" in table and "| proposed | 0.5000 ± 0.0000 (n=2) | 0.2000" in table


@pytest.mark.parametrize("other", [{"test_root": "/data/other"}, {"precision": "bf16"}])
def test_methods_evaluated_on_other_test_images_or_precision_are_not_compared(tmp_path, other):
    runs = {k: (0.6 + 0.01 * k, 0.9, 0.3) for k in range(1, 4)}
    write_results(tmp_path, "proposed", {0.1: runs})
    write_results(tmp_path, "la", {0.1: runs}, **other)
    what = "test folder" if "test_root" in other else "evaluation precision"
    with pytest.raises(UserError, match=f"la and proposed were evaluated with another {what}"):
        report.main(["--save_root", str(tmp_path)])
