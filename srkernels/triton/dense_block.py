"""Triton ``dense_block`` forward/backward, registered as ``torch.ops.srkernels_triton.dense_block[_backward]``
(same schemas, outputs and buffer contract as the C++ ops: srkernels/ops/dense_block.py, csrc/dense_block_common.h).

Buffer: ``[R, T]`` in x's dtype, laid out as srkernels/dense_plan.py describes (one row per padded pixel, one
column per channel). A kxk tap of a channel range is that range
shifted by the constant row offset (ky - p)*Wp + (kx - p), so every conv below is an implicit GEMM that reads its
input channels in place: no concat, no im2col. Programs only ever visit interior pixels (flat index
m = (n*H + h)*W + w, mapped to its buffer row), so border and margin rows are never written and stay zero:
they are the conv's zero padding for every later layer.

Forward
  copy      x -> buffer columns [0, Cx)
  per layer _conv_fwd_kernel: [BLOCK_M pixels x BLOCK_N outputs] tile, loop over k*k taps x BLOCK_K input
            channels, fp32 (fp64) accumulation; epilogue bias (+ residual columns) (+ ReLU), stored to
            out_start / out2_start (Split: the two halves of the layer's outputs)
  fusion    _mean_kernel (gate stats: per-sample channel means; border rows are zero so a sample's padded
            rows are summed in one contiguous sweep) -> gate MLP in torch (an [N, K] x [K, Cr] problem, not
            worth a kernel) -> _fuse_fwd_kernel: 1x1 conv on the fusion range, gate applied to the A tile,
            bias + residual, written in x's memory format. Without fuse_weight the range is copied out.
Backward (gradient buffer: fp32 (fp64) ``[R, T]``, same layout, every slice's gradient accumulates in it)
  fusion    _fuse_bwd_in_kernel: dF = g * (dO @ Wf) into the fusion range, plus per-tile partials of the
            gate gradient dg = sum_pixels F * (dO @ Wf); MLP backward in torch; _add_rows_kernel adds ds / HW;
            _fuse_bwd_w_kernel: dWf = dO^T (F * g) and dbf as fixed row-split partials
  layers    in reverse: _dz_kernel (dZ = dY masked by the ReLU of the stored output, rounded to x's dtype
            into a padded [R, Gmax] scratch; bias-grad partials; the residual's gradient added to its
            columns), _conv_bwd_w_kernel (dW_tap = dZ^T A_shifted per row split), _conv_bwd_in_kernel
            (flipped taps: dA[q] += sum_tap dZ[q - off_tap] W_tap, added in place to the layer's input range)
  copy      gradient buffer columns [0, Cx) -> grad_x in grad_out's memory format.

Determinism: no atomics. Every element of the gradient buffer is read-modified-written by one program per
launch, and every reduction over pixels (weight, bias, fusion and gate gradients) is written as per-split
partials (splits fixed by the shape) then summed in a fixed order by ``merge_partials_kernel``.

Tested in the interpreter only (no GPU here): tile sizes are plausible defaults, not tuned. In the interpreter,
bfloat16 is emulated (see EMU_BF16 below) so that results stand for the hardware's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton
from torch._prims_common import suggest_memory_format

from ..dense_plan import DensePlan, buffer_rows, parse
from . import _common as cm
from .._util import triton_interpret
from ._common import acc as _acc
from ._common import merge_partials_kernel

OP = "dense_block"
# the flat int[] plan (DensePlan.ints; its training flag is unused here)
_HEAD, _LAYER = DensePlan.HEAD, DensePlan.LAYER

# Tile caps: pixels x output channels x reduction chunk. tl.dot needs every dim >= 16.
_BM, _BN, _BK = 64, 64, 32
# Rows (pixels) per partial of a weight-gradient reduction: fixed by the shape, so the summation order is too.
_SPLIT_ROWS = 4096


# ---- jit helpers --------------------------------------------------------------------------------------


@triton.jit
def _buffer_rows(r64, n, W, Wp, HpWp, base):
    # buffer row of interior pixel r64 (flat h * W + w) of sample n: skip the border and the leading margin
    h = r64 // W
    return base + n * HpWp + h * Wp + (r64 - h * W)


@triton.jit
def _sample_tile(HW, NCOL, W, Wp, HpWp, base, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (pixel tile pm, column tile, sample n) over one sample's interior pixels: -> pm, n (int64), the
    # pixel offsets, their mask, as int64, their buffer rows, and the tile's column offsets (of NCOL) and mask.
    pm = tl.program_id(0)
    offs_r = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = tl.program_id(2).to(tl.int64)
    r64 = offs_r.to(tl.int64)
    return pm, n, offs_r, offs_r < HW, r64, _buffer_rows(r64, n, W, Wp, HpWp, base), offs_n, offs_n < NCOL


@triton.jit
def _chunk(start, end, BLOCK: tl.constexpr):
    # offsets [start, start + BLOCK) of a reduction loop over [0, end), and their mask
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < end


@triton.jit
def _tap_gemm(a_base, a_row, w_base, swk, sw2, sw3, Wp, K, mrow, mcol, KS: tl.constexpr, P: tl.constexpr,
              EMU_BF16: tl.constexpr, F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    # A conv as an implicit GEMM on the buffer: acc[m, j] = sum_tap sum_k A_tap[m, k] * w[k, j, tap], where A_tap
    # is the row-strided matrix at a_base (a_row elements per buffer row; negative for the transposed conv)
    # shifted by (ky - P) * Wp + (kx - P) rows, and w_base + k * swk + ky * sw2 + kx * sw3 the weights.
    ks = tl.arange(0, BLOCK_K)
    acc = _zeros(BLOCK_M, BLOCK_N, F64)
    for t in tl.static_range(KS * KS):  # unrolled: the tap offsets are compile-time multiples of Wp
        a_tap = a_base + ((t // KS - P) * Wp + (t % KS - P)) * a_row
        w_tap = w_base + ((t // KS) * sw2 + (t % KS) * sw3)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + ks
            mk = offs_k < K
            a = tl.load(a_tap + offs_k[None, :], mask=mrow[:, None] & mk[None, :], other=0.0)
            b = tl.load(w_tap + offs_k[:, None] * swk, mask=mk[:, None] & mcol[None, :], other=0.0)
            acc = _mma(a, b, acc, EMU_BF16)
    return acc


@triton.jit
def _zeros(A: tl.constexpr, B: tl.constexpr, F64: tl.constexpr):
    if F64:
        return tl.zeros([A, B], dtype=tl.float64)
    else:
        return tl.zeros([A, B], dtype=tl.float32)


@triton.jit
def _zeros1(A: tl.constexpr, F64: tl.constexpr):
    if F64:
        return tl.zeros([A], dtype=tl.float64)
    else:
        return tl.zeros([A], dtype=tl.float32)


# EMU_BF16 (interpreter + bfloat16 only): the interpreter keeps bfloat16 as raw uint16, its tl.dot would multiply
# the bits and its fp32 -> bfloat16 casts truncate; _mma upcasts and _cast rounds to nearest even first, as the
# hardware does, so interpreted results stand for GPU ones.


@triton.jit
def _mma(a, b, acc, EMU_BF16: tl.constexpr):
    # acc += a @ b, IEEE fp32 (no TF32) to match the C++ backends
    if EMU_BF16:
        a = a.to(acc.dtype)
        b = b.to(acc.dtype)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _cast(v, ptr, EMU_BF16: tl.constexpr):
    # v in ptr's element type, rounded to nearest even
    if EMU_BF16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        # round the top 16 bits and clear the rest, so the cast below is exact (0 stays 0, a quiet NaN stays NaN)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _pixel_rows(m, HW, W, Wp, HpWp, base):
    # flat interior pixel index m -> (buffer row, sample n, pixel r = h*W + w); base = the row of (0, 0, 0)
    m = m.to(tl.int64)
    n = m // HW
    r = m - n * HW
    return _buffer_rows(r, n, W, Wp, HpWp, base), n, r


# ---- forward ------------------------------------------------------------------------------------------


@triton.jit
def _copy_kernel(
    src_ptr, dst_ptr, M, C, HW, W, Wp, HpWp, base, T, col0, sn, sc, sp,
    TO_BUF: tl.constexpr, EMU_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Between a feature map (strides sn, sc, sp of n, c, pixel) and buffer columns [col0, col0 + C) of the
    # interior rows, converting to the destination dtype.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows, n, r = _pixel_rows(offs_m, HW, W, Wp, HpWp, base)
    mask = (offs_m < M)[:, None] & (offs_c < C)[None, :]
    foff = n[:, None] * sn + r[:, None] * sp + offs_c.to(tl.int64)[None, :] * sc
    boff = rows[:, None] * T + col0 + offs_c[None, :]
    if TO_BUF:
        v = tl.load(src_ptr + foff, mask=mask, other=0.0)
        tl.store(dst_ptr + boff, v.to(dst_ptr.dtype.element_ty), mask=mask)
    else:
        v = tl.load(src_ptr + boff, mask=mask, other=0.0)
        tl.store(dst_ptr + foff, _cast(v, dst_ptr, EMU_BF16), mask=mask)


@triton.jit
def _conv_fwd_kernel(
    buf_ptr, w_ptr, b_ptr, M, HW, W, Wp, HpWp, base, T,
    in_start, in_len, G, out_start, split, out2_start, res_start, sw0, sw1, sw2, sw3,
    KS: tl.constexpr, P: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, EMU_BF16: tl.constexpr,
    F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Z[m, g] = sum_tap sum_c B[row(m) + off_tap, in_start + c] * w[g, c, tap]: the A tile of a tap is the
    # input range shifted by a constant number of rows (the zero border pads it).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = offs_m < M
    mg = offs_g < G
    rows, _n, _r = _pixel_rows(offs_m, HW, W, Wp, HpWp, base)
    acc = _tap_gemm(buf_ptr + (rows * T + in_start)[:, None], T, w_ptr + offs_g[None, :] * sw0, sw1, sw2, sw3, Wp,
                    in_len, mm, mg, KS, P, EMU_BF16, F64, BLOCK_M, BLOCK_N, BLOCK_K)
    # epilogue in acc, rounded once
    acc += _acc(tl.load(b_ptr + offs_g, mask=mg, other=0.0), F64)[None, :]
    mask = mm[:, None] & mg[None, :]
    row_off = rows[:, None] * T
    if HAS_RES:
        acc += _acc(tl.load(buf_ptr + row_off + res_start + offs_g[None, :], mask=mask, other=0.0), F64)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # `< 0` keeps NaN, like relu_
    col = tl.where(offs_g < split, out_start + offs_g, out2_start + offs_g - split)
    tl.store(buf_ptr + row_off + col[None, :], _cast(acc, buf_ptr, EMU_BF16), mask=mask)


@triton.jit
def _mean_kernel(
    buf_ptr, s_ptr, K, HW, HpWp, margin, T, col0, F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # s[n, c] = mean over the interior of sample n of column col0 + c. Its padded rows are one contiguous
    # range and the border rows are zero, so they are summed as they are (fixed order).
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(1).to(tl.int64)
    mc = offs_c < K
    start = margin + n * HpWp
    total = _zeros1(BLOCK_C, F64)
    for r0 in range(0, HpWp, BLOCK_M):
        rr = r0 + tl.arange(0, BLOCK_M)
        v = tl.load(buf_ptr + (start + rr)[:, None] * T + col0 + offs_c[None, :],
                    mask=(rr < HpWp)[:, None] & mc[None, :], other=0.0)
        total += tl.sum(_acc(v, F64), axis=0)
    tl.store(s_ptr + n * K + offs_c, total / HW, mask=mc)


@triton.jit
def _fuse_fwd_kernel(
    buf_ptr, w_ptr, b_ptr, g_ptr, res_ptr, out_ptr, K, Cout, HW, W, Wp, HpWp, base, T, col0,
    sw0, sw1, srn, src, srp, son, soc, sop,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr, EMU_BF16: tl.constexpr, F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[n, o, r] = sum_c F[row, c] g[n, c] Wf[o, c] + b[o] (+ res). Program = (pixel tile, Cout tile, n): one
    # sample per tile, so the gate is one [K] vector applied to the A tile.
    _, n, offs_r, mr, r64, rows, offs_o, mo = _sample_tile(HW, Cout, W, Wp, HpWp, base, BLOCK_M, BLOCK_N)
    acc = _zeros(BLOCK_M, BLOCK_N, F64)
    for k0 in range(0, K, BLOCK_K):
        offs_c, mc = _chunk(k0, K, BLOCK_K)
        a = tl.load(buf_ptr + rows[:, None] * T + col0 + offs_c[None, :], mask=mr[:, None] & mc[None, :], other=0.0)
        b = tl.load(w_ptr + offs_o[None, :] * sw0 + offs_c[:, None] * sw1, mask=mc[:, None] & mo[None, :], other=0.0)
        if GATED:  # gate in acc (the C++ path scales the weight in acc too)
            g = tl.load(g_ptr + n * K + offs_c, mask=mc, other=0.0)
            acc = tl.dot(_acc(a, F64) * g[None, :], _acc(b, F64), acc, input_precision="ieee")
        else:
            acc = _mma(a, b, acc, EMU_BF16)
    if HAS_BIAS:
        acc += _acc(tl.load(b_ptr + offs_o, mask=mo, other=0.0), F64)[None, :]
    mask = mr[:, None] & mo[None, :]
    o64 = offs_o.to(tl.int64)[None, :]
    if HAS_RES:
        acc += _acc(tl.load(res_ptr + n * srn + o64 * src + r64[:, None] * srp, mask=mask, other=0.0), F64)
    tl.store(out_ptr + n * son + o64 * soc + r64[:, None] * sop, _cast(acc, out_ptr, EMU_BF16), mask=mask)


# ---- backward -----------------------------------------------------------------------------------------


@triton.jit
def _fuse_bwd_in_kernel(
    go_ptr, w_ptr, buf_ptr, g_ptr, gbuf_ptr, pdg_ptr, K, Cout, HW, W, Wp, HpWp, base, T, col0, NPB,
    sw0, sw1, sgn, sgc, sgp,
    GATED: tl.constexpr, EMU_BF16: tl.constexpr, F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # P = dO @ Wf on one sample's pixel tile; gbuf[fusion] = P * g (stored: the fusion range is the first
    # writer), and with the gate the tile's partial of dg[n, c] = sum_pixels P * F.
    pm, n, offs_r, mr, r64, rows, offs_c, mc = _sample_tile(HW, K, W, Wp, HpWp, base, BLOCK_M, BLOCK_N)
    acc = _zeros(BLOCK_M, BLOCK_N, F64)
    for o0 in range(0, Cout, BLOCK_K):
        offs_o, mo = _chunk(o0, Cout, BLOCK_K)
        a = tl.load(go_ptr + n * sgn + r64[:, None] * sgp + offs_o.to(tl.int64)[None, :] * sgc,
                    mask=mr[:, None] & mo[None, :], other=0.0)
        b = tl.load(w_ptr + offs_o[:, None] * sw0 + offs_c[None, :] * sw1, mask=mo[:, None] & mc[None, :], other=0.0)
        acc = _mma(a, b, acc, EMU_BF16)
    mask = mr[:, None] & mc[None, :]
    ptrs = rows[:, None] * T + col0 + offs_c[None, :]
    if GATED:
        f = _acc(tl.load(buf_ptr + ptrs, mask=mask, other=0.0), F64)
        tl.store(pdg_ptr + (n * NPB + pm) * K + offs_c, tl.sum(acc * f, axis=0), mask=mc)
        acc = acc * tl.load(g_ptr + n * K + offs_c, mask=mc, other=0.0)[None, :]
    tl.store(gbuf_ptr + ptrs, acc, mask=mask)


@triton.jit
def _add_rows_kernel(
    gbuf_ptr, v_ptr, K, HW, W, Wp, HpWp, base, T, col0, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # gbuf[interior rows of sample n, col0 + c] += v[n, c] (the gate's pooled-mean gradient)
    _, n, _, mr, _, rows, offs_c, mc = _sample_tile(HW, K, W, Wp, HpWp, base, BLOCK_M, BLOCK_C)
    mask = mr[:, None] & mc[None, :]
    ptrs = gbuf_ptr + rows[:, None] * T + col0 + offs_c[None, :]
    v = tl.load(v_ptr + n * K + offs_c, mask=mc, other=0.0)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + v[None, :], mask=mask)


@triton.jit
def _fuse_bwd_w_kernel(
    go_ptr, buf_ptr, g_ptr, pgw_ptr, pgb_ptr, M, K, Cout, HW, W, Wp, HpWp, base, T, col0, SPLIT,
    sgn, sgc, sgp,
    GATED: tl.constexpr, EMU_BF16: tl.constexpr, F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Partials over the pixel split s: pgw[s, o, c] = sum_m dO[m, o] F[m, c] g[n(m), c], pgb[s, o] = sum_m dO.
    po = tl.program_id(0)
    pc = tl.program_id(1)
    s = tl.program_id(2)
    offs_o = po * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = pc * BLOCK_N + tl.arange(0, BLOCK_N)
    mo = offs_o < Cout
    mc = offs_c < K
    o64 = offs_o.to(tl.int64)
    acc = _zeros(BLOCK_O, BLOCK_N, F64)
    gb = _zeros1(BLOCK_O, F64)
    hi = tl.minimum(s * SPLIT + SPLIT, M)
    for m0 in range(s * SPLIT, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mm = offs_m < hi
        rows, n, r = _pixel_rows(offs_m, HW, W, Wp, HpWp, base)
        dot_ = tl.load(go_ptr + n[None, :] * sgn + r[None, :] * sgp + o64[:, None] * sgc,
                       mask=mo[:, None] & mm[None, :], other=0.0)  # dO^T tile [BLOCK_O, BLOCK_M]
        mf = mm[:, None] & mc[None, :]
        f = tl.load(buf_ptr + rows[:, None] * T + col0 + offs_c[None, :], mask=mf, other=0.0)
        if GATED:
            g = tl.load(g_ptr + n[:, None] * K + offs_c[None, :], mask=mf, other=0.0)
            acc = tl.dot(_acc(dot_, F64), _acc(f, F64) * g, acc, input_precision="ieee")
        else:
            acc = _mma(dot_, f, acc, EMU_BF16)
        gb += tl.sum(_acc(dot_, F64), axis=1)
    tl.store(pgw_ptr + (s * Cout + o64[:, None]) * K + offs_c[None, :], acc, mask=mo[:, None] & mc[None, :])
    tl.store(pgb_ptr + s * Cout + offs_o, gb, mask=mo & (pc == 0))


@triton.jit
def _dz_kernel(
    buf_ptr, gbuf_ptr, dz_ptr, pgb_ptr, M, G, HW, W, Wp, HpWp, base, T, LDZ,
    out_start, split, out2_start, res_start, SPLIT,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, EMU_BF16: tl.constexpr, F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # dZ = dY (where the stored output > 0, with ReLU), over the pixel split s: stored rounded to x's dtype in
    # the padded scratch (its border rows stay zero for the shifted reads), bias-grad partial in acc, and the
    # residual's gradient added to its columns (different columns from the output's: no overlap).
    offs_g = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = tl.program_id(1)
    mg = offs_g < G
    col = tl.where(offs_g < split, out_start + offs_g, out2_start + offs_g - split)
    total = _zeros1(BLOCK_N, F64)
    hi = tl.minimum(s * SPLIT + SPLIT, M)
    for m0 in range(s * SPLIT, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows, _n, _r = _pixel_rows(offs_m, HW, W, Wp, HpWp, base)
        mask = (offs_m < hi)[:, None] & mg[None, :]
        row_off = rows[:, None] * T
        dz = tl.load(gbuf_ptr + row_off + col[None, :], mask=mask, other=0.0)
        if RELU:
            y = _acc(tl.load(buf_ptr + row_off + col[None, :], mask=mask, other=0.0), F64)
            dz = tl.where(y <= 0, 0.0, dz)  # ATen's relu backward: a NaN y passes dz
        tl.store(dz_ptr + rows[:, None] * LDZ + offs_g[None, :], _cast(dz, dz_ptr, EMU_BF16), mask=mask)
        total += tl.sum(dz, axis=0)
        if HAS_RES:
            rp = gbuf_ptr + row_off + res_start + offs_g[None, :]
            tl.store(rp, tl.load(rp, mask=mask, other=0.0) + dz, mask=mask)
    tl.store(pgb_ptr + s * G + offs_g, total, mask=mg)


@triton.jit
def _conv_bwd_w_kernel(
    dz_ptr, buf_ptr, pgw_ptr, M, HW, W, Wp, HpWp, base, T, LDZ, in_start, in_len, G, NCB, SPLIT,
    KS: tl.constexpr, P: tl.constexpr, EMU_BF16: tl.constexpr, F64: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Partial over the pixel split s of dW[g, c, tap] = sum_m dZ[m, g] B[row(m) + off_tap, in_start + c],
    # stored as pgw[s, g, c, tap] so that the merged sum is already [G, in_len, k, k].
    pgc = tl.program_id(0)
    t = tl.program_id(1)
    s = tl.program_id(2)
    pg = pgc // NCB
    offs_g = pg * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_c = (pgc - pg * NCB) * BLOCK_C + tl.arange(0, BLOCK_C)
    mg = offs_g < G
    mc = offs_c < in_len
    ky = t // KS
    kx = t - ky * KS
    off = (ky - P) * Wp + (kx - P)
    acc = _zeros(BLOCK_G, BLOCK_C, F64)
    hi = tl.minimum(s * SPLIT + SPLIT, M)
    for m0 in range(s * SPLIT, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mm = offs_m < hi
        rows, _n, _r = _pixel_rows(offs_m, HW, W, Wp, HpWp, base)
        a = tl.load(dz_ptr + rows[None, :] * LDZ + offs_g[:, None], mask=mg[:, None] & mm[None, :], other=0.0)
        b = tl.load(buf_ptr + (rows + off)[:, None] * T + in_start + offs_c[None, :],
                    mask=mm[:, None] & mc[None, :], other=0.0)
        acc = _mma(a, b, acc, EMU_BF16)
    KK: tl.constexpr = KS * KS
    dst = pgw_ptr + ((s * G + offs_g.to(tl.int64)[:, None]) * in_len + offs_c[None, :]) * KK + t
    tl.store(dst, acc, mask=mg[:, None] & mc[None, :])


@triton.jit
def _conv_bwd_in_kernel(
    dz_ptr, w_ptr, gbuf_ptr, M, HW, W, Wp, HpWp, base, T, LDZ, in_start, in_len, G, sw0, sw1, sw2, sw3,
    KS: tl.constexpr, P: tl.constexpr, EMU_BF16: tl.constexpr, F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # gbuf[row(m), in_start + c] += sum_tap sum_g dZ[row(m) - off_tap, g] w[g, c, tap] (the transposed conv:
    # flipped taps; dZ's zero border rows make the padding implicit). One program owns each output element.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = offs_m < M
    mc = offs_c < in_len
    rows, _n, _r = _pixel_rows(offs_m, HW, W, Wp, HpWp, base)
    acc = _tap_gemm(dz_ptr + (rows * LDZ)[:, None], -LDZ, w_ptr + offs_c[None, :] * sw1, sw0, sw2, sw3, Wp, G, mm, mc,
                    KS, P, EMU_BF16, F64, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = mm[:, None] & mc[None, :]
    ptrs = gbuf_ptr + rows[:, None] * T + in_start + offs_c[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


# ---- host side ----------------------------------------------------------------------------------------


class _Geom:
    """Buffer geometry (as csrc/dense_block_common.h's Geom) for N x H x W maps and kernel size k."""

    def __init__(self, N: int, H: int, W: int, k: int):
        p = k // 2
        self.N, self.H, self.W, self.p = N, H, W, p
        self.Hp, self.Wp = H + 2 * p, W + 2 * p
        self.HpWp = self.Hp * self.Wp
        self.margin = p * self.Wp + p
        self.R = buffer_rows(N, H, W, k)
        self.HW = H * W
        self.M = N * H * W
        self.base = self.margin + p * self.Wp + p  # row of pixel (0, 0, 0)

    def rows_args(self):
        """(HW, W, Wp, HpWp, base): what the kernels need to map a pixel to its buffer row."""
        return self.HW, self.W, self.Wp, self.HpWp, self.base


def _parse(plan: list[int], weights: list[Tensor], op: str):
    """The flat plan -> (T, Cx, k, fuse_start, fuse_len, layers), checked like the C++ parse_plan (the
    invariants the kernels rely on for memory safety; Python checked the rest)."""
    torch._check(len(plan) >= _HEAD and (len(plan) - _HEAD) % _LAYER == 0,
                 lambda: f"{op}: malformed plan of {len(plan)} ints")
    T, Cx, k, fs, fl = parse(plan)
    L = (len(plan) - _HEAD) // _LAYER
    torch._check(L >= 1 and L == len(weights), lambda: f"{op}: the plan has {L} layers, got {len(weights)} weights")
    torch._check(k >= 1 and k % 2 == 1, lambda: f"{op}: kernel_size must be odd, got {k}")
    torch._check(0 < Cx <= T, lambda: f"{op}: bad in_channels {Cx} for {T} channels")

    def inside(s, n):
        return s >= 0 and n > 0 and s + n <= T

    torch._check(inside(fs, fl), lambda: f"{op}: fusion range outside the buffer")
    layers = []
    for i in range(L):
        in_start, in_len, out_start, G, split, out2_start, res_start, relu = plan[_HEAD + i * _LAYER:
                                                                                  _HEAD + (i + 1) * _LAYER]
        w = weights[i]
        torch._check(tuple(w.shape) == (G, in_len, k, k),
                     lambda: f"{op}: weights[{i}] must be [{G}, {in_len}, {k}, {k}], got {list(w.shape)}")
        ok = (inside(in_start, in_len) and 0 < split <= G and inside(out_start, split)
              and (G == split or inside(out2_start, G - split)) and (res_start < 0 or inside(res_start, G)))
        torch._check(ok, lambda: f"{op}: layer {i} reads or writes outside the buffer")
        layers.append((in_start, in_len, out_start, G, split, out2_start, res_start, bool(relu)))
    return T, Cx, k, fs, fl, layers


def _blk(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _flags(dtype: torch.dtype) -> dict:
    return dict(EMU_BF16=triton_interpret() and dtype == torch.bfloat16, F64=dtype == torch.float64)


def _feature_layout(t: Tensor) -> tuple[Tensor, torch.memory_format]:
    """``t`` NCHW- or NHWC-dense (the kernels index both through strides) and the format of outputs like it."""
    fmt = suggest_memory_format(t)
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        t = t.contiguous(memory_format=fmt)
    return t, fmt


def _copy(src: Tensor, dst: Tensor, g: _Geom, C: int, T: int, col0: int, to_buf: bool) -> None:
    """Feature map <-> buffer columns [col0, col0 + C) of the interior rows."""
    fm = dst if not to_buf else src
    if g.M == 0:
        return
    BM, BC = _blk(g.M, _BM), _blk(C, _BN)
    wrap_triton(_copy_kernel)[(triton.cdiv(g.M, BM), triton.cdiv(C, BC))](
        src, dst, g.M, C, *g.rows_args(), T, col0, *cm.strides(fm),
        TO_BUF=to_buf, EMU_BF16=_flags(dst.dtype)["EMU_BF16"] and src.dtype != dst.dtype, BLOCK_M=BM, BLOCK_C=BC,
    )


def _merge(partials: Tensor, out: Tensor) -> Tensor:
    """out (any dtype, numel E) = sum of ``partials`` [S, E] over S, in a fixed order."""
    S, E = partials.shape
    if S == 1:  # one partial (maps up to _SPLIT_ROWS pixels): only a cast, no launch
        return out.copy_(partials.view(out.shape))
    total = partials.new_empty((E,))
    MBC = min(triton.next_power_of_2(max(E, 1)), 128)
    wrap_triton(merge_partials_kernel)[(triton.cdiv(E, MBC), 1)](
        partials, partials, total, E, 1, S, 1, 1, WITH_M2=False, BLOCK_K=cm.merge_block_k(S), BLOCK_C=MBC
    )
    return out.copy_(total.view(out.shape))  # rounded by torch (interpreted bfloat16 stores would truncate)


def _splits(M: int) -> int:
    return max(1, triton.cdiv(M, _SPLIT_ROWS))


def dense_block(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    plan: list[int],
    fuse_weight: Tensor | None,
    fuse_bias: Tensor | None,
    gate_w1: Tensor | None,
    gate_b1: Tensor | None,
    gate_w2: Tensor | None,
    gate_b2: Tensor | None,
    residual: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(x.dim() == 4 and x.is_floating_point(), lambda: f"{OP}: x must be a 4-D floating tensor")
    T, Cx, k, fs, K, layers = _parse(plan, weights, OP)
    torch._check(x.shape[1] == Cx, lambda: f"{OP}: x has {x.shape[1]} channels, the plan {Cx}")
    torch._check(len(biases) == len(weights), lambda: f"{OP}: {len(weights)} weights but {len(biases)} biases")
    fused = fuse_weight is not None
    torch._check(fused or (fuse_bias is None and gate_w1 is None and residual is None),
                 lambda: f"{OP}: fuse_bias, the gate and the residual need fuse_weight")
    torch._check((gate_w1 is None) == (gate_w2 is None), lambda: f"{OP}: the gate needs both gate_w1 and gate_w2")
    x, fmt = _feature_layout(x)
    N, _, H, W = x.shape
    g = _Geom(N, H, W, k)
    acc = cm.acc_dtype(x.dtype)
    flags = _flags(x.dtype)

    buf = x.new_zeros((g.R, T))  # zero margins and borders: the implicit padding of every conv
    _copy(x, buf, g, Cx, T, 0, True)
    for (in_start, in_len, out_start, G, split, out2_start, res_start, relu), w, b in zip(layers, weights, biases):
        torch._check(b.shape == (G,), lambda: f"{OP}: a bias must be [{G}]")
        if g.M == 0:
            continue
        BM, BN, BK = _blk(g.M, _BM), _blk(G, _BN), _blk(in_len, _BK)
        wrap_triton(_conv_fwd_kernel)[(triton.cdiv(g.M, BM), triton.cdiv(G, BN))](
            buf, w, b.contiguous(), g.M, *g.rows_args(), T, in_start, in_len, G, out_start, split, out2_start,
            res_start, *w.stride(), KS=k, P=g.p, HAS_RES=res_start >= 0, RELU=relu, **flags,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        )

    stats = x.new_empty((0,), dtype=acc)
    if not fused:
        out = torch.empty((N, K, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
        _copy(buf, out, g, K, T, fs, False)
        return out, buf, stats

    fw = fuse_weight.reshape(fuse_weight.shape[0], -1)
    Cout = fw.shape[0]
    torch._check(fw.shape[1] == K, lambda: f"{OP}: fuse_weight must be [Cout, {K}]")
    gate = None
    if gate_w1 is not None:
        s = x.new_empty((N, K), dtype=acc)
        BC = _blk(K, _BN)
        if N > 0:
            wrap_triton(_mean_kernel)[(triton.cdiv(K, BC), N)](
                buf, s, K, g.HW, g.HpWp, g.margin, T, fs, F64=flags["F64"], BLOCK_M=_blk(g.HpWp, _BM), BLOCK_C=BC
            )
        # the gate MLP is [N, K] x [K, Cr]: torch ops in acc (as channel_attention)
        _, _, gate = cm.mlp_forward(s, gate_w1.reshape(gate_w1.shape[0], -1), gate_b1,
                                    gate_w2.reshape(gate_w2.shape[0], -1), gate_b2, None)
        gate = gate.contiguous()
        stats = torch.stack([s, gate], 1)
    out = torch.empty((N, Cout, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
    res = residual.contiguous(memory_format=fmt) if residual is not None else None
    if g.M > 0:
        BM, BN, BK = _blk(g.HW, _BM), _blk(Cout, _BN), _blk(K, _BK)
        wrap_triton(_fuse_fwd_kernel)[(triton.cdiv(g.HW, BM), triton.cdiv(Cout, BN), N)](
            buf, fw, fuse_bias if fuse_bias is not None else fw, gate if gate is not None else fw,
            res if res is not None else out, out, K, Cout, *g.rows_args(), T, fs, *fw.stride(),
            *(cm.strides(res) if res is not None else (0, 0, 0)), *cm.strides(out),
            HAS_BIAS=fuse_bias is not None, GATED=gate is not None, HAS_RES=res is not None, **flags,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        )
    return out, buf, stats


def dense_block_backward(
    grad_out: Tensor,
    buffer: Tensor,
    stats: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    plan: list[int],
    fuse_weight: Tensor | None,
    gate_w1: Tensor | None,
    gate_b1: Tensor | None,
    gate_w2: Tensor | None,
    gate_b2: Tensor | None,
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # the return annotation is required by torch 2.13's triton_op even with an explicit schema
    op = f"{OP}_backward"
    torch._check(grad_out.dim() == 4, lambda: f"{op}: grad_out must be 4-D")
    T, Cx, k, fs, K, layers = _parse(plan, weights, op)
    fused = fuse_weight is not None
    torch._check(grad_out.dtype == buffer.dtype and grad_out.device == buffer.device,
                 lambda: f"{op}: grad_out must have the buffer's dtype and device")
    torch._check(grad_out.shape[1] == (fuse_weight.shape[0] if fused else K),
                 lambda: f"{op}: grad_out has the wrong number of channels")
    torch._check((gate_w1 is None) == (gate_w2 is None), lambda: f"{op}: the gate needs both gate_w1 and gate_w2")
    grad_out, fmt = _feature_layout(grad_out)
    N, _, H, W = grad_out.shape
    g = _Geom(N, H, W, k)
    torch._check(buffer.dim() == 2 and tuple(buffer.shape) == (g.R, T) and buffer.is_contiguous(),
                 lambda: f"{op}: buffer must be a contiguous [{g.R}, {T}] matrix, got {list(buffer.shape)}")
    dt = buffer.dtype
    acc = cm.acc_dtype(dt)
    flags = _flags(dt)
    rows_args = g.rows_args()

    gbuf = buffer.new_zeros((g.R, T), dtype=acc)  # fp32 (fp64) gradients of every slice, same layout
    empty = buffer.new_empty((0,))
    if not fused:
        _copy(grad_out, gbuf, g, K, T, fs, True)
        gfw, gfb, ggw1, ggb1, ggw2, ggb2 = (empty.clone() for _ in range(6))  # distinct: outputs must not alias
    else:
        fw = fuse_weight.reshape(fuse_weight.shape[0], -1)
        Cout = fw.shape[0]
        gated = gate_w1 is not None
        sgo = cm.strides(grad_out)
        if gated:
            torch._check(tuple(stats.shape) == (N, 2, K), lambda: f"{op}: stats must be [N, 2, {K}]")
            stats = stats.to(acc)
            s, gate = stats[:, 0].contiguous(), stats[:, 1].contiguous()
        # dF = g * (dO @ Wf) into the fusion range, and the per-tile partials of the gate's dg
        BM, BN, BK = _blk(g.HW, _BM), _blk(K, _BN), _blk(Cout, _BK)
        NPB = triton.cdiv(g.HW, BM)
        pdg = buffer.new_empty((N, NPB, K), dtype=acc) if gated else gbuf
        if g.M > 0:
            wrap_triton(_fuse_bwd_in_kernel)[(NPB, triton.cdiv(K, BN), N)](
                grad_out, fw, buffer, gate if gated else gbuf, gbuf, pdg, K, Cout, *rows_args, T, fs, NPB,
                *fw.stride(), *sgo, GATED=gated, **flags, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
            )
        if gated:
            dg = buffer.new_zeros((N, 1, K), dtype=acc)
            if N > 0:
                MBC = min(triton.next_power_of_2(K), 128)
                wrap_triton(merge_partials_kernel)[(triton.cdiv(K, MBC), N)](
                    pdg, pdg, dg, K, g.HW, NPB, BM, 1, WITH_M2=False, BLOCK_K=cm.merge_block_k(NPB), BLOCK_C=MBC
                )
            w1 = gate_w1.reshape(gate_w1.shape[0], -1)
            w2 = gate_w2.reshape(gate_w2.shape[0], -1)
            h, a, _ = cm.mlp_forward(s, w1, gate_b1, w2, gate_b2, None)  # torch ops on [N, K]: tiny
            ds, a1, a2, a3, a4, _ = cm.mlp_backward(dg[:, 0], s, h, a, gate, w1, w2, None)
            if g.M > 0:
                BC = _blk(K, _BN)
                wrap_triton(_add_rows_kernel)[(NPB, triton.cdiv(K, BC), N)](
                    gbuf, (ds / g.HW).contiguous(), K, *rows_args, T, fs, BLOCK_M=BM, BLOCK_C=BC
                )
            ggw1 = a1.to(dt).reshape(gate_w1.shape)
            ggb1 = a2.to(dt) if gate_b1 is not None else empty.clone()
            ggw2 = a3.to(dt).reshape(gate_w2.shape)
            ggb2 = a4.to(dt) if gate_b2 is not None else empty.clone()
        else:
            ggw1, ggb1, ggw2, ggb2 = (empty.clone() for _ in range(4))
        # dWf, dbf: fixed pixel-split partials, merged in order
        S = _splits(g.M)
        BO, BN = _blk(Cout, _BN), _blk(K, _BN)
        pgw = buffer.new_empty((S, Cout * K), dtype=acc)
        pgb = buffer.new_empty((S, Cout), dtype=acc)
        wrap_triton(_fuse_bwd_w_kernel)[(triton.cdiv(Cout, BO), triton.cdiv(K, BN), S)](
            grad_out, buffer, gate if gated else gbuf, pgw, pgb, g.M, K, Cout, *rows_args, T, fs, _SPLIT_ROWS,
            *sgo, GATED=gated, **flags, BLOCK_M=_blk(g.M, _BM), BLOCK_O=BO, BLOCK_N=BN,
        )
        gfw = _merge(pgw, buffer.new_empty((Cout, K))).reshape(fuse_weight.shape)
        gfb = _merge(pgb, buffer.new_empty((Cout,)))

    L = len(layers)
    gws: list[Tensor] = [empty] * L
    gbs: list[Tensor] = [empty] * L
    Gmax = max(lay[3] for lay in layers)
    dz = buffer.new_zeros((g.R, Gmax))  # padded like the buffer; only interior rows are ever written
    S = _splits(g.M)
    BM = _blk(g.M, _BM)
    for i in range(L - 1, -1, -1):
        in_start, in_len, out_start, G, split, out2_start, res_start, relu = layers[i]
        w = weights[i]
        BN = _blk(G, _BN)
        pgb = buffer.new_empty((S, G), dtype=acc)
        wrap_triton(_dz_kernel)[(triton.cdiv(G, BN), S)](
            buffer, gbuf, dz, pgb, g.M, G, *rows_args, T, Gmax, out_start, split, out2_start, res_start,
            _SPLIT_ROWS, HAS_RES=res_start >= 0, RELU=relu, **flags, BLOCK_M=BM, BLOCK_N=BN,
        )
        gbs[i] = _merge(pgb, buffer.new_empty((G,)))
        BG, BC = _blk(G, _BN), _blk(in_len, _BN)
        NCB = triton.cdiv(in_len, BC)
        pgw = buffer.new_empty((S, G * in_len * k * k), dtype=acc)
        wrap_triton(_conv_bwd_w_kernel)[(triton.cdiv(G, BG) * NCB, k * k, S)](
            dz, buffer, pgw, g.M, *rows_args, T, Gmax, in_start, in_len, G, NCB, _SPLIT_ROWS,
            KS=k, P=g.p, **flags, BLOCK_G=BG, BLOCK_C=BC, BLOCK_M=BM,
        )
        gws[i] = _merge(pgw, torch.empty_like(w, memory_format=torch.contiguous_format))
        if g.M > 0:
            BN, BK = _blk(in_len, _BN), _blk(G, _BK)
            wrap_triton(_conv_bwd_in_kernel)[(triton.cdiv(g.M, BM), triton.cdiv(in_len, BN))](
                dz, w, gbuf, g.M, *rows_args, T, Gmax, in_start, in_len, G, *w.stride(),
                KS=k, P=g.p, **flags, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
            )
    gx = torch.empty((N, Cx, H, W), dtype=dt, device=grad_out.device, memory_format=fmt)
    _copy(gbuf, gx, g, Cx, T, 0, False)
    return gx, gws, gbs, gfw, gfb, ggw1, ggb1, ggw2, ggb2
