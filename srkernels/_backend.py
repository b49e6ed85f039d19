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

BACKENDS = ("compiled", "triton", "reference")
OPS = ("channel_attention", "balanced_attention", "pixel_shuffle", "dense_block")
# Without a GPU here, neither CUDA backend has been timed against the other; compiled comes first because
# it has no JIT warm-up. Change per op when a GPU benchmark says otherwise.
CUDA_PREFERENCE = {op: ("compiled", "triton") for op in OPS}

def _load_native():
    """srkernels._C (loading it registers the torch.ops.srkernels kernels), or None with the reason.

    Not built: the reference serves CPU calls (warned per op, below). Built but unloadable (missing
    libcudart, a torch other than the one it was built against): warned once here, with the reason."""
    if importlib.util.find_spec("srkernels._C") is None:
        return None, ImportError("srkernels._C is not built (run scripts/setup.sh or pip install .)")
    try:
        module = importlib.import_module("srkernels._C")
    except ImportError as e:
        warnings.warn(f"srkernels: the compiled extension srkernels._C failed to load ({e}); every op runs its "
                      "PyTorch reference. Rebuild it against this torch: pip install --no-build-isolation .",
                      RuntimeWarning, stacklevel=3)
        return None, e
    module.cpu_capability()  # a bad SRKERNELS_CPU_CAPABILITY is an error at import, not at the first op
    return module, None


_C, _C_ERROR = _load_native()

_local = threading.local()
_warned: set[str] = set()
# Called once after the Triton ops are registered (srkernels.ops adds their autograd registration here).
TRITON_HOOKS: list = []
_triton_state: dict = {}


def _triton_module():
    """srkernels.triton if triton is importable (it registers torch.ops.srkernels_triton.*), else None."""
    if "module" not in _triton_state:
        try:
            mod = importlib.import_module("srkernels.triton")
            mod = mod if mod.load() else None
        except ImportError:
            mod = None
        _triton_state["module"] = mod
        if mod is not None:
            for hook in TRITON_HOOKS:
                hook()
    return _triton_state["module"]


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    return _triton_module() is not None and hasattr(torch.ops.srkernels_triton, op)


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
