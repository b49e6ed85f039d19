"""CPU autocast in the fused layers (issue 13).

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` in inference, a fused layer runs its kernels in the
autocast dtype itself: it casts its input once (a no-op after the first layer: every layer's output is already
bf16) and passes a copy of its parameters in that dtype, built once and cached on the module (rebuilt when a
parameter changes: version, storage, dtype, shape, as the weight-packing caches of ``conv.py``). So the whole
fused model runs bf16 end to end, as after ``model.to(torch.bfloat16)``, with no per-call weight casts; the
output dtype is the one eager autocast gives the reference layers (a convolution's result is bf16; an add of a
float32 tensor, e.g. a float32 residual, promotes to float32).

Training under autocast (a gradient wanted) takes the layers' usual path: eager convs, and the ops' own
autocast rules (``srkernels/ops/_registry.py``), which cast per call and let autograd carry the gradients back
to the float32 parameters.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._cache import PackCache, _module_cache


def dtype(x: Tensor, *params: Tensor | None) -> torch.dtype | None:
    """The dtype a fused layer should run in itself: CPU autocast's, when it is on, ``x`` is float32 or
    already that dtype, and no gradient is wanted for ``x`` or ``params``; None otherwise (the layer runs as
    without autocast)."""
    # cheapest tests first: paid per layer call under autocast
    if not (x.is_cpu and torch.is_autocast_enabled("cpu")):
        return None
    dt = torch.get_autocast_dtype("cpu")
    xd = x.dtype
    if xd is not dt and xd is not torch.float32:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return None
    return None if torch.compiler.is_compiling() else dt


def cast_tree(value, dt: torch.dtype):
    """``value`` (a tensor, None, or lists/tuples of them) detached and cast to ``dt``, strides kept."""
    if isinstance(value, Tensor):
        return value.detach().to(dt)
    if isinstance(value, (list, tuple)):
        return type(value)(cast_tree(v, dt) for v in value)
    return value


def _key(params, dt) -> tuple:
    return (dt, *[None if p is None else (p._version, p.data_ptr(), p.dtype, p.shape) for p in params])


def cached(module, x: Tensor, params: list, build, attr: str = "_srk_amp",
           inputs: tuple = ()) -> tuple[Tensor, object] | None:
    """Under CPU autocast inference (``dtype`` of x, ``params`` and the other ``inputs``): ``(x in the autocast
    dtype, cast_tree(build()))``, the latter cached on ``module`` under ``attr`` while ``params`` (every parameter
    ``build`` reads) stay the same; None otherwise."""
    dt = dtype(x, *params, *inputs)
    if dt is None:
        return None
    def make():
        with torch.inference_mode(False):  # normal tensors, usable (and versioned) outside inference_mode too
            return cast_tree(build(), dt)

    return x if x.dtype is dt else x.to(dt), _module_cache(module, attr, _key(params, dt), make)


class CastConv:
    """A stand-in for an ``nn.Conv2d`` / ``nn.ConvTranspose2d`` with its weight and bias in another dtype and the
    same conv parameters: ``conv.conv2d`` / ``conv.conv_transpose2d`` take it as they take the module, keeping
    their prepacked weights on it."""

    def __init__(self, conv, dt: torch.dtype) -> None:
        self.weight = conv.weight.detach().to(dt)
        self.bias = None if conv.bias is None else conv.bias.detach().to(dt)
        for name in ("stride", "padding", "dilation", "groups", "padding_mode", "output_padding"):
            if hasattr(conv, name):
                setattr(self, name, getattr(conv, name))


def conv_twin(conv, dt: torch.dtype) -> CastConv:
    """``conv`` with its weight and bias in ``dt``, cached on it while they stay the same (the same tensor
    objects, versions and storage: a cheap test, paid per conv call)."""
    w, b = conv.weight, conv.bias
    c = conv.__dict__.get("_srk_amp")
    k = c.key if c is not None else None
    if (k is not None and k[0] is w and k[1] == w._version and k[2] == w.data_ptr() and k[3] is b and k[5] is dt
            and (b is None or (k[4] == (b._version, b.data_ptr())))):
        return c.data
    with torch.inference_mode(False):  # a normal weight: conv.py's packing cache reads its version
        twin = CastConv(conv, dt)
    conv.__dict__["_srk_amp"] = PackCache((w, w._version, w.data_ptr(), b, None if b is None else
                                           (b._version, b.data_ptr()), dt), twin)
    return twin


def add_late(y: Tensor, residual: Tensor | None) -> Tensor:
    """``y + residual`` as eager autocast computes it (type promotion), for a residual left out of the fused
    call because it is not in ``y``'s dtype."""
    return y if residual is None else y + residual


def split_residual(residual: Tensor | None, dt: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """(residual to fuse, residual to add afterwards): a residual in another dtype than the fused call's is
    added after it, so the result has eager's promoted dtype (a bf16 conv output + a float32 tensor is float32)."""
    if residual is None or residual.dtype == dt:
        return residual, None
    return None, residual
