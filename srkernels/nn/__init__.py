"""Drop-in fused ``nn.Module``s: same constructor arguments and state_dict keys as ``srkernels.reference``.

``fuse(model)`` converts the reference layers of an existing model in place (weights kept);
``fold_mean_shift(model)`` folds RCAN's MeanShift layers into its head/tail convs for inference.
"""
from __future__ import annotations

from torch import nn

from .. import reference as _R
from .._util import export_modules

# every module's public names (its ``__all__``): a new layer file needs no line here
__all__ = export_modules(__name__, __path__, globals())

# reference class -> fused twin (a subclass of the same name with the same state, so swapping the class is
# exact), derived from the exports of srkernels.reference: a new layer pair needs no entry here
FUSED: dict[type, type] = {
    getattr(_R, name): globals()[name] for name in _R.__all__
    if isinstance(getattr(_R, name), type) and isinstance(globals().get(name), type)
    and issubclass(globals()[name], getattr(_R, name)) and globals()[name] is not getattr(_R, name)
}


def fuse(model: nn.Module) -> nn.Module:
    """Swap every reference layer of ``model`` that has a fused twin for that twin, in place; returns it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for m in model.modules():
        twin = FUSED.get(type(m))
        if twin is not None:
            m.__class__ = twin
    if hasattr(model, "fused"):
        model.fused = True
    return model


__all__ += ["fuse", "FUSED"]
