"""Timing that holds up on a shared, noisy machine: variants interleaved round by round in one process,
min and median reported, a copy bandwidth measured in the same run as the yardstick for GB/s claims.

Used by ``srkernels bench`` and by the suites under ``benchmarks/``.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

try:
    import resource
except ImportError:  # not on Unix: no fault counts
    resource = None


@dataclass
class Timing:
    name: str
    times_ms: list[float] = field(default_factory=list)
    # minor page faults per call, one entry per sample (CPU): says whether a variant's fresh allocations are
    # paying first-touch faults, which decides most "default allocation" comparisons on CPU
    faults: list[float] = field(default_factory=list)

    @property
    def min(self) -> float:
        return min(self.times_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def faults_per_call(self) -> float | None:
        return statistics.median(self.faults) if self.faults else None


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def interleaved(fns: dict[str, Callable[[], object]], *, device: torch.device | str = "cpu", rounds: int = 15,
                warmup: int = 2, min_round_ms: float = 20.0) -> dict[str, Timing]:
    """Time each callable ``rounds`` times, cycling through all of them every round (so load spikes hit all
    variants alike). Each sample repeats the call enough times to last about ``min_round_ms``."""
    device = torch.device(device)
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        _sync(device)
        once = max(_time_once(fn, device, 1), 1e-3)
        inner[name] = max(1, int(min_round_ms / once))
    out = {name: Timing(name) for name in fns}
    count_faults = device.type == "cpu" and resource is not None
    for r in range(rounds):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))  # alternate order: no fixed position bias
        for name in names:
            f0 = _minor_faults() if count_faults else 0
            out[name].times_ms.append(_time_once(fns[name], device, inner[name]))
            if count_faults:
                out[name].faults.append((_minor_faults() - f0) / inner[name])
    return out


def copy_bandwidth(nbytes: int = 256 << 20, *, device: torch.device | str = "cpu", rounds: int = 10) -> float:
    """GB/s of ``dst.copy_(src)`` counting read + write, with ``nbytes`` per buffer (preallocated)."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src)}, device=device, rounds=rounds)["copy"]
    return 2 * nbytes / (t.min * 1e-3) / 1e9


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# glibc malloc settings (GLIBC_TUNABLES, read at process start) that pin where large CPU tensors come from.
# Under glibc's default dynamic thresholds a freed 10 MB block either stays in the heap (the next allocation
# reuses it: no faults) or goes back to the kernel (the next one page-faults on first touch), depending on the
# process's allocation history, so a "default allocation" speed-up can differ 4x between two identical runs.
MALLOC_REGIMES = {  # name -> GLIBC_TUNABLES malloc settings
    "default": "",  # glibc's dynamic thresholds: either regime below, by history
    "fresh": "glibc.malloc.mmap_threshold=131072",
    "reuse": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295",
}
MALLOC_REGIME_NOTES = {
    "fresh": "every block of 128 KiB or more is mapped afresh and unmapped on free, so each default allocation "
             "page-faults",
    "reuse": "no mapped blocks and no heap trimming: freed memory is reused, so no default allocation page-faults",
}


def _tunables(env: dict) -> tuple[list[str], list[str]]:
    """GLIBC_TUNABLES of ``env`` split into (malloc settings, the others)."""
    items = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    return [t for t in items if t.startswith("glibc.malloc.")], [t for t in items if not t.startswith("glibc.malloc.")]


def malloc_env(regime: str, env: dict | None = None) -> dict:
    """A copy of ``env`` (default: os.environ) whose GLIBC_TUNABLES puts a new process in ``regime``."""
    if regime not in MALLOC_REGIMES:
        raise ValueError(f"regime must be one of {sorted(MALLOC_REGIMES)}, got {regime!r}")
    env = dict(os.environ if env is None else env)
    tunables = ":".join(_tunables(env)[1] + ([MALLOC_REGIMES[regime]] if MALLOC_REGIMES[regime] else []))
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def malloc_regime(env: dict | None = None) -> str:
    """The regime ``env`` (default: this process's environment) pins, or "custom" for other malloc tunables."""
    pinned = ":".join(_tunables(os.environ if env is None else env)[0])
    return next((name for name, value in MALLOC_REGIMES.items() if value == pinned), "custom")


def saved_bytes(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``module(*inputs)``, parameters
    excluded: the activation memory of training, measured directly rather than through wall-clock or RSS."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(storages.values())


def describe_machine() -> dict:
    import platform

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "malloc": malloc_regime()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
