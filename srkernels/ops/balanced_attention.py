"""``balanced_attention``: BAM's ACAM (channel) x MSAM (spatial) attention (+ residual), one fused op.

One read of ``x`` yields both statistics (per-channel mean, per-pixel channel max). Kernel contract:
docs/ops.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import functional as RF
from . import _checks, _dispatch
from .._util import acc_dtype
from ._registry import OpSpec

OP = "balanced_attention"


# the signature of the reference (srkernels/reference/functional.py) plus ``out``: tests/ops/test_registry.py
def balanced_attention(x: Tensor, w1: Tensor, prelu_w: Tensor, w2: Tensor, w_sa: Tensor, *,
                       residual: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``x * sigmoid(W2 . prelu(W1 . mean(x))) * sigmoid(conv_k(max_c(x))) (+ residual)``.

    Args:
        x: ``[N, C, H, W]`` float64/float32/bfloat16/float16, contiguous or channels_last.
        w1: ``(Cr, C)`` or ``(Cr, C, 1, 1)``, no bias. prelu_w: ``(Cr,)`` or ``(1,)`` slopes.
        w2: ``(C, Cr)`` or ``(C, Cr, 1, 1)``, no bias.
        w_sa: the spatial conv, ``(K, K)`` or ``(1, 1, K, K)`` with K odd (7 in BAM), zero padding K // 2.
        residual: optional ``[N, C, H, W]`` tensor added to the result (RCAB's identity).
        out: optional caller-owned result buffer (inference only; may be ``residual`` itself).
    """
    _checks.feature_map("x", x)
    if out is None:  # with out=, the buffer fixes the dtype (no autocast)
        x, w1, prelu_w, w2, w_sa, residual = _dispatch.autocast_args(OP, x, w1, prelu_w, w2, w_sa, residual)
    args = checked_args(x, w1, prelu_w, w2, w_sa, residual)
    x, w1, prelu_w, w2, w_sa, residual = args
    backend = _dispatch.choose(OP, x.device.type)
    return _dispatch.run(
        backend, OP, args, lambda: RF.balanced_attention(x, w1, prelu_w, w2, w_sa, residual=residual), out, saves=True,
        names=("x", "w1", "prelu_w", "w2", "w_sa", "residual"),
    )


def checked_args(x: Tensor, w1: Tensor, prelu_w: Tensor, w2: Tensor, w_sa: Tensor, residual: Tensor | None) -> tuple:
    """The dispatcher op's arguments ``(x, w1, prelu_w, w2, w_sa, residual)`` after the front end's checks (FCs
    as matrices, ``w_sa`` as ``(K, K)``); raises as ``balanced_attention`` does. For callers that keep them per
    layer and skip the checks while nothing changed (srkernels/nn/attention.py)."""
    w1, w2, _, Cr = _checks.fc_pair(x, w1, w2)
    prelu_w = _checks.slopes("prelu_w", prelu_w, x, Cr)
    _checks.like("w_sa", w_sa, x)
    if w_sa.dim() not in (2, 4):
        raise ValueError(f"w_sa must be a (K, K) or (1, 1, K, K) kernel, got shape {list(w_sa.shape)}")
    K = w_sa.shape[-1]
    if K % 2 != 1:
        raise ValueError(f"w_sa must be an odd square kernel, got shape {list(w_sa.shape)}")
    w_sa = _checks.like("w_sa", w_sa, x, ((K, K), (1, 1, K, K))).reshape(K, K)
    return x, w1, prelu_w, w2, w_sa, _checks.residual(residual, x)


def _fake(x, w1, prelu_w, w2, w_sa, residual):
    torch._check(w_sa.dim() == 2 and w_sa.shape[0] == w_sa.shape[1] and w_sa.shape[0] % 2 == 1,
                 lambda: f"{OP}: w_sa must be an odd square (K, K) kernel, got shape {list(w_sa.shape)}")
    N, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    return _checks.empty_out(x), x.new_empty((N, C), dtype=acc), x.new_empty((N, H, W), dtype=acc)


def _fake_backward(grad_out, x, mean, maxmap, w1, prelu_w, w2, w_sa):
    def grad_like(t):  # weight gradients come out contiguous
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return _checks.empty_out(x), grad_like(w1), grad_like(prelu_w), grad_like(w2), grad_like(w_sa)


def _setup_context(ctx, inputs, output):
    x, w1, prelu_w, w2, w_sa, residual = inputs
    ctx.save_for_backward(x, output[1], output[2], w1, prelu_w, w2, w_sa)
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ns, ctx, grad_out, _grad_mean, _grad_max):
    gx, gw1, gp, gw2, gsa = ns.balanced_attention_backward(grad_out, *ctx.saved_tensors)
    return gx, gw1, gp, gw2, gsa, (grad_out if ctx.has_residual else None)


SPEC = OpSpec.pair(
    OP, "(Tensor x, Tensor w1, Tensor prelu_w, Tensor w2, Tensor w_sa, Tensor? residual) -> (Tensor, Tensor, Tensor)",
    "(Tensor grad_out, Tensor x, Tensor mean, Tensor maxmap, Tensor w1, Tensor prelu_w, Tensor w2, Tensor w_sa) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    fakes=(_fake, _fake_backward), autograd=(_setup_context, _backward), reference=RF.balanced_attention, out=True)
