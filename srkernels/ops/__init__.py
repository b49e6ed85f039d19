"""Public functional API: one module per fused op. Each validates its arguments, picks a backend
(``srkernels._backend``) and calls ``torch.ops.srkernels.<op>``, the Triton op or the reference."""
from .. import _backend
from . import balanced_attention as _ba
from . import channel_attention as _ca
from .balanced_attention import balanced_attention
from .channel_attention import channel_attention

_MODULES = (_ca, _ba)

if _backend._C is not None:
    for _m in _MODULES:
        _m.register("srkernels", fake=True)


def _register_triton() -> None:
    # triton_op derives fake kernels from its body; only autograd is ours to add.
    for m in _MODULES:
        m.register("srkernels_triton", fake=False)


_backend.TRITON_HOOKS.append(_register_triton)

__all__ = ["channel_attention", "balanced_attention"]
