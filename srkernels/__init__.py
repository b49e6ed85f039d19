"""srkernels: fused kernels and drop-in modules for single-image super-resolution.

``srkernels.ops`` (functional fused ops), ``srkernels.nn`` (fused layers), ``srkernels.reference`` (plain
PyTorch ground truth), ``srkernels.build_info()`` (what was compiled).
"""
from __future__ import annotations

import contextlib
from importlib import metadata as _metadata

import torch

from . import _backend, ops, reference
from . import nn
from ._backend import use_backend

try:
    __version__ = _metadata.version("srkernels")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def build_info() -> dict:
    """What this installation can run: versions, compiled CPU capabilities and the one chosen for this process
    (``SRKERNELS_CPU_CAPABILITY`` forces a lower one), CUDA archs, Triton, per-op backends."""
    native = _backend._C.build_info() if _backend._C is not None else {}
    ops.load_triton()  # the Triton ops are registered on first use; list them anyway
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        # the torch the extension was compiled against (checked equal to the running one at import)
        "torch_built": native.get("torch_built"),
        "cxx11_abi": native.get("cxx11_abi"),
        "compiled": _backend._C is not None,
        "compiled_error": None if _backend._C_ERROR is None else str(_backend._C_ERROR),
        "cpu_capabilities": list(native.get("cpu_capabilities", [])),
        "cpu_capability": _backend._C.cpu_capability() if _backend._C is not None else None,
        "openmp": bool(native.get("openmp", False)),
        "cuda": bool(native.get("cuda", False)),
        "cuda_archs": list(native.get("cuda_archs", [])),
        "compiler": native.get("compiler"),
        "triton": triton_version,
        "triton_interpret": _backend.triton_interpret(),
        "ops": {
            op: {dev: _backend.available(op, dev) for dev in ("cpu", "cuda")} for op in ops.OPS
        },
    }


def cpu_cache_info() -> dict:
    """The cache of large CPU outputs (``limit_bytes``, ``cached_bytes``, ``hits``, ``misses``, ``paused``),
    and under ``"weights"`` the cache of transformed weights (``limit_bytes``, ``bytes``, ``entries``,
    ``hits``, ``misses``).

    The compiled CPU kernels take outputs of 1 MiB and more from a bounded cache of freed blocks instead of
    PyTorch's default allocator, whose large blocks are often fresh mmaps or trimmed heap (a page fault per
    4 KiB on first touch: ~8 ms for 38 MB). The default limit is
    ``SRKERNELS_CPU_CACHE_MB`` (1024); tensors alive in your program are never counted against it.

    ``dense_block`` keeps the Winograd transform of its float32 3x3 weights per weight (up to 1 GiB, least
    recently used out; RDN F(4,3): ~350 MB): an in-place update of a weight misses, and the entries of freed
    weights are released at the next ``dense_block`` call or by ``empty_cpu_cache()`` (``bytes`` and ``entries``:
    what it holds now)."""
    if _backend._C is None:
        return {"limit_bytes": 0, "cached_bytes": 0, "hits": 0, "misses": 0, "paused": False,
                "weights": {"limit_bytes": 0, "bytes": 0, "entries": 0, "hits": 0, "misses": 0}}
    return {**_backend._C.cpu_cache_stats(), "weights": dict(_backend._C.weight_cache_stats())}


def set_cpu_cache_limit(nbytes: int) -> None:
    """Cap the bytes the CPU output cache may hold (0 disables it and frees what it holds)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    if _backend._C is not None:
        _backend._C.set_cpu_cache_limit(nbytes)


def empty_cpu_cache() -> None:
    """Free what the CPU caches hold: the output cache's blocks and every transformed weight of
    ``dense_block`` (its Winograd weights: up to ~350 MB for RDN, held until the next ``dense_block`` call
    after a model is deleted; live weights are transformed again at their next call). Tensors in use are
    unaffected."""
    if _backend._C is not None:
        _backend._C.empty_cpu_cache()


@contextlib.contextmanager
def cpu_cache_paused():
    """Inside the block, large CPU outputs come from PyTorch's default allocator; the cache keeps what it
    holds (unlike ``set_cpu_cache_limit(0)``), so code after the block finds it as before. For timing the
    uncached path next to the cached one."""
    if _backend._C is None:
        yield
        return
    was = _backend._C.cpu_cache_stats()["paused"]
    _backend._C.pause_cpu_cache(True)
    try:
        yield
    finally:
        _backend._C.pause_cpu_cache(was)


__all__ = ["ops", "nn", "reference", "build_info", "use_backend", "cpu_cache_info", "set_cpu_cache_limit",
           "empty_cpu_cache", "cpu_cache_paused", "__version__"]
