"""The feature-similarity loss (equations (1)-(3)) against a naive reference."""
import torch
import torch.nn.functional as F

from model import compute_loss, feature_similarity_loss


def naive_loss(h, labels):
    """Equations (1)-(3) written out entry by entry."""
    B = h.shape[0]
    total = 0.0
    for i in range(B):
        for j in range(B):
            s = (h[i] @ h[j]) / (h[i].norm() * h[j].norm())
            t = 1.0 if labels[i] == labels[j] else 0.0
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


def test_total_loss_without_taps_is_cross_entropy_and_weight_scales_each_term():
    torch.manual_seed(1)
    logits, labels = torch.randn(10, 3), torch.randint(0, 3, (10,))
    total, terms = compute_loss(logits, {}, labels)
    assert torch.equal(total, F.cross_entropy(logits, labels)) and list(terms) == ["ce"]
    feats = {"layer3": torch.randn(10, 8), "layer4": torch.randn(10, 4)}
    total, terms = compute_loss(logits, feats, labels, contrastive_weight=0.5)
    expected = terms["ce"] + 0.5 * (feature_similarity_loss(feats["layer3"], labels)
                                    + feature_similarity_loss(feats["layer4"], labels))
    assert torch.allclose(total, expected) and set(terms) == {"ce", "L_c[layer3]", "L_c[layer4]"}


def test_loss_is_computed_in_float32_from_bfloat16_features():
    h = torch.randn(6, 32).bfloat16()
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    out = feature_similarity_loss(h, labels)
    assert out.dtype == torch.float32
    assert torch.allclose(out, feature_similarity_loss(h.float(), labels))
