"""Triton ``balanced_attention`` (BAM: ACAM x MSAM) forward/backward, registered as
``torch.ops.srkernels_triton.balanced_attention[_backward|_out]``. Contract: docs/ops.md.

Forward: one read of x gives per-block channel sums and the per-pixel channel max -> fixed-order merge ->
channel MLP (torch, acc) and KxK correlation of the max map (small kernel) -> scale.
Backward: one read of (grad_out, x) gives dca partials, dt = dsa * sa * (1 - sa) and the argmax channel ->
MLP backward (torch, acc), correlation backward (small kernels) -> grad_x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _common as cm


@triton.jit
def _bam_stats_kernel(
    x_ptr, psum_ptr, max_ptr, C, HW, NPB, sxn, sxc, sxp,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One pixel block per program, all channels: per-block channel sums and maxmap[n, p] = max_c x.
    pb, n, offs_p, mp = cm.pixel_block(HW, BLOCK_P)
    acc_ty = psum_ptr.dtype.element_ty
    xbase = x_ptr + n * sxn + offs_p.to(tl.int64)[None, :] * sxp
    obase = (n * NPB + pb) * C
    mx = tl.full([BLOCK_P], float("-inf"), acc_ty)
    for c0 in range(0, C, BLOCK_C):
        offs_c, mc, mask = cm.channel_chunk(c0, C, mp, BLOCK_C)
        x = tl.load(xbase + offs_c.to(tl.int64)[:, None] * sxc, mask=mask, other=float("-inf")).to(acc_ty)
        # NaN-propagating, as torch.max (tl.max / tl.maximum may drop NaN): a NaN anywhere in the column wins
        cmax = tl.max(x, axis=0)
        has_nan = tl.max(tl.where(mask & (x != x), 1, 0), axis=0) > 0
        mx = tl.where(has_nan | (mx != mx), float("nan"), tl.maximum(mx, cmax))
        tl.store(psum_ptr + obase + offs_c, tl.sum(tl.where(mask, x, 0.0), axis=1), mask=mc)
    tl.store(max_ptr + n * HW + offs_p, mx, mask=mp)


@triton.jit
def _map_window(H, W, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    # The KxK windows of the map kernels below: program (pixel block pb, sample n) of an [N, H, W] map ->
    # pb, n (int64), H*W, the block's pixels and mask, their rows, the tap columns j (and mask), and the
    # [BLOCK, K_PAD] source columns x + j - K//2 with where they lie inside the map.
    pb = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    HW = H * W
    offs = pb * BLOCK + tl.arange(0, BLOCK)
    m = offs < HW
    yy = offs // W
    offs_j = tl.arange(0, K_PAD)
    mj = offs_j < K
    sx = (offs % W)[:, None] + (offs_j - K // 2)[None, :]
    okx = m[:, None] & mj[None, :] & (sx >= 0) & (sx < W)
    return pb, n, HW, offs, m, yy, offs_j, mj, sx, okx


@triton.jit
def _map_window_row(base, i, yy, sx, okx, H, W, K: tl.constexpr):
    # Kernel row i of every window: [BLOCK, K_PAD] values map[y + i - K//2, x + j - K//2] (0 outside the map).
    sy = yy + (i - K // 2)
    ok = okx & ((sy >= 0) & (sy < H))[:, None]
    return tl.load(base + sy[:, None] * W + sx, mask=ok, other=0.0)


@triton.jit
def _sa_corr_kernel(
    in_ptr, w_ptr, out_ptr, H, W,
    K: tl.constexpr, K_PAD: tl.constexpr, SIGMOID: tl.constexpr, BLOCK: tl.constexpr,
):
    # out[n, y, x] = sum_ij w[i, j] * in[n, y + i - K//2, x + j - K//2] (zero padding), opt. sigmoid.
    # One kernel row per step as a [BLOCK, K_PAD] gather (the map is tiny and cache-resident).
    _, n, HW, offs, m, yy, offs_j, mj, sx, okx = _map_window(H, W, K, K_PAD, BLOCK)
    acc_ty = out_ptr.dtype.element_ty
    base = in_ptr + n * HW
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for i in range(K):
        v = _map_window_row(base, i, yy, sx, okx, H, W, K)
        w = tl.load(w_ptr + i * K + offs_j, mask=mj, other=0.0)
        acc += tl.sum(v * w[None, :], axis=1)
    if SIGMOID:
        acc = 1.0 / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + n * HW + offs, acc, mask=m)


@triton.jit
def _sa_wgrad_kernel(
    map_ptr, dt_ptr, part_ptr, H, W, NPB,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # Per-block partials of grad_w[i, j] = sum_p dt[n, p] * map_padded[n, p + (i, j) - K//2].
    pb, n, HW, offs, m, yy, offs_j, mj, sx, okx = _map_window(H, W, K, K_PAD, BLOCK)
    dt = tl.load(dt_ptr + n * HW + offs, mask=m, other=0.0)
    base = map_ptr + n * HW
    pbase = part_ptr + (n * NPB + pb) * (K * K)
    for i in range(K):
        v = _map_window_row(base, i, yy, sx, okx, H, W, K)
        tl.store(pbase + i * K + offs_j, tl.sum(v * dt[:, None], axis=0), mask=mj)


@triton.jit
def _bam_scale_kernel(
    x_ptr, ca_ptr, sa_ptr, r_ptr, o_ptr, C, HW, sxn, sxc, sxp, srn, src, srp,
    HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # out = x * ca[n, c] * sa[n, p] (+ residual) in acc, rounded once; out has x's strides.
    _, n, offs_c, offs_p, mc, mp, mask, c64, p64 = cm.tile_2d(C, HW, BLOCK_C, BLOCK_P)
    xoff = n * sxn + c64 * sxc + p64 * sxp
    ca = tl.load(ca_ptr + n * C + offs_c, mask=mc, other=0.0)
    sa = tl.load(sa_ptr + n * HW + offs_p, mask=mp, other=0.0)
    y = tl.load(x_ptr + xoff, mask=mask, other=0.0).to(ca.dtype) * ca[:, None] * sa[None, :]
    if HAS_RES:
        y += tl.load(r_ptr + n * srn + c64 * src + p64 * srp, mask=mask, other=0.0).to(ca.dtype)
    tl.store(o_ptr + xoff, y.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bam_bwd_reduce_kernel(
    go_ptr, x_ptr, ca_ptr, sa_ptr, max_ptr, pdca_ptr, dt_ptr, amax_ptr, C, HW, NPB,
    sgn, sgc, sgp, sxn, sxc, sxp,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One pixel block, all channels: dca partials (sum_p go*x*sa), dt = (sum_c go*x*ca) * sa * (1 - sa), and
    # the lowest channel index attaining the max (where the max gradient goes).
    pb, n, offs_p, mp = cm.pixel_block(HW, BLOCK_P)
    acc_ty = pdca_ptr.dtype.element_ty
    p64 = offs_p.to(tl.int64)[None, :]
    sa = tl.load(sa_ptr + n * HW + offs_p, mask=mp, other=0.0)
    mx = tl.load(max_ptr + n * HW + offs_p, mask=mp, other=0.0)
    dsa = tl.zeros([BLOCK_P], dtype=acc_ty)
    amax = tl.full([BLOCK_P], C, tl.int32)
    obase = (n * NPB + pb) * C
    for c0 in range(0, C, BLOCK_C):
        offs_c, mc, mask = cm.channel_chunk(c0, C, mp, BLOCK_C)
        c64 = offs_c.to(tl.int64)[:, None]
        go = tl.load(go_ptr + n * sgn + c64 * sgc + p64 * sgp, mask=mask, other=0.0).to(acc_ty)
        x = tl.load(x_ptr + n * sxn + c64 * sxc + p64 * sxp, mask=mask, other=0.0).to(acc_ty)
        ca = tl.load(ca_ptr + n * C + offs_c, mask=mc, other=0.0)
        prod = go * x
        tl.store(pdca_ptr + obase + offs_c, tl.sum(prod * sa[None, :], axis=1), mask=mc)
        dsa += tl.sum(prod * ca[:, None], axis=0)
        # the argmax of torch.max: the first channel equal to the max, or the first NaN when the max is NaN
        hit = mask & ((x == mx[None, :]) | ((x != x) & (mx != mx)[None, :]))
        amax = tl.minimum(amax, tl.min(tl.where(hit, offs_c[:, None], C), axis=0))
    tl.store(dt_ptr + n * HW + offs_p, dsa * sa * (1.0 - sa), mask=mp)
    tl.store(amax_ptr + n * HW + offs_p, amax, mask=mp)


@triton.jit
def _bam_grad_x_kernel(
    go_ptr, x_ptr, ca_ptr, sa_ptr, dmh_ptr, amax_ptr, dmax_ptr, gx_ptr, C, HW,
    sgn, sgc, sgp, sxn, sxc, sxp,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grad_x = go * ca * sa + dmean/HW + (c == argmax) * dmax; gx has x's strides.
    _, n, offs_c, offs_p, mc, mp, mask, c64, p64 = cm.tile_2d(C, HW, BLOCK_C, BLOCK_P)
    ca = tl.load(ca_ptr + n * C + offs_c, mask=mc, other=0.0)
    dmh = tl.load(dmh_ptr + n * C + offs_c, mask=mc, other=0.0)
    sa = tl.load(sa_ptr + n * HW + offs_p, mask=mp, other=0.0)
    am = tl.load(amax_ptr + n * HW + offs_p, mask=mp, other=0)
    dmax = tl.load(dmax_ptr + n * HW + offs_p, mask=mp, other=0.0)
    go = tl.load(go_ptr + n * sgn + c64 * sgc + p64 * sgp, mask=mask, other=0.0).to(ca.dtype)
    y = go * ca[:, None] * sa[None, :] + dmh[:, None]
    y += tl.where(offs_c[:, None] == am[None, :], dmax[None, :], 0.0)
    tl.store(gx_ptr + n * sxn + c64 * sxc + p64 * sxp, y.to(gx_ptr.dtype.element_ty), mask=mask)


def _check_w_sa(w_sa: Tensor) -> int:
    K = w_sa.shape[-1]
    torch._check(w_sa.numel() == K * K and K % 2 == 1, lambda: "balanced_attention: w_sa must be [K, K], K odd")
    return K


def _spatial_gate(maxmap: Tensor, w_sa: Tensor, K: int, H: int, W: int) -> Tensor:
    """sa = sigmoid(corr(maxmap, w_sa)) [N, H*W] acc."""
    N = maxmap.shape[0]
    w = w_sa.reshape(-1).to(maxmap.dtype).contiguous()
    sa = torch.empty_like(maxmap)
    if maxmap.numel() > 0:
        MB = cm.map_block(H * W, K)
        wrap_triton(_sa_corr_kernel)[(triton.cdiv(H * W, MB), N)](
            maxmap, w, sa, H, W, K=K, K_PAD=triton.next_power_of_2(K), SIGMOID=True, BLOCK=MB
        )
    return sa


def _forward(
    x: Tensor, w1: Tensor, prelu_w: Tensor, w2: Tensor, w_sa: Tensor, residual: Tensor | None,
    out: Tensor | None, op: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward of both ops -> (result, mean, maxmap). With ``out`` (the ``_out`` op) the result is written
    into ``out``: directly when it has x's kernel layout, else through a temporary copied into it."""
    torch._check(x.dim() == 4, lambda: f"{op}: x must be [N, C, H, W]")
    K = _check_w_sa(w_sa)
    x, fmt, dst, residual = cm.forward_operands(x, residual, out, op)
    N, C, H, W, HW, (sxn, sxc, sxp), BC, BP, NPB, NCB = cm.geometry(x)
    acc = cm.acc_dtype(x.dtype)

    psum = x.new_empty((N, NPB, C), dtype=acc)
    mean = x.new_empty((N, C), dtype=acc)
    maxmap = x.new_empty((N, H, W), dtype=acc)
    if x.numel() > 0:
        wrap_triton(_bam_stats_kernel)[(NPB, N)](x, psum, maxmap, C, HW, NPB, sxn, sxc, sxp, BLOCK_C=BC, BLOCK_P=BP)
    if N > 0 and C > 0:  # also for H * W == 0: 0 / 0 = nan, like the reference mean
        cm.merge_partials(psum, psum, mean, C, HW, NPB, BP, HW, batches=N)

    _, _, ca = cm.mlp_forward(mean, w1, None, w2, None, prelu_w)
    ca = ca.contiguous()
    sa = _spatial_gate(maxmap.view(N, HW), w_sa, K, H, W)

    res, (srn, src, srp) = cm.residual_operand(residual, x)
    if x.numel() > 0:
        wrap_triton(_bam_scale_kernel)[(NPB, NCB, N)](
            x, ca, sa, res, dst, C, HW, sxn, sxc, sxp, srn, src, srp,
            HAS_RES=residual is not None, BLOCK_C=BC, BLOCK_P=BP,
        )
    cm.finish_out(out, dst)
    return dst, mean, maxmap


# The registered ops, with their schema's arguments spelt out (SPEC in srkernels/ops/balanced_attention.py):
# torch 2.13's triton_op infers a schema from the signature even when given one, and refuses *args.
def balanced_attention(
    x: Tensor, w1: Tensor, prelu_w: Tensor, w2: Tensor, w_sa: Tensor, residual: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(x, w1, prelu_w, w2, w_sa, residual, None, "balanced_attention")


def balanced_attention_out(
    x: Tensor, w1: Tensor, prelu_w: Tensor, w2: Tensor, w_sa: Tensor, residual: Tensor | None, out: Tensor
) -> None:
    _forward(x, w1, prelu_w, w2, w_sa, residual, out, "balanced_attention_out")


def balanced_attention_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    maxmap: Tensor,
    w1: Tensor,
    prelu_w: Tensor,
    w2: Tensor,
    w_sa: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    torch._check(x.dim() == 4, lambda: "balanced_attention_backward: x must be [N, C, H, W]")
    K = _check_w_sa(w_sa)
    x, grad_out, geo, (sgn, sgc, sgp), acc = cm.backward_operands(x, grad_out)
    N, C, H, W, HW, (sxn, sxc, sxp), BC, BP, NPB, NCB = geo
    mean = mean.reshape(N, C).to(acc)
    maxmap = maxmap.reshape(N, HW).to(acc).contiguous()

    h, a, ca = cm.mlp_forward(mean, w1, None, w2, None, prelu_w)
    ca = ca.contiguous()
    sa = _spatial_gate(maxmap, w_sa, K, H, W)

    pdca = x.new_empty((N, NPB, C), dtype=acc)
    dca = x.new_empty((N, C), dtype=acc)
    dt = x.new_empty((N, HW), dtype=acc)
    amax = x.new_empty((N, HW), dtype=torch.int32)
    if x.numel() > 0:
        wrap_triton(_bam_bwd_reduce_kernel)[(NPB, N)](
            grad_out, x, ca, sa, maxmap, pdca, dt, amax, C, HW, NPB, sgn, sgc, sgp, sxn, sxc, sxp,
            BLOCK_C=BC, BLOCK_P=BP,
        )
    if N > 0 and C > 0:
        cm.merge_partials(pdca, pdca, dca, C, HW, NPB, BP, 1, batches=N)

    dmean, gw1, _, gw2, _, gpw = cm.mlp_backward(dca, mean, h, a, ca, w1, w2, prelu_w)
    dmh = (dmean / HW).contiguous()

    # Spatial branch: dmax = corr(dt, flipped w_sa) (= conv_transpose2d), grad_w_sa from block partials.
    KK = K * K
    dmax = torch.empty_like(dt)
    gws = x.new_zeros((1, 1, KK), dtype=acc)
    if x.numel() > 0:
        MB = cm.map_block(HW, K)
        NMB = triton.cdiv(HW, MB)
        wflip = w_sa.reshape(K, K).flip(0, 1).reshape(-1).to(acc).contiguous()
        wrap_triton(_sa_corr_kernel)[(NMB, N)](
            dt, wflip, dmax, H, W, K=K, K_PAD=triton.next_power_of_2(K), SIGMOID=False, BLOCK=MB
        )
        pw = x.new_empty((N, NMB, KK), dtype=acc)
        wrap_triton(_sa_wgrad_kernel)[(NMB, N)](
            maxmap, dt, pw, H, W, NMB, K=K, K_PAD=triton.next_power_of_2(K), BLOCK=MB
        )
        # the N * NMB block partials of each tap, summed in fixed order (all KK taps in one program)
        cm.merge_partials(pw, pw, gws, KK, 1, N * NMB, 1, 1, batches=1, block_c=triton.next_power_of_2(KK))

    grad_x = torch.empty_like(x)
    if x.numel() > 0:
        wrap_triton(_bam_grad_x_kernel)[(NPB, NCB, N)](
            grad_out, x, ca, sa, dmh, amax, dmax, grad_x, C, HW, sgn, sgc, sgp, sxn, sxc, sxp,
            BLOCK_C=BC, BLOCK_P=BP,
        )
    return (
        grad_x,
        gw1.to(w1.dtype).reshape(w1.shape),
        gpw.to(prelu_w.dtype),
        gw2.to(w2.dtype).reshape(w2.shape),
        gws.to(w_sa.dtype).reshape(w_sa.shape),
    )
