"""Drop-in fused ``nn.Module``s: same constructor arguments and state_dict keys as ``srkernels.reference``.

``fuse(model)`` converts the reference layers of an existing model in place (weights kept);
``fold_mean_shift(model)`` folds RCAN's MeanShift layers into its head/tail convs for inference.
"""
from __future__ import annotations

from torch import nn

from .. import reference as _R
from .attention import RCAB, BalancedAttention, ChannelAttention
from .conv import Conv2d, apply_conv, conv2d
from .dense import FDIRB, RDCAB, ResidualDenseBlock, SplitBlock, SRDenseBlock
from .upsample import (MeanPaddedConv2d, MeanShift, PixelShuffleUpsampler, Upsampler, UPNet, fold_mean_shift, icnr_,
                       icnr_upsampler_)

# reference class -> fused twin (a subclass of the same name with the same state, so swapping the class is
# exact), derived from the exports of srkernels.reference: a new layer pair needs no entry here
FUSED: dict[type, type] = {
    getattr(_R, name): globals()[name] for name in _R.__all__
    if isinstance(getattr(_R, name), type) and isinstance(globals().get(name), type)
    and issubclass(globals()[name], getattr(_R, name)) and globals()[name] is not getattr(_R, name)
}


def fuse(model: nn.Module) -> nn.Module:
    """Swap every reference layer of ``model`` that has a fused twin for that twin, in place; returns it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for m in model.modules():
        twin = FUSED.get(type(m))
        if twin is not None:
            m.__class__ = twin
    if hasattr(model, "fused"):
        model.fused = True
    return model


__all__ = ["ChannelAttention", "BalancedAttention", "RCAB", "Conv2d", "conv2d", "apply_conv", "Upsampler", "UPNet",
           "PixelShuffleUpsampler", "MeanShift", "MeanPaddedConv2d", "fold_mean_shift", "icnr_", "icnr_upsampler_",
           "fuse", "FUSED"]
__all__ += ["ResidualDenseBlock", "RDCAB", "SRDenseBlock", "SplitBlock", "FDIRB"]
