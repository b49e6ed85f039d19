"""Fused RCAN's CPU inference runs each residual group as one ``residual_group`` op (srkernels/nn/attention.py
``residual_group_inference``): where it runs, that it matches the layer-by-layer path and the reference, where it
steps aside (training, autocast, BAM, a parametrized weight, the reference backend), and that its cached
arguments follow changes of the weights and modules."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import srkernels
from srkernels.nn import attention as A
from srkernels.ops.conv2d_pointwise import winograd_bf16

from .._winograd import needs_winograd
from .test_fused_models import close, pair

pytest.importorskip("srkernels._C", reason="the fused models need the compiled extension")
pytestmark = [needs_winograd, pytest.mark.usefixtures("one_thread")]

# SMALL rcan: 16 features (Winograd's minimum), 2 groups of 2 RCABs; 12 x 11 = 132 px (>= 64: Winograd serves)
CFG = dict(n_resgroups=2, n_resblocks=2, n_feats=16, reduction=4)


@pytest.fixture
def group_calls(monkeypatch):
    """The results of residual_group_inference per model forward: "op" where the op ran, "layers" otherwise."""
    calls = []
    real = A.residual_group_inference

    def spy(body, x):
        y = real(body, x)
        calls.append("layers" if y is None else "op")
        return y

    monkeypatch.setattr(A, "residual_group_inference", spy)
    return calls


def layers_forward(model, x, monkeypatch):
    """The fused model's output with the residual_group path turned off (each RCAB one by one)."""
    with monkeypatch.context() as m:
        m.setattr(A, "residual_group_inference", lambda body, x: None)
        return model(x)


def inputs(model, n=1):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, model.in_channels, 12, 11, generator=g) * model.input_range


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("scale", [2, 4])
def test_inference_runs_one_op_per_group_and_matches(group_calls, monkeypatch, scale, n):
    ref, fused = pair("rcan", scale, CFG, small=False)
    ref.eval(), fused.eval()
    x = inputs(ref, n)
    with torch.no_grad():
        want = ref(x)
        got = fused(x)
        assert group_calls == ["op", "op"]
        layers = layers_forward(fused, x, monkeypatch)
    close(got, want, "residual_group path vs reference")
    close(got, layers, "residual_group path vs the layer-by-layer path")


def test_bf16_model(group_calls, monkeypatch):
    # 64 features: bf16 Winograd's rule on CPUs with native bf16 (winograd_bf16); AMX CPUs leave it to oneDNN
    ref, fused = pair("rcan", 2, dict(CFG, n_feats=64, reduction=16), small=False)
    fused = fused.eval().to(torch.bfloat16)
    x = inputs(ref).bfloat16()
    with torch.no_grad():
        got = fused(x)
        assert group_calls == ["op" if winograd_bf16(4, 3, 64, 64) else "layers"] * 2
        layers = layers_forward(fused, x, monkeypatch)
        want = ref.eval()(x.float())
    assert got.dtype == torch.bfloat16
    if group_calls[0] == "op":  # 12 x 11 px: bf16 storage's F(6,3) (winograd6_use), in the group as in the layers
        for group in fused.body[:-1]:
            us = group.body.__dict__["_srk_group"].data.args[0]
            assert {u.shape[0] for u in us} == {64}
    # bf16 storage: every stored map rounded (2^-8 relative) through ~13 layers; measured ~1% of the output range
    rng = want.abs().max().item()
    assert (got.float() - layers.float()).abs().max().item() <= 0.02 * rng
    assert (got.float() - want).abs().max().item() <= 0.05 * rng


def test_autocast(group_calls, monkeypatch):
    """CPU autocast inference: the group runs on the bf16 weight copies the layers use (64 features: bf16
    Winograd's rule on CPUs with native bf16; AMX CPUs leave the convs to oneDNN, then the layers run)."""
    ref, fused = pair("rcan", 2, dict(CFG, n_feats=64, reduction=16), small=False)
    ref.eval(), fused.eval()
    x = inputs(ref)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(x)
        assert group_calls == ["op" if winograd_bf16(4, 3, 64, 64) else "layers"] * 2
        layers = layers_forward(fused, x, monkeypatch)
    with torch.no_grad():
        want = ref(x)
    assert got.dtype == layers.dtype == torch.bfloat16
    rng = want.abs().max().item()
    assert (got.float() - layers.float()).abs().max().item() <= 0.02 * rng  # as test_bf16_model
    assert (got.float() - want).abs().max().item() <= 0.05 * rng


@pytest.mark.parametrize("case", ["grad", "autocast fp16", "bam", "reference backend", "small image"])
def test_other_calls_run_the_layers(group_calls, case):
    ref, fused = pair("rcan", 2, dict(CFG, bam=case == "bam"), small=False)
    ref.eval(), fused.eval()
    x = inputs(ref)
    if case == "small image":
        x = x[..., :7, :6]  # 42 px: Winograd's rule leaves the convs to oneDNN
    with torch.no_grad():
        want = ref(x)
    if case == "grad":
        got = fused(x.requires_grad_())
    elif case == "autocast fp16":  # the op stores float32 or bf16 only
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            got = fused(x).float()
    elif case == "reference backend":
        with torch.no_grad(), srkernels.use_backend("reference"):
            got = fused(x)
    else:
        with torch.no_grad():
            got = fused(x)
    assert group_calls and set(group_calls) == {"layers"}
    if case != "autocast fp16":
        close(got.detach(), want, case)


def test_parametrized_weight_runs_the_layers(group_calls):
    ref, fused = pair("rcan", 2, CFG, small=False)
    ref.eval(), fused.eval()
    x = inputs(ref)
    conv = fused.body[0].body[0].body[0]
    torch.nn.utils.parametrizations.weight_norm(conv)
    with torch.no_grad():
        want_w = conv.weight.clone()
        ref.body[0].body[0].body[0].weight.copy_(want_w)
        got, want = fused(x), ref(x)
    assert group_calls == ["layers", "op"]
    close(got, want, "weight_norm conv")


@pytest.mark.parametrize("change", ["in place", "new parameter", "new module", "new fc bias"])
def test_cached_arguments_follow_the_weights(group_calls, change):
    ref, fused = pair("rcan", 2, CFG, small=False)
    ref.eval(), fused.eval()
    x = inputs(ref)
    with torch.no_grad():
        before = fused(x)
        rcab = fused.body[1].body[1]
        if change == "in place":
            rcab.body[2].weight.mul_(1.5)
        elif change == "new parameter":
            rcab.body[0].weight = nn.Parameter(rcab.body[0].weight * 0.5)
        elif change == "new module":
            old = rcab.body[2]
            new = nn.Conv2d(16, 16, 3, padding=1)
            new.load_state_dict({"weight": old.weight * -1, "bias": old.bias})
            rcab.body[2] = new
        else:
            rcab.body[3].conv_du[2].bias = nn.Parameter(rcab.body[3].conv_du[2].bias + 1)
        ref.load_state_dict(fused.state_dict())
        after, want = fused(x), ref(x)
    assert group_calls == ["op"] * 4
    assert (after - before).abs().max() > 1e-3, "the change must change the output"
    close(after, want, change)
