"""Plain-PyTorch ground truth for every fused op: same signatures as ``srkernels.ops``.

Written for clarity, not speed; autograd differentiates it. The fused backends are tested against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _pool_std(x: Tensor) -> Tensor:
    # Population std over H, W. Its gradient at std == 0 is defined as 0 (sqrt' is infinite there), which is
    # what the fused kernels do; upstream's plain ``var ** 0.5`` would give NaN gradients for constant channels.
    # Only var == 0 is special: a channel holding NaN or +-Inf has a NaN var, hence a NaN std, as torch.std
    # (docs/ops.md, "NaN and Inf").
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True)
    zero = var == 0
    return torch.where(zero, torch.zeros_like(var), torch.where(zero, torch.ones_like(var), var).sqrt())


def _fc(v: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(v, w.reshape(w.shape[0], -1), b)


def channel_attention(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    residual: Tensor | None = None,
    act: str = "relu",
    act_weight: Tensor | None = None,
    pool: str = "avg",
) -> Tensor:
    """``x * sigmoid(W2 . act(W1 . pool(x) + b1) + b2) (+ residual)`` (RCAN CALayer, IMDN contrast attention)."""
    s = x.mean(dim=(2, 3), keepdim=True)
    if pool == "avg+std":
        s = s + _pool_std(x)
    s = s.flatten(1)
    h = _fc(s, w1, b1)
    h = F.relu(h) if act == "relu" else F.prelu(h, act_weight.reshape(-1))
    g = torch.sigmoid(_fc(h, w2, b2))
    out = x * g[:, :, None, None]
    return out if residual is None else out + residual


def balanced_attention(
    x: Tensor,
    w1: Tensor,
    prelu_w: Tensor,
    w2: Tensor,
    w_sa: Tensor,
    *,
    residual: Tensor | None = None,
) -> Tensor:
    """BAM: ``x * ACAM(x) * MSAM(x) (+ residual)``, ACAM = avg-pool MLP with PReLU, MSAM = 7x7 conv of channel max."""
    m = x.mean(dim=(2, 3))
    ca = torch.sigmoid(_fc(F.prelu(_fc(m, w1, None), prelu_w.reshape(-1)), w2, None))
    mx = torch.max(x, dim=1, keepdim=True)[0]
    k = w_sa.shape[-1]
    sa = torch.sigmoid(F.conv2d(mx, w_sa.reshape(1, 1, k, k), padding=k // 2))
    out = x * ca[:, :, None, None] * sa
    return out if residual is None else out + residual


def pixel_shuffle(
    x: Tensor,
    r: int,
    *,
    bias: Tensor | None = None,
    act: str | None = None,
    act_weight: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``act(F.pixel_shuffle(x + bias, r)) (+ residual)``: the epilogue of an upsampling conv run without bias."""
    if bias is not None:
        x = x + bias.reshape(1, -1, 1, 1)
    y = F.pixel_shuffle(x, r)
    if act == "relu":
        y = F.relu(y)
    elif act == "prelu":
        y = F.prelu(y, act_weight.reshape(-1))
    return y if residual is None else y + residual


def pixel_unshuffle(x: Tensor, r: int) -> Tensor:
    if x.numel() == 0:  # F.pixel_unshuffle returns an empty input unchanged, with the wrong shape (torch 2.14)
        N, C, H, W = x.shape
        return x.new_empty((N, C * r * r, H // r, W // r))
    return F.pixel_unshuffle(x, r)
