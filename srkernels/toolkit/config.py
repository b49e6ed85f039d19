"""Training/evaluation configs: a YAML file (or dict) checked against a schema, with defaults filled in.

A config has five sections; every key is checked, so a typo is an error naming the key rather than a
silently ignored setting::

    name: rcan_x4                 # run name; output_dir defaults to runs/<name>
    seed: 0
    device: auto                  # auto | cpu | cuda
    output_dir: null
    model:  {name: rcan, scale: 4, fused: true, args: {...}, init_from: null}
    data:   {train: {...}, val: [{...}], patch_size: 48, batch_size: 16, augment: true, repeat: 1, num_workers: 2,
             cache_images: false}   # cache_images: keep decoded HR/LR pairs in memory (small sets only)
    train:  {iterations, loss, optimizer: {...}, scheduler: {...}, amp, channels_last, grad_clip, ema,
             val_every, ckpt_every, log_every, keep_checkpoints, find_unused_parameters}
    eval:   {y_coeffs: bt601, quantize: false, self_ensemble: false, chop: false, tile: null, overlap: 16}

A dataset entry (``data.train``, each of ``data.val``) is one of
``{hr_dir, lr_dir?}`` (a folder of HR images; LR made on the fly with MATLAB bicubic when ``lr_dir`` is
absent), ``{root, set, split?}`` (``srkernels.toolkit.data.find_dataset_dirs``) or ``{skimage: [names]}`` (photographs
bundled with scikit-image, see ``sample_data``), plus optional ``name``, ``limit`` (first N images) and
``cache_dir`` (where on-the-fly LR images are cached).

``overrides`` are ``"dotted.key=value"`` strings; the value is parsed as YAML (``train.iterations=10``,
``model.args={n_resgroups: 1}``).
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .._validate import is_int as _is_int

LOSSES = ("l1", "mse")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "step", "multistep")
AMP_MODES = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
Y_COEFFS = ("bt601", "typo64738")

DEFAULTS: dict[str, Any] = {
    "name": None,
    "seed": 0,
    "device": "auto",
    "output_dir": None,
    "model": {"name": None, "scale": None, "fused": True, "args": {}, "init_from": None},
    "data": {
        "train": None,
        "val": [],
        "patch_size": 48,
        "batch_size": 16,
        "augment": True,
        "repeat": 1,
        "num_workers": 2,
        "cache_images": False,
    },
    "train": {
        "iterations": None,
        "loss": "l1",
        "optimizer": {
            "name": "adam", "lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
            "momentum": 0.9, "lr_mult": {},
        },
        "scheduler": {"name": "none", "step_size": None, "milestones": [], "gamma": 0.5},
        "amp": "none",
        "channels_last": False,
        "grad_clip": None,
        "ema": None,
        "val_every": 1000,
        "ckpt_every": 1000,
        "log_every": 100,
        "keep_checkpoints": 2,
        "find_unused_parameters": False,
    },
    "eval": {
        "y_coeffs": "bt601", "quantize": False, "self_ensemble": False, "chop": False, "tile": None,
        "overlap": 16,
    },
}

_DATASET_KEYS = {"hr_dir", "lr_dir", "root", "set", "split", "skimage", "name", "limit", "cache_dir"}
# settings that may change when a run is resumed: they do not alter the optimisation trajectory, or (fused vs
# reference layers, memory format) only its floating-point rounding; a resume across such a change is exact
# in the maths, not bit for bit
RESUMABLE_CHANGES = {
    "train.iterations", "train.val_every", "train.ckpt_every", "train.log_every", "train.keep_checkpoints",
    "data.num_workers", "data.val", "eval", "output_dir", "device", "model.fused", "train.channels_last",
}


class ConfigError(ValueError):
    """A config is malformed; the message names the offending key (and file)."""


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(dict(defaults))
    for k, v in given.items():
        key = f"{where}.{k}" if where else str(k)
        if k not in defaults:
            raise ConfigError(f"unknown config key {key!r}; known keys here: {', '.join(sorted(defaults))}")
        d = defaults[k]
        # "args" / "lr_mult" are free-form dicts (model constructor keywords, parameter-name -> multiplier)
        if isinstance(d, dict) and d and isinstance(v, Mapping) and k not in ("args", "lr_mult"):
            out[k] = _merge(d, v, key)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = cfg
    for i, p in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])} is not a section")
        node = node.setdefault(p, {})
    if not isinstance(node, dict):
        raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:-1])} is not a section")
    node[parts[-1]] = value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where (its own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    out = []
    for o in overrides:
        if not isinstance(o, str) or "=" not in o:
            raise ConfigError(f"override must look like key.sub=value, got {o!r}")
        k, v = o.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"override {o!r} has an empty key")
        try:
            val = yaml.safe_load(v) if v.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {o!r}: value is not valid YAML: {_yaml_problem(e)}") from None
        out.append((k, val))
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(raw).__name__}")
    if raw.get("name") is None:
        raw["name"] = p.stem
    return raw


def load_config(
    source: str | os.PathLike | Mapping[str, Any], overrides: Iterable[str] = (), *, check_data: bool = True
) -> dict[str, Any]:
    """A complete, validated config from a YAML path or a dict, with ``overrides`` applied."""
    if isinstance(source, Mapping):
        raw, origin = copy.deepcopy(dict(source)), "config"
    elif isinstance(source, (str, os.PathLike)):
        raw, origin = read_yaml(source), str(source)
    else:
        raise TypeError(f"config must be a path or a mapping, got {type(source).__name__}")
    for k, v in parse_overrides(overrides):
        _set_dotted(raw, k, v)
    try:
        cfg = _merge(DEFAULTS, raw, "")
        validate(cfg, check_data=check_data)
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    return cfg


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_dataset(d: Any, key: str) -> None:
    _need(isinstance(d, Mapping), f"{key} must be a mapping (hr_dir / root+set / skimage), got {d!r}")
    unknown = set(d) - _DATASET_KEYS
    _need(not unknown, f"unknown key(s) {sorted(unknown)} in {key}; known: {sorted(_DATASET_KEYS)}")
    kinds = [k for k in ("hr_dir", "root", "skimage") if d.get(k) is not None]
    _need(len(kinds) == 1, f"{key} needs exactly one of hr_dir, root (with set) or skimage, got {kinds or 'none'}")
    if d.get("root") is not None:
        _need(isinstance(d.get("set"), str), f"{key}.set (e.g. DIV2K, Set5) is required with {key}.root")
    if d.get("skimage") is not None:
        names = d["skimage"]
        _need(isinstance(names, list) and names and all(isinstance(n, str) for n in names),
              f"{key}.skimage must be a non-empty list of image names, got {names!r}")
    if d.get("limit") is not None:
        _need(_is_int(d["limit"]) and d["limit"] > 0, f"{key}.limit must be a positive int, got {d['limit']!r}")


def validate(cfg: dict[str, Any], *, check_data: bool = True) -> None:
    m, d, t, e = cfg["model"], cfg["data"], cfg["train"], cfg["eval"]
    _need(cfg["name"] is None or isinstance(cfg["name"], str), f"name must be a string, got {cfg['name']!r}")
    _need(_is_int(cfg["seed"]) and cfg["seed"] >= 0, f"seed must be an int >= 0, got {cfg['seed']!r}")
    _need(cfg["device"] in DEVICES, f"device must be one of {DEVICES}, got {cfg['device']!r}")
    _need(isinstance(m["name"], str), f"model.name is required (e.g. rcan), got {m['name']!r}")
    _need(_is_int(m["scale"]) and m["scale"] >= 1, f"model.scale must be a positive int, got {m['scale']!r}")
    _need(isinstance(m["fused"], bool), f"model.fused must be true or false, got {m['fused']!r}")
    _need(isinstance(m["args"], Mapping), f"model.args must be a mapping, got {m['args']!r}")
    for k in ("scale", "fused"):
        _need(k not in m["args"], f"model.args must not contain {k!r}; use model.{k}")
    if check_data:
        _check_dataset(d["train"], "data.train")
    elif d["train"] is not None:
        _check_dataset(d["train"], "data.train")
    vals = d["val"]
    if isinstance(vals, Mapping):
        d["val"] = vals = [vals]
    _need(isinstance(vals, list), f"data.val must be a list of datasets, got {vals!r}")
    for i, v in enumerate(vals):
        _check_dataset(v, f"data.val[{i}]")
    for k in ("patch_size", "batch_size", "repeat"):
        _need(_is_int(d[k]) and d[k] > 0, f"data.{k} must be a positive int, got {d[k]!r}")
    _need(_is_int(d["num_workers"]) and d["num_workers"] >= 0, f"data.num_workers must be an int >= 0, got {d['num_workers']!r}")
    for k in ("augment", "cache_images"):
        _need(isinstance(d[k], bool), f"data.{k} must be true or false, got {d[k]!r}")
    _need(_is_int(t["iterations"]) and t["iterations"] > 0,
          f"train.iterations must be a positive int, got {t['iterations']!r}")
    _need(t["loss"] in LOSSES, f"train.loss must be one of {LOSSES}, got {t['loss']!r}")
    o = t["optimizer"]
    _need(o["name"] in OPTIMIZERS, f"train.optimizer.name must be one of {OPTIMIZERS}, got {o['name']!r}")
    _need(_is_num(o["lr"]) and o["lr"] > 0, f"train.optimizer.lr must be > 0, got {o['lr']!r}")
    _need(isinstance(o["betas"], list) and len(o["betas"]) == 2 and all(_is_num(b) and 0 <= b < 1 for b in o["betas"]),
          f"train.optimizer.betas must be two numbers in [0, 1), got {o['betas']!r}")
    for k in ("eps", "weight_decay", "momentum"):
        _need(_is_num(o[k]) and o[k] >= 0, f"train.optimizer.{k} must be a number >= 0, got {o[k]!r}")
    _need(isinstance(o["lr_mult"], Mapping) and all(_is_num(v) and v >= 0 for v in o["lr_mult"].values()),
          f"train.optimizer.lr_mult must map parameter-name prefixes to multipliers, got {o['lr_mult']!r}")
    s = t["scheduler"]
    _need(s["name"] in SCHEDULERS, f"train.scheduler.name must be one of {SCHEDULERS}, got {s['name']!r}")
    _need(_is_num(s["gamma"]) and s["gamma"] > 0, f"train.scheduler.gamma must be > 0, got {s['gamma']!r}")
    if s["name"] == "step":
        _need(_is_int(s["step_size"]) and s["step_size"] > 0,
              f"train.scheduler.step_size must be a positive int for name: step, got {s['step_size']!r}")
    if s["name"] == "multistep":
        ms = s["milestones"]
        _need(isinstance(ms, list) and ms and all(_is_int(v) and v > 0 for v in ms) and ms == sorted(ms),
              f"train.scheduler.milestones must be increasing positive ints, got {ms!r}")
    _need(t["amp"] in AMP_MODES, f"train.amp must be one of {AMP_MODES}, got {t['amp']!r}")
    _need(isinstance(t["channels_last"], bool), "train.channels_last must be true or false")
    _need(t["grad_clip"] is None or (_is_num(t["grad_clip"]) and t["grad_clip"] > 0),
          f"train.grad_clip must be null or > 0, got {t['grad_clip']!r}")
    _need(t["ema"] is None or (_is_num(t["ema"]) and 0 < t["ema"] < 1),
          f"train.ema must be null or a decay in (0, 1), got {t['ema']!r}")
    for k in ("val_every", "ckpt_every", "log_every", "keep_checkpoints"):
        _need(_is_int(t[k]) and t[k] > 0, f"train.{k} must be a positive int, got {t[k]!r}")
    _need(isinstance(t["find_unused_parameters"], bool), "train.find_unused_parameters must be true or false")
    _need(e["y_coeffs"] in Y_COEFFS, f"eval.y_coeffs must be one of {Y_COEFFS}, got {e['y_coeffs']!r}")
    for k in ("quantize", "self_ensemble", "chop"):
        _need(isinstance(e[k], bool), f"eval.{k} must be true or false, got {e[k]!r}")
    _need(e["tile"] is None or (_is_int(e["tile"]) and e["tile"] > 0), f"eval.tile must be null or > 0, got {e['tile']!r}")
    _need(_is_int(e["overlap"]) and e["overlap"] >= 0, f"eval.overlap must be an int >= 0, got {e['overlap']!r}")


def flat(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and k not in ("args", "lr_mult") and v:
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def resume_differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose change would alter a resumed run's trajectory (everything but RESUMABLE_CHANGES)."""
    a, b = flat(saved), flat(new)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES):
            continue
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return diffs


def dump_yaml(cfg: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=None)
