"""Public functional API: one module per fused op (``srkernels/ops/<op>.py``, found by ``_registry``). Each
validates its arguments, picks a backend (``srkernels._backend``) and calls ``torch.ops.srkernels.<op>``, the
Triton op or the reference; its ``SPEC`` declares the op once for every backend."""
import importlib

from . import _registry

_registry.SPECS.update(_registry.discover())
_registry.register_compiled()

SPECS = _registry.SPECS
OPS = tuple(SPECS)  # the op families, each the key of its backend choice
load_triton = _registry.load_triton
__all__ = [name for spec in SPECS.values() for name in spec.public]
for _spec in SPECS.values():
    for _name in _spec.public:
        globals()[_name] = getattr(importlib.import_module(f"{__name__}.{_spec.module}"), _name)
del _spec, _name
