"""ResNet-18 with feature taps (and the cosine-normalised head of LDAM), and evaluation. The losses are in
losses.py."""
import functools
import os
import urllib.error

import torch
import torch.nn.functional as F
import torchvision

from data import ModelInput
from utils import UserError, load_checkpoint

TAPPABLE = ("layer1", "layer2", "layer3", "layer4")
HYPERPARAMETER_BUFFERS = ("fc.scale",)   # buffers that hold a run's setting (CosineHead's s), not learnt weights


class CosineHead(torch.nn.Module):
    """The cosine-normalised last layer of LDAM (Cao et al., NeurIPS 2019; their NormedLinear):
    logits_j = s cos(theta_j) = s (x / |x|) . (w_j / |w_j|), no bias, s = --ldam_scale (30).
    x (B, D) -> (B, K). The scale is a buffer, so a checkpoint carries it."""

    def __init__(self, in_features, num_classes, scale=30.0):
        super().__init__()
        w = torch.empty(num_classes, in_features).uniform_(-1, 1)
        self.weight = torch.nn.Parameter(w / w.norm(dim=1, keepdim=True))      # (K, D), unit rows as theirs
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x):
        return self.scale * F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()   # (B, K)


SMALL_MAP_CONVS = ("matmul", "one_pixel", "conv")


class OnePixelConv2d(torch.nn.Conv2d):
    """torch's Conv2d, except where its output is a single pixel (ResNet-18's last stage at 32 px and
    below, where layer4's maps are 1 x 1): there the convolution is the matrix product it is, of the
    input pixels inside the kernel's one window with the taps that cover them; the taps that fall on the
    zero padding multiply zeros and are left out (their gradient is exactly 0, as in the convolution).
    The same parameters and state_dict; the result agrees with torch's convolution to float32 rounding
    (the sums run in another order), not to the last bit. On a CPU torch's convolution computes all 9
    taps of a 3 x 3 kernel on a 1 x 1 map, and its backward pass there is slow: a 32 px training step
    is 1.7x (one thread) to 2.3x (two threads) as fast this way (docs/performance.md)."""

    def forward(self, x):
        geometry = self.geometry(x)
        if geometry is None:
            return super().forward(x)
        kh, kw, sh, sw, ph, pw, h, w = geometry
        rows, cols = min(h, kh - ph), min(w, kw - pw)        # the input pixels inside the one window
        if not (0 <= h + 2 * ph - kh < sh and 0 <= w + 2 * pw - kw < sw and rows > 0 and cols > 0):
            return super().forward(x)                        # more than one output pixel (or none inside)
        taps = self.weight[:, :, ph:ph + rows, pw:pw + cols].reshape(self.out_channels, -1)
        return F.linear(x[:, :, :rows, :cols].reshape(len(x), -1), taps, self.bias).view(len(x), -1, 1, 1)

    def geometry(self, x):
        """(kh, kw, sh, sw, ph, pw, h, w): kernel, stride, padding and x's map size, for a plain convolution
        (one group, no dilation, zero padding given in pixels); None for any other (torch's own then)."""
        if (self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros"
                or isinstance(self.padding, str)):
            return None
        return (*self.kernel_size, *self.stride, *self.padding, *x.shape[-2:])


class SmallMapConv2d(OnePixelConv2d):
    """OnePixelConv2d, and also a convolution on a map no larger than its kernel with more than one
    output pixel (ResNet-18's 2 x 2 maps: layer3 at 32 px, layer4 at 64 px) as one matrix product: of
    the input pixels the windows reach (R of them) with the matrix that places each output pixel's taps
    on them ((C_out x P) x (C_in x R), P output pixels). A 3 x 3 convolution with padding 1 on a 2 x 2
    map is then one (4 C_in) x (4 C_out) product, 16 of the 36 multiplications per channel pair that
    torch's convolution does (the other 20 fall on the padding). Used where R is at most the kernel's
    taps, so that it never multiplies more than the convolution. The same parameters and state_dict;
    equal to the convolution to float32 rounding. train.py at 32 px is 1.07-1.20x as fast as with
    OnePixelConv2d alone on a 2-core AMD EPYC, at 64 px 1.12x (docs/performance.md)."""

    def forward(self, x):
        geometry = self.geometry(x)
        if geometry is None:
            return super().forward(x)
        kh, kw, sh, sw, ph, pw, h, w = geometry
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        rows, cols = min(h, (ho - 1) * sh - ph + kh), min(w, (wo - 1) * sw - pw + kw)   # the pixels reached
        if ho < 1 or wo < 1 or ho * wo == 1 or rows < 1 or cols < 1 or rows * cols > kh * kw:
            return super().forward(x)                        # one output pixel, or the convolution is cheaper
        pairs = tap_placement(kh, kw, sh, sw, ph, pw, ho, wo, rows, cols)
        big = _PlaceTaps.apply(self.weight, pairs, ho * wo, rows * cols)      # (C_out, P, C_in, R)
        pixels = x if (rows, cols) == (h, w) else x[:, :, :rows, :cols]
        y = F.linear(pixels.reshape(len(x), -1), big.view(self.out_channels * ho * wo, -1))
        y = y.view(len(x), self.out_channels, ho, wo)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


@functools.lru_cache(maxsize=None)
def tap_placement(kh, kw, sh, sw, ph, pw, ho, wo, rows, cols):
    """((output pixel, input pixel, tap row, tap column), ...): which tap of a kh x kw kernel (stride
    sh, sw; padding ph, pw) joins each output pixel of an ho x wo output to each input pixel of the
    rows x cols top-left block of the input, pixels counted row by row."""
    return tuple((i * wo + j, p * cols + q, p - i * sh + ph, q - j * sw + pw)
                 for i in range(ho) for j in range(wo) for p in range(rows) for q in range(cols)
                 if 0 <= p - i * sh + ph < kh and 0 <= q - j * sw + pw < kw)


class _PlaceTaps(torch.autograd.Function):
    """weight (C_out, C_in, kh, kw) -> the matrix (C_out, P, C_in, R) whose block [:, m, :, n] is the tap
    that joins output pixel m to input pixel n (tap_placement), zero where none does. Its gradient sums
    each tap's blocks back (in tap_placement's order), added in place into one weight-sized tensor,
    where autograd's gradient of the same indexing would zero-fill a weight-sized tensor per block."""

    @staticmethod
    def forward(ctx, weight, pairs, outputs, inputs):
        ctx.pairs, ctx.weight_shape = pairs, weight.shape
        big = weight.new_zeros(weight.shape[0], outputs, weight.shape[1], inputs)
        for m, n, a, b in pairs:
            big[:, m, :, n] = weight[:, :, a, b]
        return big

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        g = grad.new_zeros(ctx.weight_shape)
        for m, n, a, b in ctx.pairs:
            g[:, :, a, b] += grad[:, m, :, n]
        return g, None, None, None


def set_small_map_convs(model, how):
    """Every convolution of model computed as SmallMapConv2d ('matmul'), OnePixelConv2d ('one_pixel', as
    runs trained with --one_pixel_convs matmul) or torch's Conv2d ('conv', as runs trained before either
    existed). -> model."""
    if how not in SMALL_MAP_CONVS:
        raise UserError(f"small_map_convs {how!r} is not valid; choose one of: {', '.join(SMALL_MAP_CONVS)}")
    kind = {"matmul": SmallMapConv2d, "one_pixel": OnePixelConv2d, "conv": torch.nn.Conv2d}[how]
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.__class__ = kind
    return model


def small_map_convs_of(args):
    """How a run computes its convolutions on small maps: train.py's arguments (a dict) -> 'matmul',
    'one_pixel' or 'conv'. Runs of earlier versions recorded one_pixel_convs ('matmul': one-pixel
    outputs only) or nothing (torch's convolution)."""
    if "small_map_convs" in args:
        return args["small_map_convs"]
    return "one_pixel" if args.get("one_pixel_convs") == "matmul" else "conv"


def head_of(args):
    """'cosine' for a run trained with LDAM, else 'linear': train.py's arguments (a dict) -> head."""
    return "cosine" if args.get("loss") == "ldam" else "linear"


def build_model(num_classes, weights="imagenet", head="linear", scale=30.0, small_map_convs="matmul"):
    """torchvision resnet18 with a num_classes head: linear (torchvision's fc), or cosine (CosineHead
    with scale, for LDAM); its convolutions as set_small_map_convs says (small_map_convs).

    weights: 'imagenet' (torchvision's IMAGENET1K_V1, downloaded once into the torch hub cache),
    'none' (random initialisation), or a path to a state_dict / a train.py checkpoint. The file's head
    (fc) is kept only when its keys and shapes fit the head asked for.
    """
    if weights == "imagenet":
        try:
            model = torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise UserError(f"--weights imagenet: the ImageNet weights could not be downloaded ({e}). "
                            f"Without internet use --weights none, or --weights PATH to a resnet18 state_dict "
                            f"file (e.g. resnet18-f37072fd.pth copied into {torch.hub.get_dir()}/checkpoints).")
        model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    else:
        model = torchvision.models.resnet18(num_classes=num_classes)
    if head == "cosine":
        model.fc = CosineHead(model.fc.in_features, num_classes, scale)
    if weights not in ("imagenet", "none"):
        load_weights_file(model, weights)
    return set_small_map_convs(model, small_map_convs)


def load_weights_file(model, weights):
    """Load a resnet18 state_dict (or a train.py checkpoint) from the file weights into model."""
    if not os.path.isfile(weights):
        raise UserError(f"--weights {weights!r}: no such file; valid values are imagenet, none or a path "
                        f"to a state_dict file")
    state = load_checkpoint(weights)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a train.py checkpoint
    if not isinstance(state, dict):
        raise UserError(f"--weights {weights}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    # weights initialise the network, never a hyperparameter: the cosine head's scale stays --ldam_scale
    state = {k: v for k, v in state.items() if k not in HYPERPARAMETER_BUFFERS}
    ours = {k: v.shape for k, v in model.state_dict().items() if k.startswith("fc.") and k not in HYPERPARAMETER_BUFFERS}
    theirs = {k: getattr(v, "shape", None) for k, v in state.items() if k.startswith("fc.")}
    if theirs != ours:                                   # another head: keep the new one
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]   # a new head keeps its initialisation
    if missing or unexpected:
        raise UserError(f"--weights {weights}: not a resnet18 state_dict (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")


def build_trained(cfg, state):
    """The model of a trained run (config.json's cfg, its checkpoint's state_dict), on the CPU."""
    a = cfg["args"]
    model = build_model(len(cfg["classes"]), "none", head_of(a), small_map_convs=small_map_convs_of(a))
    model.load_state_dict(state)
    return model


def forward_with_taps(model, x, taps=()):
    """Run torchvision's ResNet forward and return (logits (B, K), {layer: h^l (B, C_l)}).

    h^l is the global-average-pooled output of stage l, the vector of equation (1). The logits are
    exactly model(x): the same modules in the same order; only the pooled vectors of the tapped
    stages are kept, never their full activation maps.
    """
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    feats = {}
    for name in TAPPABLE:
        x = getattr(model, name)(x)
        if name in taps:
            feats[name] = x.mean(dim=(2, 3))  # (B, C_l)
    logits = model.fc(torch.flatten(model.avgpool(x), 1))  # (B, K)
    return logits, feats


@torch.inference_mode()
def confusion_matrix(model, images, labels, num_classes, device, batch_size=256, channels_last=False, amp=False):
    """Evaluate on uint8 images (N, 3, S, S) -> confusion matrix (K, K), rows = true class."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    labels = torch.as_tensor(labels)
    to_input = ModelInput(device, channels_last)
    for start in range(0, len(labels), batch_size):
        x = to_input(images[start:start + batch_size])
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(x).argmax(1).cpu()                          # (b,)
        y = labels[start:start + batch_size]
        cm += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
    return cm


def metrics_from_confusion(cm, classes):
    """Per-class accuracy (recall), overall and balanced accuracy, macro-F1 from a (K, K) matrix.

    balanced accuracy: mean recall over the classes present in the test set (scikit-learn's
    balanced_accuracy_score). macro-F1: mean F1 over all K classes of the run, a class never predicted
    or never present counting F1 = 0 (scikit-learn's f1_score(average='macro', labels=range(K),
    zero_division=0)). Tests check both against scikit-learn.
    """
    cm = cm.double()
    support, predicted, correct = cm.sum(1), cm.sum(0), cm.diag()
    recall = torch.where(support > 0, correct / support.clamp(min=1), torch.full_like(correct, float("nan")))
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted); 0 where both are 0
    denom = support + predicted
    f1 = torch.where(denom > 0, 2 * correct / denom.clamp(min=1), torch.zeros_like(correct))
    present = support > 0
    return {
        "per_class_acc": {c: float(recall[k]) for k, c in enumerate(classes)},
        "accuracy": float(correct.sum() / cm.sum()),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1.mean()),
        "confusion_matrix": cm.long().tolist(),
    }


def use_exact_float32():
    """float32 convolutions and matmuls in IEEE float32 on CUDA, not TF32 (which cuDNN uses for float32
    convolutions unless told otherwise): fp32 evaluation and --no-amp training are then exact float32.
    bf16 autocast regions are unaffected. No effect on CPU."""
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.fp32_precision = "ieee"
    # each leaf too: cuDNN's convolution and RNN leaves default to "tf32", and on torch 2.11's CUDA
    # build they kept it when only the parent was set (the H200 test caught it)
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
