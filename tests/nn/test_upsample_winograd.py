"""The fused upsamplers' CPU inference runs each Winograd-served conv + pixel shuffle as one
``winograd_conv3x3(upscale=r)`` call (srkernels/nn/upsample.py ``_winograd_stage``): the same result as the conv
then ``ops.pixel_shuffle`` (bitwise in float32; bf16 rounds once instead of twice); the reference's within float32 tolerance; the cached weight in shuffle order
follows weight and bias changes; other calls (training, small inputs) keep the two-step path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import srkernels.nn.upsample as U
from srkernels import nn as N
from srkernels.reference import upsample as R

from .._winograd import needs_winograd

pytest.importorskip("srkernels._C", reason="the fused layers need the compiled extension")
pytestmark = [needs_winograd, pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def stages(monkeypatch):
    """How each upsampling stage ran: "one call" (the shuffle in the conv's store) or "two steps"."""
    seen = []
    real = U._winograd_stage

    def spy(conv, r, x):
        y = real(conv, r, x)
        seen.append("two steps" if y is None else "one call")
        return y

    monkeypatch.setattr(U, "_winograd_stage", spy)
    return seen


def pair(scale, channels=16, dtype=torch.float32):
    torch.manual_seed(scale)
    ref = R.Upsampler(scale, channels)
    for p in ref.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    fused = N.Upsampler(scale, channels)
    fused.load_state_dict(ref.state_dict())
    return ref.eval(), fused.eval().to(dtype)


def two_steps(fused, x, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(U, "_winograd_stage", lambda conv, r, x: None)
        return fused(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_one_call_per_stage_bitwise_the_two_steps(stages, monkeypatch, scale, dtype):
    channels = 64 if dtype == torch.bfloat16 else 16  # bf16 Winograd's rule wants 64 channels on native-bf16 CPUs
    ref, fused = pair(scale, channels, dtype)
    x = torch.randn(2, channels, 9, 11).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = fused(x)
        n = len(stages)
        want2 = two_steps(fused, x, monkeypatch)
        want = ref.double()(x.double().contiguous())
    assert n == (2 if scale == 4 else 1) and set(stages) == {"one call"}, stages
    if dtype == torch.float32:
        assert torch.equal(got, want2)
    else:  # the two steps round the conv to bf16 before the bias add: a rounding apart per stage
        assert (got.float() - want2.float()).abs().max() <= 2 ** -6 * want2.float().abs().max()
    tol = 2e-5 if dtype == torch.float32 else 2 ** -6  # Winograd F(4,3) (docs/ops.md); bf16: two roundings
    assert (got.double() - want).abs().max() <= tol * want.abs().max()


def test_cached_weight_follows_changes(stages, monkeypatch):
    ref, fused = pair(2)
    x = torch.randn(1, 16, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before = fused(x)
        fused[0].weight.mul_(-1)  # in place: a new pack (version)
        a = fused(x)
        fused[0].bias = nn.Parameter(fused[0].bias + 1)  # a new bias object
        b = fused(x)
        ref.load_state_dict(fused.state_dict())
        want = ref(x)
    assert stages == ["one call"] * 3
    assert (a - before).abs().max() > 1e-2 and (b - a).abs().max() > 0.5
    assert (b - want).abs().max() <= 2e-5 * want.abs().max()


def test_other_calls_keep_two_steps(stages):
    ref, fused = pair(2)
    x = torch.randn(1, 16, 10, 10)
    fused(x.requires_grad_())  # training: the autograd path
    with torch.no_grad():
        fused(x[..., :6, :6])  # 36 px: Winograd's rule leaves the conv to oneDNN
    assert stages == ["two steps", "two steps"]
