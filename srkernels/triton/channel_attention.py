"""Triton ``channel_attention`` forward/backward (RCAN CALayer, IMDN contrast attention), registered as
``torch.ops.srkernels_triton.channel_attention[_backward|_out]``. Contract: docs/ops.md.

Passes: stats (per-pixel-block channel partials) -> merge (fixed-order, Chan for std) -> MLP (torch, acc)
-> scale. Backward: dg partials -> merge -> MLP backward (torch, acc) -> grad_x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _common as cm


@triton.jit
def _ca_stats_kernel(
    x_ptr, psum_ptr, pm2_ptr, C, HW, NPB, sxn, sxc, sxp,
    WITH_M2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One tile per program -> per-block channel sums, and centred sums of squares (two-pass on the tile in
    # registers) so that blocks merge without E[x^2] - E[x]^2 cancellation.
    pb, n, offs_c, _, mc, _, mask, c64, p64 = cm.tile_2d(C, HW, BLOCK_C, BLOCK_P)
    acc_ty = psum_ptr.dtype.element_ty
    x = tl.load(x_ptr + n * sxn + c64 * sxc + p64 * sxp, mask=mask, other=0.0).to(acc_ty)
    s = tl.sum(x, axis=1)
    out = (n * NPB + pb) * C + offs_c
    tl.store(psum_ptr + out, s, mask=mc)
    if WITH_M2:
        cnt = tl.minimum(HW - pb * BLOCK_P, BLOCK_P).to(acc_ty)
        d = tl.where(mask, x - (s / cnt)[:, None], 0.0)
        tl.store(pm2_ptr + out, tl.sum(d * d, axis=1), mask=mc)


@triton.jit
def _ca_scale_kernel(
    x_ptr, g_ptr, r_ptr, o_ptr, C, HW, sxn, sxc, sxp, srn, src, srp,
    HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # out = x * g[n, c] (+ residual) in acc, rounded once; out has x's strides.
    _, n, offs_c, _, mc, _, mask, c64, p64 = cm.tile_2d(C, HW, BLOCK_C, BLOCK_P)
    xoff = n * sxn + c64 * sxc + p64 * sxp
    g = tl.load(g_ptr + n * C + offs_c, mask=mc, other=0.0)
    y = tl.load(x_ptr + xoff, mask=mask, other=0.0).to(g.dtype) * g[:, None]
    if HAS_RES:
        y += tl.load(r_ptr + n * srn + c64 * src + p64 * srp, mask=mask, other=0.0).to(g.dtype)
    tl.store(o_ptr + xoff, y.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ca_dg_kernel(
    go_ptr, x_ptr, pdg_ptr, C, HW, NPB, sgn, sgc, sgp, sxn, sxc, sxp,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Per-block partials of dg[n, c] = sum_p grad_out * x.
    pb, n, offs_c, _, mc, _, mask, c64, p64 = cm.tile_2d(C, HW, BLOCK_C, BLOCK_P)
    acc_ty = pdg_ptr.dtype.element_ty
    go = tl.load(go_ptr + n * sgn + c64 * sgc + p64 * sgp, mask=mask, other=0.0).to(acc_ty)
    x = tl.load(x_ptr + n * sxn + c64 * sxc + p64 * sxp, mask=mask, other=0.0).to(acc_ty)
    tl.store(pdg_ptr + (n * NPB + pb) * C + offs_c, tl.sum(go * x, axis=1), mask=mc)


@triton.jit
def _ca_grad_x_kernel(
    go_ptr, x_ptr, coef_ptr, gx_ptr, C, HW, sgn, sgc, sgp, sxn, sxc, sxp,
    WITH_STD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grad_x = go * g + ds/HW (+ ds/(HW std) * (x - mean)); coef[n] rows: g, ds/HW (, ds/(HW std), mean).
    _, n, offs_c, _, mc, _, mask, c64, p64 = cm.tile_2d(C, HW, BLOCK_C, BLOCK_P)
    n_rows: tl.constexpr = 4 if WITH_STD else 2
    cptr = coef_ptr + n * n_rows * C + offs_c
    g = tl.load(cptr, mask=mc, other=0.0)
    a = tl.load(cptr + C, mask=mc, other=0.0)
    go = tl.load(go_ptr + n * sgn + c64 * sgc + p64 * sgp, mask=mask, other=0.0).to(g.dtype)
    xoff = n * sxn + c64 * sxc + p64 * sxp
    y = go * g[:, None] + a[:, None]
    if WITH_STD:
        b = tl.load(cptr + 2 * C, mask=mc, other=0.0)
        mu = tl.load(cptr + 3 * C, mask=mc, other=0.0)
        x = tl.load(x_ptr + xoff, mask=mask, other=0.0).to(g.dtype)
        y += b[:, None] * (x - mu[:, None])
    tl.store(gx_ptr + xoff, y.to(gx_ptr.dtype.element_ty), mask=mask)


def _check_pool(pool: str) -> bool:
    torch._check(pool in ("avg", "avg+std"), lambda: f"channel_attention: pool must be avg or avg+std, not {pool!r}")
    return pool == "avg+std"


def _pool_stats(x: Tensor, with_std: bool) -> Tensor:
    """stats [N, P, C] acc: mean (and population std)."""
    N, C, _, _, HW, (sxn, sxc, sxp), BC, BP, NPB, NCB = cm.geometry(x)
    acc = cm.acc_dtype(x.dtype)
    P = 2 if with_std else 1
    psum = x.new_empty((N, NPB, C), dtype=acc)
    pm2 = x.new_empty((N, NPB, C), dtype=acc) if with_std else psum
    stats = x.new_empty((N, P, C), dtype=acc)
    if x.numel() > 0:
        wrap_triton(_ca_stats_kernel)[(NPB, NCB, N)](
            x, psum, pm2, C, HW, NPB, sxn, sxc, sxp, WITH_M2=with_std, BLOCK_C=BC, BLOCK_P=BP
        )
    if N > 0 and C > 0:  # also for H * W == 0: 0 / 0 = nan, like the reference mean
        cm.merge_partials(psum, pm2, stats, C, HW, NPB, BP, HW, batches=N, with_m2=with_std)
    return stats


def _forward(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    residual: Tensor | None,
    act_weight: Tensor | None,
    pool: str,
    out: Tensor | None,
    op: str,
) -> tuple[Tensor, Tensor]:
    """The forward of both ops -> (result, stats). With ``out`` (the ``_out`` op) the result is written into
    ``out``: directly when it has x's kernel layout, else through a temporary copied into it."""
    torch._check(x.dim() == 4, lambda: f"{op}: x must be [N, C, H, W]")
    with_std = _check_pool(pool)
    x, fmt, dst, residual = cm.forward_operands(x, residual, out, op)
    stats = _pool_stats(x, with_std)
    s = stats[:, 0] + stats[:, 1] if with_std else stats[:, 0]
    _, _, g = cm.mlp_forward(s, w1, b1, w2, b2, act_weight)
    g = g.contiguous()

    N, C, _, _, HW, (sxn, sxc, sxp), BC, BP, NPB, NCB = cm.geometry(x)
    res, (srn, src, srp) = cm.residual_operand(residual, x)
    if x.numel() > 0:
        wrap_triton(_ca_scale_kernel)[(NPB, NCB, N)](
            x, g, res, dst, C, HW, sxn, sxc, sxp, srn, src, srp,
            HAS_RES=residual is not None, BLOCK_C=BC, BLOCK_P=BP,
        )
    cm.finish_out(out, dst)
    return dst, stats


# The registered ops, with their schema's arguments spelt out (SPEC in srkernels/ops/channel_attention.py):
# torch 2.13's triton_op infers a schema from the signature even when given one, and refuses *args.
def channel_attention(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, residual: Tensor | None,
    act_weight: Tensor | None, pool: str,
) -> tuple[Tensor, Tensor]:
    return _forward(x, w1, b1, w2, b2, residual, act_weight, pool, None, "channel_attention")


def channel_attention_out(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, residual: Tensor | None,
    act_weight: Tensor | None, pool: str, out: Tensor,
) -> None:
    _forward(x, w1, b1, w2, b2, residual, act_weight, pool, out, "channel_attention_out")


def channel_attention_backward(
    grad_out: Tensor,
    x: Tensor,
    stats: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    act_weight: Tensor | None,
    pool: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    torch._check(x.dim() == 4, lambda: "channel_attention_backward: x must be [N, C, H, W]")
    with_std = _check_pool(pool)
    x, grad_out, geo, (sgn, sgc, sgp), acc = cm.backward_operands(x, grad_out)
    N, C, _, _, HW, (sxn, sxc, sxp), BC, BP, NPB, NCB = geo

    # dg[n, c] = sum_p grad_out * x, reduced in fixed order.
    pdg = x.new_empty((N, NPB, C), dtype=acc)
    dg = x.new_empty((N, 1, C), dtype=acc)
    if x.numel() > 0:
        wrap_triton(_ca_dg_kernel)[(NPB, NCB, N)](
            grad_out, x, pdg, C, HW, NPB, sgn, sgc, sgp, sxn, sxc, sxp, BLOCK_C=BC, BLOCK_P=BP
        )
    if N > 0 and C > 0:
        cm.merge_partials(pdg, pdg, dg, C, HW, NPB, BP, 1, batches=N)
    dg = dg[:, 0]

    stats = stats.to(acc)
    mean = stats[:, 0]
    s = mean + stats[:, 1] if with_std else mean
    h, a, g = cm.mlp_forward(s, w1, b1, w2, b2, act_weight)
    ds, gw1, gb1, gw2, gb2, gaw = cm.mlp_backward(dg, s, h, a, g, w1, w2, act_weight)

    rows = [g, ds / HW]
    if with_std:
        std = stats[:, 1]
        zero = std == 0
        # the std gradient is defined as 0 where std == 0 (as in the reference); a NaN std gives NaN
        rows += [torch.where(zero, torch.zeros_like(std), ds / (HW * torch.where(zero, torch.ones_like(std), std))),
                 mean]
    coef = torch.stack(rows, 1).contiguous()
    grad_x = torch.empty_like(x)
    if x.numel() > 0:
        wrap_triton(_ca_grad_x_kernel)[(NPB, NCB, N)](
            grad_out, x, coef, grad_x, C, HW, sgn, sgc, sgp, sxn, sxc, sxp,
            WITH_STD=with_std, BLOCK_C=BC, BLOCK_P=BP,
        )

    wdt = w1.dtype
    empty = w1.new_empty((0,))
    return (
        grad_x,
        gw1.to(wdt).reshape(w1.shape),
        gb1.to(b1.dtype).reshape(b1.shape) if b1 is not None else empty,
        gw2.to(w2.dtype).reshape(w2.shape),
        gb2.to(b2.dtype).reshape(b2.shape) if b2 is not None else empty.clone(),
        gaw.to(act_weight.dtype) if act_weight is not None else empty.clone(),
    )
