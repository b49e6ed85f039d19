"""The training loop: config in, run directory out (see ``toolkit.config`` for the config, ``python/README.md``
for the standard recipes).

What a run does, per iteration: one batch of aligned LR/HR patches -> model (optionally under bf16/fp16
autocast, channels_last) -> L1 or MSE loss -> backward (GradScaler for fp16 on GPU) -> optional gradient-norm
clipping -> Adam/SGD step -> per-iteration LR scheduler step -> optional EMA update. Every ``val_every``
iterations rank 0 measures PSNR/SSIM on the validation sets (Y, crop = scale; EMA weights when EMA is on) and
keeps ``best.safetensors``; every ``ckpt_every`` iterations a full checkpoint is written (``checkpoint``).
Logs: ``train.csv`` / ``val.csv`` (and TensorBoard when ``torch.utils.tensorboard`` imports), a tqdm bar.

Determinism and resume. A batch is a pure function of (seed, epoch, position in the epoch): the sampler is a
``DistributedSampler`` (shuffled with ``seed + epoch``) that can start mid-epoch, and each item's crop and
flip come from ``(seed, epoch, index)`` (``PairedImageFolder``), not from worker RNGs. A checkpoint stores the
model, optimiser, scheduler, scaler, EMA, every RNG and the (epoch, step) position, so ``resume=True``
continues with exactly the batches and state the uninterrupted run would have had: on the same machine and
thread count the weights come out bit-identical.

DDP: launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), gloo on CPU, nccl on GPU.
``data.batch_size`` is the global batch, split evenly over ranks; only rank 0 writes files.
"""
from __future__ import annotations

import copy
import csv
import io
import math
import os
import random
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .._io import atomic_write
from ..models import save_pretrained
from .data import PairedImageFolder
from . import checkpoint as ckpt_io
from .config import ConfigError, dump_yaml, load_config, read_yaml, resume_differences
from .evaluate import DatasetSpec, evaluate, resolve_dataset

__all__ = ["train", "TrainResult", "EMA", "ResumableDistributedSampler", "RepeatedDataset"]


# ---------------------------------------------------------------------------------------------- data


class RepeatedDataset(Dataset):
    """``repeat`` passes over a PairedImageFolder per epoch; item ``(j, epoch)`` is image ``j % n`` with crop
    and flip drawn from ``(seed, epoch * repeat + j // n, j % n)``, so every pass gets fresh patches and the
    item depends on nothing but its key (workers may be persistent, resume is exact)."""

    def __init__(self, ds: PairedImageFolder, repeat: int) -> None:
        self.ds, self.repeat = ds, repeat

    def __len__(self) -> int:
        return len(self.ds) * self.repeat

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        j, epoch = key
        n = len(self.ds)
        self.ds.set_epoch(epoch * self.repeat + j // n)
        return self.ds[j % n]


class CachedImageFolder(PairedImageFolder):
    """PairedImageFolder that keeps each decoded (LR, HR) pair in memory (per worker): small training sets
    of large photographs are otherwise dominated by PNG decoding. Crops and flips are unchanged."""

    def _pair(self, index: int):
        cache = self.__dict__.setdefault("_pairs", {})
        if index not in cache:
            cache[index] = super()._pair(index)
        return cache[index]


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler yielding ``(index, epoch)`` keys that can start ``start`` samples into the epoch."""

    def __init__(self, dataset: Dataset, **kw: Any) -> None:
        super().__init__(dataset, **kw)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self):
        idx = list(super().__iter__())[self.start:]
        return iter([(i, self.epoch) for i in idx])

    def __len__(self) -> int:
        return self.num_samples - self.start


# ---------------------------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's floating-point state (buffers of other dtypes are copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.dtype.is_floating_point:
                s.lerp_(v.detach().to(s.dtype), 1.0 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        missing = set(self.shadow) ^ set(sd)
        if missing:
            raise ValueError(f"EMA state does not match the model (keys {sorted(missing)[:5]})")
        for k, v in sd.items():
            self.shadow[k].copy_(v)

    def model(self, model: nn.Module) -> nn.Module:
        m = copy.deepcopy(model)
        m.load_state_dict(self.shadow)
        return m


# ---------------------------------------------------------------------------------------------- helpers


@dataclass
class TrainResult:
    run_dir: Path
    iteration: int
    best: dict[str, Any] = field(default_factory=dict)
    last_val: list = field(default_factory=list)
    stopped_early: bool = False


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_dist(device_pref: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if "RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} but RANK is not set: launch multi-process runs with torchrun")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    here = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        elif "GLOO_SOCKET_IFNAME" not in os.environ and int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == world:
            # every rank on this machine: gloo's pairs go over loopback. By default gloo binds the address the
            # hostname resolves to, which a sandbox or firewall may not let a process reach from itself.
            lo = next((name for _, name in socket.if_nameindex() if name in ("lo", "lo0")), None)
            if lo is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = lo
        dist.init_process_group("nccl" if use_cuda else "gloo")
        here = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local, here)


def _device(pref: str, d: _Dist) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for but CUDA is not available")
        return torch.device("cuda", d.local_rank if d.world > 1 else torch.cuda.current_device())
    return torch.device("cpu")


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if amp == "fp16" and device.type == "cpu":
        raise ValueError("train.amp: fp16 needs a GPU (CPU autocast supports bf16 only); use amp: bf16")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _param_groups(model: nn.Module, opt_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Parameters grouped by ``lr_mult`` prefix (e.g. SRCNN's 0.1x learning rate on ``reconstruction``)."""
    mults = dict(opt_cfg["lr_mult"])
    groups: dict[float, list[nn.Parameter]] = {}
    used = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = 1.0
        for prefix, m in mults.items():
            if name == prefix or name.startswith(prefix + "."):
                mult = float(m)
                used.add(prefix)
                break
        groups.setdefault(mult, []).append(p)
    unused = set(mults) - used
    if unused:
        raise ConfigError(f"train.optimizer.lr_mult: no parameter names start with {sorted(unused)}")
    return [{"params": ps, "lr": opt_cfg["lr"] * m} for m, ps in groups.items()]


def _optimizer(model: nn.Module, o: Mapping[str, Any]) -> torch.optim.Optimizer:
    groups = _param_groups(model, o)
    if o["name"] == "sgd":
        return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
    cls = torch.optim.AdamW if o["name"] == "adamw" else torch.optim.Adam
    return cls(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])


def _scheduler(opt: torch.optim.Optimizer, s: Mapping[str, Any]):
    if s["name"] == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s["step_size"], gamma=s["gamma"])
    if s["name"] == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=s["milestones"], gamma=s["gamma"])
    return None


def _init_from(model: nn.Module, path: str) -> list[str]:
    """Copy every tensor of ``path`` whose key and shape match ``model`` (RCAN x3/x4/x8 start from x2);
    returns the keys left at their fresh initialisation."""
    src = ckpt_io.load_model(path).state_dict()
    own = model.state_dict()
    take = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    if not take:
        raise ValueError(f"model.init_from {path}: no tensor matches the model")
    model.load_state_dict(take, strict=False)
    return sorted(set(own) - set(take))


class _CsvLog:
    def __init__(self, path: Path, fields: list[str], enabled: bool) -> None:
        self.path, self.fields, self.enabled = path, fields, enabled

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop rows the killed run logged after its last checkpoint (they are re-done)."""
        if not (self.enabled and self.path.is_file()):
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= iteration]
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.fields)
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.path, buf.getvalue().encode())

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            if new:
                w.writeheader()
            w.writerow(row)


def _tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional; the CSV logs always exist
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _resolve_train_data(cfg: Mapping[str, Any], run_dir: Path, scale: int, y_only: bool) -> PairedImageFolder:
    d = cfg["data"]
    spec = resolve_dataset(d["train"], scale, cache_root=run_dir / "data", split="train")
    cls = CachedImageFolder if d["cache_images"] else PairedImageFolder
    ds = cls(spec.hr_dir, scale, lr_dir=spec.lr_dir, patch_size=d["patch_size"],
                           augment=d["augment"], seed=cfg["seed"], cache_dir=spec.cache_dir, y_only=y_only)
    if spec.limit is not None and spec.limit < len(ds):
        ds.hr_files = ds.hr_files[: spec.limit]
        if ds.lr_files is not None:
            ds.lr_files = ds.lr_files[: spec.limit]
    return ds


def _prepare_run_dir(cfg: dict[str, Any], run_dir: Path, resume: bool, d: _Dist) -> dict[str, Any]:
    saved = run_dir / "config.yaml"
    if resume:
        if not saved.is_file():
            raise ValueError(f"cannot resume: {run_dir} has no config.yaml (not a training run directory)")
        return read_yaml(saved)
    taken = saved.exists() or bool(ckpt_io.list_checkpoints(run_dir))
    if d.world > 1:
        # every rank looks before rank 0 writes, and all agree: a rank that looked after rank 0's config.yaml
        # appeared would refuse the fresh run that the others start
        seen: list[Any] = [None] * d.world
        dist.all_gather_object(seen, taken)
        taken = any(seen)
    if taken:
        raise ValueError(
            f"output directory {run_dir} already holds a training run; pass --resume to continue it, "
            "or choose another --output-dir (nothing is overwritten)"
        )
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(saved, dump_yaml(cfg).encode())
    return cfg


# ---------------------------------------------------------------------------------------------- the loop


def train(
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    overrides: Iterable[str] = (),
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train from ``config`` (YAML path or dict). ``resume=True`` continues the run in ``output_dir`` (its
    saved config, plus ``overrides``; a given ``config`` must agree with it except for the schedule-neutral
    keys of ``config.RESUMABLE_CHANGES``). ``stop_after``: return after that iteration (checkpoint written),
    as if the run had been stopped there."""
    overrides = list(overrides)
    if config is None and not resume:
        raise ValueError("a config is required unless resuming")
    cfg = load_config(config, overrides) if config is not None else None
    if output_dir is None:
        if cfg is None:
            raise ValueError("output_dir is required to resume without a config")
        output_dir = cfg["output_dir"] or Path("runs") / (cfg["name"] or "run")
    run_dir = Path(output_dir)
    d = _setup_dist(cfg["device"] if cfg else "auto")
    try:
        if resume:
            saved_raw = _prepare_run_dir(cfg or {}, run_dir, True, d)
            saved = load_config(saved_raw, check_data=True)
            if cfg is not None:
                diffs = resume_differences(saved, cfg)
                if diffs:
                    raise ConfigError("the config differs from the run being resumed in keys that change the "
                                      "training trajectory:\n  " + "\n  ".join(diffs))
                run_cfg = cfg
            else:
                run_cfg = load_config(saved_raw, overrides)
                diffs = resume_differences(saved, run_cfg)
                if diffs:
                    raise ConfigError("overrides change the training trajectory of the resumed run:\n  "
                                      + "\n  ".join(diffs))
        else:
            run_cfg = _prepare_run_dir(cfg, run_dir, False, d)  # type: ignore[arg-type]
        if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
            raise ValueError(f"stop_after must be a positive int, got {stop_after!r}")
        try:
            trainer = _Trainer(run_cfg, run_dir, d, resume, stop_after, progress)
        except BaseException:
            # a fresh run that fails while setting up (a data folder not found, a bad model option) has done
            # nothing yet: drop its config.yaml, so that the corrected command starts it without --resume
            if not resume and d.main and not ckpt_io.list_checkpoints(run_dir):
                (run_dir / "config.yaml").unlink(missing_ok=True)
            raise
        return trainer.run()
    finally:
        if d.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


class _Trainer:
    def __init__(self, cfg: dict[str, Any], run_dir: Path, d: _Dist, resume: bool, stop_after: int | None,
                 progress: bool) -> None:
        from ..models import build

        self.cfg, self.run_dir, self.d, self.stop_after, self.progress = cfg, run_dir, d, stop_after, progress
        if resume and not ckpt_io.list_checkpoints(run_dir):
            # a run stopped before its first checkpoint: nothing to lose, so start it over (files that exist but
            # cannot be read still stop the resume, in _restore)
            warnings.warn(f"{run_dir} has no checkpoint yet (the run stopped before its first one); "
                          "starting it from iteration 0 with its saved config")
            resume, self.started_over = False, True
        else:
            self.started_over = False
        m, data, t = cfg["model"], cfg["data"], cfg["train"]
        self.device = _device(cfg["device"], d)
        self.amp_dtype = _autocast_dtype(t["amp"], self.device)
        self.scale = m["scale"]

        # same init everywhere (DDP also broadcasts rank 0's parameters)
        torch.manual_seed(cfg["seed"])
        np.random.seed(cfg["seed"])
        random.seed(cfg["seed"])
        model = build(m["name"], m["scale"], fused=m["fused"], **m["args"])
        if m["init_from"] and not resume:
            fresh = _init_from(model, m["init_from"])
            if d.main and fresh:
                print(f"init_from {m['init_from']}: {len(fresh)} tensors keep their fresh init", file=sys.stderr)
        self.fmt = torch.channels_last if t["channels_last"] else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.fmt)
        self.y_only = model.in_channels == 1
        self.pre_upsample = getattr(model, "arch", "") == "srcnn"
        self.border = int(getattr(model, "border", 0))
        self.input_range = float(model.input_range)

        if d.world > 1:
            find_unused = t["find_unused_parameters"] or getattr(model, "meanshift", None) == "none"
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused)
        else:
            self.ddp = self.model
        self.opt = _optimizer(self.model, t["optimizer"])
        self.sched = _scheduler(self.opt, t["scheduler"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = EMA(self.model, t["ema"]) if t["ema"] else None
        self.loss_fn = F.l1_loss if t["loss"] == "l1" else F.mse_loss

        # data
        if data["batch_size"] % d.world:
            raise ValueError(f"data.batch_size ({data['batch_size']}) must be divisible by the {d.world} processes")
        self.per_rank = data["batch_size"] // d.world
        if d.main:
            base = _resolve_train_data(cfg, run_dir, self.scale, self.y_only)
        if d.world > 1:
            dist.barrier()  # rank 0 materialises bundled photos first; the others then find them
        if not d.main:
            base = _resolve_train_data(cfg, run_dir, self.scale, self.y_only)
        self.train_set = RepeatedDataset(base, data["repeat"])
        self.sampler = ResumableDistributedSampler(self.train_set, num_replicas=d.world, rank=d.rank, shuffle=True,
                                                   seed=cfg["seed"], drop_last=False)
        self.steps_per_epoch = self.sampler.num_samples // self.per_rank
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(self.train_set)} items ({len(base)} images x repeat "
                f"{data['repeat']}), fewer than one batch of {data['batch_size']}; raise data.repeat"
            )
        self.val_specs: list[DatasetSpec] = []
        if d.main:
            self.val_specs = [resolve_dataset(v, self.scale, cache_root=run_dir / "data") for v in data["val"]]

        # state
        self.iteration = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best: dict[str, Any] = {"psnr": -math.inf, "iteration": 0}
        self.loss_window: tuple[Tensor, int] = (torch.zeros(()), 0)  # (sum, count) since the last log row
        if resume:
            self._restore()
        self.train_log = _CsvLog(run_dir / "train.csv", ["iteration", "epoch", "loss", "lr", "it_per_s", "elapsed_s"],
                                 d.main)
        self.val_log = _CsvLog(run_dir / "val.csv", ["iteration", "set", "psnr", "ssim"], d.main)
        if resume or self.started_over:  # rows logged after the checkpoint resumed from are re-done
            self.train_log.truncate_after(self.iteration)
            self.val_log.truncate_after(self.iteration)
        self.tb = _tensorboard(run_dir, d.main)

    # -- checkpoints -------------------------------------------------------------------------------------

    def _gather_rng(self) -> list[dict[str, Any]]:
        mine = ckpt_io.rng_state()
        if self.d.world == 1:
            return [mine]
        out: list[Any] = [None] * self.d.world
        dist.all_gather_object(out, mine)
        return out

    def _state(self) -> dict[str, Any]:
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "config": self.cfg,
            "iteration": self.iteration, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "world_size": self.d.world,
            "params": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "params_ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": self._gather_rng(),
            "best": dict(self.best),
            "loss_window": {"sum": self.loss_window[0].detach().cpu().clone(), "n": int(self.loss_window[1])},
        }

    def _save(self) -> None:
        state = self._state()  # every rank takes part (RNG gather)
        if self.d.main:
            ckpt_io.save_checkpoint(state, self.run_dir, self.iteration, self.cfg["train"]["keep_checkpoints"])
        if self.d.world > 1:
            dist.barrier()

    def _restore(self) -> None:
        got = ckpt_io.load_latest(self.run_dir)
        if got is None:
            raise ValueError(f"cannot resume: no readable checkpoint in {ckpt_io.checkpoint_dir(self.run_dir)}")
        ck, path = got
        missing = [k for k in ("params", "optimizer", "iteration", "epoch", "step_in_epoch", "rng") if k not in ck]
        if missing:
            raise ValueError(f"cannot resume from {path}: it has no {', '.join(missing)}")
        from ..models.convert import load_state_dict_strict

        load_state_dict_strict(self.model, ck["params"], what=str(path))
        self.model.to(memory_format=self.fmt)
        self.opt.load_state_dict(ck["optimizer"])
        if self.sched is not None and ck.get("scheduler") is not None:
            self.sched.load_state_dict(ck["scheduler"])
        if self.scaler.is_enabled() and ck.get("scaler") is not None:
            self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None:
            if ck.get("params_ema") is None:
                raise ValueError(f"{path} has no EMA state but train.ema is set")
            self.ema.load_state_dict(ck["params_ema"])
        self.iteration, self.epoch, self.step_in_epoch = ck["iteration"], ck["epoch"], ck["step_in_epoch"]
        self.best = dict(ck.get("best") or self.best)
        lw = ck.get("loss_window")
        if isinstance(lw, dict) and isinstance(lw.get("sum"), Tensor) and isinstance(lw.get("n"), int):
            self.loss_window = (lw["sum"].float().reshape(()), lw["n"])
        rngs = ck["rng"]
        if ck.get("world_size") == self.d.world and len(rngs) == self.d.world:
            ckpt_io.set_rng_state(rngs[self.d.rank])
        else:
            warnings.warn(f"{path} was written by {ck.get('world_size')} process(es), this run has {self.d.world}: "
                          "the data order is re-split and RNG states are taken from rank 0")
            ckpt_io.set_rng_state(rngs[0])
            if ck.get("world_size") != self.d.world:
                # the position is kept in global batches; each rank's share of an epoch changes
                self.step_in_epoch = min(self.step_in_epoch, self.steps_per_epoch)
        if self.d.main:
            print(f"resumed from {path} at iteration {self.iteration}", file=sys.stderr)

    # -- one step ------------------------------------------------------------------------------------------

    def _inputs(self, lr: Tensor, hr: Tensor) -> tuple[Tensor, Tensor]:
        lr = lr.to(self.device, non_blocking=True)
        hr = hr.to(self.device, non_blocking=True)
        if self.pre_upsample:
            from .data import imresize

            lr = imresize(lr, self.scale)
            if self.border:  # paper-style "valid" SRCNN: the ground truth loses the border the convs eat
                b = self.border
                hr = hr[..., b:-b, b:-b]
        if self.input_range != 1.0:
            lr = lr * self.input_range
        return lr.contiguous(memory_format=self.fmt), hr

    def _step(self, lr: Tensor, hr: Tensor) -> Tensor:
        t = self.cfg["train"]
        x, target = self._inputs(lr, hr)
        self.opt.zero_grad(set_to_none=True)
        if self.amp_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                out = self.ddp(x)
        else:
            out = self.ddp(x)
        out = out.float()
        if self.input_range != 1.0:
            out = out / self.input_range
        loss = self.loss_fn(out, target)
        self.scaler.scale(loss).backward()
        if t["grad_clip"]:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), t["grad_clip"])
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.sched is not None:
            self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()

    # -- validation ----------------------------------------------------------------------------------------

    def _validate(self) -> list:
        if not (self.d.main and self.val_specs):
            return []
        e = self.cfg["eval"]
        net = self.ema.model(self.model) if self.ema else self.model
        res = evaluate(net, self.val_specs, y_coeffs=e["y_coeffs"], quantize=e["quantize"],
                       ensemble=e["self_ensemble"], chop=e["chop"], tile=e["tile"], overlap=e["overlap"])
        for r in res:
            self.val_log.write({"iteration": self.iteration, "set": r.name, "psnr": f"{r.psnr:.4f}",
                                "ssim": f"{r.ssim:.6f}"})
            if self.tb:
                self.tb.add_scalar(f"val/{r.name}/psnr", r.psnr, self.iteration)
                self.tb.add_scalar(f"val/{r.name}/ssim", r.ssim, self.iteration)
        mean_psnr = sum(r.psnr for r in res) / len(res)
        if mean_psnr > self.best["psnr"]:
            self.best = {"psnr": mean_psnr, "iteration": self.iteration}
            save_pretrained(net, self.run_dir / "best.safetensors", overwrite=True)
        return res

    # -- loop ----------------------------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        data = self.cfg["data"]
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.step_in_epoch * self.per_rank)
        return DataLoader(self.train_set, batch_size=self.per_rank, sampler=self.sampler,
                          num_workers=data["num_workers"], drop_last=True,
                          pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    def run(self) -> TrainResult:
        t = self.cfg["train"]
        total = t["iterations"]
        stop = min(total, self.stop_after) if self.stop_after else total
        last_val: list = []
        bar = None
        if self.progress and self.d.main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.iteration, desc=self.cfg["name"] or "train", dynamic_ncols=True,
                       file=sys.stderr)
        self.ddp.train()
        t0 = time.perf_counter()
        t_log, it_log = t0, self.iteration
        # the running average of the loss since the last log row: restored from the checkpoint on resume, so
        # the rows logged after a resume are the ones an uninterrupted run logs
        loss_sum, n_loss = self.loss_window[0].to(self.device), self.loss_window[1]
        try:
            while self.iteration < stop:
                for lr, hr in self._loader():
                    loss = self._step(lr, hr)
                    self.iteration += 1
                    self.step_in_epoch += 1
                    if self.step_in_epoch >= self.steps_per_epoch:
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    loss_sum += loss
                    n_loss += 1
                    if bar is not None:
                        bar.update(1)
                    it = self.iteration
                    if it % t["log_every"] == 0 or it == total:
                        mean = loss_sum.item() / n_loss
                        if not math.isfinite(mean):
                            raise FloatingPointError(f"training loss is {mean} at iteration {it}")
                        now = time.perf_counter()
                        lr_now = self.opt.param_groups[0]["lr"]
                        self.train_log.write({"iteration": it, "epoch": self.epoch, "loss": f"{mean:.6g}",
                                              "lr": f"{lr_now:.6g}", "it_per_s": f"{(it - it_log) / (now - t_log):.3f}",
                                              "elapsed_s": f"{now - t0:.1f}"})
                        if self.tb:
                            self.tb.add_scalar("train/loss", mean, it)
                            self.tb.add_scalar("train/lr", lr_now, it)
                        if bar is not None:
                            bar.set_postfix(loss=f"{mean:.4g}", lr=f"{lr_now:.2g}")
                        loss_sum.zero_()
                        n_loss, t_log, it_log = 0, now, it
                    if it % t["val_every"] == 0 or it == total:
                        last_val = self._validate() or last_val
                        if self.d.world > 1:
                            dist.barrier()
                        if last_val and bar is not None:
                            bar.write(f"[{it}] " + ", ".join(f"{r.name} {r.psnr:.2f} dB / {r.ssim:.4f}" for r in last_val))
                    if it % t["ckpt_every"] == 0 or it == stop:
                        self.loss_window = (loss_sum.detach().clone(), n_loss)
                        self._save()
                    if it >= stop:
                        break
            if self.iteration >= total and self.d.main:
                final = self.ema.model(self.model) if self.ema else self.model
                save_pretrained(final, self.run_dir / "model.safetensors", overwrite=True)
        finally:
            if bar is not None:
                bar.close()
            if self.tb:
                self.tb.close()
        return TrainResult(self.run_dir, self.iteration, dict(self.best), last_val,
                           stopped_early=self.iteration < total)
