"""The CUDA kernels of csrc/cuda, run by the CPU emulator (docs/cuda_emulation.md), against the CPU kernels
(torch.ops.srkernels.* on CPU tensors) and the float64 reference, on shapes that reach every chunk, merge and
grid-loop branch of the host code (the case names say which branch; test_branches_reached checks the launch
log). Inputs are finite: the NaN/Inf conventions are tested on CPU (tests/ops) and may differ here."""
from __future__ import annotations

import pytest
import torch

import srkernels  # noqa: F401  (registers torch.ops.srkernels)
from srkernels.reference import functional as RF

from ..conftest import assert_close
from .emu import load

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CL = torch.channels_last


@pytest.fixture(scope="module")
def emu():
    m = load()
    m.set_schedule(threads=0, blocks=0)
    m.set_limits()
    yield m
    m.set_schedule(threads=0, blocks=0)
    m.set_limits()


@pytest.fixture
def limits(emu):
    """Shrunk host limits for one test (restored afterwards)."""
    def set_(**kw):
        emu.set_limits(**kw)
    yield set_
    emu.set_limits()


def rnd(*shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def fmt(t, nhwc):
    return t.contiguous(memory_format=CL) if nhwc else t.contiguous()


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values, sizes and strides, starting one element past a 16-byte boundary."""
    base = torch.empty(t.numel() + 16, dtype=t.dtype)
    off = 1 if base.data_ptr() % 16 == 0 else 0
    v = base[off:].as_strided(t.shape, t.stride())
    v.copy_(t)
    assert v.data_ptr() % 16 != 0
    return v


def close_all(got, want, dtype, what):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if b.numel() == 0 and a.numel() == 0:
            continue
        # saved statistics are in the accumulation dtype; judge them with the input dtype's tolerance
        assert_close(a, b, dtype, f"{what}[{i}]")


def bitwise(got, want, what):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and torch.equal(a, b), f"{what}[{i}] differs bitwise"


# ---------------------------------------------------------------------------------------------------------
# channel_attention

# (name, N, C, H, W, Cr, nhwc): which host/kernel branch each shape reaches is in its name.
CA_SHAPES = [
    ("nchw-vec", 2, 8, 6, 8, 2, False),           # HW % 8 == 0: V = 16 / sizeof
    ("nchw-scalar", 2, 5, 5, 7, 2, False),        # HW odd: V = 1
    ("nchw-multichunk-v1", 1, 3, 33, 34, 2, False),  # HW/V = 1122 > 1024 vectors: S = 2 chunks + merge
    ("nchw-multichunk-vec", 1, 2, 96, 96, 1, False),  # 9216 / V > 1024 for V = 4 and 8
    ("mlp-loops", 1, 300, 2, 3, 10, False),       # C > 256 threads, Cr > 8 warps
    ("nhwc-vec", 2, 8, 6, 8, 2, True),
    ("nhwc-2tiles", 1, 41, 5, 5, 3, True),        # C/V = 41 > 32: CT = 2 channel tiles
    ("nhwc-multichunk", 1, 4, 40, 40, 2, True),   # 1600 pixels > 1024 per chunk: S = 2
]


def ca_inputs(N, C, H, W, Cr, nhwc, dtype, *, prelu=False, bias=True, residual=True, seed=0):
    x = fmt(rnd(N, C, H, W, seed=seed, dtype=dtype) + rnd(1, C, 1, 1, seed=seed + 9, dtype=dtype), nhwc)
    return dict(
        x=x, w1=rnd(Cr, C, seed=seed + 1, scale=C**-0.5, dtype=dtype),
        b1=rnd(Cr, seed=seed + 2, scale=0.1, dtype=dtype) if bias else None,
        w2=rnd(C, Cr, seed=seed + 3, scale=Cr**-0.5, dtype=dtype),
        b2=rnd(C, seed=seed + 4, scale=0.1, dtype=dtype) if bias else None,
        residual=fmt(rnd(N, C, H, W, seed=seed + 5, dtype=dtype), nhwc) if residual else None,
        act_weight=(rnd(Cr, seed=seed + 6, scale=0.1, dtype=dtype) + 0.25) if prelu else None)


def ca_args(a, pool):
    return (a["x"], a["w1"], a["b1"], a["w2"], a["b2"], a["residual"], a["act_weight"], pool)


def ca_ref(a, pool):
    d = {k: (v.double() if v is not None else None) for k, v in a.items()}
    return RF.channel_attention(d["x"], d["w1"], d["b1"], d["w2"], d["b2"], residual=d["residual"],
                                act="prelu" if d["act_weight"] is not None else "relu", act_weight=d["act_weight"],
                                pool=pool)


def ca_backward_args(go, a, stats, pool):
    return (go, a["x"], stats, a["w1"], a["b1"], a["w2"], a["b2"], a["act_weight"], pool)


# The MLP-loop branch does not depend on the dtype: float32 only (not generated for the others, not skipped).
CA_CASES = [pytest.param(shape, dtype, id=f"{shape[0]}-{dtype}") for shape in CA_SHAPES for dtype in DTYPES
            if dtype == torch.float32 or shape[0] != "mlp-loops"]


@pytest.mark.parametrize("pool", ["avg", "avg+std"])
@pytest.mark.parametrize("shape, dtype", CA_CASES)
def test_channel_attention(emu, shape, dtype, pool):
    _, N, C, H, W, Cr, nhwc = shape
    a = ca_inputs(N, C, H, W, Cr, nhwc, dtype, prelu=pool == "avg+std")
    out, stats = emu.channel_attention(*ca_args(a, pool))
    cout, cstats = torch.ops.srkernels.channel_attention(*ca_args(a, pool))
    assert out.is_contiguous(memory_format=CL if nhwc else torch.contiguous_format)
    close_all((out, stats), (cout, cstats), dtype, "forward vs CPU kernel")
    assert_close(out, ca_ref(a, pool), dtype, "forward vs reference")

    go = fmt(rnd(N, C, H, W, seed=11, dtype=dtype), nhwc)
    g = emu.channel_attention_backward(*ca_backward_args(go, a, stats, pool))
    cg = torch.ops.srkernels.channel_attention_backward(*ca_backward_args(go, a, cstats, pool))
    close_all(g, cg, dtype, "backward vs CPU kernel")

    o = torch.empty_like(out)
    emu.channel_attention_out(*ca_args(a, pool), o)
    bitwise(o, out, "channel_attention_out vs plain call")


def test_channel_attention_backward_vs_reference(emu):
    """grad_x and the weight gradients against float64 autograd of the reference (float32, both pools)."""
    for pool, shape in (("avg", CA_SHAPES[1]), ("avg+std", CA_SHAPES[6])):
        _, N, C, H, W, Cr, nhwc = shape
        a = ca_inputs(N, C, H, W, Cr, nhwc, torch.float32, prelu=True)
        out, stats = emu.channel_attention(*ca_args(a, pool))
        go = fmt(rnd(N, C, H, W, seed=12), nhwc)
        gx, gw1, gb1, gw2, gb2, gact = emu.channel_attention_backward(*ca_backward_args(go, a, stats, pool))
        d = {k: (v.double().requires_grad_(k != "residual") if v is not None else None) for k, v in a.items()}
        ref = RF.channel_attention(d["x"], d["w1"], d["b1"], d["w2"], d["b2"], residual=d["residual"],
                                   act="prelu", act_weight=d["act_weight"], pool=pool)
        ref.backward(go.double())
        for got, k in ((gx, "x"), (gw1, "w1"), (gb1, "b1"), (gw2, "w2"), (gb2, "b2"), (gact, "act_weight")):
            assert_close(got, d[k].grad, torch.float32, f"{pool} grad {k}")


# ---------------------------------------------------------------------------------------------------------
# balanced_attention

BAM_SHAPES = [
    ("nchw-vec", 2, 8, 6, 8, 2, 7, False),
    ("nchw-scalar", 2, 5, 5, 7, 2, 3, False),
    ("nchw-2tiles-3warps", 1, 3, 20, 20, 1, 7, False),  # HW > 256: S = 2 pixel tiles; C = 3 < 8 warps
    ("wsa-2chunks-K9", 1, 2, 48, 48, 1, 9, False),       # N*HW > 2048: 2 grad_w_sa chunks; K = 9: 2 tap groups
    ("nhwc-vec", 2, 8, 6, 8, 2, 7, True),
    ("nhwc-2tiles", 1, 41, 5, 5, 3, 3, True),            # CT = 2: max_merge_kernel, 2 pixel partials
    ("nhwc-multichunk", 1, 4, 40, 40, 2, 5, True),
]


def bam_inputs(N, C, H, W, Cr, K, nhwc, dtype, residual=True, seed=0):
    return dict(
        x=fmt(rnd(N, C, H, W, seed=seed, dtype=dtype), nhwc), w1=rnd(Cr, C, seed=seed + 1, scale=C**-0.5, dtype=dtype),
        prelu_w=rnd(Cr, seed=seed + 2, scale=0.1, dtype=dtype) + 0.25,
        w2=rnd(C, Cr, seed=seed + 3, scale=Cr**-0.5, dtype=dtype), w_sa=rnd(K, K, seed=seed + 4, scale=0.2, dtype=dtype),
        residual=fmt(rnd(N, C, H, W, seed=seed + 5, dtype=dtype), nhwc) if residual else None)


def bam_args(a):
    return (a["x"], a["w1"], a["prelu_w"], a["w2"], a["w_sa"], a["residual"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BAM_SHAPES, ids=[s[0] for s in BAM_SHAPES])
def test_balanced_attention(emu, shape, dtype):
    _, N, C, H, W, Cr, K, nhwc = shape
    a = bam_inputs(N, C, H, W, Cr, K, nhwc, dtype)
    out, mean, maxmap = emu.balanced_attention(*bam_args(a))
    ref = torch.ops.srkernels.balanced_attention(*bam_args(a))
    close_all((out, mean, maxmap), ref, dtype, "forward vs CPU kernel")
    d = {k: v.double() for k, v in a.items()}
    assert_close(out, RF.balanced_attention(d["x"], d["w1"], d["prelu_w"], d["w2"], d["w_sa"], residual=d["residual"]),
                 dtype, "forward vs reference")

    go = fmt(rnd(N, C, H, W, seed=11, dtype=dtype), nhwc)
    g = emu.balanced_attention_backward(go, a["x"], mean, maxmap, a["w1"], a["prelu_w"], a["w2"], a["w_sa"])
    cg = torch.ops.srkernels.balanced_attention_backward(go, a["x"], ref[1], ref[2], a["w1"], a["prelu_w"], a["w2"],
                                                         a["w_sa"])
    close_all(g, cg, dtype, "backward vs CPU kernel")

    o = torch.empty_like(out)
    emu.balanced_attention_out(*bam_args(a), o)
    bitwise(o, out, "balanced_attention_out vs plain call")


# ---------------------------------------------------------------------------------------------------------
# pixel_shuffle / pixel_unshuffle

PS_SHAPES = [  # (name, N, Cin, H, W, r, nhwc)
    ("nchw", 2, 8, 3, 5, 2, False),
    ("nchw-bwd-multichunk-v1", 1, 4, 33, 33, 2, False),   # HW = 1089 > 1024 vectors: S = 2
    ("nchw-bwd-multichunk-vec", 1, 4, 64, 72, 2, False),  # HW/V > 1024 for V = 4
    ("nchw-r3", 1, 18, 4, 4, 3, False),
    ("nhwc", 2, 8, 3, 5, 2, True),
    ("nhwc-bwd-multichunk", 1, 8, 40, 40, 2, True),       # 1600 pixels, 512 per chunk: S = 4
    ("nhwc-2tiles", 1, 36, 3, 3, 3, True),                # Cin/V = 36 > 32 (fp32/fp16: V = 4/2... V=1 when odd)
]


def ps_inputs(shape, dtype, act):
    """(forward args, backward args) of pixel_shuffle for one PS_SHAPES case."""
    _, N, Cin, H, W, r, nhwc = shape
    C = Cin // (r * r)
    x = fmt(rnd(N, Cin, H, W, seed=0, dtype=dtype), nhwc)
    bias = rnd(Cin, seed=1, scale=0.1, dtype=dtype)
    aw = rnd(C, seed=2, scale=0.1, dtype=dtype) + 0.25 if act == "prelu" else None
    res = fmt(rnd(N, C, H * r, W * r, seed=3, dtype=dtype), nhwc)
    go = fmt(rnd(N, C, H * r, W * r, seed=4, dtype=dtype), nhwc)
    return (x, r, bias, aw, act, res), (go, x, r, bias, aw, act)


@pytest.mark.parametrize("act", ["none", "relu", "prelu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PS_SHAPES, ids=[s[0] for s in PS_SHAPES])
def test_pixel_shuffle(emu, shape, dtype, act):
    args, bargs = ps_inputs(shape, dtype, act)
    x, r, bias, aw, _, res = args
    out = emu.pixel_shuffle(*args)
    close_all(out, torch.ops.srkernels.pixel_shuffle(*args), dtype, "forward vs CPU kernel")
    ref = RF.pixel_shuffle(x.double(), r, bias=bias.double(), act=None if act == "none" else act,
                           act_weight=None if aw is None else aw.double(), residual=res.double())
    assert_close(out, ref, dtype, "forward vs reference")

    close_all(emu.pixel_shuffle_backward(*bargs), torch.ops.srkernels.pixel_shuffle_backward(*bargs), dtype,
              "backward vs CPU kernel")
    o = torch.empty_like(out)
    emu.pixel_shuffle_out(*args, o)
    bitwise(o, out, "pixel_shuffle_out vs plain call")
    if act == "none":
        bitwise(emu.pixel_unshuffle(out, r), torch.ops.srkernels.pixel_unshuffle(out, r), "pixel_unshuffle")


# ---------------------------------------------------------------------------------------------------------
# Branches that need larger tensors than a test should allocate: reached with shrunk host limits.

def test_grid_y_loops(emu, limits):
    """gridDim.y capped at 3 (65535 on a GPU): every kernel that loops over planes/samples beyond grid.y."""
    limits(max_grid_y=3)
    for nhwc in (False, True):
        a = ca_inputs(5, 8, 4, 6, 2, nhwc, torch.float32)
        out, st = emu.channel_attention(*ca_args(a, "avg+std"))
        close_all((out, st), torch.ops.srkernels.channel_attention(*ca_args(a, "avg+std")), torch.float32, "ca")
        go = fmt(rnd(5, 8, 4, 6, seed=3), nhwc)
        close_all(emu.channel_attention_backward(*ca_backward_args(go, a, st, "avg+std")),
                  torch.ops.srkernels.channel_attention_backward(*ca_backward_args(go, a, st, "avg+std")),
                  torch.float32, "ca backward")
        b = bam_inputs(5, 8, 4, 6, 2, 3, nhwc, torch.float32)
        o, mean, mm = emu.balanced_attention(*bam_args(b))
        close_all((o, mean, mm), torch.ops.srkernels.balanced_attention(*bam_args(b)), torch.float32, "bam")
        bb = (go, b["x"], mean, mm, b["w1"], b["prelu_w"], b["w2"], b["w_sa"])
        close_all(emu.balanced_attention_backward(*bb), torch.ops.srkernels.balanced_attention_backward(*bb),
                  torch.float32, "bam backward")
        x = fmt(rnd(5, 8, 3, 5, seed=4), nhwc)
        go2 = fmt(rnd(5, 2, 6, 10, seed=5), nhwc)
        pa = (go2, x, 2, rnd(8, seed=6), rnd(2, seed=7) * 0.1 + 0.25, "prelu")
        close_all(emu.pixel_shuffle_backward(*pa), torch.ops.srkernels.pixel_shuffle_backward(*pa), torch.float32,
                  "ps backward")
    assert any(l[1][1] == 3 for l in emu.launches()), "no launch used the capped grid.y"


def test_nhwc_chunk_cap_and_wide_merge(emu, limits):
    """NHWC chunk cap (iters grow so that S <= chunks per sample: 2 here, 1024 on a GPU), and the merge kernel's
    lane loop over more than 32 chunks (S = 34, the Welford merge of several chunks per lane)."""
    limits(chunks_per_sample=2)
    a = ca_inputs(1, 4, 50, 60, 2, True, torch.float32)
    emu.clear_launches()
    out, st = emu.channel_attention(*ca_args(a, "avg+std"))
    close_all((out, st), torch.ops.srkernels.channel_attention(*ca_args(a, "avg+std")), torch.float32, "capped")
    red = [l for l in emu.launches() if l[0].startswith("reduce_nhwc_kernel")]
    assert red and red[0][1][0] == 2, red  # 3000 pixels in 2 chunks (iters = 6 > kMinIters)
    limits()
    a = ca_inputs(1, 1, 185, 185, 1, False, torch.float32)
    emu.clear_launches()
    out, st = emu.channel_attention(*ca_args(a, "avg+std"))
    close_all((out, st), torch.ops.srkernels.channel_attention(*ca_args(a, "avg+std")), torch.float32, "wide merge")
    red = [l for l in emu.launches() if l[0].startswith("ca_reduce_nchw_kernel")]
    assert red and red[0][1][0] == 34, red


def test_branches_reached(emu):
    """The shapes above reach the multi-chunk reductions (launch log), so the parametrised tests cover them."""
    emu.clear_launches()
    _, N, C, H, W, Cr, nhwc = CA_SHAPES[3]
    emu.channel_attention(*ca_args(ca_inputs(N, C, H, W, Cr, nhwc, torch.bfloat16), "avg+std"))
    _, N, C, H, W, Cr, nhwc = CA_SHAPES[7]
    emu.channel_attention(*ca_args(ca_inputs(N, C, H, W, Cr, nhwc, torch.float32), "avg"))
    _, N, Cin, H, W, r, nhwc = PS_SHAPES[2]
    emu.pixel_shuffle_backward(rnd(N, Cin // 4, H * 2, W * 2, seed=0), rnd(N, Cin, H, W, seed=1), 2,
                               rnd(Cin, seed=2), None, "relu")
    log = emu.launches()
    nchw = [l for l in log if l[0].startswith("ca_reduce_nchw_kernel")]
    nhwc_ = [l for l in log if l[0].startswith("reduce_nhwc_kernel")]
    ps = [l for l in log if l[0].startswith("ps_bwd_nchw_kernel")]
    assert nchw[0][1][0] >= 2 and nhwc_[0][1][0] >= 2 and ps[0][1][0] >= 2, (nchw, nhwc_, ps)


# ---------------------------------------------------------------------------------------------------------
# Schedules: every kernel's result is independent of the order threads and blocks run in.

SCHEDULES = [(1, 1), (2, 2), (3, 0), (7, 5)]  # (threads, blocks): see cuda_emu.h Schedule


@pytest.mark.parametrize("sched", SCHEDULES, ids=[f"t{t}-b{b}" for t, b in SCHEDULES])
def test_schedule_independent(emu, sched):
    def run():
        res = []
        for nhwc in (False, True):
            a = ca_inputs(2, 8, 6, 8, 2, nhwc, torch.float32, prelu=True)
            out, st = emu.channel_attention(*ca_args(a, "avg+std"))
            go = fmt(rnd(2, 8, 6, 8, seed=3), nhwc)
            res += [out, st, *emu.channel_attention_backward(*ca_backward_args(go, a, st, "avg+std"))]
            b = bam_inputs(1, 41, 5, 5, 3, 3, nhwc, torch.bfloat16)
            o, mean, mm = emu.balanced_attention(*bam_args(b))
            go = fmt(rnd(1, 41, 5, 5, seed=3, dtype=torch.bfloat16), nhwc)
            res += [o, mean, mm, *emu.balanced_attention_backward(go, b["x"], mean, mm, b["w1"], b["prelu_w"],
                                                                  b["w2"], b["w_sa"])]
            x = fmt(rnd(1, 8, 40, 40, seed=4), nhwc)
            res += list(emu.pixel_shuffle_backward(fmt(rnd(1, 2, 80, 80, seed=5), nhwc), x, 2, rnd(8, seed=6),
                                                   rnd(2, seed=7) * 0.1 + 0.25, "prelu"))
        return res

    emu.set_schedule(threads=0, blocks=0)
    base = run()
    emu.set_schedule(threads=sched[0], blocks=sched[1])
    try:
        other = run()
    finally:
        emu.set_schedule(threads=0, blocks=0)
    bitwise(other, base, f"schedule {sched}")


# ---------------------------------------------------------------------------------------------------------
# Issue #14 fix 4: the vector width (and so the summation order) must not depend on where a buffer starts.

@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_alignment_does_not_change_bits(emu, nhwc):
    a = ca_inputs(2, 8, 6, 8, 2, nhwc, torch.float32)
    plain = emu.channel_attention(*ca_args(a, "avg+std"))
    for name in ("residual", "x"):
        b = dict(a, **{name: misaligned(a[name])})
        bitwise(emu.channel_attention(*ca_args(b, "avg+std")), plain, f"channel_attention, misaligned {name}")
    o = misaligned(torch.empty_like(a["x"]))
    emu.channel_attention_out(*ca_args(a, "avg+std"), o)
    bitwise(o, plain[0], "channel_attention_out, misaligned out")
    go = fmt(rnd(2, 8, 6, 8, seed=3), nhwc)
    gplain = emu.channel_attention_backward(*ca_backward_args(go, a, plain[1], "avg+std"))
    bitwise(emu.channel_attention_backward(*ca_backward_args(misaligned(go), a, plain[1], "avg+std")), gplain,
            "channel_attention_backward, misaligned grad_out")

    b = bam_inputs(2, 8, 6, 8, 2, 3, nhwc, torch.float32)
    plain = emu.balanced_attention(*bam_args(b))
    for name in ("residual", "x"):
        c = dict(b, **{name: misaligned(b[name])})
        bitwise(emu.balanced_attention(*bam_args(c)), plain, f"balanced_attention, misaligned {name}")
    o = misaligned(torch.empty_like(b["x"]))
    emu.balanced_attention_out(*bam_args(b), o)
    bitwise(o, plain[0], "balanced_attention_out, misaligned out")
    bargs = lambda g, x: (g, x, plain[1], plain[2], b["w1"], b["prelu_w"], b["w2"], b["w_sa"])  # noqa: E731
    gplain = emu.balanced_attention_backward(*bargs(go, b["x"]))
    bitwise(emu.balanced_attention_backward(*bargs(misaligned(go), b["x"])), gplain,
            "balanced_attention_backward, misaligned grad_out")
    bitwise(emu.balanced_attention_backward(*bargs(go, misaligned(b["x"]))), gplain,
            "balanced_attention_backward, misaligned x")

    x = fmt(rnd(1, 8, 8, 8, seed=4), nhwc)
    pargs = lambda xx: (fmt(rnd(1, 2, 16, 16, seed=5), nhwc), xx, 2, rnd(8, seed=6), None, "relu")  # noqa: E731
    bitwise(emu.pixel_shuffle_backward(*pargs(misaligned(x))), emu.pixel_shuffle_backward(*pargs(x)),
            "pixel_shuffle_backward, misaligned x")


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_out_aliasing_and_format(emu, nhwc):
    """*_out with out == residual, and out in the other memory format: the plain call's bits."""
    a = ca_inputs(2, 8, 6, 8, 2, nhwc, torch.bfloat16)
    plain, _ = emu.channel_attention(*ca_args(a, "avg"))
    r = a["residual"].clone()
    emu.channel_attention_out(*ca_args(dict(a, residual=r), "avg"), r)
    bitwise(r, plain, "out == residual")
    o = fmt(torch.empty_like(plain), not nhwc)
    emu.channel_attention_out(*ca_args(a, "avg"), o)
    bitwise(o, plain, "out in the other format")
    b = bam_inputs(2, 8, 6, 8, 2, 3, nhwc, torch.bfloat16)
    plain = emu.balanced_attention(*bam_args(b))[0]
    r = b["residual"].clone()
    emu.balanced_attention_out(*bam_args(dict(b, residual=r)), r)
    bitwise(r, plain, "bam out == residual")
    o = fmt(torch.empty_like(plain), not nhwc)
    emu.balanced_attention_out(*bam_args(b), o)
    bitwise(o, plain, "bam out in the other format")


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_float64(emu, nhwc):
    """double (gradcheck's dtype): V = 2 on the vector path."""
    d = torch.float64
    a = ca_inputs(2, 8, 6, 8, 2, nhwc, d, prelu=True)
    got = emu.channel_attention(*ca_args(a, "avg+std"))
    close_all(got, torch.ops.srkernels.channel_attention(*ca_args(a, "avg+std")), d, "ca")
    go = fmt(rnd(2, 8, 6, 8, seed=3, dtype=d), nhwc)
    close_all(emu.channel_attention_backward(*ca_backward_args(go, a, got[1], "avg+std")),
              torch.ops.srkernels.channel_attention_backward(*ca_backward_args(go, a, got[1], "avg+std")), d, "ca bwd")
    b = bam_inputs(2, 8, 6, 8, 2, 3, nhwc, d)
    got = emu.balanced_attention(*bam_args(b))
    close_all(got, torch.ops.srkernels.balanced_attention(*bam_args(b)), d, "bam")
    bb = (go, b["x"], got[1], got[2], b["w1"], b["prelu_w"], b["w2"], b["w_sa"])
    close_all(emu.balanced_attention_backward(*bb), torch.ops.srkernels.balanced_attention_backward(*bb), d, "bam bwd")
    x = fmt(rnd(2, 8, 6, 8, seed=4, dtype=d), nhwc)
    pa = (fmt(rnd(2, 2, 12, 16, seed=5, dtype=d), nhwc), x, 2, rnd(8, seed=6, dtype=d), None, "relu")
    close_all(emu.pixel_shuffle_backward(*pa), torch.ops.srkernels.pixel_shuffle_backward(*pa), d, "ps bwd")
