"""Argument checks shared by the ops: clear ``TypeError``/``ValueError`` naming the argument."""
from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format  # mirrors ATen's Tensor::suggest_memory_format


def feature_map(name: str, x) -> Tensor:
    """A 4-D floating [N, C, H, W] tensor with non-empty C, H, W (N == 0 is allowed)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} must have non-empty C, H and W, got shape {tuple(x.shape)}")
    return x


def like(name: str, t, x: Tensor, shapes: tuple[tuple[int, ...], ...] | None = None) -> Tensor:
    """``t`` is a tensor on ``x``'s device with ``x``'s dtype, and (if given) one of ``shapes``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")
    if shapes is not None and tuple(t.shape) not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    return t


def fc_pair(x: Tensor, w1, w2) -> tuple[Tensor, Tensor, int, int]:
    """The squeeze-excite MLP's two FCs on x's C channels: ``w1`` (Cr, C) or 1x1-conv (Cr, C, 1, 1), ``w2``
    (C, Cr) or (C, Cr, 1, 1) -> (w1 [Cr, C], w2 [C, Cr], C, Cr)."""
    C = x.shape[1]
    like("w1", w1, x)
    Cr = w1.shape[0]
    w1 = like("w1", w1, x, ((Cr, C), (Cr, C, 1, 1)))
    w2 = like("w2", w2, x, ((C, Cr), (C, Cr, 1, 1)))
    return w1.flatten(1) if w1.dim() == 4 else w1, w2.flatten(1) if w2.dim() == 4 else w2, C, Cr


def residual(r, x: Tensor) -> Tensor | None:
    if r is None:
        return None
    return like("residual", r, x, (tuple(x.shape),))


def choice(name: str, value, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def empty_out(x: Tensor) -> Tensor:
    """An output laid out like the kernels lay it out (x's suggested memory format)."""
    return torch.empty_like(x, memory_format=suggest_memory_format(x))


def acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def out(o, args: tuple, shape: tuple[int, ...] | None = None) -> Tensor:
    """An ``out=`` buffer: ``x``'s (args[0]) dtype and device, ``shape`` (default x's); inference only; not
    overlapping x."""
    x = args[0]
    like("out", o, x, (tuple(x.shape) if shape is None else tuple(shape),))
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        raise ValueError("out= is for inference: an input requires grad (use torch.no_grad() or drop out=)")
    if o.requires_grad:
        raise ValueError("out must not require grad")
    if torch._C._overlaps(o, x):
        raise ValueError("out must not overlap x")
    return o
