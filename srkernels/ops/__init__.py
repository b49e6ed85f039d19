"""Public functional API: one module per fused op. Each validates its arguments, picks a backend
(``srkernels._backend``) and calls ``torch.ops.srkernels.<op>``, the Triton op or the reference."""
import torch

from .. import _backend
from . import balanced_attention as _ba
from . import channel_attention as _ca
from . import dense_block as _db
from . import pixel_shuffle as _ps
from .balanced_attention import balanced_attention
from .channel_attention import channel_attention
from .dense_block import dense_block
from .pixel_shuffle import pixel_shuffle, pixel_unshuffle

_MODULES = (_ca, _ba, _ps, _db)


def _register(namespace: str, fake: bool) -> None:
    ns = getattr(torch.ops, namespace)
    for m in _MODULES:
        if hasattr(ns, m.OP):  # a backend may not provide every op yet
            m.register(namespace, fake=fake)


if _backend._C is not None:
    _register("srkernels", fake=True)
# triton_op derives fake kernels from its body; only autograd is ours to add, once Triton is loaded.
_backend.TRITON_HOOKS.append(lambda: _register("srkernels_triton", fake=False))

__all__ = ["channel_attention", "balanced_attention", "pixel_shuffle", "pixel_unshuffle", "dense_block"]
