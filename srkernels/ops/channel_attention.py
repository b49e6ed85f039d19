"""``channel_attention``: pool -> FC -> act -> FC -> sigmoid -> scale (+ residual), one fused op.

Covers RCAN's CALayer (avg pool, ReLU, biased FCs) with the RCAB residual add fused in, and the
contrast-aware attention of the RDCAB Split / FD-IRB models (``pool="avg+std"``). Kernel contract:
docs/ops.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import functional as RF
from . import _checks, _dispatch
from .._util import acc_dtype
from ._registry import OpSpec

OP = "channel_attention"
ACTS = ("relu", "prelu")
POOLS = ("avg", "avg+std")


# the signature of the reference (srkernels/reference/functional.py) plus ``out``: tests/ops/test_registry.py
def channel_attention(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, *,
                      residual: Tensor | None = None, act: str = "relu", act_weight: Tensor | None = None,
                      pool: str = "avg", out: Tensor | None = None) -> Tensor:
    """``x * sigmoid(W2 . act(W1 . pool(x) + b1) + b2) (+ residual)``.

    Args:
        x: ``[N, C, H, W]`` float64/float32/bfloat16/float16, contiguous or channels_last.
        w1, b1: first FC, ``(Cr, C)`` or 1x1-conv ``(Cr, C, 1, 1)``; bias ``(Cr,)`` or None.
        w2, b2: second FC, ``(C, Cr)`` or ``(C, Cr, 1, 1)``; bias ``(C,)`` or None.
        residual: optional ``[N, C, H, W]`` tensor added to the result (RCAB's identity).
        act: ``"relu"`` or ``"prelu"`` (then ``act_weight`` holds 1 or ``Cr`` slopes).
        pool: ``"avg"`` (RCAN) or ``"avg+std"`` (mean + population std, contrast-aware attention).
        out: optional caller-owned result buffer (inference only; may be ``residual`` itself).

    Returns a tensor shaped like ``x``, in ``x``'s memory format (or ``out``).
    """
    _checks.feature_map("x", x)
    if out is None:  # with out=, the buffer fixes the dtype (no autocast)
        x, w1, b1, w2, b2, residual, act_weight = _dispatch.autocast_args(OP, x, w1, b1, w2, b2, residual,
                                                                          act_weight)
    args = checked_args(x, w1, b1, w2, b2, residual, act, act_weight, pool)
    x, w1, b1, w2, b2, residual, act_weight, pool = args
    backend = _dispatch.choose(OP, x.device.type)
    return _dispatch.run(
        backend, OP, args,
        lambda: RF.channel_attention(x, w1, b1, w2, b2, residual=residual, act=act, act_weight=act_weight, pool=pool),
        out, saves=True, names=("x", "w1", "b1", "w2", "b2", "residual", "act_weight", "pool"),
    )


def checked_args(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, residual: Tensor | None,
                 act: str, act_weight: Tensor | None, pool: str) -> tuple:
    """The dispatcher op's arguments ``(x, w1, b1, w2, b2, residual, act_weight, pool)`` after the front end's
    checks (FCs as matrices); raises as ``channel_attention`` does. For callers that keep them per layer and
    skip the checks while nothing changed (srkernels/nn/attention.py)."""
    w1, w2, C, Cr = _checks.fc_pair(x, w1, w2)
    if b1 is not None:
        _checks.like("b1", b1, x, ((Cr,),))
    if b2 is not None:
        _checks.like("b2", b2, x, ((C,),))
    _checks.choice("act", act, ACTS)
    _checks.choice("pool", pool, POOLS)
    act_weight = _checks.activation(act, act_weight, x, Cr, "Cr")
    return x, w1, b1, w2, b2, _checks.residual(residual, x), act_weight, pool


# ---- the spec: schemas, fakes and autograd of every backend (srkernels/ops/_registry.py registers them) ----


def _fake(x, w1, b1, w2, b2, residual, act_weight, pool):
    torch._check(pool in POOLS, lambda: f"{OP}: pool must be one of {POOLS}, got {pool!r}")
    stats = x.new_empty((x.shape[0], 2 if pool == "avg+std" else 1, x.shape[1]), dtype=acc_dtype(x.dtype))
    return _checks.empty_out(x), stats


def _fake_backward(grad_out, x, stats, w1, b1, w2, b2, act_weight, pool):
    def grad_like(t):  # weight gradients come out contiguous
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty((0,))

    return _checks.empty_out(x), grad_like(w1), grad_like(b1), grad_like(w2), grad_like(b2), grad_like(act_weight)


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, act_weight, pool = inputs
    ctx.save_for_backward(x, output[1], w1, b1, w2, b2, act_weight)
    ctx.pool = pool
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ns, ctx, grad_out, _grad_stats):
    x, stats, w1, b1, w2, b2, act_weight = ctx.saved_tensors
    gx, gw1, gb1, gw2, gb2, gact = ns.channel_attention_backward(grad_out, x, stats, w1, b1, w2, b2, act_weight,
                                                               ctx.pool)
    return (
        gx,
        gw1,
        gb1 if b1 is not None else None,
        gw2,
        gb2 if b2 is not None else None,
        grad_out if ctx.has_residual else None,
        gact if act_weight is not None else None,
        None,
    )


SPEC = OpSpec.pair(
    OP, "(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? residual, Tensor? act_weight, str pool) "
        "-> (Tensor, Tensor)",
    "(Tensor grad_out, Tensor x, Tensor stats, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? act_weight, "
    "str pool) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fakes=(_fake, _fake_backward), autograd=(_setup_context, _backward), reference=RF.channel_attention, out=True)
