"""Fused models against their reference twins: every model and scale (outputs and every gradient), the
published configurations once, channels_last input, and torch.compile of each fused model.

The reference (``fused=False``) is the torch.cat / eager-layer formulation with identical state_dict keys;
the fused model loads its state_dict, so any difference is the fused kernels' rounding.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from srkernels.models import build

from .._winograd import TRAIN_ENVS, count_winograd, needs_winograd, winograd_env  # noqa: F401 (fixtures)
from .test_models import SMALL, cases

pytest.importorskip("srkernels._C", reason="the fused models need the compiled extension")

# fp32 parity bound of issue #5: max abs diff <= 1e-4 relative to the output range (gradients: their range)
RTOL = 1e-4


def pair(name, scale, cfg, small=True):
    torch.manual_seed(0)
    full = {**SMALL[name], **cfg} if small else dict(cfg)
    ref = build(name, scale, fused=False, **full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = build(name, scale, fused=True, **full)
    # perturb every parameter so biases and attention gates are away from their init (zeros / tiny values)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fused.load_state_dict(ref.state_dict())
    assert list(fused.state_dict()) == list(ref.state_dict())
    return ref, fused


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, what
    rng = max(a.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item()
    assert err <= RTOL * rng, f"{what}: max abs diff {err:.3g} > {RTOL} * {rng:.3g}"


def model_input(m, n=2, h=7, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, m.in_channels, h, w, generator=g) * m.input_range


def train_both(ref, fused, x):
    """Forward (outputs compared) and backward of the same random gradient through both models; returns the two
    inputs (with their gradients) and that gradient."""
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fused(xf)
    close(yf.detach(), yr.detach(), "output")
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    return xr, xf, g


def all_cases():
    yield from cases()
    yield "srcnn", 2, dict(kernel_sizes=(9, 1, 5))
    yield "srcnn", 4, dict(kernel_sizes=(9, 3, 5), in_channels=3)
    yield "srcnn", 3, dict(padding="valid", in_channels=3)
    yield "rdcab", 2, dict(variant="ipiu")
    yield "rcan", 2, dict(meanshift="rgb255_on_unit")
    yield "rcan", 4, dict(bam=True, meanshift="none")


@pytest.mark.parametrize("name, scale, cfg", list(all_cases()), ids=str)
def test_outputs_and_gradients(name, scale, cfg):
    ref, fused = pair(name, scale, cfg)
    h = 21 if cfg.get("padding") == "valid" else 7  # SRCNN "valid" shrinks by 16 pixels
    x = model_input(ref, h=h, w=h - 1)
    xr, xf, g = train_both(ref, fused, x)
    close(xf.grad, xr.grad, "input grad")
    fp = dict(fused.named_parameters())
    for k, p in ref.named_parameters():
        if p.grad is None:  # unused by the forward (e.g. MeanShift with meanshift="none")
            assert fp[k].grad is None, f"{k}: gradient in the fused model only"
            continue
        assert fp[k].grad is not None, f"{k}: no gradient in the fused model"
        close(fp[k].grad, p.grad, f"grad {k}")


@needs_winograd
@pytest.mark.parametrize("env, tile", TRAIN_ENVS[:2], ids=str)
@pytest.mark.parametrize("cfg", [{}, dict(bam=True)], ids=["rcan", "rcan_bam"])
def test_training_with_winograd_convs(winograd_env, count_winograd, cfg, env, tile):
    """Train mode at >= 64 pixels (16 channels): RCAN's convs run Winograd forward and for their input
    gradients (the residual-group node for RCAN, the conv2d_pointwise op per layer for RCAN-BAM); the output
    and every gradient against the reference within the parity bound, and against float64."""
    winograd_env(*env)
    ref, fused = pair("rcan", 2, cfg)
    x = model_input(ref, h=9, w=8)
    xr, xf, g = train_both(ref, fused, x)
    assert count_winograd["run"] > 0 and count_winograd["grad_input"] > 0 and count_winograd["run_tiles"] == {tile}
    assert count_winograd["grad_tiles"] == {4}
    close(xf.grad, xr.grad, "input grad")
    rd = copy.deepcopy(ref).double()
    xd = x.double().requires_grad_()
    rd(xd).backward(g.double())
    close(xf.grad, xd.grad, "input grad vs float64")
    fp, dp = dict(fused.named_parameters()), dict(rd.named_parameters())
    for k, p in ref.named_parameters():
        if p.grad is None:
            continue
        close(fp[k].grad, p.grad, f"grad {k}")
        close(fp[k].grad, dp[k].grad, f"grad {k} vs float64")


@pytest.mark.parametrize("name, scale, cfg", [
    ("srcnn", 3, {}), ("srdensenet", 4, {}), ("rcan", 4, {}), ("rcan", 2, dict(bam=True)), ("rdn", 2, {}),
    ("rdcab", 4, {}), ("rdcab", 4, dict(variant="split")), ("rdcab", 3, dict(variant="ipiu")),
], ids=str)
def test_published_config(name, scale, cfg):
    ref, fused = pair(name, scale, cfg, small=False)
    ref.eval(), fused.eval()
    x = model_input(ref, n=1, h=6, w=5)
    with torch.no_grad():
        close(fused(x), ref(x), "output")


@pytest.mark.parametrize("name", ["srdensenet", "rcan", "rdn", "rdcab"])
def test_channels_last_input(name):
    ref, fused = pair(name, 2, {})
    ref.eval(), fused.eval()
    x = model_input(ref).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        close(fused(x), ref(x.contiguous()), "output")


@pytest.mark.parametrize("name, cfg", [
    ("srcnn", {}), ("srdensenet", {}), ("rcan", {}), ("rcan", dict(bam=True)), ("rdn", {}), ("rdcab", {}),
    ("rdcab", dict(variant="split")), ("rdcab", dict(variant="fd_irb")),
], ids=str)
def test_output_memory_format_follows_the_input(name, cfg):
    """The fused output has the memory format the reference returns for the same input (its CPU inference runs
    channels_last inside): NCHW in -> NCHW out, channels_last in -> channels_last out; same in training."""
    ref, fused = pair(name, 3 if name == "srcnn" else 4 if cfg.get("variant") == "split" else 2, cfg)
    x = model_input(ref, n=1, h=8, w=7)
    for train in (False, True):
        ref.train(train), fused.train(train)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf = x.contiguous(memory_format=fmt)
            with torch.set_grad_enabled(train):
                want, got = ref(xf), fused(xf)
            for f in (torch.contiguous_format, torch.channels_last):
                assert got.is_contiguous(memory_format=f) == want.is_contiguous(memory_format=f), (train, fmt, f)


@pytest.mark.parametrize("name, scale, cfg", [
    ("srcnn", 3, {}), ("srdensenet", 2, {}), ("rcan", 2, {}), ("rcan", 3, dict(bam=True)), ("rdn", 2, {}),
    ("rdcab", 2, {}), ("rdcab", 2, dict(variant="fd_irb")),
], ids=str)
def test_torch_compile(name, scale, cfg):
    torch._dynamo.reset()
    ref, fused = pair(name, scale, cfg)
    ref.eval(), fused.eval()
    compiled = torch.compile(fused)
    x = model_input(ref, n=1)
    with torch.no_grad():
        y = compiled(x)
        close(y, fused(x), "compiled vs eager fused")
        close(y, ref(x), "compiled fused vs reference")


@pytest.mark.parametrize("name, scale, cfg", [
    ("srcnn", 3, {}), ("srdensenet", 4, {}), ("rcan", 2, {}), ("rcan", 3, dict(bam=True)), ("rdn", 3, {}),
    ("rdcab", 2, {}), ("rdcab", 4, dict(variant="split", num_features=64, growth=64)),
    ("rdcab", 2, dict(variant="fd_irb")),
], ids=str)
def test_fuse_converts_a_reference_model(name, scale, cfg):
    import srkernels

    ref, fused = pair(name, scale, cfg)
    converted = build(name, scale, fused=False, **{**SMALL[name], **cfg})
    converted.load_state_dict(ref.state_dict())
    assert srkernels.nn.fuse(converted) is converted
    assert list(converted.state_dict()) == list(ref.state_dict())
    x = model_input(ref)
    with torch.no_grad():
        close(converted(x), fused(x), "fuse(reference) vs fused=True")
        close(converted(x), ref(x), "fuse(reference) vs reference")


@pytest.mark.parametrize("name, cfg", [("rcan", {}), ("rdn", {}), ("rdcab", dict(variant="split"))], ids=str)
def test_no_grad_forward_skips_the_autograd_key_and_returns_normal_tensors(name, cfg):
    """Grad mode off: the fused forward's ops run below the autograd dispatch key (SRModel.run_fused), yet the
    output is a normal tensor (not an inference tensor): modifiable in place and usable in autograd later, and
    equal to the forward under inference_mode. With grad on, the key stays."""
    ref, fused = pair(name, 4 if cfg.get("variant") == "split" else 2, cfg)
    fused.eval()
    x = model_input(ref, n=1, h=8, w=7)
    excluded = []
    body = fused._forward_fused

    def probe(inp):  # the dispatch state the fused forward runs in
        excluded.append(torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality))
        return body(inp)
    fused._forward_fused = probe
    with torch.no_grad():
        y = fused(x)
    with torch.inference_mode():
        want = fused(x)
    assert excluded == [True, True]  # no_grad, inference_mode
    assert not y.is_inference() and not y.requires_grad
    assert torch.equal(y, want)
    y.add_(1)  # in place outside any mode: refused for an inference tensor
    w = torch.ones_like(y, requires_grad=True)
    (y * w).sum().backward()
    assert torch.equal(w.grad, y)
    excluded.clear()
    fused(x.requires_grad_())
    assert excluded == [False]
