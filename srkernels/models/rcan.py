"""RCAN (Zhang et al. 2018) and RCAN-BAM, keys of the official yulunzhang/RCAN model (docs/architectures.md §4, §5).

sub_mean -> head.0 -> body (10 residual groups of 20 RCABs + conv, each group with its own skip; then conv at
``body.10`` and the long skip) -> tail (Upsampler, conv) -> add_mean. ``bam=True`` swaps every RCAB's channel
attention for BAM (super-image ``rcan-bam`` / the BAM repo).

``meanshift`` says how sub_mean/add_mean are used and which input range the weights expect:

=================  ================================  =============  ==========================================
mode               MeanShift                          input range    checkpoints
=================  ================================  =============  ==========================================
``official_255``   applied, built with rgb_range 255  [0, 255]       official RCAN_BIX*.pt
``rgb255_on_unit`` applied, built with rgb_range 255  [0, 1]         super-image rcan / rcan-bam (its quirk)
``unit``           applied, built with rgb_range 1    [0, 1]         Lornatang, BasicSR (converted)
``none``           kept in the state_dict, skipped    [0, 1]         BAM repo (defines MeanShift, never calls it)
=================  ================================  =============  ==========================================

MeanShift is trainable upstream (its ``requires_grad = False`` is a no-op), so loaders take its values from the
checkpoint; the mode only fixes the initial values, whether it runs, and ``input_range``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..reference.upsample import DIV2K_RGB_MEAN, DIV2K_RGB_STD
from ._common import SRModel, conv, layer, positive_int

# mode -> (rgb_range MeanShift is built with, input range the weights expect)
MEANSHIFT_MODES: dict[str, tuple[float, float]] = {
    "official_255": (255.0, 255.0),
    "rgb255_on_unit": (255.0, 1.0),
    "unit": (1.0, 1.0),
    "none": (255.0, 1.0),
}


class ResidualGroup(nn.Module):
    """``body(x) + x`` with body = n_resblocks RCABs then one conv (keys ``body.{b}``, ``body.{n}``)."""

    def __init__(self, rcab: type[nn.Module], channels: int, reduction: int, n_resblocks: int,
                 attention: str, kernel_size: int) -> None:
        super().__init__()
        blocks = [rcab(channels, reduction, attention=attention, kernel_size=kernel_size) for _ in range(n_resblocks)]
        self.body = nn.Sequential(*blocks, conv(channels, channels, kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + x


class RCAN(SRModel):
    arch = "rcan"
    scales = (2, 3, 4, 8)

    def __init__(
        self,
        scale: int = 4,
        *,
        fused: bool = True,
        n_resgroups: int = 10,
        n_resblocks: int = 20,
        n_feats: int = 64,
        reduction: int = 16,
        bam: bool = False,
        meanshift: str = "official_255",
        rgb_mean: Sequence[float] = DIV2K_RGB_MEAN,
        rgb_std: Sequence[float] = DIV2K_RGB_STD,
        n_colors: int = 3,
        kernel_size: int = 3,
    ) -> None:
        config = self.options(locals())
        if meanshift not in MEANSHIFT_MODES:
            raise ValueError(f"meanshift must be one of {tuple(MEANSHIFT_MODES)}, got {meanshift!r}")
        if len(rgb_mean) != n_colors or len(rgb_std) != n_colors:
            raise ValueError(f"rgb_mean and rgb_std must have n_colors={n_colors} entries")
        rgb_range, input_range = MEANSHIFT_MODES[meanshift]
        super().__init__(scale, fused, config, in_channels=n_colors, input_range=input_range)
        ng, nb, nf, nc = n_resgroups, n_resblocks, n_feats, n_colors
        self.bam = bam
        self.meanshift = meanshift
        MeanShift = layer(fused, "MeanShift")
        rcab = layer(fused, "RCAB")
        # registered first, as upstream, so state_dict order matches the official files
        self.sub_mean = MeanShift(rgb_range, rgb_mean, rgb_std, -1)
        self.add_mean = MeanShift(rgb_range, rgb_mean, rgb_std, 1)
        self.head = nn.Sequential(conv(nc, nf, kernel_size))
        attention = "bam" if bam else "ca"
        groups = [ResidualGroup(rcab, nf, reduction, nb, attention, kernel_size) for _ in range(ng)]
        self.body = nn.Sequential(*groups, conv(nf, nf, kernel_size))
        self.tail = nn.Sequential(
            layer(fused, "Upsampler")(self.scale, nf, kernel_size=kernel_size), conv(nf, nc, kernel_size)
        )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if self.fused:
            return self.run_fused(x)
        if self.meanshift != "none":
            x = self.sub_mean(x)
        x = self.head(x)
        x = self.tail(self.body(x) + x)
        if self.meanshift != "none":
            x = self.add_mean(x)
        return x

    def _forward_fused(self, x: Tensor) -> Tensor:
        """The same network with every conv through ``srkernels.nn.conv2d`` (one prepacked oneDNN call in CPU
        inference) and the group-end and body-end skips as that call's residual post-op."""
        from ..nn.attention import rcab_group, residual_group_inference
        from ..nn.conv import apply_conv

        if self.meanshift != "none":
            x = self.sub_mean(x)
        x = apply_conv(self.head[0], x)
        h = x
        for group in self.body[:-1]:
            # inference: the whole group as one residual_group call; training: as one autograd node (2 saved maps
            # per RCAB instead of 3)
            out = residual_group_inference(group.body, h)
            if out is None:
                out = rcab_group(group.body[:-1], group.body[-1], h)
            if out is not None:
                h = out
                continue
            skip = h
            for block in group.body[:-1]:
                h = block(h)
            h = apply_conv(group.body[-1], h, residual=skip)
        h = apply_conv(self.body[-1], h, residual=x)
        h = apply_conv(self.tail[1], self.tail[0](h))
        if self.meanshift != "none":
            h = self.add_mean(h)
        return h

    def forward_chop(self, x: Tensor, shave: int = 10, min_size: int = 160000) -> Tensor:
        """Official test-time ``--chop`` forward (docs/architectures.md §4.5): overlapping quadrants, stitched;
        see ``chop``."""
        return chop(self, x, self.scale, shave=shave, min_size=min_size)


def chop(fn: Callable[[Tensor], Tensor], x: Tensor, scale: int, *, shave: int = 10,
         min_size: int = 160000) -> Tensor:
    """Run ``fn`` on the four (h/2 + shave) x (w/2 + shave) corner tiles of ``x`` and stitch their inner parts.

    Tiles larger than ``min_size`` LR pixels are split again recursively. It always splits at least once, like
    the official code; since RCAN's receptive field is wider than ``shave``, the result differs slightly from a
    whole-image forward, and reproducing the official PNGs needs this exact tiling.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if isinstance(shave, bool) or not isinstance(shave, int) or shave < 0:
        raise ValueError(f"shave must be a non-negative int, got {shave!r}")
    positive_int("min_size", min_size)
    h, w = x.shape[-2:]
    hh, wh = h // 2, w // 2
    th, tw = hh + shave, wh + shave
    if th > h or tw > w or hh == 0 or wh == 0:
        raise ValueError(f"input {h}x{w} is too small to chop with shave={shave}")
    tiles = [x[..., t:t + th, c:c + tw] for t in (0, h - th) for c in (0, w - tw)]
    if th * tw < min_size:
        outs = [fn(t) for t in tiles]
    else:
        outs = [chop(fn, t, scale, shave=shave, min_size=min_size) for t in tiles]
    H, W, Hh, Wh, Th, Tw = (scale * v for v in (h, w, hh, wh, th, tw))
    out = outs[0].new_empty(*x.shape[:-3], outs[0].shape[-3], H, W)
    # each quadrant comes from the tile whose corner it shares; the overlap (shave) is discarded
    out[..., :Hh, :Wh] = outs[0][..., :Hh, :Wh]
    out[..., :Hh, Wh:] = outs[1][..., :Hh, Tw - (W - Wh):]
    out[..., Hh:, :Wh] = outs[2][..., Th - (H - Hh):, :Wh]
    out[..., Hh:, Wh:] = outs[3][..., Th - (H - Hh):, Tw - (W - Wh):]
    return out
