"""winograd_conv3x3 (CPU, float32 and bf16 storage, inference): the kernel against its float64 torch reference on the same
transformed weight (same algorithm: tight) and against float64 F.conv2d on the original weight (what it
replaces: F(4,3)'s larger rounding error, bounded explicitly), every compiled capability, layouts, odd sizes,
epilogue combinations, opcheck and argument errors."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from srkernels import _backend, use_backend
W = importlib.import_module("srkernels.ops.winograd_conv3x3")  # the module: ops.<name> is the function

from .._winograd import (EPILOGUES, bad_input_cases, check_bad_input, check_every_capability, check_parity,
                         conv_inputs)
from .._winograd import rel_err as _err
from ..conftest import layout
from ._parity import assert_thread_independent, randn

compiled = pytest.mark.skipif(not _backend.has_compiled("winograd_conv3x3", "cpu"),
                              reason="the compiled extension has no winograd_conv3x3 CPU kernel")
pytestmark = pytest.mark.usefixtures("one_thread")

# max |y - ref| <= TOL * max(1, max |ref|). Against the float64 reference of the same algorithm on the same
# float32 weight_t only the kernel's float32 arithmetic differs; against F.conv2d in float64 the weight
# transform's rounding adds to it. Measured (64 channels, unit-scale data, weights ~ 1/sqrt(9 C)): F(2,3)
# ~2e-7 and F(4,3) ~5e-6 relative; oneDNN's own float32 conv ~8e-7.
TOL = {2: 2e-6, 4: 2e-5, 6: 4e-5}  # F(6,3) rounds ~2x F(4,3) (winograd6_use)

# (N, C_in, C_out, H, W): odd sizes, C not a multiple of 8 or 16, one pixel, fewer pixels than a tile; more than
# 64 outputs (the kernel's M chunks of 64 output channels: 64 + 36 and 64 + 64 + 2 with 130)
SHAPES = [(1, 64, 64, 13, 11), (2, 5, 7, 9, 10), (1, 17, 33, 1, 1), (2, 3, 20, 6, 3), (1, 24, 16, 4, 4),
          (1, 16, 100, 9, 7), (2, 8, 130, 6, 5)]


def _inputs(N, C, K, H, Wd, m, bias, res, seed=0):
    x, w, b, r = conv_inputs(N, C, K, H, Wd, 3, bias, res, seed)
    return x, w, W.winograd_weight(w, m), b, r


@compiled
@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity(shape, fmt, m):
    for i, (bias, act, res) in enumerate(EPILOGUES):
        x, w, u, b, r = _inputs(*shape, m, bias, res, seed=10 * i)
        x = layout(x, fmt)
        if r is not None and i % 2:
            r = r.contiguous(memory_format=torch.channels_last)  # a residual in the other layout
        check_parity(W.winograd_conv3x3, W.reference, W.conv_reference, x, w, u, b, act, r, TOL[m], fmt)


def test_reference_is_the_conv():
    # the torch reference (the fallback) in float64 is the direct conv to rounding, for both tile sizes
    for m in W.TILES:
        x, w, _, b, r = _inputs(2, 6, 5, 7, 9, m, True, True)
        x, w, b, r = x.double(), w.double(), b.double(), r.double()
        got = W.reference(x, W.winograd_weight(w, m), b, "relu", r)
        torch.testing.assert_close(got, W.conv_reference(x, w, b, "relu", r), rtol=1e-12, atol=1e-12)


@compiled
def test_large_tile_error_is_bounded_like_onednn():
    # the documented accuracy claim on the case that matters (64 -> 64, 48x48): F(2,3) is at least as
    # accurate as oneDNN's float32 conv, F(4,3) within 10x of it
    x, w, _, b, _ = _inputs(1, 64, 64, 48, 48, 4, True, False)
    x = x.contiguous(memory_format=torch.channels_last)
    direct = W.conv_reference(x.double(), w.double(), b.double())
    onednn = _err(F.conv2d(x, w, b, padding=1), direct)
    e2 = _err(W.winograd_conv3x3(x, W.winograd_weight(w, 2), b), direct)
    e4 = _err(W.winograd_conv3x3(x, W.winograd_weight(w, 4), b), direct)
    assert e2 <= 1.5 * onednn and e4 <= 10 * onednn, (e2, e4, onednn)


@compiled
def test_thread_independent():
    x, _, u, b, r = _inputs(2, 64, 64, 23, 17, 4, True, True)
    x = x.contiguous(memory_format=torch.channels_last)
    assert_thread_independent(lambda: (W.winograd_conv3x3(x, u, b, act="relu", residual=r),))


_CAP_SCRIPT = r"""
import importlib, sys, torch, srkernels
W = importlib.import_module("srkernels.ops.winograd_conv3x3")  # the module: ops.<name> is the function
assert srkernels.build_info()["cpu_capability"] == sys.argv[1]
g = torch.Generator().manual_seed(0)
worst = 0.0
for (N, C, K, H, Wd) in [(1, 64, 64, 13, 11), (2, 5, 7, 9, 10), (1, 17, 33, 1, 1)]:
    x = torch.randn(N, C, H, Wd, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(K, C, 3, 3, generator=g) / (3 * C ** 0.5)
    b, r = torch.randn(K, generator=g), torch.randn(N, K, H, Wd, generator=g)
    for m in W.TILES:
        u = W.winograd_weight(w, m)
        y = W.winograd_conv3x3(x, u, b, act="relu", residual=r)
        ref = W.reference(x.double(), u.double(), b.double(), "relu", r.double())
        err = (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err <= {2: 2e-6, 4: 2e-5, 6: 4e-5}[m], (N, C, K, H, Wd, m, err)
        worst = max(worst, err)
        # bf16 storage: the same within one bf16 ulp of the reference's float32 arithmetic
        bf = lambda t: t.bfloat16()
        yb = W.winograd_conv3x3(bf(x), u, bf(b), act="relu", residual=bf(r)).float()
        rb = W.reference(bf(x), u, bf(b), "relu", bf(r)).float()
        assert ((yb - rb).abs() <= rb.abs() * 2 ** -7 + 1e-5).all(), (N, C, K, H, Wd, m, "bf16")
print("ok", worst)
"""


@compiled
def test_every_capability():
    check_every_capability(_CAP_SCRIPT)


@compiled
@pytest.mark.parametrize("m", W.TILES)
def test_opcheck(m):
    x, _, u, b, r = _inputs(2, 5, 6, 7, 6, m, True, True)
    for args in [(x, u, b, "relu", r), (x.contiguous(memory_format=torch.channels_last), u, None, "none", None)]:
        torch.library.opcheck(torch.ops.srkernels.winograd_conv3x3, args)


def test_gradient_runs_the_reference():
    # no autograd through the kernel: a call that needs a gradient takes the differentiable reference
    x, w, u, b, _ = _inputs(1, 4, 3, 5, 6, 4, True, False)
    x = x.double().requires_grad_(True)
    wd = w.double().requires_grad_(True)
    y = W.winograd_conv3x3(x.float(), W.winograd_weight(wd.float(), 4), b, act="relu")
    assert y.requires_grad
    y.sum().backward()
    x2, w2 = x.detach().requires_grad_(True), w.double().detach().requires_grad_(True)
    W.conv_reference(x2, w2, b.double(), "relu").sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wd.grad, w2.grad, rtol=1e-4, atol=1e-4)


@compiled
def test_reference_backend_forced():
    x, _, u, b, r = _inputs(1, 8, 8, 9, 7, 4, True, True)
    with use_backend("reference"):
        got = W.winograd_conv3x3(x, u, b, act="relu", residual=r)
    torch.testing.assert_close(got, W.winograd_conv3x3(x, u, b, act="relu", residual=r), rtol=1e-5, atol=1e-5)


def test_use_rule():
    assert W.winograd_use(64, 64, 48, 48, "avx512") and W.winograd_use(64, 64, 32, 32, "avx2")
    assert not W.winograd_use(64, 64, 48, 48, "default")
    assert not W.winograd_use(3, 64, 48, 48, "avx512") and not W.winograd_use(64, 64, 4, 4, "avx512")
    # fewer than 16 outputs: F(4,3) from 32-64 inputs on >= 32x32 pixels (a model's last conv at the HR size)
    for cap in ("avx2", "avx512"):
        assert W.winograd_use(64, 3, 192, 192, cap) and W.winograd_use(32, 1, 32, 32, cap)
        assert not W.winograd_use(16, 8, 32, 32, cap)  # 0.82x with AVX2
        assert not W.winograd_use(64, 3, 192, 192, cap, m=2)  # F(2,3): no gain measured
        assert not W.winograd_use(256, 1, 192, 192, cap)  # slower than oneDNN with AVX2
        assert not W.winograd_use(64, 3, 16, 16, cap)  # 0.92-0.95x with AVX2
        assert not W.winograd_use(64, 3, 192, 192, "default")


@compiled
def test_small_output_conv_routes_to_winograd_in_inference_only():
    """A 64 -> 8 conv at 32x32 runs F(4,3) in inference (`conv2d_pointwise`'s rule; 1-4 outputs go to
    direct_conv2d first) and matches F.conv2d; training keeps it on ATen (its 8 -> 64 input-gradient conv is
    outside the rule)."""
    import srkernels.nn as snn
    cp = importlib.import_module("srkernels.ops.conv2d_pointwise")
    if not W.vector_isa():
        pytest.skip("Winograd serves the avx2 and avx512 builds only")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 8, 3, padding=1)
    x = torch.randn(1, 64, 32, 32)
    meta = (conv.stride, conv.padding, conv.dilation, conv.groups)
    alg = cp.cpu_algorithm(x, conv.weight, *meta)
    assert isinstance(alg, cp.Winograd) and (alg.m, alg.r) == (4, 3)
    assert not isinstance(cp.cpu_algorithm(x, conv.weight, *meta, training=True), cp.Winograd)
    with torch.no_grad():
        y = snn.conv2d(conv, x)
    assert isinstance(conv.__dict__["_srk_last"].data[4][0], cp.Winograd)  # what the layer ran
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert _err(y, exact) <= TOL[4]


_x, _u = torch.randn(1, 4, 5, 5), W.winograd_weight(torch.randn(6, 4, 3, 3), 4)


@pytest.mark.parametrize("kw,exc,match", bad_input_cases(
    _x, _u, W.winograd_weight(torch.randn(6, 3, 3, 3), 4), (slice(0, 20), "weight_t must have 16 .* 36 .* or 64")))
def test_bad_input(kw, exc, match):
    check_bad_input(W.winograd_conv3x3, _x, _u, kw, exc, match)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(weight=torch.randn(6, 4, 5, 5)), ValueError, "weight must be \\[C_out, C_in, 3, 3\\]"),
        (dict(weight=torch.ones(6, 4, 3, 3, dtype=torch.int32)), TypeError, "weight must be floating"),
        (dict(weight=[1.0]), TypeError, "weight must be a torch.Tensor"),
        (dict(m=3), ValueError, "m must be one of"),
    ],
)
def test_bad_weight(kw, exc, match):
    args = dict(weight=torch.randn(6, 4, 3, 3), m=4) | kw
    with pytest.raises(exc, match=match):
        W.winograd_weight(**args)


@pytest.mark.parametrize("m", W.TILES)
def test_weight_step_is_the_float64_transform(m):
    """``winograd_weight_step`` (one float32 matmul, training) agrees with ``winograd_weight`` (float64, rounded
    once) to a few float32 ulps, also for the input-gradient conv (weight rotated 180 degrees, C_in <-> C_out),
    on a non-contiguous weight too; it records no autograd."""
    w = randn(24, 17, 3, 3, seed=3, scale=0.2).float().requires_grad_(True)
    for weight in (w, w.detach().contiguous(memory_format=torch.channels_last)):
        for grad_input, want in ((False, W.winograd_weight(weight.detach(), m)),
                                 (True, W.winograd_weight(weight.detach().flip(2, 3).transpose(0, 1), m))):
            got = W.winograd_weight_step(weight, m, grad_input=grad_input)
            assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
            assert not got.requires_grad
            assert (got - want).abs().max().item() <= 8 * torch.finfo(torch.float32).eps * want.abs().max().item()
    with pytest.raises(ValueError, match="m must be"):
        W.winograd_weight_step(w, 3)


@compiled
@pytest.mark.parametrize("m", W.TILES)
def test_grad_input_weight_runs_the_input_gradient(m):
    """The kernel on ``winograd_weight_step(w, m, grad_input=True)`` is the input gradient of the 3x3 conv
    (float64 ATen ``convolution_backward``), + a residual."""
    x, w, _, _, _ = _inputs(2, 20, 24, 9, 10, m, False, False)
    g = randn(2, 24, 9, 10, seed=11).float()
    r = randn(2, 20, 9, 10, seed=12).float()
    got = W.winograd_conv3x3(g, W.winograd_weight_step(w, m, grad_input=True), None, residual=r)
    want = torch.ops.aten.convolution_backward(g.double(), x.double(), w.double(), None, [1, 1], [1, 1], [1, 1],
                                               False, [0, 0], 1, [True, False, False])[0] + r.double()
    assert _err(got, want) <= TOL[m]


# ---- bfloat16 storage (float32 arithmetic) ----------------------------------------------------------------------

def _bf16_inputs(shape, m, bias, res, seed=0):
    """bf16 x, weight, bias, residual and the float32 transform of the bf16 weight (exact)."""
    x, w, _, b, r = _inputs(*shape, m, bias, res, seed)
    bf = (lambda t: None if t is None else t.bfloat16())
    x, w, b, r = bf(x), bf(w), bf(b), bf(r)
    return x, w, W.winograd_weight(w.float(), m), b, r


@compiled
@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_parity(shape, fmt, m):
    """bf16 in, bf16 out: against the reference (float32 arithmetic, one rounding) within one bf16 ulp, against
    float64 F.conv2d of the same bf16 tensors within a bf16 rounding; the layout and dtype of x are kept."""
    for i, (bias, act, res) in enumerate(EPILOGUES):
        x, w, u, b, r = _bf16_inputs(shape, m, bias, res, seed=10 * i)
        x = layout(x, fmt)
        y = W.winograd_conv3x3(x, u, b, act=act, residual=r)
        assert y.dtype == torch.bfloat16 and y.shape == (shape[0], shape[2], *shape[3:])
        if fmt == "channels_last" and min(shape[3:]) > 1:
            assert y.is_contiguous(memory_format=torch.channels_last)
        ref = W.reference(x, u, b, act, r)
        assert ref.dtype == torch.bfloat16
        # one bf16 ulp of |ref| (2^-7 relative), plus the float32 arithmetic's own difference near zero: the float32
        # parity bound TOL[m] (F(6,3)'s larger transform coefficients round more, the more so in the `default`
        # build, whose at::vec fmadd is a multiply and an add)
        atol = TOL[m] * max(1.0, ref.float().abs().max().item())
        assert ((y.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + atol).all()
        exact = W.conv_reference(x.double(), w.double(), None if b is None else b.double(), act,
                                 None if r is None else r.double())
        assert _err(y, exact) <= 2 ** -8 + TOL[m], (i, _err(y, exact))


@compiled
def test_bf16_float32_bias_and_opcheck():
    x, _, u, b, r = _bf16_inputs((2, 5, 6, 7, 6), 4, True, True)
    y = W.winograd_conv3x3(x, u, b.float(), act="relu", residual=r)  # a float32 bias is taken as is
    ref = W.reference(x, u, b.float(), "relu", r)
    assert ((y.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-5).all()
    for args in [(x, u, b, "relu", r), (x.contiguous(memory_format=torch.channels_last), u, b.float(), "none", None)]:
        torch.library.opcheck(torch.ops.srkernels.winograd_conv3x3, args)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(weight_t=_u.bfloat16()), TypeError, "weight_t must be float32 for a bfloat16 x"),
    (dict(residual=torch.randn(1, 6, 5, 5)), TypeError, "residual has dtype torch.float32"),
    (dict(bias=torch.randn(6).half()), TypeError, "bias has dtype torch.float16"),
], ids=["bf16 weight_t", "float32 residual", "fp16 bias"])
def test_bf16_bad_input(kw, exc, match):
    # a bf16 x takes a float32 weight_t (a bf16 transform would lose F(4,3)'s accuracy) and a bf16 residual
    check_bad_input(W.winograd_conv3x3, _x.bfloat16(), _u, kw, exc, match)


@compiled
def test_next_weight_prefetch_moves_no_value(monkeypatch):
    """The kernel prefetches the weight that followed this one last time (csrc/cpu/winograd.h predict_next):
    a chain of convs repeated, one of its weights freed and another allocated in its place between the passes,
    gives bit-identical results with the prefetch on (default) and off, each equal to the reference."""
    torch.manual_seed(0)
    x = torch.randn(1, 32, 13, 11).contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(32, 32, 3, 3) * 0.06 for _ in range(4)]
    us = [W.winograd_weight(w, 4) for w in ws]

    def chain():
        h = x
        for u in us:
            h = W.winograd_conv3x3(h, u, None, act="relu")
        return h

    outs = {}
    for setting in ("1", "0", None):
        if setting is None:
            monkeypatch.delenv("SRKERNELS_WINOGRAD_PREFETCH", raising=False)
        else:
            monkeypatch.setenv("SRKERNELS_WINOGRAD_PREFETCH", setting)
        first = chain()  # the kernel learns the sequence
        del us[2]  # a learned successor freed: the predictions now point at released memory
        us.insert(2, W.winograd_weight(ws[2], 4))
        outs[setting] = (first, chain(), chain())
    ref = x
    for w in ws:
        ref = W.reference(ref, W.winograd_weight(w, 4), None, "relu", None)
    for setting, ys in outs.items():
        for y in ys:
            assert torch.equal(y, outs["0"][0]), setting
    assert _err(outs[None][2], ref) <= TOL[4]



@compiled
@pytest.mark.parametrize("m", W.TILES)
def test_odd_position_strides_move_no_value(monkeypatch, m):
    """The blocks' transform positions an odd number of cache lines apart (csrc/cpu/winograd.h pos_stride) is a
    layout of the kernel's scratch only: bit-identical results with it on (default) and off, on the channel
    counts whose rows it pads (512 x 6 tiles: 192 lines; 20 channels: not a whole line per row), and the
    dense_block layers (their own calls of the same core)."""
    from srkernels.nn import ResidualDenseBlock

    rdb = ResidualDenseBlock(32, 32, 3).eval()
    xr = torch.randn(1, 32, 19, 13)
    cases = []
    for c_in, c_out, h, w in ((512, 64, 9, 23), (20, 36, 11, 7)):
        x, _, u, b, r = _inputs(1, c_in, c_out, h, w, m, True, True)
        cases.append((x.contiguous(memory_format=torch.channels_last), u, b, r))
    outs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("SRKERNELS_WINOGRAD_ODD_STRIDES", setting)
        with torch.no_grad():
            outs[setting] = [W.winograd_conv3x3(x, u, b, act="relu", residual=r) for x, u, b, r in cases]
            outs[setting].append(rdb(xr))
    for a, b in zip(outs["1"], outs["0"]):
        assert torch.equal(a, b)


# ---- upscale: the pixel shuffle in the store (an upsampler's conv + shuffle in one pass) ----

# (N, C_in, C_out, r, H, W): RCAN's 64 -> 256 stage, odd sizes, a channel count per sub-pixel that is not a multiple
# of the vector (36 / 9 = 4, 40 / 4 = 10: vectors straddling two sub-pixels), a 3x stage
UPSCALE = [(1, 64, 256, 2, 13, 11), (2, 16, 36, 3, 7, 9), (1, 24, 40, 2, 8, 5), (1, 32, 64, 2, 1, 3)]


@compiled
@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", UPSCALE, ids=str)
def test_upscale_is_conv_then_pixel_shuffle(shape, fmt, m):
    N, C, K, r, H, Wd = shape
    for i, (bias, act) in enumerate([(True, "relu"), (False, "none")]):
        x, w, _, b, _ = _inputs(N, C, K, H, Wd, m, bias, False, seed=7 * i)
        x = layout(x, fmt)
        o = W.shuffle_order(K, r)
        u, bo = W.winograd_weight(w[o], m), None if b is None else b[o]
        y = W.winograd_conv3x3(x, u, bo, act=act, upscale=r)
        assert y.shape == (N, K // (r * r), H * r, Wd * r)
        if fmt != "strided":
            assert y.is_contiguous(memory_format=torch.channels_last if fmt == "channels_last" else
                                   torch.contiguous_format)
        # bitwise the kernel without upscale, shuffled: the same sums, only the store moves
        plain = W.winograd_conv3x3(x, u, bo, act=act)
        assert torch.equal(y, W.subpixel_shuffle(plain, r))
        d = (lambda t: None if t is None else t.double())
        want = F.pixel_shuffle(W.conv_reference(x.double(), w.double(), d(b), act), r)
        assert _err(y, want) <= TOL[m], (shape, fmt, m, i)
        assert _err(y, W.reference(x.double(), u.double(), d(bo), act, None, r)) <= TOL[m]


@compiled
def test_upscale_bf16_and_opcheck():
    x, w, _, b, _ = _inputs(1, 64, 256, 9, 10, 4, True, False, seed=3)
    o = W.shuffle_order(256, 2)
    u = W.winograd_weight(w[o], 4)
    xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
    y = W.winograd_conv3x3(xb, u, b[o].bfloat16(), act="relu", upscale=2)
    plain = W.winograd_conv3x3(xb, u, b[o].bfloat16(), act="relu")
    assert y.dtype == torch.bfloat16 and torch.equal(y, W.subpixel_shuffle(plain, 2))
    for xi, bi in ((x, b[o]), (xb, b[o]), (layout(x, "strided"), None)):
        torch.library.opcheck(torch.ops.srkernels.winograd_conv3x3, (xi, u, bi, "relu", None, 2))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(upscale=0), ValueError, "upscale must be an int >= 1, got 0"),
    (dict(upscale=2.0), ValueError, "upscale must be an int >= 1, got 2.0"),
    (dict(upscale=3), ValueError, "upscale 3 needs C_out divisible by 9, got 16"),
    (dict(upscale=2, residual=torch.zeros(1, 16, 5, 6)), ValueError, "residual cannot be added with upscale > 1"),
])
def test_upscale_bad_input(kw, exc, match):
    x, w, u, b, _ = _inputs(1, 8, 16, 5, 6, 4, True, False)
    with pytest.raises(exc, match=match):
        W.winograd_conv3x3(x, u, b, **kw)


def test_shuffle_order_gives_torch_pixel_shuffle():
    # reference-level (no kernel): conv in shuffle_order, then subpixel_shuffle == torch.pixel_shuffle of the conv
    x, w, _, b, _ = _inputs(2, 5, 18, 4, 3, 2, True, False)
    o = W.shuffle_order(18, 3)
    y = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert torch.equal(W.subpixel_shuffle(y[:, o], 3), F.pixel_shuffle(y, 3))
