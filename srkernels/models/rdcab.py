"""RDCAB-RecursiveSRNet (HEEJOWOO, IPIU 2021) and its Split and FD & IRB versions (docs/architectures.md §6.2-6.4).

sfe1 -> sfe2 -> B recursive blocks (``recursive_SR.{i}``), each applying ONE shared block U times and returning
its last output and the concat of all U outputs -> gff (1x1 G0*U*B->G0, 3x3) on the concat of every block's U
outputs, + sfe1 -> reconstruction:

=========  ==================================  ====================================================  ========
variant    block (key under recursive_SR.i)    reconstruction                                        scales
=========  ==================================  ====================================================  ========
ipiu       ``rdcabs``: RDCAB, + block input    ``upscale`` (one conv + one shuffle by s), ``output``  2, 3, 4
split      ``rdbs``: SplitBlock                ``upscale1`` (3x3 -> 48), scalar, shuffle, + bicubic   4
fd_irb     ``rdbs``: FDIRB                     ``upscale`` (RCAN-style), 1x1 to 32, IRB, + bicubic     2, 3, 4
=========  ==================================  ====================================================  ========

Upstream passes the concat through a module-level global (not thread-safe, not traceable; the FD-IR version even
reads a misspelt name and cannot run); here it is returned. Upstream's ``Net.forward`` also runs the whole
B-block chain B times, each pass keeping only its last block's concat (B*B*U block applications); with the
default B=1 that is the same network. ``b_squared=True`` reproduces it for B>1 (ipiu, split); the default
chains the B blocks once and fuses all their outputs, which has the same parameters.
The published FD-IRB parameter count (1.63M) matches U=3; the training scripts default to U=9.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import SRModel, conv, layer

VARIANTS = ("ipiu", "split", "fd_irb")
_SCALES = {"ipiu": (2, 3, 4), "split": (4,), "fd_irb": (2, 3, 4)}


class Scale(nn.Module):
    """A learnable scalar multiplier (key ``scale``), as upstream's ``Scale``."""

    def __init__(self, init_value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(init_value)]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class RecursiveBlock(nn.Module):
    """One shared block applied U times; returns (last output, cat of the U outputs)."""

    def __init__(self, block: nn.Module, num_recursions: int, attr: str, pass_input: bool) -> None:
        super().__init__()
        self.num_recursions = num_recursions
        self.attr = attr
        self.pass_input = pass_input  # RDCAB also adds the recursion's input at every step (DRRN-style)
        self.add_module(attr, block)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        block = getattr(self, self.attr)
        x0 = x
        outs = []
        for _ in range(self.num_recursions):
            x = block(x, x0) if self.pass_input else block(x)
            outs.append(x)
        return x, torch.cat(outs, 1)


class RDCABRecursiveSRNet(SRModel):
    arch = "rdcab"
    scales = (2, 3, 4)

    def __init__(
        self,
        scale: int = 4,
        *,
        fused: bool = True,
        variant: str = "ipiu",
        num_channels: int = 3,
        num_features: int = 64,
        growth: int = 64,
        num_layers: int = 8,
        num_blocks: int = 1,
        num_recursions: int = 9,
        b_squared: bool = False,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if isinstance(scale, int) and not isinstance(scale, bool) and scale not in _SCALES[variant]:
            raise ValueError(
                f"scale {scale} is not supported by the {variant} variant; supported: {_SCALES[variant]}"
            )
        config = self.options(locals())
        nc, g0, g, nl, nb, u = num_channels, num_features, growth, num_layers, num_blocks, num_recursions
        if variant != "ipiu" and g != g0:
            raise ValueError(f"growth must equal num_features ({g0}) for the {variant} variant, got {g}")
        if variant == "split" and nc != 3:
            raise ValueError(f"num_channels must be 3 for the split variant (48 = 3 * 4^2), got {nc}")
        if variant == "fd_irb" and b_squared and nb > 1:
            raise ValueError("b_squared=True with num_blocks > 1 has no upstream meaning for fd_irb")
        super().__init__(scale, fused, config, in_channels=nc, input_range=1.0)
        self.variant = variant
        self.b_squared = b_squared
        self.sfe1 = conv(nc, g0)
        self.sfe2 = conv(g0, g0)
        if variant == "ipiu":
            RDCAB = layer(fused, "RDCAB")
            blocks = [RecursiveBlock(RDCAB(g0, g, nl), u, "rdcabs", True) for _ in range(nb)]
        else:
            Block = layer(fused, "SplitBlock" if variant == "split" else "FDIRB")
            blocks = [RecursiveBlock(Block(g0, nl), u, "rdbs", False) for _ in range(nb)]
        self.recursive_SR = nn.ModuleList(blocks)
        self.gff = nn.Sequential(nn.Conv2d(g0 * u * nb, g0, 1), conv(g0, g0))
        if variant == "ipiu":
            self.upscale = layer(fused, "PixelShuffleUpsampler")(self.scale, g0)
            self.output = conv(g0, nc)
        elif variant == "split":
            # upstream: kernel size taken from num_channels (3) with padding 1, 48 outputs = 3 * 4^2
            self.upscale1 = nn.Conv2d(g0, nc * self.scale**2, nc, padding=1)
            self.upscale1_scale = Scale(1.0)
            self.pixelshuffle = nn.PixelShuffle(self.scale)
        else:
            self.upscale = layer(fused, "Upsampler")(self.scale, g0)
            self.middle_pointwise = nn.Conv2d(g0, 32, 1)
            for i in range(1, 5):
                self.add_module(f"convIRB_{i}", nn.Sequential(conv(32, 32, bias=False), nn.ReLU(inplace=True)))
            self.convIRB = nn.Sequential(conv(32, nc, bias=False))

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(sfe1 output, concat of the recursive blocks' outputs that gff fuses)."""
        if self.fused:
            from ..nn.conv import apply_conv

            sfe1 = apply_conv(self.sfe1, x)
            h = apply_conv(self.sfe2, sfe1)
        else:
            sfe1 = self.sfe1(x)
            h = self.sfe2(sfe1)
        kept = []
        if self.b_squared:
            for _ in range(len(self.recursive_SR)):
                for blk in self.recursive_SR:
                    h, cat = blk(h)
                kept.append(cat)  # only the last block's concat of each pass, as upstream
        else:
            for blk in self.recursive_SR:
                h, cat = blk(h)
                kept.append(cat)
        return sfe1, torch.cat(kept, 1)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if self.fused:
            return self.run_fused(x)
        sfe1, cat = self.features(x)
        h = self.gff(cat) + sfe1
        if self.variant == "ipiu":
            return self.output(self.upscale(h))
        # PyTorch bicubic (a = -0.75, no antialias), as upstream's F.interpolate
        up = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        if self.variant == "split":
            return self.pixelshuffle(self.upscale1_scale(self.upscale1(h))) + up
        h = self.middle_pointwise(self.upscale(h))
        for i in range(1, 5):
            h = getattr(self, f"convIRB_{i}")(h)
        return self.convIRB(h) + up


    def _forward_fused(self, x: Tensor) -> Tensor:
        """``forward`` with every conv through ``srkernels.nn.conv2d`` (prepacked oneDNN in CPU inference): gff's
        ``+ sfe1``, the IRB convs' ReLU and the last conv's ``+ bicubic`` as post-ops of one call each."""
        from ..nn.conv import apply_conv

        sfe1, cat = self.features(x)
        h = apply_conv(self.gff[1], apply_conv(self.gff[0], cat), residual=sfe1)
        if self.variant == "ipiu":
            return apply_conv(self.output, self.upscale(h))
        up = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        if self.variant == "split":
            return self.pixelshuffle(self.upscale1_scale(apply_conv(self.upscale1, h))) + up
        h = apply_conv(self.middle_pointwise, self.upscale(h))
        for i in range(1, 5):
            h = apply_conv(getattr(self, f"convIRB_{i}")[0], h, "relu")
        return apply_conv(self.convIRB[0], h, residual=up)
