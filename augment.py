"""The paper's augmentation (data.PaperAugment: RandAugment then ColorJitter, drawn per image) applied
to a whole batch on any device, from draws made on the CPU.

The draws are data.PaperAugment's own, image by image from each image's seed, in the DataLoader
workers or the main process (draw_plan), so a run's stream of decisions is the same whichever path
applies them. A plan is a few small tensors: each image's operation variant per RandAugment step,
the images sorted by variant (so that every kind of operation is one contiguous segment of the
batch), ColorJitter's order and factors. apply_plan then works on the uint8 batch where it lies, with
no host sync: segment bounds are host integers, every index and factor is a device tensor.

The same pixels as data.PaperAugment on a CPU (tests: every operation, sign and size; whole epochs;
on CUDA, 2,048 images at 224 px in bench_gpu.sh). How each step stays exact on both devices:
  - pixel maps (shear, translate, rotate) and value tables (brightness, posterize, solarize) are
    torchvision's own operation applied once on the CPU, moved to the device, applied by gathers;
    equalize is torchvision's batched integer kernel: integers are exact everywhere;
  - sharpness: the blurred pixel, round((sum of the 3 x 3 window + 4 x centre) / 13), in integers. It
    is never a tie (k / 13 is never k' + 1/2) and float32 convolution errors stay below 1e-4 of the
    1/26 that separates it from one, so it equals torchvision's float32 convolution on any device,
    TF32 or not; this also removes the one convolution;
  - grey levels and blends (color, contrast, sharpness, ColorJitter) are multiply-adds in float32, as
    torchvision computes them: x * r, then other * (1 - r) added with one rounding (a fused
    multiply-add, what torch's CPU kernels do on CPUs with FMA and nvcc's default contraction does on
    CUDA), written as the same torch operations on both devices;
  - contrast's mean grey level is the sum of integer grey levels (exact in float32 while H x W x 255
    < 2^24, i.e. up to 256 x 256 px) divided by H x W held in a device tensor: on CUDA a division by a
    Python number is a multiplication by its reciprocal, which rounds differently from the CPU's
    division; above 256 px the float32 sums themselves may differ in their last bit between devices;
  - autocontrast: min and max, one multiplication and one division per pixel, each correctly
    rounded; its boolean masks are torch.where (torchvision's masked assignment would sync).
"""
import torch
from torchvision.transforms.v2 import functional as F

from data import MAPS_VALUES, MOVES_PIXELS, _grayscale

# operation kinds in the order of a step's segments: an image sorted by its variant lands in its kind's
# segment, and each segment is applied at once
KINDS = ("identity", "moves", "values", "blends", "sharpness", "autocontrast", "equalize")
KIND_OF = {**{n: "moves" for n in MOVES_PIXELS}, **{n: "values" for n in MAPS_VALUES}, "Identity": "identity",
           "Color": "blends", "Contrast": "blends", "Sharpness": "sharpness", "AutoContrast": "autocontrast",
           "Equalize": "equalize"}


class Variants:
    """RandAugment's operations at an H x W size as variants (operation, signed magnitude), numbered
    kind by kind in KINDS order, so that sorting a batch by variant groups it by kind."""

    def __init__(self, augment, h, w):
        if not augment._gathers():
            raise ValueError("the device path needs RandAugment's nearest interpolation and no fill (its defaults)")
        found = []
        for name, signed, magnitude in augment._space(h, w):
            if name not in KIND_OF:
                raise ValueError(f"RandAugment operation {name!r} has no device implementation (torchvision changed)")
            m = 0.0 if magnitude is None else magnitude
            for v in ((m, -m) if signed and m else (m,)):
                found.append((KINDS.index(KIND_OF[name]), name, v))
        found.sort(key=lambda t: t[0])                   # stable: torchvision's order within a kind
        self.ops = [(name, v) for _, name, v in found]
        self.kind = [KINDS[k] for k, _, _ in found]
        self.index = {op: i for i, op in enumerate(self.ops)}
        self.first = {k: next((i for i, kind in enumerate(self.kind) if KINDS.index(kind) >= KINDS.index(k)),
                              len(self.ops)) for k in KINDS}
        self.starts = torch.tensor([self.first[k] for k in KINDS] + [len(self.ops)])
        self.augment, self.h, self.w = augment, h, w

    def bounds(self, sorted_variants):
        """(num_ops, n) variants sorted per row -> (num_ops, len(KINDS) + 1) segment starts, per kind."""
        return torch.searchsorted(sorted_variants.contiguous(),
                                  self.starts.expand(len(sorted_variants), -1).contiguous())

    def tables(self, device):
        """The device's constants: pixel maps (moves, H*W) int64, value tables (values, 256) uint8, and per
        variant the blend ratio r and 1 - r (float32, each rounded from float64 as torchvision's Python
        floats are) and whether it blends with the mean (contrast) rather than the grey image."""
        a, hw = self.augment, self.h * self.w
        moves = [op for op, k in zip(self.ops, self.kind) if k == "moves"]
        values = [op for op, k in zip(self.ops, self.kind) if k == "values"]
        ratio = [1.0 + v if k in ("blends", "sharpness") else 1.0 for (_, v), k in zip(self.ops, self.kind)]
        t = {"maps": torch.stack([a._table(op, self.h, self.w) for op in moves]) if moves else
             torch.zeros(0, hw, dtype=torch.long),
             "values": torch.stack([a._table(op, self.h, self.w) for op in values]) if values else
             torch.zeros(0, 256, dtype=torch.uint8),
             "ratio": torch.tensor(ratio, dtype=torch.float64).float(),
             "one_minus": torch.tensor([1.0 - r for r in ratio], dtype=torch.float64).float(),
             "contrast": torch.tensor([name == "Contrast" for name, _ in self.ops]),
             "pixels": torch.tensor(float(hw))}
        return {k: v.to(device) for k, v in t.items()}


def draw_plan(augment, variants, keys, labels):
    """The draws of a batch of keys (image index, draw seed), each image's from a generator seeded with its
    seed alone, as data.PaperAugment draws (torch's global generator is not used) -> a plan of CPU
    tensors: index, label (n,); variant (num_ops, n); perm, the batch order sorted by variant per step,
    sorted (its variants), bounds (num_ops, kinds + 1); order (n, 3) and factors (n, 3), ColorJitter's."""
    g = torch.Generator()
    drawn = [augment.draw(variants.h, variants.w, g.manual_seed(seed)) for _, seed in keys]
    variant = torch.tensor([[variants.index[d[0][k]] for d in drawn] for k in range(augment.randaugment.num_ops)],
                           dtype=torch.long).view(augment.randaugment.num_ops, len(keys))
    ordered, perm = torch.sort(variant, dim=1, stable=True)
    return {"index": torch.tensor([i for i, _ in keys], dtype=torch.long),
            "label": torch.tensor([labels[i] for i, _ in keys], dtype=torch.long),
            "variant": variant, "perm": perm, "sorted": ordered, "bounds": variants.bounds(ordered),
            "order": torch.tensor([d[1] for d in drawn], dtype=torch.long).view(-1, 3),
            "factors": torch.tensor([d[2] for d in drawn], dtype=torch.float32).view(-1, 3)}


def merge_plans(plans, variants):
    """Consecutive batches' plans as one plan (the images one after the other, sorted by variant anew),
    so that one application serves them all: the same pixels, fewer kernel launches per image. Plans
    of the plain augmentation (index and label only) need no variants (None)."""
    if len(plans) == 1:
        return plans[0]
    plan = {k: torch.cat([p[k] for p in plans], dim=1 if k == "variant" else 0)
            for k in plans[0] if k not in ("perm", "sorted", "bounds")}
    if "variant" in plan:
        plan["sorted"], plan["perm"] = torch.sort(plan["variant"], dim=1, stable=True)
        plan["bounds"] = variants.bounds(plan["sorted"])
    return plan


def apply_plan(x, plan, bounds, t):
    """x: uint8 (n, 3, H, W), owned (changed in place and returned); plan: draw_plan's tensors on x's
    device; bounds: its bounds as host lists; t: Variants.tables on x's device. -> uint8 (n, 3, H, W)."""
    for k, b in enumerate(bounds):
        first = b[1]                                      # identity images come first: left as they are
        if first == len(x):
            continue
        perm, v = plan["perm"][k, first:], plan["sorted"][k, first:]
        xs = x.index_select(0, perm)                      # (m, 3, H, W), sorted by variant
        for kind, lo, hi in zip(KINDS[1:], b[1:-1], b[2:]):
            if hi > lo:
                seg = slice(lo - first, hi - first)
                xs[seg] = KIND_APPLY[kind](xs[seg], v[seg], t)
        x.index_copy_(0, perm, xs)
    return color_jitter(x, plan["order"], plan["factors"], t["pixels"])


def _moves(x, v, t):
    """Each image through its variant's pixel map: one gather (the map's index H*W is the fill, 0)."""
    m, c, h, w = x.shape
    where = t["maps"].index_select(0, v - t["first_moves"]).unsqueeze(1).expand(-1, c, -1)   # (m, 3, H*W)
    flat = torch.cat([x.flatten(2), x.new_zeros(m, c, 1)], dim=2)                           # (m, 3, H*W + 1)
    return flat.gather(2, where).view(m, c, h, w)


def _values(x, v, t):
    table = t["values"].index_select(0, v - t["first_values"])                             # (m, 256)
    return table.gather(1, x.flatten(1).long()).view_as(x)


def _blends(x, v, t):
    """Color (blend with the grey image) and Contrast (with its mean grey level), torchvision's
    formulas with each image's factor r: x * r + other * (1 - r), clamped and truncated to uint8."""
    gray = _grayscale(x)                                                                    # (m, 1, H, W)
    mean = gray.sum(dim=(-3, -2, -1), keepdim=True) / t["pixels"]                          # (m, 1, 1, 1)
    other = torch.where(t["contrast"].index_select(0, v).view(-1, 1, 1, 1), mean, gray)
    return _blend(x, other, t["ratio"].index_select(0, v).view(-1, 1, 1, 1),
                  t["one_minus"].index_select(0, v).view(-1, 1, 1, 1))


def _blend(x, other, ratio, one_minus):
    return torch.addcmul(x.mul(ratio), other, one_minus).clamp_(0, 255).to(torch.uint8)


def _sharpness(x, v, t):
    """torchvision's adjust_sharpness: inner pixels blended with the 3 x 3 blur (weights 1, centre 5,
    over 13), rounded; the border as it was."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    c = x.int()
    rows = c[..., :-2, :] + c[..., 1:-1, :] + c[..., 2:, :]                                 # (m, 3, H-2, W)
    window = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]                               # (m, 3, H-2, W-2)
    centre = c[..., 1:-1, 1:-1]
    blurred = torch.div(2 * (window + 4 * centre) + 13, 26, rounding_mode="floor")         # round(/13), no ties
    out = x.float()
    out[..., 1:-1, 1:-1] = torch.addcmul(out[..., 1:-1, 1:-1], (blurred - centre).float(),
                                         t["one_minus"].index_select(0, v).view(-1, 1, 1, 1))
    return out.clamp_(0, 255).to(torch.uint8)


def _autocontrast(x, v, t):
    """torchvision's autocontrast per image and channel, with torch.where for its masked assignments."""
    f = x.float()
    low, high = f.amin(dim=(-2, -1), keepdim=True), f.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    scale = (high - low).mul(1.0 / 255)
    low, scale = torch.where(flat, 0.0, low), torch.where(flat, 1.0, scale)
    return (f - low).div_(scale).clamp_(0, 255).to(torch.uint8)


def _equalize(x, v, t):
    return F.equalize(x)        # torchvision's kernel: batched, integer, no host sync


KIND_APPLY = {"moves": _moves, "values": _values, "blends": _blends, "sharpness": _sharpness,
              "autocontrast": _autocontrast, "equalize": _equalize}


def color_jitter(x, orders, factors, pixels):
    """ColorJitter's three operations in each image's drawn order (0 brightness, 1 contrast, 2
    saturation), one blend per position: brightness with 0, contrast with the mean grey level,
    saturation with the grey image, each image with its own factor (data.PaperAugment's arithmetic)."""
    orders = orders.view(-1, 3, 1, 1, 1)
    for position in range(3):
        op = orders[:, position]                                                            # (n, 1, 1, 1)
        gray = _grayscale(x)
        mean = gray.sum(dim=(-3, -2, -1), keepdim=True) / pixels
        other = torch.where(op == 2, gray, torch.where(op == 1, mean, 0.0))
        ratio = factors.gather(1, op.view(-1, 1)).view(-1, 1, 1, 1)
        x = _blend(x, other, ratio, 1 - ratio)
    return x


class Applier:
    """apply_plan with its constants per size on one device (the pixel maps, tables and factors are
    moved there once)."""

    def __init__(self, augment, device):
        self.augment, self.device, self.sizes = augment, torch.device(device), {}

    def variants(self, h, w):
        if (h, w) not in self.sizes:
            v = Variants(self.augment, h, w)
            t = v.tables(self.device)
            t.update(first_moves=v.first["moves"], first_values=v.first["values"])
            self.sizes[h, w] = (v, t)
        return self.sizes[h, w][0]

    def __call__(self, x, plan, bounds):
        self.variants(x.shape[-2], x.shape[-1])
        return apply_plan(x, plan, bounds, self.sizes[x.shape[-2], x.shape[-1]][1])
