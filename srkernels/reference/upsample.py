"""Reference upsampling and mean-shift layers, as published (state_dict keys of the upstream modules).

- ``MeanShift``: RCAN/EDSR/super-image 1x1 RGB affine (keys ``weight``, ``bias``), **trainable** like upstream.
- ``Upsampler``: RCAN/EDSR tail (keys ``0``, ``2``, ``4``): log2(s) x [conv C->4C, shuffle 2] or conv C->9C,
  shuffle 3.
- ``UPNet``: RDN up-sampling net, reconstruction conv included (keys ``0``, ``2`` and ``4`` at x4).
- ``PixelShuffleUpsampler``: one conv C->C*s^2 + one shuffle(s) (RDCAB-RecursiveSRNet ``upscale``, key ``0``).

The fused twins in ``srkernels.nn`` subclass these, so keys, constructors and initialisation are shared.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._util import conv as _conv
from .._validate import positive_int as _positive_int

__all__ = ["MeanShift", "Upsampler", "UPNet", "PixelShuffleUpsampler"]

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
DIV2K_RGB_STD = (1.0, 1.0, 1.0)


def _odd_kernel(kernel_size: object) -> int:
    k = _positive_int("kernel_size", kernel_size)
    if k % 2 != 1:
        raise ValueError(f"kernel_size must be odd (same padding), got {k}")
    return k


def shuffle_stages(scale: object) -> list[int]:
    """The pixel-shuffle factors of a RCAN/EDSR-style upsampler: [2] * log2(s) for s = 2^n, [3] for s = 3."""
    s = _positive_int("scale", scale)
    if s == 3:
        return [3]
    if s >= 2 and s & (s - 1) == 0:
        return [2] * (s.bit_length() - 1)
    raise ValueError(f"scale must be a power of 2 (>= 2) or 3, got {s}")


class MeanShift(nn.Conv2d):
    """``y = x / std + sign * rgb_range * mean / std`` as a 1x1 conv, initialised as upstream.

    Upstream writes ``self.requires_grad = False``, which only sets a plain attribute: the weight and bias stay
    trainable and the official trainers optimise them (docs/architectures.md §4.4). So they are ordinary
    parameters here and a checkpoint's values, not these initial ones, are what a loaded model uses.
    """

    def __init__(
        self,
        rgb_range: float = 255.0,
        rgb_mean: Sequence[float] = DIV2K_RGB_MEAN,
        rgb_std: Sequence[float] = DIV2K_RGB_STD,
        sign: int = -1,
    ) -> None:
        if sign not in (-1, 1):
            raise ValueError(f"sign must be -1 (subtract the mean) or 1 (add it back), got {sign!r}")
        if isinstance(rgb_range, bool) or not isinstance(rgb_range, (int, float)) or not rgb_range > 0:
            raise ValueError(f"rgb_range must be a positive number, got {rgb_range!r}")
        mean_l = [float(v) for v in rgb_mean]
        std_l = [float(v) for v in rgb_std]
        if not mean_l or len(std_l) != len(mean_l):
            raise ValueError(f"rgb_mean and rgb_std must be equally long, got {len(mean_l)} and {len(std_l)}")
        if any(v == 0 for v in std_l):
            raise ValueError(f"rgb_std must be non-zero, got {tuple(std_l)}")
        n = len(mean_l)
        super().__init__(n, n, kernel_size=1)
        self.rgb_range = float(rgb_range)
        self.sign = sign
        mean = torch.tensor(mean_l)
        std = torch.tensor(std_l)
        with torch.no_grad():
            self.weight.copy_(torch.eye(n).div(std.view(n, 1)).view(n, n, 1, 1))
            self.bias.copy_(sign * self.rgb_range * mean / std)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rgb_range={self.rgb_range:g}, sign={self.sign:+d}"


class Upsampler(nn.Sequential):
    """RCAN/EDSR upsampler: [conv C->4C, PixelShuffle(2)] x log2(s), or [conv C->9C, PixelShuffle(3)].

    Convs sit at even indices (keys ``0``, ``2``, ``4``), shuffles at odd ones; no BN, no activation.
    """

    def __init__(self, scale: int, channels: int, *, kernel_size: int = 3, bias: bool = True) -> None:
        stages = shuffle_stages(scale)
        c = _positive_int("channels", channels)
        k = _odd_kernel(kernel_size)
        layers: list[nn.Module] = []
        for r in stages:
            layers += [_conv(c, c * r * r, k, bias), nn.PixelShuffle(r)]
        super().__init__(*layers)
        self.scale = scale


class UPNet(nn.Sequential):
    """RDN up-sampling net, reconstruction included.

    x2/x3: [conv G0->G*r^2, PixelShuffle(r), conv G->out]; x4: [conv G0->4G, PS2, conv G->4G, PS2, conv G->out].
    Keys ``0``, ``2`` (and ``4`` at x4), as in EDSR-PyTorch ``rdn.py``; other scales are rejected as there.
    """

    def __init__(
        self, scale: int, channels: int, growth: int, out_channels: int = 3, *, kernel_size: int = 3
    ) -> None:
        if scale not in (2, 3, 4) or isinstance(scale, bool):
            raise ValueError(f"scale must be 2, 3 or 4 for RDN's UPNet, got {scale!r}")
        g0 = _positive_int("channels", channels)
        g = _positive_int("growth", growth)
        cout = _positive_int("out_channels", out_channels)
        k = _odd_kernel(kernel_size)
        if scale == 4:
            layers = [_conv(g0, g * 4, k), nn.PixelShuffle(2), _conv(g, g * 4, k), nn.PixelShuffle(2)]
        else:
            layers = [_conv(g0, g * scale * scale, k), nn.PixelShuffle(scale)]
        super().__init__(*layers, _conv(g, cout, k))
        self.scale = scale


class PixelShuffleUpsampler(nn.Sequential):
    """One conv C->out*s^2 followed by one PixelShuffle(s) (key ``0``); out defaults to C.

    RDCAB-RecursiveSRNet's ``upscale``: at x4 this is a single shuffle by 4, not two by 2 as in RCAN/RDN.
    """

    def __init__(
        self,
        scale: int,
        channels: int,
        out_channels: int | None = None,
        *,
        kernel_size: int = 3,
        bias: bool = True,
    ) -> None:
        s = _positive_int("scale", scale)
        if s < 2:
            raise ValueError(f"scale must be >= 2, got {s}")
        c = _positive_int("channels", channels)
        cout = c if out_channels is None else _positive_int("out_channels", out_channels)
        k = _odd_kernel(kernel_size)
        super().__init__(_conv(c, cout * s * s, k, bias), nn.PixelShuffle(s))
        self.scale = s
