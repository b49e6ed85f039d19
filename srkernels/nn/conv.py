"""``Conv2d``: a drop-in ``nn.Conv2d`` (same keys) with a fused epilogue -- bias, ReLU and a residual add -- run
by the ``conv2d_pointwise`` op's CPU algorithm (srkernels/ops/conv2d_pointwise.py: oneDNN's convolution with
post-ops, the path TorchInductor takes) on weights packed once per module and input shape. CPU training of a
conv Winograd fits runs the op itself, through its autograd (``_train_conv2d``; its weight changes every
step, so nothing is packed); other training, other devices and calls no algorithm supports run the op's
reference (eager ``F.conv2d``) with the same result.

The hot call (``conv2d``) runs the algorithm from Python, not through the dispatcher op
``torch.ops.srkernels.conv2d_pointwise``: a dispatcher op with a Python kernel adds ~3.5 us per call on top of
the ~3 us of cache bookkeeping here (benchmarks/bench_conv2d_pointwise.py, "overhead" case, 1 thread), i.e. it
would double the per-conv cost that RCAN pays 400 times per forward.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _amp
from ._cache import PackCache, _module_cache
from ..ops.conv2d_pointwise import ONEDNN, ONEDNN_FP32, CpuAlgorithm, Winograd, cpu_algorithm, reference

__all__ = ["Conv2d", "conv2d", "apply_conv"]

ACTIVATIONS = (None, "relu")
# Packed weights kept per conv, one per input shape, least recently used dropped first. Each is a copy of the
# weight, so this bounds memory when every image has its own size (then each forward packs once, about what
# eager pays per call anyway); tiled inference runs one tile size, and a few sizes in rotation still hit.
_PACK_CACHE_SIZE = 4


def _packable(conv: nn.Module, x: Tensor, residual: Tensor | None) -> bool:
    """Whether a packed weight may serve the call: CPU inference (the algorithms record no autograd), the
    weight's dtype, zero padding given as numbers."""
    # called once per conv per forward: cheapest tests first (a model of 400 convs pays this 400 times)
    if not (x.is_cpu and x.dim() == 4):
        return False
    w = conv.weight
    return (
        w.dtype == x.dtype
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                             or (residual is not None and residual.requires_grad)))
    )


def _packed_weight(conv: nn.Conv2d, x: Tensor) -> tuple[CpuAlgorithm, object] | None:
    """(CPU algorithm, its packed weight) for inputs of ``x``'s shape, cached on the module per input shape
    until the weight changes (version, dtype, storage); None when no algorithm supports the call.

    oneDNN picks its blocked layout by input size (for 256x64x3x3 under AVX2: Acdb16a packed without a size,
    Acdb24a for a 12x16 input, Acdb32a for 32x32); a weight packed for another size is reordered again inside
    every call (issue 13). A packed weight always runs channels-last, so the input's memory format needs no key
    of its own."""
    w = conv.weight
    shape = tuple(x.shape)
    # fast path: the same weight (object, version, storage) and input shape as the previous call. Python
    # bookkeeping here is paid per conv call: ~10 us of it cost RCAN ~1-3% under AVX2 (README "Performance")
    last = conv.__dict__.get("_srk_last")
    last = last.data if last is not None else None  # a PackCache: a module copy starts without one
    if last is not None and last[0] is w and last[1] == w._version and last[2] == shape and last[3] == w.data_ptr():
        return last[4]
    meta = (conv.stride, conv.padding, conv.dilation, conv.groups)
    alg = cpu_algorithm(x, w, *meta)
    if alg is None:  # before touching the cache: a call in an unsupported dtype keeps the packs of another
        return None
    packs = _module_cache(conv, "_srk_packed", (w._version, w.dtype, w.data_ptr()), OrderedDict)
    entry = packs.get(shape)
    if entry is None:
        packed = alg.pack(w, *meta, shape)
        entry = packs[shape] = (alg, packed, alg.bind(packed, *meta))
        if len(packs) > _PACK_CACHE_SIZE:
            packs.popitem(last=False)
    else:
        packs.move_to_end(shape)
    conv.__dict__["_srk_last"] = PackCache(None, (w, w._version, shape, w.data_ptr(), entry))
    return entry


def _packed_transpose_weight(deconv: nn.ConvTranspose2d, x: Tensor, alg) -> Tensor:
    """``_packed_weight`` for a transposed conv (oneDNN deconvolution; ``alg``: ``ONEDNN`` or ``ONEDNN_FP32``, whose
    packs differ by the weight's dtype, a key of the cache), same cache rules."""
    w = deconv.weight
    packs = _module_cache(deconv, "_srk_packed", (w._version, w.dtype, w.data_ptr()), OrderedDict)
    shape = tuple(x.shape)
    packed = packs.get(shape)
    if packed is None:
        packed = alg.pack_transpose(w, deconv.stride, deconv.padding, deconv.output_padding, deconv.dilation,
                                       deconv.groups, shape)
        packs[shape] = packed
        if len(packs) > _PACK_CACHE_SIZE:
            packs.popitem(last=False)
    else:
        packs.move_to_end(shape)
    return packed


def conv_transpose2d(deconv: nn.ConvTranspose2d, x: Tensor, activation: str | None = None) -> Tensor:
    """``act(deconv(x))`` for an ``nn.ConvTranspose2d``: one prepacked oneDNN deconvolution with the activation
    as post-op in CPU inference (what Inductor's freezing pass emits), eager ops otherwise."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if torch.is_autocast_enabled("cpu"):
        y = _autocast_conv(conv_transpose2d, deconv, x, activation, None)
        if y is not None:
            return y
    if not torch.compiler.is_compiling() and _packable(deconv, x, None) and isinstance(deconv.output_padding, tuple):
        meta = (deconv.stride, deconv.padding, deconv.dilation, deconv.groups)
        # bf16 without native bf16: oneDNN's float32 deconvolution between a widening and one rounding
        alg = next((a for a in (ONEDNN, ONEDNN_FP32) if a.supports(x, deconv.weight, *meta)), None)
        if alg is not None:
            w = _packed_transpose_weight(deconv, x, alg)
            b = deconv.bias.detach() if deconv.bias is not None else None
            return alg.run_transpose(x, w, b, deconv.stride, deconv.padding, deconv.output_padding,
                                     deconv.dilation, deconv.groups, activation or "none")
    y = F.conv_transpose2d(x, deconv.weight, deconv.bias, deconv.stride, deconv.padding, deconv.output_padding,
                           deconv.groups, deconv.dilation)
    return F.relu(y) if activation == "relu" else y


def conv2d(conv: nn.Conv2d, x: Tensor, activation: str | None = None, residual: Tensor | None = None, *,
           with_bias: bool = True) -> Tensor:
    """``act(conv(x)) (+ residual)`` for any ``nn.Conv2d``, as one oneDNN call where possible.
    ``with_bias=False`` skips ``conv.bias`` (for a caller that adds it in its own epilogue)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    # the hot call, first: CPU inference on the weight and input shape of this conv's previous call -- the
    # tests of _packable and _packed_weight in one (~2 us less per conv; RCAN makes 411 per forward)
    last = conv.__dict__.get("_srk_last")
    last = last.data if last is not None else None
    if (last is not None and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()):
        params = conv._parameters  # not Module.__getattr__ (~0.6 us a lookup); a parametrized weight is not here
        w = params.get("weight")
        if (last[0] is w and last[1] == w._version and last[3] == w.data_ptr() and x.is_cpu
                and last[2] == x.shape and x.dtype == w.dtype and conv.padding_mode == "zeros"):
            b = (params["bias"] if "bias" in params else conv.bias) if with_bias else None
            return last[4][2](x, b, activation or "none", residual)  # the algorithm's bound call
    if torch.is_autocast_enabled("cpu"):  # the only cost autocast adds to the float32 path: this test
        y = _autocast_conv(conv2d, conv, x, activation, residual, with_bias=with_bias)
        if y is not None:
            return y
    b = conv.bias if with_bias else None
    # under torch.compile the eager formula is traced: Inductor picks its own fused conv kernels
    if not torch.compiler.is_compiling() and _packable(conv, x, residual):
        entry = _packed_weight(conv, x)
        if entry is not None:
            if b is not None and b.requires_grad and torch.is_grad_enabled():
                b = b.detach()  # a trainable bias on a frozen weight: the algorithms record no autograd
            return entry[0].run(x, entry[1], b, conv.stride, conv.padding, conv.dilation, conv.groups,
                                activation or "none", residual)
    elif x.is_cpu and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        y = _train_conv2d(conv, x, b, activation, residual)
        if y is not None:
            return y
    return reference(x, conv.weight, b, conv.stride, conv.padding, conv.dilation, conv.groups, activation or "none",
                     residual)


def _autocast_conv(fn, conv, x: Tensor, activation, residual: Tensor | None, **kw) -> Tensor | None:
    """``fn(conv, x, ...)`` (``conv2d`` or ``conv_transpose2d``) under CPU autocast inference: on ``conv``'s
    weights cast once to the autocast dtype and kept (nn/_amp.py), so the packed oneDNN path runs in bf16 as for
    a bf16 module; a residual of another dtype is added afterwards, as eager would promote. None when this does
    not apply (training, a module already in a low dtype): the caller's usual path, eager autocast included."""
    if conv.weight.dtype != torch.float32:
        return None
    dt = _amp.dtype(x, conv.weight, conv.bias, residual)
    if dt is None:
        return None
    fused, late = _amp.split_residual(residual, dt)
    twin = _amp.conv_twin(conv, dt)
    if x.dtype is not dt:
        x = x.to(dt)
    y = fn(twin, x, activation, **kw) if fused is None else fn(twin, x, activation, fused, **kw)
    return _amp.add_late(y, late)


def _train_conv2d(conv: nn.Conv2d, x: Tensor, b: Tensor | None, activation: str | None,
                  residual: Tensor | None) -> Tensor | None:
    """CPU training of a conv Winograd serves: the ``conv2d_pointwise`` op through its autograd (Winograd
    forward and input gradient, ATen weight gradient; saves what the reference saves), channels_last (the
    kernel's layout; the models restore the caller's at the end). None when Winograd does not serve it (the
    reference runs: oneDNN's conv under autograd is what the op's other algorithm would run anyway)."""
    w = conv.weight
    # cheapest tests first: every other conv of a training step pays them (SRCNN's 9x9 and 1x1 convs)
    if not (conv.kernel_size in ((3, 3), (5, 5)) and conv.stride == (1, 1) and x.dim() == 4 and w.dtype == x.dtype
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)):
        return None
    meta = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    if not isinstance(cpu_algorithm(x, w, *meta, training=True), Winograd):
        return None
    return torch.ops.srkernels.conv2d_pointwise(x.contiguous(memory_format=torch.channels_last), w, b, *meta,
                                                activation or "none", residual)


def apply_conv(m: nn.Module, x: Tensor, activation: str | None = None, residual: Tensor | None = None) -> Tensor:
    """``act(m(x)) (+ residual)`` for a conv layer of a fused model: one ``conv2d`` call (prepacked oneDNN with
    post-ops in CPU inference) when ``m`` is a plain ``nn.Conv2d`` or an ``srkernels.nn.Conv2d`` without its own
    activation; any other module (e.g. ``MeanPaddedConv2d`` after ``fold_mean_shift``) runs its own forward and
    the epilogue eagerly."""
    if type(m) is nn.Conv2d or (type(m) is Conv2d and m.activation is None):
        return conv2d(m, x, activation, residual)
    y = m(x)
    if activation == "relu":
        y = F.relu(y)
    return y if residual is None else y + residual


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` + optional ``activation`` ("relu") + optional residual passed to ``forward``:
    ``act(conv(x) + bias) (+ residual)``. Keys ``weight``, ``bias`` as ``nn.Conv2d``."""

    def __init__(self, *args, activation: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return conv2d(self, x, self.activation, residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")
