"""The device path of the training data (augment.py, feed.py): the same draws and pixels as the host
path, on CPU tensors here and on CUDA where a device is present (bench_gpu.sh runs those)."""
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import v2

import augment
import data
import devices
import feed
import train
from conftest import run_train
from utils import UserError

CUDA = torch.cuda.is_available()


def sample_images(n, size, seed):
    """Half flat colours with a smooth shade (ties in min/max, equal grey levels), half noise."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randint(0, 256, (n, 3, 1, 1), generator=gen) * torch.rand(n, 1, size, size, generator=gen)
    noise = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    return torch.where(torch.arange(n).view(-1, 1, 1, 1) % 2 == 0, flat.round().to(torch.uint8), noise)


def plan_of(applier, size, steps, order, factors):
    """A plan with given variants per RandAugment step (lists of (operation, magnitude)), as draw_plan
    lays it out -> (plan, host bounds)."""
    v = applier.variants(size, size)
    variant = torch.tensor([[v.index[op] for op in ops] for ops in steps])
    ordered, perm = torch.sort(variant, dim=1, stable=True)
    n = variant.shape[1]
    plan = {"index": torch.arange(n), "label": torch.zeros(n, dtype=torch.long), "perm": perm, "sorted": ordered,
            "order": torch.tensor(order).view(-1, 3), "factors": torch.tensor(factors, dtype=torch.float32).view(-1, 3)}
    return plan, v.bounds(ordered).tolist()


@pytest.mark.parametrize("size", [32, 40, 64])
def test_every_operation_and_sign_on_the_device_path_equals_torchvision_image_by_image(size):
    """Each RandAugment variant three times in one shuffled batch, one step, then a ColorJitter of
    factor 1 (which leaves uint8 pixels as they are): torchvision's own operation's pixels."""
    aug = data.PaperAugment()
    applier = augment.Applier(aug, "cpu")
    ops = applier.variants(size, size).ops * 3
    ops = [ops[i] for i in torch.randperm(len(ops), generator=torch.Generator().manual_seed(size))]
    assert len({name for name, _ in ops}) == 14 and len(set(ops)) == 23
    n = len(ops)
    plan, bounds = plan_of(applier, size, [ops, [("Identity", 0.0)] * n], [[0, 1, 2]] * n, [[1.0] * 3] * n)
    images = sample_images(n, size, seed=size)
    out = applier(images.clone(), plan, bounds)
    ra = aug.randaugment
    for image, got, (name, magnitude) in zip(images, out, ops):
        expected = ra._apply_image_or_video_transform(image, name, magnitude, interpolation=ra.interpolation,
                                                      fill=ra._fill)
        assert torch.equal(got, expected), (size, name, magnitude)


@pytest.mark.parametrize("size, n", [(32, 96), (64, 64), (224, 24)])
def test_drawn_plans_on_the_device_path_give_the_host_paths_pixels(size, n):
    """draw_plan makes data.PaperAugment's draws from the same seeds, and apply_plan gives its pixels:
    RandAugment's two steps and ColorJitter's orders and factors, image by image."""
    aug = data.PaperAugment()
    applier = augment.Applier(aug, "cpu")
    images = sample_images(n, size, seed=n)
    seeds = [int(s) for s in torch.randint(0, 2 ** 62, (n,), generator=torch.Generator().manual_seed(3))]
    state = torch.get_rng_state()
    plan = augment.draw_plan(aug, applier.variants(size, size), list(zip(range(n), seeds)), [0] * n)
    assert torch.equal(torch.get_rng_state(), state)             # the global generator is not used
    bounds = plan.pop("bounds").tolist()
    host = torch.stack(aug(list(images), seeds))
    assert torch.equal(applier(images.index_select(0, plan["index"]), plan, bounds), host)
    assert len(set(plan["order"].flatten(0).tolist())) == 3 and not torch.equal(host, images)


def _run_feed(dataset, labels, cfg, path, start, end, workers=0):
    cfg = {**cfg, "args": {**cfg["args"], "num_workers": workers, "num_epochs": end}}
    f = train.make_feed(dataset, labels, cfg, torch.device("cpu"), path, start)
    try:
        return [[(x.clone(), y.clone()) for x, y in f.epoch(e)] for e in range(start, end + 1)]
    finally:
        f.close()


@pytest.mark.parametrize("sampler", ["uniform", "oversample"])
def test_whole_epochs_of_the_device_path_equal_the_host_path_and_one_epoch_at_a_time(sampler):
    """Three epochs (batch 16 over 37 images: a remainder of 5 each epoch), from one sampler over all
    epochs: the device path's batches equal the host path's, which equal the one-epoch loader's, and a
    feed that starts at epoch 2 (a resumed run) gives epochs 2 and 3 alike."""
    labels = [0] * 30 + [1] * 7
    images = sample_images(len(labels), 32, seed=9)
    dataset = data.ImageSet(labels, 32, images=images, transform=data.build_augment("paper"))
    cfg = {"seed": 4, "args": {"batch_size": 16, "classes": ["a", "b"], "oversampling": sampler == "oversample"}}
    host = _run_feed(dataset, labels, cfg, "host", 1, 3)
    device = _run_feed(dataset, labels, cfg, "device", 1, 3)
    loader, batches = train.make_loader(dataset, labels, {**cfg, "args": {**cfg["args"], "num_workers": 0}},
                                        torch.device("cpu"))
    per_epoch = []
    for e in (1, 2, 3):
        batches.set_epoch(e)
        per_epoch.append([(x, y) for x, y in loader])
    assert [len(e) for e in host] == [len(e) for e in per_epoch] == [len(batches)] * 3
    assert [len(b[0]) for b in host[0]][-1] == (5 if sampler == "uniform" else 60 % 16)
    for a, b, c in zip(sum(host, []), sum(device, []), sum(per_epoch, [])):
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], b[1]) and torch.equal(a[1], c[1])
    resumed = _run_feed(dataset, labels, cfg, "device", 2, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(sum(resumed, []), sum(device[1:], [])))


def test_the_device_path_with_workers_and_plain_augmentation():
    labels = [0] * 20 + [1] * 5
    images = sample_images(len(labels), 32, seed=1)
    cfg = {"seed": 2, "args": {"batch_size": 8, "classes": ["a", "b"], "oversampling": True}}
    for transform in (data.build_augment("paper"), None):
        dataset = data.ImageSet(labels, 32, images=images, transform=transform)
        host = _run_feed(dataset, labels, cfg, "host", 1, 2)
        device = _run_feed(dataset, labels, cfg, "device", 1, 2, workers=2)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(sum(host, []), sum(device, [])))


# operations that make the host wait for the device on CUDA: a value read back (item), a result whose
# size depends on the data (nonzero, masked_select, unique), or a tensor made from Python data, which
# is copied from pageable memory (lift_fresh: torch.tensor(list), indexing with a Python list)
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique",
           "_unique2", "unique_consecutive", "lift_fresh", "lift_fresh_copy", "repeat_interleave", "masked_scatter",
           "allclose"}


class SyncingOps(TorchDispatchMode):
    """Records every operation that would make the host wait for the device, including indexing
    with a boolean mask."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
        if name in SYNCING or (name in ("index", "index_put", "index_put_") and
                               any(torch.is_tensor(a) and a.dtype == torch.bool for a in flat)):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_the_sync_check_finds_what_it_looks_for():
    x = torch.arange(6.0)
    for fn in (lambda: x[x > 2], lambda: x.sum().item(), lambda: x[[0, 2]], lambda: x.nonzero(),
               lambda: torch.tensor([1, 2]) + x[:2]):
        with SyncingOps() as mode:
            fn()
        assert mode.found, fn


def test_applying_a_plan_makes_no_host_synchronising_operation():
    """What runs on the device per batch (picking the images, RandAugment, ColorJitter) holds none of
    SyncingOps' operations; the plan's segment bounds are host integers made before it."""
    aug = data.PaperAugment()
    applier = augment.Applier(aug, "cpu")
    labels = [0, 1] * 32
    cache = sample_images(64, 40, seed=5)
    draws = feed.Draws(labels, 40, aug)
    plans = [draws.__getitems__([(i, 1000 + i) for i in range(b, b + 16)]) for b in range(0, 64, 16)]
    assert len({v for p in plans for row in p["sorted"].tolist() for v in row}) > 12    # most kinds of operation
    prefetch = feed.DevicePrefetch.__new__(feed.DevicePrefetch)
    prefetch.device, prefetch.cache, prefetch.applier = torch.device("cpu"), cache, applier
    applier.variants(40, 40)                                                        # constants made once, before
    with SyncingOps() as mode:
        batches = prefetch.prepare_chunk(plans)                  # four batches of 16 augmented together
    assert mode.found == [] and [len(x) for x, _ in batches] == [16] * 4
    assert torch.equal(torch.cat([y for _, y in batches]), torch.tensor(labels))
    expected = torch.stack(aug(list(cache), [1000 + i for i in range(64)]))
    assert torch.equal(torch.cat([x for x, _ in batches]), expected)


def test_data_path_choice_and_its_errors(image_data, tmp_path):
    cpu = torch.device("cpu")
    assert devices.data_path("auto", cpu, 10, True) == "host"
    assert devices.data_path("device", cpu, 10, True) == "device"
    with pytest.raises(UserError, match="--data_path device needs --cache"):
        devices.data_path("device", cpu, 0, False)
    with pytest.raises(UserError, match="auto, host, device"):
        devices.data_path("gpu", cpu, 0, True)
    run = run_train(image_data["train"], tmp_path, "--data_path", "device", "--num_epochs", "1")
    assert json.load(open(os.path.join(run, "config.json")))["data_path_used"] == "device"


class TorchvisionPerImage:
    """The augmentation as torchvision composes it, one image at a time, each from its seed: what
    data.PaperAugment has matched since before the device path (the reference of the weights test)."""

    def __init__(self):
        self.compose = v2.Compose([v2.RandAugment(), v2.ColorJitter(**data.COLOR_JITTER)])

    def __call__(self, images, seeds):
        out = []
        with torch.random.fork_rng(devices=[]):
            for x, s in zip(images, seeds):
                torch.manual_seed(s)
                out.append(self.compose(x))
        return out


def test_two_epochs_give_the_same_weights_on_the_host_path_the_device_path_and_torchvision(image_data, tmp_path,
                                                                                           monkeypatch):
    flags = ("--num_epochs", "2", "--oversampling", "--contrastive", "--seed", "3", "--threads", "1")
    weights = {}
    for name, extra in (("host", ["--data_path", "host"]), ("device", ["--data_path", "device"]),
                        ("device_workers", ["--data_path", "device", "--num_workers", "2"])):
        run = run_train(image_data["train"], tmp_path / name, *flags, *extra)
        weights[name] = torch.load(os.path.join(run, "last.pth"), weights_only=True)["model"]
    monkeypatch.setattr(data, "build_augment", lambda name: TorchvisionPerImage())
    run = run_train(image_data["train"], tmp_path / "torchvision", *flags, "--data_path", "host")
    weights["torchvision"] = torch.load(os.path.join(run, "last.pth"), weights_only=True)["model"]
    for name in ("device", "device_workers", "torchvision"):
        assert all(torch.equal(weights["host"][k], weights[name][k]) for k in weights["host"]), name


# ---------------------------------------------------------------- CUDA only (bench_gpu.sh runs them)

@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_pixels_equal_cpu_pixels_over_2048_images_at_224_px():
    """The device path on CUDA against the host path on the CPU, 2,048 images at 224 px in batches of
    256, every image drawn from its own seed."""
    train.use_exact_float32()
    aug = data.PaperAugment()
    cpu, gpu = augment.Applier(aug, "cpu"), augment.Applier(aug, "cuda")
    mismatched, pixels, where = 0, 0, {}
    ops = cpu.variants(224, 224).ops
    for b in range(8):
        images = sample_images(256, 224, seed=100 + b)
        keys = [(i, 10_000 * b + i) for i in range(256)]
        plan = augment.draw_plan(aug, cpu.variants(224, 224), keys, [0] * 256)
        bounds = plan.pop("bounds").tolist()
        host = torch.stack(aug(list(images), [s for _, s in keys]))
        on_gpu = gpu(images.cuda(), {k: v.cuda() for k, v in plan.items()}, bounds).cpu()
        differ = (on_gpu != host).flatten(1)
        mismatched, pixels = mismatched + int(differ.any(1).sum()), pixels + int(differ.sum())
        variant = torch.empty_like(plan["sorted"]).scatter_(1, plan["perm"], plan["sorted"])     # (2, 256)
        for i in differ.any(1).nonzero().flatten().tolist():                                      # what they drew
            for name in {ops[v][0] for v in variant[:, i].tolist()}:
                where[name] = where.get(name, 0) + 1
    print(f"CUDA vs CPU pixels at 224 px: {mismatched} of 2048 images, {pixels} pixels differ; "
          f"operations drawn by those images: {where}")
    assert mismatched == 0, f"{mismatched} of 2048 images ({pixels} pixels) differ; their operations: {where}"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_float_steps_round_as_on_the_cpu():
    """The float32 steps the augmentation relies on (x * r, multiply-add by addcmul and by add with
    alpha, true division, floor), on 2^24 random operands: CUDA's results equal the CPU's bit for bit."""
    gen = torch.Generator().manual_seed(0)
    n = 1 << 24
    x = torch.randint(0, 256, (n,), generator=gen).float()
    o = torch.randint(0, 256, (n,), generator=gen).float() + torch.rand(n, generator=gen).mul(255).floor() / 65536
    r = torch.empty(n).uniform_(0.8, 1.2, generator=gen)
    steps = {"mul": lambda x, o, r: x.mul(r), "addcmul": lambda x, o, r: torch.addcmul(x.mul(r), o, 1 - r),
             "add_alpha": lambda x, o, r: x.mul(0.7300000190734863).add_(o, alpha=0.2699999809265137),
             "div": lambda x, o, r: o / r, "grey": lambda x, o, r: x.mul(0.2989).add_(o, alpha=0.587).floor_()}
    differ = {name: int((f(x, o, r) != f(x.cuda(), o.cuda(), r.cuda()).cpu()).sum()) for name, f in steps.items()}
    print("CUDA vs CPU, differing results of 2^24:", differ)
    assert not any(differ.values()), differ


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a_cuda_batch_is_prepared_with_no_host_sync():
    aug = data.PaperAugment()
    labels = [0, 1] * 128
    cache = sample_images(256, 64, seed=6).cuda()
    applier = augment.Applier(aug, "cuda")
    applier.variants(64, 64)
    prefetch = feed.DevicePrefetch.__new__(feed.DevicePrefetch)
    prefetch.device, prefetch.cache, prefetch.applier = torch.device("cuda"), cache, applier
    draws = feed.Draws(labels, 64, aug)
    plans = [{k: v.pin_memory() for k, v in draws.__getitems__([(i, 7 * i) for i in range(b, b + 64)]).items()}
             for b in range(0, 256, 64)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = prefetch.prepare_chunk(plans)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [x.shape for x, _ in batches] == [(64, 3, 64, 64)] * 4
