"""``pixel_shuffle``: the upsampler's conv epilogue in one pass -- bias, activation, sub-pixel rearrangement
to the r-times larger map, optional residual add -- and its inverse ``pixel_unshuffle``.

Run the conv without bias and hand its raw output here. Kernel contract: docs/ops.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import functional as RF
from .._validate import positive_int
from . import _checks, _dispatch
from ._registry import OpSpec

OP = "pixel_shuffle"
ACTS = ("none", "relu", "prelu")


# the signature of the reference (srkernels/reference/functional.py) plus ``out``: tests/ops/test_registry.py
def pixel_shuffle(x: Tensor, r: int, *, bias: Tensor | None = None, act: str | None = None,
                  act_weight: Tensor | None = None, residual: Tensor | None = None,
                  out: Tensor | None = None) -> Tensor:
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
    if out is None:  # with out=, the buffer fixes the dtype (no autocast)
        x, bias, act_weight, residual = _dispatch.autocast_args(OP, x, bias, act_weight, residual)
    r = positive_int("r", r)
    N, Cin, H, W = x.shape
    if Cin % (r * r):
        raise ValueError(f"x has {Cin} channels, not a multiple of r*r = {r * r}")
    C = Cin // (r * r)
    if bias is not None:
        _checks.like("bias", bias, x, ((Cin,),))
    act = _checks.choice("act", "none" if act is None else act, ACTS)
    act_weight = _checks.activation(act, act_weight, x, C, "C")
    if residual is not None:
        _checks.like("residual", residual, x, ((N, C, H * r, W * r),))
    args = (x, r, bias, act_weight, act, residual)
    backend = _dispatch.choose(OP, x.device.type)
    return _dispatch.run(
        backend, OP, args,
        lambda: RF.pixel_shuffle(x, r, bias=bias, act=act, act_weight=act_weight, residual=residual),
        out, (N, C, H * r, W * r), names=("x", "r", "bias", "act_weight", "act", "residual"),
    )


def pixel_unshuffle(x: Tensor, r: int) -> Tensor:
    """Inverse of :func:`pixel_shuffle`'s rearrangement (``F.pixel_unshuffle``): ``[N, C, H*r, W*r]`` ->
    ``[N, C*r*r, H, W]``, in ``x``'s memory format."""
    _checks.feature_map("x", x)
    r = positive_int("r", r)
    if x.shape[2] % r or x.shape[3] % r:
        raise ValueError(f"x spatial size {tuple(x.shape[2:])} is not divisible by r = {r}")
    backend = _dispatch.choose(OP, x.device.type)
    return _dispatch.run(backend, "pixel_unshuffle", (x, r), lambda: RF.pixel_unshuffle(x, r))


# ---- the spec: schemas, fakes and autograd of every backend (srkernels/ops/_registry.py registers them) ----


def _shape_out(x, r):
    N, Cin, H, W = x.shape
    return N, Cin // (r * r), H * r, W * r


def _fake(x, r, bias, act_weight, act, residual):
    torch._check(act in ACTS, lambda: f"{OP}: act must be one of {ACTS}, got {act!r}")
    return x.new_empty(_shape_out(x, r)).contiguous(memory_format=_checks.suggest_memory_format(x))


def _fake_backward(grad_out, x, r, bias, act_weight, act):
    N, C, Hr, Wr = grad_out.shape
    ref = x if x is not None else grad_out
    gx = grad_out.new_empty((N, C * r * r, Hr // r, Wr // r)).contiguous(
        memory_format=_checks.suggest_memory_format(ref))
    empty = grad_out.new_empty((0,))
    return gx, bias.new_empty(bias.shape) if bias is not None else empty, (
        act_weight.new_empty(act_weight.shape) if act == "prelu" else empty)


def _fake_unshuffle(x, r):
    N, C, H, W = x.shape
    return x.new_empty((N, C * r * r, H // r, W // r)).contiguous(memory_format=_checks.suggest_memory_format(x))


def _setup_context(ctx, inputs, output):
    x, r, bias, act_weight, act, residual = inputs
    # act "none" needs nothing from the forward but r: x is not kept alive
    ctx.save_for_backward(x if act != "none" else None, bias, act_weight)
    ctx.r, ctx.act, ctx.has_residual = r, act, residual is not None


def _backward(ns, ctx, grad_out):
    x, bias, act_weight = ctx.saved_tensors
    gx, gb, ga = ns.pixel_shuffle_backward(grad_out, x, ctx.r, bias, act_weight, ctx.act)
    return (gx, None, gb if bias is not None else None, ga if ctx.act == "prelu" else None, None,
            grad_out if ctx.has_residual else None)


def _unshuffle_setup(ctx, inputs, output):
    ctx.r = inputs[1]


def _unshuffle_backward(ns, ctx, grad):
    return ns.pixel_shuffle(grad, ctx.r, None, None, "none", None), None


SPEC = OpSpec(
    name=OP,
    schemas={
        OP: "(Tensor x, int r, Tensor? bias, Tensor? act_weight, str act, Tensor? residual) -> Tensor",
        f"{OP}_backward": "(Tensor grad_out, Tensor? x, int r, Tensor? bias, Tensor? act_weight, str act) "
                          "-> (Tensor, Tensor, Tensor)",
        "pixel_unshuffle": "(Tensor x, int r) -> Tensor",
    },
    fakes={OP: _fake, f"{OP}_backward": _fake_backward, "pixel_unshuffle": _fake_unshuffle},
    out=True,
    autograd={OP: (_setup_context, _backward), "pixel_unshuffle": (_unshuffle_setup, _unshuffle_backward)},
    reference=RF.pixel_shuffle,
    # pixel_shuffle is a conv's epilogue (its bias): the conv's precision. pixel_unshuffle only moves data, and
    # runs in its input's dtype as F.pixel_unshuffle does under autocast
    autocast={"pixel_unshuffle": None},
)
