"""SRCNN (Dong et al. 2014/2016), keys of Lornatang/SRCNN-PyTorch: ``features.0``, ``map.0``, ``reconstruction``.

Input: the Y channel (or RGB with ``in_channels=3``) of the bicubic-*upsampled* LR image in [0, 1]; the net
does not change the size, so ``scale`` only names which checkpoint the weights belong to.
``padding="same"`` is Lornatang's (its weights need it); ``"valid"`` is the paper's: the output is
``2 * border`` pixels smaller than the input, and the caller crops the ground truth by ``border`` per side.
Variants: kernel_sizes (9,1,5) 8,129 params, (9,3,5) 24,513, (9,5,5) 57,281; channels (128,64) 216,961;
in_channels=3 69,251.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._common import SRModel, positive_int

PADDINGS = ("same", "valid")


class SRCNN(SRModel):
    arch = "srcnn"
    scales = None  # the net is scale-agnostic; any int >= 2

    def __init__(
        self,
        scale: int = 2,
        *,
        fused: bool = True,
        kernel_sizes: Sequence[int] = (9, 5, 5),
        channels: Sequence[int] = (64, 32),
        in_channels: int = 1,
        padding: str = "same",
    ) -> None:
        ks = tuple(kernel_sizes)
        ch = tuple(channels)
        if len(ks) != 3:
            raise ValueError(f"kernel_sizes must have 3 entries, got {ks!r}")
        if len(ch) != 2:
            raise ValueError(f"channels must have 2 entries, got {ch!r}")
        for k in ks:
            positive_int("kernel_sizes", k)
        c1, c2 = (positive_int("channels", c) for c in ch)
        cin = positive_int("in_channels", in_channels)
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if padding == "same" and any(k % 2 == 0 for k in ks):
            raise ValueError(f"kernel_sizes must be odd for padding='same', got {ks!r}")
        config = dict(kernel_sizes=ks, channels=ch, in_channels=cin, padding=padding)
        super().__init__(scale, fused, config, in_channels=cin, input_range=1.0)
        self.padding = padding
        pads = [k // 2 if padding == "same" else 0 for k in ks]
        self.features = nn.Sequential(nn.Conv2d(cin, c1, ks[0], padding=pads[0]), nn.ReLU(inplace=True))
        self.map = nn.Sequential(nn.Conv2d(c1, c2, ks[1], padding=pads[1]), nn.ReLU(inplace=True))
        self.reconstruction = nn.Conv2d(c2, cin, ks[2], padding=pads[2])
        self.border = 0 if padding == "same" else sum(k - 1 for k in ks) // 2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Lornatang's init: He-like normal on the hidden convs, N(0, 1e-3) on the reconstruction, zero biases.
        for m in (self.features[0], self.map[0]):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.out_channels * m.weight[0, 0].numel())))
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.reconstruction.weight, 0.0, 0.001)
        nn.init.zeros_(self.reconstruction.bias)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if min(x.shape[-2:]) <= 2 * self.border:
            raise ValueError(f"x must be larger than {2 * self.border} px per side for padding='valid', "
                             f"got {tuple(x.shape[-2:])}")
        # conv + bias + ReLU as one call each: prepacked oneDNN, the 5x5 64->32 layer Winograd F(4x4,5x5)
        # (srkernels/ops/conv2d_pointwise.py, winograd5_use). CPU training: the same calls through autograd, where
        # only the 5x5 layer differs from the reference (Winograd forward and input gradient, nn/conv.py
        # _train_conv2d); the input goes channels_last (1-3 channels: cheap), so oneDNN's 9x9 conv hands the
        # Winograd kernel its own layout (else _train_conv2d copies and saves a 64-channel map).
        if self.fused and (not torch.is_grad_enabled() or x.is_cpu):
            from ..nn.conv import apply_conv

            xin = x
            if torch.is_grad_enabled() and x.stride(1) != 1:  # (.contiguous keeps a 1-channel NCHW tensor as is)
                xin = torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
            h = apply_conv(self.map[0], apply_conv(self.features[0], xin, "relu"), "relu")
            return self.output_like(apply_conv(self.reconstruction, h), x)
        return self.reconstruction(self.map(self.features(x)))
