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


def export_modules(package: str, path, namespace: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """Import every module of ``package`` (``path``: its ``__path__``) whose name does not start with "_" and is
    not in ``skip``, copy the names in its ``__all__`` into ``namespace`` and return them: a package
    ``__init__`` re-exports its modules' public names without an import line per module to keep by hand."""
    import importlib
    import pkgutil

    names: list[str] = []
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in skip:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        namespace.update({n: getattr(module, n) for n in module.__all__})
        names += module.__all__
    return names
