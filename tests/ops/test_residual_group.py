"""residual_group (CPU, float32 and bf16 storage, inference): RCAN's residual group -- n RCABs (conv, ReLU, conv,
channel attention, skip), a conv, the group's skip -- as one call on Winograd weights. The kernel against its
float64 torch reference on the same transformed weights (every conv F(m,3) in exact arithmetic), bf16 storage
against the reference's own bf16 rounding, every compiled capability, layouts, odd sizes and channel counts,
0-3 blocks, parameter dtypes and FC shapes, thread independence, opcheck, the gradient fallback, the forced
reference backend and argument errors."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from srkernels import _backend, use_backend
from srkernels.reference import functional as RF
RG = importlib.import_module("srkernels.ops.residual_group")  # the module: ops.<name> is the function
W = importlib.import_module("srkernels.ops.winograd_conv3x3")

from .._winograd import check_every_capability
from .._winograd import rel_err as _err
from ..conftest import layout
from ._parity import randn

compiled = pytest.mark.skipif(not _backend.has_compiled("residual_group", "cpu"),
                              reason="the compiled extension has no residual_group CPU kernel")
pytestmark = pytest.mark.usefixtures("one_thread")

# max |y - ref| <= TOL[m] * max(1, max |ref|) against the float64 reference on the same float32 weights: only the
# kernel's float32 arithmetic differs, but through 2n+1 chained convs. Measured on SHAPES and BIG (unit-scale x,
# conv weights ~ 1/(3 sqrt C), max |ref| ~ 5-7): F(2,3) 1.1e-7..2.9e-7, F(4,3) 2e-7..4e-6 (5.4e-6 for 3 blocks
# at 64 channels, 48x48, on another draw). winograd_conv3x3's bounds for one conv (2e-6 / 2e-5) hold for the
# whole group with >= 4x margin (F(4,3)'s transforms cost ~6x oneDNN's float32 error per conv: winograd_conv3x3).
TOL = {2: 2e-6, 4: 2e-5, 6: 4e-5}  # F(6,3) rounds ~2x F(4,3) (winograd6_use)
# bf16 storage against the reference run in bf16 (float32 arithmetic, every stored map rounded once, as the
# kernel): the two round the same float32 values unless their float32 arithmetic differs across a rounding
# boundary; one flipped rounding of a block's map then travels through the later convs. Measured: 0 (F(2,3) and
# small cases) up to 5.6e-3 relative to max |ref| (one ulp of a value near max |ref|: F(4,3), 3 blocks, 64
# channels). A bf16 ulp is at most 2^-7 of a value: 2 ulps of max |ref| is 2^-6.
TOL_BF16 = 2 ** -6
# bf16 storage against float64 (the same bf16 x, exact arithmetic): 3n + 1 stored maps (r, y, x_k per block, the
# output), each rounded by at most half an ulp (<= 2^-8 of the value), mostly averaged out by the convs that
# follow. Measured 1.8e-3..4.0e-3 (about one half-ulp of max |ref|); 2^-5 (8 half-ulp roundings at full weight)
# leaves ~8x.
TOL_BF16_EXACT = 2 ** -5

# (N, C, Cr, H, W, n): N 1 and 2; C 64 (RCAN), 24 and 20 (not multiples of 16: the kernel pads the output
# channels), 16, 8; hidden widths 4 (RCAN's 64 / 16), 3, 1, 5, 2; odd sizes, 8x8 (64 px, two F(4,3) tiles a side),
# fewer pixels than a tile; 0-3 blocks (0: the tail conv alone)
SHAPES = [(1, 64, 4, 13, 11, 3), (2, 24, 3, 9, 17, 2), (1, 16, 1, 12, 9, 1), (2, 20, 5, 8, 8, 0),
          (2, 8, 2, 3, 2, 2)]
BIG = (1, 64, 4, 48, 48, 3)  # one RCAN-sized case: many tiles per pool, the error of a deep chain


def _inputs(N, C, Cr, H, Wd, n, m, seed=0):
    """(x, weight_t, bias, fc_w1, fc_b1, fc_w2, fc_b2) in float32 from float64 draws: unit-scale x, conv weights
    ~ 1 / (3 sqrt C) (unit-scale outputs), FCs ~ 1 / sqrt(fan-in), biases ~ 0.1."""
    f = (lambda *s, seed, scale=1.0: randn(*s, seed=seed, scale=scale).float())
    x = f(N, C, H, Wd, seed=seed)
    us = [W.winograd_weight(f(C, C, 3, 3, seed=seed + 1 + i, scale=1 / (3 * C ** 0.5)), m) for i in range(2 * n + 1)]
    bs = [f(C, seed=seed + 100 + i, scale=0.1) for i in range(2 * n + 1)]
    w1 = [f(Cr, C, seed=seed + 200 + k, scale=C ** -0.5) for k in range(n)]
    b1 = [f(Cr, seed=seed + 300 + k, scale=0.1) for k in range(n)]
    w2 = [f(C, Cr, seed=seed + 400 + k, scale=Cr ** -0.5) for k in range(n)]
    b2 = [f(C, seed=seed + 500 + k, scale=0.1) for k in range(n)]
    return x, us, bs, w1, b1, w2, b2


def _double(args):
    return tuple([t.double() for t in a] if isinstance(a, list) else a.double() for a in args)


def _exact(args):
    """The float64 reference on the same values."""
    return RG.reference(*_double(args))


def _check_format(y, x, fmt):
    N, C, H, Wd = x.shape
    assert y.shape == x.shape
    if H * Wd > 1 and C > 1:  # otherwise both formats are dense
        if fmt == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        else:  # contiguous x, and a strided view (no memory format of its own: NCHW, as the fake says)
            assert y.is_contiguous()


@compiled
@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity(shape, fmt, m):
    args = _inputs(*shape, m, seed=sum(shape))
    x = layout(args[0], fmt)
    y = RG.residual_group(x, *args[1:])
    assert y.dtype == torch.float32
    _check_format(y, x, fmt)
    err = _err(y, _exact(args))
    assert err <= TOL[m], err


@compiled
@pytest.mark.parametrize("m", W.TILES)
def test_parity_rcan_size(m):
    args = _inputs(*BIG, m)
    x = args[0].contiguous(memory_format=torch.channels_last)
    y = RG.residual_group(x, *args[1:])
    _check_format(y, x, "channels_last")
    assert _err(y, _exact(args)) <= TOL[m]


@compiled
@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("shape", SHAPES + [BIG], ids=str)
def test_bf16_parity(shape, m):
    """bf16 storage: within 2 ulps of the reference's own bf16 rounding, and near the float64 result."""
    x, *p = _inputs(*shape, m, seed=sum(shape) + 1)
    xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
    y = RG.residual_group(xb, *p)
    assert y.dtype == torch.bfloat16
    _check_format(y, xb, "channels_last")
    assert _err(y, RG.reference(xb, *p).double()) <= TOL_BF16
    assert _err(y, _exact((xb, *p))) <= TOL_BF16_EXACT


def test_reference_is_the_layers():
    """The reference, in float64, is the layer-by-layer group: F.conv2d on the original weights, the attention
    as the channel_attention op's reference, + the skips."""
    N, C, Cr, H, Wd, n = 2, 6, 2, 7, 5, 2
    x = randn(N, C, H, Wd, seed=1)
    ws = [randn(C, C, 3, 3, seed=2 + i, scale=0.2) for i in range(2 * n + 1)]
    bs = [randn(C, seed=10 + i, scale=0.1) for i in range(2 * n + 1)]
    fc = [(randn(Cr, C, seed=20 + k), randn(Cr, seed=30 + k), randn(C, Cr, seed=40 + k), randn(C, seed=50 + k))
          for k in range(n)]
    h = x
    for k in range(n):
        r = F.relu(F.conv2d(h, ws[2 * k], bs[2 * k], padding=1))
        y = F.conv2d(r, ws[2 * k + 1], bs[2 * k + 1], padding=1)
        h = RF.channel_attention(y, *fc[k], residual=h)
    want = F.conv2d(h, ws[-1], bs[-1], padding=1) + x
    for m in W.TILES:
        got = RG.reference(x, [W.winograd_weight(w, m) for w in ws], bs, *([f[i] for f in fc] for i in range(4)))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@compiled
def test_param_dtypes():
    """Biases and FC parameters in x's dtype (bf16) run as float32 ones holding the same values: bitwise."""
    x, us, *p = _inputs(2, 24, 3, 9, 7, 2, 4, seed=3)
    xb = x.bfloat16()
    pb = [[t.bfloat16() for t in ts] for ts in p]
    got = RG.residual_group(xb, us, *pb)
    want = RG.residual_group(xb, us, *[[t.float() for t in ts] for ts in pb])
    assert torch.equal(got, want)
    # and a mix: bf16 biases, float32 FCs
    assert torch.equal(RG.residual_group(xb, us, pb[0], *[[t.float() for t in ts] for ts in pb[1:]]), want)


@compiled
def test_fc_as_1x1_conv_weights():
    """FC weights as nn.Conv2d 1x1 weights ([Cr, C, 1, 1], [C, Cr, 1, 1]) equal the matrices."""
    x, us, bs, w1, b1, w2, b2 = _inputs(1, 20, 5, 9, 11, 2, 4, seed=4)
    want = RG.residual_group(x, us, bs, w1, b1, w2, b2)
    w1c, w2c = [w[:, :, None, None] for w in w1], [w[:, :, None, None] for w in w2]
    assert torch.equal(RG.residual_group(x, us, bs, w1c, b1, w2c, b2), want)
    assert torch.equal(RG.residual_group(x, us, bs, [w1c[0], w1[1]], b1, w2, b2), want)  # mixed per block


@compiled
def test_empty_batch():
    x, *p = _inputs(2, 16, 2, 5, 6, 1, 4)
    for xe in (x[:0], x[:0].contiguous(memory_format=torch.channels_last)):
        assert RG.residual_group(xe, *p).shape == (0, 16, 5, 6)
        assert torch.ops.srkernels.residual_group(xe, *p).shape == (0, 16, 5, 6)


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 2])
def test_thread_independent(N, dtype):
    # pool partials are summed per tile in tile order: bitwise the same whatever the threads (the module runs on
    # one thread: set 2 here, restored after)
    x, *p = _inputs(N, 64, 4, 29, 23, 2, 4, seed=5)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    prev = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            runs.append(RG.residual_group(x, *p))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


_CAP_SCRIPT = r"""
import importlib, sys, torch, srkernels
RG = importlib.import_module("srkernels.ops.residual_group")
W = importlib.import_module("srkernels.ops.winograd_conv3x3")
assert srkernels.build_info()["cpu_capability"] == sys.argv[1]
g = torch.Generator().manual_seed(0)
rn = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale
worst = 0.0
for (N, C, Cr, H, Wd, n) in [(1, 64, 4, 13, 11, 2), (2, 20, 5, 9, 7, 1), (1, 8, 2, 3, 2, 0)]:
    for m in W.TILES:
        x = rn(N, C, H, Wd).contiguous(memory_format=torch.channels_last)
        us = [W.winograd_weight(rn(C, C, 3, 3, scale=1 / (3 * C ** 0.5)), m) for _ in range(2 * n + 1)]
        bs = [rn(C, scale=0.1) for _ in range(2 * n + 1)]
        p = ([rn(Cr, C, scale=C ** -0.5) for _ in range(n)], [rn(Cr, scale=0.1) for _ in range(n)],
             [rn(C, Cr, scale=Cr ** -0.5) for _ in range(n)], [rn(C, scale=0.1) for _ in range(n)])
        y = RG.residual_group(x, us, bs, *p)
        d = lambda a: [t.double() for t in a]
        ref = RG.reference(x.double(), d(us), d(bs), *map(d, p))
        err = (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err <= {2: 2e-6, 4: 2e-5, 6: 4e-5}[m], (N, C, Cr, H, Wd, n, m, err)
        worst = max(worst, err)
        yb, rb = RG.residual_group(x.bfloat16(), us, bs, *p).double(), RG.reference(x.bfloat16(), us, bs, *p).double()
        errb = (yb - rb).abs().max().item() / max(1.0, rb.abs().max().item())
        assert errb <= 2 ** -6, (N, C, Cr, H, Wd, n, m, "bf16", errb)
print("ok", worst)
"""


@compiled
def test_every_capability():
    check_every_capability(_CAP_SCRIPT)


@compiled
@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (0, 4)])
def test_opcheck(n, m):
    # schema, fake (shape and memory format of the output) and aot dispatch against the CPU kernel
    x, *p = _inputs(2, 20, 3, 7, 6, n, m, seed=6)
    for xi in (x, x.contiguous(memory_format=torch.channels_last), layout(x, "strided"), x.bfloat16()):
        torch.library.opcheck(torch.ops.srkernels.residual_group, (xi, *p))


@compiled
@pytest.mark.parametrize("which", ["x", "weight_t", "fc_w2"])
def test_gradient_runs_the_reference(which):
    # no autograd through the kernel: a call that needs a gradient takes the differentiable reference (float32
    # here), which agrees with the kernel's no-grad result and passes the gradient to the argument
    x, us, bs, w1, b1, w2, b2 = _inputs(1, 16, 2, 7, 9, 2, 4, seed=7)
    with torch.no_grad():
        want = RG.residual_group(x, us, bs, w1, b1, w2, b2)
    leaf = {"x": x, "weight_t": us[1], "fc_w2": w2[0]}[which].clone().requires_grad_(True)
    if which == "x":
        x = leaf
    elif which == "weight_t":
        us = [us[0], leaf, *us[2:]]
    else:
        w2 = [leaf, *w2[1:]]
    y = RG.residual_group(x, us, bs, w1, b1, w2, b2)
    assert y.requires_grad
    assert _err(y.detach(), want.double()) <= TOL[4]
    y.square().sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_gradcheck():
    # float64 runs the reference: its gradients against finite differences (ReLU's kinks: random values rarely
    # land within eps of 0)
    x, us, bs, w1, b1, w2, b2 = _double(_inputs(1, 4, 1, 5, 5, 1, 2, seed=8))
    x = x.requires_grad_(True)
    u = [t.requires_grad_(True) for t in us]

    def fn(x, u0, u1, u2):
        return RG.residual_group(x, [u0, u1, u2], bs, w1, b1, w2, b2)
    assert torch.autograd.gradcheck(fn, (x, *u), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_float64_params_stay_float64():
    x, us, bs, w1, b1, w2, b2 = _double(_inputs(1, 4, 1, 5, 5, 1, 2, seed=9))
    # values float32 cannot hold
    bs, b1 = [b + 1e-3 * torch.pi for b in bs], [b + 1e-3 * torch.e for b in b1]
    args = (x, us, bs, w1, b1, w2, b2)
    torch.testing.assert_close(RG.residual_group(*args), RG.reference(*args), rtol=1e-12, atol=1e-12)
    b = bs[0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b: RG.residual_group(x, us, [b, *bs[1:]], w1, b1, w2, b2), (b,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@compiled
def test_reference_backend_forced():
    args = _inputs(1, 24, 3, 9, 7, 2, 4, seed=10)
    with use_backend("reference"):
        got = RG.residual_group(*args)
    with use_backend("compiled"):
        kernel = RG.residual_group(*args)
    assert torch.equal(got, RG.reference(*args))  # the float32 reference ran...
    assert not torch.equal(got, kernel)  # ...not the kernel (F(4,3) sums in another order)
    assert _err(got, _exact(args)) <= TOL[4] and _err(kernel, _exact(args)) <= TOL[4]
    assert torch.equal(RG.residual_group(*args), kernel)  # the default: the kernel


_x, _us, _bs, _w1, _b1, _w2, _b2 = _inputs(1, 8, 2, 5, 5, 1, 4, seed=11)
_u2 = W.winograd_weight(torch.randn(8, 8, 3, 3), 2)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=_x[0]), ValueError, "x must be 4-D"),
    (dict(x=_x.long()), TypeError, "x must be a floating"),
    (dict(x=_x.half()), TypeError, "x must be float32 or bfloat16"),
    (dict(x=_x[:, :0]), ValueError, "x must have non-empty C"),
    (dict(weight_t=_us[0]), TypeError, "weight_t must be a list of tensors"),
    (dict(fc_w1=[1.0]), TypeError, "fc_w1\\[0\\] must be a torch.Tensor, got float"),
    (dict(weight_t=_us[:2]), ValueError, "weight_t must have 3 entries \\(2 per block and the last conv: 2 \\* 1 "
                                         "\\+ 1\\), got 2"),
    (dict(bias=_bs * 2), ValueError, "bias must have 3 entries .*, got 6"),
    (dict(fc_b1=[]), ValueError, "fc_b1 must have 1 entries \\(one per block: 1, as fc_w1\\), got 0"),
    (dict(fc_w2=_w2 * 2), ValueError, "fc_w2 must have 1 entries .*, got 2"),
    (dict(weight_t=[_us[0], _us[1][:25], _us[2]]), ValueError,
     "weight_t\\[1\\] must be \\[16, 36 or 64, C, C\\] .*got shape \\[25, 8, 8\\]"),
    (dict(fc_w1=[_w1[0][:, :, None]]), ValueError, "fc_w1\\[0\\] must be \\[Cr, C\\] or \\[Cr, C, 1, 1\\], got shape "
                                                 "\\[2, 8, 1\\]"),
    (dict(weight_t=[_us[0], _u2, _us[2]]), ValueError, "weight_t must share one tile size, got tiles \\[2, 4\\]"),
    (dict(weight_t=[_us[0][0], *_us[1:]]), ValueError, "weight_t\\[0\\] must be \\[16, 36 or 64, C, C\\]"),
    (dict(weight_t=[*_us[:2], _us[2][:, :6]]), ValueError, "weight_t\\[2\\] must map x's 8 channels to 8"),
    (dict(weight_t=[*_us[:2], _us[2][:, :, :6]]), ValueError, "weight_t\\[2\\] must map x's 8 channels to 8"),
    (dict(weight_t=[u.double() for u in _us]), TypeError, "weight_t\\[0\\] has dtype torch.float64 but must be"),
    (dict(bias=[_bs[0], _bs[1][:7], _bs[2]]), ValueError, "bias\\[1\\] must have shape \\[8\\]"),
    (dict(bias=[b.double() for b in _bs]), TypeError, "bias\\[0\\] has dtype torch.float64"),
    (dict(bias=[b.bfloat16() for b in _bs]), TypeError, "bias\\[0\\] has dtype torch.bfloat16"),
    (dict(fc_w1=[_w1[0][:, :7]]), ValueError, "fc_w1\\[0\\] must have shape \\[2, 8\\] or \\[2, 8, 1, 1\\]"),
    (dict(fc_w1=[_w1[0][:0]]), ValueError, "fc_w1\\[0\\] has 0 rows"),
    (dict(fc_b1=[torch.randn(3)]), ValueError, "fc_b1\\[0\\] must have shape \\[2\\]"),
    (dict(fc_w2=[torch.randn(8, 3)]), ValueError, "fc_w2\\[0\\] must have shape \\[8, 2\\] or \\[8, 2, 1, 1\\]"),
    (dict(fc_b2=[torch.randn(7)]), ValueError, "fc_b2\\[0\\] must have shape \\[8\\]"),
    (dict(x=_x.to("meta")), ValueError, "weight_t\\[0\\] is on cpu but x is on meta"),
    (dict(fc_b2=[_b2[0].to("meta")]), ValueError, "fc_b2\\[0\\] is on meta but x is on cpu"),
    # bf16 x: the transformed weights stay float32 (bf16 storage, float32 arithmetic)
    (dict(x=_x.bfloat16(), weight_t=[u.bfloat16() for u in _us]), TypeError,
     "weight_t\\[0\\] has dtype torch.bfloat16 but must be torch.float32"),
])
def test_bad_input(kw, exc, match):
    args = dict(x=_x, weight_t=_us, bias=_bs, fc_w1=_w1, fc_b1=_b1, fc_w2=_w2, fc_b2=_b2) | kw
    with pytest.raises(exc, match=match):
        RG.residual_group(**args)


@compiled
@pytest.mark.parametrize("kw,match", [
    (dict(bias=[b.bfloat16() for b in _bs]), "bias\\[0\\] must be a float32 CPU tensor of shape \\[8\\]"),
    (dict(fc_w1=[_w1[0][:, :, None, None]]), "fc_w1\\[0\\] must be a float32 CPU tensor of shape \\[2, 8\\]"),
    (dict(fc_b1=[]), "one entry per block"),
    (dict(weight_t=[_us[0], _u2, _us[2]]), "weight_t\\[1\\] must be a float32 CPU tensor of shape \\[36, 8, 8\\]"),
])
def test_kernel_checks(kw, match):
    # the dispatcher op itself (no front end: float32 parameters, FC matrices) refuses what it cannot run
    args = dict(x=_x, weight_t=_us, bias=_bs, fc_w1=_w1, fc_b1=_b1, fc_w2=_w2, fc_b2=_b2) | kw
    with pytest.raises(RuntimeError, match=match):
        torch.ops.srkernels.residual_group(*args.values())


@compiled
def test_autocast_runs_float32_like_the_dispatcher_op():
    """The op's autocast rule is float32 (as winograd_conv3x3): under CPU autocast the front end casts as the
    dispatcher op's autocast kernel does, so both give the float32 result, also for bf16 parameters."""
    x, us, bs, w1, b1, w2, b2 = _inputs(1, 16, 2, 9, 8, 1, 4, seed=12)
    want = RG.residual_group(x, us, bs, w1, b1, w2, b2)
    bf = (lambda ts: [t.bfloat16().float() for t in ts])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        front = RG.residual_group(x.bfloat16(), us, [b.bfloat16() for b in bs], w1, b1, w2, b2)
        op = torch.ops.srkernels.residual_group(x.bfloat16(), us, bs, w1, b1, w2, b2)
    assert front.dtype == op.dtype == torch.float32
    assert torch.equal(op, RG.residual_group(x.bfloat16().float(), us, bs, w1, b1, w2, b2))
    assert torch.equal(front, RG.residual_group(x.bfloat16().float(), us, bf(bs), w1, b1, w2, b2))
    assert (front - want).abs().max() <= 0.05 * want.abs().max()  # x rounded to bf16 on the way in
