"""Training checkpoints: atomic writes, rotation that always keeps the last good file, RNG states, loading.

A run directory holds ``checkpoints/iter_XXXXXXXX.pt``. Each is written to a temporary file in the same
directory, fsynced, then ``os.replace``d into place, so a kill at any moment leaves either the old set of
files or the old set plus one complete new file. Older files are deleted only after the new one is in
place, and the newest ``keep`` are kept. :func:`load_latest` walks back from the newest file and skips
(with a warning) any that cannot be read.

A checkpoint is a dict of tensors and plain containers (readable with ``torch.load(weights_only=True)``):
``format``, ``config``, ``iteration``, ``epoch``, ``step_in_epoch``, ``world_size``, ``params`` (model
state_dict), ``params_ema`` (if EMA), ``optimizer``, ``scheduler``, ``scaler``, ``rng`` (one entry per rank:
torch, cuda, numpy, python), ``best``. The ``params``/``params_ema`` names are BasicSR's, so
``srkernels.models.load_pretrained`` also reads these files (preferring the EMA weights).
"""
from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .._io import atomic_write

FORMAT = "srkernels-train"
VERSION = 1
_NAME = re.compile(r"iter_(\d+)\.pt")


# ---------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may touch, as tensors / plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn("checkpoint has CUDA RNG states for a different GPU count; not restored")
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    # weights_only loading turns tuples into lists; random.setstate needs the tuples back
    random.setstate((py[0], tuple(py[1]), py[2]))


# ---------------------------------------------------------------------------------------------- files


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through ``srkernels._io.atomic_write`` (temp file + fsync + ``os.replace``), then an fsync
    of the directory so that the rename itself survives a crash."""
    return atomic_write(path, lambda f: torch.save(obj, f), sync_dir=True)


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, path) of the run's checkpoint files, newest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(state: Mapping[str, Any], run_dir: str | os.PathLike, iteration: int, keep: int) -> Path:
    """Write ``state`` as ``iter_<iteration>.pt`` atomically, then drop all but the newest ``keep`` files."""
    path = atomic_torch_save(dict(state), checkpoint_dir(run_dir) / f"iter_{iteration:08d}.pt")
    for it, p in list_checkpoints(run_dir)[max(1, keep):]:
        try:
            p.unlink()
        except OSError:
            pass
    # stale temp files of a killed writer
    for p in checkpoint_dir(run_dir).glob(".iter_*.tmp"):
        try:
            if p.stat().st_mtime < path.stat().st_mtime - 60:
                p.unlink()
        except OSError:
            pass
    return path


def verify_integrity(path: str | os.PathLike) -> None:
    """Check every member of a torch zip checkpoint against its stored CRC-32 (a ``CheckpointError``, which is a
    ValueError, names the first damaged one): ``torch.load`` itself does not, so a flipped bit in a tensor would
    load silently."""
    import zipfile

    from ..models.convert import CheckpointError

    p = Path(path)
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {p} (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if bad is not None:
        raise CheckpointError(f"checkpoint {p} is corrupt: {bad} does not match its CRC-32")


# the types of the fields a resume reads (an untrusted file could hold anything there)
_STATE_FIELDS = {"config": dict, "iteration": int, "epoch": int, "step_in_epoch": int, "params": dict,
                 "optimizer": dict, "rng": list}


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """The training checkpoint at ``path``: CRC-checked, loaded with ``weights_only``, its fields' types
    checked (a ``CheckpointError``, which is a ValueError, says what is wrong)."""
    from ..models.convert import CheckpointError

    p = Path(path)
    verify_integrity(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {p} (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{p} is not an srkernels training checkpoint")
    version = obj.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{p}: field version must be an int, got {version!r}")
    if version > VERSION:
        raise ValueError(f"{p}: checkpoint version {obj['version']} is newer than this srkernels")
    for k, kind in _STATE_FIELDS.items():  # what resume reads; the model's own fields: model_from_checkpoint
        if k in obj and (isinstance(obj[k], bool) or not isinstance(obj[k], kind)):
            raise CheckpointError(f"{p}: field {k} must be a {kind.__name__}, got {type(obj.get(k)).__name__}")
    return obj


def load_latest(run_dir: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint of ``run_dir`` (None if there is none); unreadable ones are skipped."""
    for _, p in list_checkpoints(run_dir):
        try:
            return read_checkpoint_file(p), p
        except ValueError as e:
            warnings.warn(f"skipping checkpoint: {e}")
    return None


# ---------------------------------------------------------------------------------------------- models


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    if p.is_dir():
        return bool(list_checkpoints(p))
    return p.suffix == ".pt" and _NAME.fullmatch(p.name) is not None


# how CheckpointErrors name the fields of a training checkpoint that describe its model
_MODEL_FIELDS = {"arch": "field config.model.name", "scale": "field config.model.scale",
                 "config": "field config.model.args"}


def model_from_checkpoint(ckpt: Mapping[str, Any], *, fused: bool = True, ema: bool = True, path: object = "",
                          max_params: int | None = None) -> nn.Module:
    """The model of a training checkpoint (EMA weights when present and ``ema``), in eval mode.

    The file is untrusted like any weights file: its model description is checked as ``load_pretrained`` checks
    safetensors metadata (``srkernels.models.convert.validate_config``: types, the constructor's options, the
    tensors' sizes, ``max_params``) before anything is built; a problem is a ``CheckpointError`` naming it."""
    from ..models.convert import DEFAULT_MAX_PARAMS, CheckpointError, load_state_dict_strict, validate_config

    where = path or "training checkpoint"
    cfg = ckpt.get("config")
    m = cfg.get("model") if isinstance(cfg, Mapping) else None
    if not isinstance(m, Mapping):
        raise CheckpointError(f"{where}: field config.model must be a dict, got {type(m).__name__}")
    for k in ("name", "scale", "args"):
        if k not in m:
            raise CheckpointError(f"{where}: field config.model.{k} is missing")
    key = "params_ema" if ema and ckpt.get("params_ema") is not None else "params"
    sd = ckpt.get(key)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{where}: field {key} must be a dict of tensors, got {type(sd).__name__}")
    cls, kwargs = validate_config(m["name"], m["scale"], m["args"], sd, path=where, fields=_MODEL_FIELDS,
                                  max_params=DEFAULT_MAX_PARAMS if max_params is None else max_params)
    model = cls(scale=m["scale"], fused=fused, **kwargs)
    load_state_dict_strict(model, sd, what=str(where))
    return model.eval()


def load_model(
    path: str | os.PathLike,
    model: str | None = None,
    scale: int | None = None,
    *,
    source: str = "auto",
    fused: bool = True,
    max_params: int | None = None,
    **cfg: Any,
) -> nn.Module:
    """Any weights the library knows, as a model in eval mode: a training run directory (its newest good
    checkpoint), a training checkpoint ``iter_*.pt``, a ``save_pretrained`` safetensors file, or an
    upstream checkpoint (``srkernels.models.load_pretrained``: needs ``model`` and ``scale``).

    Every file is untrusted: a zip-format ``.pt`` is checked against its CRC-32s before ``torch.load`` (a
    damaged file is a ``CheckpointError``, never loaded silently), and the model a file describes is checked
    before it is built (``max_params``: see ``load_pretrained``)."""
    from ..models import load_pretrained, resolve

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"weights path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights not found: {p}")
    ckpt = None
    if p.is_dir():
        got = load_latest(p)
        if got is None:
            raise ValueError(f"{p} is a directory without readable training checkpoints")
        ckpt, where = got
    elif p.suffix == ".pt":
        import zipfile

        if zipfile.is_zipfile(p):  # what resume does: the CRCs first, torch.load does not check them
            verify_integrity(p)
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:
            obj = None  # not ours or unreadable: load_pretrained gives the precise error
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            ckpt, where = obj, p
    limit = {} if max_params is None else {"max_params": max_params}
    if ckpt is None:
        return load_pretrained(model, p, scale, source, fused=fused, **limit, **cfg)
    net = model_from_checkpoint(ckpt, fused=fused, path=where, max_params=max_params)
    if model is not None and resolve(model)[0] is not type(net):
        raise ValueError(f"--model {model!r} does not match the checkpoint's model {ckpt['config']['model']['name']!r}")
    if scale is not None and scale != net.scale:
        raise ValueError(f"scale {scale} does not match the checkpoint's scale {net.scale}")
    return net
