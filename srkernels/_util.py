"""Small helpers every layer shares (imports nothing from srkernels, so any module may use them); argument
checks such as ``positive_int`` live in ``srkernels/_validate.py``."""
from __future__ import annotations

import os

import torch
from torch import nn


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels (docs/ops.md "acc"): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_interpret() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``: its kernels accept CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def conv(cin: int, cout: int, k: int = 3, bias: bool = True) -> nn.Conv2d:
    """A kxk conv with 'same' zero padding (k odd)."""
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
