"""Fused upsamplers (same keys as ``srkernels.reference.upsample``) and mean-shift folding.

Each upsampling stage runs its conv without bias (in CPU inference one oneDNN call on prepacked weights,
``nn.conv2d``) and hands the raw output to ``ops.pixel_shuffle``, which adds the bias and rearranges in one
pass (the eager path writes the conv output, then shuffles it at a fraction of copy speed).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch._prims_common import suggest_memory_format

from .. import ops
from ..reference import upsample as R
from ..ops.conv2d_pointwise import Winograd
from ..ops.winograd_conv3x3 import shuffle_order
from . import _amp
from ._cache import PackCache
from .conv import _packable, _packed_weight, conv2d

__all__ = ["Upsampler", "UPNet", "PixelShuffleUpsampler", "MeanShift", "MeanPaddedConv2d", "fold_mean_shift", "icnr_",
           "icnr_upsampler_"]


def _winograd_stage(conv: nn.Conv2d, r: int, x: Tensor) -> Tensor | None:
    """conv + bias + pixel shuffle as one ``winograd_conv3x3(upscale=r)`` call (the shuffle in the conv's store) in
    CPU inference where Winograd serves the conv (its pack cache's weight, output channels put in
    ``shuffle_order``: no pass of its own over the r^2-times larger map); None otherwise."""
    if (torch.is_grad_enabled() or not x.is_cpu or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
            or type(conv) is not nn.Conv2d or conv.out_channels % (r * r)):
        return None
    entry = _packed_weight(conv, x) if _packable(conv, x, None) else None
    if entry is None or not isinstance(entry[0], Winograd) or entry[0].r != 3:
        return None
    b = conv._parameters.get("bias")
    c = conv.__dict__.get("_srk_shuffle")
    c = c.data if c is not None else None  # a PackCache: a module copy starts without one
    if not (c is not None and c[0] is entry[1] and c[1] == r and c[2] is b
            and (b is None or c[3] == (b._version, b.data_ptr()))):
        order = shuffle_order(conv.out_channels, r)
        with torch.inference_mode(False):
            u = entry[1][:, :, order].contiguous()  # the transform of weight[order]: linear per output channel
            bo = None if b is None else b.detach()[order]
        c = (entry[1], r, b, None if b is None else (b._version, b.data_ptr()), u, bo)
        conv.__dict__["_srk_shuffle"] = PackCache(None, c)
    return torch.ops.srkernels.winograd_conv3x3(x, c[4], c[5], "none", None, r)


def _stage(conv: nn.Conv2d, shuffle: nn.PixelShuffle, x: Tensor) -> Tensor:
    y = _winograd_stage(conv, shuffle.upscale_factor, x)
    if y is not None:
        return y
    y = conv2d(conv, x, with_bias=False)
    bias = conv.bias
    if bias is not None and bias.dtype != y.dtype and _amp.dtype(y, bias) == y.dtype:
        bias = _amp.conv_twin(conv, y.dtype).bias  # CPU autocast: conv2d's cached cast of conv (nn/_amp.py)
    return ops.pixel_shuffle(y, shuffle.upscale_factor, bias=bias)


def _run(seq: nn.Sequential, x: Tensor) -> Tensor:
    """Run a Sequential, fusing every (Conv2d, PixelShuffle) pair into conv + ops.pixel_shuffle; any other
    plain conv (UPNet's reconstruction) goes through ``conv2d`` too, with a following ReLU as its post-op."""
    mods = list(seq)
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.PixelShuffle):
            x = _stage(m, nxt, x)
            i += 2
        elif type(m) is nn.Conv2d and isinstance(nxt, nn.ReLU):
            x = conv2d(m, x, "relu")
            i += 2
        elif type(m) is nn.Conv2d:
            x = conv2d(m, x)
            i += 1
        else:
            x = m(x)
            i += 1
    return x


class Upsampler(R.Upsampler):
    """RCAN/EDSR upsampler (keys ``0``, ``2``, ``4``) with each conv's bias + shuffle fused."""

    def forward(self, x: Tensor) -> Tensor:
        return _run(self, x)


class UPNet(R.UPNet):
    """RDN's up-sampling net (keys ``0``, ``2``, ``4``) with each conv's bias + shuffle fused."""

    def forward(self, x: Tensor) -> Tensor:
        return _run(self, x)


class PixelShuffleUpsampler(R.PixelShuffleUpsampler):
    """One conv + one shuffle (RDCAB-RecursiveSRNet ``upscale``, key ``0``), bias + shuffle fused."""

    def forward(self, x: Tensor) -> Tensor:
        return _run(self, x)


class MeanShift(R.MeanShift):
    """Same as the reference (a trainable 1x1 affine), run through ``conv2d`` (prepacked in CPU inference).
    For inference, fold it away with :func:`fold_mean_shift`."""

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(self, x)


class MeanPaddedConv2d(nn.Conv2d):
    """A conv whose input border is padded with a per-channel value instead of zeros.

    Folding ``conv(sub_mean(x))`` into one conv is exact only if the border of ``x`` is padded with the value
    that ``sub_mean`` maps to zero (then the zero padding of the original is reproduced), so that is stored
    in ``pad_value``.
    """

    def __init__(self, conv: nn.Conv2d, pad_value: Tensor) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None)
        self.pad = tuple(conv.padding)
        self.register_buffer("pad_value", pad_value.detach().clone().reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        ph, pw = self.pad
        if ph == 0 and pw == 0:
            return conv2d(self, x)
        N, C, H, W = x.shape
        # the padded copy keeps x's memory format (the conv's input layout decides its output's)
        xp = torch.empty((N, C, H + 2 * ph, W + 2 * pw), dtype=x.dtype, device=x.device,
                         memory_format=suggest_memory_format(x))
        xp.copy_(self.pad_value.to(x.dtype).expand_as(xp))
        xp[:, :, ph:ph + H, pw:pw + W] = x
        return conv2d(self, xp)


def _affine(ms: nn.Conv2d) -> tuple[Tensor, Tensor]:
    return ms.weight.detach().flatten(1).double(), ms.bias.detach().double()


@torch.no_grad()
def fold_mean_shift(model: nn.Module) -> nn.Module:
    """Fold ``sub_mean`` into the head conv and ``add_mean`` into the last tail conv, in place (inference).

    Exact: the tail fold is plain algebra (an affine after a conv); the head fold multiplies the weights by
    sub_mean's matrix, moves its bias through the kernel sum, and pads the input with the value sub_mean
    maps to zero (``MeanPaddedConv2d``), so borders match the zero-padded original. Works for any learned
    (not only diagonal) MeanShift. Afterwards ``sub_mean``/``add_mean`` are identities, so the state_dict keys
    change: fold after loading weights. Expects the RCAN layout (``sub_mean``, ``head[0]``, ``tail[-1]``,
    ``add_mean``) and does nothing for ``meanshift="none"`` models.
    """
    for name in ("sub_mean", "add_mean", "head", "tail"):
        if not hasattr(model, name):
            raise ValueError(f"fold_mean_shift needs a model with sub_mean/head/tail/add_mean, missing {name!r}")
    if getattr(model, "meanshift", None) == "none" or isinstance(model.sub_mean, nn.Identity):
        return model
    head, tail = model.head[0], model.tail[-1]
    dtype = head.weight.dtype
    # head: conv(A x + c) with zero padding == conv'(x padded with m) where A m + c = 0
    A, c = _affine(model.sub_mean)
    m = torch.linalg.solve(A, -c)
    Wh = head.weight.detach().double()
    folded = MeanPaddedConv2d(head, m.to(dtype))
    folded.weight.copy_(torch.einsum("oikl,ij->ojkl", Wh, A).to(dtype))
    if folded.bias is not None:
        bh = head.bias.detach().double() if head.bias is not None else torch.zeros(Wh.shape[0], dtype=torch.float64)
        folded.bias.copy_((bh + torch.einsum("oikl,i->o", Wh, c)).to(dtype))
    elif c.abs().max() > 0:
        raise ValueError("the head conv has no bias to absorb sub_mean's shift")
    folded.to(head.weight.device)
    model.head[0] = folded
    # tail: B (conv(x) + b) + d == conv_{B W}(x) + (B b + d)
    B, d = _affine(model.add_mean)
    Wt = tail.weight.detach().double()
    bt = tail.bias.detach().double() if tail.bias is not None else torch.zeros(Wt.shape[0], dtype=torch.float64)
    tail.weight.copy_(torch.einsum("ij,jokl->iokl", B, Wt).to(dtype))
    if tail.bias is None:
        raise ValueError("the last tail conv has no bias to absorb add_mean's shift")
    tail.bias.copy_((B @ bt + d).to(dtype))
    model.sub_mean = nn.Identity()
    model.add_mean = nn.Identity()
    return model


@torch.no_grad()
def icnr_(conv: nn.Conv2d, r: int, init=nn.init.kaiming_normal_) -> nn.Conv2d:
    """ICNR initialisation (Aitken et al. 2017) of a conv feeding ``PixelShuffle(r)``: every group of r*r
    output channels gets the same kernel, so the shuffled output starts as a nearest-neighbour upsampling
    (no checkerboard). Zeroes the bias. In place; returns ``conv``."""
    out_ch = conv.out_channels
    if out_ch % (r * r):
        raise ValueError(f"conv has {out_ch} output channels, not a multiple of r*r = {r * r}")
    sub = torch.empty(out_ch // (r * r), *conv.weight.shape[1:], dtype=conv.weight.dtype, device=conv.weight.device)
    init(sub)
    conv.weight.copy_(sub.repeat_interleave(r * r, dim=0))
    if conv.bias is not None:
        conv.bias.zero_()
    return conv


def icnr_upsampler_(upsampler: nn.Sequential, init=nn.init.kaiming_normal_) -> nn.Sequential:
    """Apply :func:`icnr_` to every conv that feeds a PixelShuffle in ``upsampler``."""
    mods = list(upsampler)
    for conv, shuffle in zip(mods, mods[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(shuffle, nn.PixelShuffle):
            icnr_(conv, shuffle.upscale_factor, init)
    return upsampler
