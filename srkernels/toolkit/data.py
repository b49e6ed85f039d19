"""Data pipeline for SR: MATLAB-exact ``imresize``, image I/O and the paired HR/LR folder dataset.

``imresize`` reproduces MATLAB's ``imresize(A, scale, 'bicubic')`` (cubic a = -0.5, kernel widened by 1/scale
when downscaling with antialiasing, MATLAB's index mapping ``u = x/scale + 0.5*(1 - 1/scale)``, output size
``ceil(in*scale)``, the dimension with the smaller scale resized first). Out-of-range taps read the end
pixels (``padding="replicate"``): MATLAB's ``contributions`` clamps its indices ("has the effect of
replicating end-points"). The mirrored padding of the popular Python ports (BasicSR, Lornatang) is
``padding="symmetric"``; it differs from MATLAB in the outer ~2/scale pixels.

It is pure torch (per-axis weight/index tables applied as gathers, one vectorised pass per kernel tap), so
it runs on CPU and CUDA, on any float dtype, and is differentiable. Float input is never rounded. A ``uint8``
tensor is treated the way MATLAB treats a ``uint8`` image: computed in float64, rounded half away from zero
and saturated to [0, 255] after *each* of the two passes, ``uint8`` out (this is how RCAN's
``Prepare_TestData_HR_LR.m`` made its test LR, and what DIV2K's "MATLAB imresize bicubic" LR means).

Checked against MATLAB output: ``imresize(uint8 HR, 1/s)`` reproduces all 15 MATLAB-made x2/x3/x4 Set5 LR PNGs
of RCAN's ``RCAN_TestCode`` bit for bit. With ``padding="symmetric"`` 200-550 border values per image differ
(by up to 7 levels); rounding once at the end instead of per pass changes 10-15% of the values (1-2 levels).

``PairedImageFolder`` yields ``(lr, hr)`` float32 CHW tensors in [0, 1]:

* HR is modcropped (bottom/right) to a multiple of the scale.
* LR comes from ``lr_dir`` when given (pairing rule in :func:`find_lr_file`), otherwise it is made on the fly
  like MATLAB's uint8 pipeline: ``imresize(uint8 HR, 1/s)`` -> uint8 (see above). It is computed once per
  image and cached (memory, or ``.npy`` files in ``cache_dir``).
* ``patch_size`` = LR patch ``p``; the HR patch is the aligned ``p*s`` region (LR top-left ``(y, x)`` <-> HR
  top-left ``(s*y, s*x)``). ``augment`` applies one of the 8 dihedral transforms (:func:`dihedral`) to both.
* Randomness is a pure function of ``(seed, epoch, index)``: the same item is identical across runs, worker
  counts and processes. Call :meth:`PairedImageFolder.set_epoch` once per epoch, before the DataLoader
  iterator is created (persistent workers keep the copy of the dataset they were started with).

Folder conventions of the standard sets are in :data:`folder_layouts`; :func:`find_dataset_dirs` probes them.
"""
from __future__ import annotations

import functools
import hashlib
import math
import numbers
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_write
from .._validate import int_at_least

__all__ = [
    "imresize",
    "quantize_uint8",
    "to_uint8",
    "modcrop",
    "dihedral",
    "load_image",
    "save_image",
    "find_lr_file",
    "PairedImageFolder",
    "folder_layouts",
    "find_dataset_dirs",
    "IMAGE_EXTENSIONS",
]

# ---------------------------------------------------------------------------------------------------------
# MATLAB imresize
# ---------------------------------------------------------------------------------------------------------

_EPS = float(np.finfo(np.float64).eps)  # MATLAB's eps, used by its lanczos kernels


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * (
        (ax > 1) & (ax <= 2)
    )


def _box(x: np.ndarray) -> np.ndarray:
    return ((x >= -0.5) & (x < 0.5)).astype(np.float64)


def _triangle(x: np.ndarray) -> np.ndarray:
    return (x + 1) * ((x >= -1) & (x < 0)) + (1 - x) * ((x >= 0) & (x <= 1))


def _lanczos(a: int) -> Callable[[np.ndarray], np.ndarray]:
    def k(x: np.ndarray) -> np.ndarray:
        f = (np.sin(np.pi * x) * np.sin(np.pi * x / a) + _EPS) / (np.pi**2 * x * x / a + _EPS)
        return f * (np.abs(x) < a)

    return k


# name -> (kernel, support width), as in MATLAB's imresize
_KERNELS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "cubic": (_cubic, 4.0),
    "linear": (_triangle, 2.0),
    "box": (_box, 1.0),
    "lanczos2": (_lanczos(2), 4.0),
    "lanczos3": (_lanczos(3), 6.0),
}
_KERNEL_ALIASES = {"bicubic": "cubic", "bilinear": "linear", "triangle": "linear"}


@functools.lru_cache(maxsize=256)
def _contributions(
    in_len: int, out_len: int, scale: float, kernel: str, antialias: bool, padding: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-pixel weights [out, P] and 0-based source indices [out, P] along one axis (MATLAB's
    ``contributions``): the same float64 arithmetic in the same order, so the weights match bit for bit."""
    k, width = _KERNELS[kernel]
    if scale < 1 and antialias:
        # a low-pass filter as wide as the output pixel spacing (in input units): kernel stretched by 1/scale
        h = lambda t: scale * k(scale * t)  # noqa: E731
        width = width / scale
    else:
        h = k
    x = np.arange(1, out_len + 1, dtype=np.float64)  # 1-based output coordinates, as MATLAB
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centre in input coordinates
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    w = h(u[:, None] - idx)
    w = w / np.sum(w, axis=1, keepdims=True)
    if padding == "replicate":  # MATLAB: clamp out-of-range indices to the end pixels
        idx0 = np.clip(idx - 1, 0, in_len - 1).astype(np.int64)
    else:  # half-sample symmetric: ... 2 1 | 1 2 ... n | n n-1 ... (BasicSR / Lornatang ports)
        m = np.mod(idx - 1, 2 * in_len).astype(np.int64)
        idx0 = np.where(m < in_len, m, 2 * in_len - 1 - m)
    keep = np.any(w != 0, axis=0)  # drop taps that are zero for every output pixel (MATLAB does too)
    return np.ascontiguousarray(w[:, keep]), np.ascontiguousarray(idx0[:, keep])


def _resize_along(x: Tensor, dim: int, weights: np.ndarray, indices: np.ndarray) -> Tensor:
    if dim == -1:
        # gathering whole rows (dim -2 of a contiguous tensor) is several times faster than gathering
        # single elements along the innermost dim, so resize W as the rows of the transposed image
        return _resize_along(x.transpose(-1, -2).contiguous(), -2, weights, indices).transpose(-1, -2)
    x = x.contiguous()
    out_len, taps = weights.shape
    w = torch.from_numpy(weights).to(device=x.device, dtype=x.dtype).unsqueeze(-1)  # [out, P, 1]
    idx = torch.from_numpy(indices).to(device=x.device)
    inplace = not (x.requires_grad and torch.is_grad_enabled())
    # one vectorised row gather + multiply-add per tap (P <= ceil(4/scale)+2), summed in tap order like MATLAB
    acc = x.index_select(-2, idx[:, 0]) * w[:, 0]
    for p in range(1, taps):
        rows = x.index_select(-2, idx[:, p])
        acc = acc.addcmul_(rows, w[:, p]) if inplace else torch.addcmul(acc, rows, w[:, p])
    return acc


def _round_half_away(v: Tensor) -> Tensor:
    return torch.where(v >= 0, torch.floor(v + 0.5), torch.ceil(v - 0.5))


def _positive_pair(value, name: str) -> tuple[float, float]:
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(vals) != 2:
        raise ValueError(f"{name} must be a number or a pair (h, w), got {value!r}")
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be positive and finite, got {value!r}")
        out.append(float(v))
    return out[0], out[1]


def imresize(
    x: Tensor,
    scale: float | Sequence[float] | None = None,
    *,
    size: Sequence[int] | None = None,
    kernel: str = "cubic",
    antialias: bool = True,
    padding: str = "replicate",
) -> Tensor:
    """MATLAB ``imresize`` over the last two dims of ``x`` ([H, W], [C, H, W], [N, C, H, W], ...).

    Give exactly one of ``scale`` (a number or ``(sh, sw)``; output ``ceil(in * scale)``) or ``size``
    (``(H_out, W_out)``; the scale is then ``out / in`` per axis). ``kernel``: ``cubic`` (``bicubic``),
    ``linear`` (``bilinear``), ``box``, ``lanczos2``, ``lanczos3``. ``antialias`` widens the kernel by
    ``1/scale`` when downscaling (MATLAB's default). ``padding`` says what out-of-range taps read:
    ``replicate`` (MATLAB: indices clamped to the end pixels) or ``symmetric`` (mirrored, edge pixel
    repeated: the BasicSR / Lornatang Python ports; differs from MATLAB in the outer ~2/scale pixels).

    Float input: computed in its dtype (float16/bfloat16 in float32, then cast back), no rounding anywhere.
    ``uint8`` input: MATLAB's uint8 semantics (float64, round half away from zero + saturate after each
    axis, ``uint8`` output). To quantise a float result once at the end use :func:`quantize_uint8`.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (..., H, W), got shape {tuple(x.shape)}")
    in_h, in_w = int(x.shape[-2]), int(x.shape[-1])
    if in_h == 0 or in_w == 0:
        raise ValueError(f"x has an empty spatial size {(in_h, in_w)}")
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale or size")
    if scale is not None:
        sh, sw = _positive_pair(scale, "scale")
        out_h, out_w = math.ceil(sh * in_h), math.ceil(sw * in_w)
    else:
        try:
            out_h, out_w = (int(s) for s in size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"size must be a pair of positive ints (H, W), got {size!r}") from None
        if out_h <= 0 or out_w <= 0 or any(isinstance(s, bool) or s != int(s) for s in size):  # type: ignore
            raise ValueError(f"size must be a pair of positive ints (H, W), got {size!r}")
        sh, sw = out_h / in_h, out_w / in_w
    if not isinstance(kernel, str) or _KERNEL_ALIASES.get(kernel, kernel) not in _KERNELS:
        raise ValueError(f"kernel must be one of {sorted(_KERNELS) + sorted(_KERNEL_ALIASES)}, got {kernel!r}")
    kernel = _KERNEL_ALIASES.get(kernel, kernel)
    if padding not in ("replicate", "symmetric"):
        raise ValueError(f"padding must be 'replicate' (MATLAB) or 'symmetric', got {padding!r}")

    in_dtype = x.dtype
    as_uint8 = in_dtype == torch.uint8
    if as_uint8:
        y = x.to(torch.float64)
    elif in_dtype.is_floating_point:
        y = x.float() if in_dtype in (torch.float16, torch.bfloat16) else x
    else:
        raise TypeError(f"x must be a floating-point or uint8 tensor, got {in_dtype}")

    # MATLAB resizes the dimension with the smaller scale factor first (height on ties)
    axes = [(-2, in_h, out_h, sh), (-1, in_w, out_w, sw)]
    if sw < sh:
        axes.reverse()
    for dim, n_in, n_out, s in axes:
        w, idx = _contributions(n_in, n_out, s, kernel, bool(antialias), padding)
        y = _resize_along(y, dim, w, idx)
        if as_uint8:
            y = _round_half_away(y).clamp_(0, 255)
    return y.to(in_dtype).contiguous()


def quantize_uint8(x: Tensor, data_range: float = 1.0) -> Tensor:
    """Snap a float image to the 256 uint8 levels like MATLAB's double->uint8 conversion (round half away
    from zero, saturate), keeping dtype and scale: the result is ``k * data_range / 255``, k in 0..255."""
    return to_uint8(x, data_range).to(x.dtype) * (data_range / 255.0)


def to_uint8(x: Tensor, data_range: float = 1.0) -> Tensor:
    """Float image on [0, data_range] -> ``uint8`` tensor (round half away from zero, saturate to [0, 255])."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if isinstance(data_range, bool) or not isinstance(data_range, numbers.Real) or not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range!r}")
    v = x.double() * (255.0 / data_range)
    return _round_half_away(v).clamp_(0, 255).to(torch.uint8)


def modcrop(img, scale: int):
    """Crop the bottom/right so height and width are multiples of ``scale``. Tensors: last two dims are
    (H, W). NumPy arrays: HW or HWC."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if isinstance(img, Tensor):
        if img.dim() < 2:
            raise ValueError(f"img must have at least 2 dims, got shape {tuple(img.shape)}")
        h, w = img.shape[-2:]
        return img[..., : h - h % scale, : w - w % scale]
    if isinstance(img, np.ndarray):
        if img.ndim not in (2, 3):
            raise ValueError(f"img (numpy) must be HW or HWC, got shape {img.shape}")
        h, w = img.shape[:2]
        return img[: h - h % scale, : w - w % scale]
    raise TypeError(f"img must be a torch.Tensor or numpy.ndarray, got {type(img).__name__}")


def dihedral(x: Tensor, t: int, *, inverse: bool = False) -> Tensor:
    """One of the 8 flip/transpose transforms of the last two dims. Bits of ``t``: 1 = flip W
    (horizontal), 2 = flip H (vertical), 4 = transpose H and W, applied in that order (RCAN's augment).
    ``inverse=True`` undoes transform ``t`` (for self-ensemble)."""
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 8:
        raise ValueError(f"t must be an int in 0..7, got {t!r}")
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor with at least 2 dims")
    if inverse:
        if t & 4:
            x = x.transpose(-2, -1)
        if t & 2:
            x = x.flip(-2)
        if t & 1:
            x = x.flip(-1)
        return x
    if t & 1:
        x = x.flip(-1)
    if t & 2:
        x = x.flip(-2)
    if t & 4:
        x = x.transpose(-2, -1)
    return x


# ---------------------------------------------------------------------------------------------------------
# Image I/O
# ---------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")


def _read_uint8(path: str | os.PathLike, mode: str | None = "RGB") -> np.ndarray:
    """Decode an 8-bit image file to an HWC uint8 array. mode: "RGB", "L" or None (keep L / LA / RGB / RGBA)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            # Pillow decodes 16-bit RGB(A)/LA PNGs to 8-bit modes by dropping the low byte: refuse those (the
            # raw mode of the undecoded tiles, e.g. "RGB;16B", tells) rather than lose precision silently
            raw = [t.args[0] if isinstance(t.args, tuple) and t.args else t.args for t in (im.tile or [])]
            deep = next((r for r in raw if isinstance(r, str) and re.search(r";(16|32)", r)), None)
            im.load()  # decode now, so truncated/corrupt data fails here rather than later
            if deep is not None or im.mode.startswith("I") or im.mode == "F":
                raise ValueError(f"unsupported {deep or im.mode} (16/32-bit) image; only 8-bit images are "
                                 "supported (convert it to 8 bits first; it is never truncated silently)")
            target = mode
            if target is None:
                target = im.mode if im.mode in ("L", "LA", "RGB", "RGBA") else (
                    "RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB"
                )
            arr = np.array(im.convert(target) if im.mode != target else im, dtype=np.uint8)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def load_image(
    path: str | os.PathLike, *, mode: str | None = "RGB", dtype: torch.dtype = torch.float32
) -> Tensor:
    """Read an 8-bit image file as a [C, H, W] tensor: float in [0, 1] (``dtype``) or the raw levels
    (``dtype=torch.uint8``). ``mode``: "RGB" (grey images replicated, alpha dropped), "L" (PIL's luma, not
    BT.601 Y: use ``metrics.rgb_to_y`` for that) or None (keep grey/grey+alpha/RGB/RGBA). Unreadable files raise
    ValueError naming the file."""
    if mode not in ("RGB", "L", None):
        raise ValueError(f"mode must be 'RGB', 'L' or None, got {mode!r}")
    arr = torch.from_numpy(_read_uint8(path, mode)).permute(2, 0, 1).contiguous()
    if dtype == torch.uint8:
        return arr
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be torch.uint8 or a floating dtype, got {dtype}")
    return arr.to(dtype) / 255.0


def save_image(img: Tensor, path: str | os.PathLike, *, data_range: float = 1.0, overwrite: bool = True,
               **pil_kwargs) -> None:
    """Write a [C, H, W] (C = 1, 2 (grey+alpha), 3, 4), [1, C, H, W] or [H, W] tensor as an 8-bit image, atomically
    (``srkernels._io.atomic_write``; ``overwrite=False``: FileExistsError if ``path`` exists). Float images on
    [0, data_range] are rounded half away from zero and saturated, as MATLAB's uint8 conversion; uint8 tensors
    are written as they are. Format from the file extension."""
    from PIL import Image

    if not isinstance(img, Tensor):
        raise TypeError(f"img must be a torch.Tensor, got {type(img).__name__}")
    path = Path(path)
    ext = path.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"path {path}: unknown image extension {ext!r}")
    t = img.detach().cpu()
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[0] not in (1, 2, 3, 4):
        raise ValueError(f"img must be [C, H, W] with C in (1, 2, 3, 4) (or [1, C, H, W] / [H, W]), got {tuple(img.shape)}")
    if t.dtype != torch.uint8:
        if not t.dtype.is_floating_point:
            raise TypeError(f"img must be floating or uint8, got {t.dtype}")
        t = to_uint8(t, data_range)
    arr = t.permute(1, 2, 0).contiguous().numpy()
    pil = Image.fromarray(arr[:, :, 0]) if arr.shape[2] == 1 else Image.fromarray(arr, "LA" if arr.shape[2] == 2 else None)
    atomic_write(path, lambda f: pil.save(f, format=fmt, **pil_kwargs), overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------------
# Folder layouts and HR/LR pairing
# ---------------------------------------------------------------------------------------------------------

#: Where the standard SR sets put their HR and LR files (``{s}`` = scale, ``{split}`` = train/valid).
#: ``PairedImageFolder(hr_dir, s, lr_dir=...)`` takes the two directories; :func:`find_lr_file` pairs the
#: names. The first three are the usual distributions of the benchmark sets, the last two are specific.
folder_layouts: dict[str, dict[str, str]] = {
    "DIV2K": {
        "hr": "DIV2K_{split}_HR/0001.png (train 0001-0800, valid 0801-0900)",
        "lr": "DIV2K_{split}_LR_bicubic/X{s}/0001x{s}.png (MATLAB imresize, uint8)",
        "notes": "Official ETH download. HR sizes need not be multiples of s: the dataset crops HR to "
        "LR*s and checks that LR is floor(HR/s).",
    },
    "benchmark (EDSR)": {
        "hr": "benchmark/{Set5,Set14,B100,Urban100}/HR/baby.png",
        "lr": "benchmark/{Set5,Set14,B100,Urban100}/LR_bicubic/X{s}/babyx{s}.png",
        "notes": "EDSR/RCAN-PyTorch's benchmark.tar; LR made by MATLAB from modcropped HR.",
    },
    "BasicSR": {
        "hr": "{Set5,Set14,BSDS100,urban100}/GTmod12/baby.png",
        "lr": "{Set5,Set14,BSDS100,urban100}/LRbicx{s}/baby.png (same name)",
        "notes": "HR modcropped to a multiple of 12 so one HR serves x2/x3/x4.",
    },
    "SelfExSR (Huang et al. 2015)": {
        "hr": "{Set5,Set14,BSD100,Urban100}/image_SRF_{s}/img_001_SRF_{s}_HR.png",
        "lr": "same folder: img_001_SRF_{s}_LR.png",
        "notes": "The folder also holds other methods' results (img_001_SRF_{s}_bicubic.png, ...); only "
        "files with an 'HR' name token are taken as HR.",
    },
    "RCAN_TestCode": {
        "hr": "HR/{Set5,Set14,B100,Urban100}/x{s}/baby_HR_x{s}.png",
        "lr": "LR/LRBI/{set}/x{s}/baby_LRBI_x{s}.png (LRBD/LRDN for the other degradations)",
        "notes": "Made by Prepare_TestData_HR_LR.m (modcrop(s), imresize 1/s, uint8).",
    },
}

_SET_ALIASES = {
    "set5": ("Set5",),
    "set14": ("Set14",),
    "b100": ("B100", "BSD100", "BSDS100"),
    "urban100": ("Urban100", "urban100"),
}


def _list_images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _has_images(d: Path) -> bool:
    return d.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in d.iterdir())


def find_dataset_dirs(root: str | os.PathLike, name: str, scale: int, *, split: str = "train"):
    """``(hr_dir, lr_dir)`` of set ``name`` (DIV2K, Set5, Set14, B100, Urban100) under ``root``, probing the
    layouts of :data:`folder_layouts` in order; ``lr_dir`` is None for a folder of HR images only (LR is
    then made on the fly). ValueError when nothing matches."""
    root = Path(root)
    tried: list[str] = []

    def probe(hr: Path, lr: Path | None):
        tried.append(str(hr))
        if _has_images(hr) and (lr is None or lr.is_dir()):
            return hr, lr
        return None

    if name.lower() == "div2k":
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        for base in (root, root / "DIV2K"):
            hit = probe(base / f"DIV2K_{split}_HR", base / f"DIV2K_{split}_LR_bicubic")
            if hit:
                return hit
            hit = probe(base / f"DIV2K_{split}_HR", None)
            if hit:
                return hit
        raise ValueError(f"no DIV2K {split} layout under root={root} (tried {tried})")
    names = _SET_ALIASES.get(name.lower(), (name,))
    for n in names:
        for base in (root / n, root / "benchmark" / n):
            hit = probe(base / "HR", base / "LR_bicubic")
            if hit:
                return hit
            hit = probe(base / "GTmod12", base / f"LRbicx{scale}")
            if hit:
                return hit
            hit = probe(base / f"image_SRF_{scale}", base / f"image_SRF_{scale}")
            if hit:
                return hit
        hit = probe(root / "HR" / n / f"x{scale}", root / "LR" / "LRBI" / n / f"x{scale}")
        if hit:
            return hit
    for n in names:
        for base in (root / n / "HR", root / n):
            hit = probe(base, None)
            if hit:
                return hit
    raise ValueError(f"no known layout for {name!r} x{scale} under root={root} (tried {tried})")


_HR_TOKEN = "HR"
_LR_TOKENS = ("LR", "LRBI", "LRBD", "LRDN")


def _hr_candidates(hr_dir: Path) -> list[Path]:
    files = _list_images(hr_dir)
    tagged = [p for p in files if _HR_TOKEN in p.stem.split("_")]
    # folders that mix HR with LR and other methods' outputs mark the HR files by an "HR" name token
    return tagged if tagged else files


def find_lr_file(hr_path: str | os.PathLike, lr_dir: str | os.PathLike, scale: int) -> Path:
    """The LR file paired with ``hr_path``. Directories searched, in order: ``lr_dir/X{s}``, ``lr_dir/x{s}``,
    ``lr_dir``. Names tried, in order, for an HR file with stem ``t`` (any image extension):

    1. ``{t}x{s}``                                   DIV2K, EDSR benchmark (``0001.png`` -> ``0001x2.png``)
    2. ``t`` with its last ``HR`` token (``_``-separated) replaced by ``LR``, ``LRBI``, ``LRBD`` or ``LRDN``
       (SelfExSR ``img_001_SRF_2_HR`` -> ``img_001_SRF_2_LR``; RCAN ``baby_HR_x2`` -> ``baby_LRBI_x2``)
    3. ``t`` itself                                  BasicSR ``GTmod12/baby.png`` <-> ``LRbicx2/baby.png``

    The first name with a match wins; two files that differ only by extension are an error, so is no match.
    """
    hr_path, lr_dir = Path(hr_path), Path(lr_dir)
    if not lr_dir.is_dir():
        raise ValueError(f"lr_dir is not a directory: {lr_dir}")
    stem = hr_path.stem
    names = [f"{stem}x{scale}"]
    tokens = stem.split("_")
    if _HR_TOKEN in tokens:
        i = len(tokens) - 1 - tokens[::-1].index(_HR_TOKEN)
        names += ["_".join(tokens[:i] + [lr] + tokens[i + 1 :]) for lr in _LR_TOKENS]
    names.append(stem)
    dirs = [d for d in (lr_dir / f"X{scale}", lr_dir / f"x{scale}", lr_dir) if d.is_dir()]
    listings = {d: _list_images(d) for d in dirs}
    for n in names:
        for d in dirs:
            hits = [p for p in listings[d] if p.stem == n and p.resolve() != hr_path.resolve()]
            if len(hits) > 1:
                raise ValueError(f"ambiguous LR files for HR file {hr_path}: {[str(p) for p in hits]}")
            if hits:
                return hits[0]
    raise ValueError(f"no LR file for HR file {hr_path} in {[str(d) for d in dirs]} (tried stems {names})")


# ---------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------

# bump when the on-the-fly LR recipe changes, so stale disk-cache files are not reused
_LR_RECIPE = "matlab-bicubic-uint8-v1"


class PairedImageFolder(torch.utils.data.Dataset):
    """(LR, HR) pairs from a folder of HR images; see the module docstring for the recipe.

    Args:
        hr_dir: folder of HR images (sorted by file name; if some names carry an ``HR`` token, only those).
        scale: integer SR factor s.
        lr_dir: folder of matching LR images (pairing rule: :func:`find_lr_file`); LR must be exactly
            ``floor(HR / s)`` in size, and HR is cropped to ``LR * s``. None: LR made on the fly (MATLAB
            uint8 bicubic of the modcropped HR).
        patch_size: LR patch side ``p`` (HR patch ``p * s``), random aligned crop; None = whole images.
        augment: random dihedral transform (8 flips/transposes), the same for LR and HR.
        seed, set_epoch: crops/transforms are drawn from ``numpy.random.default_rng([seed, epoch, index])``.
        cache_dir: where on-the-fly LR images are cached as ``.npy`` (written atomically, keyed by the HR
            file's path, size and mtime). None: they are cached in memory instead (per DataLoader worker).
        y_only: return the BT.601 Y channel (1 x H x W, on [0, 1], i.e. [16, 235] / 255) instead of RGB.

    Items: ``(lr, hr)`` float32 [C, H, W] in [0, 1]. Grey files are replicated to RGB (as RCAN's MATLAB
    scripts do). Unreadable images raise ValueError naming the file.
    """

    def __init__(
        self,
        hr_dir: str | os.PathLike,
        scale: int,
        *,
        lr_dir: str | os.PathLike | None = None,
        patch_size: int | None = None,
        augment: bool = False,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        y_only: bool = False,
    ) -> None:
        self.scale = int_at_least("scale", scale, 1)
        self.patch_size = None if patch_size is None else int_at_least("patch_size", patch_size, 1)
        self.seed = int_at_least("seed", seed, 0)
        self.augment = bool(augment)
        self.y_only = bool(y_only)
        self.epoch = 0
        self.hr_dir = Path(hr_dir)
        if not self.hr_dir.is_dir():
            raise ValueError(f"hr_dir is not a directory: {self.hr_dir}")
        self.hr_files = _hr_candidates(self.hr_dir)
        if not self.hr_files:
            raise ValueError(f"hr_dir contains no images ({', '.join(IMAGE_EXTENSIONS)}): {self.hr_dir}")
        self.lr_dir = None if lr_dir is None else Path(lr_dir)
        self.lr_files: list[Path] | None = (
            None if self.lr_dir is None else [find_lr_file(p, self.lr_dir, self.scale) for p in self.hr_files]
        )
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._lr_memory: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.hr_files)

    @property
    def names(self) -> list[str]:
        """HR file stems, in item order (for per-image reports and saved outputs)."""
        return [p.stem for p in self.hr_files]

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops/transforms of this epoch (the sampler's shuffling is separate)."""
        self.epoch = int_at_least("epoch", epoch, 0)

    # -- LR ------------------------------------------------------------------------------------------------

    def _make_lr(self, hr: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(hr).permute(2, 0, 1)
        lr = imresize(t, 1.0 / self.scale)  # uint8 in -> MATLAB uint8 pipeline
        return lr.permute(1, 2, 0).contiguous().numpy()

    def _cache_file(self, index: int) -> Path:
        hr = self.hr_files[index]
        st = hr.stat()
        key = f"{hr.resolve()}|{st.st_size}|{st.st_mtime_ns}|x{self.scale}|{_LR_RECIPE}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{hr.stem}_x{self.scale}_{digest}.npy"  # type: ignore[operator]

    def _generated_lr(self, index: int, hr: np.ndarray) -> np.ndarray:
        want = (hr.shape[0] // self.scale, hr.shape[1] // self.scale, hr.shape[2])
        if self.cache_dir is None:
            lr = self._lr_memory.get(index)
            if lr is None:
                lr = self._lr_memory[index] = self._make_lr(hr)
            return lr
        path = self._cache_file(index)
        if path.is_file():
            try:
                lr = np.load(path, allow_pickle=False)
                if lr.dtype == np.uint8 and lr.shape == want:
                    return lr
                warnings.warn(f"LR cache file {path} has shape {lr.shape} / {lr.dtype}; recomputing")
            except (OSError, ValueError) as e:
                warnings.warn(f"LR cache file {path} is unreadable ({e}); recomputing")
        lr = self._make_lr(hr)
        atomic_write(path, lambda f: np.save(f, lr, allow_pickle=False))
        return lr

    def _pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.scale
        hr_path = self.hr_files[index]
        hr = _read_uint8(hr_path, "RGB")
        if self.lr_files is None:
            hr = modcrop(hr, s)
            if hr.shape[0] == 0 or hr.shape[1] == 0:
                raise ValueError(f"HR file {hr_path} ({hr.shape[1]}x{hr.shape[0]}) is smaller than scale {s}")
            return self._generated_lr(index, hr), hr
        lr_path = self.lr_files[index]
        lr = _read_uint8(lr_path, "RGB")
        h, w = lr.shape[:2]
        if hr.shape[0] // s != h or hr.shape[1] // s != w:
            raise ValueError(
                f"LR file {lr_path} is {w}x{h} but HR file {hr_path} is {hr.shape[1]}x{hr.shape[0]}; "
                f"expected LR = floor(HR / {s}) = {hr.shape[1] // s}x{hr.shape[0] // s}"
            )
        return lr, hr[: h * s, : w * s]

    # -- items ---------------------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        lr, hr = self._pair(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        s, p = self.scale, self.patch_size
        if p is not None:
            h, w = lr.shape[:2]
            if h < p or w < p:
                raise ValueError(
                    f"image {self.hr_files[index]}: LR size {w}x{h} is smaller than patch_size {p}"
                )
            y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            lr = lr[y : y + p, x : x + p]
            hr = hr[s * y : s * (y + p), s * x : s * (x + p)]
        lr_t = torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1).float().div_(255.0)
        hr_t = torch.from_numpy(np.ascontiguousarray(hr)).permute(2, 0, 1).float().div_(255.0)
        if self.augment:
            t = int(rng.integers(0, 8))
            lr_t, hr_t = dihedral(lr_t, t).contiguous(), dihedral(hr_t, t).contiguous()
        if self.y_only:
            from .metrics import rgb_to_y

            lr_t, hr_t = rgb_to_y(lr_t, data_range=1.0), rgb_to_y(hr_t, data_range=1.0)
        return lr_t, hr_t

    def __repr__(self) -> str:
        src = f"lr_dir={str(self.lr_dir)!r}" if self.lr_dir else "lr=on-the-fly MATLAB bicubic"
        return (
            f"{type(self).__name__}({str(self.hr_dir)!r}, x{self.scale}, {len(self)} images, {src}, "
            f"patch_size={self.patch_size}, augment={self.augment}, y_only={self.y_only})"
        )
