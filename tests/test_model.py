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


def check_against_the_convolution(kind, case, bias, conv2d_calls):
    """kind(...) runs no convolution, and gives what torch's Conv2d with the same parameters gives, in
    float64: equal outputs and gradients (to rounding), the same zero taps in the weight's gradient ->
    kind's output."""
    c_in, c_out, k, s, p, (h, w) = case
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, k, s, p, bias=bias).double()
    fast = kind(c_in, c_out, k, s, p, bias=bias).double()
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(3, c_in, h, w, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = fast(x2)
    assert conv2d_calls == []                                   # no convolution ran
    ref = conv(x)
    g = torch.randn_like(ref)
    ref.backward(g)
    y.backward(g)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, rtol=0, atol=1e-12) and torch.allclose(x2.grad, x.grad, rtol=0, atol=1e-12)
    assert torch.allclose(fast.weight.grad, conv.weight.grad, rtol=0, atol=1e-12)
    assert (conv.weight.grad != 0).any() and ((conv.weight.grad == 0) == (fast.weight.grad == 0)).all()
    if bias:
        assert torch.allclose(fast.bias.grad, conv.bias.grad, rtol=0, atol=1e-12)
    return y


# (in, out, kernel, stride, padding, input h x w): every case has a one-pixel output; the first three are
# ResNet-18's layer4 at 32 px (3x3 on 1x1, 3x3 stride 2 on 2x2, the 1x1 stride-2 downsample on 2x2)
ONE_PIXEL = [(16, 8, 3, 1, 1, (1, 1)), (16, 8, 3, 2, 1, (2, 2)), (16, 8, 1, 2, 0, (2, 2)),
             (5, 4, 3, 1, 0, (3, 3)), (5, 4, 3, (1, 2), 1, (1, 2)), (5, 4, (3, 1), 1, (1, 0), (1, 1))]
# more than one output pixel, on a map no larger than the kernel: the first is ResNet-18's 3x3 on a 2x2 map
# (layer3 at 32 px, layer4 at 64 px); then a 2x3 map, a 1x2 map, a 3x2 kernel, a stride-2 3x3 on 3x3,
# and padding 2 around one pixel
SMALL_MAPS = [(16, 8, 3, 1, 1, (2, 2)), (5, 4, 3, 1, 1, (2, 3)), (5, 4, 3, 1, 1, (1, 2)),
              (5, 4, (3, 2), 1, (1, 0), (2, 2)), (5, 4, 3, 2, 1, (3, 3)), (5, 4, 3, 1, 2, (1, 1))]


@pytest.mark.parametrize("case", ONE_PIXEL)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["OnePixelConv2d", "SmallMapConv2d"])
def test_a_one_pixel_convolution_is_computed_as_a_matrix_product_equal_to_the_convolution(case, bias, kind,
                                                                                          conv2d_calls):
    import model
    assert check_against_the_convolution(getattr(model, kind), case, bias, conv2d_calls).shape[-2:] == (1, 1)


@pytest.mark.parametrize("case", SMALL_MAPS)
@pytest.mark.parametrize("bias", [False, True])
def test_a_convolution_on_a_map_no_larger_than_its_kernel_is_one_matrix_product_equal_to_the_convolution(
        case, bias, conv2d_calls):
    from model import SmallMapConv2d
    y = check_against_the_convolution(SmallMapConv2d, case, bias, conv2d_calls)
    assert y.shape[-2] * y.shape[-1] > 1


def test_where_the_convolution_multiplies_less_it_is_torchs_own():
    from model import OnePixelConv2d, SmallMapConv2d
    torch.manual_seed(0)
    # a 4x4 map under a 3x3 kernel (layer3's stride-2 entry at 32 px), 1x1 kernels on 2x2, 3x3 (stride 2) and
    # 4x4 (stride 2: layer3's downsample at 32 px), a 4x4 output
    for c_in, c_out, k, s, p, size in [(8, 4, 3, 2, 1, 4), (8, 4, 1, 1, 0, 2), (8, 4, 1, 2, 0, 3), (8, 4, 1, 2, 0, 4),
                                       (8, 4, 3, 1, 0, 6)]:
        conv = torch.nn.Conv2d(c_in, c_out, k, s, p)
        x = torch.randn(2, c_in, size, size)
        for kind in (OnePixelConv2d, SmallMapConv2d):
            fast = kind(c_in, c_out, k, s, p)
            fast.load_state_dict(conv.state_dict())
            assert fast(x).shape[-1] > 1 and torch.equal(fast(x), conv(x))
    conv, fast = torch.nn.Conv2d(8, 4, 3, 1, 1), OnePixelConv2d(8, 4, 3, 1, 1)    # OnePixelConv2d: one pixel only
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 2, 2)
    assert torch.equal(fast(x), conv(x))


def test_resnet18_runs_its_small_maps_as_matrix_products_and_gives_the_convolutions_logits(conv2d_calls):
    from model import OnePixelConv2d, SmallMapConv2d, set_small_map_convs
    from utils import UserError
    torch.manual_seed(0)
    model = build_model(2, "none").eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20 and all(type(m) is SmallMapConv2d for m in convs)
    # convolutions that torch runs: matmul leaves layer4's 5 at 32 px (1x1 maps) and the three 3x3 on 2x2
    # maps (layer3 at 32 px, layer4 at 64 px); one_pixel the 5 of layer4 at 32 px only
    calls = {("matmul", 32): 12, ("matmul", 64): 17, ("one_pixel", 32): 15, ("one_pixel", 64): 20}
    with torch.no_grad():
        for size in (32, 64):
            x = torch.randn(4, 3, size, size)
            set_small_map_convs(model, "conv")
            assert all(type(m) is torch.nn.Conv2d for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            conv2d_calls.clear()
            ref = model(x)
            assert len(conv2d_calls) == 20
            for how, kind in (("matmul", SmallMapConv2d), ("one_pixel", OnePixelConv2d)):
                set_small_map_convs(model, how)
                assert all(type(m) is kind for m in model.modules() if isinstance(m, torch.nn.Conv2d))
                conv2d_calls.clear()
                fast = model(x)
                assert len(conv2d_calls) == calls[how, size]
                assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-5)
                assert torch.equal(fast, ref) == (calls[how, size] == 20)
    assert list(build_model(2, "none", small_map_convs="conv").state_dict()) == list(model.state_dict())
    with pytest.raises(UserError, match="matmul, one_pixel, conv"):
        set_small_map_convs(model, "fast")
