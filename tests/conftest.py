"""Shared fixtures: tiny generated image folders and in-process runs of train.py."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COLOURS = {"water-deer": (200, 60, 40), "roe-deer": (40, 60, 200), "wild-boar": (60, 200, 40)}


def make_image_folder(root, counts, size=(40, 48), seed=0):
    """root/<class>/<i>.jpg with counts[class] images each; classes differ by colour, so they can be learnt."""
    rng = np.random.default_rng(seed)
    for c, n in counts.items():
        os.makedirs(os.path.join(root, c), exist_ok=True)
        base = np.array(COLOURS.get(c, (128, 128, 128)))
        for i in range(n):
            a = (rng.integers(-40, 40, (size[0], size[1], 3)) + base).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(os.path.join(root, c, f"{i:03d}.jpg"))
    return str(root)


@pytest.fixture(autouse=True)
def one_cpu_for_grids(monkeypatch):
    """reproduce.py plans as on a 1-CPU machine unless a test says otherwise: its cells run in the test's
    process, one at a time, with 1 thread (a worker process side by side costs a torch import each;
    tests/test_side_by_side.py tests that path)."""
    monkeypatch.setattr("reproduce.available_cpus", lambda: 1)


@pytest.fixture(scope="session")
def image_data(tmp_path_factory):
    """{'train': ..., 'valid': ...}: 40 water-deer / 30 roe-deer / 30 wild-boar train, 8 each valid."""
    base = tmp_path_factory.mktemp("images")
    return {"train": make_image_folder(base / "train", {"water-deer": 40, "roe-deer": 30, "wild-boar": 30}),
            "valid": make_image_folder(base / "valid", {"water-deer": 8, "roe-deer": 8, "wild-boar": 8}, seed=1)}


def train_args(train_root, save_root, *extra, ratio="1:0.1", classes=("water-deer", "roe-deer")):
    return ["--train_data_root", train_root, "--classes", *classes, "--ratio", ratio, "--save_root", str(save_root),
            "--num_epochs", "1", "--img_size", "32", "--weights", "none", "--batch_size", "16", *extra]


def run_train(*args, **kw):
    import train
    return train.main(train_args(*args, **kw))


@pytest.fixture(scope="session")
def four_variants(image_data, tmp_path_factory):
    """One finished 1-epoch run of each variant of the ablation, shared by the tests that read them."""
    save = tmp_path_factory.mktemp("saved_runs")
    flags = {"baseline": [], "contrastive": ["--contrastive"], "oversampling": ["--oversampling"],
             "proposed": ["--contrastive", "--oversampling"]}
    runs = {v: run_train(image_data["train"], save, *f) for v, f in flags.items()}
    return save, runs
