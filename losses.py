"""The losses and the methods: the paper's feature-similarity loss, the standard long-tail baselines,
and the named combinations (classification loss x sampler x DRW x auxiliary loss) that train.py,
reproduce.py and report.py all read.

Adding a loss: one function below and one entry in CLASSIFICATION_LOSSES (or AUX_LOSSES); adding a
named method: one entry in METHODS. A method's folder name follows from its choices (method_name).

Shapes: B images in the batch, K classes, D features of a tapped stage.
"""
import math

import torch
import torch.nn.functional as F

from data import SAMPLERS   # uniform, oversample, sqrt: data.EpochBatches
from utils import UserError

# ---------------------------------------------------------------- the choices

DEFAULT_CHOICES = {"loss": "ce", "sampler": "uniform", "drw": False, "aux": "none", "fscl_negative": 0}

# Each hyperparameter with its published default (train.py's flags of the same names).
DEFAULTS = {"focal_gamma": 2.0,            # Lin et al., ICCV 2017
            "cb_beta": 0.9999,             # Cui et al., CVPR 2019 (also DRW's weights, Cao et al.)
            "ldam_max_margin": 0.5,        # Cao et al., NeurIPS 2019
            "ldam_scale": 30.0,            # Cao et al., NeurIPS 2019
            "la_tau": 1.0,                 # Menon et al., ICLR 2021
            "drw_start": 0.8,              # Cao et al.: re-weighting from 80% of the epochs (160 of 200)
            "supcon_temperature": 0.1}     # Khosla et al., NeurIPS 2020 (their ImageNet value)


# ---------------------------------------------------------------- classification losses

def class_balanced_weights(counts, beta):
    """Cui et al. (CVPR 2019), 'effective number of samples': w_j = (1 - beta) / (1 - beta^n_j),
    normalised so that sum_j w_j = K. counts: (K,) images per class -> (K,) float32."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    w = (1.0 - beta) / (1.0 - torch.pow(beta, counts))              # (K,)
    return (w / w.sum() * len(counts)).float()


def weighted_mean(values, labels, weight):
    """Mean of per-image values (B,), or with per-class weights (K,) the weighted mean
    sum_i w_{y_i} v_i / sum_i w_{y_i}: what F.cross_entropy(weight=...) computes, and what deferred
    re-weighting uses in Cao et al.'s code."""
    if weight is None:
        return values.mean()
    w = weight[labels]                                              # (B,)
    return (w * values).sum() / w.sum()


def cross_entropy(logits, labels, ctx, weight=None):
    """Softmax cross-entropy, the paper's L_CE. logits (B, K), labels (B,) -> scalar."""
    return F.cross_entropy(logits, labels, weight=weight)


def focal_loss(logits, labels, ctx, weight=None):
    """Focal loss, softmax form (Lin et al., ICCV 2017): -(1 - p_t)^gamma log p_t, gamma = 2.
    logits (B, K), labels (B,) -> scalar (mean over the batch; weighted mean under DRW)."""
    log_pt = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)     # (B,)
    values = -(1.0 - log_pt.exp()).pow(ctx["focal_gamma"]) * log_pt                 # (B,)
    return weighted_mean(values, labels, weight)


def class_balanced_loss(logits, labels, ctx, weight=None):
    """Class-balanced softmax cross-entropy (Cui et al., CVPR 2019): mean over the batch of
    w_{y_i} CE_i with the class-balanced weights (beta = 0.9999, sum_j w_j = K). -> scalar."""
    w = ctx["cb_weights"][labels]                                                    # (B,)
    return (w * F.cross_entropy(logits, labels, reduction="none")).mean()


def ldam_margins(counts, max_margin):
    """LDAM margins (Cao et al., NeurIPS 2019): m_j proportional to n_j^(-1/4), the largest = max_margin.
    counts (K,) -> (K,) float32."""
    m = torch.as_tensor(counts, dtype=torch.float64).pow(-0.25)      # (K,)
    return (m * (max_margin / m.max())).float()


def ldam_loss(logits, labels, ctx, weight=None):
    """LDAM (Cao et al., NeurIPS 2019) on a cosine-normalised head: CE(s cos(theta) - s m_y 1[j = y]).
    logits (B, K) are s cos(theta) (model.CosineHead, s = 30): the margin of each image's own class is
    subtracted, scaled by s, as in the authors' code (s (cos - m)). -> scalar."""
    margin = ctx["ldam_margins"][labels] * ctx["ldam_scale"]                        # (B,)
    shifted = logits - F.one_hot(labels, logits.shape[1]).to(logits.dtype) * margin[:, None]   # (B, K)
    return F.cross_entropy(shifted, labels, weight=weight)


def logit_adjusted_loss(logits, labels, ctx, weight=None):
    """Logit-adjusted loss (Menon et al., ICLR 2021): CE(logits + tau log(prior)), tau = 1; prior =
    training class frequencies. The same training loss as Balanced Softmax (Ren et al., NeurIPS 2020).
    Predictions use the plain logits. logits (B, K) -> scalar."""
    return F.cross_entropy(logits + ctx["la_tau"] * ctx["log_prior"], labels, weight=weight)


CLASSIFICATION_LOSSES = {"ce": cross_entropy, "focal": focal_loss, "cb": class_balanced_loss,
                         "ldam": ldam_loss, "la": logit_adjusted_loss}


# ---------------------------------------------------------------- auxiliary losses on the taps

def feature_similarity_loss(h, labels, negative=0.0):
    """L_c^l = MSE(S^l, T) for one stage, equations (1)-(3) of the paper.

    Args:
        h: (B, D) pooled features h_i^l of one stage, any float dtype (computed in float32).
        labels: (B,) integer class labels c_i.
        negative: t_ij for different classes (paper: 0; --fscl_negative -1 for the usual -1).
    Returns:
        scalar tensor: mean over the B x B entries of (s_ij - t_ij)^2.
    """
    z = F.normalize(h.float(), dim=1)                                # (B, D), h_i / ||h_i||
    S = z @ z.t()                                                    # (B, B), eq. (1): cosine similarity
    same = labels[:, None] == labels[None, :]                        # (B, B)
    T = torch.where(same, 1.0, float(negative)).to(S.dtype)          # (B, B), eq. (2): 1 same class, else 0
    return F.mse_loss(S, T)                                          # eq. (3): L_c^l


def supcon_loss(h, labels, temperature=0.1):
    """Supervised contrastive loss, L^sup_out of Khosla et al. (NeurIPS 2020), one view per image:

        L = mean over anchors i with a positive of  -1/|P(i)| sum_{p in P(i)} log softmax_{a != i}(z_i.z_a / tau)_p

    with z the L2-normalised features and P(i) the other images of i's class. An anchor without a
    positive in the batch (common with a rare class) is left out of the mean; with none at all the
    loss is 0 (never NaN).

    Args: h (B, D) pooled features (computed in float32), labels (B,), temperature tau (0.1).
    Returns: scalar tensor.
    """
    z = F.normalize(h.float(), dim=1)                                # (B, D)
    logits = z @ z.t() / temperature                                 # (B, B)
    self_mask = torch.eye(len(labels), dtype=torch.bool, device=h.device)          # (B, B)
    logits = logits.masked_fill(self_mask, float("-inf"))            # a != i
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)               # (B, B)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask     # (B, B), P(i)
    n_pos = positive.sum(1)                                          # (B,)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(1) / n_pos.clamp(min=1)  # (B,)
    has_pos = n_pos > 0
    return (per_anchor * has_pos).sum() / has_pos.sum().clamp(min=1)


AUX_LOSSES = {"none": None, "fscl": "L_c", "supcon": "L_supcon"}   # the term's name in train.log


# ---------------------------------------------------------------- methods: named combinations

# The methods reproduce.py runs by name, in the order reports list them: the paper's four, then the
# baselines and the paper's design choices. Any other valid combination works too (method_name).
METHODS = {
    "baseline": {},
    "contrastive": {"aux": "fscl"},
    "oversampling": {"sampler": "oversample"},
    "proposed": {"sampler": "oversample", "aux": "fscl"},
    "focal": {"loss": "focal"},
    "cb": {"loss": "cb"},
    "ldam_drw": {"loss": "ldam", "drw": True},
    "la": {"loss": "la"},
    "sqrt": {"sampler": "sqrt"},
    "oversample+supcon": {"sampler": "oversample", "aux": "supcon"},
    "oversample+fscl_neg1": {"sampler": "oversample", "aux": "fscl", "fscl_negative": -1},
}
PAPER_NAMES = {("uniform", "none"): "baseline", ("uniform", "fscl"): "contrastive",
               ("oversample", "none"): "oversampling", ("oversample", "fscl"): "proposed"}


def method_choices(args):
    """The method of a run from train.py's arguments (a dict; runs of older versions have only
    contrastive/oversampling): {'loss', 'sampler', 'drw', 'aux', 'fscl_negative'}."""
    c = {k: args.get(k, v) for k, v in DEFAULT_CHOICES.items()}
    c["aux"] = "fscl" if args.get("contrastive") else (c["aux"] or "none")
    c["sampler"] = "oversample" if args.get("oversampling") else (c["sampler"] or "uniform")
    c["drw"], c["fscl_negative"] = bool(c["drw"]), int(c["fscl_negative"])
    return c


def method_name(choices):
    """The folder name of a method: the paper's four keep theirs (baseline, contrastive, oversampling,
    proposed); others join their non-default parts with '+': 'la', 'ldam_drw', 'oversample+supcon',
    'oversample+fscl_neg1'."""
    c = {**DEFAULT_CHOICES, **choices}
    if c["loss"] == "ce" and not c["drw"] and c["fscl_negative"] == 0 and (c["sampler"], c["aux"]) in PAPER_NAMES:
        return PAPER_NAMES[(c["sampler"], c["aux"])]
    parts = []
    if c["loss"] != "ce" or c["drw"]:
        parts.append(c["loss"] + ("_drw" if c["drw"] else ""))
    if c["sampler"] != "uniform":
        parts.append(c["sampler"])
    if c["aux"] != "none":
        parts.append(c["aux"] + ("_neg1" if c["fscl_negative"] == -1 else ""))
    return "+".join(parts)


def parse_method(name):
    """A method name (METHODS, or any name method_name gives) -> its choices; UserError otherwise."""
    if name in METHODS:
        return {**DEFAULT_CHOICES, **METHODS[name]}
    c = dict(DEFAULT_CHOICES)
    for part in name.split("+"):
        base, drw = (part[:-4], True) if part.endswith("_drw") else (part, False)
        if base in CLASSIFICATION_LOSSES:
            c.update(loss=base, drw=drw)
        elif part in SAMPLERS:
            c["sampler"] = part
        elif part in ("fscl", "fscl_neg1", "supcon"):
            c.update(aux=part.split("_")[0], fscl_negative=-1 if part.endswith("_neg1") else 0)
    if method_name(c) != name or combination_problem(c):
        raise UserError(f"method {name!r} is not valid; named methods: {' '.join(METHODS)}; or combine a loss "
                        f"({'|'.join(CLASSIFICATION_LOSSES)}, '_drw' for deferred re-weighting), a sampler "
                        f"({'|'.join(SAMPLERS[1:])}) and an auxiliary loss (fscl|fscl_neg1|supcon) with '+', "
                        f"e.g. la, ldam_drw, oversample+supcon")
    return c


def method_flags(name):
    """train.py flags of a method: the paper's own flags for its four variants."""
    c = parse_method(name)
    flags = ["--contrastive"] if c["aux"] == "fscl" else []
    flags += ["--oversampling"] if c["sampler"] == "oversample" else []
    flags += ["--loss", c["loss"]] if c["loss"] != "ce" else []
    flags += ["--drw"] if c["drw"] else []
    flags += ["--sampler", c["sampler"]] if c["sampler"] not in ("uniform", "oversample") else []
    flags += ["--aux", c["aux"]] if c["aux"] not in ("none", "fscl") else []
    flags += ["--fscl_negative", "-1"] if c["fscl_negative"] == -1 else []
    return flags


def method_settings(args):
    """What of the method changes a run's result, for its fingerprint: the choices that differ from
    the paper's two flags, and each hyperparameter only where it is used. The paper's four variants
    keep the settings (and fingerprints) they had before the baselines existed."""
    c = method_choices(args)
    s = {"contrastive": c["aux"] == "fscl", "oversampling": c["sampler"] == "oversample"}
    if c["aux"] != "none":
        s.update(contrastive_layers=list(args["contrastive_layers"]), contrastive_weight=args["contrastive_weight"])
    for key, used in (("focal_gamma", c["loss"] == "focal"), ("cb_beta", c["loss"] == "cb" or c["drw"]),
                      ("ldam_max_margin", c["loss"] == "ldam"), ("ldam_scale", c["loss"] == "ldam"),
                      ("la_tau", c["loss"] == "la"), ("drw_start", c["drw"]),
                      ("supcon_temperature", c["aux"] == "supcon")):
        if used:
            s[key] = args.get(key, DEFAULTS[key])
    for key in ("loss", "sampler", "drw", "aux", "fscl_negative"):
        if c[key] != DEFAULT_CHOICES[key] and not (key, c[key]) in (("aux", "fscl"), ("sampler", "oversample")):
            s[key] = c[key]
    return s


def combination_problem(c):
    """Why a combination of choices c would not do what it says, or None."""
    if c["fscl_negative"] != 0 and c["aux"] != "fscl":
        return "--fscl_negative sets T for the feature-similarity loss; give it with --aux fscl (or --contrastive)"
    if c["drw"] and c["loss"] == "cb":
        return ("--drw with --loss cb changes nothing (cb is class-balanced from the first epoch); "
                "use --loss ce --drw, or --loss cb alone")
    return None


def check_method(args):
    """UserError for a combination that would not do what its flags say. args: train.py's arguments."""
    a = vars(args)
    if a["contrastive"] and a["aux"] not in ("none", "fscl"):
        raise UserError(f"--contrastive is --aux fscl; it cannot be combined with --aux {a['aux']}")
    if a["oversampling"] and a["sampler"] not in ("uniform", "oversample"):
        raise UserError(f"--oversampling is --sampler oversample; it cannot be combined with --sampler {a['sampler']}")
    problem = combination_problem(method_choices(a))
    if problem:
        raise UserError(problem)
    for key, ok, valid in (("focal_gamma", lambda v: v >= 0, ">= 0"), ("cb_beta", lambda v: 0 <= v < 1, "in [0, 1)"),
                           ("ldam_max_margin", lambda v: v > 0, "> 0"), ("ldam_scale", lambda v: v > 0, "> 0"),
                           ("la_tau", lambda v: v >= 0, ">= 0"), ("drw_start", lambda v: 0 < v < 1, "in (0, 1)"),
                           ("supcon_temperature", lambda v: v > 0, "> 0")):
        if not (math.isfinite(a[key]) and ok(a[key])):
            raise UserError(f"--{key} must be {valid}, got {a[key]}")


# ---------------------------------------------------------------- the loss of a run

class Criterion:
    """L_total = L_cls + contrastive_weight * sum_l L_aux^l for one run (eq. (3) with the paper's
    L_CE and L_c; the baselines swap either term). Built once from the run's arguments and its
    training class counts; set_epoch switches on deferred re-weighting (DRW)."""

    def __init__(self, args, counts, device):
        self.choices = method_choices(args)
        self.cls = CLASSIFICATION_LOSSES[self.choices["loss"]]
        self.aux, self.aux_name = self.choices["aux"], AUX_LOSSES[self.choices["aux"]]
        self.weight_aux = args["contrastive_weight"]
        self.num_epochs = args["num_epochs"]
        counts = torch.as_tensor(counts, dtype=torch.float64)
        self.ctx = {k: args.get(k, v) for k, v in DEFAULTS.items()}
        self.ctx.update(cb_weights=class_balanced_weights(counts, self.ctx["cb_beta"]).to(device),
                        ldam_margins=ldam_margins(counts, self.ctx["ldam_max_margin"]).to(device),
                        log_prior=torch.log(counts / counts.sum()).float().to(device))
        self.weight = None

    def drw_epoch(self):
        """The first epoch (1-based) with DRW's class-balanced weights: after drw_start of the epochs
        (epochs 161-200 of 200 at 0.8, as in Cao et al.; epoch 3 of 3). The product is rounded to 9
        decimals before the floor: 0.29 x 100 = 28.999999999999996 is 29 epochs, DRW from epoch 30."""
        return math.floor(round(self.ctx["drw_start"] * self.num_epochs, 9)) + 1

    def set_epoch(self, epoch):
        on = self.choices["drw"] and epoch >= self.drw_epoch()
        self.weight = self.ctx["cb_weights"] if on else None

    def __call__(self, logits, feats, labels):
        """logits (B, K), feats {layer: (B, D_l)}, labels (B,) -> (total, {term: value})."""
        cls = self.cls(logits.float(), labels, self.ctx, self.weight)
        terms = {self.choices["loss"]: cls}
        total = cls
        for name, h in feats.items():
            if self.aux == "fscl":
                term = feature_similarity_loss(h, labels, self.choices["fscl_negative"])
            else:
                term = supcon_loss(h, labels, self.ctx["supcon_temperature"])
            terms[f"{self.aux_name}[{name}]"] = term
            total = total + self.weight_aux * term
        return total, terms
