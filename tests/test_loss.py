"""Every loss against a direct computation on small hand-made cases: the paper's feature-similarity
loss (equations (1)-(3)), focal, class-balanced, LDAM, logit adjustment, SupCon and DRW."""
import math

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import (Criterion, class_balanced_weights, feature_similarity_loss, ldam_margins, supcon_loss)
from model import CosineHead

CPU = torch.device("cpu")


def criterion(counts=(3, 1), num_epochs=1, **args):
    a = {"contrastive_weight": 1.0, "num_epochs": num_epochs, **args}
    return Criterion(a, list(counts), CPU)


def naive_loss(h, labels, negative=0.0):
    """Equations (1)-(3) written out entry by entry."""
    B = h.shape[0]
    total = 0.0
    for i in range(B):
        for j in range(B):
            s = (h[i] @ h[j]) / (h[i].norm() * h[j].norm())
            t = 1.0 if labels[i] == labels[j] else negative
            total = total + (s - t) ** 2
    return total / (B * B)


def test_loss_matches_naive_double_loop_in_value_and_gradient():
    torch.manual_seed(0)
    for B, D, K in [(8, 16, 2), (13, 5, 3), (1, 4, 2)]:
        h = torch.randn(B, D, dtype=torch.float64)
        labels = torch.randint(0, K, (B,))
        h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
        fast, slow = feature_similarity_loss(h1, labels), naive_loss(h2, labels)
        fast.backward()
        slow.backward()
        assert torch.allclose(fast.double(), slow, atol=1e-6), (fast, slow)
        assert torch.allclose(h1.grad, h2.grad, atol=1e-5)


def test_loss_is_zero_for_coinciding_classes_and_orthogonal_others():
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    basis = torch.eye(3) * torch.tensor([2.0, 0.5, 3.0])[:, None]      # one direction per class
    h = basis[labels] * torch.tensor([1.0, 2.0, 3.0, 1.0, 0.5, 4.0])[:, None]  # any positive scale
    assert feature_similarity_loss(h, labels).item() < 1e-12
    # different classes sharing a direction are penalised: t_ij = 0 for them
    assert feature_similarity_loss(torch.ones(6, 3), labels).item() > 0.5


def test_loss_uses_zero_not_minus_one_for_different_classes():
    h = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # opposite directions: s_01 = -1
    loss = feature_similarity_loss(h, torch.tensor([0, 1]))
    assert abs(loss.item() - 2 * 1.0 / 4) < 1e-6  # (−1 − 0)^2 twice over 4 entries


def test_fscl_negative_minus_one_changes_only_the_target_of_different_classes():
    h = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])                       # s_01 = -1: perfect for T = -1
    assert feature_similarity_loss(h, torch.tensor([0, 1]), negative=-1).item() < 1e-12
    torch.manual_seed(2)
    h, labels = torch.randn(9, 6, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 2, 2, 0, 1, 0])
    assert torch.allclose(feature_similarity_loss(h, labels, -1).double(), naive_loss(h, labels, -1.0), atol=1e-9)
    one_class = torch.zeros(9, dtype=torch.long)                      # no pair of different classes: no change
    assert torch.equal(feature_similarity_loss(h, one_class, -1), feature_similarity_loss(h, one_class, 0))
    c0, c1 = (criterion(aux="fscl", fscl_negative=v) for v in (0, -1))
    t0, t1 = c0(torch.zeros(9, 3), {"layer4": h}, labels)[1], c1(torch.zeros(9, 3), {"layer4": h}, labels)[1]
    assert torch.equal(t0["ce"], t1["ce"]) and not torch.equal(t0["L_c[layer4]"], t1["L_c[layer4]"])


def test_loss_is_computed_in_float32_from_bfloat16_features():
    h = torch.randn(6, 32).bfloat16()
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    out = feature_similarity_loss(h, labels)
    assert out.dtype == torch.float32
    assert torch.allclose(out, feature_similarity_loss(h.float(), labels))


def test_total_loss_without_taps_is_cross_entropy_and_weight_scales_each_term():
    torch.manual_seed(1)
    logits, labels = torch.randn(10, 3), torch.randint(0, 3, (10,))
    total, terms = criterion((4, 3, 3))(logits, {}, labels)
    assert torch.equal(total, F.cross_entropy(logits, labels)) and list(terms) == ["ce"]
    feats = {"layer3": torch.randn(10, 8), "layer4": torch.randn(10, 4)}
    total, terms = criterion((4, 3, 3), aux="fscl", contrastive_weight=0.5)(logits, feats, labels)
    expected = terms["ce"] + 0.5 * (feature_similarity_loss(feats["layer3"], labels)
                                    + feature_similarity_loss(feats["layer4"], labels))
    assert torch.allclose(total, expected) and set(terms) == {"ce", "L_c[layer3]", "L_c[layer4]"}


# ---------------------------------------------------------------- focal, class-balanced, LDAM, LA

def test_focal_loss_by_hand_and_gamma_zero_is_cross_entropy():
    logits, y = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([0])       # p_t = 1/4
    total, terms = criterion(loss="focal")(logits, {}, y)
    assert abs(total.item() - (0.75 ** 2) * math.log(4.0)) < 1e-6 and list(terms) == ["focal"]
    torch.manual_seed(3)
    logits, y = torch.randn(12, 3), torch.randint(0, 3, (12,))
    assert torch.allclose(criterion((5, 4, 3), loss="focal", focal_gamma=0.0)(logits, {}, y)[0],
                          F.cross_entropy(logits, y))


def test_class_balanced_weights_for_counts_10000_and_10():
    w = class_balanced_weights([10000, 10], 0.9999)
    # by hand: (1 - b) / (1 - b^n) = 1.58193e-4 and 0.100045; scaled to sum to 2 classes
    assert torch.allclose(w, torch.tensor([0.0031574, 1.9968426]), atol=1e-6)
    assert abs(w.sum().item() - 2) < 1e-6
    assert abs((w[1] / w[0]).item() - (1 - 0.9999 ** 10000) / (1 - 0.9999 ** 10)) < 1e-2
    assert torch.allclose(class_balanced_weights([7, 7, 7], 0.9999), torch.ones(3))   # balanced: plain CE


def test_class_balanced_loss_is_the_batch_mean_of_weighted_cross_entropy():
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 1, 0])
    w = class_balanced_weights([10000, 10], 0.9999)
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-1.0)), math.log(2.0)]
    expected = (w[0] * ce[0] + w[1] * ce[1] + w[0] * ce[2]) / 3
    assert abs(criterion((10000, 10), loss="cb")(logits, {}, y)[0].item() - expected.item()) < 1e-6


def test_ldam_margins_for_counts_100_and_1():
    m = ldam_margins([100, 1], 0.5)
    assert torch.allclose(m, torch.tensor([0.5 / 100 ** 0.25, 0.5]))                  # 0.1581, 0.5
    assert torch.allclose(ldam_margins([16, 1], 0.3), torch.tensor([0.15, 0.3]))


def test_ldam_loss_subtracts_the_scaled_margin_of_the_true_class_only():
    c = criterion((100, 1), loss="ldam")                            # s = 30, margins 0.1581, 0.5
    cos = torch.tensor([[0.2, -0.1], [0.4, 0.3]])
    y = torch.tensor([1, 0])
    # image 0 (class 1): logits 30 [0.2, -0.1 - 0.5] = [6, -18]; image 1 (class 0): [30 (0.4 - 0.1581), 9]
    by_hand = (math.log(1 + math.exp(6 + 18)) + math.log(1 + math.exp(9 - 30 * (0.4 - 0.5 / 100 ** 0.25)))) / 2
    assert abs(c(30 * cos, {}, y)[0].item() - by_hand) < 1e-4


def test_cosine_head_gives_scaled_cosines_whatever_the_feature_norm():
    torch.manual_seed(4)
    head = CosineHead(8, 3, scale=30.0)
    x = torch.randn(5, 8)
    out = head(x)
    expected = 30 * F.cosine_similarity(x[:, None, :], head.weight[None, :, :], dim=2)       # (5, 3)
    assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(head(7 * x), out, atol=1e-5)
    assert set(head.state_dict()) == {"weight", "scale"}


def test_logit_adjustment_is_cross_entropy_on_shifted_logits():
    c = criterion((3, 1), loss="la")                                 # prior 0.75, 0.25
    zero = torch.zeros(2, 2)
    total = c(zero, {}, torch.tensor([1, 1]))[0]                     # softmax(log prior) = prior: -log 0.25
    assert abs(total.item() - math.log(4.0)) < 1e-6
    torch.manual_seed(5)
    logits, y = torch.randn(10, 2), torch.randint(0, 2, (10,))
    shifted = logits + torch.log(torch.tensor([0.75, 0.25]))
    assert torch.allclose(c(logits, {}, y)[0], F.cross_entropy(shifted, y))
    c2 = criterion((3, 1), loss="la", la_tau=2.0)
    assert torch.allclose(c2(logits, {}, y)[0], F.cross_entropy(logits + 2 * torch.log(torch.tensor([0.75, 0.25])), y))


# ---------------------------------------------------------------- SupCon

def naive_supcon(h, labels, tau):
    z = [v / v.norm() for v in h]
    per_anchor = []
    for i in range(len(z)):
        pos = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not pos:
            continue                                                 # no positive: left out
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(len(z)) if a != i)
        per_anchor.append(-sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in pos) / len(pos))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def test_supcon_matches_a_naive_double_loop_with_anchors_without_positives():
    torch.manual_seed(6)
    for labels in ([0, 1, 0, 0, 1, 2], [0, 0, 0, 1], [1, 0, 1, 1, 0, 0, 0, 2, 3]):
        h = torch.randn(len(labels), 5, dtype=torch.float64)
        for tau in (0.1, 0.5):
            fast = supcon_loss(h, torch.tensor(labels), tau)
            assert abs(fast.item() - naive_supcon(h, labels, tau)) < 1e-4, (labels, tau)


def test_supcon_without_any_positive_is_zero_not_nan_and_has_finite_gradients():
    h = torch.randn(4, 3, requires_grad=True)
    loss = supcon_loss(h, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(h.grad).all()
    h = torch.randn(5, 3, requires_grad=True)                        # one rare image, no positive for it
    loss = supcon_loss(h, torch.tensor([0, 0, 0, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()


def test_supcon_as_the_auxiliary_term_on_each_tap():
    torch.manual_seed(7)
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 1, 0])
    feats = {"layer3": torch.randn(6, 8), "layer4": torch.randn(6, 4)}
    total, terms = criterion(aux="supcon", contrastive_weight=1.0)(logits, feats, y)
    assert set(terms) == {"ce", "L_supcon[layer3]", "L_supcon[layer4]"}
    expected = F.cross_entropy(logits, y) + supcon_loss(feats["layer3"], y, 0.1) + supcon_loss(feats["layer4"], y, 0.1)
    assert torch.allclose(total, expected)


# ---------------------------------------------------------------- DRW and the flags

def test_drw_switches_to_class_balanced_weights_after_80_percent_of_the_epochs():
    c = criterion((100, 1), num_epochs=100, loss="ldam", drw=True)
    assert c.drw_epoch() == 81 and criterion(num_epochs=3, drw=True).drw_epoch() == 3
    # 0.29 x 100 = 28.999999999999996 in floating point: 29 epochs without weights, DRW from epoch 30
    assert 0.29 * 100 < 29 and criterion(num_epochs=100, drw=True, drw_start=0.29).drw_epoch() == 30
    torch.manual_seed(8)
    logits, y = torch.randn(8, 2), torch.tensor([0, 0, 0, 0, 0, 0, 1, 0])
    c = criterion((100, 1), num_epochs=10, drw=True)                 # CE + DRW
    c.set_epoch(8)
    assert c.weight is None and torch.allclose(c(logits, {}, y)[0], F.cross_entropy(logits, y))
    c.set_epoch(9)
    w = class_balanced_weights([100, 1], 0.9999)
    per_image = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(c(logits, {}, y)[0], (w[y] * per_image).sum() / w[y].sum())   # Cao et al.'s weighted mean
    f = criterion((100, 1), num_epochs=10, loss="focal", drw=True)
    f.set_epoch(9)
    unweighted = criterion((100, 1), loss="focal")(logits, {}, y)[0]
    assert not torch.allclose(f(logits, {}, y)[0], unweighted)


@pytest.mark.parametrize("method,flag,value", [
    ("focal", "focal_gamma", 1.0), ("cb", "cb_beta", 0.99), ("ldam_drw", "ldam_max_margin", 0.3),
    ("ldam_drw", "cb_beta", 0.99), ("la", "la_tau", 0.5), ("oversample+supcon", "supcon_temperature", 0.5),
    ("ldam_drw", "drw_start", 0.5)])
def test_every_hyperparameter_flag_changes_its_loss(method, flag, value):
    torch.manual_seed(9)
    logits, y = torch.randn(8, 2), torch.tensor([0, 1, 0, 0, 1, 0, 0, 1])
    feats = {"layer4": torch.randn(8, 6)}
    choices = losses.parse_method(method)
    out = []
    for v in (losses.DEFAULTS[flag], value):
        c = criterion((50, 5), num_epochs=10, **choices, **{flag: v})
        c.set_epoch(7 if flag == "drw_start" else 10)                # epoch 7: DRW on at 0.5, off at 0.8
        out.append(c(logits, feats if choices["aux"] != "none" else {}, y)[0])
    assert not torch.allclose(out[0], out[1])
