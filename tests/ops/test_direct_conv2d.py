"""direct_conv2d (CPU, float32 and bf16 storage, inference): the kernel against float64 F.conv2d (the reference is
that conv), every compiled capability, layouts, odd sizes, kernel sizes 1-7, 1-9 outputs (groups of 4), every
epilogue, opcheck, argument errors, the rule and the routing of conv2d_pointwise."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from srkernels import _backend, use_backend
D = importlib.import_module("srkernels.ops.direct_conv2d")  # the module: ops.<name> is the function

from .._winograd import EPILOGUES, check_every_capability, conv_inputs
from .._winograd import rel_err as _err
from ..conftest import layout
from ._parity import assert_thread_independent

compiled = pytest.mark.skipif(not _backend.has_compiled("direct_conv2d", "cpu"),
                              reason="the compiled extension has no direct_conv2d CPU kernel")
pytestmark = pytest.mark.usefixtures("one_thread")

# max |y - ref| <= TOL * max(1, max |ref|) against float64 F.conv2d: float32 sums of C * R^2 products in lanes,
# measured ~1e-7 relative (64 -> 3 at 48-192 px, benchmarks/bench_direct_conv2d.py); oneDNN's ~8e-7
TOL = 2e-6
TOL_BF16 = 2 ** -7  # bf16 storage: the float32 result rounded once (half an ulp 2^-8), inputs exact in float32

# (N, C_in, C_out, H, W, R): odd sizes, C_in not a multiple of 8 or 16 and below one vector, 1-9 outputs (the
# kernel's groups of 4 and their remainders), images smaller than the kernel, 1x1 to 7x7 kernels
SHAPES = [(1, 64, 3, 13, 11, 3), (2, 5, 1, 9, 10, 3), (1, 17, 4, 1, 1, 3), (2, 24, 2, 2, 3, 5), (1, 40, 7, 6, 33, 3),
          (1, 32, 1, 12, 9, 5), (2, 19, 9, 5, 4, 1), (1, 33, 3, 8, 8, 7)]


def _inputs(N, C, K, H, W, R, bias, res, seed=0):
    x, w, b, r = conv_inputs(N, C, K, H, W, R, bias, res, seed)
    return x, w, D.direct_weight(w), b, r


def _exact(x, w, b, act, r):
    d = (lambda t: None if t is None else t.double())
    return D.reference(x.double(), D.direct_weight(w.double()), d(b), act, d(r))


@compiled
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity(shape, fmt):
    for i, (bias, act, res) in enumerate(EPILOGUES):
        x, w, u, b, r = _inputs(*shape, bias, res, seed=10 * i)
        x = layout(x, fmt)
        if r is not None and i % 2:
            r = r.contiguous(memory_format=torch.channels_last)  # a residual in the other layout
        y = D.direct_conv2d(x, u, b, act=act, residual=r)
        N, _, H, W = x.shape
        assert y.dtype == torch.float32 and y.shape == (N, w.shape[0], H, W)
        if H * W > 1 and w.shape[0] > 1 and fmt != "strided":
            want_cl = fmt == "channels_last"
            assert y.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
        assert _err(y, _exact(x, w, b, act, r)) <= TOL, (shape, fmt, i)


@compiled
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_parity(shape):
    """bf16 storage: the float32 conv of the bf16 values (bias float32 or bf16), rounded once."""
    for i, (bias, act, res) in enumerate(EPILOGUES):
        x, w, _, b, r = _inputs(*shape, bias, res, seed=10 * i + 1)
        bf = (lambda t: None if t is None else t.bfloat16())
        xb, wb, rb = bf(x).contiguous(memory_format=torch.channels_last), bf(w), bf(r)
        bb = b if i % 2 or b is None else bf(b)
        y = D.direct_conv2d(xb, D.direct_weight(wb.float()), bb, act=act, residual=rb)
        assert y.dtype == torch.bfloat16
        want = _exact(xb, wb, bb, act, rb)
        assert ((y.double() - want).abs() <= want.abs() * TOL_BF16 + 1e-5).all(), (shape, i)


def test_reference_is_the_conv():
    x, w, u, b, r = _inputs(2, 6, 3, 7, 9, 5, True, True)
    x, w, u, b, r = x.double(), w.double(), u.double(), b.double(), r.double()
    want = F.relu(F.conv2d(x, w, b, padding=2)) + r
    torch.testing.assert_close(D.reference(x, u, b, "relu", r), want, rtol=1e-12, atol=1e-12)


@compiled
def test_thread_independent():
    x, _, u, b, r = _inputs(2, 64, 3, 23, 17, 3, True, True)
    x = x.contiguous(memory_format=torch.channels_last)
    assert_thread_independent(lambda: (D.direct_conv2d(x, u, b, act="relu", residual=r),))


_CAP_SCRIPT = r"""
import importlib, sys, torch, torch.nn.functional as F, srkernels
D = importlib.import_module("srkernels.ops.direct_conv2d")
assert srkernels.build_info()["cpu_capability"] == sys.argv[1]
g = torch.Generator().manual_seed(0)
worst = 0.0
for (N, C, K, H, Wd, R) in [(1, 64, 3, 13, 11, 3), (2, 5, 1, 9, 10, 3), (1, 17, 6, 1, 1, 5), (1, 256, 1, 7, 30, 3)]:
    x = torch.randn(N, C, H, Wd, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(K, C, R, R, generator=g) / (R * C ** 0.5)
    b, r = torch.randn(K, generator=g), torch.randn(N, K, H, Wd, generator=g)
    y = D.direct_conv2d(x, D.direct_weight(w), b, act="relu", residual=r)
    ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), padding=R // 2)) + r.double()
    err = (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err <= 2e-6, (N, C, K, H, Wd, R, err)
    worst = max(worst, err)
    yb = D.direct_conv2d(x.bfloat16(), D.direct_weight(w.bfloat16().float()), b).double()
    rb = F.conv2d(x.bfloat16().double(), w.bfloat16().double(), b.double(), padding=R // 2)
    assert ((yb - rb).abs() <= rb.abs() * 2 ** -7 + 1e-5).all(), (N, C, K, H, Wd, R, "bf16")
print("ok", worst)
"""


@compiled
def test_every_capability():
    check_every_capability(_CAP_SCRIPT)


@compiled
def test_opcheck():
    x, _, u, b, r = _inputs(2, 20, 3, 7, 6, 3, True, True)
    for args in [(x, u, b, "relu", r), (x.contiguous(memory_format=torch.channels_last), u, None, "none", None)]:
        torch.library.opcheck(torch.ops.srkernels.direct_conv2d, args)


def test_gradient_runs_the_reference():
    # no autograd through the kernel: a call that needs a gradient takes the differentiable reference
    x, w, _, b, _ = _inputs(1, 20, 3, 5, 6, 3, True, False)
    x = x.double().requires_grad_(True)
    wd = w.double().requires_grad_(True)
    y = D.direct_conv2d(x, D.direct_weight(wd), b.double(), act="relu")
    assert y.requires_grad
    y.sum().backward()
    x2, w2 = x.detach().requires_grad_(True), w.double().detach().requires_grad_(True)
    F.relu(F.conv2d(x2, w2, b.double(), padding=1)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(wd.grad, w2.grad)


@compiled
def test_reference_backend_forced():
    x, _, u, b, r = _inputs(1, 24, 3, 9, 7, 3, True, True)
    with use_backend("reference"):
        got = D.direct_conv2d(x, u, b, act="relu", residual=r)
    torch.testing.assert_close(got, D.direct_conv2d(x, u, b, act="relu", residual=r), rtol=1e-5, atol=1e-5)


def test_use_rule():
    for cap in ("avx2", "avx512"):
        assert D.direct_use(64, 3, 3, 192, 192, cap) and D.direct_use(256, 1, 3, 48, 48, cap)
        assert D.direct_use(32, 1, 5, 16, 16, cap)
        assert not D.direct_use(64, 8, 3, 48, 48, cap)  # more than 4 outputs: Winograd
        assert not D.direct_use(8, 3, 3, 48, 48, cap)  # too few inputs
        assert not D.direct_use(64, 3, 3, 8, 8, cap)  # too few pixels
        assert not D.direct_use(64, 3, 7, 48, 48, cap)  # 7x7: not measured
    assert not D.direct_use(64, 3, 3, 192, 192, "default")


@compiled
def test_last_conv_routes_to_direct_in_inference_only():
    """A 64 -> 3 conv at 32x32 (a model's last conv) runs direct_conv2d in inference (`conv2d_pointwise`'s rule)
    and matches F.conv2d; training keeps it on the other algorithms."""
    import srkernels.nn as snn
    cp = importlib.import_module("srkernels.ops.conv2d_pointwise")
    if not D.direct_use(64, 3, 3, 32, 32):
        pytest.skip("direct_conv2d serves the avx2 and avx512 builds only")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 3, 3, padding=1)
    x = torch.randn(1, 64, 32, 32)
    meta = (conv.stride, conv.padding, conv.dilation, conv.groups)
    assert cp.cpu_algorithm(x, conv.weight, *meta) is cp.DIRECT
    assert cp.cpu_algorithm(x, conv.weight, *meta, training=True) is not cp.DIRECT
    conv_bf16 = copy.deepcopy(conv).to(torch.bfloat16)
    with torch.no_grad():
        y = snn.conv2d(conv, x, "relu")
        yb = snn.conv2d(conv_bf16, x.bfloat16())
    for c in (conv, conv_bf16):
        assert c.__dict__["_srk_last"].data[4][0] is cp.DIRECT  # what the layer ran
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert _err(y, exact.relu()) <= TOL
    assert yb.dtype == torch.bfloat16 and _err(yb.float(), F.conv2d(
        x.bfloat16().double(), conv_bf16.weight.double(), conv_bf16.bias.double(), padding=1)) <= TOL_BF16
    # the op itself on the plain weight (no packing: conv2d_pointwise's CPU kernel)
    from srkernels import ops
    with torch.no_grad():
        z = ops.conv2d_pointwise(x, conv.weight.float(), conv.bias.float(), padding=1)
    assert _err(z, F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)) <= TOL


_x, _w = torch.randn(1, 4, 5, 5), torch.randn(3, 4, 3, 3)
_u = D.direct_weight(_w)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(x=torch.randn(4, 5, 5)), ValueError, "x must be 4-D"),
    (dict(x=_x.half()), TypeError, "x must be float32"),
    (dict(x=_x.long()), TypeError, "x must be a floating"),
    (dict(weight_t=_u.double()), TypeError, "weight_t has dtype"),
    (dict(weight_t=_u[0]), ValueError, "weight_t must be \\[R, R, C_out, C_in\\]"),
    (dict(weight_t=torch.randn(2, 2, 3, 4)), ValueError, "odd R"),
    (dict(weight_t=D.direct_weight(torch.randn(3, 5, 3, 3))), ValueError, "weight_t has 5 input channels"),
    (dict(weight_t=_u[:, :, :0]), ValueError, "0 output channels"),
    (dict(bias=torch.randn(4)), ValueError, "bias must have shape"),
    (dict(act="gelu"), ValueError, "act must be one of"),
    (dict(residual=torch.randn(1, 4, 5, 5)), ValueError, "residual must have shape"),
    (dict(residual=torch.randn(1, 3, 5, 5).double()), TypeError, "residual has dtype"),
])
def test_bad_input(kw, exc, match):
    args = dict(x=_x, weight_t=_u, bias=None, act=None, residual=None) | kw
    x, u = args.pop("x"), args.pop("weight_t")
    with pytest.raises(exc, match=match):
        D.direct_conv2d(x, u, args.pop("bias"), **args)


@pytest.mark.parametrize("weight,exc,match", [
    (torch.randn(3, 4, 2, 2), ValueError, "odd R"),
    (torch.randn(3, 4, 3), ValueError, "\\[C_out, C_in, R, R\\]"),
    (torch.ones(3, 4, 3, 3, dtype=torch.int32), TypeError, "weight must be floating"),
    ([1.0], TypeError, "weight must be a torch.Tensor"),
])
def test_bad_weight(weight, exc, match):
    with pytest.raises(exc, match=match):
        D.direct_weight(weight)
