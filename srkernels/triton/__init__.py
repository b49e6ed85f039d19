"""Triton kernels for the fused ops: ``srkernels/triton/<op>.py`` holds one function per dispatcher op of
``srkernels/ops/<op>.py`` (same name), which ``srkernels.ops._registry`` registers as
``torch.ops.srkernels_triton.<op>`` with the op's schema, fake and autograd (contracts in docs/ops.md).

Importing this package is cheap and never fails: it only checks whether Triton is installed; :func:`load`
imports the kernel modules (and Triton).
On CPU tensors the kernels only run under ``TRITON_INTERPRET=1`` (set before Triton is first imported).
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable

from .._util import triton_interpret as interpreted

AVAILABLE: bool = importlib.util.find_spec("triton") is not None


def load(modules: Iterable[str]) -> bool:
    """Import the kernel modules ``modules`` (names under this package). False if Triton is missing."""
    if not AVAILABLE:
        return False
    for name in modules:
        importlib.import_module(f"{__name__}.{name}")
    return True


__all__ = ["AVAILABLE", "load", "interpreted"]
