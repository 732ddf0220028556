"""The taps capture the pooled stage outputs and leave the logits unchanged."""
import pytest
import torch

from model import build_model, forward_with_taps


def test_taps_capture_pooled_layer3_layer4_and_leave_logits_unchanged():
    torch.manual_seed(0)
    model = build_model(2, "none").eval()
    captured = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n in ("layer3", "layer4")]
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        for h in hooks:
            h.remove()
        logits, feats = forward_with_taps(model, x, ("layer3", "layer4"))
        plain, none = forward_with_taps(model, x, ())
    assert torch.equal(logits, reference) and torch.equal(plain, reference) and none == {}
    assert feats["layer3"].shape == (4, 256) and feats["layer4"].shape == (4, 512)
    for n in ("layer3", "layer4"):
        assert torch.allclose(feats[n], captured[n].mean(dim=(2, 3)))


def test_weights_from_a_state_dict_file_and_a_clear_error_for_a_bad_path(tmp_path):
    from utils import UserError
    torch.manual_seed(0)
    src = build_model(1000, "none")  # an ImageNet-shaped state_dict: its 1000-way head is dropped
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    model = build_model(2, str(tmp_path / "r18.pth"))
    assert torch.equal(model.conv1.weight, src.conv1.weight) and model.fc.out_features == 2
    with pytest.raises(UserError, match="imagenet, none or a path"):
        build_model(2, str(tmp_path / "missing.pth"))


def test_imagenet_weights_offline_give_a_clear_message(monkeypatch):
    import urllib.error
    import torchvision
    from utils import UserError

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, "get_state_dict", offline)
    with pytest.raises(UserError, match="--weights none"):
        build_model(2, "imagenet")
