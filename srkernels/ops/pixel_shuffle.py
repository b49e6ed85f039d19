"""``pixel_shuffle``: the upsampler's conv epilogue in one pass -- bias, activation, sub-pixel rearrangement
to the r-times larger map, optional residual add -- and its inverse ``pixel_unshuffle``.

Run the conv without bias and hand its raw output here. Kernel contract: docs/ops.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from ..reference import functional as RF
from . import _checks, _dispatch

OP = "pixel_shuffle"
ACTS = ("none", "relu", "prelu")


def _factor(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    return r


def pixel_shuffle(
    x: Tensor,
    r: int,
    *,
    bias: Tensor | None = None,
    act: str | None = None,
    act_weight: Tensor | None = None,
    residual: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``act(F.pixel_shuffle(x + bias, r)) (+ residual)`` in one pass.

    Args:
        x: ``[N, C*r*r, H, W]`` raw conv output (conv run without bias), contiguous or channels_last.
        r: upscale factor (>= 1).
        bias: ``(C*r*r,)`` conv bias, or None.
        act: None/``"none"``, ``"relu"`` or ``"prelu"`` (``act_weight``: 1 or C slopes, applied after the
            shuffle like ``nn.PReLU(C)`` placed after ``nn.PixelShuffle``).
        residual: optional ``[N, C, H*r, W*r]`` tensor added at the end (e.g. a bicubic skip).
        out: optional caller-owned result buffer (inference only).

    Returns ``[N, C, H*r, W*r]`` in ``x``'s memory format (or ``out``).
    """
    _checks.feature_map("x", x)
    r = _factor(r)
    N, Cin, H, W = x.shape
    if Cin % (r * r):
        raise ValueError(f"x has {Cin} channels, not a multiple of r*r = {r * r}")
    C = Cin // (r * r)
    if bias is not None:
        _checks.like("bias", bias, x, ((Cin,),))
    act = _checks.choice("act", "none" if act is None else act, ACTS)
    if act == "prelu":
        if act_weight is None:
            raise ValueError("act='prelu' needs act_weight (1 or C slopes)")
        act_weight = _checks.like("act_weight", act_weight, x, ((C,), (1,))).expand(C)
    elif act_weight is not None:
        raise ValueError("act_weight is only used with act='prelu'")
    if residual is not None:
        _checks.like("residual", residual, x, ((N, C, H * r, W * r),))
    args = (x, r, bias, act_weight, act, residual)
    backend = _backend.choose(OP, x.device.type)
    return _dispatch.run(
        backend, OP, args,
        lambda: RF.pixel_shuffle(x, r, bias=bias, act=act, act_weight=act_weight, residual=residual),
        out, (N, C, H * r, W * r), names=("x", "r", "bias", "act_weight", "act", "residual"),
    )


def pixel_unshuffle(x: Tensor, r: int) -> Tensor:
    """Inverse of :func:`pixel_shuffle`'s rearrangement (``F.pixel_unshuffle``): ``[N, C, H*r, W*r]`` ->
    ``[N, C*r*r, H, W]``, in ``x``'s memory format."""
    _checks.feature_map("x", x)
    r = _factor(r)
    if x.shape[2] % r or x.shape[3] % r:
        raise ValueError(f"x spatial size {tuple(x.shape[2:])} is not divisible by r = {r}")
    backend = _backend.choose(OP, x.device.type)
    if backend == "reference":
        return RF.pixel_unshuffle(x, r)
    return _backend.op_handle(backend, "pixel_unshuffle")(x, r)


# ---- registration -----------------------------------------------------------------------------------


def _shape_out(x, r):
    N, Cin, H, W = x.shape
    return N, Cin // (r * r), H * r, W * r


def _fake(x, r, bias, act_weight, act, residual):
    return x.new_empty(_shape_out(x, r)).contiguous(memory_format=_checks.suggest_memory_format(x))


def _fake_backward(grad_out, x, r, bias, act_weight, act):
    N, C, Hr, Wr = grad_out.shape
    ref = x if x is not None else grad_out
    gx = grad_out.new_empty((N, C * r * r, Hr // r, Wr // r)).contiguous(
        memory_format=_checks.suggest_memory_format(ref))
    empty = grad_out.new_empty((0,))
    return gx, torch.empty_like(bias) if bias is not None else empty, (
        torch.empty_like(act_weight) if act == "prelu" else empty)


def _fake_out(x, r, bias, act_weight, act, residual, out):
    return None


def _fake_unshuffle(x, r):
    N, C, H, W = x.shape
    return x.new_empty((N, C * r * r, H // r, W // r)).contiguous(memory_format=_checks.suggest_memory_format(x))


def _setup_context(ctx, inputs, output):
    x, r, bias, act_weight, act, residual = inputs
    # act "none" needs nothing from the forward but r: x is not kept alive
    ctx.save_for_backward(x if act != "none" else None, bias, act_weight)
    ctx.r, ctx.act, ctx.has_residual = r, act, residual is not None


def _make_backward(ns):
    def backward(ctx, grad_out):
        x, bias, act_weight = ctx.saved_tensors
        gx, gb, ga = ns.pixel_shuffle_backward(grad_out, x, ctx.r, bias, act_weight, ctx.act)
        return (gx, None, gb if bias is not None else None, ga if ctx.act == "prelu" else None, None,
                grad_out if ctx.has_residual else None)

    return backward


def _unshuffle_setup(ctx, inputs, output):
    ctx.r = inputs[1]


def _make_unshuffle_backward(ns):
    def backward(ctx, grad):
        return ns.pixel_shuffle(grad, ctx.r, None, None, "none", None), None

    return backward


def register(namespace: str, fake: bool) -> None:
    ns = getattr(torch.ops, namespace)
    if fake:
        torch.library.register_fake(f"{namespace}::pixel_shuffle")(_fake)
        torch.library.register_fake(f"{namespace}::pixel_shuffle_backward")(_fake_backward)
        torch.library.register_fake(f"{namespace}::pixel_shuffle_out")(_fake_out)
        torch.library.register_fake(f"{namespace}::pixel_unshuffle")(_fake_unshuffle)
    torch.library.register_autograd(f"{namespace}::pixel_shuffle", _make_backward(ns), setup_context=_setup_context)
    torch.library.register_autograd(f"{namespace}::pixel_unshuffle", _make_unshuffle_backward(ns),
                                    setup_context=_unshuffle_setup)
