"""The model zoo: published SR architectures built from ``srkernels.nn`` (fused) or ``srkernels.reference`` layers.

``build(name, scale, fused=True, **cfg)`` makes one with its published defaults; ``MODELS`` maps names to
classes; ``load_pretrained`` / ``save_pretrained`` (in ``convert``) read upstream checkpoints and write ours.
State-dict keys follow each architecture's reference upstream (see each module's docstring).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ._common import SRModel
from .convert import load_pretrained, save_pretrained
from .rcan import RCAN, chop
from .rdcab import RDCABRecursiveSRNet
from .rdn import RDN
from .srcnn import SRCNN
from .srdensenet import SRDenseNet

MODELS: dict[str, type[SRModel]] = {
    "srcnn": SRCNN,
    "srdensenet": SRDenseNet,
    "rcan": RCAN,
    "rdn": RDN,
    "rdcab": RDCABRecursiveSRNet,
}

# convenience names -> (registry name, fixed config)
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "rcan_bam": ("rcan", {"bam": True}),
    "rdcab_ipiu": ("rdcab", {"variant": "ipiu"}),
    "rdcab_split": ("rdcab", {"variant": "split"}),
    "rdcab_fd_irb": ("rdcab", {"variant": "fd_irb"}),
    "rdcab_recursive_srnet": ("rdcab", {}),
}


def resolve(name: str) -> tuple[type[SRModel], dict[str, Any]]:
    """(model class, config implied by the name) for a registry name or alias (case and '-' insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key in MODELS:
        return MODELS[key], {}
    if key in ALIASES:
        base, cfg = ALIASES[key]
        return MODELS[base], dict(cfg)
    raise ValueError(f"unknown model name {name!r}; known: {', '.join([*MODELS, *ALIASES])}")


def build(name: str, scale: int, fused: bool = True, **cfg: Any) -> nn.Module:
    """``MODELS[name](scale=scale, fused=fused, **cfg)``; e.g. ``build("rcan", 4, bam=True)``."""
    cls, implied = resolve(name)
    for k, v in implied.items():
        if k in cfg and cfg[k] != v:
            raise ValueError(f"{name!r} implies {k}={v!r}, got {k}={cfg[k]!r}")
    return cls(scale=scale, fused=fused, **{**implied, **cfg})


__all__ = [
    "MODELS", "ALIASES", "build", "resolve", "load_pretrained", "save_pretrained", "chop",
    "SRModel", "SRCNN", "SRDenseNet", "RCAN", "RDN", "RDCABRecursiveSRNet",
]
