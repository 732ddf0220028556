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
    batches = data.EpochBatches(labels, 3, 64, "oversample", seed=0)
    drawn = [labels[i] for batch in batches for i, _ in batch]
    assert len(drawn) == batches.length == 3 * 1000 and len(batches) == len(list(batches)) == 47
    freq = collections.Counter(drawn)
    for k in range(3):   # 1000 expected per class; binomial sd ~ 26, so 150 is a >5 sd margin
        assert abs(freq[k] - 1000) < 150, freq
    plain = data.EpochBatches(labels, 3, 64, "uniform", seed=0)
    assert sorted(i for batch in plain for i, _ in batch) == list(range(len(labels)))


def test_the_stream_is_a_function_of_seed_and_epoch_only():
    labels = [0] * 30 + [1] * 5
    a, b = (data.EpochBatches(labels, 2, 8, "oversample", seed=4) for _ in range(2))
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)                                   # the same (index, draw seed) everywhere
    b.set_epoch(4)
    assert list(a) != list(b)
    c = data.EpochBatches(labels, 2, 8, "oversample", seed=5)
    c.set_epoch(3)
    assert list(a) != list(c)
    seeds = [s for batch in a for _, s in batch]
    assert len(set(seeds)) == len(seeds)                        # each position draws its own augmentation


def test_a_last_batch_of_one_image_is_left_out_and_seen_in_another_epoch():
    labels = [0] * 12 + [1] * 5                                 # 17 = 1 mod 16
    batches = data.EpochBatches(labels, 2, 16, "uniform", seed=1)
    seen, left_out = set(), set()
    for epoch in range(1, 6):
        batches.set_epoch(epoch)
        sizes = [len(b) for b in batches]
        assert sizes == [16] and len(batches) == 1
        got = {i for b in batches for i, _ in b}
        seen |= got
        left_out |= set(range(17)) - got
    assert seen == set(range(17)) and len(left_out) > 1         # a different image each epoch
    assert [len(b) for b in data.EpochBatches(labels, 2, 15, "uniform", seed=1)] == [15, 2]
    with pytest.raises(UserError, match="at least 2"):
        data.EpochBatches(labels, 2, 1, "uniform", seed=1)


def test_subsets_are_nested_across_ratios_and_caps_for_one_seed():
    images = fake_images({"a": 500, "b": 400})
    chosen = {}
    for r in (1, 0.1, 0.05, 0.01, 0.002):
        paths = data.subsample(images, ["a", "b"], [1, r], 300, seed=3)[0]
        chosen[r] = {p for p in paths if "/b/" in p}
    ratios = sorted(chosen)
    for small, large in zip(ratios, ratios[1:]):
        assert chosen[small] < chosen[large], (small, large)     # strictly fewer, all of them among the larger
    majority = [{p for p in data.subsample(images, ["a", "b"], [1, 0.1], cap, seed=3)[0] if "/a/" in p}
                for cap in (100, 300)]
    assert majority[0] < majority[1]
    # a class's choice does not depend on which other classes are listed, or in which order
    b_with_a = {p for p in data.subsample(images, ["a", "b"], [1, 0.1], 300, seed=3)[0] if "/b/" in p}
    b_with_c = {p for p in data.subsample(fake_images({"c": 300, "b": 400}), ["c", "b"], [1, 0.1], 300,
                                          seed=3)[0] if "/b/" in p}
    assert b_with_a == b_with_c


def test_rounding_of_the_ratio_is_half_up_as_documented():
    images = fake_images({"a": 100, "b": 100})
    # 0.045 x 100 = 4.5 -> 5 (half up; Python's round would give 4); 0.044 x 100 -> 4
    assert data.subsample(images, ["a", "b"], [1, 0.045], None, seed=0)[2]["b"]["selected"] == 5
    assert data.subsample(images, ["a", "b"], [1, 0.044], None, seed=0)[2]["b"]["selected"] == 4
    # 0.145 x 100 is 14.499999999999998 in floating point: still the half it stands for, so 15
    assert 0.145 * 100 < 14.5 and data.subsample(images, ["a", "b"], [1, 0.145], None, seed=0)[2]["b"]["selected"] == 15
    assert "rounded half up" in data.subsample.__doc__


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
    image by image, though the ColorJitter arithmetic runs on groups of the batch: drawn from torch's
    global generator, or from one seed per image."""
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

    seeds = [1000 + 7 * i for i in range(len(images))]
    expected = []
    for x, s in zip(images, seeds):
        torch.manual_seed(s)
        expected.append(reference(x))
    state = torch.get_rng_state()
    ours = data.build_augment("paper")(images, seeds)
    assert torch.equal(torch.get_rng_state(), state)            # the global generator is left alone
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))


def test_every_randaugment_operation_and_sign_on_a_batch_equals_torchvision_image_by_image():
    """Each of RandAugment's operations at its magnitude, with both signs, applied to a shuffled batch in
    one step (pixel maps, value tables, groups) gives torchvision's own operation's pixels image by image,
    at 32, 40 and 64 px; with a bilinear RandAugment (no maps: every operation per group) too."""
    from torchvision.transforms import v2
    gen = torch.Generator().manual_seed(2)
    for size, interpolation in ((32, None), (40, None), (64, None), (32, v2.InterpolationMode.BILINEAR)):
        aug = data.PaperAugment()
        if interpolation is not None:
            aug.randaugment = v2.RandAugment(interpolation=interpolation)
        ra = aug.randaugment
        assert aug._gathers() == (interpolation is None)
        assert set(data.MOVES_PIXELS + data.MAPS_VALUES) <= set(ra._AUGMENTATION_SPACE)
        ops = [(name, sign * (magnitude or 0.0)) for name, signed, magnitude in aug._space(size, size)
               for sign in ((1, -1) if signed and magnitude else (1,))] * 3
        ops = [ops[i] for i in torch.randperm(len(ops), generator=gen)]
        assert len({name for name, _ in ops}) == 14 and len(set(ops)) == 23
        flat = torch.randint(0, 256, (len(ops), 3, 1, 1), generator=gen) * torch.rand(len(ops), 1, size, size,
                                                                                     generator=gen)
        noise = torch.randint(0, 256, (len(ops), 3, size, size), dtype=torch.uint8, generator=gen)
        images = torch.where(torch.arange(len(ops)).view(-1, 1, 1, 1) % 2 == 0, flat.round().to(torch.uint8), noise)
        x = images.clone()
        aug._randaugment_step(x, ops)
        for image, out, (name, magnitude) in zip(images, x, ops):
            expected = ra._apply_image_or_video_transform(image, name, magnitude, interpolation=ra.interpolation,
                                                          fill=ra._fill)
            assert torch.equal(out, expected), (size, name, magnitude)


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
