"""Reference dense blocks, as published: the torch.cat formulation and the upstream state_dict keys.

- ``ResidualDenseBlock``: RDN's RDB (keys ``convs.{c}.conv.0``, ``LFF``).
- ``RDCAB``: RDCAB-RecursiveSRNet's residual dense channel-attention block (keys ``layers.{c}.conv``,
  ``conv_du.{0,2}``, ``lff``); ``forward(x, residual)`` also adds the recursion's input (docs/architectures.md §6.2).
- ``SRDenseBlock``: SRDenseNet's dense block (keys ``conv1`` .. ``conv{L}``), returns only the new features.
- ``SplitBlock``: the Split version's distillation block (keys ``layer{k}.0``, ``lff``, ``conv_du``; §6.3).
- ``FDIRB``: the FD & IRB version's feature-distillation block (keys ``layer{k}``, ``layer{k}_sub``, ``lff``,
  ``conv_du``; §6.4), including upstream's ``layer1_sub``-on-the-block-input quirk, which its weights need.

Channel attention inside these blocks calls ``functional.channel_attention`` with the ``conv_du`` weights, the
same op the fused twins call; the twins (in ``srkernels.nn``) subclass these and keep keys and constructors.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as RF
from .._util import conv as _conv
from .._validate import positive_int as _positive_int
from .upsample import _odd_kernel

__all__ = ["ResidualDenseBlock", "RDCAB", "SRDenseBlock", "SplitBlock", "FDIRB"]


def _conv_du(channels: int, reduction: int) -> nn.Sequential:
    r = _positive_int("reduction", reduction)
    hidden = channels // r
    if hidden < 1:
        raise ValueError(f"reduction must be <= the attended channels ({channels}), got {r}")
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1), nn.Sigmoid()
    )


def _attend(conv_du: nn.Sequential, x: Tensor, pool: str, residual: Tensor | None = None) -> Tensor:
    fc1, fc2 = conv_du[0], conv_du[2]
    return RF.channel_attention(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual=residual, pool=pool)


class _RDBConv(nn.Module):
    """EDSR ``RDB_Conv``: ``cat(x, relu(conv(x)))`` (keys ``conv.0``)."""

    def __init__(self, cin: int, growth: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(cin, growth, k), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x, self.conv(x)), 1)


class ResidualDenseBlock(nn.Module):
    """RDN block: C x [conv (G0+c*G)->G + ReLU, concatenated], 1x1 LFF (G0+C*G)->G0, + input."""

    def __init__(self, channels: int, growth: int, num_layers: int, *, kernel_size: int = 3) -> None:
        super().__init__()
        g0 = _positive_int("channels", channels)
        g = _positive_int("growth", growth)
        n = _positive_int("num_layers", num_layers)
        k = _odd_kernel(kernel_size)
        self.convs = nn.Sequential(*[_RDBConv(g0 + c * g, g, k) for c in range(n)])
        self.LFF = nn.Conv2d(g0 + n * g, g0, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.LFF(self.convs(x)) + x


class _DenseLayer(nn.Module):
    """HEEJOWOO ``DenseLayer``: ``cat(x, relu(conv(x)))`` (key ``conv``)."""

    def __init__(self, cin: int, growth: int, k: int) -> None:
        super().__init__()
        self.conv = _conv(cin, growth, k)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x, self.relu(self.conv(x))), 1)


class RDCAB(nn.Module):
    """Residual dense channel-attention block: ``x + lff(CA(dense(x))) (+ residual)``.

    The channel attention (avg pool, 1x1 W->W/reduction, ReLU, 1x1 back, sigmoid) acts on the whole
    W = G0 + C*G channel concat, before the 1x1 fusion. Upstream's ``lff`` outputs G and is added to the G0-wide
    input, so it needs G == G0; here it outputs G0, which is the same layer whenever upstream's runs at all.
    """

    def __init__(
        self, channels: int, growth: int, num_layers: int, *, reduction: int = 16, kernel_size: int = 3
    ) -> None:
        super().__init__()
        g0 = _positive_int("channels", channels)
        g = _positive_int("growth", growth)
        n = _positive_int("num_layers", num_layers)
        k = _odd_kernel(kernel_size)
        width = g0 + n * g
        self.layers = nn.Sequential(*[_DenseLayer(g0 + c * g, g, k) for c in range(n)])
        self.conv_du = _conv_du(width, reduction)
        self.lff = nn.Conv2d(width, g0, 1)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        out = x + self.lff(_attend(self.conv_du, self.layers(x), "avg"))
        return out if residual is None else out + residual


class SRDenseBlock(nn.Module):
    """SRDenseNet dense block: conv1 in->G, conv{k} (k-1)*G->G, each + ReLU; returns cat(out_1..out_L).

    Layer k sees the concat of the previous layers' outputs only, not the block input (Lornatang's port).
    """

    def __init__(self, in_channels: int, growth: int = 16, num_layers: int = 8, *, kernel_size: int = 3) -> None:
        super().__init__()
        cin = _positive_int("in_channels", in_channels)
        g = _positive_int("growth", growth)
        self.num_layers = _positive_int("num_layers", num_layers)
        k = _odd_kernel(kernel_size)
        for i in range(1, self.num_layers + 1):
            self.add_module(f"conv{i}", _conv(cin if i == 1 else g * (i - 1), g, k))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        outs: list[Tensor] = []
        h = x
        for i in range(1, self.num_layers + 1):
            outs.append(self.relu(getattr(self, f"conv{i}")(h)))
            h = torch.cat(outs, 1)
        return h


class _DistillationBlock(nn.Module):
    """What the RDCAB Split and FD & IRB blocks share: layers over the growing concat of the block input and
    kept outputs; the distilled pieces are concatenated, fused by the 1x1 ``lff``, scaled by contrast-aware
    channel attention (``conv_du``, mean + std pool) and added to the block input."""

    def _layers_and_kernel(self, channels: int, num_layers: int, kernel_size: int, min_layers: int = 1):
        """Checks the common arguments; sets ``num_layers``; -> (channels, kernel_size)."""
        c = _positive_int("channels", channels)
        self.num_layers = _positive_int("num_layers", num_layers)
        if self.num_layers < min_layers:
            raise ValueError(f"num_layers must be >= {min_layers}, got {num_layers}")
        return c, _odd_kernel(kernel_size)

    def _add_fusion(self, channels: int, distilled: int, reduction: int) -> None:
        """``lff`` (``distilled`` channels per layer -> ``channels``) and ``conv_du``, registered after the layers
        (the upstream key order)."""
        self.lff = nn.Conv2d(distilled * self.num_layers, channels, 1)
        self.conv_du = _conv_du(channels, reduction)

    def _fuse_attend(self, distilled: list[Tensor], x: Tensor) -> Tensor:
        return _attend(self.conv_du, self.lff(torch.cat(distilled, 1)), "avg+std", residual=x)


class SplitBlock(_DistillationBlock):
    """RDCAB Split version block (``DRRDB``'s ``RDCAB``; docs/architectures.md §6.3).

    layer_k (conv + ReLU, C out) sees cat(x, rem_1..rem_{k-1}); its output splits into d = C*rate distilled and
    C-d remaining channels (rem_L is unused). cat(distilled) -> 1x1 ``lff`` -> contrast-aware CA (mean + std
    pool) -> + x.
    """

    def __init__(self, channels: int = 64, num_layers: int = 8, *, distillation_rate: float = 0.25,
                 reduction: int = 16, kernel_size: int = 3) -> None:
        super().__init__()
        c, k = self._layers_and_kernel(channels, num_layers, kernel_size)
        if not isinstance(distillation_rate, (int, float)) or not 0 < distillation_rate < 1:
            raise ValueError(f"distillation_rate must be in (0, 1), got {distillation_rate!r}")
        self.distilled = int(c * distillation_rate)
        self.remaining = c - self.distilled
        if self.distilled < 1:
            raise ValueError(f"distillation_rate {distillation_rate} keeps no channel of {c}")
        for i in range(1, self.num_layers + 1):
            conv = _conv(c + (i - 1) * self.remaining, c, k)
            self.add_module(f"layer{i}", nn.Sequential(conv, nn.ReLU(inplace=True)))
        self._add_fusion(c, self.distilled, reduction)

    def forward(self, x: Tensor) -> Tensor:
        kept: list[Tensor] = []
        feats = [x]
        for i in range(1, self.num_layers + 1):
            out = getattr(self, f"layer{i}")(torch.cat(feats, 1))
            d, r = torch.split(out, (self.distilled, self.remaining), dim=1)
            kept.append(d)
            feats.append(r)
        return self._fuse_attend(kept, x)


class FDIRB(_DistillationBlock):
    """RDCAB FD & IRB version block (``DRRDB``'s ``RDCAB``; docs/architectures.md §6.4).

    Refine: l_0 = x, l_k = relu(layer_k(cat(x, l_1..l_{k-1})) + l_{k-1}) for k < L (C out); layer_L maps the
    full concat to S channels with no ReLU and no residual. Retain: 1x1 ``layer{k}_sub`` C->S for k < L, where
    ``layer1_sub`` reads the block input x, not l_1 (upstream quirk, kept so its weights load).
    cat(sub_1..sub_{L-1}, layer_L) -> 1x1 ``lff`` S*L->C -> contrast-aware CA -> + x.
    """

    def __init__(self, channels: int = 64, num_layers: int = 8, *, sub_channels: int = 32, reduction: int = 16,
                 kernel_size: int = 3) -> None:
        super().__init__()
        c, k = self._layers_and_kernel(channels, num_layers, kernel_size, min_layers=2)
        s = _positive_int("sub_channels", sub_channels)
        n = self.num_layers
        for i in range(1, n):
            self.add_module(f"layer{i}", _conv(c * i, c, k))
        self.add_module(f"layer{n}", _conv(c * n, s, k))
        self.act = nn.ReLU(inplace=True)
        for i in range(1, n):
            self.add_module(f"layer{i}_sub", nn.Conv2d(c, s, 1))
        self._add_fusion(c, s, reduction)

    def forward(self, x: Tensor) -> Tensor:
        n = self.num_layers
        feats = [x]
        subs = [self.layer1_sub(x)]
        prev = x
        for i in range(1, n):
            prev = self.act(getattr(self, f"layer{i}")(torch.cat(feats, 1)) + prev)
            feats.append(prev)
            if i >= 2:
                subs.append(getattr(self, f"layer{i}_sub")(prev))
        subs.append(getattr(self, f"layer{n}")(torch.cat(feats, 1)))
        return self._fuse_attend(subs, x)
