"""Reference attention layers, as published (state_dict keys of the upstream modules).

- ``ChannelAttention``: RCAN's CALayer (keys ``conv_du.0``, ``conv_du.2``); ``pool="avg+std"`` gives the
  contrast-aware variant of the RDCAB Split / FD-IRB models (docs/architectures.md §6.3).
- ``BalancedAttention``: BAM (ACAM x MSAM) as in super-image's BamBlock (keys ``ca.fc1``, ``ca.relu1``,
  ``ca.fc2``, ``sa.conv1``).
- ``RCAB``: conv-ReLU-conv-attention + identity (keys ``body.0``, ``body.2``, ``body.3.*``).

The fused twins in ``srkernels.nn`` subclass these, so keys, constructors and initialisation are shared.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as RF

__all__ = ["ChannelAttention", "BalancedAttention", "RCAB"]

_POOLS = ("avg", "avg+std")


def _reduced(channels: int, reduction: int) -> int:
    if not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if not isinstance(reduction, int) or reduction <= 0 or channels // reduction < 1:
        raise ValueError(f"reduction must be a positive int <= channels ({channels}), got {reduction!r}")
    return channels // reduction


class ChannelAttention(nn.Module):
    """``x * sigmoid(conv_du(pool(x)))`` (+ an optional residual passed to ``forward``)."""

    def __init__(self, channels: int, reduction: int = 16, *, pool: str = "avg", bias: bool = True) -> None:
        super().__init__()
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
        hidden = _reduced(channels, reduction)
        self.pool = pool
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        if self.pool == "avg+std":
            s = s + RF._pool_std(x)
        out = x * self.conv_du(s)
        return out if residual is None else out + residual

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}"


class _ACAM(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.relu1 = nn.PReLU(hidden)  # init 0.25, one slope per hidden channel
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.fc2(self.relu1(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))


class _MSAM(nn.Module):
    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.conv1(torch.max(x, dim=1, keepdim=True)[0]))


class BalancedAttention(nn.Module):
    """BAM: ``x * ca(x) * sa(x)`` (+ an optional residual passed to ``forward``)."""

    def __init__(self, channels: int, reduction: int = 16, *, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.ca = _ACAM(channels, _reduced(channels, reduction))
        self.sa = _MSAM(kernel_size)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        out = x * self.ca(x) * self.sa(x)
        return out if residual is None else out + residual


ATTENTIONS = {"ca": ChannelAttention, "bam": BalancedAttention}


class RCAB(nn.Module):
    """Residual channel attention block: ``x + attention(conv(relu(conv(x))))`` (no residual scaling)."""

    attentions = ATTENTIONS

    def __init__(self, channels: int, reduction: int = 16, *, attention: str = "ca", kernel_size: int = 3) -> None:
        super().__init__()
        if attention not in self.attentions:
            raise ValueError(f"attention must be one of {tuple(self.attentions)}, got {attention!r}")
        pad = kernel_size // 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=pad),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size, padding=pad),
            self.attentions[attention](channels, reduction),
        )

    def forward(self, x: Tensor) -> Tensor:
        b = self.body
        # The attention layer takes the block input as its residual, so fused twins add it in the same pass.
        return b[3](b[2](b[1](b[0](x))), residual=x)
