"""winograd_conv5x5 (CPU, float32 or bf16 storage, inference, F(2x2, 5x5) and F(4x4, 5x5)): the kernel against
its float64 torch reference on the same transformed weight and against float64 F.conv2d on the original weight,
every compiled capability, layouts, odd sizes, epilogues, opcheck, argument errors, the conv2d_pointwise routing
and the fused SRCNN."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import srkernels
from srkernels import _backend, use_backend

from .._winograd import (EPILOGUES, bad_input_cases, check_bad_input, check_every_capability, check_parity,
                         conv_inputs, conv_op, count_winograd, needs_winograd, winograd_env)  # noqa: F401
from .._winograd import as_double as _d
from .._winograd import rel_err as _err
from ..conftest import layout
from ._parity import assert_thread_independent

W5 = importlib.import_module("srkernels.ops.winograd_conv5x5")  # the module: ops.<name> is the function
W3 = importlib.import_module("srkernels.ops.winograd_conv3x3")

compiled = pytest.mark.skipif(not _backend.has_compiled("winograd_conv5x5", "cpu"),
                              reason="the compiled extension has no winograd_conv5x5 CPU kernel")
pytestmark = pytest.mark.usefixtures("one_thread")

# max |y - ref| <= TOL[m] * max(1, max |ref|), against both the float64 reference on the same float32 weight_t
# and float64 F.conv2d on the original weight. Measured (every compiled capability, unit-scale data, weights ~
# 1/(5 sqrt(C_in)), every epilogue, SHAPES and 64 -> 32 at 48x48): F(2,5) up to 4.8e-6, F(4,5) up to 8.6e-6;
# oneDNN's own float32 conv ~1e-6 (test_error_is_bounded_like_onednn). 2x headroom for other CPUs' summation.
TOL = {2: 1e-5, 4: 2e-5}
TILES = (2, 4)

# (N, C_in, C_out, H, W): odd sizes, C not a multiple of 8 or 16, one pixel, fewer pixels than a tile or the
# padding, one row
SHAPES = [(1, 64, 32, 13, 11), (2, 5, 7, 9, 10), (1, 17, 33, 1, 1), (2, 3, 20, 6, 3), (1, 24, 1, 2, 2),
          (1, 9, 16, 1, 7)]


def _inputs(N, C, K, H, Wd, bias, res, seed=0, m=2):
    x, w, b, r = conv_inputs(N, C, K, H, Wd, 5, bias, res, seed)
    return x, w, W5.winograd_weight5(w, m), b, r


@compiled
@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity(shape, fmt, m):
    for i, (bias, act, res) in enumerate(EPILOGUES):
        x, w, u, b, r = _inputs(*shape, bias, res, seed=10 * i, m=m)
        x = layout(x, fmt)
        if r is not None and i % 2:
            r = r.contiguous(memory_format=torch.channels_last)  # a residual in the other layout
        check_parity(W5.winograd_conv5x5, W5.reference, W3.conv_reference, x, w, u, b, act, r, TOL[m], fmt)


@compiled
@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("K", [1, 2, 15, 16, 17, 31, 32, 33])
def test_output_channel_counts(K, m):
    # every masked edge of the output channels (VW 8 or 16, padded to 16)
    x, w, u, b, r = _inputs(1, 12, K, 7, 9, True, True, seed=K, m=m)
    y = W5.winograd_conv5x5(x, u, b, act="relu", residual=r)
    assert _err(y, W3.conv_reference(x.double(), w.double(), b.double(), "relu", r.double())) <= TOL[m]


@pytest.mark.parametrize("m", TILES)
def test_reference_is_the_conv(m):
    # the matrices: the torch reference in float64 is the direct 5x5 conv (padding 2) to float64 rounding, also
    # across tile edges (11 = 2 * 4 + 3)
    x, w, _, b, r = _inputs(2, 6, 5, 7, 11, True, True)
    x, w, b, r = x.double(), w.double(), b.double(), r.double()
    u = W5.winograd_weight5(w, m)
    assert u.shape == ((m + 4) ** 2, 6, 5) and W5.check_positions(u) == m
    got = W5.reference(x, u, b, "relu", r)
    torch.testing.assert_close(got, W3.conv_reference(x, w, b, "relu", r), rtol=1e-12, atol=1e-12)
    assert W3.conv_reference(x, w).shape[2:] == x.shape[2:]  # padding 2


def test_gradcheck_float64():
    # float64 runs the differentiable reference: gradients w.r.t. x, the original weight (through
    # winograd_weight5), bias and residual
    x, w, _, b, r = _inputs(1, 3, 2, 5, 4, True, True)
    args = [t.double().requires_grad_(True) for t in (x, w, b, r)]
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: W5.winograd_conv5x5(x, W5.winograd_weight5(w), b, act="relu", residual=r), args)


@compiled
def test_error_is_bounded_like_onednn():
    # the documented accuracy claim on SRCNN's layer (64 -> 32, 48x48): F(2,5) within 4x oneDNN's float32 error,
    # F(4,5) within 10x (F(4,3)'s bound, test_winograd_conv3x3.py)
    x, w, u, b, _ = _inputs(1, 64, 32, 48, 48, True, False)
    x = x.contiguous(memory_format=torch.channels_last)
    direct = W3.conv_reference(x.double(), w.double(), b.double())
    onednn = _err(F.conv2d(x, w, b, padding=2), direct)
    wino = _err(W5.winograd_conv5x5(x, u, b), direct)
    wino4 = _err(W5.winograd_conv5x5(x, W5.winograd_weight5(w, 4), b), direct)
    assert wino <= 4 * onednn and wino4 <= 10 * onednn, (wino, wino4, onednn)


@compiled
@pytest.mark.parametrize("m", TILES)
def test_thread_independent(m):
    x, _, u, b, r = _inputs(2, 32, 24, 23, 17, True, True, m=m)
    x = x.contiguous(memory_format=torch.channels_last)
    assert_thread_independent(lambda: (W5.winograd_conv5x5(x, u, b, act="relu", residual=r),))


_CAP_SCRIPT = r"""
import importlib, sys, torch, srkernels
W5 = importlib.import_module("srkernels.ops.winograd_conv5x5")
assert srkernels.build_info()["cpu_capability"] == sys.argv[1]
g = torch.Generator().manual_seed(0)
worst = 0.0
for (N, C, K, H, Wd) in [(1, 64, 32, 13, 11), (2, 5, 7, 9, 10), (1, 17, 33, 1, 1)]:
    x = torch.randn(N, C, H, Wd, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(K, C, 5, 5, generator=g) / (5 * C ** 0.5)
    b, r = torch.randn(K, generator=g), torch.randn(N, K, H, Wd, generator=g)
    for m, tol in ((2, float(sys.argv[2])), (4, float(sys.argv[3]))):
        u = W5.winograd_weight5(w, m)
        y = W5.winograd_conv5x5(x, u, b, act="relu", residual=r)
        ref = W5.reference(x.double(), u.double(), b.double(), "relu", r.double())
        err = (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err <= tol, (m, N, C, K, H, Wd, err)
        worst = max(worst, err)
print("ok", worst)
"""


@compiled
def test_every_capability():
    check_every_capability(_CAP_SCRIPT, str(TOL[2]), str(TOL[4]))


@compiled
def test_opcheck():
    x, _, u, b, r = _inputs(2, 5, 6, 7, 6, True, True)
    for args in [(x, u, b, "relu", r), (x.contiguous(memory_format=torch.channels_last), u, None, "none", None)]:
        torch.library.opcheck(torch.ops.srkernels.winograd_conv5x5, args)


def test_gradient_runs_the_reference():
    # no autograd through the kernel: a float32 call that needs a gradient takes the differentiable reference
    x, w, _, b, _ = _inputs(1, 4, 3, 5, 6, True, False)
    wd = w.clone().requires_grad_(True)
    y = W5.winograd_conv5x5(x, W5.winograd_weight5(wd), b, act="relu")
    assert y.requires_grad
    y.sum().backward()
    w2 = w.double().requires_grad_(True)
    W3.conv_reference(x.double(), w2, b.double(), "relu").sum().backward()
    torch.testing.assert_close(wd.grad.double(), w2.grad, rtol=1e-4, atol=1e-4)


@compiled
def test_reference_backend_forced():
    x, _, u, b, r = _inputs(1, 8, 8, 9, 7, True, True)
    with use_backend("reference"):
        got = W5.winograd_conv5x5(x, u, b, act="relu", residual=r)
    torch.testing.assert_close(got, W5.winograd_conv5x5(x, u, b, act="relu", residual=r), rtol=1e-5, atol=1e-5)


def test_use_rule():
    assert W5.winograd5_use(64, 32, 48, 48, "avx512") and W5.winograd5_use(64, 32, 32, 32, "avx2")
    assert not W5.winograd5_use(64, 32, 48, 48, "default")
    assert not W5.winograd5_use(1, 64, 48, 48, "avx512") and not W5.winograd5_use(32, 1, 48, 48, "avx2")
    assert W5.winograd5_use(16, 16, 48, 48, "avx2") and not W5.winograd5_use(16, 16, 48, 48, "avx512")
    assert W5.winograd5_use(16, 24, 48, 48, "avx512") and W5.winograd5_use(64, 32, 2, 2, "avx512")
    # F(4,5): 16 output channels on AVX-512 too (1.8-2.2x oneDNN), never on the portable build or below 16
    assert W5.winograd5_use(16, 16, 48, 48, "avx512", m=4) and W5.winograd5_use(64, 32, 6, 6, "avx2", m=4)
    assert not W5.winograd5_use(64, 32, 48, 48, "default", m=4) and not W5.winograd5_use(8, 64, 48, 48, "avx512", m=4)
    assert not W5.winograd5_use(64, 15, 48, 48, "avx2", m=4)


_x, _u = torch.randn(1, 4, 5, 5), W5.winograd_weight5(torch.randn(6, 4, 5, 5))


@pytest.mark.parametrize("kw,exc,match", bad_input_cases(
    _x, _u, W5.winograd_weight5(torch.randn(6, 3, 5, 5)), (slice(0, 16), "weight_t must have 36 .*F\\(2x2,5x5\\)")))
def test_bad_input(kw, exc, match):
    check_bad_input(W5.winograd_conv5x5, _x, _u, kw, exc, match)


@pytest.mark.parametrize(
    "weight,exc,match",
    [
        (torch.randn(6, 4, 3, 3), ValueError, "weight must be \\[C_out, C_in, 5, 5\\]"),
        (torch.ones(6, 4, 5, 5, dtype=torch.int32), TypeError, "weight must be floating"),
        ([1.0], TypeError, "weight must be a torch.Tensor"),
    ],
)
def test_bad_weight(weight, exc, match):
    with pytest.raises(exc, match=match):
        W5.winograd_weight5(weight)


# ---- routing: conv2d_pointwise and the fused SRCNN ----


@needs_winograd
def test_conv2d_pointwise_routes_5x5(winograd_env, count_winograd):
    """float32 5x5 stride-1 padding-2 convs the rule accepts run winograd_conv5x5, F(4,5) in inference at the
    default tile setting, F(2,5) with SRKERNELS_WINOGRAD=2 and in training (unless SRKERNELS_WINOGRAD_TRAIN=0);
    SRKERNELS_WINOGRAD=0 switches it off."""
    winograd_env("4")
    x, w, _, b, r = _inputs(1, 32, 24, 12, 10, True, True)
    want = W3.conv_reference(x.double(), w.double(), b.double(), "relu", r.double())
    y = srkernels.ops.conv2d_pointwise(x, w, b, padding=2, activation="relu", residual=r)
    assert count_winograd["run"] == 1 and count_winograd["run_tiles"] == {4} and _err(y, want) <= TOL[4]
    for stride, padding in (([1, 1], [1, 1]), ([2, 2], [2, 2]), ([1, 1], [2, 1])):  # not the kernel's conv
        conv_op.run_cpu(x, w, b, stride, padding, [1, 1], 1, "none", None)
    assert count_winograd["run"] == 1
    assert conv_op.cpu_algorithm(x, w, [1, 1], [2, 2], [1, 1], 1) is conv_op.WINOGRAD45
    assert conv_op.cpu_algorithm(x, w, [1, 1], [2, 2], [1, 1], 1, training=True) is conv_op.WINOGRAD5
    assert not isinstance(conv_op.cpu_algorithm(x[:, :8], w[:, :8], [1, 1], [2, 2], [1, 1], 1), conv_op.Winograd)
    winograd_env("4", "0")  # training off, inference on
    assert conv_op.cpu_algorithm(x, w, [1, 1], [2, 2], [1, 1], 1, training=True) is conv_op.ONEDNN
    assert conv_op.cpu_algorithm(x, w, [1, 1], [2, 2], [1, 1], 1) is conv_op.WINOGRAD45
    winograd_env("2")
    assert conv_op.cpu_algorithm(x, w, [1, 1], [2, 2], [1, 1], 1) is conv_op.WINOGRAD5
    assert conv_op.cpu_algorithm(x, w, [1, 1], [2, 2], [1, 1], 1, training=True) is conv_op.WINOGRAD5
    winograd_env("0")
    assert conv_op.cpu_algorithm(x, w, [1, 1], [2, 2], [1, 1], 1) is conv_op.ONEDNN


@needs_winograd
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_fused_srcnn_runs_winograd5(winograd_env, count_winograd, fmt):
    """The published SRCNN (9-5-5, 64-32): the fused inference runs its 64->32 5x5 layer by winograd_conv5x5
    F(4,5) and matches the reference model within the fused models' fp32 bound (tests/models/test_fused_models.py
    RTOL)."""
    from srkernels.models import build

    winograd_env("4")
    torch.manual_seed(0)
    ref = build("srcnn", 3, fused=False).eval()
    fused = build("srcnn", 3, fused=True).eval()
    fused.load_state_dict(ref.state_dict())
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = torch.rand(1, 1, 24, 19, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=mf)
    with torch.no_grad():
        y, want = fused(x), ref(x)
    assert count_winograd["run"] == 1 and count_winograd["run_tiles"] == {4}
    assert y.is_contiguous(memory_format=mf)
    err = (y - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), err


# ---- training: conv2d_pointwise's autograd with a Winograd 5x5 forward and input gradient ----


def test_weight_step_is_the_float64_transform():
    """``winograd_weight5_step`` (one float32 matmul) agrees with ``winograd_weight5`` (float64, rounded once) to
    a few float32 ulps, also for the input-gradient conv (weight rotated 180 degrees, C_in <-> C_out), on a
    non-contiguous weight too; no autograd."""
    w = (torch.randn(24, 17, 5, 5, generator=torch.Generator().manual_seed(3)) * 0.2).requires_grad_(True)
    for weight in (w, w.detach().contiguous(memory_format=torch.channels_last)):
        for grad_input, want in ((False, W5.winograd_weight5(weight.detach())),
                                 (True, W5.winograd_weight5(weight.detach().flip(2, 3).transpose(0, 1)))):
            got = W5.winograd_weight5_step(weight, grad_input=grad_input)
            assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
            assert not got.requires_grad
            assert (got - want).abs().max().item() <= 8 * torch.finfo(torch.float32).eps * want.abs().max().item()
    with pytest.raises(ValueError, match="weight must be \\[C_out, C_in, 5, 5\\]"):
        W5.winograd_weight5_step(w[..., :3, :3])


@compiled
def test_grad_input_weight_runs_the_input_gradient():
    """The kernel on ``winograd_weight5_step(w, grad_input=True)`` is the input gradient of the 5x5 conv
    (float64 ATen ``convolution_backward``), + a residual."""
    x, w, _, _, _ = _inputs(2, 20, 24, 9, 10, False, False)
    g = torch.randn(2, 24, 9, 10, generator=torch.Generator().manual_seed(11))
    r = torch.randn(2, 20, 9, 10, generator=torch.Generator().manual_seed(12))
    got = W5.winograd_conv5x5(g, W5.winograd_weight5_step(w, grad_input=True), None, residual=r)
    want = torch.ops.aten.convolution_backward(g.double(), x.double(), w.double(), None, [1, 1], [2, 2], [1, 1],
                                               False, [0, 0], 1, [True, False, False])[0] + r.double()
    assert _err(got, want) <= TOL[2]


@needs_winograd
def test_fused_srcnn_training_runs_winograd5(winograd_env, count_winograd):
    """CPU training of the fused published SRCNN: the 64->32 5x5 layer runs Winograd F(2,5) forward and for its
    input gradient (conv2d_pointwise's autograd); output and every gradient within the fused models' fp32 bound
    of the reference model and of the reference in float64; the SRKERNELS_WINOGRAD_TRAIN=0 switch is obeyed."""
    import copy

    from srkernels.models import build

    for env, runs in ((("4", None), 1), (("4", "0"), 0)):
        winograd_env(*env)
        count_winograd.update(run=0, grad_input=0)
        torch.manual_seed(0)
        ref = build("srcnn", 3, fused=False)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.02 * torch.randn_like(p))
        fused = build("srcnn", 3, fused=True)
        fused.load_state_dict(ref.state_dict())
        x = torch.rand(2, 1, 20, 17, generator=torch.Generator().manual_seed(1))
        g = torch.randn(2, 1, 20, 17, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        results = []
        for m, dt in ((ref, torch.float32), (fused, torch.float32), (copy.deepcopy(ref).double(), torch.float64)):
            xx = x.detach().to(dt).requires_grad_(True)
            y = m(xx)
            y.backward(g.to(dt))
            results.append([y.detach(), xx.grad] + [p.grad for p in m.parameters()])
        assert count_winograd["run"] == runs and count_winograd["grad_input"] == runs, (env, count_winograd)
        assert results[1][0].is_contiguous()  # NCHW in, NCHW out
        for want in (results[0], results[2]):
            for a, b in zip(results[1], want):
                assert (a.double() - b.double()).abs().max().item() <= 1e-4 * b.abs().max().item()


@compiled
@pytest.mark.parametrize("m", TILES)
def test_bf16_storage(m):
    """bf16 x, bias and residual with the float32 transform of the bf16 weight: one bf16 rounding of the float32
    reference, and of float64 F.conv2d on the same bf16 tensors within a bf16 rounding."""
    x, w, b, r = (t.bfloat16() for t in conv_inputs(2, 20, 19, 11, 7, 5, True, True, seed=3))
    x = x.contiguous(memory_format=torch.channels_last)
    u = W5.winograd_weight5(w.float(), m)
    y = W5.winograd_conv5x5(x, u, b, act="relu", residual=r)
    ref = W5.reference(x, u, b, "relu", r)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert ((y.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-5).all()
    exact = W3.conv_reference(x.double(), w.double(), b.double(), "relu", r.double())
    assert _err(y, exact) <= 2 ** -8 + 1e-4
