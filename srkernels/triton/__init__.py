"""Triton kernels for the fused ops, registered as ``torch.ops.srkernels_triton.<op>`` (same schemas as
``torch.ops.srkernels``; contracts in docs/ops.md).

Importing this package is cheap and never fails: it only checks whether Triton is installed. Call
:func:`load` to import the op modules (which import Triton and register the ops).
On CPU tensors the kernels only run under ``TRITON_INTERPRET=1`` (set before Triton is first imported).
"""
from __future__ import annotations

import importlib
import importlib.util

AVAILABLE: bool = importlib.util.find_spec("triton") is not None

_OP_MODULES = ("channel_attention", "balanced_attention", "pixel_shuffle", "dense_block")
_loaded = False


def load() -> bool:
    """Import the op modules (registers the ``srkernels_triton`` ops). Returns False if Triton is missing;
    safe to call repeatedly."""
    global _loaded
    if _loaded:
        return True
    if not AVAILABLE:
        return False
    for name in _OP_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    _loaded = True
    return True


def interpreted() -> bool:
    """True when Triton runs in interpreter mode (kernels accept CPU tensors)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


__all__ = ["AVAILABLE", "load", "interpreted"]
