"""Derived-weight caches kept on a module (packed, relaid or cast copies of its parameters), shared by the fused
layers (``conv.py``, ``dense.py``, ``srdensenet.py``, ``_amp.py``)."""
from __future__ import annotations

from torch import nn


class PackCache:
    """Holds derived weights (oneDNN-packed, relaid) on a module: ``key`` says which weights they came from,
    ``data`` what was built. A module copy or pickle gets an empty cache (packed oneDNN tensors have no storage
    to copy, and a copy rebuilds on first use anyway)."""

    __slots__ = ("key", "data")

    def __init__(self, key=None, data=None) -> None:
        self.key, self.data = key, data

    def __deepcopy__(self, memo) -> "PackCache":
        return PackCache()

    def __copy__(self) -> "PackCache":
        return PackCache()

    def __reduce__(self):
        return (PackCache, ())


def _module_cache(m: nn.Module, attr: str, key, build):
    """``build()`` cached on ``m`` under ``attr`` while ``key`` stays the same."""
    c = m.__dict__.get(attr)
    if c is None or c.key != key:
        c = PackCache(key, build())
        m.__dict__[attr] = c
    return c.data
