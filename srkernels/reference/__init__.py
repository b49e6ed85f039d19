"""Plain-PyTorch ground truth: functional ops and layers as published (see ``functional`` and the modules)."""
from . import functional
from .attention import RCAB, BalancedAttention, ChannelAttention

__all__ = ["functional", "ChannelAttention", "BalancedAttention", "RCAB"]
