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


@pytest.fixture
def conv2d_calls(monkeypatch):
    """A list that grows by one at every call of torch.nn.functional.conv2d (what nn.Conv2d runs)."""
    calls = []
    real = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


# (in, out, kernel, stride, padding, input h x w): every case has a one-pixel output; the first three are
# ResNet-18's layer4 at 32 px (3x3 on 1x1, 3x3 stride 2 on 2x2, the 1x1 stride-2 downsample on 2x2)
ONE_PIXEL = [(16, 8, 3, 1, 1, (1, 1)), (16, 8, 3, 2, 1, (2, 2)), (16, 8, 1, 2, 0, (2, 2)),
             (5, 4, 3, 1, 0, (3, 3)), (5, 4, 3, (1, 2), 1, (1, 2)), (5, 4, (3, 1), 1, (1, 0), (1, 1))]


@pytest.mark.parametrize("case", ONE_PIXEL)
@pytest.mark.parametrize("bias", [False, True])
def test_a_one_pixel_convolution_is_computed_as_a_matrix_product_equal_to_the_convolution(case, bias, conv2d_calls):
    from model import OnePixelConv2d
    c_in, c_out, k, s, p, (h, w) = case
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, k, s, p, bias=bias).double()
    fast = OnePixelConv2d(c_in, c_out, k, s, p, bias=bias).double()
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(3, c_in, h, w, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = fast(x2)
    assert conv2d_calls == [] and y.shape == (3, c_out, 1, 1)                  # no convolution ran
    ref = conv(x)
    g = torch.randn_like(ref)
    ref.backward(g)
    y.backward(g)
    assert torch.allclose(y, ref, rtol=0, atol=1e-12) and torch.allclose(x2.grad, x.grad, rtol=0, atol=1e-12)
    assert torch.allclose(fast.weight.grad, conv.weight.grad, rtol=0, atol=1e-12)
    assert (conv.weight.grad != 0).any() and ((conv.weight.grad == 0) == (fast.weight.grad == 0)).all()
    if bias:
        assert torch.allclose(fast.bias.grad, conv.bias.grad, rtol=0, atol=1e-12)


def test_a_convolution_with_more_than_one_output_pixel_is_torchs_own():
    from model import OnePixelConv2d
    torch.manual_seed(0)
    for c_in, c_out, k, s, p, size in [(8, 4, 3, 1, 1, 2), (8, 4, 3, 2, 1, 4), (8, 4, 1, 1, 0, 2), (8, 4, 3, 1, 0, 4)]:
        conv = torch.nn.Conv2d(c_in, c_out, k, s, p)
        fast = OnePixelConv2d(c_in, c_out, k, s, p)
        fast.load_state_dict(conv.state_dict())
        x = torch.randn(2, c_in, size, size)
        assert fast(x).shape[-1] > 1 and torch.equal(fast(x), conv(x))


def test_resnet18_at_32_px_runs_its_last_stage_as_matrix_products_and_gives_the_convolutions_logits(conv2d_calls):
    from model import OnePixelConv2d, set_one_pixel_convs
    from utils import UserError
    torch.manual_seed(0)
    model = build_model(2, "none").eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20 and all(type(m) is OnePixelConv2d for m in convs)
    with torch.no_grad():
        for size, convolutions in ((32, 15), (64, 20)):          # layer4's 5 are one-pixel at 32 px only
            x = torch.randn(4, 3, size, size)
            conv2d_calls.clear()
            fast = model(x)
            assert len(conv2d_calls) == convolutions
            set_one_pixel_convs(model, "conv")
            assert all(type(m) is torch.nn.Conv2d for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            conv2d_calls.clear()
            ref = model(x)
            assert len(conv2d_calls) == 20
            set_one_pixel_convs(model, "matmul")
            assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-5)
            assert torch.equal(fast, ref) == (size == 64)
    assert list(build_model(2, "none", one_pixel_convs="conv").state_dict()) == list(model.state_dict())
    with pytest.raises(UserError, match="matmul, conv"):
        set_one_pixel_convs(model, "fast")
