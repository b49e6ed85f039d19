"""The op registry: every module ``srkernels/ops/<op>.py`` that defines ``SPEC = OpSpec(...)`` is an op, found
by listing this package (no hand-kept list). From the specs alone, and in one loop per namespace, this module

- defines the schemas of ``torch.ops.srkernels`` (csrc/ holds only ``TORCH_LIBRARY_IMPL`` kernels; the
  dispatcher accepts kernels registered before their schema, so _C may load before or after this runs) and
  registers their fakes, autograd and autocast rules;
- registers the Triton implementations (``srkernels/triton/<op>.py``, a function per dispatcher op, same
  name) as ``torch.ops.srkernels_triton`` with ``triton_op``, the same schemas, fakes and autograd.

``srkernels.ops.__all__``, ``srkernels.build_info()``, the Triton loader and the tests read ``SPECS``.
"""
from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import _backend
from .._util import triton_interpret

BACKENDS = ("cpu", "cuda", "triton")
AUTOCAST_POLICIES = ("lower", "fp32", None)
AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class OpSpec:
    """An op family: the public op ``name`` (also the key of the backend choice), its dispatcher ops and what
    the registry needs to register each of them.

    - ``schemas``: dispatcher op name -> schema without the name, ``"(Tensor x, ...) -> Tensor"``; by
      convention ``<op>_backward`` is the backward.
    - ``out``: the op has the inference variant ``<op>_out(<op's arguments>, Tensor(a!) out) -> ()`` (its schema
      is derived, and needs no fake: docs/ops.md "Common rules").
    - ``fakes``: op name -> fake (shape-only) kernel; ops returning ``()`` need none.
    - ``autograd``: op name -> ``(setup_context, backward)``, ``backward(ns, ctx, *grads)`` where ``ns`` is
      the namespace the op was called in (``torch.ops.srkernels`` or ``torch.ops.srkernels_triton``).
    - ``reference``: the PyTorch reference of the op (differentiable, float64-capable).
    - ``backends``: which of cpu (csrc/cpu/<op>.cpp), cuda (csrc/cuda/<op>.cu), triton (srkernels/triton/<op>.py)
      implement every op of ``schemas``.
    - ``kernels``: op name -> {dispatch key: Python kernel}, for an op whose implementation is a library call
      rather than a kernel of ours (``conv2d_pointwise``: oneDNN on CPU, cuDNN on CUDA; ``backends=()``).
    - ``autocast``: op name -> policy under ``torch.autocast`` (CPU and CUDA), overriding the default: every
      public op (``public``) is ``"lower"``, run in the autocast dtype like the convolutions and matmuls torch
      lists as lower precision (the ops are convs, or a conv's epilogue, or an attention MLP; reductions run in
      fp32 inside the kernels anyway); ``"fp32"`` runs the op in float32 (torch's fp32 list); None: no rule, the
      op runs in the dtypes it is given (backwards, ``_out`` variants: an ``out`` buffer fixes the dtype).
    """

    name: str
    schemas: dict[str, str]
    fakes: dict[str, Callable]
    autograd: dict[str, tuple[Callable, Callable]]
    reference: Callable
    out: bool = False
    backends: tuple[str, ...] = BACKENDS
    kernels: dict[str, dict[str, Callable]] = field(default_factory=dict)
    autocast: dict[str, str | None] = field(default_factory=dict)
    module: str = field(default="", compare=False)  # set by discovery: the ops module (= triton module) name

    def __post_init__(self) -> None:
        if self.out:
            forward = self.schemas[self.name]
            self.schemas[f"{self.name}_out"] = forward[:forward.rindex(") ->")] + ", Tensor(a!) out) -> ()"

    @classmethod
    def pair(cls, name: str, forward: str, backward: str, *, fakes: tuple[Callable, Callable],
             autograd: tuple[Callable, Callable], reference: Callable, **flags) -> "OpSpec":
        """The common op: ``<name>`` (schema ``forward``, differentiable through ``autograd`` =
        ``(setup_context, backward)``) and ``<name>_backward`` (schema ``backward``); ``fakes`` of both, in
        that order. ``flags``: ``out``, ``backends``."""
        return cls(name=name, schemas={name: forward, f"{name}_backward": backward},
                   fakes={name: fakes[0], f"{name}_backward": fakes[1]}, autograd={name: autograd},
                   reference=reference, **flags)

    @property
    def has_out(self) -> bool:
        return self.out

    @property
    def public(self) -> tuple[str, ...]:
        """The functions ``srkernels.ops`` exports: every dispatcher op that is not a backward or ``_out``."""
        return tuple(n for n in self.schemas if not n.endswith(("_backward", "_out")))

    def autocast_policy(self, op: str) -> str | None:
        """``"lower"``, ``"fp32"`` or None (see ``autocast``) for dispatcher op ``op``."""
        policy = self.autocast.get(op, "lower" if op in self.public else None)
        if policy not in AUTOCAST_POLICIES:
            raise ValueError(f"srkernels/ops/{self.module}.py: autocast policy of {op} must be one of "
                             f"{AUTOCAST_POLICIES}, got {policy!r}")
        return policy

    def fake(self, op: str) -> Callable:
        if op in self.fakes:
            return self.fakes[op]
        if self.schemas[op].replace(" ", "").endswith("->()"):
            return _no_result
        raise KeyError(f"{self.module}: no fake for {op}")


def _no_result(*args):
    return None


def discover() -> dict[str, OpSpec]:
    """Import every op module of this package and collect its ``SPEC``, by name."""
    specs = {}
    for info in sorted(pkgutil.iter_modules([os.path.dirname(__file__)]), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        spec = getattr(module, "SPEC", None)
        if spec is None:
            continue
        if spec.name != info.name:
            raise ImportError(f"srkernels/ops/{info.name}.py: SPEC.name must be the module name, got {spec.name!r}")
        object.__setattr__(spec, "module", info.name)
        specs[spec.name] = spec
    return specs


def _mutated(schema: str) -> tuple[str, ...]:
    parsed = torch._C.parse_schema("op" + schema)
    return tuple(a.name for a in parsed.arguments if a.alias_info is not None and a.alias_info.is_write)


def _register_autograd(namespace: str, spec: OpSpec, lib) -> None:
    ns = getattr(torch.ops, namespace)
    for op, (setup_context, backward) in spec.autograd.items():
        torch.library.register_autograd(f"{namespace}::{op}", functools.partial(backward, ns),
                                        setup_context=setup_context, lib=lib)


def autocast_dtype(policy: str | None, device_type: str) -> torch.dtype | None:
    """The dtype an op of ``policy`` runs in on ``device_type`` now: None outside autocast (or no rule)."""
    if policy is None or device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if policy == "lower" else torch.float32


def autocast_cast(value, device_type: str, dtype: torch.dtype):
    """``value`` (a tensor, or a list/tuple of them, or anything else) with its floating tensors on
    ``device_type`` cast to ``dtype``; float64 is left alone, as torch's own autocast does."""
    if isinstance(value, torch.Tensor):
        dt = value.dtype
        if dt != dtype and dt != torch.float64 and value.is_floating_point() and value.device.type == device_type:
            return value.to(dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)([autocast_cast(v, device_type, dtype) for v in value])
    return value


@functools.cache
def autocast_keyset(device_type: str):
    """The dispatch key set of ``device_type``'s autocast (to exclude it for a call already cast)."""
    return torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(
        device_type)))


_POLICIES: dict[str, str | None] = {}  # dispatcher op -> autocast policy, filled on first use (a plain dict:
# torch.compile traces the front ends, and would warn about a functools.cache)


def autocast_args(op: str, x: torch.Tensor, *values) -> tuple:
    """``(x, *values)`` as dispatcher op ``op``'s autocast rule would cast them, for the Python front ends: under
    autocast they take inputs of mixed dtypes (a bf16 activation, float32 parameters) as the rule does, before
    the checks that want one dtype. Unchanged outside autocast."""
    if not _POLICIES:
        _POLICIES.update({o: spec.autocast_policy(o) for spec in SPECS.values() for o in spec.schemas})
    dtype = autocast_dtype(_POLICIES[op], x.device.type)
    if dtype is None:
        return (x, *values)
    return autocast_cast((x, *values), x.device.type, dtype)


def _register_autocast(namespace: str, spec: OpSpec, lib) -> None:
    """An Autocast<device> kernel per op with a policy: cast the floating inputs, then run the op with that
    autocast key excluded (below it, autograd records the casts: gradients reach the float32 parameters).
    ``torch.library.register_autocast`` casts to one fixed dtype; "lower" follows ``torch.autocast(dtype=)``."""
    for op in spec.schemas:
        policy = spec.autocast_policy(op)
        if policy is None:
            continue
        handle = getattr(getattr(torch.ops, namespace), op).default
        for dev in AUTOCAST_DEVICES:
            if not torch._C._is_autocast_available(dev):
                continue
            key = "Autocast" + torch._C._dispatch_key_for_device(dev)
            excluded = autocast_keyset(dev)

            def kernel(_keyset, *args, _dev=dev, _policy=policy, _excluded=excluded, _op=handle):
                dtype = autocast_dtype(_policy, _dev)
                if dtype is not None:
                    args = autocast_cast(args, _dev, dtype)
                with torch._C._ExcludeDispatchKeyGuard(_excluded):
                    return _op(*args)

            lib.impl(op, kernel, key, with_keyset=True)


SPECS: dict[str, OpSpec] = {}
_libs: dict[str, torch.library.Library] = {}


def register_compiled() -> None:
    """Define ``torch.ops.srkernels`` (when _C is loaded) with fakes and autograd. Called once, at import."""
    if _backend._C is None or "srkernels" in _libs:
        return
    try:
        lib = _libs["srkernels"] = torch.library.Library("srkernels", "DEF")
    except RuntimeError as e:  # a _C built before the schemas moved here still defines them (TORCH_LIBRARY)
        raise ImportError(f"srkernels: the compiled extension srkernels._C is older than these Python sources (it "
                          f"defines the op schemas itself). {_backend.REBUILD_HINT}") from e
    for spec in SPECS.values():
        for op, schema in spec.schemas.items():
            lib.define(op + schema)
            torch.library.register_fake(f"srkernels::{op}", spec.fake(op), lib=lib)
            for key, kernel in spec.kernels.get(op, {}).items():
                lib.impl(op, kernel, key)
        _register_autograd("srkernels", spec, lib)
        _register_autocast("srkernels", spec, lib)


@functools.cache
def load_triton() -> bool:
    """Register ``torch.ops.srkernels_triton`` (imports Triton and the kernel modules, slow: done on the first
    call that may use it). False when Triton is not installed."""
    from .. import triton as kernels

    specs = [s for s in SPECS.values() if "triton" in s.backends]
    try:
        if not kernels.load(s.module for s in specs):
            return False
    except ImportError:  # an installed but unusable Triton: the other backends serve
        return False
    from ..triton import _common

    lib = _libs["srkernels_triton"] = torch.library.Library("srkernels_triton", "FRAGMENT")
    for spec in specs:
        module = importlib.import_module(f"srkernels.triton.{spec.module}")
        for op, schema in spec.schemas.items():
            fn = getattr(module, op, None)
            if fn is None:
                raise LookupError(f"srkernels/triton/{spec.module}.py has no function {op} (SPEC of "
                                  f"srkernels/ops/{spec.module}.py declares it with backend 'triton')")
            custom = torch.library.triton_op(f"srkernels_triton::{op}", fn, mutates_args=_mutated(schema),
                                             schema=schema)
            _common.finish_registration(custom, spec.fake(op))
        _register_autograd("srkernels_triton", spec, lib)
        _register_autocast("srkernels_triton", spec, lib)
    return True


@torch.compiler.assume_constant_result  # decided at trace time, like _backend.choose
def choose(op: str, dev: str) -> str:
    """``_backend.choose``, with the Triton ops registered first when they could serve the call."""
    # the common case first (~1 us instead of ~3, paid per op call): nothing forced and a compiled CPU
    # kernel, which _backend.choose ranks first whatever Triton could do
    if dev == "cpu" and _backend.forced() is None and _backend.has_compiled(op, "cpu"):
        return "compiled"
    if dev == "cuda" or (dev == "cpu" and triton_interpret()):
        load_triton()
    return _backend.choose(op, dev)
