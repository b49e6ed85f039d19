"""Evaluation: PSNR/SSIM of models (and of plain bicubic) on folders of images, and the Markdown table.

Convention (``srkernels.toolkit.metrics``): Y channel, ``crop_border = scale``, float SR clamped to [0, 1] (rounded
to uint8 levels with ``quantize=True``, as official RCAN), BT.601 Y (or the ``typo64738`` Y of yjn870 /
HEEJOWOO / super-image). Y-only models (SRCNN, SRDenseNet) are measured on the Y they predict. The bicubic
column is MATLAB ``imresize(lr, s)`` (float) measured the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .data import PairedImageFolder, find_dataset_dirs, imresize
from .metrics import psnr, rgb_to_y, ssim
from .inference import Upscaler

__all__ = ["DatasetSpec", "SetResult", "resolve_dataset", "evaluate", "evaluate_bicubic", "markdown_table"]


@dataclass
class DatasetSpec:
    """A set of test images: HR folder (+ optional LR folder) and a display name."""

    name: str
    hr_dir: Path
    lr_dir: Path | None = None
    limit: int | None = None
    cache_dir: Path | None = None


@dataclass
class SetResult:
    name: str
    scale: int
    psnr: float
    ssim: float
    per_image: list[tuple[str, float, float]] = field(default_factory=list)


def resolve_dataset(entry: Mapping[str, Any] | str | os.PathLike, scale: int, *, cache_root: str | os.PathLike | None = None,
                    split: str = "valid") -> DatasetSpec:
    """A config dataset entry (see ``toolkit.config``) or a plain HR folder path -> :class:`DatasetSpec`.
    ``skimage:name1,name2`` (string) or ``{skimage: [...]}`` writes the bundled photographs to ``cache_root``."""
    from . import sample_data

    if isinstance(entry, (str, os.PathLike)):
        s = str(entry)
        if s.startswith("skimage:"):
            names = [n for n in s[len("skimage:"):].split(",") if n]
            entry = {"skimage": names, "name": "skimage"}
        else:
            p = Path(s)
            if not p.is_dir():
                raise ValueError(f"dataset folder not found: {p}")
            entry = {"hr_dir": str(p), "name": p.name}
    entry = dict(entry)
    limit = entry.get("limit")
    cache = Path(entry["cache_dir"]) if entry.get("cache_dir") else None
    if entry.get("skimage"):
        root = Path(cache_root) if cache_root is not None else Path(os.environ.get("TMPDIR", "/tmp")) / "srkernels-data"
        hr = sample_data.folder_for(list(entry["skimage"]), root)
        return DatasetSpec(entry.get("name") or "skimage", hr, None, limit, cache)
    if entry.get("root") is not None:
        hr, lr = find_dataset_dirs(entry["root"], entry["set"], scale, split=entry.get("split") or split)
        return DatasetSpec(entry.get("name") or entry["set"], Path(hr), None if lr is None else Path(lr), limit, cache)
    hr = Path(entry["hr_dir"])
    if not hr.is_dir():
        raise ValueError(f"hr_dir is not a directory: {hr}")
    lr = Path(entry["lr_dir"]) if entry.get("lr_dir") else None
    return DatasetSpec(entry.get("name") or hr.name, hr, lr, limit, cache)


def _dataset(spec: DatasetSpec, scale: int) -> PairedImageFolder:
    return PairedImageFolder(spec.hr_dir, scale, lr_dir=spec.lr_dir, cache_dir=spec.cache_dir)


def _measure(sr: Tensor, hr: Tensor, scale: int, coeffs: str, quantize: bool) -> tuple[float, float]:
    kw = dict(crop_border=scale, coeffs=coeffs, data_range=1.0, quantize=quantize)
    return float(psnr(sr, hr, **kw)), float(ssim(sr, hr, **kw))


def _summary(name: str, scale: int, rows: list[tuple[str, float, float]]) -> SetResult:
    if not rows:
        raise ValueError(f"dataset {name!r} has no images")
    p = sum(r[1] for r in rows) / len(rows)
    s = sum(r[2] for r in rows) / len(rows)
    return SetResult(name, scale, p, s, rows)


def _items(spec: DatasetSpec, scale: int):
    ds = _dataset(spec, scale)
    n = len(ds) if spec.limit is None else min(spec.limit, len(ds))
    for i in range(n):
        lr, hr = ds[i]
        yield ds.names[i], lr, hr


@torch.no_grad()
def evaluate(
    model: nn.Module | Upscaler,
    datasets: Sequence[DatasetSpec],
    *,
    y_coeffs: str = "bt601",
    quantize: bool = False,
    progress: bool = False,
    **upscaler_kw: Any,
) -> list[SetResult]:
    """Mean (and per-image) PSNR/SSIM of ``model`` on each dataset, at the model's scale."""
    up = model if isinstance(model, Upscaler) else Upscaler(model, y_coeffs=y_coeffs, **upscaler_kw)
    net = up.model
    was_training = net.training
    net.eval()
    results = []
    try:
        for spec in datasets:
            rows = []
            items = list(_items(spec, up.scale))
            it = items
            if progress:
                from tqdm import tqdm

                it = tqdm(items, desc=f"{spec.name} x{up.scale}", leave=False)
            for name, lr, hr in it:
                sr = up.native(lr).clamp(0, 1).cpu()
                if up.y_only:
                    hr = rgb_to_y(hr, coeffs=y_coeffs, data_range=1.0)
                p, s = _measure(sr, hr, up.scale, y_coeffs, quantize)
                rows.append((name, p, s))
            results.append(_summary(spec.name, up.scale, rows))
    finally:
        net.train(was_training)
    return results


def evaluate_bicubic(
    datasets: Sequence[DatasetSpec], scale: int, *, y_coeffs: str = "bt601", quantize: bool = False
) -> list[SetResult]:
    """The bicubic baseline: MATLAB ``imresize(lr, scale)`` (float), clamped, measured like a model."""
    out = []
    for spec in datasets:
        rows = []
        for name, lr, hr in _items(spec, scale):
            sr = imresize(lr, scale).clamp(0, 1)
            rows.append((name, *_measure(sr, hr, scale, y_coeffs, quantize)))
        out.append(_summary(spec.name, scale, rows))
    return out


def _cell(r: SetResult | None, digits: int) -> str:
    return "—" if r is None else f"{r.psnr:.{digits}f} / {r.ssim:.4f}"


def markdown_table(
    columns: Mapping[str, Iterable[SetResult]], bicubic: Iterable[SetResult] | None = None, *, digits: int = 2
) -> str:
    """One row per (set, scale), a bicubic column, one column per model; cells are ``PSNR / SSIM``."""
    index: dict[tuple[str, int], dict[str, SetResult]] = {}
    order: list[tuple[str, int]] = []

    def add(col: str, results: Iterable[SetResult]) -> None:
        for r in results:
            key = (r.name, r.scale)
            if key not in index:
                index[key] = {}
                order.append(key)
            index[key][col] = r

    bic_col = "bicubic"
    if bicubic is not None:
        add(bic_col, bicubic)
    for col, res in columns.items():
        add(col, res)
    cols = ([bic_col] if bicubic is not None else []) + list(columns)
    lines = ["| set | scale | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for key in order:
        cells = [_cell(index[key].get(c), digits) for c in cols]
        lines.append(f"| {key[0]} | x{key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
