"""Argument checks shared by every layer (reference layers, models, checkpoint loading, the toolkit); imports
nothing of srkernels, so any module may use it."""
from __future__ import annotations

import numbers

import torch

__all__ = ["is_int", "positive_int", "int_at_least", "DTYPES"]

# the ``--dtype`` choices of the command-line tools (``srkernels bench``, ``upscale``, ``eval``)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never a size here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an int > 0, else a ValueError naming ``name``."""
    if not is_int(value) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value  # type: ignore[return-value]


def int_at_least(name: str, value: object, minimum: int) -> int:
    """``int(value)`` if it is an integer (Python or NumPy, not bool) >= ``minimum``, else a ValueError naming
    ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)
