"""``direct_conv2d``: an R x R (odd R), stride 1, zero-padding R // 2 convolution with few output channels,
computed directly and vectorised over the input channels, with the conv epilogue ``act(conv + bias) (+ residual)``
fused in. CPU, float32 (or bfloat16 storage with float32 arithmetic), inference.

For a model's last conv (64 -> 3 at the HR size; SRDenseNet's 256 -> 1, SRCNN's 32 -> 1): kernels that vectorise
over output channels (oneDNN, ``winograd_conv3x3``) pad 1-4 outputs to a whole vector. ``direct_weight(weight)``
reorders a ``[C_out, C_in, R, R]`` weight once to ``[R, R, C_out, C_in]``; ``direct_use(...)`` is the measured
rule for when the kernel beats the others. Kernel contract: docs/ops.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from ._registry import OpSpec
from .winograd_conv3x3 import ACTS, current_capability, run_op

OP = "direct_conv2d"


def direct_weight(weight: Tensor) -> Tensor:
    """``[C_out, C_in, R, R]`` conv weight (odd R) -> ``[R, R, C_out, C_in]``, contiguous, the same values."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating, got dtype {weight.dtype}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"weight must be [C_out, C_in, R, R] with odd R, got shape {list(weight.shape)}")
    return weight.permute(2, 3, 0, 1).contiguous()


def reference(x: Tensor, weight_t: Tensor, bias: Tensor | None = None, act: str = "none",
              residual: Tensor | None = None) -> Tensor:
    """The op in plain torch ops (any dtype and device, differentiable): ``act(F.conv2d(x, w, bias, padding=R //
    2)) (+ residual)`` for ``weight_t = direct_weight(w)``; bf16 in float32, rounded once, as the kernel."""
    if x.dtype in (torch.bfloat16, torch.float16):
        f = (lambda t: None if t is None else t.float())
        return reference(x.float(), weight_t.float(), f(bias), act, f(residual)).to(x.dtype)
    w = weight_t.to(x.dtype).permute(2, 3, 0, 1)
    y = F.conv2d(x, w, None if bias is None else bias.to(x.dtype), padding=weight_t.shape[0] // 2)
    if act == "relu":
        y = torch.relu(y)
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=_checks.suggest_memory_format(x))


def direct_conv2d(
    x: Tensor,
    weight_t: Tensor,
    bias: Tensor | None = None,
    *,
    act: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``act(conv(x) + bias) (+ residual)``, R x R kernel, stride 1, zero padding R // 2, computed directly.

    Args:
        x: ``[N, C_in, H, W]`` float32 or bfloat16 (float64 runs the torch reference), contiguous or
            channels_last (the kernel's native layout; other layouts are converted first). bfloat16 is storage
            only: the arithmetic is float32 and the result is rounded once.
        weight_t: ``direct_weight(weight)``, ``[R, R, C_out, C_in]``, odd R, x's dtype; float32 for a bfloat16 x.
        bias: ``(C_out,)`` of x's dtype or float32, or None.
        act: None/``"none"`` or ``"relu"`` (applied before the residual add).
        residual: optional ``[N, C_out, H, W]`` tensor added last (any layout).

    Returns ``[N, C_out, H, W]`` in ``x``'s memory format. Fast for 1-4 output channels (more run in groups of
    4). Inference: a call that needs a gradient runs the (differentiable) torch reference.
    """
    return run_op(OP, _channels, reference, x, weight_t, bias, act, residual)


def _channels(weight_t: Tensor) -> tuple[int, int]:
    """``(C_in, C_out)`` of a ``[R, R, C_out, C_in]`` weight_t with odd R, else a ValueError."""
    if weight_t.dim() != 4 or weight_t.shape[0] != weight_t.shape[1] or weight_t.shape[0] % 2 == 0:
        raise ValueError(f"weight_t must be [R, R, C_out, C_in] with odd R (direct_weight(weight)), got shape "
                         f"{list(weight_t.shape)}")
    return weight_t.shape[3], weight_t.shape[2]


def direct_use(c_in: int, c_out: int, kernel: int, height: int, width: int, capability: str | None = None) -> bool:
    """Whether to run this float32 / bfloat16-storage conv (``kernel`` x ``kernel``, stride 1, zero padding
    ``kernel // 2``) as ``direct_conv2d`` rather than Winograd or the prepacked oneDNN conv: the ``avx2`` /
    ``avx512`` builds, at most 4 output channels, at least 16 input channels, 3x3 or 5x5, at least 16x16 pixels.
    Measured on an AMD EPYC (Zen 5), one thread, AVX-512 and forced AVX2 (``benchmarks/bench_direct_conv2d.py``;
    docs/ops.md ``## direct_conv2d``)."""
    if current_capability(capability) not in ("avx2", "avx512"):
        return False
    return c_out <= 4 and c_in >= 16 and kernel in (3, 5) and height * width >= 16 * 16


# ---- the spec (srkernels/ops/_registry.py registers it) ----


def _fake(x, weight_t, bias, act, residual):
    torch._check(act in ACTS, lambda: f"{OP}: act must be one of {ACTS}, got {act!r}")
    N, _, H, W = x.shape
    return x.new_empty((N, weight_t.shape[2], H, W)).contiguous(memory_format=_checks.suggest_memory_format(x))


SPEC = OpSpec(
    name=OP,
    schemas={OP: "(Tensor x, Tensor weight_t, Tensor? bias, str act, Tensor? residual) -> Tensor"},
    fakes={OP: _fake},
    autograd={},
    reference=reference,
    backends=("cpu",),  # a CPU algorithm, like winograd_conv3x3 (cuDNN serves these convs on GPU)
    autocast={OP: "fp32"},  # float32 arithmetic under autocast; conv2d_pointwise reaches bf16 storage itself
)
