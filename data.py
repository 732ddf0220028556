"""Data: class folders, the ratio subsample, robust image decoding, the uint8 cache, augmentation
and the epoch's sampling order.

Pixels take one path everywhere: load_image() decodes a file, converts it to RGB and resizes it to
(img_size, img_size) with PIL's bilinear filter (what torchvision's Resize does on a PIL image), as
uint8. Training and evaluation both start from those uint8 pixels, kept in memory (the cache) or
decoded again per visit (--no-cache); normalisation happens on the device, batch by batch.
"""
import hashlib
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (about 9459 x 9459); larger headers are refused
AUGMENTS = ("paper", "plain")
COLOR_JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2}  # the paper gives no values


class BadImage(Exception):
    """A file that cannot become an image: unreadable, truncated, not an image, or a decompression bomb."""


# ---------------------------------------------------------------- folders

def _visible(name):
    return not name.startswith(".")


def list_class_folders(root):
    """Sorted class folder names under root; hidden folders (.git, .ipynb_checkpoints) are never classes."""
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} does not exist or is not a folder")
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))


def list_images(folder):
    """Sorted image files under folder (recursively, like ImageFolder), skipping hidden files and folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        found += [os.path.join(dirpath, f) for f in filenames
                  if _visible(f) and f.lower().endswith(IMG_EXTENSIONS)]
    return sorted(found)


def find_class_images(root, classes, flag="--classes"):
    """{class: [paths]} for the named class folders of root, in the order of classes."""
    seen = set()
    for c in classes:
        if c in seen:
            raise UserError(f"{flag} names {c!r} twice; give each class once")
        seen.add(c)
    available = list_class_folders(root)
    missing = [c for c in classes if c not in available]
    if missing:
        raise UserError(f"{flag}: no folder {', '.join(repr(m) for m in missing)} in {root}; "
                        f"the class folders there are: {', '.join(available) or '(none)'}")
    images = {c: list_images(os.path.join(root, c)) for c in classes}
    empty = [c for c in classes if not images[c]]
    if empty:
        raise UserError(f"class folder(s) {', '.join(os.path.join(root, c) for c in empty)} hold no image "
                        f"(looked for {' '.join(IMG_EXTENSIONS)})")
    return images


def subsample(images, classes, ratio, max_per_class, seed):
    """Pick the images of each class for the ratio.

    ratio 'all': every class keeps all its images (at most max_per_class each). Otherwise the reference
    class (the first) keeps n_1 = min(its count, max_per_class) images; class k keeps
    ratio_k / ratio_1 * n_1 rounded half up (floor(x + 0.5): 4.5 -> 5, unlike Python's round; x is first
    rounded to 9 decimals, so that a floating-point product just below a half, 0.145 x 100, counts as
    the half it is), at least 1.
    Each class's images are one permutation of its sorted file list, seeded by (seed, class name), of
    which the first n are taken: for one seed, the images chosen at a smaller ratio or cap are a subset
    of those chosen at a larger one (nested subsets), and a class's choice does not depend on the others.
    Returns (paths, labels, counts, notes): labels follow the order of classes; counts is
    {class: {"available", "requested", "selected"}}; notes are warnings for the user.
    """
    n_ref = len(images[classes[0]])
    if max_per_class is not None:
        n_ref = min(n_ref, max_per_class)
    paths, labels, counts, notes = [], [], {}, []
    for k, c in enumerate(classes):
        available = len(images[c])
        if ratio == "all":                     # the folder as it is: every image, up to the cap when one is given
            requested = available if max_per_class is None else min(available, max_per_class)
        else:
            exact = round(ratio[k] / ratio[0] * n_ref, 9)   # 0.145 x 100 = 14.499999999999998 is 14.5
            requested = max(1, math.floor(exact + 0.5))
            if math.floor(exact + 0.5) < 1:
                notes.append(f"ratio {ratio[k]:g} of {n_ref} images gives {exact:.3g} image(s) for {c!r}; keeping 1")
        if available < requested:
            notes.append(f"class {c!r} has {available} image(s) but the ratio asks for {requested}; using all {available}")
        selected = min(requested, available)
        chosen = np.sort(class_permutation(available, seed, c)[:selected])
        paths += [images[c][i] for i in chosen]
        labels += [k] * selected
        counts[c] = {"available": available, "requested": requested, "selected": selected}
    return paths, labels, counts, notes


def class_permutation(n, seed, class_name):
    """A permutation of range(n), a pure function of (seed, class name) on every machine (numpy PCG64)."""
    name_key = int.from_bytes(hashlib.sha256(class_name.encode("utf-8")).digest()[:8], "big")
    return np.random.default_rng([seed, name_key]).permutation(n)


def subset_id(paths, root):
    """sha1 of the chosen files' paths relative to root, with '/' separators on every OS."""
    rel = (os.path.relpath(p, root).replace(os.sep, "/") for p in paths)
    return hashlib.sha1("\n".join(rel).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- decoding

def _to_rgb(im):
    """Any PIL mode -> 8-bit RGB. 16- and 32-bit grey levels are scaled to 0..255, not clipped."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "I" or a.max(initial=0) > 255 else 255.0
        a = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        im = Image.fromarray(a, mode="L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = a.max(initial=0)
        a = a / top * 255.0 if top > 1.0 else a * 255.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(path, size, box=None):
    """Decode path -> uint8 array (size, size, 3); BadImage if it is not a usable image. box: a
    detector's crop, see open_rgb."""
    return np.array(open_rgb(path, box, size), dtype=np.uint8)  # a writable copy


def open_rgb(path, box=None, size=None):
    """Decode path -> PIL RGB image, resized to (size, size) with PIL's bilinear filter when size is
    given; BadImage if it is not a usable image. box: a detector's normalised [x, y, width, height]
    (MegaDetector's bbox): the image is first turned upright by its EXIF orientation, as the detector
    saw it, and cut to crop_box() of it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise BadImage(f"{im.width}x{im.height} pixels is over the {MAX_PIXELS} limit")
                im.load()
                if box is None:
                    rgb = _to_rgb(im)
                else:
                    rgb = _to_rgb(ImageOps.exif_transpose(im))
                    rgb = rgb.crop(crop_box(rgb.width, rgb.height, box))
                if size is not None:
                    return rgb.resize((size, size), Image.BILINEAR)
                return rgb.copy() if rgb is im else rgb            # usable after the file is closed
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise BadImage(f"{type(e).__name__}: {e}")


CROP_MARGIN = 0.1   # of the box's longer side, added on every side


def crop_box(width, height, box, margin=CROP_MARGIN):
    """The pixel rectangle (left, top, right, bottom) that a detection's normalised box [x, y, w, h]
    becomes: a square of side (1 + 2 margin) x the box's longer side, centred on the box (so that the
    resize to the model's square input does not stretch the animal), moved inside the image where it
    sticks out, and cut to the image only where it is larger than the image (such a crop is stretched
    like a whole image). At least 1 pixel each way."""
    x, y, w, h = (float(v) for v in box)
    side = max(w * width, h * height) * (1 + 2 * margin)
    cx, cy = (x + w / 2) * width, (y + h / 2) * height
    out = []
    for centre, extent in ((cx, width), (cy, height)):
        s = min(side, extent)
        lo = min(max(centre - s / 2, 0.0), extent - s)
        a = int(round(lo))
        b = max(a + 1, min(extent, int(round(lo + s))))
        out.append((min(a, extent - 1), b))
    (left, right), (top, bottom) = out
    return left, top, right, bottom


class _Decode(Dataset):
    """Items are paths, or (path, box) for a detector's crop of the image."""
    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        item = self.paths[i]
        path, box = (item, None) if isinstance(item, str) else item
        try:
            return i, load_image(path, self.size, box), None
        except BadImage as e:
            return i, None, str(e)


def _as_list(items):
    """collate_fn of the decoding loader: the batch as it is. A module-level function, so that it
    pickles into workers started with spawn or forkserver (the default on macOS, Windows and, from
    Python 3.14, Linux)."""
    return items


def decode_batches(paths, size, batch_size=64, num_workers=0, mp_context=None):
    """Decode paths (or (path, box) crops, see load_image) in order, in parallel workers -> batches of [(index, uint8 array (S, S, 3) or None,
    reason it is not an image or None)]: the one decoding of training, evaluation and prediction."""
    return DataLoader(_Decode(paths, size), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list,
                      multiprocessing_context=mp_context if num_workers else None)


def decode_all(paths, size, num_workers=0, keep=True, progress=None, mp_context=None):
    """Decode every path once, in parallel workers (mp_context: a start method name or context for
    them; None = Python's default).

    Returns (images, bad): images is a uint8 tensor (N_good, 3, size, size) in the order of the good
    paths (None when keep=False, i.e. only checking); bad is a list of (index, path, reason).
    """
    images = torch.empty((len(paths), 3, size, size), dtype=torch.uint8) if keep else None
    good, bad = [], []
    for batch in decode_batches(paths, size, num_workers=num_workers, mp_context=mp_context):
        for i, arr, reason in batch:
            if arr is None:
                bad.append((i, paths[i], reason))
                continue
            if keep:
                images[len(good)] = torch.from_numpy(arr).permute(2, 0, 1)  # (3, H, W)
            good.append(i)
        if progress is not None:
            progress.update(len(batch))
    if keep:
        images = images[:len(good)].clone() if bad else images
    return images, bad


# ---------------------------------------------------------------- training data

def build_augment(name):
    """'paper': PaperAugment (RandAugment then ColorJitter, drawn per image); 'plain': None."""
    if name == "paper":
        return PaperAugment()
    if name == "plain":
        return None
    raise UserError(f"--augment {name!r} is not valid; choose one of: {', '.join(AUGMENTS)}")


def _grayscale(x):
    """(n, 3, H, W) uint8 -> (n, 1, H, W) float32 luma, floored: torchvision's weights and rounding."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def _blend(x, other, ratio):
    """ratio * x + (1 - ratio) * other, clamped to uint8, one ratio (n, 1, 1, 1) per image."""
    return torch.addcmul(x.mul(ratio), other, 1 - ratio).clamp_(0, 255).to(torch.uint8)


# RandAugment's operations that, with its nearest interpolation and no fill, only move pixels (or fill
# them with 0), and those that map each uint8 value to another whatever the rest of the image holds
# (its Identity changes nothing and is skipped)
MOVES_PIXELS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
MAPS_VALUES = ("Brightness", "Posterize", "Solarize")


class PaperAugment:
    """RandAugment then ColorJitter on uint8 (3, S, S) images, drawn per image: the same random draws,
    in the same order, as v2.Compose([v2.RandAugment(), v2.ColorJitter(**COLOR_JITTER)]) image after
    image, and the same pixels (tests check both, for every operation and sign). Called on a list of
    images (a batch), it first makes every image's draws, then applies each step to the whole batch
    at once where it can:
      - an operation that moves pixels (shear, translate, rotate, at its one magnitude and sign) is a
        fixed map from output to input pixel for an S x S image: torchvision's own operation applied
        once to an image of pixel numbers gives it, and one gather applies every image's map;
      - Brightness, Posterize and Solarize map each uint8 value to one value: torchvision's operation
        applied once to the 256 values gives the table, and one gather applies every image's table;
      - the others (Color, Contrast, Sharpness, AutoContrast, Equalize) run once per group of images
        that drew the same operation and magnitude;
      - ColorJitter's three operations are one blend per position in its drawn order, with one factor
        per image: brightness blends with 0, contrast with the mean of the grayscale image, saturation
        with the grayscale image (torchvision's formulas; x * r + 0 * (1 - r) is x * r exactly)."""

    def __init__(self):
        self.randaugment, self.jitter = v2.RandAugment(), v2.ColorJitter(**COLOR_JITTER)
        self._spaces = {}       # (H, W) -> RandAugment's operations with their magnitudes
        self._tables = {}       # (operation, magnitude, H, W) -> its pixel map or value table
        j = self.jitter
        assert j.hue is None and None not in (j.brightness, j.contrast, j.saturation)
        self._jitter_ranges = (j.brightness, j.contrast, j.saturation)

    def _gathers(self):
        """Whether pixel maps and value tables apply: RandAugment's nearest interpolation and no fill
        (its defaults); otherwise every operation runs per group."""
        ra = self.randaugment
        return (v2.InterpolationMode(ra.interpolation) == v2.InterpolationMode.NEAREST
                and all(f is None for f in ra._fill.values()))

    def _space(self, h, w):
        """RandAugment's operations as (name, signed, magnitude or None) for an H x W image, in the order it
        draws them from: the magnitudes are a pure function of the size (no random draw), computed once."""
        if (h, w) not in self._spaces:
            ra = self.randaugment
            space = []
            for name, (magnitudes_fn, signed) in ra._AUGMENTATION_SPACE.items():
                magnitudes = magnitudes_fn(ra.num_magnitude_bins, h, w)
                space.append((name, signed, None if magnitudes is None else float(magnitudes[ra.magnitude])))
            self._spaces[h, w] = space
        return self._spaces[h, w]

    def _draw(self, x, generator=None):
        return self.draw(x.shape[-2], x.shape[-1], generator)

    def draw(self, h, w, generator=None):
        """-> ([(operation, magnitude)] of RandAugment, ColorJitter's order, its 3 factors) for one H x W
        image, the draws that RandAugment.forward and ColorJitter.make_params make, in their order, from
        generator (None: torch's global one, as torchvision draws; a CPU generator seeded with s draws
        what the global one seeded with s would)."""
        g = generator
        space, ops = self._space(h, w), []
        for _ in range(self.randaugment.num_ops):
            name, signed, magnitude = space[int(torch.randint(len(space), (), generator=g))]
            if magnitude is None:
                magnitude = 0.0
            elif signed and torch.rand((), generator=g) <= 0.5:
                magnitude *= -1
            ops.append((name, magnitude))
        # ColorJitter's order: 0 brightness, 1 contrast, 2 saturation (3, hue, is not used)
        order = tuple(i for i in torch.randperm(4, generator=g).tolist() if i < 3)
        factors = tuple(float(torch.empty(1).uniform_(*r, generator=g).item()) for r in self._jitter_ranges)
        return ops, order, factors

    def draws(self, images, seeds):
        """Each image's draws from a generator seeded with its seed alone (torch's global generator is
        not used: draws made in a thread beside the training loop stay the same)."""
        g = torch.Generator()
        return [self._draw(x, g.manual_seed(s)) for x, s in zip(images, seeds, strict=True)]

    def _randaugment_op(self, x, op):
        ra = self.randaugment
        return ra._apply_image_or_video_transform(x, op[0], op[1], interpolation=ra.interpolation, fill=ra._fill)

    def _table(self, op, h, w):
        """An operation of MOVES_PIXELS: for each output pixel of an H x W image, the input pixel it
        takes (h * w: the fill, 0), as torchvision computes it on pixel numbers 1..h*w in float32, the
        grid and dtype it uses for a uint8 image. One of MAPS_VALUES: its 256 uint8 outputs."""
        key = (*op, h, w)
        if key not in self._tables:
            if op[0] in MOVES_PIXELS:
                numbers = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w)
                taken = self._randaugment_op(numbers, op).flatten().long() - 1
                self._tables[key] = torch.where(taken < 0, h * w, taken)
            else:
                self._tables[key] = self._randaugment_op(torch.arange(256, dtype=torch.uint8).view(1, 1, 256),
                                                         op).flatten()
        return self._tables[key]

    def _randaugment_step(self, x, ops):
        """Apply ops[i] (an operation and its magnitude) to image x[i] of the (n, 3, H, W) batch, in place."""
        c, h, w = x.shape[1:]
        gathers = self._gathers()
        moves = [i for i, op in enumerate(ops) if op[0] in MOVES_PIXELS] if gathers else []
        values = [i for i, op in enumerate(ops) if op[0] in MAPS_VALUES] if gathers else []
        if moves:
            where = torch.stack([self._table(ops[i], h, w) for i in moves]).unsqueeze(1).expand(-1, c, -1)
            flat = torch.cat([x[moves].flatten(2), x.new_zeros(len(moves), c, 1)], dim=2)
            x[moves] = flat.gather(2, where).view(-1, c, h, w)
        if values:
            tables = torch.stack([self._table(ops[i], h, w) for i in values])
            x[values] = tables.gather(1, x[values].flatten(1).long()).view(-1, c, h, w)
        rest, done = {}, set(moves) | set(values)
        for i, op in enumerate(ops):
            if op[0] != "Identity" and i not in done:
                rest.setdefault(op, []).append(i)
        for op, idx in rest.items():
            x[idx] = self._randaugment_op(x[idx], op)

    def __call__(self, images, seeds=None):
        """images: one (3, S, S) uint8 tensor or a list of them. seeds: None (draw from torch's global
        generator, as torchvision does) or one integer per image: image i's draws then come from a CPU
        generator seeded with seeds[i] alone (torch's global state is left as it was)."""
        if torch.is_tensor(images):
            return self([images], None if seeds is None else [seeds])[0]
        drawn = [self._draw(x) for x in images] if seeds is None else self.draws(images, seeds)
        x = torch.stack(images)
        for k in range(self.randaugment.num_ops):
            self._randaugment_step(x, [d[0][k] for d in drawn])
        factors = torch.tensor([d[2] for d in drawn], dtype=torch.float32)   # drawn in float32: exact
        orders = torch.tensor([d[1] for d in drawn]).view(-1, 3, 1, 1, 1)
        for position in range(3):     # every image takes one of the three operations at each position
            op = orders[:, position]
            gray = _grayscale(x)
            other = torch.where(op == 2, gray, torch.where(op == 1, gray.mean(dim=(-3, -2, -1), keepdim=True), 0.0))
            x = _blend(x, other, factors.gather(1, op.view(-1, 1)).view(-1, 1, 1, 1))
        return list(x.unbind(0))


class ImageSet(Dataset):
    """(uint8 image (3, S, S), label) pairs from the cache (images) or decoded per visit (paths). The
    DataLoader fetches a batch through __getitems__, and transform (a PaperAugment or None) gets the
    batch's images as one list. A key is an image index, or (index, draw seed) as EpochBatches yields
    them: that image's augmentation is then drawn from the seed alone."""

    def __init__(self, labels, size, images=None, paths=None, transform=None):
        assert images is not None or paths is not None
        self.labels, self.size, self.images, self.paths, self.transform = labels, size, images, paths, transform

    def __len__(self):
        return len(self.labels)

    def _image(self, i):
        if self.images is not None:
            return self.images[i]
        return torch.from_numpy(load_image(self.paths[i], self.size)).permute(2, 0, 1)

    def __getitems__(self, keys):
        seeded = bool(keys) and isinstance(keys[0], tuple)
        indices = [k[0] for k in keys] if seeded else list(keys)
        xs = [self._image(i) for i in indices]
        if self.transform is not None:
            xs = self.transform(xs, [k[1] for k in keys] if seeded else None)
        return [(x, self.labels[i]) for x, i in zip(xs, indices)]

    def __getitem__(self, key):
        return self.__getitems__([key])[0]


SAMPLERS = ("uniform", "oversample", "sqrt")


class EpochBatches(torch.utils.data.Sampler):
    """The training stream as batches of (image index, augmentation draw seed), a pure function of
    (seed, epoch): the same on every machine, with any number of DataLoader workers, any start method
    and any device. Call set_epoch(epoch) before iterating.

    sampler 'uniform': every image once per epoch, in a random order. 'oversample': draws with
    replacement, probability 1 / (count of the image's class), num_classes x (largest class count)
    draws per epoch: every class is drawn as often as the majority class, in expectation (1:1 as in
    the paper; what torch's WeightedRandomSampler does, from numpy's PCG64 here). 'sqrt': square-root
    sampling (Mahajan et al. 2018; Kang et al., ICLR 2020): class j drawn with probability
    proportional to sqrt(n_j), images of a class equally likely, with replacement; as many draws per
    epoch as there are training images (the same number of steps as 'uniform').
    A last batch of a single image is left out (BatchNorm and the B x B similarity need two); with the
    next epoch's reshuffle that image is seen in another epoch.
    """

    def __init__(self, labels, num_classes, batch_size, sampler, seed):
        if sampler not in SAMPLERS:
            raise UserError(f"sampler {sampler!r} is not valid; choose one of: {', '.join(SAMPLERS)}")
        if batch_size < 2:
            raise UserError(f"--batch_size must be at least 2 (BatchNorm needs two images), got {batch_size}")
        self.labels = np.asarray(labels)
        self.counts = np.bincount(self.labels, minlength=num_classes)
        assert (self.counts > 0).all(), "every class needs at least one image"
        self.batch_size, self.sampler, self.seed, self.epoch = batch_size, sampler, seed, 1
        self.length = num_classes * int(self.counts.max()) if sampler == "oversample" else len(self.labels)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def order(self, epoch=None):
        """-> (image indices of the epoch (default: the one set), one draw seed per position), from numpy's
        PCG64 seeded with (seed, epoch)."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        if self.sampler == "uniform":
            order = rng.permutation(len(self.labels))
        else:   # per image: 1 / n_j (oversample) or sqrt(n_j) / n_j (sqrt), for an image of class j
            p = 1.0 / self.counts[self.labels] if self.sampler == "oversample" else self.counts[self.labels] ** -0.5
            order = rng.choice(len(self.labels), size=self.length, replace=True, p=p / p.sum())
        return order, rng.integers(0, 2 ** 63, size=len(order), dtype=np.int64)

    def __len__(self):
        return self.length // self.batch_size + (self.length % self.batch_size > 1)

    def __iter__(self):
        return self.batches_of(self.epoch)

    def batches_of(self, epoch):
        """The batches of one epoch, whatever epoch is set."""
        order, draws = self.order(epoch)
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield [(int(i), int(s)) for i, s in zip(order[sl], draws[sl])]


class ModelInput:
    """uint8 (B, 3, H, W) -> normalised float32 on device; the uint8 batch is what crosses to the GPU.
    The constants are built once per device, not per batch, and reach a GPU from pinned memory: a copy
    from pageable memory would make the host wait for the device at the start of every epoch."""

    def __init__(self, device, channels_last=False):
        self.device, self.channels_last = torch.device(device), channels_last
        self.mean, self.std = self.constant(IMAGENET_MEAN), self.constant(IMAGENET_STD)

    def constant(self, values):
        t = torch.tensor(values).view(1, 3, 1, 1) * 255
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def __call__(self, x):
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x.float() - self.mean) / self.std
