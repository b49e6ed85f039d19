"""Triton ``pixel_shuffle`` (conv epilogue: bias, activation, shuffle, residual), its backward, the ``_out``
variant and ``pixel_unshuffle``, registered as ``torch.ops.srkernels_triton.*``. Contract: docs/ops.md.

A pure rearrangement plus an element-wise epilogue, so bandwidth-bound. Bytes moved (s = element size,
E = N*C*r*r*H*W = numel(x) = numel(out)):
  forward   read x + write out (+ read residual)        = 2 E s  (3 E s)
  backward  read grad_out (+ read x unless act "none") + write grad_x = 2 E s (3 E s), plus per-program
            partial sums for grad_bias / grad_act_weight: programs loop over rows until a partial stands
            for >= _PARTIAL_RATIO (256) grad_x elements, so they add <= E/256 acc elements (written + read).
Each program loads a tile in the source layout, where every (sub-)row is one contiguous run, and
``tl.permute``s it in registers (through shared memory on a GPU) to the destination layout, where the r
sub-columns of one output row interleave into one contiguous run: both the reads and the writes coalesce.

  NCHW  x tile [i, j, h, w]  (r*r x-rows, w contiguous)   <->  out tile [h, i, w, j]  (out rows, (w, j) contiguous)
  NHWC  x tile [w, c, i, j]  (k = c*r*r+i*r+j contiguous) <->  out tile [i, w, j, c]  (r out rows, (w, j, c) contiguous)

Reductions (grad_bias, grad_act_weight) are per-tile partials merged in a fixed order (no float atomics).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _common as cm
from ._common import acc as _acc  # the accumulation-dtype cast the jit kernels share

_ACTS = {"none": 0, "relu": 1, "prelu": 2}


@triton.jit
def _at(v, AXIS: tl.constexpr):
    # the 1-D index vector v along axis AXIS of a 4-D tile
    if AXIS == 0:
        t = v[:, None, None, None]
    elif AXIS == 1:
        t = v[None, :, None, None]
    elif AXIS == 2:
        t = v[None, None, :, None]
    else:
        t = v[None, None, None, :]
    return t


@triton.jit
def _program(NWB, RP: tl.constexpr, BW: tl.constexpr):
    # Program (row block x w block, channel program, n) of the kernels below -> pb, its row block, the channel
    # program, n (int64), the sub-pixel axes i and j, the block's w offsets.
    pb = tl.program_id(0)
    ri = tl.arange(0, RP)
    return pb, pb // NWB, tl.program_id(1), tl.program_id(2).to(tl.int64), ri, ri, (pb % NWB) * BW + tl.arange(0, BW)


@triton.jit
def _params(b_ptrs, mb, a_ptrs, ma, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, F64: tl.constexpr):
    # (bias of the tile's x channels, prelu slope of its output channels), in acc; 0.0 when absent
    bias = 0.0
    if HAS_BIAS:
        bias = _acc(tl.load(b_ptrs, mask=mb, other=0.0), F64)
    a = 0.0
    if ACT == 2:
        a = _acc(tl.load(a_ptrs, mask=ma, other=0.0), F64)
    return bias, a


@triton.jit
def _forward_act(v, a, ACT: tl.constexpr):
    # `v < 0` (not `v <= 0`) keeps NaN as NaN, like torch.relu / prelu.
    if ACT == 1:
        v = tl.where(v < 0, 0.0, v)
    elif ACT == 2:
        v = tl.where(v < 0, v * a, v)
    return v


# ---- forward ------------------------------------------------------------------------------------------


@triton.jit
def _shuffle_tile(x_ptrs, m, b_ptrs, mb, a_ptrs, ma, res_ptrs, o_ptr, ooff, mo,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, F64: tl.constexpr):
    # The epilogue of one tile: load in x order, bias + activation in acc, permute (2, 0, 3, 1) to out order
    # (both layouts' tiles are built so that this one permutation maps them), + residual, store rounded once.
    v = _acc(tl.load(x_ptrs, mask=m, other=0.0), F64)
    bias, a = _params(b_ptrs, mb, a_ptrs, ma, HAS_BIAS, ACT, F64)
    if HAS_BIAS:
        v += bias
    y = tl.permute(_forward_act(v, a, ACT), (2, 0, 3, 1))
    if HAS_RES:
        y += _acc(tl.load(res_ptrs, mask=mo, other=0.0), F64)
    tl.store(o_ptr + ooff, y.to(o_ptr.dtype.element_ty), mask=mo)


@triton.jit
def _ps_fwd_kernel(
    x_ptr, b_ptr, a_ptr, res_ptr, o_ptr, C, H, W, NWB,
    sxn, sxc, sxh, sxw, srn, src, srh, srw, son, soc, soh, sow,
    R: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
    F64: tl.constexpr, NHWC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr,
):
    # NCHW: program = (spatial tile, output channel c, n): reads r*r x-rows segments [BH, BW], writes r*BH
    # out-rows segments of r*BW. NHWC: program = (x row h and w block, output-channel block, n): reads one
    # contiguous run of x's row [BW pixels x BC*r*r channels], writes r out-rows runs of [r*BW pixels x BC
    # channels]. Both build their x and out tiles (module docstring) so that _shuffle_tile's permutation maps them.
    _, rb, cp, n, ri, rj, ww = _program(NWB, RP, BW)
    if NHWC:
        h = rb.to(tl.int64)
        cc = cp * BC + tl.arange(0, BC)
        w4, c4, i4, j4 = _at(ww, 0), _at(cc, 1), _at(ri, 2), _at(rj, 3)  # x tile [w, c, i, j]
        io, wo, jo, co = _at(ri, 0), _at(ww, 1), _at(rj, 2), _at(cc, 3).to(tl.int64)  # out tile [i, w, j, c]
        mk = (c4 < C) & (i4 < R) & (j4 < R)
        k4 = c4.to(tl.int64) * (R * R) + i4 * R + j4
        xoff = n * sxn + h * sxh + w4.to(tl.int64) * sxw + k4 * sxc
        m = mk & (w4 < W)
        ca = c4
        orow = h * R + io
        mo = (io < R) & (wo < W) & (jo < R) & (co < C)
    else:
        co = cp.to(tl.int64)
        hh = rb * BH + tl.arange(0, BH)
        i4, j4, h4, w4 = _at(ri, 0), _at(rj, 1), _at(hh, 2), _at(ww, 3)  # x tile [i, j, h, w]
        ho, io, wo, jo = _at(hh, 0), _at(ri, 1), _at(ww, 2), _at(rj, 3)  # out tile [h, i, w, j]
        mk = (i4 < R) & (j4 < R)
        k4 = co * (R * R) + i4 * R + j4
        xoff = n * sxn + k4 * sxc + h4.to(tl.int64) * sxh + w4.to(tl.int64) * sxw
        m = mk & (h4 < H) & (w4 < W)
        ca = co
        orow = (ho * R + io).to(tl.int64)
        mo = (ho < H) & (io < R) & (wo < W) & (jo < R)
    ocol = (wo * R + jo).to(tl.int64)
    _shuffle_tile(x_ptr + xoff, m, b_ptr + k4, mk, a_ptr + ca, ca < C,
                  res_ptr + n * srn + co * src + orow * srh + ocol * srw, o_ptr,
                  n * son + co * soc + orow * soh + ocol * sow, mo, HAS_BIAS, ACT, HAS_RES, F64)


# ---- backward / unshuffle -------------------------------------------------------------------------------


@triton.jit
def _backward_act(gy, x, bias, a, ACT: tl.constexpr):
    # -> (grad_x, the prelu slope-gradient terms), with ATen's conventions: relu passes the gradient unless
    # pre <= 0 (NaN passes), prelu takes the slope side unless pre > 0 (0 and NaN -> slope side).
    pre = x + bias
    if ACT == 1:
        gx = tl.where(pre <= 0, 0.0, gy)
    else:
        gx = tl.where(pre > 0, gy, gy * a)
    return gx, tl.where(pre > 0, 0.0, gy * pre)


@triton.jit
def _grad_tile(gy, x_ptrs, m, bias, a, gx_ptr, gxoff, ACT: tl.constexpr, F64: tl.constexpr):
    # grad_x of one tile (x order, gy already permuted there), stored; -> (grad_x, the prelu slope-gradient
    # terms, meaningful with ACT 2 only). Act "none" reads no x.
    gx = gy
    gterm = gy
    if ACT != 0:
        x = _acc(tl.load(x_ptrs, mask=m, other=0.0), F64)
        gx, gterm = _backward_act(gy, x, bias, a, ACT)
    tl.store(gx_ptr + gxoff, gx.to(gx_ptr.dtype.element_ty), mask=m)
    return gx, gterm


@triton.jit
def _ps_bwd_kernel(
    go_ptr, x_ptr, b_ptr, a_ptr, gx_ptr, pgb_ptr, pga_ptr, C, H, W, NWB, NPB, STEPS,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    R: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BIAS_GRAD: tl.constexpr,
    F64: tl.constexpr, NHWC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr,
):
    # The forward tile run backwards: grad_out rows in, grad_x rows out, for STEPS consecutive row blocks (NCHW:
    # BH x rows; NHWC: one x row h, r grad_out rows), so that the per-program partials pgb[n, pb, k] (grad_bias)
    # and pga[n, pb, c] (grad_act_weight) stay a small fraction of grad_x. Per-step tile sums (fixed order).
    pb, rb, cp, n, ri, rj, ww = _program(NWB, RP, BW)
    if NHWC:
        cc = cp * BC + tl.arange(0, BC)
        io, wo, jo, co = _at(ri, 0), _at(ww, 1), _at(rj, 2), _at(cc, 3)  # out order [RP(i), BW, RP(j), BC]
        w4, c4, i4, j4 = _at(ww, 0), _at(cc, 1), _at(ri, 2), _at(rj, 3)  # x order [BW, BC, RP(i), RP(j)]
        mo_ = (io < R) & (wo < W) & (jo < R) & (co < C)
        goff_ = n * sgn + co.to(tl.int64) * sgc + io * sgh + (wo * R + jo).to(tl.int64) * sgw
        mk = (c4 < C) & (i4 < R) & (j4 < R)
        k4 = c4.to(tl.int64) * (R * R) + i4 * R + j4
        m_ = mk & (w4 < W)
        w64 = w4.to(tl.int64)
        bias, a = _params(b_ptr + k4, mk, a_ptr + c4, c4 < C, HAS_BIAS, ACT, F64)
        gb = _acc(tl.zeros([BC, RP, RP], dtype=tl.float32), F64)
        ga = _acc(tl.zeros([BC], dtype=tl.float32), F64)
        for step in range(STEPS):
            h = (rb * STEPS + step).to(tl.int64)
            inside = h < H
            gy = _acc(tl.load(go_ptr + goff_ + h * R * sgh, mask=mo_ & inside, other=0.0), F64)
            gx, gterm = _grad_tile(tl.permute(gy, (1, 3, 0, 2)), x_ptr + n * sxn + h * sxh + w64 * sxw + k4 * sxc,
                                   m_ & inside, bias, a, gx_ptr, n * sdn + h * sdh + w64 * sdw + k4 * sdc, ACT, F64)
            if ACT == 2:
                ga += tl.sum(tl.sum(tl.sum(gterm, axis=3), axis=2), axis=0)
            if BIAS_GRAD:
                gb += tl.sum(gx, axis=0)
        if ACT == 2:
            tl.store(pga_ptr + (n * NPB + pb) * C + cc, ga, mask=cc < C)
        if BIAS_GRAD:
            c3, i3, j3 = cc[:, None, None], ri[None, :, None], rj[None, None, :]
            tl.store(pgb_ptr + (n * NPB + pb) * (C * R * R) + c3 * (R * R) + i3 * R + j3, gb,
                     mask=(c3 < C) & (i3 < R) & (j3 < R))
    else:
        c = cp.to(tl.int64)
        io, wo, jo = _at(ri, 1), _at(ww, 2), _at(rj, 3)  # out order [BH, RP(i), BW, RP(j)]
        i4, j4, w4 = _at(ri, 0), _at(rj, 1), _at(ww, 3).to(tl.int64)  # x order [RP(i), RP(j), BH, BW]
        mij = (i4 < R) & (j4 < R)
        k4 = c * (R * R) + i4 * R + j4
        bias, a = _params(b_ptr + k4, mij, a_ptr + c, c < C, HAS_BIAS, ACT, F64)
        gb = _acc(tl.zeros([RP, RP], dtype=tl.float32), F64)
        ga = _acc(tl.zeros([RP, RP], dtype=tl.float32), F64)
        for step in range(STEPS):
            hh = (rb * STEPS + step) * BH + tl.arange(0, BH)
            ho, h4 = _at(hh, 0), _at(hh, 2).to(tl.int64)
            goff = n * sgn + c * sgc + (ho * R + io).to(tl.int64) * sgh + (wo * R + jo).to(tl.int64) * sgw
            gy = _acc(tl.load(go_ptr + goff, mask=(ho < H) & (io < R) & (wo < W) & (jo < R), other=0.0), F64)
            gx, gterm = _grad_tile(tl.permute(gy, (1, 3, 0, 2)), x_ptr + n * sxn + k4 * sxc + h4 * sxh + w4 * sxw,
                                   mij & (h4 < H) & (w4 < W), bias, a, gx_ptr, n * sdn + k4 * sdc + h4 * sdh + w4 * sdw,
                                   ACT, F64)
            if ACT == 2:
                ga += tl.sum(tl.sum(gterm, axis=3), axis=2)
            if BIAS_GRAD:
                gb += tl.sum(tl.sum(gx, axis=3), axis=2)
        if ACT == 2:
            tl.store(pga_ptr + (n * NPB + pb) * C + c, tl.sum(tl.sum(ga, axis=1), axis=0))
        if BIAS_GRAD:
            i2, j2 = ri[:, None], rj[None, :]
            tl.store(pgb_ptr + (n * NPB + pb) * (C * R * R) + c * (R * R) + i2 * R + j2, gb, mask=(i2 < R) & (j2 < R))


# ---- launchers ------------------------------------------------------------------------------------------


# Backward programs loop over rows until each partial-sum entry stands for >= this many grad_x elements.
_PARTIAL_RATIO = 256


def _strides4(t: Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _warps(tile_elems: int) -> int:
    # 8 warps for full tiles: ptxas (sm_90, 256x256 LR maps) puts 4-warp backward programs at 150-200
    # registers/thread, 8 warps at 80-112, no spills either way. Not timed on a GPU yet.
    return 8 if tile_elems >= cm.TILE else 4


def _tiles_nchw(H: int, W: int, RP: int) -> tuple[int, int]:
    """(BH, BW): whole x-rows first (one long contiguous run per sub-channel), then more rows, ~TILE elements."""
    np2 = triton.next_power_of_2
    bw = min(np2(W), max(1, cm.TILE // (RP * RP)))
    bh = min(np2(H), max(1, cm.TILE // (RP * RP * bw)))
    return bh, bw


def _tiles_nhwc(C: int, W: int, RP: int) -> tuple[int, int]:
    """(BW, BC): all channels of a pixel first (they are one contiguous run of x), then more pixels."""
    np2 = triton.next_power_of_2
    bc = min(np2(C), max(1, cm.TILE // (RP * RP)), cm.MAX_BLOCK_C_CL)
    bw = min(np2(W), max(1, cm.TILE // (RP * RP * bc)))
    return bw, bc


class _Tiling(NamedTuple):
    """Tile and grid pieces of one layout, shared by the forward and backward launches. A row block is what a
    backward program step covers: one x row (NHWC) or BH x rows (NCHW), of BW pixels per w block."""

    blocks: dict  # the kernels' tile meta-args NHWC, BH, BW, BC (NHWC tiles are one x row: BH 1; NCHW: BC 1)
    tile: int  # elements per program tile (num_warps)
    NWB: int  # w blocks per row block
    NRB: int  # row blocks
    NCB: int  # channel programs: channel blocks (NHWC) or one per channel (NCHW)
    pixels: int  # x pixels per (row block, w block), per channel


def _tiling(channels_last: bool, C: int, H: int, W: int, RP: int) -> _Tiling:
    if channels_last:
        BW, BC = _tiles_nhwc(C, W, RP)
        return _Tiling(dict(NHWC=True, BH=1, BW=BW, BC=BC), BW * BC * RP * RP, triton.cdiv(W, BW), H,
                       triton.cdiv(C, BC), BW)
    BH, BW = _tiles_nchw(H, W, RP)
    return _Tiling(dict(NHWC=False, BH=BH, BW=BW, BC=1), BH * BW * RP * RP, triton.cdiv(W, BW), triton.cdiv(H, BH),
                   C, BH * BW)


def _check_common(r: int, act: str, act_weight: Tensor | None, C: int) -> int:
    torch._check(r >= 1, lambda: f"pixel_shuffle: r must be >= 1, got {r}")
    torch._check(act in _ACTS, lambda: f"pixel_shuffle: act must be one of {tuple(_ACTS)}, got {act!r}")
    if act == "prelu":
        torch._check(act_weight is not None and act_weight.numel() == C,
                     lambda: "pixel_shuffle: act 'prelu' needs act_weight with C slopes")
    return _ACTS[act]


def _out_shape(x: Tensor, r: int) -> tuple[int, int, int, int]:
    N, Cin, H, W = x.shape
    torch._check(Cin % (r * r) == 0, lambda: f"pixel_shuffle: {Cin} channels is not a multiple of r*r = {r * r}")
    return N, Cin // (r * r), H * r, W * r


def _empty_out(x: Tensor, r: int, fmt: torch.memory_format) -> Tensor:
    return torch.empty(_out_shape(x, r), dtype=x.dtype, device=x.device, memory_format=fmt)


def _shuffle_into(
    x: Tensor, r: int, bias: Tensor | None, act_weight: Tensor | None, act_id: int, residual: Tensor | None,
    out: Tensor, fmt: torch.memory_format,
) -> None:
    """x in a kernel layout ``fmt``; out any strides. ``out`` may be ``residual`` itself: each element is loaded
    before it is stored, by the same program."""
    N, C, Ho, Wo = out.shape
    H, W = Ho // r, Wo // r
    if out.numel() == 0:
        return
    RP = triton.next_power_of_2(r)
    if residual is not None:
        residual = cm.like_layout(residual, fmt)  # read in the same tile order as out
        if torch._C._overlaps(residual, out) and not (
            residual.storage_offset() == out.storage_offset() and residual.stride() == out.stride()
        ):  # any other overlap would race between programs
            residual = residual.clone(memory_format=fmt)
    b = bias.contiguous() if bias is not None else x
    a = act_weight.reshape(-1).contiguous() if act_weight is not None else x
    res = residual if residual is not None else x
    common = dict(R=r, RP=RP, HAS_BIAS=bias is not None, ACT=act_id, HAS_RES=residual is not None,
                  F64=x.dtype == torch.float64)
    strides = (*x.stride(), *_strides4(residual), *out.stride())
    nhwc = fmt == torch.channels_last
    t = _tiling(nhwc, C, H, W, RP)
    wrap_triton(_ps_fwd_kernel)[(t.NWB * t.NRB, t.NCB, N)](
        x, b, a, res, out, C, H, W, t.NWB, *strides, **common, **t.blocks, num_warps=_warps(t.tile))


def _unshuffle(
    grad_out: Tensor, x: Tensor | None, r: int, bias: Tensor | None, act_weight: Tensor | None, act_id: int,
    fmt: torch.memory_format, need_bias_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """grad_x (in ``fmt``) and the acc grad_bias [C*r*r] / grad_act_weight [C] (None when not asked for)."""
    N, C, Ho, Wo = grad_out.shape
    torch._check(Ho % r == 0 and Wo % r == 0, lambda: f"pixel_shuffle: {Ho}x{Wo} is not divisible by r = {r}")
    H, W = Ho // r, Wo // r
    Cin = C * r * r
    acc = cm.acc_dtype(grad_out.dtype)
    grad_x = torch.empty((N, Cin, H, W), dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt)
    RP = triton.next_power_of_2(r)
    reduce = need_bias_grad or act_id == 2
    nhwc = fmt == torch.channels_last
    t = _tiling(nhwc, C, H, W, RP)
    # with reductions, a program runs several row blocks: partials ~ 1/_PARTIAL_RATIO of grad_x
    steps = max(1, min(t.NRB, triton.cdiv(_PARTIAL_RATIO, t.pixels))) if reduce else 1
    grid = (t.NWB * triton.cdiv(t.NRB, steps), t.NCB, N)
    geo = (C, H, W, t.NWB)
    NPB = grid[0]
    pgb = grad_out.new_empty((N * NPB, Cin), dtype=acc) if need_bias_grad else None
    pga = grad_out.new_empty((N * NPB, C), dtype=acc) if act_id == 2 else None
    if grad_x.numel() > 0:
        wrap_triton(_ps_bwd_kernel)[grid](
            grad_out, x if x is not None else grad_out,
            bias.contiguous() if bias is not None else grad_out,
            act_weight.reshape(-1).contiguous() if act_weight is not None else grad_out,
            grad_x, pgb if pgb is not None else grad_x, pga if pga is not None else grad_x,
            *geo, NPB, steps, *grad_out.stride(), *_strides4(x), *grad_x.stride(),
            R=r, RP=RP, HAS_BIAS=bias is not None, ACT=act_id, BIAS_GRAD=need_bias_grad,
            F64=grad_out.dtype == torch.float64, **t.blocks, num_warps=_warps(t.tile),
        )
    return grad_x, _merge(pgb, Cin, N * NPB, grad_x.numel() > 0), _merge(pga, C, N * NPB, grad_x.numel() > 0)


def _merge(partials: Tensor | None, K: int, rows: int, launched: bool) -> Tensor | None:
    """Sum [rows, K] partials over rows in a fixed order -> [K] (zeros for an empty batch)."""
    if partials is None:
        return None
    if not launched or rows == 0:
        return partials.new_zeros((K,))
    total = partials.new_empty((K,))
    cm.merge_partials(partials, partials, total, K, 1, rows, 1, 1, batches=1)
    return total


# ---- ops ------------------------------------------------------------------------------------------------


def pixel_shuffle(
    x: Tensor, r: int, bias: Tensor | None, act_weight: Tensor | None, act: str, residual: Tensor | None
) -> Tensor:
    torch._check(x.dim() == 4, lambda: "pixel_shuffle: x must be [N, C*r*r, H, W]")
    x, fmt = cm.kernel_layout(x)
    out = _empty_out(x, r, fmt)
    act_id = _check_common(r, act, act_weight, out.shape[1])
    _shuffle_into(x, r, bias, act_weight, act_id, residual, out, fmt)
    return out


def pixel_shuffle_out(
    x: Tensor, r: int, bias: Tensor | None, act_weight: Tensor | None, act: str, residual: Tensor | None,
    out: Tensor,
) -> None:
    torch._check(x.dim() == 4, lambda: "pixel_shuffle_out: x must be [N, C*r*r, H, W]")
    torch._check(not torch._C._overlaps(out, x), lambda: "pixel_shuffle_out: out must not overlap x")
    x, fmt = cm.kernel_layout(x)
    shape = _out_shape(x, r)
    torch._check(tuple(out.shape) == shape, lambda: f"pixel_shuffle_out: out must have shape {list(shape)}")
    act_id = _check_common(r, act, act_weight, shape[1])
    if out.is_contiguous(memory_format=fmt):
        _shuffle_into(x, r, bias, act_weight, act_id, residual, out, fmt)
    else:  # other layouts through a temporary (docs/ops.md)
        tmp = _empty_out(x, r, fmt)
        _shuffle_into(x, r, bias, act_weight, act_id, residual, tmp, fmt)
        out.copy_(tmp)


def pixel_shuffle_backward(
    grad_out: Tensor, x: Tensor | None, r: int, bias: Tensor | None, act_weight: Tensor | None, act: str
) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(grad_out.dim() == 4, lambda: "pixel_shuffle_backward: grad_out must be [N, C, H*r, W*r]")
    act_id = _check_common(r, act, act_weight, grad_out.shape[1])
    torch._check(act_id == 0 or x is not None, lambda: f"pixel_shuffle_backward: act {act!r} needs x")
    if x is not None:
        x, fmt = cm.kernel_layout(x)
        grad_out = cm.like_layout(grad_out, fmt)
    else:
        grad_out, fmt = cm.kernel_layout(grad_out)
    # with act "none" the gradient does not depend on x: it is not read
    grad_x, gb, ga = _unshuffle(grad_out, x if act_id else None, r, bias, act_weight, act_id, fmt, bias is not None)
    return (
        grad_x,
        gb.to(bias.dtype) if bias is not None else grad_out.new_empty((0,)),
        ga.to(act_weight.dtype).reshape(act_weight.shape) if act_id == 2 else grad_out.new_empty((0,)),
    )


def pixel_unshuffle(x: Tensor, r: int) -> Tensor:
    torch._check(x.dim() == 4, lambda: "pixel_unshuffle: x must be [N, C, H*r, W*r]")
    torch._check(r >= 1, lambda: f"pixel_unshuffle: r must be >= 1, got {r}")
    x, fmt = cm.kernel_layout(x)
    return _unshuffle(x, None, r, None, None, 0, fmt, False)[0]
