"""The plan of a dense block (which buffer channels every conv reads and writes) and the layout of its feature
buffer: shared by the op (``srkernels.ops.dense_block``), its kernels (``csrc/dense_block_common.h``,
``srkernels/triton/dense_block.py``) and the layers (``srkernels.nn``), so it imports nothing from them.

Buffer layout (the compiled kernels; the reference uses plain ``torch.cat``): pixel-major ("NHWC") with
a zero border of ``p = k // 2`` pixels around every sample and a margin of ``p*(W+2p) + p`` rows before and
after, i.e. a matrix ``[R, T]`` with ``R = N*(H+2p)*(W+2p) + 2*margin`` rows (pixels) and ``T`` columns. A
channel range of it is a row-strided matrix (leading dimension T), which GEMM micro-kernels read in place, and a
conv tap is that matrix shifted by a constant number of rows; the border makes the zero padding implicit and lets one
GEMM span several image rows and all samples. Cost of the choice: the border (13% more memory at 32x32, 4% at
96x96) and ~2/(W+2) wasted GEMM rows (the border columns inside a row range). Kernel contract: the docstring
of ``srkernels.ops.dense_block`` and docs/ops.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


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

    # the flat plan's layout (csrc/dense_block_common.h kHead, kLayer): HEAD ints, then LAYER per layer
    HEAD, LAYER = 6, 8

    def ints(self, training: bool = False) -> list[int]:
        """The flat ``int[] plan`` of the dispatcher op: ``channels, in_channels, kernel_size, fuse_start,
        fuse_len, training``, then per layer ``in_start, in_len, out_start, out_channels, out_split, out2_start,
        res_start, relu``. ``training`` (0/1): the call is one autograd records (``ops.dense_block`` sets it);
        the CPU kernel then takes its Winograd tile from ``SRKERNELS_WINOGRAD_TRAIN`` instead of
        ``SRKERNELS_WINOGRAD``, as the 3x3 convs do; the other kernels ignore it."""
        out = [self.channels, self.in_channels, self.kernel_size, self.fuse_start, self.fuse_len, int(training)]
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


# ---- the buffer -------------------------------------------------------------------------------------------


def parse(plan_ints):
    """The head of ``DensePlan.ints()`` but its training flag: channels, in_channels, kernel_size, fuse_start,
    fuse_len."""
    return tuple(plan_ints[:5])


def buffer_rows(N, H, W, kernel_size):
    """Rows of the buffer matrix: every padded pixel of every sample plus a margin before and after."""
    p = kernel_size // 2
    Hp, Wp = H + 2 * p, W + 2 * p
    return N * Hp * Wp + 2 * (p * Wp + p)
