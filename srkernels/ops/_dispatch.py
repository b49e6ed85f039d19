"""What every op does once its arguments are checked and ``_backend.choose`` has picked the backend (the
choice stays in the op itself: its warning points at the op's caller)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from ._registry import AUTOCAST_DEVICES, autocast_args, autocast_keyset, choose  # noqa: F401


def run(backend: str, op: str, args: tuple, reference: Callable[[], Tensor], out: Tensor | None = None,
        out_shape: tuple[int, ...] | None = None, *, saves: bool = False,
        names: tuple[str, ...] | None = None) -> Tensor:
    """``op(*args)`` on ``backend``; ``reference()`` computes the result for the "reference" backend. With
    ``out`` (inference only, shape ``out_shape``, default x's) the result is written through ``<op>_out`` (or
    copied from the reference) and ``out`` is returned. ``saves``: the op returns (result, tensors saved for
    the backward); only the result is returned. ``names``: the user-facing names of ``args`` (for the ``out``
    overlap errors)."""
    if out is not None:
        _checks.out(out, args, out_shape, names)
        if backend == "reference":
            with torch.no_grad():
                return out.copy_(reference())
        _backend.op_handle(backend, op + "_out")(*args, out)
        return out
    if backend == "reference":
        return reference()
    # every front end has cast args by the op's autocast rule already (autocast_args): skip the rule's
    # dispatcher kernel (~10 us of Python per call; RCAN makes 200 attention calls per forward)
    result = call_cast(_backend.op_handle(backend, op), *args)
    return result[0] if saves else result


def call_cast(handle, *args):
    """``handle(*args)`` for arguments the caller has already given their dtypes: under autocast, with the
    autocast dispatch key excluded, so that the op's own autocast rule does not cast them again (e.g.
    winograd_conv3x3's "fp32" rule would widen a bf16 conv that conv2d_pointwise chose to run on bf16 storage)."""
    dev = args[0].device.type
    if dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev) and not torch.compiler.is_compiling():
        with torch._C._ExcludeDispatchKeyGuard(autocast_keyset(dev)):
            return handle(*args)
    return handle(*args)

