"""Fused attention layers: same constructors, parameters and state_dict keys as the reference layers
(they subclass them); only ``forward`` differs, calling one fused op (residual add included)."""
from __future__ import annotations

from torch import Tensor

from .. import ops
from ..reference import attention as R
from .conv import conv2d


class ChannelAttention(R.ChannelAttention):
    """RCAN CALayer (keys ``conv_du.0``, ``conv_du.2``) as one op: pool, FCs, sigmoid, scale, + residual."""

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        fc1, fc2 = self.conv_du[0], self.conv_du[2]
        return ops.channel_attention(
            x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual=residual, pool=self.pool
        )


class BalancedAttention(R.BalancedAttention):
    """BAM (keys ``ca.fc1``, ``ca.relu1``, ``ca.fc2``, ``sa.conv1``) as one op, + residual."""

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        ca, sa = self.ca, self.sa
        return ops.balanced_attention(
            x, ca.fc1.weight, ca.relu1.weight, ca.fc2.weight, sa.conv1.weight, residual=residual
        )


class RCAB(R.RCAB):
    """Residual channel attention block whose attention and residual add run as one fused op."""

    attentions = {"ca": ChannelAttention, "bam": BalancedAttention}

    def forward(self, x: Tensor) -> Tensor:
        b = self.body
        # conv + bias + ReLU as one oneDNN call in CPU inference; attention + residual add as one op
        return b[3](conv2d(b[2], conv2d(b[0], x, "relu")), residual=x)
