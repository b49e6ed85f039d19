"""``Conv2d``: a drop-in ``nn.Conv2d`` (same keys) with a fused epilogue -- bias, ReLU and a residual add --
that on CPU inference runs as one oneDNN convolution with post-ops on prepacked weights (the path
TorchInductor takes through ``mkldnn._convolution_pointwise``). Training, other devices and unsupported
configurations run the eager ops with the same result.
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._prims_common import suggest_memory_format

__all__ = ["Conv2d", "conv2d", "apply_conv"]

ACTIVATIONS = (None, "relu")
_MKLDNN = torch.backends.mkldnn.is_available()
# Packed weights kept per conv, one per input shape, least recently used dropped first. Each is a copy of the
# weight, so this bounds memory when every image has its own size (then each forward packs once, about what
# eager pays per call anyway); tiled inference runs one tile size, and a few sizes in rotation still hit.
_PACK_CACHE_SIZE = 4


class PackCache:
    """Holds derived weights (oneDNN-packed, relaid) on a module: ``key`` says which weights they came from,
    ``data`` what was built. A module copy or pickle gets an empty cache (packed oneDNN tensors have no storage
    to copy, and a copy rebuilds on first use anyway)."""

    __slots__ = ("key", "data")

    def __init__(self, key=None, data=None) -> None:
        self.key, self.data = key, data

    def __deepcopy__(self, memo) -> "PackCache":
        return PackCache()

    def __copy__(self) -> "PackCache":
        return PackCache()

    def __reduce__(self):
        return (PackCache, ())


def _module_cache(m: nn.Module, attr: str, key, build):
    """``build()`` cached on ``m`` under ``attr`` while ``key`` stays the same."""
    c = m.__dict__.get(attr)
    if c is None or c.key != key:
        c = PackCache(key, build())
        m.__dict__[attr] = c
    return c.data


@functools.cache
def _onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions here: AVX-512 (bw, vl, dq) or AVX-NE-CONVERT, as capped by
    ONEDNN_MAX_CPU_ISA. The very check oneDNN's bf16 ops apply before refusing (issue 12: AVX2-only CPUs such
    as AMD Zen 2/3); asked once per process. A function, so tests can stand in for another CPU."""
    return _MKLDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _onednn_ok(conv: nn.Conv2d, x: Tensor, residual: Tensor | None) -> bool:
    # called once per conv per forward: cheapest tests first (a model of 400 convs pays this 400 times)
    if not (_MKLDNN and x.is_cpu and x.dim() == 4):
        return False
    dt = x.dtype
    if dt != torch.float32 and not (dt == torch.bfloat16 and _onednn_bf16()):
        return False
    w = conv.weight
    return (
        w.dtype == dt
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                             or (residual is not None and residual.requires_grad)))
    )


def _packed_weight(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """oneDNN-prepacked weight in the layout the primitive for ``x`` wants, cached on the module per input shape
    until the weight changes (version, dtype, storage).

    The blocked layout oneDNN picks depends on the input size (for 256x64x3x3 under AVX2: Acdb16a packed without
    a size, Acdb24a for a 12x16 input, Acdb32a for 32x32); a weight packed for another size is reordered again
    inside every call (issue 13).
    ``_convolution_pointwise`` always runs a packed weight channels-last, and packing with ``input_size``
    assumes the same, so the input's memory format needs no key of its own."""
    w = conv.weight
    shape = tuple(x.shape)
    # fast path: the same weight (object, version, storage) and input shape as the previous call. Python
    # bookkeeping here is paid per conv call: ~10 us of it cost RCAN ~1-3% under AVX2 (README "Performance")
    last = conv.__dict__.get("_srk_last")
    last = last.data if last is not None else None  # a PackCache: a module copy starts without one
    if last is not None and last[0] is w and last[1] == w._version and last[2] == shape and last[3] == w.data_ptr():
        return last[4]
    packs = _module_cache(conv, "_srk_packed", (w._version, w.dtype, w.data_ptr()), OrderedDict)
    packed = packs.get(shape)
    if packed is None:
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            w.detach(), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(shape))
        packs[shape] = packed
        if len(packs) > _PACK_CACHE_SIZE:
            packs.popitem(last=False)
    else:
        packs.move_to_end(shape)
    conv.__dict__["_srk_last"] = PackCache(None, (w, w._version, shape, w.data_ptr(), packed))
    return packed


def _packed_transpose_weight(deconv: nn.ConvTranspose2d, x: Tensor) -> Tensor:
    """``_packed_weight`` for a transposed conv (oneDNN deconvolution), same cache rules."""
    w = deconv.weight
    packs = _module_cache(deconv, "_srk_packed", (w._version, w.dtype, w.data_ptr()), OrderedDict)
    shape = tuple(x.shape)
    packed = packs.get(shape)
    if packed is None:
        packed = torch.ops.mkldnn._reorder_convolution_transpose_weight(
            w.detach(), list(deconv.padding), list(deconv.output_padding), list(deconv.stride),
            list(deconv.dilation), deconv.groups, list(shape))
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
    if (not torch.compiler.is_compiling() and _onednn_ok(deconv, x, None)
            and isinstance(deconv.output_padding, tuple)):
        w = _packed_transpose_weight(deconv, x)
        b = deconv.bias.detach() if deconv.bias is not None else None
        return torch.ops.mkldnn._convolution_transpose_pointwise(
            x, w, b, list(deconv.padding), list(deconv.output_padding), list(deconv.stride), list(deconv.dilation),
            deconv.groups, activation or "none", [None], "")
    y = F.conv_transpose2d(x, deconv.weight, deconv.bias, deconv.stride, deconv.padding, deconv.output_padding,
                           deconv.groups, deconv.dilation)
    return F.relu(y) if activation == "relu" else y


def conv2d(conv: nn.Conv2d, x: Tensor, activation: str | None = None, residual: Tensor | None = None, *,
           with_bias: bool = True) -> Tensor:
    """``act(conv(x)) (+ residual)`` for any ``nn.Conv2d``, as one oneDNN call where possible.
    ``with_bias=False`` skips ``conv.bias`` (for a caller that adds it in its own epilogue)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    # under torch.compile the eager formula is traced: Inductor picks its own fused conv kernels
    if not torch.compiler.is_compiling() and _onednn_ok(conv, x, residual):
        args = (conv.padding, conv.stride, conv.dilation, conv.groups)
        w = _packed_weight(conv, x)
        b = conv.bias if with_bias else None
        if b is not None and b.requires_grad and torch.is_grad_enabled():
            b = b.detach()  # a trainable bias on a frozen weight: this op has no autograd formula
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, w, b, *args, activation or "none", [None], "")
        if activation is None:  # conv + bias + residual: oneDNN binary "add" post-op
            other = residual.contiguous(memory_format=suggest_memory_format(x))
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, w, b, *args, "add", None, None, [None], None)
        y = torch.ops.mkldnn._convolution_pointwise(x, w, b, *args, activation, [None], "")
        return y.add_(residual)
    y = F.conv2d(x, conv.weight, conv.bias if with_bias else None, conv.stride, conv.padding, conv.dilation,
                 conv.groups)
    if activation == "relu":
        y = F.relu(y)
    return y if residual is None else y + residual


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
