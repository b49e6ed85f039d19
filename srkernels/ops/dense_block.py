"""``dense_block``: a whole dense block (RDN's RDB, RDCAB, SRDenseNet's block, the Split and FD-IRB blocks)
run from ONE feature buffer, without ``torch.cat``.

The buffer holds every feature map of the block side by side along the channel axis: the block input is
written once, each layer's conv reads a channel range of the buffer in place and writes its bias +
activation output straight into its own slice, and a final 1x1 fusion conv (optionally gated by channel
attention, plus a residual) reads another channel range. A ``DensePlan`` says which ranges; the builders in
``srkernels/dense_plan.py`` (``rdb_plan``, ``srdense_plan``, ``split_plan``, ``fdirb_plan``) make the plans of the
published blocks.

Backward saves only that buffer (its slices are the post-activation outputs, so ReLU masks are recomputed from
them), so the activation memory of a block is linear in its depth instead of quadratic. Gradients of all
slices accumulate in one gradient buffer, layers in reverse order.

Buffer layout and plans: ``srkernels/dense_plan.py``. Kernel contract: the docstring of ``dense_block`` below
and docs/ops.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import functional as RF
from ..dense_plan import (DenseLayer, DensePlan, buffer_rows, cached_plan, fdirb_plan, parse,  # noqa: F401
                          rdb_plan, split_plan, srdense_plan)
from . import _checks, _dispatch
from .._util import acc_dtype
from ._registry import OpSpec

OP = "dense_block"


# -------------------------------------------------------------------------------------------- the op


def _weight_2d(name: str, w, x: Tensor, rows: int | None, cols: int) -> Tensor:
    _checks.like(name, w, x)
    if w.dim() not in (2, 4):
        raise ValueError(f"{name} must be 2-D [rows, {cols}] or 4-D [rows, {cols}, 1, 1], got shape {list(w.shape)}")
    r = w.shape[0] if rows is None else rows
    return _checks.like(name, w, x, ((r, cols), (r, cols, 1, 1))).reshape(r, cols)


def dense_block(
    x: Tensor,
    weights: list[Tensor] | tuple[Tensor, ...],
    biases: list[Tensor | None] | tuple[Tensor | None, ...],
    plan: DensePlan,
    *,
    fuse_weight: Tensor | None = None,
    fuse_bias: Tensor | None = None,
    gate: tuple[Tensor, Tensor | None, Tensor, Tensor | None] | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """Run the dense block described by ``plan`` on ``x``.

    Math (buffer B with T = plan.channels channels, B[:, :Cx] = x, kxk convs with zero padding k // 2):
    for each layer i in order, ``z = conv(B[:, in], weights[i]) + biases[i] (+ B[:, res])``,
    ``y = relu(z)`` (or z), ``B[:, out] = y[:, :out_split]``, ``B[:, out2] = y[:, out_split:]``. Then with
    ``F = B[:, fuse]``:

    - ``fuse_weight`` given: ``out = conv1x1(F * g, fuse_weight) + fuse_bias (+ residual)``, where
      ``g = sigmoid(W2 relu(W1 mean_hw(F) + b1) + b2)`` per sample and channel if ``gate = (W1, b1, W2,
      b2)`` is given (RCAN-style channel attention on the concat, "avg" pool) and 1 otherwise;
    - no ``fuse_weight``: ``out = F`` (SRDenseNet's block returns its new features).

    Args:
        x: ``[N, Cx, H, W]`` float64/float32/bfloat16/float16, contiguous or channels_last.
        weights, biases: per layer ``[G_i, in_len_i, k, k]`` and ``[G_i]`` (or None).
        plan: the channel map (``rdb_plan``, ``srdense_plan``, ``split_plan``, ``fdirb_plan`` or your own).
        fuse_weight, fuse_bias: ``[Cout, fuse_len(, 1, 1)]`` and ``[Cout]`` (or None).
        gate: channel attention weights ``W1 [Cr, fuse_len(,1,1)]``, ``b1 [Cr]``, ``W2 [fuse_len, Cr(,1,1)]``,
            ``b2 [fuse_len]``; needs ``fuse_weight``.
        residual: ``[N, Cout, H, W]`` added at the end; needs ``fuse_weight``.

    Returns ``[N, Cout or fuse_len, H, W]`` in ``x``'s memory format.

    On CPU, float32 3x3 layers run as Winograd convolutions where ``winograd_conv3x3`` would: tile from
    ``SRKERNELS_WINOGRAD`` (default F(4,3)), or in a call autograd records from ``SRKERNELS_WINOGRAD_TRAIN``
    (default F(2,3)), as the 3x3 convs of ``conv2d_pointwise`` (docs/ops.md, ``## dense_block``).
    """
    _checks.feature_map("x", x)
    x, weights, biases, fuse_weight, fuse_bias, gate, residual = _dispatch.autocast_args(
        OP, x, weights, biases, fuse_weight, fuse_bias, gate, residual)
    if not isinstance(plan, DensePlan):
        raise TypeError(f"plan must be a DensePlan, got {type(plan).__name__}")
    N, Cx, H, W = x.shape
    if Cx != plan.in_channels:
        raise ValueError(f"x has {Cx} channels but the plan's input has {plan.in_channels}")
    weights, biases = list(weights), list(biases)
    if len(weights) != len(plan.layers) or len(biases) != len(plan.layers):
        raise ValueError(
            f"the plan has {len(plan.layers)} layers but got {len(weights)} weights and {len(biases)} biases"
        )
    k = plan.kernel_size
    for i, (w, b, lay) in enumerate(zip(weights, biases, plan.layers)):
        _checks.like(f"weights[{i}]", w, x)
        if w.dim() != 4 or tuple(w.shape) != (lay.out_channels, lay.in_len, k, k):
            raise ValueError(
                f"weights[{i}] must have shape {[lay.out_channels, lay.in_len, k, k]}, got {list(w.shape)}"
            )
        if b is not None:
            _checks.like(f"biases[{i}]", b, x, ((w.shape[0],),))
    K = plan.fuse_len
    if fuse_weight is None:
        for name, v in (("fuse_bias", fuse_bias), ("gate", gate), ("residual", residual)):
            if v is not None:
                raise ValueError(f"{name} needs fuse_weight (without it the block returns its buffer range)")
        Cout = K
    else:
        fuse_weight = _weight_2d("fuse_weight", fuse_weight, x, None, K)
        Cout = fuse_weight.shape[0]
        if fuse_bias is not None:
            _checks.like("fuse_bias", fuse_bias, x, ((Cout,),))
    if gate is not None:
        if not isinstance(gate, (tuple, list)) or len(gate) != 4:
            raise TypeError("gate must be a tuple (w1, b1, w2, b2)")
        gw1, gb1, gw2, gb2 = gate
        _checks.like("gate w1", gw1, x)
        if gw1.dim() not in (2, 4):
            raise ValueError(f"gate w1 must be 2-D (Cr, {K}) or 4-D (Cr, {K}, 1, 1), got shape {list(gw1.shape)}")
        Cr = _checks.hidden("gate w1", gw1.shape[0], K)
        gw1 = _weight_2d("gate w1", gw1, x, Cr, K)
        gw2 = _weight_2d("gate w2", gw2, x, K, Cr)
        if gb1 is not None:
            _checks.like("gate b1", gb1, x, ((Cr,),))
        if gb2 is not None:
            _checks.like("gate b2", gb2, x, ((K,),))
    else:
        gw1 = gb1 = gw2 = gb2 = None
    if residual is not None:
        _checks.like("residual", residual, x, ((N, Cout, H, W),))
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous(memory_format=_checks.suggest_memory_format(x))

    backend = _dispatch.choose(OP, x.device.type)
    gate = None if gate is None else (gw1, gb1, gw2, gb2)
    # a call autograd records: the CPU kernel's Winograd tile is then SRKERNELS_WINOGRAD_TRAIN's (DensePlan.ints)
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, *weights, *biases, fuse_weight, fuse_bias, gw1, gb1, gw2, gb2, residual))
    ref_biases = biases
    if backend != "reference":
        # the schema takes a bias per layer (optional tensors inside lists cannot carry gradients through
        # torch.library autograd): zeros stand in for None
        biases = [b if b is not None else x.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
    args = (x, weights, biases, plan.ints(training), fuse_weight, fuse_bias, gw1, gb1, gw2, gb2, residual)
    return _dispatch.run(backend, OP, args, lambda: reference(
        x, weights, ref_biases, plan, fuse_weight=fuse_weight, fuse_bias=fuse_bias, gate=gate, residual=residual),
        saves=True)


def cpu_layout(weights, fuse_weight: Tensor | None = None) -> tuple[list[Tensor], Tensor | None]:
    """The same values as ``weights`` ([G, C, k, k]) and ``fuse_weight`` ([Cout, K(, 1, 1)]), stored in the
    order the CPU kernel packs from (tap-major [k, k, C, G] and [K, Cout]; csrc/cpu/dense_block.cpp
    ``layer_forward_fast`` / ``fusion_forward_fast``), so its ``permute(..).contiguous()`` is a no-op instead of
    a copy of every weight on every call. Detached: for inference caches (``srkernels.nn.dense``)."""
    ws = [w.detach().permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1) for w in weights]
    fw = None
    if fuse_weight is not None:
        fw = fuse_weight.detach().reshape(fuse_weight.shape[0], -1).t().contiguous().t()
    return ws, fw


def reference(x, weights, biases, plan: DensePlan, *, fuse_weight=None, fuse_bias=None, gate=None,
              residual=None) -> Tensor:
    """The plan in plain PyTorch (``torch.cat`` of the pieces each layer reads); autograd differentiates it."""
    pieces: dict[int, Tensor] = {0: x}  # buffer start channel -> [N, n, H, W] piece

    def read(start: int, n: int) -> Tensor:
        parts, end = [], start + n
        for s in sorted(pieces):
            t = pieces[s]
            e = s + t.shape[1]
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                parts.append(t[:, lo - s:hi - s])
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    pad = plan.kernel_size // 2
    for lay, w, b in zip(plan.layers, weights, biases):
        z = F.conv2d(read(lay.in_start, lay.in_len), w, b, padding=pad)
        if lay.res_start >= 0:
            z = z + read(lay.res_start, w.shape[0])
        y = F.relu(z) if lay.relu else z
        pieces[lay.out_start] = y[:, :lay.out_split]
        if lay.out_channels > lay.out_split:
            pieces[lay.out2_start] = y[:, lay.out_split:]
    feats = read(plan.fuse_start, plan.fuse_len)
    if fuse_weight is None:
        return feats
    if gate is not None:
        feats = RF.channel_attention(feats, *gate, pool="avg")
    out = F.conv2d(feats, fuse_weight.reshape(fuse_weight.shape[0], -1, 1, 1), fuse_bias)
    return out if residual is None else out + residual


# ---- the spec: schemas, fakes and autograd of every backend (srkernels/ops/_registry.py registers them) ----


def _fake(x, weights, biases, plan, fuse_weight, fuse_bias, gw1, gb1, gw2, gb2, residual):
    T, _Cx, k, _fs, K = parse(plan)
    N, _, H, W = x.shape
    cout = fuse_weight.shape[0] if fuse_weight is not None else K
    out = torch.empty((N, cout, H, W), dtype=x.dtype, device=x.device,
                      memory_format=_checks.suggest_memory_format(x))
    buf = x.new_empty((buffer_rows(N, H, W, k), T))
    stats = x.new_empty((N, 2, K) if gw1 is not None else (0,), dtype=acc_dtype(x.dtype))
    return out, buf, stats


def _fake_backward(grad_out, buffer, stats, weights, biases, plan, fuse_weight, gw1, gb1, gw2, gb2):
    _T, Cx, _k, _fs, _K = parse(plan)
    N, _, H, W = grad_out.shape
    gx = torch.empty((N, Cx, H, W), dtype=grad_out.dtype, device=grad_out.device,
                     memory_format=_checks.suggest_memory_format(grad_out))

    def like(t):  # weight gradients come out contiguous
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else grad_out.new_empty((0,))

    return (gx, [like(w) for w in weights], [like(b) for b in biases], like(fuse_weight),
            grad_out.new_empty((fuse_weight.shape[0],)) if fuse_weight is not None else grad_out.new_empty((0,)),
            like(gw1), like(gb1), like(gw2), like(gb2))


def _setup_context(ctx, inputs, output):
    x, weights, biases, plan, fuse_weight, fuse_bias, gw1, gb1, gw2, gb2, residual = inputs
    _out, buf, stats = output
    # The buffer holds x and every layer output: it is all backward needs (no per-layer activations).
    ctx.save_for_backward(buf, stats, fuse_weight, gw1, gb1, gw2, gb2, *weights, *biases)
    ctx.n_layers = len(weights)
    ctx.plan = plan
    ctx.has_fuse_bias = fuse_bias is not None
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(buf, stats)


def _backward(ns, ctx, grad_out, _grad_buf, _grad_stats):
    saved = ctx.saved_tensors
    buf, stats, fuse_weight, gw1, gb1, gw2, gb2 = saved[:7]
    L = ctx.n_layers
    weights, biases = list(saved[7:7 + L]), list(saved[7 + L:7 + 2 * L])
    gx, gws, gbs, gfw, gfb, ggw1, ggb1, ggw2, ggb2 = ns.dense_block_backward(
        grad_out.contiguous(memory_format=_checks.suggest_memory_format(grad_out)), buf, stats, weights, biases,
        ctx.plan, fuse_weight, gw1, gb1, gw2, gb2)
    return (
        gx,
        list(gws),
        list(gbs),
        None,
        gfw if fuse_weight is not None else None,
        gfb if ctx.has_fuse_bias else None,
        ggw1 if gw1 is not None else None,
        ggb1 if gb1 is not None else None,
        ggw2 if gw2 is not None else None,
        ggb2 if gb2 is not None else None,
        grad_out if ctx.has_residual else None,
    )


# returns the block output, the buffer (x and every layer output: all backward needs, layout in
# srkernels/dense_plan.py) and the fusion gate's [N, 2, K] stats
SPEC = OpSpec.pair(
    OP, "(Tensor x, Tensor[] weights, Tensor[] biases, int[] plan, Tensor? fuse_weight, Tensor? fuse_bias, "
        "Tensor? gate_w1, Tensor? gate_b1, Tensor? gate_w2, Tensor? gate_b2, Tensor? residual) "
        "-> (Tensor, Tensor, Tensor)",
    "(Tensor grad_out, Tensor buffer, Tensor stats, Tensor[] weights, Tensor[] biases, int[] plan, "
    "Tensor? fuse_weight, Tensor? gate_w1, Tensor? gate_b1, Tensor? gate_w2, Tensor? gate_b2) "
    "-> (Tensor, Tensor[], Tensor[], Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fakes=(_fake, _fake_backward), autograd=(_setup_context, _backward), reference=reference)
