"""The single rule that picks the implementation of an op for a call: compiled, triton or reference.

- CPU tensors: the compiled CPU kernel; the reference when the extension is not built (warned once).
- CUDA tensors: the compiled CUDA kernel or the Triton kernel, in the order of ``CUDA_PREFERENCE``
  (set per op from its benchmark), then the reference.
- ``SRKERNELS_BACKEND=reference|compiled|triton`` (or ``with srkernels.use_backend(...)``) forces one and
  raises if it cannot serve the call.
- Triton serves CPU tensors only under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading
import warnings

import torch

from ._util import triton_interpret

BACKENDS = ("compiled", "triton", "reference")
# Without a GPU here, neither CUDA backend has been timed against the other; compiled comes first because
# it has no JIT warm-up. Add an op (srkernels.ops.OPS names them) when a GPU benchmark says otherwise.
CUDA_PREFERENCE: dict[str, tuple[str, str]] = {}

REBUILD_HINT = ("Rebuild it against this torch, in the srkernels source tree: "
                "pip install --no-build-isolation --force-reinstall --no-deps .  (or: bash scripts/setup.sh)")


class TorchMismatchError(ImportError):
    """srkernels._C was compiled against another torch (version or C++ ABI) than the one running."""


def build_config() -> dict | None:
    """The torch the installed srkernels._C was compiled against, from ``_build_config.py`` beside it
    (written by the build; pure Python, so it is read without loading _C): ``{"torch_version", "cxx11_abi"}``,
    or None when _C is not built or the build predates the record."""
    spec = importlib.util.find_spec("srkernels._C")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "_build_config.py")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    ns: dict = {}
    exec(compile(text, path, "exec"), ns)  # two assignments, written by CMakeLists.txt
    return {"torch_version": str(ns["TORCH_VERSION"]), "cxx11_abi": bool(ns["CXX11_ABI"])}


def check_torch(built_version: str, built_abi: bool) -> None:
    """Raise TorchMismatchError unless the running torch is the one _C was compiled against.

    Must match: the whole version string, release and local tag (``2.14.1+cu130`` is neither ``2.14.2+cu130``
    nor ``2.14.1+cpu``: the C++ ABI of torch extensions is not kept across releases, patch releases included,
    and the local tag selects another build of libtorch, with other libraries), and
    ``torch._C._GLIBCXX_USE_CXX11_ABI``."""
    running, abi = torch.__version__, bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    if running == built_version and abi == built_abi:
        return
    what = (f"torch {built_version}" if abi == built_abi else
            f"torch {built_version} with _GLIBCXX_USE_CXX11_ABI={int(built_abi)}")
    now = f"torch {running}" if abi == built_abi else f"torch {running} with _GLIBCXX_USE_CXX11_ABI={int(abi)}"
    raise TorchMismatchError(
        f"srkernels: the compiled extension srkernels._C was built against {what}, but this Python runs {now}; "
        f"a C++ extension only works with the torch it was compiled against. {REBUILD_HINT}")


def _load_native():
    """srkernels._C (loading it registers the torch.ops.srkernels kernels), or None with the reason.

    Not built: the reference serves CPU calls (warned per op, below). Built against another torch than the
    running one (recorded in _build_config.py beside it, read before loading _C): TorchMismatchError, raised
    out of ``import srkernels``. Built but otherwise unloadable (missing libcudart): warned once here, with
    the reason."""
    if importlib.util.find_spec("srkernels._C") is None:
        return None, ImportError("srkernels._C is not built (run scripts/setup.sh or pip install --no-build-isolation .)")
    recorded = build_config()
    if recorded is not None:  # before importing _C: a mismatched torch fails there with undefined symbols
        check_torch(recorded["torch_version"], recorded["cxx11_abi"])
    try:
        module = importlib.import_module("srkernels._C")
    except ImportError as e:
        warnings.warn(f"srkernels: the compiled extension srkernels._C failed to load ({e}); every op runs its "
                      f"PyTorch reference. {REBUILD_HINT}", RuntimeWarning, stacklevel=3)
        return None, e
    native = module.build_info()
    if "torch_built" in native:  # also when _build_config.py is missing (copied .so, older install)
        check_torch(native["torch_built"], native["cxx11_abi"])
    module.cpu_capability()  # a bad SRKERNELS_CPU_CAPABILITY is an error at import, not at the first op
    return module, None


CPU_CACHE_MB_MAX = 1 << 30  # 1 PiB: far above any machine, far below where C++'s ``MB << 20`` overflows size_t


def _check_cpu_cache_env() -> None:
    """Validate ``SRKERNELS_CPU_CACHE_MB`` before _C reads it (csrc/runtime/output_cache.cpp parses it with
    ``atol``: "abc" or "" silently became 0, i.e. no cache, "1e3" became 1, and a huge value overflowed the
    byte limit). Accepted: a non-negative decimal integer <= CPU_CACHE_MB_MAX, surrounding whitespace allowed --
    exactly the values ``atol`` reads as themselves, so the C++ sees the same number (0 disables the cache)."""
    raw = os.environ.get("SRKERNELS_CPU_CACHE_MB")
    if raw is None:
        return
    v = raw.strip()
    if not (v.isascii() and v.isdigit()) or int(v) > CPU_CACHE_MB_MAX:
        raise ValueError(f"SRKERNELS_CPU_CACHE_MB must be a non-negative integer number of MiB <= {CPU_CACHE_MB_MAX} "
                         f"(0 disables the CPU output cache; unset for the default 1024), got {raw!r}")


_check_cpu_cache_env()
_C, _C_ERROR = _load_native()

_local = threading.local()
_warned: set[str] = set()
@functools.cache  # fixed once _C is loaded; the dispatcher lookup costs ~25 us per call beside a large kernel
def has_compiled(op: str, device_type: str) -> bool:
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    try:
        return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"srkernels::{op}", key)
    except RuntimeError:  # an extension built from older sources lacks the schema
        return False


def has_triton(op: str, device_type: str) -> bool:
    if device_type == "cpu" and not triton_interpret():
        return False
    if device_type not in ("cpu", "cuda"):
        return False
    # registered by srkernels.ops.load_triton(), which the ops call before choosing
    return hasattr(torch.ops.srkernels_triton, op)


def available(op: str, device_type: str) -> list[str]:
    """Backends that can serve ``op`` on ``device_type`` in this process, best first."""
    found = []
    order = ("compiled", "triton") if device_type == "cpu" else CUDA_PREFERENCE.get(op, ("compiled", "triton"))
    for name in order:
        if (has_compiled if name == "compiled" else has_triton)(op, device_type):
            found.append(name)
    return found + ["reference"]


def forced() -> str | None:
    name = getattr(_local, "forced", None) or os.environ.get("SRKERNELS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"SRKERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force one backend for calls made in this thread inside the block (``None`` = the default rule)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


@torch.compiler.assume_constant_result  # decided at trace time; torch.compile sees only the chosen op
def choose(op: str, dev: str) -> str:
    """The backend for ``op`` on tensors of device type ``dev`` (``"cpu"``, ``"cuda"``)."""
    want = forced()
    if want is not None:
        if want != "reference" and want not in available(op, dev):
            why = (
                f"the extension is not built ({_C_ERROR})" if want == "compiled" and _C is None
                else "triton is unavailable (not installed, or CPU tensors without TRITON_INTERPRET=1)"
                if want == "triton" else f"no {dev} kernel was compiled"
            )
            raise RuntimeError(f"srkernels backend {want!r} cannot run {op} on {dev}: {why}")
        return want
    best = available(op, dev)[0]
    if best == "reference" and dev == "cpu" and op not in _warned:
        _warned.add(op)
        why = f"the extension is not built: {_C_ERROR}" if _C is None else "the extension has no CPU kernel for it"
        warnings.warn(
            f"srkernels: no compiled kernel for {op} on CPU ({why}); using the PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return best


def op_handle(backend: str, op: str):
    """The dispatcher op of a backend (``torch.ops.srkernels.<op>`` or ``torch.ops.srkernels_triton.<op>``)."""
    ns = torch.ops.srkernels if backend == "compiled" else torch.ops.srkernels_triton
    return getattr(ns, op)
