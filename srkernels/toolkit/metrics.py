"""PSNR and SSIM the way SR papers compute them (MATLAB ``Evaluate_PSNR_SSIM.m`` / BasicSR conventions).

Convention of the library's tables (``toolkit.evaluate``, README numbers):

* Y channel of BT.601 "MATLAB rgb2ycbcr" (``coeffs="bt601"``: ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)/255``
  with R, G, B in [0, 255]), kept in float (not rounded);
* ``crop_border = scale`` pixels removed from every side;
* the SR output is a float image clamped to [0, 1] by the caller, **not** quantised to uint8 unless asked
  (``quantize=True`` reproduces official RCAN, which saves uint8 PNGs before measuring);
* PSNR = ``10 log10(255^2 / MSE)``; SSIM = Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5),
  K1 = 0.01, K2 = 0.03, L = 255, 'valid' filtering (only windows fully inside the cropped image), mean of
  the SSIM map. Everything is computed in float64 on the [0, 255] scale.

``coeffs="typo64738"`` is the ``16 + (64.738 R + 129.057 G + 25.064 B)/256`` formula of yjn870 / HEEJOWOO /
BAM / super-image (R coefficient mistyped), for reproducing their numbers. ``y_channel=False`` measures RGB:
PSNR over all channels' squared errors together, SSIM = mean of the per-channel SSIMs (BasicSR).

Checked against MATLAB output: on the 15 x2/x3/x4 Set5 SR PNGs published in RCAN's ``RCAN_TestCode``, these
functions reproduce its MATLAB ``PSNR_SSIM_Results_BI_model.txt`` (6 printed decimals) within 5.3e-7 dB PSNR
and 5e-7 SSIM, i.e. up to the last printed digit (MATLAB stores Y as float32 before measuring).

Inputs: torch tensors [C, H, W] (one image -> Python float) or [N, C, H, W] (-> float64 tensor [N], one
value per image, on the input's device), or NumPy arrays HW / HWC (uint8 or float, RGB order) -> float.
``data_range`` is the white level of the input: 1.0 for float images (default), 255 for uint8 (implied).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rgb_to_y", "psnr", "ssim", "Y_COEFFS"]

#: name -> ((cR, cG, cB), divisor): ``Y = 16 + (cR R + cG G + cB B) / divisor`` with R, G, B in [0, 255]
Y_COEFFS: dict[str, tuple[tuple[float, float, float], float]] = {
    "bt601": ((65.481, 128.553, 24.966), 255.0),
    "typo64738": ((64.738, 129.057, 25.064), 256.0),
}

_SSIM_WIN, _SSIM_SIGMA, _K1, _K2, _L = 11, 1.5, 0.01, 0.03, 255.0


def _check_range(data_range, is_uint8: bool, name: str) -> float:
    if is_uint8:
        if data_range not in (None, 255, 255.0):
            raise ValueError(f"{name} is uint8, so data_range must be 255 (or None), got {data_range!r}")
        return 255.0
    if data_range is None:
        return 1.0
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not data_range > 0:
        raise ValueError(f"data_range must be a positive number (1.0 or 255), got {data_range!r}")
    return float(data_range)


def _coeffs(coeffs: str) -> tuple[tuple[float, float, float], float]:
    if coeffs not in Y_COEFFS:
        raise ValueError(f"coeffs must be one of {sorted(Y_COEFFS)}, got {coeffs!r}")
    return Y_COEFFS[coeffs]


def _y255(r: Tensor, g: Tensor, b: Tensor, coeffs: str) -> Tensor:
    (cr, cg, cb), div = _coeffs(coeffs)
    return 16.0 + (cr * r + cg * g + cb * b) / div


def rgb_to_y(img, *, coeffs: str = "bt601", data_range: float | None = None):
    """Y (luma) of an RGB image, on the same scale as the input (``data_range``; [0, 1] input gives Y in
    [16, 235] / 255). Tensors: channel dim -3 ([3, H, W] or [N, 3, H, W]) -> [..., 1, H, W], float dtype kept
    (uint8 -> float64). NumPy: HWC -> HW1 float64. The result is not rounded."""
    if isinstance(img, Tensor):
        if img.dim() < 3 or img.shape[-3] != 3:
            raise ValueError(f"img must be [..., 3, H, W] (RGB), got shape {tuple(img.shape)}")
        if img.dtype == torch.uint8:
            dr = _check_range(data_range, True, "img")
            x = img.double()
        elif img.dtype.is_floating_point:
            dr = _check_range(data_range, False, "img")
            x = img
        else:
            raise TypeError(f"img must be a floating-point or uint8 tensor, got {img.dtype}")
        x = x * (255.0 / dr) if dr != 255.0 else x
        y = _y255(x[..., 0:1, :, :], x[..., 1:2, :, :], x[..., 2:3, :, :], coeffs)
        return y * (dr / 255.0) if dr != 255.0 else y
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"img (numpy) must be HWC with 3 channels (RGB), got shape {img.shape}")
        if img.dtype != np.uint8 and not np.issubdtype(img.dtype, np.floating):
            raise TypeError(f"img must be a uint8 or float array, got {img.dtype}")
        arr = img if img.dtype == np.uint8 else img.astype(np.float64)
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        return rgb_to_y(t, coeffs=coeffs, data_range=data_range).permute(1, 2, 0).numpy()
    raise TypeError(f"img must be a torch.Tensor or numpy.ndarray, got {type(img).__name__}")


def _as_batch(img, name: str, data_range) -> tuple[Tensor, bool]:
    """-> (float64 [N, C, H, W] on the [0, 255] scale, whether the input was batched)."""
    if isinstance(img, np.ndarray):
        if img.ndim == 2:
            arr = img[:, :, None]
        elif img.ndim == 3:
            arr = img
        else:
            raise ValueError(f"{name} (numpy) must be HW or HWC, got shape {img.shape}")
        if img.dtype != np.uint8 and not np.issubdtype(img.dtype, np.floating):
            raise TypeError(f"{name} must be a uint8 or float array, got {img.dtype}")
        t, batched = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None], False
    elif isinstance(img, Tensor):
        if img.dim() == 3:
            t, batched = img[None], False
        elif img.dim() == 4:
            t, batched = img, True
        else:
            raise ValueError(f"{name} must be [C, H, W] or [N, C, H, W], got shape {tuple(img.shape)}")
        if img.dtype != torch.uint8 and not img.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point or uint8 tensor, got {img.dtype}")
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(img).__name__}")
    dr = _check_range(data_range, t.dtype == torch.uint8, name)
    t = t.detach().to(torch.float64)
    return (t * (255.0 / dr) if dr != 255.0 else t), batched


def _prepare(sr, hr, crop_border, y_channel, coeffs, data_range, quantize) -> tuple[Tensor, Tensor, bool]:
    s, s_batched = _as_batch(sr, "sr", data_range)
    h, h_batched = _as_batch(hr, "hr", data_range)
    if s.shape != h.shape:
        raise ValueError(f"sr and hr must have the same shape, got sr {tuple(s.shape)} and hr {tuple(h.shape)}")
    if s.device != h.device:
        raise ValueError(f"sr and hr must be on the same device, got {s.device} and {h.device}")
    _coeffs(coeffs)
    if isinstance(crop_border, bool) or not isinstance(crop_border, (int, np.integer)) or crop_border < 0:
        raise ValueError(f"crop_border must be an int >= 0, got {crop_border!r}")
    _, c, height, width = s.shape
    if 2 * crop_border >= min(height, width):
        raise ValueError(f"crop_border={crop_border} removes the whole {height}x{width} image")
    if quantize:  # the SR output as an 8-bit file would hold it (official RCAN)
        s = torch.floor(s.clamp(0.0, 255.0) + 0.5)
    if y_channel:
        if c == 3:
            s = _y255(s[:, 0:1], s[:, 1:2], s[:, 2:3], coeffs)
            h = _y255(h[:, 0:1], h[:, 1:2], h[:, 2:3], coeffs)
        elif c != 1:  # one channel = already luminance (Y-only models, grey images), used as is
            raise ValueError(f"sr/hr: y_channel=True needs 3 (RGB) or 1 (Y) channels, got {c}")
    if crop_border:
        b = int(crop_border)
        s, h = s[..., b:-b, b:-b], h[..., b:-b, b:-b]
    return s, h, s_batched or h_batched


def _result(v: Tensor, batched: bool):
    return v if batched else float(v[0])


def _image_metric(per_image):
    """The public metric around ``per_image(s, h, crop_border) -> [N] float64``: every metric takes the same
    arguments, which ``_prepare`` turns into cropped float64 [N, C, H, W] images on the [0, 255] scale."""

    def metric(sr, hr, *, crop_border: int, y_channel: bool = True, coeffs: str = "bt601",
               data_range: float | None = None, quantize: bool = False):
        s, h, batched = _prepare(sr, hr, crop_border, y_channel, coeffs, data_range, quantize)
        return _result(per_image(s, h, crop_border), batched)

    metric.__name__ = metric.__qualname__ = per_image.__name__
    metric.__doc__ = per_image.__doc__
    return metric


@_image_metric
def psnr(s: Tensor, h: Tensor, crop_border: int) -> Tensor:
    """PSNR in dB (peak 255 on the Y / RGB scale) of ``sr`` against ``hr``; ``inf`` when they are equal.
    See the module docstring for conventions, input kinds and the return type."""
    mse = (s - h).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10((_L * _L) / mse)  # mse == 0 -> inf


def _gaussian_window(device) -> Tensor:
    x = torch.arange(_SSIM_WIN, dtype=torch.float64, device=device) - (_SSIM_WIN - 1) / 2
    g = torch.exp(-(x * x) / (2 * _SSIM_SIGMA**2))
    return g / g.sum()  # MATLAB fspecial('gaussian', 11, 1.5) is the outer product of this with itself


def _filter_valid(x: Tensor, g: Tensor) -> Tensor:
    """Separable 2-D Gaussian correlation with 'valid' output over [M, 1, H, W]."""
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return F.conv2d(x, g.view(1, 1, 1, -1))


@_image_metric
def ssim(s: Tensor, h: Tensor, crop_border: int) -> Tensor:
    """Mean SSIM (Wang et al. 2004, MATLAB ``ssim_index`` defaults) of ``sr`` against ``hr``. The cropped
    image must be at least 11x11. RGB mode: mean over channels of the per-channel SSIM."""
    n, c, height, width = s.shape
    if min(height, width) < _SSIM_WIN:
        raise ValueError(
            f"SSIM needs at least {_SSIM_WIN}x{_SSIM_WIN} pixels after crop_border={crop_border}, got {height}x{width}"
        )
    g = _gaussian_window(s.device)
    c1, c2 = (_K1 * _L) ** 2, (_K2 * _L) ** 2
    with torch.no_grad():
        a, b = s.reshape(n * c, 1, height, width), h.reshape(n * c, 1, height, width)
        mu1, mu2 = _filter_valid(a, g), _filter_valid(b, g)
        mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
        s1 = _filter_valid(a * a, g) - mu1_sq
        s2 = _filter_valid(b * b, g) - mu2_sq
        s12 = _filter_valid(a * b, g) - mu12
        smap = ((2 * mu12 + c1) * (2 * s12 + c2)) / ((mu1_sq + mu2_sq + c1) * (s1 + s2 + c2))
        return smap.mean(dim=(1, 2, 3)).view(n, c).mean(dim=1)
