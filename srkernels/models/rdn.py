"""RDN (Zhang et al. 2018), keys of EDSR-PyTorch ``rdn.py`` (docs/architectures.md §6.1).

SFENet1 -> SFENet2 -> D residual dense blocks (outputs all kept) -> GFF (1x1 D*G0->G0, 3x3) + SFENet1 output ->
UPNet (shuffle stages and the reconstruction conv). Config A: D=20, C=6, G=32; B: D=16, C=8, G=64; G0=64.
No MeanShift. EDSR-PyTorch feeds [0, 255] (``rgb_range=255``); yjn870's port feeds [0, 1] (``rgb_range=1``);
the range only sets ``input_range``, the network is the same.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import SRModel, conv, layer

CONFIGS: dict[str, tuple[int, int, int]] = {"A": (20, 6, 32), "B": (16, 8, 64)}  # (D, C, G)


class RDN(SRModel):
    arch = "rdn"
    scales = (2, 3, 4)

    def __init__(
        self,
        scale: int = 4,
        *,
        fused: bool = True,
        config: str = "B",
        num_features: int = 64,
        num_blocks: int | None = None,
        num_layers: int | None = None,
        growth: int | None = None,
        n_colors: int = 3,
        kernel_size: int = 3,
        rgb_range: float = 255.0,
    ) -> None:
        cfg = self.options(locals())
        if config not in CONFIGS:
            raise ValueError(f"config must be one of {tuple(CONFIGS)}, got {config!r}")
        if rgb_range not in (1, 255):
            raise ValueError(f"rgb_range must be 1 or 255, got {rgb_range!r}")
        # the options left None take the named configuration's value
        defaults = dict(zip(("num_blocks", "num_layers", "growth"), CONFIGS[config]))
        cfg.update({k: v for k, v in defaults.items() if cfg[k] is None}, rgb_range=float(rgb_range))
        super().__init__(scale, fused, cfg, in_channels=n_colors, input_range=rgb_range)
        d, c, g, g0, nc = cfg["num_blocks"], cfg["num_layers"], cfg["growth"], num_features, n_colors
        RDB = layer(fused, "ResidualDenseBlock")
        self.SFENet1 = conv(nc, g0, kernel_size)
        self.SFENet2 = conv(g0, g0, kernel_size)
        self.RDBs = nn.ModuleList([RDB(g0, g, c, kernel_size=kernel_size) for _ in range(d)])
        self.GFF = nn.Sequential(nn.Conv2d(d * g0, g0, 1), conv(g0, g0, kernel_size))
        self.UPNet = layer(fused, "UPNet")(self.scale, g0, g, nc, kernel_size=kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if self.fused:
            return self.run_fused(x)
        f1 = self.SFENet1(x)
        h = self.SFENet2(f1)
        outs = []
        for rdb in self.RDBs:
            h = rdb(h)
            outs.append(h)
        return self.UPNet(self.GFF(torch.cat(outs, 1)) + f1)

    def _forward_fused(self, x: Tensor) -> Tensor:
        """Every conv through ``srkernels.nn.conv2d``; GFF's 3x3 takes the ``+ f1`` as its residual post-op."""
        from ..nn.conv import apply_conv

        f1 = apply_conv(self.SFENet1, x)
        h = apply_conv(self.SFENet2, f1)
        outs = []
        for rdb in self.RDBs:
            h = rdb(h)
            outs.append(h)
        g = apply_conv(self.GFF[1], apply_conv(self.GFF[0], torch.cat(outs, 1)), residual=f1)
        return self.UPNet(g)
