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


def like(name: str, t, x: Tensor, shapes: tuple[tuple[int, ...], ...] | None = None,
         dtype: torch.dtype | None = None) -> Tensor:
    """``t`` is a tensor on ``x``'s device with ``x``'s dtype (or ``dtype`` if given), and (if given) one of
    ``shapes``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must be {dtype} for x of dtype {x.dtype}")
    if dtype is None and t.dtype != x.dtype:
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
    if w1.dim() not in (2, 4):
        raise ValueError(f"w1 must be 2-D (Cr, C) or 4-D (Cr, C, 1, 1), got shape {list(w1.shape)}")
    Cr = hidden("w1", w1.shape[0], C)
    w1 = like("w1", w1, x, ((Cr, C), (Cr, C, 1, 1)))
    w2 = like("w2", w2, x, ((C, Cr), (C, Cr, 1, 1)))
    return w1.flatten(1) if w1.dim() == 4 else w1, w2.flatten(1) if w2.dim() == 4 else w2, C, Cr


def hidden(name: str, Cr: int, C: int) -> int:
    """The attention MLP's hidden width (``w1``'s rows) must be >= 1: ``reduction > C`` in a layer that builds
    the weights as ``C // reduction`` gives 0 rows."""
    if Cr < 1:
        raise ValueError(f"{name} has {Cr} rows: the attention MLP needs a hidden width >= 1 (reduction larger "
                         f"than the {C} channels?)")
    return Cr


def slopes(name: str, w, x: Tensor, n: int) -> Tensor:
    """PReLU slopes for ``n`` channels: 1 (shared) or ``n`` of them, expanded to ``[n]``."""
    return like(name, w, x, ((n,), (1,))).expand(n)


def activation(act: str, act_weight, x: Tensor, n: int, n_name: str) -> Tensor | None:
    """``act_weight`` of an op's ``act`` (already checked against the op's choices): the ``n`` PReLU slopes
    (``n_name`` in the error) with ``act="prelu"``, else it must be None."""
    if act == "prelu":
        if act_weight is None:
            raise ValueError(f"act='prelu' needs act_weight (1 or {n_name} slopes)")
        return slopes("act_weight", act_weight, x, n)
    if act_weight is not None:
        raise ValueError("act_weight is only used with act='prelu'")
    return None


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


def _span(t: Tensor) -> tuple[int, int] | None:
    """The byte range ``[lo, hi)`` that ``t``'s elements can touch, or None (no elements, or no real memory:
    meta / fake tensors while tracing)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        lo = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # FakeTensor under torch.compile
        return None
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return lo, lo + (extent + 1) * t.element_size()


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def no_overlap(o: Tensor, inputs: dict[str, Tensor | None], may_alias: tuple[str, ...] = ("residual",)) -> None:
    """``out`` (``o``) must not share memory with any of ``inputs`` (name -> tensor), except that it may be
    exactly an input named in ``may_alias`` (same memory, shape and strides: an elementwise in-place update the
    kernels support). Memory is compared by byte span (first to last element), so two interleaved views of one
    buffer (e.g. ``buf[::2]`` and ``buf[1::2]``) count as overlapping too: conservative, never silently wrong.
    ``out`` itself must not have internal overlap (an expanded / stride-0 buffer)."""
    if torch._debug_has_internal_overlap(o) == 1:
        raise ValueError("out has internal overlap (several elements share memory, e.g. an expanded tensor); "
                         "pass a buffer with distinct elements")
    so = _span(o)
    if so is None:
        return
    for name, t in inputs.items():
        if not isinstance(t, Tensor):
            continue
        st = _span(t)
        if st is None or st[1] <= so[0] or so[1] <= st[0]:
            continue
        if name in may_alias and _same_view(o, t):
            continue
        if name in may_alias:
            raise ValueError(f"out partially overlaps {name}: out may be {name} itself (same memory, shape "
                             f"and strides) or disjoint from it, nothing in between")
        raise ValueError(f"out must not overlap {name} (they share memory)")


def out(o, args: tuple, shape: tuple[int, ...] | None = None, names: tuple[str, ...] | None = None) -> Tensor:
    """An ``out=`` buffer: ``x``'s (args[0]) dtype and device, ``shape`` (default x's); inference only; not
    overlapping any tensor in ``args`` (named by ``names``, same order) except being exactly ``residual``."""
    x = args[0]
    like("out", o, x, (tuple(x.shape) if shape is None else tuple(shape),))
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        raise ValueError("out= is for inference: an input requires grad (use torch.no_grad() or drop out=)")
    if o.requires_grad:
        raise ValueError("out must not require grad")
    if names is None:
        names = ("x",) + tuple(f"args[{i}]" for i in range(1, len(args)))
    no_overlap(o, dict(zip(names, args)))
    return o
