"""Checkpoint loading and saving: upstream files in, ``srkernels`` models out (the layouts:
docs/architectures.md §2-§6).

``load_pretrained(arch, path, scale, source="auto")`` reads, unwraps, renames, infers the architecture
options the file implies (depth, width, BAM, RDCAB variant, U, ...), builds the model and loads it strictly.

========================  ==========================================================  =====================
source                    file                                                        archs
========================  ==========================================================  =====================
``official``              raw state_dict ``.pt`` (RCAN_BIX*.pt; EDSR-PyTorch RDN)     rcan, rdn
``super_image``           raw state_dict ``pytorch_model*.pt`` (RCAN keys)            rcan (+bam)
``bam``                   BAM repo RCAN-BAM (RCAN keys, MeanShift not applied)         rcan
``lornatang``             ``.pth.tar`` dict with ``state_dict`` (and ``ema_state_dict``) srcnn, srdensenet, rcan
``basicsr``               ``.pth`` dict with ``params`` / ``params_ema``                rcan
``heejowoo``              raw state_dict ``.pth`` (same keys as ours)                  rdcab
``yjn870``                raw state_dict ``.pth`` (``sfe1``, ``rdbs``, ...)             rdn
``srkernels``             ``.safetensors`` written by ``save_pretrained``              all
========================  ==========================================================  =====================

Whatever the source, the container is unwrapped the same way (``params_ema`` > ``params`` > ``state_dict`` >
``model_state_dict``, or ``state_key=...``), and ``module.`` / ``_orig_mod.`` prefixes (DataParallel, DDP,
AveragedModel, torch.compile) are dropped. Only safe readers are used: ``torch.load(weights_only=True)`` and
safetensors. Any problem is a ``CheckpointError`` (a ValueError) that says what is wrong.
"""
from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import atomic_write
from .._validate import is_int as _is_int
from ..reference.upsample import DIV2K_RGB_MEAN
from ._common import SRModel, check_scale

FORMAT_VERSION = 1
SOURCES = ("auto", "srkernels", "official", "super_image", "bam", "lornatang", "basicsr", "heejowoo", "yjn870")
ARCH_SOURCES: dict[str, tuple[str, ...]] = {
    "srcnn": ("srkernels", "lornatang"),
    "srdensenet": ("srkernels", "lornatang"),
    "rcan": ("srkernels", "official", "super_image", "bam", "lornatang", "basicsr"),
    "rdn": ("srkernels", "official", "yjn870"),
    "rdcab": ("srkernels", "heejowoo"),
}
# the RCAN MeanShift semantics each upstream was trained with (docs/architectures.md §4.7, §5.4, §7 items 1-3)
_RCAN_MEANSHIFT = {
    "official": "official_255", "super_image": "rgb255_on_unit", "bam": "none", "lornatang": "unit",
    "basicsr": "unit",
}
_CONTAINER_KEYS = ("params_ema", "params", "state_dict", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")
_META_KEY = "srkernels"


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not match the model it is loaded into."""


# ----------------------------------------------------------------------------------------------- reading


def _as_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"path is a directory, expected a checkpoint file: {p}")
    return p


def _read_raw(p: Path) -> tuple[Any, dict[str, str]]:
    """The deserialised object and the safetensors metadata ({} for torch files)."""
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:  # the Rust reader raises its own error types
            raise CheckpointError(f"cannot read safetensors file {p} (corrupt or truncated?): {e}") from e
    try:
        return torch.load(p, map_location="cpu", weights_only=True), {}
    except Exception as e:
        text = str(e)
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
        detail = m.group(1) if m else (text.strip().splitlines() or [type(e).__name__])[0]
        detail = detail.strip().split(". ")[0][:200]
        # torch's wording of the weights_only refusal varies between versions ("Unsupported global: GLOBAL
        # x.y", "unsupported GLOBAL x.y", "... is not an allowed global"): match it case-insensitively
        if re.search(r"unsupported\s+global|not\s+an\s+allowed\s+global|add_safe_globals", text, re.I):
            raise CheckpointError(
                f"{p} holds pickled objects other than tensors and plain containers; refusing to unpickle it "
                f"(only weights_only loading is allowed): {detail}"
            ) from e
        raise CheckpointError(
            f"cannot read checkpoint {p} (corrupt, truncated or not a torch file?): {type(e).__name__}: {detail}"
        ) from e


def _unwrap(obj: Any, state_key: str | None, p: Path) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p} does not contain a dict of tensors (found {type(obj).__name__})")
    if state_key is not None:
        if state_key not in obj:
            raise CheckpointError(f"{p} has no entry {state_key!r}; top-level keys: {sorted(map(str, obj))[:20]}")
        obj = obj[state_key]
    elif not all(isinstance(v, Tensor) for v in obj.values()):
        for k in _CONTAINER_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{p}: no state_dict found")
    # AveragedModel's step counter is dropped below, whatever type a trainer stored it as
    bad = [str(k) for k, v in obj.items() if not isinstance(v, Tensor) and str(k) != "n_averaged"]
    if bad:
        raise CheckpointError(
            f"{p}: no state_dict of tensors found (non-tensor entries: {bad[:10]}); pass state_key= to pick one"
        )
    out: dict[str, Tensor] = {}
    for k, v in obj.items():
        k = str(k)
        changed = True
        while changed:
            changed = False
            for pre in _PREFIXES:
                if k.startswith(pre):
                    k, changed = k[len(pre):], True
        if k == "n_averaged":
            continue
        if k in out:
            raise CheckpointError(f"{p}: key {k!r} appears twice once prefixes are removed")
        out[k] = v
    return out


def read_checkpoint(path: str | os.PathLike, *, state_key: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """(flat state_dict with wrapper prefixes removed, srkernels config or {}) of a checkpoint file."""
    p = _as_path(path)
    obj, meta = _read_raw(p)
    sd = _unwrap(obj, state_key, p)
    info: dict = {}
    if _META_KEY in meta:
        try:
            info = json.loads(meta[_META_KEY])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p}: unreadable srkernels metadata: {e}") from e
        if not (isinstance(info, dict) and {"arch", "scale", "config"} <= info.keys()):
            raise CheckpointError(f"{p}: srkernels metadata must have arch, scale and config, got {info!r}")
    elif p.suffix == ".safetensors" and p.with_suffix(".json").is_file():
        # the sidecar save_pretrained writes; a JSON file of another tool (no arch/scale/config) is ignored
        try:
            side = json.loads(p.with_suffix(".json").read_text())
        except (OSError, json.JSONDecodeError):
            side = None
        if isinstance(side, dict) and {"arch", "scale", "config"} <= side.keys():
            info = side
    return sd, info


# ---------------------------------------------------------------------------------------------- key maps


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.fullmatch(k))})


def _rename(sd: Mapping[str, Tensor], rules: list[tuple[str, str]]) -> dict[str, Tensor]:
    """Apply the first matching (regex, replacement) to each key; unmatched keys are kept (strict load flags)."""
    compiled = [(re.compile(a), b) for a, b in rules]
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        for rx, rep in compiled:
            if rx.fullmatch(k):
                k = rx.sub(rep, k)
                break
        out[k] = v
    return out


def _meanshift_pair(mean: Tensor, scale: float = 1.0) -> dict[str, Tensor]:
    """sub_mean/add_mean computing ``(x - mean) * scale`` and ``y / scale + mean`` (mean in input units)."""
    n = mean.numel()
    eye = torch.eye(n, dtype=torch.float32).view(n, n, 1, 1)
    mean = mean.float().reshape(n)
    return {
        "sub_mean.weight": eye * scale,
        "sub_mean.bias": -mean * scale,
        "add_mean.weight": eye / scale,
        "add_mean.bias": mean.clone(),
    }


def _from_lornatang_rcan(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = _rename(sd, [
        (r"conv1\.(weight|bias)", r"head.0.\1"),
        (r"trunk\.(\d+)\.residual_group\.(\d+)\.residual_channel_attention_block\.([02])\.(weight|bias)",
         r"body.\1.body.\2.body.\3.\4"),
        (r"trunk\.(\d+)\.residual_group\.(\d+)\.residual_channel_attention_block\.3\.channel_attention_layer\."
         r"1\.(weight|bias)", r"body.\1.body.\2.body.3.conv_du.0.\3"),
        (r"trunk\.(\d+)\.residual_group\.(\d+)\.residual_channel_attention_block\.3\.channel_attention_layer\."
         r"3\.(weight|bias)", r"body.\1.body.\2.body.3.conv_du.2.\3"),
        (r"trunk\.(\d+)\.residual_group\.(\d+)\.(weight|bias)", r"body.\1.body.\2.\3"),
        (r"upsampling\.(\d+)\.upsample_block\.0\.(weight|bias)", r"tail.0.U\1.\2"),
        (r"conv3\.(weight|bias)", r"tail.1.\1"),
    ])
    # upsampling.i is the i-th conv, which sits at index 2i of our Upsampler
    out = {re.sub(r"^tail\.0\.U(\d+)\.", lambda m: f"tail.0.{2 * int(m.group(1))}.", k): v for k, v in out.items()}
    groups = _count(out, r"body\.(\d+)\.body\.0\.body\.0\.weight")
    out = _rename(out, [(r"conv2\.(weight|bias)", rf"body.{groups}.\1")])
    mean = out.pop("mean", torch.tensor(DIV2K_RGB_MEAN))
    out.update(_meanshift_pair(mean))  # x - mean ... + mean on [0, 1] data
    return out


def _from_basicsr_rcan(sd: Mapping[str, Tensor], img_range: float, rgb_mean) -> dict[str, Tensor]:
    blocks = _count(sd, r"body\.0\.residual_group\.(\d+)\.rcab\.0\.weight")
    groups = _count(sd, r"body\.(\d+)\.conv\.weight")
    out = _rename(sd, [
        (r"conv_first\.(weight|bias)", r"head.0.\1"),
        (r"body\.(\d+)\.residual_group\.(\d+)\.rcab\.([02])\.(weight|bias)", r"body.\1.body.\2.body.\3.\4"),
        (r"body\.(\d+)\.residual_group\.(\d+)\.rcab\.3\.attention\.1\.(weight|bias)",
         r"body.\1.body.\2.body.3.conv_du.0.\3"),
        (r"body\.(\d+)\.residual_group\.(\d+)\.rcab\.3\.attention\.3\.(weight|bias)",
         r"body.\1.body.\2.body.3.conv_du.2.\3"),
        (r"body\.(\d+)\.conv\.(weight|bias)", rf"body.\1.body.{blocks}.\2"),
        (r"conv_after_body\.(weight|bias)", rf"body.{groups}.\1"),
        (r"upsample\.(\d+)\.(weight|bias)", r"tail.0.\1.\2"),
        (r"conv_last\.(weight|bias)", r"tail.1.\1"),
    ])
    # BasicSR computes (x - mean) * img_range ... / img_range + mean with a fixed (non-state) mean: the same
    # affine maps as 1x1 convs, so the model runs on [0, 1] data with the official-range weights
    out.update(_meanshift_pair(torch.tensor(rgb_mean, dtype=torch.float32), float(img_range)))
    return out


def _from_yjn870_rdn(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    ups = _count(sd, r"upscale\.(\d+)\.weight")  # 1 at x2/x3, 2 at x4
    return _rename(sd, [
        (r"sfe([12])\.(weight|bias)", r"SFENet\1.\2"),
        (r"rdbs\.(\d+)\.layers\.(\d+)\.conv\.(weight|bias)", r"RDBs.\1.convs.\2.conv.0.\3"),
        (r"rdbs\.(\d+)\.lff\.(weight|bias)", r"RDBs.\1.LFF.\2"),
        (r"gff\.(\d+)\.(weight|bias)", r"GFF.\1.\2"),
        (r"upscale\.(\d+)\.(weight|bias)", r"UPNet.\1.\2"),
        (r"output\.(weight|bias)", rf"UPNet.{2 * ups}.\1"),
    ])


# ------------------------------------------------------------------------------------ config inference


def _shape(sd: Mapping[str, Tensor], key: str, dim: int) -> int | None:
    t = sd.get(key)
    return int(t.shape[dim]) if t is not None and t.dim() > dim else None


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def infer_config(arch: str, sd: Mapping[str, Tensor], scale: int | None = None) -> dict[str, Any]:
    """The constructor options a native-key state_dict implies (best effort; strict loading checks the rest)."""
    if arch == "srcnn":
        ks = [_shape(sd, k, -1) for k in ("features.0.weight", "map.0.weight", "reconstruction.weight")]
        ch = [_shape(sd, "features.0.weight", 0), _shape(sd, "map.0.weight", 0)]
        return _drop_none(dict(
            kernel_sizes=tuple(ks) if None not in ks else None, channels=tuple(ch) if None not in ch else None,
            in_channels=_shape(sd, "features.0.weight", 1),
        ))
    if arch == "srdensenet":
        kernel = _shape(sd, "upsampling.0.upsample_block.0.weight", -1)
        cfg = dict(
            in_channels=_shape(sd, "conv1.0.weight", 1), num_features=_shape(sd, "conv1.0.weight", 0),
            num_blocks=_count(sd, r"dcb(\d+)\.0\.conv1\.weight") or None,
            num_layers=_count(sd, r"dcb1\.0\.conv(\d+)\.weight") or None,
            growth=_shape(sd, "dcb1.0.conv1.weight", 0), bottleneck=_shape(sd, "conv2.weight", 0),
        )
        # Lornatang's kernel equals the stride (3 at x3, else 2); anything else is an explicit deconv_kernel
        if kernel is not None and scale is not None and kernel != (3 if scale == 3 else 2):
            cfg["deconv_kernel"] = kernel
        return _drop_none(cfg)
    if arch == "rcan":
        nf = _shape(sd, "head.0.weight", 0)
        bam = any(k.endswith(".body.3.ca.fc1.weight") for k in sd)
        hidden = _shape(sd, "body.0.body.0.body.3.ca.fc1.weight" if bam else "body.0.body.0.body.3.conv_du.0.weight", 0)
        return _drop_none(dict(
            n_resgroups=_count(sd, r"body\.(\d+)\.body\.0\.body\.0\.weight") or None,
            n_resblocks=_count(sd, r"body\.0\.body\.(\d+)\.body\.0\.weight") or None,
            n_feats=nf, n_colors=_shape(sd, "head.0.weight", 1), bam=bam,
            reduction=nf // hidden if nf and hidden else None, kernel_size=_shape(sd, "head.0.weight", -1),
        ))
    if arch == "rdn":
        d = _count(sd, r"RDBs\.(\d+)\.LFF\.weight") or None
        c = _count(sd, r"RDBs\.0\.convs\.(\d+)\.conv\.0\.weight") or None
        g = _shape(sd, "RDBs.0.convs.0.conv.0.weight", 0)
        cfg: dict[str, Any] = dict(num_features=_shape(sd, "SFENet1.weight", 0),
                                   n_colors=_shape(sd, "SFENet1.weight", 1),
                                   kernel_size=_shape(sd, "SFENet1.weight", -1))
        if (d, c, g) == (20, 6, 32):
            cfg["config"] = "A"
        else:
            cfg.update(num_blocks=d, num_layers=c, growth=g)
        return _drop_none(cfg)
    if arch == "rdcab":
        if any(".rdcabs." in k for k in sd):
            variant, nl = "ipiu", _count(sd, r"recursive_SR\.0\.rdcabs\.layers\.(\d+)\.conv\.weight")
        elif any(re.fullmatch(r"recursive_SR\.0\.rdbs\.layer\d+_sub\.weight", k) for k in sd):
            variant, nl = "fd_irb", _count(sd, r"recursive_SR\.0\.rdbs\.layer(\d+)\.weight")
        elif "recursive_SR.0.rdbs.layer1.0.weight" in sd:
            variant, nl = "split", _count(sd, r"recursive_SR\.0\.rdbs\.layer(\d+)\.0\.weight")
        else:
            return {}
        g0 = _shape(sd, "sfe1.weight", 0)
        nb = _count(sd, r"recursive_SR\.(\d+)\..*") or None
        gff_in = _shape(sd, "gff.0.weight", 1)
        u = gff_in // (g0 * nb) if gff_in and g0 and nb and gff_in % (g0 * nb) == 0 else None
        growth = _shape(sd, "recursive_SR.0.rdcabs.layers.0.conv.weight", 0) if variant == "ipiu" else g0
        return _drop_none(dict(variant=variant, num_channels=_shape(sd, "sfe1.weight", 1), num_features=g0,
                               growth=growth, num_layers=nl or None, num_blocks=nb, num_recursions=u))
    return {}


# ------------------------------------------------------------------------------ untrusted metadata checks

DEFAULT_MAX_PARAMS = 200_000_000  # ~800 MB of float32; the largest published model here (RCAN) has ~16M
_MAX_INT = 1 << 16  # no constructor option of these architectures is anywhere near this


#: how the messages name the fields of safetensors metadata (``validate_config``'s ``fields``)
METADATA_FIELDS = {"arch": "metadata field arch", "scale": "metadata field scale", "config": "metadata field config"}


def _validate_info(info: Mapping[str, Any], path: object) -> None:
    """Check the fields of srkernels safetensors metadata that ``validate_config`` does not see."""
    fv = info.get("format_version", 1)
    if not _is_int(fv) or fv < 1:
        raise CheckpointError(f"{path}: metadata field format_version must be a positive int, got {fv!r}")
    if fv > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {fv} is newer than this srkernels")


def _check_options(arch: object, scale: object, config: object, path: object,
                   fields: Mapping[str, str]) -> tuple[type[SRModel], dict[str, Any]]:
    """(class, options implied by the name) after checking each field's type and range (CheckpointError)."""
    from . import resolve

    if not isinstance(arch, str):
        raise CheckpointError(f"{path}: {fields['arch']} must be a str, got {arch!r}")
    try:
        cls, implied = resolve(arch)
    except ValueError as e:
        raise CheckpointError(f"{path}: {fields['arch']}: {e}") from None
    if not _is_int(scale):
        raise CheckpointError(f"{path}: {fields['scale']} must be an int, got {scale!r}")
    try:
        check_scale(cls.arch, scale, cls.scales)
    except ValueError as e:
        raise CheckpointError(f"{path}: {fields['scale']}: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: {fields['config']} must be a dict, got {type(config).__name__}")
    params = inspect.signature(cls.__init__).parameters
    accepted = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    accepted -= {"self", "scale", "fused"}
    for k, v in config.items():
        if k not in accepted:
            raise CheckpointError(f"{path}: {fields['config']}.{k} is not an option of {cls.__name__} "
                                  f"(options: {', '.join(sorted(accepted))})")
        items = v if isinstance(v, list) else [v]
        for x in items:
            if not (x is None or isinstance(x, (bool, int, float, str))):
                raise CheckpointError(f"{path}: {fields['config']}.{k} has a value of type "
                                      f"{type(x).__name__}: {v!r}")
            if _is_int(x) and not -_MAX_INT <= x <= _MAX_INT:
                raise CheckpointError(f"{path}: {fields['config']}.{k} = {v!r} is out of range")
    return cls, implied


def _check_before_building(cls: type[SRModel], scale: int, kwargs: Mapping[str, Any], sd: Mapping[str, Tensor],
                           path: object, max_params: int, config_field: str) -> None:
    """Compare the config with the tensors in the file and count the parameters, on the meta device."""
    inferred = infer_config(cls.arch, sd, scale)
    for k, v in inferred.items():
        if k in kwargs and k != "config":
            have = list(kwargs[k]) if isinstance(kwargs[k], (list, tuple)) else kwargs[k]
            want = list(v) if isinstance(v, (list, tuple)) else v
            if have != want:
                raise CheckpointError(
                    f"{path}: {config_field}.{k} = {kwargs[k]!r} does not match the tensors in the file "
                    f"(they imply {v!r})")
    try:
        with torch.device("meta"):
            skeleton = cls(scale=scale, fused=False, **kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid {config_field}: {e}") from None
    n = sum(t.numel() for t in skeleton.state_dict().values())
    if n > max_params:
        shown = json.dumps(dict(kwargs), sort_keys=True, default=str)[:300]
        raise CheckpointError(f"{path}: {config_field} {shown} describes a model of {n:,} parameters, more than "
                              f"max_params={max_params:,} (pass a larger max_params if this is intended)")
    load_state_dict_strict(skeleton, sd, what=str(path), shapes_only=True)


def validate_config(
    arch: object,
    scale: object,
    config: object,
    state_dict: object,
    *,
    path: object,
    overrides: Mapping[str, Any] | None = None,
    max_params: int = DEFAULT_MAX_PARAMS,
    fields: Mapping[str, str] = METADATA_FIELDS,
) -> tuple[type[SRModel], dict[str, Any]]:
    """Check a model description read from an untrusted file before anything is built; returns
    ``(cls, kwargs)`` to build with as ``cls(scale=scale, fused=..., **kwargs)``.

    ``arch``/``scale``/``config`` (constructor options) are checked for type, against the constructor's keywords
    and int ranges; ``state_dict`` must map str to tensors; then the options (plus ``overrides``) are compared
    with the sizes the tensors imply, the parameter count of a model built on the ``meta`` device is checked
    against ``max_params``, and every key and shape against that model. Any problem is one ``CheckpointError``
    naming ``path`` and the field (``fields`` says how the messages name arch, scale and config)."""
    cls, implied = _check_options(arch, scale, config, path, fields)
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state_dict.items()):
        raise CheckpointError(f"{path}: the weights are not a dict of str -> tensor")
    for k, v in implied.items():  # e.g. the alias rcan_bam implies bam=True
        if k in config and config[k] != v:  # type: ignore[operator]
            raise CheckpointError(f"{path}: {fields['config']}.{k} = {config[k]!r} contradicts "  # type: ignore[index]
                                  f"{fields['arch']} {arch!r}, which implies {v!r}")
    kwargs = {**implied, **config, **(overrides or {})}  # type: ignore[dict-item]
    _check_before_building(cls, scale, kwargs, state_dict, path, max_params, fields["config"])  # type: ignore[arg-type]
    return cls, kwargs


# ---------------------------------------------------------------------------------------------- loading


def detect_source(arch: str, sd: Mapping[str, Tensor], path: str | os.PathLike = "") -> str:
    """The upstream a state_dict most likely comes from, judged by its key names (and the file name)."""
    keys = set(sd)
    if arch == "rcan":
        if "conv1.weight" in keys or any(k.startswith("trunk.") for k in keys):
            return "lornatang"
        if "conv_first.weight" in keys:
            return "basicsr"
        # official, super-image and BAM-repo files share their keys; super-image names its files this way
        return "super_image" if Path(path).name.startswith("pytorch_model") else "official"
    if arch == "rdn":
        return "yjn870" if "sfe1.weight" in keys else "official"
    return {"srcnn": "lornatang", "srdensenet": "lornatang", "rdcab": "heejowoo"}[arch]


def load_state_dict_strict(model: nn.Module, sd: Mapping[str, Tensor], *, what: str = "checkpoint",
                           shapes_only: bool = False) -> None:
    """``model.load_state_dict(sd)`` after checking keys and shapes, with one error listing every mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    misshaped = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = "\n    ".join(items[:12]) + (f"\n    ... and {len(items) - 12} more" if len(items) > 12 else "")
            problems.append(f"  {len(items)} {label} key(s):\n    {shown}")
    if problems:
        raise CheckpointError(f"{what} does not match {type(model).__name__}:\n" + "\n".join(problems))
    if not shapes_only:
        model.load_state_dict(sd, strict=True)


def load_pretrained(
    arch: str | None,
    path: str | os.PathLike,
    scale: int | None = None,
    source: str = "auto",
    *,
    fused: bool = True,
    state_key: str | None = None,
    img_range: float = 255.0,
    max_params: int = DEFAULT_MAX_PARAMS,
    **cfg: Any,
) -> SRModel:
    """Build ``arch`` at ``scale`` and load the checkpoint at ``path`` into it (strictly), in eval mode.

    ``source`` picks the upstream layout (see the module docstring; "auto" guesses from the keys). ``cfg``
    overrides the constructor options inferred from the file (e.g. ``meanshift="none"`` for an RCAN-BAM from
    the BAM repo, which ``source="bam"`` also implies). For files written by ``save_pretrained``, ``arch`` and
    ``scale`` may be None; if given they must agree with the file. ``img_range`` is BasicSR RCAN's.

    The srkernels metadata of a file is untrusted: it is checked (field types, the constructor's keywords, the
    options the tensors imply, the parameter count against ``max_params``, every key and shape) on a model
    built on the ``meta`` device, before any real allocation; any problem is a ``CheckpointError``.
    """
    from . import resolve

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    sd, info = read_checkpoint(path, state_key=state_key)
    if info:
        if source not in ("auto", "srkernels"):
            raise ValueError(f"{path} was written by srkernels.save_pretrained; source={source!r} does not apply")
        _validate_info(info, path)
        cls, implied = _check_options(info["arch"], info["scale"], info["config"], path, METADATA_FIELDS)
        if arch is not None and resolve(arch)[0] is not cls:
            raise ValueError(f"arch {arch!r} does not match the checkpoint's arch {info['arch']!r}")
        if scale is not None and scale != info["scale"]:
            raise ValueError(f"scale {scale} does not match the checkpoint's scale {info['scale']}")
        cls, kwargs = validate_config(info["arch"], info["scale"], info["config"], sd, path=path, overrides=cfg,
                                      max_params=max_params)
        model = cls(scale=info["scale"], fused=fused, **kwargs)
        load_state_dict_strict(model, sd, what=str(path))
        return model.eval()

    if arch is None:
        raise ValueError(f"arch is required: {path} has no srkernels config")
    cls, implied = resolve(arch)
    name = cls.arch
    if scale is None:
        raise ValueError(f"scale is required: {path} has no srkernels config")
    if source == "auto":
        source = detect_source(name, sd, path)
    if source == "srkernels":
        raise CheckpointError(f"{path} has no srkernels config (was it written by save_pretrained?)")
    if source not in ARCH_SOURCES[name]:
        raise ValueError(f"source {source!r} is not a known layout for {name}; known: {ARCH_SOURCES[name]}")

    defaults: dict[str, Any] = {}
    if name == "rcan":
        defaults["meanshift"] = _RCAN_MEANSHIFT[source]
        if source == "lornatang":
            sd = _from_lornatang_rcan(sd)
        elif source == "basicsr":
            sd = _from_basicsr_rcan(sd, img_range, cfg.get("rgb_mean", DIV2K_RGB_MEAN))
    elif name == "rdn":
        defaults["rgb_range"] = 255.0 if source == "official" else 1.0
        if source == "yjn870":
            sd = _from_yjn870_rdn(sd)
    inferred = infer_config(name, sd, scale)
    if name == "rdcab":
        # upstream re-runs the whole B-block chain B times; weights trained that way need the same forward
        defaults["b_squared"] = inferred.get("num_blocks", 1) > 1 and inferred.get("variant") != "fd_irb"
    kwargs = {**defaults, **inferred, **implied, **cfg}
    model = cls(scale=scale, fused=fused, **kwargs)
    load_state_dict_strict(model, sd, what=f"{path} (source={source})")
    return model.eval()


# ----------------------------------------------------------------------------------------------- saving


def _is_our_sidecar(path: Path) -> bool:
    try:
        side = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(side, dict) and {"arch", "scale", "config"} <= side.keys()


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model``'s weights to ``path`` (.safetensors, config in its metadata) and ``<stem>.json`` beside it.

    An existing ``path`` (or an existing srkernels sidecar ``<stem>.json``) is a ``FileExistsError`` unless
    ``overwrite``. A ``<stem>.json`` that is not an srkernels sidecar (another tool's file) is never touched:
    the sidecar is then not written (the config is in the safetensors metadata anyway) and a warning says so.
    Each file is written atomically (temp file + rename).
    """
    import warnings

    from safetensors.torch import save as save_bytes

    if not isinstance(model, SRModel):
        raise TypeError(f"model must be an srkernels model (SRModel), got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
    p = Path(path)
    if p.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {p}")
    side = p.with_suffix(".json")
    write_side = True
    if side.exists() and not _is_our_sidecar(side):
        write_side = False
        warnings.warn(f"{side} exists and is not an srkernels sidecar; leaving it alone (the config is stored "
                      f"in {p.name}'s metadata)", stacklevel=2)
    if not overwrite:
        taken = [str(q) for q in (p, side) if q.exists() and (q == p or write_side)]
        if taken:
            raise FileExistsError(f"{' and '.join(taken)} exist(s); pass overwrite=True to replace")
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a directory")
    info = {"format_version": FORMAT_VERSION, "arch": model.arch, "scale": model.scale,
            "input_range": model.input_range, "config": model.config}
    text = json.dumps(info, sort_keys=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    data = save_bytes(tensors, metadata={"format": "pt", _META_KEY: text})
    atomic_write(p, data, overwrite=overwrite)
    if write_side:
        atomic_write(side, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return p
