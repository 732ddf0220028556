"""Subsampling to a ratio, class order, and the oversampling sampler."""
import collections

import pytest
import torch

import data
from utils import UserError, parse_ratio, ratio_folder_name


def fake_images(counts):
    return {c: [f"/d/{c}/{i:05d}.jpg" for i in range(n)] for c, n in counts.items()}


def test_subsample_counts_two_classes_with_cap():
    images = fake_images({"a": 500, "b": 300})
    paths, labels, counts, notes = data.subsample(images, ["a", "b"], [1, 0.01], 400, seed=3)
    assert counts["a"]["selected"] == 400 and counts["b"]["selected"] == 4     # round(0.01 * 400)
    assert labels == [0] * 400 + [1] * 4 and len(paths) == 404 and notes == []
    assert all(p.startswith("/d/a/") for p in paths[:400]) and all(p.startswith("/d/b/") for p in paths[400:])


def test_subsample_three_classes_labels_follow_classes_order_not_alphabetical():
    images = fake_images({"zebra": 100, "ant": 100, "mole": 100})
    paths, labels, counts, _ = data.subsample(images, ["zebra", "ant", "mole"], [1, 0.1, 0.05], None, seed=0)
    assert [counts[c]["selected"] for c in ("zebra", "ant", "mole")] == [100, 10, 5]
    assert labels == [0] * 100 + [1] * 10 + [2] * 5
    assert all("/ant/" in p for p in paths[100:110])


def test_subsample_is_reproducible_from_the_seed_and_differs_across_seeds():
    images = fake_images({"a": 1000, "b": 1000})
    one = data.subsample(images, ["a", "b"], [1, 0.05], 200, seed=7)[0]
    assert one == data.subsample(images, ["a", "b"], [1, 0.05], 200, seed=7)[0]
    assert one != data.subsample(images, ["a", "b"], [1, 0.05], 200, seed=8)[0]


def test_subsample_keeps_at_least_one_and_warns_when_a_class_is_short():
    images = fake_images({"a": 100, "b": 3})
    _, labels, counts, notes = data.subsample(images, ["a", "b"], [1, 0.001], None, seed=0)
    assert counts["b"]["selected"] == 1 and any("keeping 1" in n for n in notes)
    _, _, counts, notes = data.subsample(images, ["a", "b"], [1, 0.5], None, seed=0)
    assert counts["b"] == {"available": 3, "requested": 50, "selected": 3} and any("using all 3" in n for n in notes)


def test_oversampling_sampler_is_balanced_with_the_stated_epoch_length():
    labels = [0] * 1000 + [1] * 10 + [2] * 50
    g = torch.Generator().manual_seed(0)
    sampler = data.make_sampler(labels, 3, True, g)
    drawn = [labels[i] for i in sampler]
    assert len(drawn) == len(sampler) == 3 * 1000
    freq = collections.Counter(drawn)
    for k in range(3):   # 1000 expected per class; binomial sd ~ 26, so 150 is a >5 sd margin
        assert abs(freq[k] - 1000) < 150, freq
    plain = data.make_sampler(labels, 3, False, g)
    assert sorted(plain) == list(range(len(labels)))


def test_ratio_parsing_and_folder_names():
    assert parse_ratio("1:0.01", ["a", "b"]) == [1.0, 0.01]
    assert ratio_folder_name([1.0, 0.01]) == "1_0.01" and ratio_folder_name([1, 0.1, 0.005]) == "1_0.1_0.005"
    for bad in ("1:x", "1:-0.1", "1:0", "0:1", "1", "1:0.1:0.1", "1:nan", "1:inf", ""):
        with pytest.raises(UserError, match="--ratio"):
            parse_ratio(bad, ["a", "b"])


def test_paper_augmentation_draws_per_image_and_plain_leaves_pixels():
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    aug = data.build_augment("paper")
    torch.manual_seed(0)
    outs = [aug(x) for _ in range(5)]
    assert all(o.dtype == torch.uint8 and o.shape == x.shape for o in outs)
    assert len({o.sum().item() for o in outs}) > 1
    assert data.build_augment("plain") is None
    with pytest.raises(UserError, match="paper, plain"):
        data.build_augment("fancy")


def test_paper_augmentation_of_a_batch_equals_torchvision_per_image():
    """Same draws in the same order and the same pixels as v2.Compose([RandAugment, ColorJitter])
    image by image, though the ColorJitter arithmetic runs on groups of the batch."""
    from torchvision.transforms import v2
    gen = torch.Generator().manual_seed(1)
    flat = torch.randint(0, 256, (48, 3, 1, 1), generator=gen) * torch.rand(48, 1, 40, 40, generator=gen)
    images = list(torch.cat([flat.round().to(torch.uint8),
                             torch.randint(0, 256, (48, 3, 40, 40), dtype=torch.uint8, generator=gen)]))
    reference = v2.Compose([v2.RandAugment(), v2.ColorJitter(**data.COLOR_JITTER)])
    torch.manual_seed(0)
    expected = [reference(x) for x in images]
    after_reference = torch.rand(1)
    torch.manual_seed(0)
    ours = data.build_augment("paper")(images)
    assert torch.equal(torch.rand(1), after_reference)          # the same number of draws
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))
    torch.manual_seed(0)
    assert torch.equal(data.build_augment("paper")(images[0]), expected[0])   # one image alone, too


def test_cached_pixels_equal_torchvision_resize_on_pil(tmp_path):
    """The cache holds exactly what ImageFolder + transforms.Resize((S, S)) would give."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T
    rng = np.random.default_rng(0)
    path = str(tmp_path / "photo.jpg")
    Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)).save(path)
    for size in (32, 64):
        ours = data.load_image(path, size)
        ref = np.array(T.Resize((size, size))(Image.open(path).convert("RGB")))
        assert ours.shape == ref.shape and (ours == ref).all()


def test_augmentation_is_drawn_anew_at_every_visit_of_the_same_image():
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    ds = data.ImageSet([0], 32, images=images, transform=data.build_augment("paper"))
    torch.manual_seed(0)
    visits = [ds[0][0] for _ in range(8)]          # an oversampled image is visited many times
    assert len({v.float().sum().item() for v in visits}) > 1
    torch.manual_seed(0)
    assert all(torch.equal(a, ds[0][0]) for a in visits)   # and the same seed draws the same way
