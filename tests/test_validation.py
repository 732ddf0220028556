"""validation.py: best-epoch parsing, end-to-end accuracies, class checks and skipped runs."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

import validation
from conftest import ROOT
from model import confusion_matrix
from runs import best_epoch, parse_train_log
from utils import UserError


def write_log(path, text, mode="w"):
    with open(path, mode + "b") as f:
        f.write(text if isinstance(text, bytes) else text.encode())


def test_best_epoch_ties_go_to_the_earliest_and_bad_lines_are_ignored(tmp_path):
    log = tmp_path / "train.log"
    tail = " | acc[a] 0.5 | loss 0.1 ce 0.1 | 1.0s 10 img/s data_wait 1.0%\n"
    write_log(log, "Epoch 1/5 | Train Acc 0.500000" + tail
                   + "Epoch 2/5 | Train Acc 0.900000" + tail
                   + "garbage line\n"
                   + "Epoch 3/5 | Train Acc 0.900000" + tail
                   + "Epoch 4/5 | Train Acc 0.950000 | acc[a] 0.5\n"     # malformed: cut short
                   + "Epoch 5/5 | Train Acc 0.990000 | acc[a] 0.9")       # partial: a crash mid-write
    write_log(log, b"\xff\xfe not utf-8\n", mode="a")   # the next writer appends to the half line
    assert parse_train_log(log) == [(1, 0.5), (2, 0.9), (3, 0.9)]
    assert best_epoch(parse_train_log(log)) == (2, 0.9)
    assert best_epoch([]) is None


def direct_accuracy(run_dir, test_root, classes, size=32):
    """Per-class accuracy computed independently: torchvision transforms on PIL images, one by one."""
    model = torchvision.models.resnet18(num_classes=len(classes))
    model.load_state_dict(torch.load(os.path.join(run_dir, "best.pth"), weights_only=True)["model"])
    model.eval()
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    acc = {}
    for k, c in enumerate(classes):
        files = sorted(os.listdir(os.path.join(test_root, c)))
        with torch.no_grad():
            x = torch.stack([tf(Image.open(os.path.join(test_root, c, f)).convert("RGB")) for f in files])
            acc[c] = (model(x).argmax(1) == k).float().mean().item()
    return acc


def test_end_to_end_results_equal_a_direct_computation(four_variants, image_data, tmp_path):
    save, runs = four_variants
    root = tmp_path / "saved_runs"
    shutil.copytree(save, root)
    classes = ["water-deer", "roe-deer"]
    out = subprocess.run([sys.executable, "validation.py", "--model_root", str(root / "baseline"),
                          "--test_data_root", image_data["valid"], "--classes", *classes, "--precision", "fp32"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.load(open(root / "baseline" / "results.json"))
    entry = res["variants"]["baseline"]["1_0.1"]
    run = entry["runs"][0]
    expected = direct_accuracy(runs["baseline"], image_data["valid"], classes)
    for c in classes:
        assert abs(run["metrics"]["per_class_acc"][c] - expected[c]) < 1e-9
        assert abs(entry["summary"]["mean"][f"acc[{c}]"] - expected[c]) < 1e-9
    assert sum(map(sum, run["metrics"]["confusion_matrix"])) == 16
    text = open(root / "baseline" / "result_log.txt").read()
    assert f"acc[roe-deer] {expected['roe-deer']:.4f}" in text and "n=1" in text

    # the whole saved_runs root: every variant, one file per variant and one for all
    validation.main(["--model_root", str(root), "--test_data_root", image_data["valid"]])
    combined = json.load(open(root / "results.json"))
    assert set(combined["variants"]) == {"baseline", "contrastive", "oversampling", "proposed"}
    for v in combined["variants"]:
        assert (root / v / "result_log.txt").exists()


def test_float32_is_the_default_and_bf16_an_explicit_recorded_choice(four_variants, image_data, tmp_path,
                                                                      monkeypatch):
    save, _ = four_variants
    variant = tmp_path / "baseline"
    shutil.copytree(save / "baseline", variant)
    seen = []
    real = validation.confusion_matrix
    monkeypatch.setattr(validation, "confusion_matrix", lambda *a, **k: seen.append(k["amp"]) or real(*a, **k))
    for flags, amp, name, head in (([], False, "fp32", "# precision: float32"),
                                   (["--precision", "bf16"], True, "bf16", "# precision: bf16 autocast")):
        validation.main(["--model_root", str(variant), "--test_data_root", image_data["valid"], *flags])
        assert seen.pop() is amp
        assert json.load(open(variant / "results.json"))["precision"] == name
        assert head in open(variant / "result_log.txt").read()
    with pytest.raises(SystemExit):        # no machine-dependent choice any more
        validation.main(["--model_root", str(variant), "--test_data_root", image_data["valid"], "--precision", "auto"])


@pytest.mark.parametrize("cm", [[[5, 1], [2, 0]],                     # the rare class never right
                                [[4, 0], [0, 0]],                     # a class absent from the test set
                                [[3, 0, 1], [0, 0, 0], [2, 0, 4]],    # absent and never predicted
                                [[7, 2, 1], [1, 3, 0], [0, 5, 6]]])
def test_balanced_accuracy_and_macro_f1_equal_scikit_learn(cm):
    import warnings
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from model import metrics_from_confusion
    K = len(cm)
    y_true = [t for t in range(K) for p in range(K) for _ in range(cm[t][p])]
    y_pred = [p for t in range(K) for p in range(K) for _ in range(cm[t][p])]
    m = metrics_from_confusion(torch.tensor(cm), [f"c{k}" for k in range(K)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # scikit-learn warns about the absent classes, as it should
        assert np.isclose(m["balanced_accuracy"], balanced_accuracy_score(y_true, y_pred))
        assert np.isclose(m["macro_f1"], f1_score(y_true, y_pred, average="macro", labels=list(range(K)),
                                                  zero_division=0))


def test_bf16_evaluation_runs_the_model_in_bf16():
    model = torchvision.models.resnet18(num_classes=2)
    dtypes = []
    model.fc.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    images, labels = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8), [0, 1, 0, 1, 1]
    for amp in (False, True):
        cm = confusion_matrix(model, images, labels, 2, torch.device("cpu"), batch_size=4, amp=amp)
        assert cm.sum() == 5 and cm.sum(1).tolist() == [2, 3]
    assert dtypes == [torch.float32] * 2 + [torch.bfloat16] * 2


def test_class_mismatch_is_a_clear_error_naming_both_sides(four_variants, image_data, tmp_path):
    save, _ = four_variants
    with pytest.raises(UserError, match="disagrees .* trained on water-deer roe-deer"):
        validation.main(["--model_root", str(save / "baseline"), "--test_data_root", image_data["valid"],
                         "--classes", "roe-deer", "water-deer"])
    partial = tmp_path / "valid"
    shutil.copytree(os.path.join(image_data["valid"], "water-deer"), partial / "water-deer")
    with pytest.raises(UserError, match="no folder 'roe-deer'.*water-deer"):
        validation.main(["--model_root", str(save / "baseline"), "--test_data_root", str(partial)])


def test_broken_runs_are_skipped_with_reasons_and_the_rest_evaluated(four_variants, image_data, tmp_path, capsys):
    save, _ = four_variants
    variant = tmp_path / "baseline"
    good = save / "baseline" / "1_0.1" / "run_1"
    for name in ("run_1", "run_2", "run_3", "run_4", "run_5"):
        shutil.copytree(good, variant / "1_0.1" / name)
    broken = variant / "1_0.1"
    os.remove(broken / "run_2" / "summary.json")                                   # unfinished
    os.remove(broken / "run_3" / "train.log")                                      # no log
    for name in ("best.pth", "last.pth"):                                          # truncated checkpoints
        data = open(broken / "run_4" / name, "rb").read()
        open(broken / "run_4" / name, "wb").write(data[: len(data) // 2])
    write_log(broken / "run_5" / "train.log", b"Epoch 1/1 | Train Acc 0.7\xff\xfe")  # half a line, bad bytes
    validation.main(["--model_root", str(variant), "--test_data_root", image_data["valid"]])
    res = json.load(open(variant / "results.json"))
    assert [os.path.basename(r["run_dir"]) for r in res["variants"]["baseline"]["1_0.1"]["runs"]] == ["run_1"]
    reasons = {os.path.basename(s["run_dir"]): s["reason"] for s in res["skipped"]}
    assert "unfinished" in reasons["run_2"] and "train.log missing" in reasons["run_3"]
    assert "weights_only" in reasons["run_4"] and "no complete epoch line" in reasons["run_5"]
    assert "skipped" in open(variant / "result_log.txt").read()
    with pytest.raises(SystemExit) as e:   # --strict: any skip is a failure
        validation.main(["--model_root", str(variant), "--test_data_root", image_data["valid"], "--strict"])
    assert e.value.code == 1


def test_summary_mean_std_and_authors_pick():
    runs = [{"run_dir": f"/x/run_{i}", "best_train_acc": a,
             "metrics": {"per_class_acc": {"a": pa}, "accuracy": pa, "balanced_accuracy": pa, "macro_f1": pa}}
            for i, (a, pa) in enumerate([(0.9, 0.2), (0.95, 0.4), (0.95, 0.9)], start=1)]
    s = validation.summarise(runs)
    assert s["n_runs"] == 3 and abs(s["mean"]["acc[a]"] - 0.5) < 1e-12
    assert abs(s["std"]["acc[a]"] - 0.3605551275463989) < 1e-12          # sample std of .2 .4 .9
    assert s["authors_pick"]["run_dir"] == "/x/run_2"                   # tie on Train Acc: lower run number
    assert validation.summarise(runs[:1])["std"]["acc[a]"] is None


def test_a_run_whose_files_are_unchanged_keeps_its_recorded_evaluation_and_any_change_evaluates_it_again(
        four_variants, image_data, tmp_path, monkeypatch, capsys):
    save, _ = four_variants
    root = tmp_path / "saved_runs"
    for v in ("baseline", "proposed"):
        shutil.copytree(save / v, root / v)
    test = tmp_path / "valid"
    shutil.copytree(image_data["valid"], test)
    evaluated = []
    real = validation.evaluate_run
    monkeypatch.setattr(validation, "evaluate_run", lambda *a: evaluated.append(1) or real(*a))

    def evaluate(*flags):
        evaluated.clear()
        validation.main(["--model_root", str(root), "--test_data_root", str(test), *flags])
        return len(evaluated), json.load(open(root / "results.json"))

    def metrics(res):
        return [r["metrics"] for v in res["variants"].values() for e in v.values() for r in e["runs"]]

    n, first = evaluate()
    assert n == 2 and all("stamp" in r for v in first["variants"].values() for e in v.values() for r in e["runs"])
    n, again = evaluate()
    assert n == 0 and again["variants"] == first["variants"]
    assert "2 run(s) evaluated (2 from their recorded evaluation)" in capsys.readouterr().out
    log = next((root / "proposed").rglob("train.log"))
    os.utime(log, ns=(log.stat().st_atime_ns, log.stat().st_mtime_ns + 10**9))      # the run changed: once more
    n, again = evaluate()
    assert n == 1 and metrics(again) == metrics(first)
    assert evaluate()[0] == 0
    assert evaluate("--reevaluate")[0] == 2
    assert evaluate("--batch_size", "7")[0] == 2 and evaluate("--batch_size", "7")[0] == 0
    shutil.copy(next((test / "roe-deer").iterdir()), test / "roe-deer" / "extra.png")   # another test set
    n, changed = evaluate("--batch_size", "7")
    assert n == 2 and sum(map(sum, changed["variants"]["baseline"]["1_0.1"]["runs"][0]["metrics"]
                              ["confusion_matrix"])) == 17
