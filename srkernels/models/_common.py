"""What every model shares: the fused/reference layer switch, scale checks, config bookkeeping."""
from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Any, ClassVar

import torch
import torch._prims_common
from torch import Tensor, nn

from .._util import conv  # noqa: F401  (re-exported to the model modules)
from .._validate import positive_int  # noqa: F401  (re-exported to the model modules)


def layer(fused: bool, name: str) -> type[nn.Module]:
    """The layer class ``name`` from ``srkernels.nn`` (fused) or ``srkernels.reference``.

    Both namespaces expose the same names and constructors. ``srkernels.nn`` is imported only when asked for;
    a layer without a fused twin is an error (a silent fallback would hide the missing twin under fused=True).
    """
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
    module = importlib.import_module("srkernels.nn" if fused else "srkernels.reference")
    cls = getattr(module, name, None)
    if cls is None:
        raise LookupError(f"{module.__name__} has no layer {name!r}" + (
            " (a fused model needs a fused twin of every reference layer it uses)" if fused else ""))
    return cls


def check_scale(arch: str, scale: object, allowed: tuple[int, ...] | None) -> int:
    """``scale`` as an int, or a ValueError naming the scales ``arch`` supports (None: any int >= 2)."""
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise ValueError(f"scale must be an int, got {scale!r}")
    if allowed is None:
        if scale < 2:
            raise ValueError(f"scale must be >= 2 for {arch}, got {scale}")
    elif scale not in allowed:
        raise ValueError(f"scale {scale} is not supported by {arch}; supported: {', '.join(map(str, allowed))}")
    return scale


class SRModel(nn.Module):
    """Base of the model zoo: ``scale``, ``fused``, ``input_range`` and a JSON-able ``config``.

    ``config`` holds the constructor keywords (besides ``scale`` and ``fused``), so
    ``type(m)(scale=m.scale, **m.config)`` rebuilds the same architecture; ``save_pretrained`` stores it.
    ``input_range`` is the pixel range the weights expect (1.0 for [0, 1] input, 255.0 for [0, 255]).
    """

    arch: ClassVar[str] = ""
    scales: ClassVar[tuple[int, ...] | None] = None

    def __init__(self, scale: int, fused: bool, config: dict[str, Any], *, in_channels: int, input_range: float):
        super().__init__()
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        self.scale = check_scale(type(self).__name__, scale, self.scales)
        self.fused = fused
        self.in_channels = in_channels
        self.input_range = float(input_range)
        self._config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}

    @classmethod
    def options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The constructor's options (keyword parameters but ``scale`` and ``fused``) from ``values`` (the
        constructor's ``locals()``), in signature order, checked by their annotation: ``int`` a positive int
        (``int | None`` also None), ``bool`` a bool, ``Sequence[float]`` a list of floats; other annotations are
        left to the model. The signature is the one list of options: ``config`` starts from this, and
        ``convert.validate_config`` reads it too."""
        out = {}
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if p.kind is not p.KEYWORD_ONLY or name == "fused":
                continue
            v, kind = values[name], p.annotation
            if kind in ("int", "int | None") and not (v is None and kind == "int | None"):
                v = positive_int(name, v)
            elif kind == "bool" and not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
            elif kind == "Sequence[float]":
                v = [float(e) for e in v]
            out[name] = v
        return out

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must be [N, {self.in_channels}, H, W] for {type(self).__name__}, got {tuple(x.shape)}"
            )

    def run_fused(self, x: Tensor) -> Tensor:
        """``self._forward_fused(x)`` in the memory format eager PyTorch would return (``output_like``). With grad
        mode off (and not under torch.compile) the op calls skip the autograd dispatch key, as under
        ``torch.inference_mode``, while the outputs stay normal tensors: autograd records nothing with grad off,
        so the results are the same, and each custom op call is spared its Python autograd kernel
        (``torch.library.register_autograd``: ~3 us a call with grad off; fused RCAN x4 makes 614 calls, 1.5% of
        its forward at LR 48)."""
        below = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        with torch._C._AutoDispatchBelowAutograd() if below else contextlib.nullcontext():
            y = self._forward_fused(x)
        return self.output_like(y, x)

    @staticmethod
    def output_like(y: Tensor, x: Tensor) -> Tensor:
        """``y`` in the memory format eager PyTorch would return for input ``x`` (NCHW in -> NCHW out): the fused
        CPU path runs channels_last throughout (oneDNN with prepacked weights), so its last output is
        channels_last. The copy is of the few-channel HR image only (3 x 192 x 192 at x4 LR 48: ~0.1 ms)."""
        if torch.jit.is_tracing():  # the tracer records no layout (ONNX export of a reference model)
            return y
        fmt = torch._prims_common.suggest_memory_format(x)
        return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, fused={self.fused}"
