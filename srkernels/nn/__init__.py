"""Drop-in fused ``nn.Module``s: same constructor arguments and state_dict keys as ``srkernels.reference``.

``fuse(model)`` converts the reference layers of an existing model in place (weights kept).
"""
from __future__ import annotations

from torch import nn

from ..reference import attention as _R
from .attention import RCAB, BalancedAttention, ChannelAttention

# reference class -> fused twin (a subclass with the same state, so swapping the class is exact)
FUSED: dict[type, type] = {
    _R.ChannelAttention: ChannelAttention,
    _R.BalancedAttention: BalancedAttention,
    _R.RCAB: RCAB,
}


def fuse(model: nn.Module) -> nn.Module:
    """Swap every reference layer of ``model`` that has a fused twin for that twin, in place; returns it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for m in model.modules():
        twin = FUSED.get(type(m))
        if twin is not None:
            m.__class__ = twin
    return model


__all__ = ["ChannelAttention", "BalancedAttention", "RCAB", "fuse", "FUSED"]
