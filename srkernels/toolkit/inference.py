"""Inference: any zoo model as an RGB [0, 1] -> RGB [0, 1] upscaler, with tiling, self-ensemble and chop.

The models differ in what they eat (docs/architectures.md §1.4): SRCNN takes the Y channel of the
*bicubic-upsampled* LR, SRDenseNet the Y of the LR, RCAN/RDN RGB on [0, 1] or [0, 255]. :class:`Upscaler`
hides this:

* ``y_only`` models (``in_channels == 1``) run on Y (BT.601, or the typo convention if asked); for an RGB
  result Cb/Cr are upsampled with MATLAB bicubic (``srkernels.toolkit.data.imresize``) and merged back.
* pre-upsampling models (SRCNN) get ``imresize(lr, scale)`` as input; with ``padding="valid"`` that input is
  edge-padded so the output still covers the whole image.
* the input is multiplied by ``model.input_range`` (255 for official RCAN weights) and the output divided.

Tiled inference cuts the LR image into tiles whose *cores* partition it; each tile is run with ``overlap`` LR
pixels of context on every side that has a neighbour and only its core is kept. For a network whose output
pixel depends on input pixels at most ``overlap`` away (convolutional nets without global pooling, e.g. SRCNN,
SRDenseNet, RDN) the result equals the untiled forward up to float rounding; nets with global channel
attention (RCAN, RDCAB) see per-tile statistics, so tiles differ slightly, as with official RCAN's chop.
Memory is bounded by one tile's activations plus the output image (which can be uint8).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import dihedral, imresize
from .metrics import Y_COEFFS

__all__ = ["Upscaler", "rgb_to_ycbcr", "ycbcr_to_rgb", "tiled", "tile_spans", "self_ensemble"]

# MATLAB rgb2ycbcr rows for Cb and Cr ([0, 255] RGB in, offset 128); Y rows come from metrics.Y_COEFFS
_CB = ((-37.797, -74.203, 112.0), 255.0)
_CR = ((112.0, -93.786, -18.214), 255.0)


def _matrix(coeffs: str, device, dtype) -> tuple[Tensor, Tensor]:
    if coeffs not in Y_COEFFS:
        raise ValueError(f"y_coeffs must be one of {sorted(Y_COEFFS)}, got {coeffs!r}")
    rows = [Y_COEFFS[coeffs], _CB, _CR]
    m = torch.tensor([[c / div for c in cs] for cs, div in rows], dtype=torch.float64)
    off = torch.tensor([16.0, 128.0, 128.0], dtype=torch.float64) / 255.0
    return m.to(device=device, dtype=dtype), off.to(device=device, dtype=dtype)


def rgb_to_ycbcr(x: Tensor, coeffs: str = "bt601") -> Tensor:
    """[..., 3, H, W] RGB on [0, 1] -> YCbCr on [0, 1] (MATLAB ``rgb2ycbcr`` / 255, not rounded)."""
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"x must be [..., 3, H, W] RGB, got {tuple(x.shape)}")
    m, off = _matrix(coeffs, x.device, x.dtype)
    return torch.einsum("ij,...jhw->...ihw", m, x) + off.view(3, 1, 1)


def ycbcr_to_rgb(x: Tensor, coeffs: str = "bt601") -> Tensor:
    """Inverse of :func:`rgb_to_ycbcr` (not clamped)."""
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"x must be [..., 3, H, W] YCbCr, got {tuple(x.shape)}")
    m, off = _matrix(coeffs, x.device, torch.float64)
    inv = torch.linalg.inv(m).to(x.dtype)
    return torch.einsum("ij,...jhw->...ihw", inv, x - off.to(x.dtype).view(3, 1, 1))


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Along one axis: ``(in_start, in_end, core_start, core_end)`` per tile. Cores partition
    ``[0, length)`` in steps of ``tile - 2 * overlap``; each input window is ``min(tile, length)`` long, holds
    its core and, where the image allows, ``overlap`` pixels either side of it."""
    if tile <= 2 * overlap:
        raise ValueError(f"tile ({tile}) must be larger than 2 * overlap ({2 * overlap})")
    if length <= tile:
        return [(0, length, 0, length)]
    step = tile - 2 * overlap
    spans = []
    a = 0
    while a < length:
        b = min(a + step, length)
        start = min(max(a - overlap, 0), length - tile)
        spans.append((start, start + tile, a, b))
        a = b
    return spans


def tiled(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    scale: int,
    tile: int | None,
    overlap: int,
    *,
    out: Tensor | None = None,
    convert: Callable[[Tensor], Tensor] | None = None,
    on_tile: Callable[[], None] | None = None,
) -> Tensor:
    """``fn(x)`` computed tile by tile (see the module docstring); ``fn`` maps [N, C, h, w] to
    [N, C', s*h, s*w]. ``out`` (optional, preallocated [N, C', s*H, s*W]) receives the result, each tile
    passed through ``convert`` first (e.g. to uint8 on the CPU, so the full float image never exists)."""
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if tile is None:
        y = fn(x)
        if on_tile is not None:
            on_tile()
        y = convert(y) if convert is not None else y
        if out is None:
            return y
        out.copy_(y)
        return out
    if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
        raise ValueError(f"tile must be a positive int or None, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap must be an int >= 0, got {overlap!r}")
    s = scale
    for y0, y1, cy0, cy1 in tile_spans(H, tile, overlap):
        for x0, x1, cx0, cx1 in tile_spans(W, tile, overlap):
            y = fn(x[..., y0:y1, x0:x1])
            if y.shape[-2:] != (s * (y1 - y0), s * (x1 - x0)):
                raise ValueError(f"the model maps a {y1 - y0}x{x1 - x0} tile to {tuple(y.shape[-2:])}, "
                                 f"not {s}x its size")
            core = y[..., s * (cy0 - y0): s * (cy1 - y0), s * (cx0 - x0): s * (cx1 - x0)]
            core = convert(core) if convert is not None else core
            if out is None:
                out = core.new_empty(*x.shape[:-3], core.shape[-3], s * H, s * W)
            out[..., s * cy0: s * cy1, s * cx0: s * cx1] = core
            if on_tile is not None:
                on_tile()
    return out  # type: ignore[return-value]


def n_tiles(h: int, w: int, tile: int | None, overlap: int) -> int:
    if tile is None:
        return 1
    return len(tile_spans(h, tile, overlap)) * len(tile_spans(w, tile, overlap))


def self_ensemble(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Mean of ``fn`` over the 8 flips/transposes of ``x``, each mapped back (RCAN+ / EDSR ``forward_x8``)."""
    acc = None
    for t in range(8):
        y = dihedral(fn(dihedral(x, t).contiguous()), t, inverse=True).float()
        acc = y if acc is None else acc + y
    return acc / 8


class Upscaler:
    """An SR model plus the input/output conventions it was trained with (see the module docstring).

    ``__call__(lr)`` takes RGB [N, 3, h, w] (or [3, h, w]) on [0, 1] and returns RGB [N, 3, s*h, s*w] clamped
    to [0, 1]. ``native(lr)`` returns what the network itself predicts, on [0, 1] and not clamped: Y for
    ``y_only`` models (its input Y computed with ``y_coeffs``), RGB otherwise; evaluation measures that.

    ``tile``/``overlap``: tiled forward (LR pixels); ``ensemble``: x8 self-ensemble; ``chop``: official RCAN
    chop forward (exclusive with tiling); ``dtype``: autocast dtype for the network (bf16/fp16) or None.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tile: int | None = None,
        overlap: int = 16,
        ensemble: bool = False,
        chop: bool = False,
        y_coeffs: str = "bt601",
        dtype: torch.dtype | None = None,
    ) -> None:
        for attr in ("scale", "in_channels", "input_range"):
            if not hasattr(model, attr):
                raise TypeError(f"model must be an srkernels zoo model (missing .{attr}), got {type(model).__name__}")
        if y_coeffs not in Y_COEFFS:
            raise ValueError(f"y_coeffs must be one of {sorted(Y_COEFFS)}, got {y_coeffs!r}")
        if chop and tile is not None:
            raise ValueError("chop and tile are exclusive: chop is the official RCAN tiling")
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be None, float32, bfloat16 or float16, got {dtype}")
        if model.in_channels not in (1, 3):
            raise ValueError(f"model has {model.in_channels} input channels; only Y (1) or RGB (3) models are supported")
        self.model = model
        self.scale = int(model.scale)
        self.y_only = model.in_channels == 1
        self.pre_upsample = getattr(model, "arch", "") == "srcnn"
        self.border = int(getattr(model, "border", 0))
        self.input_range = float(model.input_range)
        self.tile, self.overlap, self.ensemble, self.chop = tile, overlap, ensemble, chop
        self.y_coeffs = y_coeffs
        self.dtype = None if dtype == torch.float32 else dtype

    # -- the network in its own space ------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _net(self, x: Tensor) -> Tensor:
        """The model on native-space input [N, C, h, w] on [0, 1] -> [N, C, s*h, s*w] on [0, 1]."""
        dev = self.device
        x = x.to(dev, torch.float32)
        if self.pre_upsample:
            x = imresize(x, self.scale)
            if self.border:
                x = F.pad(x, (self.border,) * 4, mode="replicate")
        if self.input_range != 1.0:
            x = x * self.input_range
        with self._autocast():
            y = self.model(x)
        y = y.float()
        return y / self.input_range if self.input_range != 1.0 else y

    def _forward(self, x: Tensor) -> Tensor:
        if self.chop:
            from ..models import chop

            if self.pre_upsample:
                raise ValueError("chop is the RCAN test-time tiling of an LR-input network; it does not apply to SRCNN")
            fn = lambda t: chop(self._net, t, self.scale)  # noqa: E731
        else:
            fn = self._net
        return self_ensemble(fn, x) if self.ensemble else fn(x)

    # -- public --------------------------------------------------------------------------------------------

    def _batch(self, lr: Tensor) -> tuple[Tensor, bool]:
        if not isinstance(lr, Tensor):
            raise TypeError(f"lr must be a torch.Tensor, got {type(lr).__name__}")
        if lr.dim() == 3:
            lr = lr[None]
            single = True
        elif lr.dim() == 4:
            single = False
        else:
            raise ValueError(f"lr must be [C, H, W] or [N, C, H, W], got {tuple(lr.shape)}")
        if not lr.dtype.is_floating_point:
            raise TypeError(f"lr must be a float tensor on [0, 1], got {lr.dtype}")
        return lr, single

    def native_input(self, lr_rgb: Tensor) -> Tensor:
        """What :meth:`native` feeds the network for an RGB LR image: its Y for y_only models."""
        return rgb_to_ycbcr(lr_rgb, self.y_coeffs)[..., :1, :, :] if self.y_only else lr_rgb

    @torch.no_grad()
    def native(self, lr: Tensor) -> Tensor:
        """Network output for RGB (or, for y_only models, already-Y) input; see the class docstring."""
        x, single = self._batch(lr)
        if self.y_only and x.shape[1] == 3:
            x = self.native_input(x)
        want = 1 if self.y_only else 3
        if x.shape[1] != want:
            raise ValueError(f"lr must have 3 (RGB){' or 1 (Y)' if self.y_only else ''} channels, got {x.shape[1]}")
        y = tiled(self._forward, x, self.scale, self.tile, self.overlap)
        return y[0] if single else y

    def _rgb(self, lr: Tensor) -> Tensor:
        if not self.y_only:
            return self._forward(lr).clamp_(0, 1)
        # Y through the network, Cb/Cr bicubic; always BT.601 here: that is the Y the net was trained on
        ycc = rgb_to_ycbcr(lr.float(), "bt601")
        sr_y = self._forward(ycc[:, :1])
        cbcr = imresize(ycc[:, 1:], self.scale).to(sr_y.device)
        return ycbcr_to_rgb(torch.cat([sr_y, cbcr], 1), "bt601").clamp_(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        lr: Tensor,
        *,
        out_dtype: torch.dtype = torch.float32,
        on_tile: Callable[[], None] | None = None,
    ) -> Tensor:
        """RGB SR image(s) on [0, 1]; ``out_dtype=torch.uint8`` returns 8-bit levels (rounded per tile, so a
        large image never exists in float). The result is on the CPU."""
        x, single = self._batch(lr)
        if x.shape[1] != 3:
            raise ValueError(f"lr must be RGB [N, 3, H, W], got {x.shape[1]} channels")
        if out_dtype == torch.uint8:
            from .data import to_uint8

            convert = lambda t: to_uint8(t.cpu())  # noqa: E731
        elif out_dtype.is_floating_point:
            convert = lambda t: t.cpu().to(out_dtype)  # noqa: E731
        else:
            raise TypeError(f"out_dtype must be torch.uint8 or a float dtype, got {out_dtype}")
        N, _, H, W = x.shape
        out = torch.empty(N, 3, self.scale * H, self.scale * W, dtype=out_dtype)
        tiled(self._rgb, x, self.scale, self.tile, self.overlap, out=out, convert=convert, on_tile=on_tile)
        return out[0] if single else out

    def n_tiles(self, h: int, w: int) -> int:
        return n_tiles(h, w, self.tile, self.overlap)
