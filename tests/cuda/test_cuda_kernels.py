"""Every path a GPU runs: the compiled CUDA kernels against the CPU kernels and the float64 reference.

Skipped only where no CUDA GPU exists (all of CI today); scripts/gpu_check.sh runs them on the day one does.
The same kernels run on CPU in the emulator (tests/cuda_emu), which is where they are tested meanwhile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import srkernels  # noqa: F401

from ..conftest import assert_close, needs_cuda
from ..cuda_emu.test_emulated_kernels import (BAM_SHAPES, CA_SHAPES, DTYPES, PS_SHAPES, bam_args, bam_inputs, ca_args,
                                              ca_backward_args, ca_inputs, ca_ref, fmt, ps_inputs, rnd)
from ..ops.test_dense_block import _rel, make_pair

pytestmark = needs_cuda
CL = torch.channels_last
OPS = torch.ops.srkernels
DEV = "cuda"  # one name, so the test logic can be dry-run on CPU


def cu(v):
    """To the GPU, keeping the memory format; tuples/dicts element-wise."""
    if isinstance(v, dict):
        return {k: cu(t) for k, t in v.items()}
    if isinstance(v, (tuple, list)):
        return type(v)(cu(t) for t in v)
    return v.to(DEV) if isinstance(v, torch.Tensor) else v


def cpu(v):
    if isinstance(v, (tuple, list)):
        return type(v)(cpu(t) for t in v)
    return v.cpu() if isinstance(v, torch.Tensor) else v


def close_all(got, want, dtype, what):
    for i, (a, b) in enumerate(zip(got, want)):
        if a.numel() or b.numel():
            assert_close(a.cpu(), b.cpu(), dtype, f"{what}[{i}]")


def bitwise(a, b, what):
    assert torch.equal(a.cpu(), b.cpu()), f"{what} differs bitwise"


# ---------------------------------------------------------------------------------------------------------
# The attention ops and pixel_shuffle: CUDA vs the CPU kernels on the emulator's branch-reaching shapes.

@pytest.mark.parametrize("pool", ["avg", "avg+std"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CA_SHAPES, ids=[s[0] for s in CA_SHAPES])
def test_channel_attention_cuda(shape, dtype, pool):
    _, N, C, H, W, Cr, nhwc = shape
    a = ca_inputs(N, C, H, W, Cr, nhwc, dtype, prelu=pool == "avg+std")
    out, stats = OPS.channel_attention(*ca_args(cu(a), pool))
    want = OPS.channel_attention(*ca_args(a, pool))
    assert out.device.type == DEV and out.is_contiguous(memory_format=CL if nhwc else torch.contiguous_format)
    close_all((out, stats), want, dtype, "forward")
    assert_close(out.cpu(), ca_ref(a, pool), dtype, "forward vs reference")
    go = fmt(rnd(N, C, H, W, seed=11, dtype=dtype), nhwc)
    g = OPS.channel_attention_backward(*ca_backward_args(cu(go), cu(a), stats, pool))
    close_all(g, OPS.channel_attention_backward(*ca_backward_args(go, a, want[1], pool)), dtype, "backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BAM_SHAPES, ids=[s[0] for s in BAM_SHAPES])
def test_balanced_attention_cuda(shape, dtype):
    _, N, C, H, W, Cr, K, nhwc = shape
    a = bam_inputs(N, C, H, W, Cr, K, nhwc, dtype)
    got = OPS.balanced_attention(*bam_args(cu(a)))
    want = OPS.balanced_attention(*bam_args(a))
    close_all(got, want, dtype, "forward")
    go = fmt(rnd(N, C, H, W, seed=11, dtype=dtype), nhwc)
    rest = (a["w1"], a["prelu_w"], a["w2"], a["w_sa"])
    g = OPS.balanced_attention_backward(cu(go), cu(a["x"]), got[1], got[2], *cu(rest))
    close_all(g, OPS.balanced_attention_backward(go, a["x"], want[1], want[2], *rest), dtype, "backward")


@pytest.mark.parametrize("act", ["none", "relu", "prelu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PS_SHAPES, ids=[s[0] for s in PS_SHAPES])
def test_pixel_shuffle_cuda(shape, dtype, act):
    args, bargs = ps_inputs(shape, dtype, act)
    r, go = args[1], bargs[0]
    close_all([OPS.pixel_shuffle(*cu(args))], [OPS.pixel_shuffle(*args)], dtype, "forward")
    close_all(OPS.pixel_shuffle_backward(*cu(bargs)), OPS.pixel_shuffle_backward(*bargs), dtype, "backward")
    close_all([OPS.pixel_unshuffle(cu(go), r)], [OPS.pixel_unshuffle(go, r)], dtype, "unshuffle")


# ---------------------------------------------------------------------------------------------------------
# *_out on CUDA: out == residual, a misaligned out, out in the other memory format: the plain call's bits.

def _out_cases(op, nhwc, dtype):
    if op == "channel_attention":
        a = cu(ca_inputs(2, 16, 6, 8, 4, nhwc, dtype))
        return lambda res: ca_args(dict(a, residual=res), "avg"), a["residual"]
    if op == "balanced_attention":
        a = cu(bam_inputs(2, 16, 6, 8, 4, 7, nhwc, dtype))
        return lambda res: bam_args(dict(a, residual=res)), a["residual"]
    x = cu(fmt(rnd(2, 16, 6, 8, seed=0, dtype=dtype), nhwc))
    res = cu(fmt(rnd(2, 4, 12, 16, seed=1, dtype=dtype), nhwc))
    return lambda r: (x, 2, cu(rnd(16, seed=2, dtype=dtype)), None, "relu", r), res


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["channel_attention", "balanced_attention", "pixel_shuffle"])
def test_out_variants_cuda(op, dtype, nhwc):
    args, res = _out_cases(op, nhwc, dtype)
    plain = getattr(OPS, op)(*args(res))
    plain = plain[0] if isinstance(plain, (tuple, list)) else plain
    out_op = getattr(OPS, op + "_out")
    r = res.clone()
    out_op(*args(r), r)  # out == residual
    bitwise(r, plain, "out == residual")
    # a misaligned CUDA out: one element into a larger buffer, same strides
    base = torch.empty(plain.numel() + 16, dtype=dtype, device=DEV)
    o = base[1:].as_strided(plain.shape, plain.stride())
    assert o.data_ptr() % 16 != 0
    out_op(*args(res), o)
    bitwise(o, plain, "misaligned out")
    o = fmt(torch.empty_like(plain), not nhwc)
    out_op(*args(res), o)
    bitwise(o, plain, "out in the other memory format")
    # a misaligned residual must not change the bits either (issue #14 fix 4)
    rbase = torch.empty(res.numel() + 16, dtype=dtype, device=DEV)
    rm = rbase[1:].as_strided(res.shape, res.stride())
    rm.copy_(res)
    got = getattr(OPS, op)(*args(rm))
    bitwise(got[0] if isinstance(got, (tuple, list)) else got, plain, "misaligned residual")


# ---------------------------------------------------------------------------------------------------------
# Large maps (the multi-chunk paths at full size), the grid.y loop at full size, 64-bit indexing.

LARGE = [(2, 64, 96, 96), (1, 64, 256, 256)]


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", LARGE, ids=["2x64x96x96", "1x64x256x256"])
def test_large_maps_cuda(shape, dtype, nhwc):
    N, C, H, W = shape
    a = ca_inputs(N, C, H, W, 4, nhwc, dtype, prelu=True)
    got = OPS.channel_attention(*ca_args(cu(a), "avg+std"))
    want = OPS.channel_attention(*ca_args(a, "avg+std"))
    close_all(got, want, dtype, "channel_attention")
    go = fmt(rnd(N, C, H, W, seed=11, dtype=dtype), nhwc)
    close_all(OPS.channel_attention_backward(*ca_backward_args(cu(go), cu(a), got[1], "avg+std")),
              OPS.channel_attention_backward(*ca_backward_args(go, a, want[1], "avg+std")), dtype, "ca backward")
    b = bam_inputs(N, C, H, W, 4, 7, nhwc, dtype)
    gb = OPS.balanced_attention(*bam_args(cu(b)))
    wb = OPS.balanced_attention(*bam_args(b))
    close_all(gb, wb, dtype, "balanced_attention")
    rest = (b["w1"], b["prelu_w"], b["w2"], b["w_sa"])
    close_all(OPS.balanced_attention_backward(cu(go), cu(b["x"]), gb[1], gb[2], *cu(rest)),
              OPS.balanced_attention_backward(go, b["x"], wb[1], wb[2], *rest), dtype, "bam backward")
    close_all([OPS.pixel_unshuffle(cu(go), 2)], [OPS.pixel_unshuffle(go, 2)], dtype, "unshuffle")
    close_all(OPS.pixel_shuffle_backward(*cu((fmt(rnd(N, C // 4, H * 2, W * 2, seed=5, dtype=dtype), nhwc),
                                              b["x"], 2, rnd(C, seed=6, dtype=dtype), None, "relu"))),
              OPS.pixel_shuffle_backward(fmt(rnd(N, C // 4, H * 2, W * 2, seed=5, dtype=dtype), nhwc), b["x"], 2,
                                         rnd(C, seed=6, dtype=dtype), None, "relu"), dtype, "ps backward")


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_grid_y_loop_cuda(nhwc):
    """[1100, 64, 4, 4]: N*C = 70400 planes > 65535 = gridDim.y, so the NCHW kernels loop over planes."""
    dtype = torch.float32
    a = ca_inputs(1100, 64, 4, 4, 4, nhwc, dtype)
    got = OPS.channel_attention(*ca_args(cu(a), "avg+std"))
    want = OPS.channel_attention(*ca_args(a, "avg+std"))
    close_all(got, want, dtype, "channel_attention")
    go = fmt(rnd(1100, 64, 4, 4, seed=3), nhwc)
    close_all(OPS.channel_attention_backward(*ca_backward_args(cu(go), cu(a), got[1], "avg+std")),
              OPS.channel_attention_backward(*ca_backward_args(go, a, want[1], "avg+std")), dtype, "ca backward")
    b = bam_inputs(1100, 64, 4, 4, 4, 3, nhwc, dtype)
    gb = OPS.balanced_attention(*bam_args(cu(b)))
    wb = OPS.balanced_attention(*bam_args(b))
    close_all(gb, wb, dtype, "bam")
    x = fmt(rnd(1100, 64, 4, 4, seed=4), nhwc)
    g2 = fmt(rnd(1100, 16, 8, 8, seed=5), nhwc)
    bargs = (g2, x, 2, rnd(64, seed=6), rnd(16, seed=7) * 0.1 + 0.25, "prelu")
    close_all(OPS.pixel_shuffle_backward(*cu(bargs)), OPS.pixel_shuffle_backward(*bargs), dtype, "ps backward")


def _free_gpu_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.slow
def test_index_past_2_31_cuda():
    """64-bit offsets: [1, 64, 5800, 5800] fp16 has 2.15e9 > 2^31 elements (4.3 GB a tensor)."""
    N, C, H, W = 1, 64, 5800, 5800
    need = 4 * N * C * H * W * 2 + (1 << 30)
    if _free_gpu_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(N, C, H, W, device=DEV, dtype=torch.float16, generator=g)
    w1 = torch.randn(4, C, device=DEV, dtype=torch.float16, generator=g) * 0.1
    w2 = torch.randn(C, 4, device=DEV, dtype=torch.float16, generator=g) * 0.1
    out, stats = OPS.channel_attention(x, w1, None, w2, None, None, None, "avg")
    mean = torch.stack([x[0, c].float().mean() for c in range(C)])
    assert_close(stats[0, 0].cpu(), mean.cpu(), torch.float16, "pooled mean")
    gate = torch.sigmoid(F.linear(F.relu(F.linear(stats[:, 0], w1.float())), w2.float()))
    last = x[0, C - 1, -8:, -8:].float() * gate[0, C - 1]
    assert_close(out[0, C - 1, -8:, -8:].cpu(), last.cpu(), torch.float16, "last elements")
    del out
    y = OPS.pixel_shuffle(x.view(N, C, H, W), 2, None, None, "none", None)
    assert torch.equal(y[0, -1, -4:, -4:].cpu(), F.pixel_shuffle(x[:, -4:, -2:, -2:], 2)[0, -1].cpu())


# ---------------------------------------------------------------------------------------------------------
# avg+std edge values: constant channels (std = 0: gradient term 0) and mean >> std (Welford, not E[x^2]-E[x]^2).

@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_avg_std_edge_values_cuda(dtype, nhwc):
    a = ca_inputs(2, 8, 40, 40, 2, nhwc, dtype)
    x = a["x"].clone()
    x[:, :3] = 0.75  # constant channels
    x[:, 3:] = (1000 + 0.01 * rnd(2, 5, 40, 40, seed=9)).to(dtype) if dtype == torch.float32 else x[:, 3:] + 100
    a["x"] = fmt(x, nhwc)
    got = OPS.channel_attention(*ca_args(cu(a), "avg+std"))
    want = OPS.channel_attention(*ca_args(a, "avg+std"))
    close_all(got, want, dtype, "forward")
    assert (got[1][:, 1, :3] == 0).all(), "std of a constant channel must be exactly 0"
    ref_std = x.double().std(dim=(2, 3), unbiased=False)
    assert_close(got[1][:, 1].cpu(), ref_std, torch.float32 if dtype == torch.float32 else dtype, "std")
    go = fmt(rnd(2, 8, 40, 40, seed=11, dtype=dtype), nhwc)
    g = OPS.channel_attention_backward(*ca_backward_args(cu(go), cu(a), got[1], "avg+std"))
    close_all(g, OPS.channel_attention_backward(*ca_backward_args(go, a, want[1], "avg+std")), dtype, "backward")
    assert torch.isfinite(g[0]).all()


# ---------------------------------------------------------------------------------------------------------
# dense_block on CUDA (cuBLAS GEMMs: the paths of csrc/dense_block_common.h that only run on a GPU).

@pytest.mark.parametrize("fmt_", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flavour", ["rdb", "rdcab", "srdense"])
def test_dense_block_cuda(flavour, dtype, fmt_):
    """N = 2; rdb has the residual, rdcab the gated fusion; against float64 autograd of the reference."""
    ref, fused, extra = make_pair(flavour, dtype)
    fused = fused.to(DEV)
    N, H, W = 2, 6, 5
    C = ref.channels
    xs = [rnd(N, C, H, W, seed=0, dtype=torch.float64)] + ([rnd(N, C, H, W, seed=7, dtype=torch.float64)]
                                                            if extra else [])
    mf = CL if fmt_ == "channels_last" else torch.contiguous_format
    fin = [x.to(DEV, dtype).contiguous(memory_format=mf).requires_grad_(True) for x in xs]
    rin = [x.detach().double().cpu().requires_grad_(True) for x in fin]
    out = fused(*fin)
    expected = ref(*rin)
    if fmt_ == "channels_last":
        assert out.is_contiguous(memory_format=CL)
    assert_close(out.detach().cpu(), expected.detach(), dtype, "forward")
    gout = rnd(*expected.shape, seed=1, dtype=torch.float64)
    out.backward(gout.to(DEV, dtype))
    expected.backward(gout)
    pairs = [(f"grad input {i}", a.grad, b.grad) for i, (a, b) in enumerate(zip(fin, rin))]
    pairs += [(f"grad {n}", p.grad, q.grad) for (n, p), q in zip(fused.named_parameters(), ref.parameters())]
    for what, a, e in pairs:
        assert a is not None, what
        a = a.cpu()
        if dtype != torch.float32 and _rel(a, e) <= 0.05:  # ReLU flips near 0 in low precision (test_dense_block)
            continue
        assert_close(a, e, dtype, what)


@pytest.mark.parametrize("flavour", ["rdb", "rdcab"])
def test_dense_block_cuda_deterministic(flavour):
    """With torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG set (tests/cuda/conftest.py),
    two runs give the same bits (docs/ops.md § Determinism on CUDA)."""
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            _, fused, extra = make_pair(flavour, torch.float32)
            fused = fused.to(DEV)
            xs = [rnd(2, 8, 6, 5, seed=s).to(DEV).requires_grad_(True) for s in ([0, 7] if extra else [0])]
            out = fused(*xs)
            out.backward(torch.ones_like(out))
            runs.append([out.detach(), *[x.grad for x in xs], *[p.grad for p in fused.parameters()]])
        for a, b in zip(*runs):
            bitwise(a, b, "dense_block rerun")
    finally:
        torch.use_deterministic_algorithms(False)


def test_attention_ops_deterministic_cuda():
    a = cu(ca_inputs(2, 64, 40, 40, 4, False, torch.bfloat16, prelu=True))
    r1 = OPS.channel_attention(*ca_args(a, "avg+std"))
    r2 = OPS.channel_attention(*ca_args(a, "avg+std"))
    for x, y in zip(r1, r2):
        bitwise(x, y, "channel_attention rerun")
    b = cu(bam_inputs(2, 64, 40, 40, 4, 7, True, torch.bfloat16))
    for x, y in zip(OPS.balanced_attention(*bam_args(b)), OPS.balanced_attention(*bam_args(b))):
        bitwise(x, y, "balanced_attention rerun")


def test_cublas_workspace_config_is_set():
    """The CUDA determinism tests rely on it (tests/cuda/conftest.py)."""
    import os

    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")

