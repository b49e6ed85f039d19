"""``dense_block``: a whole dense block (RDN's RDB, RDCAB, SRDenseNet's block, the Split and FD-IRB blocks)
run from ONE feature buffer, without ``torch.cat``.

The buffer holds every feature map of the block side by side along the channel axis: the block input is
written once, each layer's conv reads a channel range of the buffer in place and writes its bias +
activation output straight into its own slice, and a final 1x1 fusion conv (optionally gated by channel
attention, plus a residual) reads another channel range. A ``DensePlan`` says which ranges; the builders
below (``rdb_plan``, ``srdense_plan``, ``split_plan``, ``fdirb_plan``) make the plans of the published blocks.

Backward saves only that buffer (its slices are the post-activation outputs, so ReLU masks are recomputed from
them), so the activation memory of a block is linear in its depth instead of quadratic. Gradients of all
slices accumulate in one gradient buffer, layers in reverse order.

Buffer layout (the compiled kernels; the reference below uses plain ``torch.cat``): pixel-major ("NHWC") with
a zero border of ``p = k // 2`` pixels around every sample and a margin of ``p*(W+2p) + p`` rows before and
after, i.e. a matrix ``[R, T]`` with ``R = N*(H+2p)*(W+2p) + 2*margin`` rows (pixels) and ``T`` columns. A
channel range of it is a row-strided matrix (leading dimension T), which GEMM micro-kernels read in place, and a
conv tap is that matrix shifted by a constant number of rows; the border makes the zero padding implicit and lets one
GEMM span several image rows and all samples. Cost of the choice: the border (13% more memory at 32x32, 4% at
96x96) and ~2/(W+2) wasted GEMM rows (the border columns inside a row range). Kernel contract: the docstring
of ``dense_block`` below and docs/ops.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ..reference import functional as RF
from . import _checks

OP = "dense_block"


@dataclass(frozen=True)
class DenseLayer:
    """One conv of a dense block, in buffer channel coordinates.

    The conv reads buffer channels ``[in_start, in_start + in_len)`` and has ``out_channels`` outputs; the
    first ``split`` (default: all) go to ``[out_start, out_start + split)``, the rest to
    ``[out2_start, out2_start + out_channels - split)`` (the Split block's distilled / remaining halves).
    ``res_start >= 0`` adds buffer channels ``[res_start, res_start + out_channels)`` before the activation
    (FD-IRB's per-layer residual). ``relu`` False means no activation.
    """

    in_start: int
    in_len: int
    out_start: int
    out_channels: int
    split: int | None = None
    out2_start: int = -1
    res_start: int = -1
    relu: bool = True

    @property
    def out_split(self) -> int:
        return self.out_channels if self.split is None else self.split


@dataclass(frozen=True)
class DensePlan:
    """Channel map of a dense block's buffer: ``channels`` columns, the block input in ``[0, in_channels)``,
    ``layers`` in order, and the fusion conv's input range ``[fuse_start, fuse_start + fuse_len)`` (without
    a fusion conv, that range is the block's output)."""

    channels: int
    in_channels: int
    kernel_size: int
    layers: tuple[DenseLayer, ...]
    fuse_start: int
    fuse_len: int

    def __post_init__(self) -> None:
        _check_plan(self)

    def ints(self) -> list[int]:
        """The flat ``int[] plan`` of the dispatcher op: ``channels, in_channels, kernel_size, fuse_start,
        fuse_len``, then per layer ``in_start, in_len, out_start, out_channels, out_split, out2_start,
        res_start, relu``."""
        out = [self.channels, self.in_channels, self.kernel_size, self.fuse_start, self.fuse_len]
        for lay in self.layers:
            out += [lay.in_start, lay.in_len, lay.out_start, lay.out_channels, lay.out_split, lay.out2_start,
                    lay.res_start, int(lay.relu)]
        return out


def _check_plan(p: DensePlan) -> None:
    for name in ("channels", "in_channels", "kernel_size", "fuse_len"):
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"plan.{name} must be a positive int, got {v!r}")
    if p.kernel_size % 2 == 0:
        raise ValueError(f"plan.kernel_size must be odd, got {p.kernel_size}")
    if p.in_channels > p.channels:
        raise ValueError(f"plan.in_channels {p.in_channels} exceeds the buffer width {p.channels}")
    if not p.layers:
        raise ValueError("plan.layers must not be empty")
    written = [c < p.in_channels for c in range(p.channels)]

    def rng(what: str, start: int, n: int) -> range:
        if n <= 0 or start < 0 or start + n > p.channels:
            raise ValueError(f"{what} [{start}, {start + n}) is outside the buffer [0, {p.channels})")
        return range(start, start + n)

    for i, lay in enumerate(p.layers):
        if not 0 < lay.out_split <= lay.out_channels:
            raise ValueError(f"layer {i}: split must be in [1, out_channels={lay.out_channels}], got {lay.out_split}")
        for c in rng(f"layer {i} input", lay.in_start, lay.in_len):
            if not written[c]:
                raise ValueError(f"layer {i} reads buffer channel {c} before any layer writes it")
        if lay.res_start >= 0:
            for c in rng(f"layer {i} residual", lay.res_start, lay.out_channels):
                if not written[c]:
                    raise ValueError(f"layer {i}: residual channel {c} is not written yet")
        outs = list(rng(f"layer {i} output", lay.out_start, lay.out_split))
        if lay.out_channels > lay.out_split:
            outs += list(rng(f"layer {i} second output", lay.out2_start, lay.out_channels - lay.out_split))
        for c in outs:
            if written[c]:
                raise ValueError(f"layer {i} writes buffer channel {c}, which is already written")
            written[c] = True
    for c in rng("fusion input", p.fuse_start, p.fuse_len):
        if not written[c]:
            raise ValueError(f"the fusion reads buffer channel {c}, which no layer writes")


# ---------------------------------------------------------------------------------------------- plans

_PLANS: dict[tuple, DensePlan] = {}


def cached_plan(build):
    """Memoise a plan builder (plans are immutable); under torch.compile the builder is traced instead, which
    dynamo folds to constants (a lookup in a mutable dict would become a guard)."""

    @functools.wraps(build)
    def wrapper(*args):
        if torch.compiler.is_compiling():
            return build(*args)
        key = (build.__module__, build.__qualname__, *args)
        plan = _PLANS.get(key)
        if plan is None:
            plan = _PLANS[key] = build(*args)
        return plan

    return wrapper


@cached_plan
def rdb_plan(channels: int, growth: int, num_layers: int, kernel_size: int = 3) -> DensePlan:
    """RDN's RDB / RDCAB: layer c reads [0, G0 + c*G) and appends G channels; the fusion reads all."""
    g0, g = channels, growth
    layers = tuple(DenseLayer(0, g0 + c * g, g0 + c * g, g) for c in range(num_layers))
    width = g0 + num_layers * g
    return DensePlan(width, g0, kernel_size, layers, 0, width)


@cached_plan
def srdense_plan(in_channels: int, growth: int, num_layers: int, kernel_size: int = 3) -> DensePlan:
    """SRDenseNet: layer 1 reads the input, layer k >= 2 only the earlier outputs; output = all outputs."""
    c, g = in_channels, growth
    layers = [DenseLayer(0, c, c, g)]
    layers += [DenseLayer(c, k * g, c + k * g, g) for k in range(1, num_layers)]
    return DensePlan(c + num_layers * g, c, kernel_size, tuple(layers), c, num_layers * g)


@cached_plan
def split_plan(channels: int, num_layers: int, distilled: int, kernel_size: int = 3) -> DensePlan:
    """Split block: [x | rem_1..rem_{L-1} | d_1..d_L]; layer k reads [x, rem_1..rem_{k-1}] and writes its
    distilled part to d_k, the rest to rem_k (the last layer computes only its distilled part)."""
    c, d, L = channels, distilled, num_layers
    r = c - d
    d0 = c + (L - 1) * r
    layers = [DenseLayer(0, c + k * r, d0 + k * d, c, split=d, out2_start=c + k * r) for k in range(L - 1)]
    layers.append(DenseLayer(0, c + (L - 1) * r, d0 + (L - 1) * d, d))
    return DensePlan(d0 + L * d, c, kernel_size, tuple(layers), d0, L * d)


@cached_plan
def fdirb_plan(channels: int, num_layers: int, sub_channels: int, kernel_size: int = 3) -> DensePlan:
    """FD-IRB: [x | l_1..l_{L-1} | layer_L]; l_k = relu(conv_k([x, l_1..l_{k-1}]) + l_{k-1}), layer_L has no
    activation; the fusion reads everything (its weight folds the 1x1 retain convs, see nn.FDIRB)."""
    c, L, s = channels, num_layers, sub_channels
    layers = [DenseLayer(0, c * k, c * k, c, res_start=c * (k - 1)) for k in range(1, L)]
    layers.append(DenseLayer(0, c * L, c * L, s, relu=False))
    return DensePlan(c * L + s, c, kernel_size, tuple(layers), 0, c * L + s)


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
    """
    _checks.feature_map("x", x)
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

    backend = _backend.choose(OP, x.device.type)
    if backend == "reference":
        return reference(x, weights, biases, plan, fuse_weight=fuse_weight, fuse_bias=fuse_bias,
                         gate=None if gate is None else (gw1, gb1, gw2, gb2), residual=residual)
    # the schema takes a bias per layer (optional tensors inside lists cannot carry gradients through
    # torch.library autograd): zeros stand in for None
    biases = [b if b is not None else x.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
    return _backend.op_handle(backend, OP)(
        x, weights, biases, plan.ints(), fuse_weight, fuse_bias, gw1, gb1, gw2, gb2, residual
    )[0]


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


# ---- registration of the compiled op --------------------------------------------------------------------


def _parse(plan_ints):
    return plan_ints[0], plan_ints[1], plan_ints[2], plan_ints[3], plan_ints[4]


def buffer_rows(N, H, W, kernel_size):
    """Rows of the buffer matrix: every padded pixel of every sample plus a margin before and after."""
    p = kernel_size // 2
    Hp, Wp = H + 2 * p, W + 2 * p
    return N * Hp * Wp + 2 * (p * Wp + p)


def _fake(x, weights, biases, plan, fuse_weight, fuse_bias, gw1, gb1, gw2, gb2, residual):
    T, _Cx, k, _fs, K = _parse(plan)
    N, _, H, W = x.shape
    cout = fuse_weight.shape[0] if fuse_weight is not None else K
    out = torch.empty((N, cout, H, W), dtype=x.dtype, device=x.device,
                      memory_format=_checks.suggest_memory_format(x))
    buf = x.new_empty((buffer_rows(N, H, W, k), T))
    stats = x.new_empty((N, 2, K) if gw1 is not None else (0,), dtype=_checks.acc_dtype(x))
    return out, buf, stats


def _fake_backward(grad_out, buffer, stats, weights, biases, plan, fuse_weight, gw1, gb1, gw2, gb2):
    _T, Cx, _k, _fs, _K = _parse(plan)
    N, _, H, W = grad_out.shape
    gx = torch.empty((N, Cx, H, W), dtype=grad_out.dtype, device=grad_out.device,
                     memory_format=_checks.suggest_memory_format(grad_out))

    def like(t):
        return torch.empty_like(t) if t is not None else grad_out.new_empty((0,))

    return (gx, [torch.empty_like(w) for w in weights], [torch.empty_like(b) for b in biases], like(fuse_weight),
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


def _make_backward(backward_op):
    def backward(ctx, grad_out, _grad_buf, _grad_stats):
        saved = ctx.saved_tensors
        buf, stats, fuse_weight, gw1, gb1, gw2, gb2 = saved[:7]
        L = ctx.n_layers
        weights, biases = list(saved[7:7 + L]), list(saved[7 + L:7 + 2 * L])
        gx, gws, gbs, gfw, gfb, ggw1, ggb1, ggw2, ggb2 = backward_op(
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

    return backward


def register(namespace: str, fake: bool) -> None:
    """Fake kernels (for ops defined in C++) and autograd for ``namespace::dense_block``."""
    qual = f"{namespace}::{OP}"
    if fake:
        torch.library.register_fake(qual)(_fake)
        torch.library.register_fake(f"{qual}_backward")(_fake_backward)
    backward_op = getattr(getattr(torch.ops, namespace), f"{OP}_backward")
    torch.library.register_autograd(qual, _make_backward(backward_op), setup_context=_setup_context)
