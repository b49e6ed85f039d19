"""Plain-PyTorch ground truth: functional ops and layers as published (see ``functional`` and the modules)."""
from . import functional
from .attention import RCAB, BalancedAttention, ChannelAttention
from .dense import FDIRB, RDCAB, ResidualDenseBlock, SplitBlock, SRDenseBlock
from .upsample import MeanShift, PixelShuffleUpsampler, Upsampler, UPNet

__all__ = ["functional", "ChannelAttention", "BalancedAttention", "RCAB"]
__all__ += ["ResidualDenseBlock", "RDCAB", "SRDenseBlock", "SplitBlock", "FDIRB"]
__all__ += ["MeanShift", "Upsampler", "UPNet", "PixelShuffleUpsampler"]
