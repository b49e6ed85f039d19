"""``residual_group``: RCAN's residual group in inference -- ``n`` RCABs (3x3 conv, ReLU, 3x3 conv, channel
attention with average pool, + the block's skip), then a 3x3 conv, + the group's skip -- as one CPU call on
Winograd-transformed weights. CPU, float32 (or bfloat16 storage with float32 arithmetic), inference.

Against running the layers one by one (``winograd_conv3x3`` twice and ``channel_attention`` per RCAB) the kernel
sums the attention's pool in the second conv's output transform and applies the attention's scale and skip add
inside the next conv's input transform, so the attention makes no pass of its own over the feature map
(csrc/cpu/residual_group.cpp; docs/ops.md ``## residual_group``). ``srkernels.nn``'s RCAN runs it for every
residual group whose convs ``winograd_conv3x3`` serves.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _dispatch
from ._registry import OpSpec
from .winograd_conv3x3 import reference as winograd_reference
from .winograd_conv3x3 import tile_of

OP = "residual_group"


def reference(x: Tensor, weight_t: Sequence[Tensor], bias: Sequence[Tensor], fc_w1: Sequence[Tensor],
              fc_b1: Sequence[Tensor], fc_w2: Sequence[Tensor], fc_b2: Sequence[Tensor]) -> Tensor:
    """The op in plain torch ops (any dtype and device, differentiable), layer by layer: each conv is
    ``winograd_conv3x3``'s reference on its transformed weight; the attention ``x_k + y * sigmoid(W2 relu(W1
    mean(y) + b1) + b2)``; bfloat16 / float16 in float32, every stored map rounded once, as the kernel."""
    low = x.dtype in (torch.bfloat16, torch.float16)
    wide = (lambda t: t.float()) if low else (lambda t: t)
    h = x
    for k in range(len(fc_w1)):
        r = winograd_reference(h, weight_t[2 * k], bias[2 * k], "relu")
        y = wide(winograd_reference(r, weight_t[2 * k + 1], bias[2 * k + 1]))
        f = (lambda t: t.to(y.dtype))
        hid = torch.relu(F.linear(y.mean((2, 3)), f(fc_w1[k]), f(fc_b1[k])))
        s = torch.sigmoid(F.linear(hid, f(fc_w2[k]), f(fc_b2[k])))
        h = (y * s[:, :, None, None] + wide(h)).to(x.dtype)
    return winograd_reference(h, weight_t[-1], bias[-1], "none", x)


def _tensor_list(name: str, v, n: int | None, what: str = "") -> list[Tensor]:
    """``v`` as a list of tensors, of ``n`` entries if given (``what`` says why, for the error)."""
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(v).__name__}")
    for i, t in enumerate(v):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if n is not None and len(v) != n:
        raise ValueError(f"{name} must have {n} entries ({what}), got {len(v)}")
    return list(v)


def _param(name: str, t: Tensor, x: Tensor, shapes: tuple[tuple[int, ...], ...]) -> Tensor:
    """Parameter ``t`` (x's dtype or float32, on x's device, one of ``shapes``) in the kernel's float32; as it is
    for a float64 x (the reference runs)."""
    _checks.like(name, t, x, shapes, dtype=torch.float32 if t.dtype == torch.float32 else None)
    return t if x.dtype == torch.float64 else t.float()


def residual_group(
    x: Tensor,
    weight_t: Sequence[Tensor],
    bias: Sequence[Tensor],
    fc_w1: Sequence[Tensor],
    fc_b1: Sequence[Tensor],
    fc_w2: Sequence[Tensor],
    fc_b2: Sequence[Tensor],
) -> Tensor:
    """RCAN's residual group of ``n = len(fc_w1)`` RCABs with channel attention, then a conv, + ``x``.

    Args:
        x: ``[N, C, H, W]`` float32 or bfloat16 (float64 runs the torch reference), contiguous or channels_last
            (the kernel's layout). bfloat16 is storage only: float32 arithmetic, every stored map rounded once.
        weight_t: ``2 n + 1`` transformed 3x3 conv weights ``winograd_weight(w, m)``, ``[(m+2)^2, C, C]``
            float32, one tile size m: block k's convs at ``2k`` and ``2k + 1``, the group's last conv at ``2n``.
        bias: the ``2 n + 1`` conv biases ``[C]`` (float32 or x's dtype).
        fc_w1, fc_b1, fc_w2, fc_b2: per block, the attention's FCs: ``[Cr, C]`` (or ``[Cr, C, 1, 1]``), ``[Cr]``,
            ``[C, Cr]`` (or ``[C, Cr, 1, 1]``), ``[C]`` (float32 or x's dtype).

    Returns ``[N, C, H, W]`` in ``x``'s memory format. Inference: a call that needs a gradient runs the
    (differentiable, slow) torch reference."""
    _checks.feature_map("x", x)
    w1s = _tensor_list("fc_w1", fc_w1, None)
    n = len(w1s)
    blocks = f"one per block: {n}, as fc_w1"
    b1s = _tensor_list("fc_b1", fc_b1, n, blocks)
    w2s = _tensor_list("fc_w2", fc_w2, n, blocks)
    b2s = _tensor_list("fc_b2", fc_b2, n, blocks)
    convs = f"2 per block and the last conv: 2 * {n} + 1"
    us = _tensor_list("weight_t", weight_t, 2 * n + 1, convs)
    bs = _tensor_list("bias", bias, 2 * n + 1, convs)
    # as the op's autocast rule (float32) would cast them, as winograd_conv3x3's front end
    x, us, bs, w1s, b1s, w2s, b2s = _dispatch.autocast_args(OP, x, us, bs, w1s, b1s, w2s, b2s)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise TypeError(f"x must be float32 or bfloat16 (or float64 for the reference), got dtype {x.dtype}")
    C = x.shape[1]
    wdt = x.dtype if x.dtype == torch.float64 else torch.float32
    tiles = set()
    for i, u in enumerate(us):
        name = f"weight_t[{i}]"
        _checks.like(name, u, x, dtype=wdt)
        if u.dim() != 3 or u.shape[0] not in (16, 36, 64):
            raise ValueError(f"{name} must be [16, 36 or 64, C, C] (winograd_weight(w, 2, 4 or 6)), got shape "
                             f"{list(u.shape)}")
        tiles.add(tile_of(u))
        if tuple(u.shape[1:]) != (C, C):
            raise ValueError(f"{name} must map x's {C} channels to {C}, got shape {list(u.shape)}")
    if len(tiles) > 1:
        raise ValueError(f"weight_t must share one tile size, got tiles {sorted(tiles)}")
    bs = [_param(f"bias[{i}]", b, x, ((C,),)) for i, b in enumerate(bs)]
    # the hidden width from fc_w1[0] (every FC's shape is checked against it below)
    if n and w1s[0].dim() not in (2, 4):
        raise ValueError(f"fc_w1[0] must be [Cr, C] or [Cr, C, 1, 1], got shape {list(w1s[0].shape)}")
    Cr = _checks.hidden("fc_w1[0]", w1s[0].shape[0], C) if n else 1
    w1s = [_param(f"fc_w1[{k}]", w, x, ((Cr, C), (Cr, C, 1, 1))).flatten(1) for k, w in enumerate(w1s)]
    b1s = [_param(f"fc_b1[{k}]", b, x, ((Cr,),)) for k, b in enumerate(b1s)]
    w2s = [_param(f"fc_w2[{k}]", w, x, ((C, Cr), (C, Cr, 1, 1))).flatten(1) for k, w in enumerate(w2s)]
    b2s = [_param(f"fc_b2[{k}]", b, x, ((C,),)) for k, b in enumerate(b2s)]
    args = (x, us, bs, w1s, b1s, w2s, b2s)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in [x, *us, *bs, *w1s, *b1s, *w2s, *b2s])
    backend = "reference" if needs_grad or x.dtype == torch.float64 else _dispatch.choose(OP, x.device.type)
    return _dispatch.run(backend, OP, args, lambda: reference(*args))


# ---- the spec (srkernels/ops/_registry.py registers it) ----


def _fake(x, weight_t, bias, fc_w1, fc_b1, fc_w2, fc_b2):
    torch._check(len(weight_t) == 2 * len(fc_w1) + 1,
                 lambda: f"{OP}: weight_t must have 2 * blocks + 1 entries, got {len(weight_t)}")
    return x.new_empty(x.shape).contiguous(memory_format=_checks.suggest_memory_format(x))


SPEC = OpSpec(
    name=OP,
    schemas={OP: "(Tensor x, Tensor[] weight_t, Tensor[] bias, Tensor[] fc_w1, Tensor[] fc_b1, Tensor[] fc_w2, "
                 "Tensor[] fc_b2) -> Tensor"},
    fakes={OP: _fake},
    autograd={},
    reference=reference,
    backends=("cpu",),  # a CPU algorithm built on winograd_conv3x3's kernel (no CUDA or Triton version)
    autocast={OP: "fp32"},  # float32 arithmetic under autocast, as winograd_conv3x3
)
