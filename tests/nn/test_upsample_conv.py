import pytest
import torch
import torch.nn.functional as F

import srkernels
from srkernels import reference as R
from srkernels.models import build
from srkernels.nn import conv2d

from ..conftest import assert_close


def _pair(ref_cls, fused_cls, *args, **kw):
    torch.manual_seed(0)
    ref = ref_cls(*args, **kw)
    fused = fused_cls(*args, **kw)
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("layer,args", [
    ("Upsampler", (2, 8)), ("Upsampler", (3, 8)), ("Upsampler", (4, 8)), ("Upsampler", (8, 4)),
    ("UPNet", (2, 8, 4)), ("UPNet", (3, 8, 4)), ("UPNet", (4, 8, 4)),
    ("PixelShuffleUpsampler", (4, 8)), ("PixelShuffleUpsampler", (3, 6, 3)),
])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_fused_upsamplers_match_reference(layer, args, fmt):
    ref, fused = _pair(getattr(R, layer), getattr(srkernels.nn, layer), *args)
    x = torch.randn(2, args[1], 5, 7).contiguous(memory_format=fmt).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    a, b = ref(x2), fused(x)
    assert_close(b, a, torch.float32, layer)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert_close(x.grad, x2.grad, torch.float32, "grad x")
    for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad {n}")


@pytest.mark.parametrize("meanshift", ["official_255", "rgb255_on_unit", "unit"])
@pytest.mark.parametrize("scale", [2, 3])
def test_fold_mean_shift_is_exact(meanshift, scale):
    torch.manual_seed(1)
    model = build("rcan", scale, fused=True, n_resgroups=1, n_resblocks=2, meanshift=meanshift).eval()
    # trained MeanShifts drift (docs/architectures.md §4.4): fold a non-identity, non-diagonal one
    with torch.no_grad():
        for ms in (model.sub_mean, model.add_mean):
            ms.weight.add_(0.05 * torch.randn_like(ms.weight))
            ms.bias.add_(torch.randn_like(ms.bias))
    x = torch.rand(2, 3, 9, 11) * model.input_range
    with torch.no_grad():
        expected = model(x)
        srkernels.nn.fold_mean_shift(model)
        got = model(x)
    assert isinstance(model.sub_mean, torch.nn.Identity) and isinstance(model.add_mean, torch.nn.Identity)
    scale_ = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, scale_)


def test_fold_mean_shift_rejects_other_models():
    with pytest.raises(ValueError, match="needs a model with sub_mean"):
        srkernels.nn.fold_mean_shift(torch.nn.Conv2d(3, 3, 1))


def test_icnr_gives_nearest_neighbour_start():
    up = srkernels.nn.Upsampler(2, 4)
    srkernels.nn.icnr_upsampler_(up)
    conv = up[0]
    x = torch.randn(1, 4, 5, 6)
    out = up(x)
    sub = F.conv2d(x, conv.weight[::4], None, padding=1)
    assert_close(out, sub.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), torch.float32, "icnr")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("residual", [False, True])
def test_conv_epilogue_matches_eager(dtype, fmt, activation, residual):
    torch.manual_seed(2)
    conv = srkernels.nn.Conv2d(8, 12, 3, padding=1, activation=activation).to(dtype)
    assert list(conv.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 8, 7, 9).to(dtype).contiguous(memory_format=fmt)
    r = torch.randn(2, 12, 7, 9).to(dtype) if residual else None
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    if activation:
        ref = F.relu(ref)
    if residual:
        ref = ref + r.double()
    with torch.no_grad():  # inference: the oneDNN path
        assert_close(conv(x, r), ref, dtype, "oneDNN epilogue")
    # training: the eager path, with gradients
    xg = x.detach().requires_grad_(True)
    out = conv(xg, r)
    assert_close(out, ref, dtype, "eager epilogue")
    out.sum().backward()
    assert xg.grad is not None and conv.weight.grad is not None


def test_conv_epilogue_tracks_weight_updates():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        first = conv2d(conv, x, "relu")
        conv.weight.mul_(-1)  # in-place update must invalidate the prepacked weight
        second = conv2d(conv, x, "relu")
        assert_close(second, F.relu(conv(x)), torch.float32, "after update")
    assert not torch.equal(first, second)


def test_conv_epilogue_bad_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        srkernels.nn.Conv2d(2, 2, 3, activation="gelu")


@pytest.mark.parametrize("grad", [False, True])
def test_conv_without_bias(grad):
    """with_bias=False (the upsamplers add the bias in the shuffle epilogue) skips conv.bias on both paths."""
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(6, 10, 3, padding=1)
    conv.bias.data.uniform_(1, 2)  # far from zero: a bias that slipped in would show
    x = torch.randn(2, 6, 5, 7)
    with torch.set_grad_enabled(grad):
        out = conv2d(conv, x, with_bias=False)
        assert_close(out, F.conv2d(x, conv.weight, None, padding=1), torch.float32, "no bias")
