"""``conv2d_pointwise``: a conv with its epilogue -- ``act(conv2d(x, weight) + bias) (+ residual)``, act None or
ReLU -- as one call. Contract: docs/ops.md.

Implementations (no csrc or Triton kernel: the fused conv is a library's):

- CPU: the first of ``ALGORITHMS`` that ``supports`` the call; ``OneDNN`` runs torch's oneDNN convolution with
  the bias, ReLU and residual add as post-ops (the primitive TorchInductor emits for the same pattern). An
  algorithm may ``pack`` the weight into its own layout for one input shape; a caller that keeps the packed
  weight (``srkernels.nn.conv2d`` does, per module and input shape) passes it to ``run`` instead of the weight.
  ``Winograd`` (float32 3x3 convs where it was measured faster; ``SRKERNELS_WINOGRAD``, in training
  ``SRKERNELS_WINOGRAD_TRAIN``; and float32 5x5 convs by F(2x2,5x5), off with ``SRKERNELS_WINOGRAD=0``, in
  training with ``SRKERNELS_WINOGRAD_TRAIN=0``) comes first; bf16 inference convs take it too where
  ``winograd_bf16`` measured it faster. ``OneDNNFloat32`` runs the other bf16 inference convs where oneDNN has no
  native bf16 (float32 conv between a widening and one rounding). ``Direct`` (``direct_conv2d``) runs the
  inference convs with 1-4 outputs that ``direct_use`` measured faster (a model's last conv), ahead of Winograd.
- every other call (CUDA: cuDNN; float64, float16; or no algorithm): the reference, ``F.conv2d`` + ReLU + add.

Backward (``conv_backward``): behind the ReLU mask, ATen's ``convolution_backward`` for the weight and bias
gradients; the input gradient too, except where training runs ``Winograd``: then it is a second Winograd conv
(F(4,3); F(2,5) for 5x5) with the weight rotated and transposed (issue 13).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _dispatch
from ._registry import OpSpec
from .direct_conv2d import direct_use, direct_weight
from .winograd_conv3x3 import winograd6_use, winograd_use, winograd_weight, winograd_weight_step
from .winograd_conv5x5 import winograd5_use, winograd_weight5, winograd_weight5_step

OP = "conv2d_pointwise"
ACTIVATIONS = ("none", "relu")


def reference(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
              activation: str, residual: Tensor | None) -> Tensor:
    """``act(F.conv2d(x, weight, bias)) (+ residual)``: the op's definition (differentiable, any dtype/device)."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if activation == "relu":
        y = F.relu(y)
    return y if residual is None else y + residual


# ---- CPU algorithms -------------------------------------------------------------------------------------------

class CpuAlgorithm:
    """One way to run the op on CPU. ``supports`` sees the call (dtype, sizes, conv parameters; it may depend on
    the input shape, not on its values); a supported call must be served for every epilogue (bias or not,
    activation, residual). ``pack`` returns the weight in the algorithm's layout for inputs of ``input_shape``
    (default: the weight itself); ``run`` takes that or the plain weight. Neither records autograd."""

    name = ""

    def supports(self, x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> bool:
        raise NotImplementedError

    def pack(self, weight: Tensor, stride, padding, dilation, groups: int, input_shape: tuple[int, ...]):
        return weight

    def run(self, x: Tensor, weight, bias: Tensor | None, stride, padding, dilation, groups: int, activation: str,
            residual: Tensor | None) -> Tensor:
        raise NotImplementedError

    def bind(self, packed, stride, padding, dilation, groups: int):
        """``run`` with the packed weight and conv parameters bound: ``f(x, bias, activation, residual)``, for a
        caller that repeats the same call with autocast off (``srkernels.nn.conv2d``'s hot path)."""
        return lambda x, bias, activation, residual: self.run(x, packed, bias, stride, padding, dilation, groups,
                                                              activation, residual)


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions here: AVX-512 (bw, vl, dq) or AVX-NE-CONVERT, as capped by
    ONEDNN_MAX_CPU_ISA. The very check oneDNN's bf16 ops apply before refusing (issue 12: AVX2-only CPUs such
    as AMD Zen 2/3); asked once per process. A function, so tests can stand in for another CPU."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class OneDNN(CpuAlgorithm):
    """torch's oneDNN convolution with post-ops (``torch.ops.mkldnn._convolution_pointwise``): fp32, and bf16
    where oneDNN runs it. A weight packed for one input shape (``pack``: oneDNN picks the blocked layout by input
    size, issue 13) is not reordered again by each call; the output of a packed weight is channels_last."""

    name = "onednn"
    available = torch.backends.mkldnn.is_available()

    def supports(self, x, weight, stride, padding, dilation, groups):
        dt = x.dtype
        return self.available and weight.dtype == dt and (dt == torch.float32
                                                          or (dt == torch.bfloat16 and onednn_bf16()))

    def pack(self, weight, stride, padding, dilation, groups, input_shape):
        return torch.ops.mkldnn._reorder_convolution_weight(
            weight.detach(), list(padding), list(stride), list(dilation), groups, list(input_shape))

    def run(self, x, weight, bias, stride, padding, dilation, groups, activation, residual):
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups,
                                                           activation, [None], "")
        if activation == "none":  # conv + bias + residual: oneDNN's binary "add" post-op
            other = residual.contiguous(memory_format=_checks.suggest_memory_format(x))
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, weight, bias, padding, stride, dilation, groups, "add", None, None, [None], None)
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, activation,
                                                    [None], "")
        return y.add_(residual)

    # the transposed conv (SRDenseNet's deconvolutions; not an op of the registry): same rules
    def pack_transpose(self, weight, stride, padding, output_padding, dilation, groups, input_shape):
        return torch.ops.mkldnn._reorder_convolution_transpose_weight(
            weight.detach(), list(padding), list(output_padding), list(stride), list(dilation), groups,
            list(input_shape))

    def run_transpose(self, x, weight, bias, stride, padding, output_padding, dilation, groups, activation):
        return torch.ops.mkldnn._convolution_transpose_pointwise(
            x, weight, bias, list(padding), list(output_padding), list(stride), list(dilation), groups, activation,
            [None], "")


ONEDNN = OneDNN()


class OneDNNFloat32(CpuAlgorithm):
    """bf16 convs where oneDNN has no native bf16 (``onednn_bf16()`` false: AVX2 CPUs), which the eager bf16
    conv runs at ~21 GFLOP/s: x, bias and residual widened to float32, oneDNN's float32 conv with its post-ops on
    a float32 packed weight, the result rounded to bf16 once -- a native bf16 conv's arithmetic (float32
    accumulation, one rounding). Measured 1.6-41x the eager bf16 conv under forced AVX2 (docs/ops.md
    ``## conv2d_pointwise``). Inference only (``cpu_algorithm``); the 3x3 / 5x5 convs Winograd serves go there
    first."""

    name = "onednn_fp32"

    def supports(self, x, weight, stride, padding, dilation, groups):
        return (ONEDNN.available and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
                and not onednn_bf16())

    def pack(self, weight, stride, padding, dilation, groups, input_shape):
        return ONEDNN.pack(weight.float(), stride, padding, dilation, groups, input_shape)

    def run(self, x, weight, bias, stride, padding, dilation, groups, activation, residual):
        f = (lambda t: None if t is None else t.float())
        return ONEDNN.run(x.float(), f(weight), f(bias), stride, padding, dilation, groups, activation,
                          f(residual)).to(torch.bfloat16)

    # the transposed conv (SRDenseNet's deconvolutions), the same widening
    def pack_transpose(self, weight, stride, padding, output_padding, dilation, groups, input_shape):
        return ONEDNN.pack_transpose(weight.float(), stride, padding, output_padding, dilation, groups, input_shape)

    def run_transpose(self, x, weight, bias, stride, padding, output_padding, dilation, groups, activation):
        return ONEDNN.run_transpose(x.float(), weight.float(), None if bias is None else bias.float(), stride,
                                    padding, output_padding, dilation, groups, activation).to(torch.bfloat16)


ONEDNN_FP32 = OneDNNFloat32()


def winograd_bf16(m: int, r: int, c_in: int, c_out: int) -> bool:
    """Whether a bfloat16 conv that the float32 rule (``winograd_use`` 3x3, ``winograd5_use`` 5x5) picks runs as
    Winograd F(m, r) too (bf16 storage, float32 arithmetic; csrc/cpu/winograd_conv.cpp) rather than oneDNN's bf16
    conv. Measured on an AMD EPYC (Zen 5), one thread (benchmarks/bench_winograd_conv3x3.py --dtype bfloat16,
    ``--kernel 5``; docs/ops.md ``## winograd_conv3x3``, ``## winograd_conv5x5``):

    - oneDNN without native bf16 (``onednn_bf16()`` false: AVX2 CPUs, or ONEDNN_MAX_CPU_ISA capped): the eager
      bf16 conv runs at ~21 GFLOP/s; Winograd is 8-18x faster (F(2,3), F(4,3), F(2,5), F(4,5)): always;
    - AVX512-BF16 without AMX: F(4,3) with >= 64 channels in and out is 1.1-1.4x oneDNN's bf16 conv (64->64,
      64->256 at LR 32-96): yes, and F(6,3) where ``winograd6_use`` picks it (faster than F(4,3) there); 32->32
      1.06x, 16->16 0.8x, F(2,3) 0.84-0.9x: no. F(4,5) (64->32 at 24-96 px 1.5-1.9x; 16->16, 32->24, 32->32 at
      16 and 48 px 1.08-1.85x): yes; F(2,5) 0.6-1.16x: no;
    - AMX (``srkernels._C.amx_bf16()``; no such CPU here to measure): oneDNN's tile convs are left to run."""
    if not onednn_bf16():
        return True
    if _amx():
        return False
    return (m in (4, 6) and r == 3 and min(c_in, c_out) >= 64) or (m == 4 and r == 5)


@functools.cache
def _amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (also when the compiled extension is missing: then no Winograd)."""
    from .. import _backend

    return _backend._C is None or _backend._C.amx_bf16()


WINOGRAD_ENV = "SRKERNELS_WINOGRAD"


@functools.cache
def winograd_tile() -> int:
    """The Winograd output tile ``SRKERNELS_WINOGRAD`` asks for: 4 (default, F(4x4,3x3) and F(4x4,5x5); bf16
    storage's F(6x6,3x3) where ``winograd6_use`` picks it), 2 (F(2x2,3x3) and F(2x2,5x5)) or 0 (off: oneDNN for
    every conv). Read once per process."""
    raw = os.environ.get(WINOGRAD_ENV, "4").strip()
    if raw not in ("0", "2", "4"):
        raise ValueError(f"{WINOGRAD_ENV} must be 4 (F(4x4,3x3), the default), 2 (F(2x2,3x3)) or 0 (off), "
                         f"got {raw!r}")
    return int(raw)


WINOGRAD_TRAIN_ENV = "SRKERNELS_WINOGRAD_TRAIN"


@functools.cache
def winograd_train_tile() -> int:
    """The Winograd tile of training (``SRKERNELS_WINOGRAD_TRAIN``): 2 (default, F(2x2,3x3)), 4 or 0 (off);
    0 whenever ``SRKERNELS_WINOGRAD=0``. F(2,3) by default: its forward rounds less than oneDNN's, so RCAN's
    fp32 gradients stay as close to float64 as the oneDNN path's; F(4,3) puts them 1.3-5x further for a
    ~6% faster RCAN step (docs/ops.md, ``## conv2d_pointwise``). Read once per process."""
    raw = os.environ.get(WINOGRAD_TRAIN_ENV, "2").strip()
    if raw not in ("0", "2", "4"):
        raise ValueError(f"{WINOGRAD_TRAIN_ENV} must be 2 (F(2x2,3x3), the default), 4 (F(4x4,3x3)) or 0 (off), "
                         f"got {raw!r}")
    return int(raw) if winograd_tile() else 0


class Winograd(CpuAlgorithm):
    """The ``winograd_conv3x3`` kernel (csrc/cpu/winograd_conv.cpp) for float32 3x3 convs with stride 1, zero
    padding 1, no dilation or groups, where ``winograd_use`` measured it faster than oneDNN (AVX2 / AVX-512
    builds, >= 16 channels in and out, >= 64 pixels): 2.2-2.9x a prepacked oneDNN 64->64 conv with F(4,3), one
    thread (benchmarks/results/winograd_models.md). The packed weight is ``winograd_weight(weight, m)``.
    Rounding: F(4,3) ~4x oneDNN's float32 error against float64, F(2,3) below it (docs/ops.md).
    ``Winograd(4, 5)`` / ``Winograd(2, 5)``: the ``winograd_conv5x5`` kernel, F(4x4,5x5) (inference at the default
    tile setting, float32 and bf16 storage) or F(2x2,5x5) (``SRKERNELS_WINOGRAD=2``, and training), for 5x5
    convs with stride 1, zero padding 2 where ``winograd5_use`` measured it faster (SRCNN's 64->32 layer, one
    thread: F(4,5) 3.3-3.5x oneDNN on AVX-512 and 3.5-4.6x with AVX2 forced, F(2,5) 1.7x / 2.0-2.6x); packed
    weight ``winograd_weight5(weight, m)``; ~5x (F(4,5)) and ~3x (F(2,5)) oneDNN's float32 error, F(4,3)'s
    class."""

    name = "winograd"

    def __init__(self, m: int, r: int = 3) -> None:
        # F(m x m, r x r): (4, 3), (2, 3), (6, 3) (bf16 storage), or (4, 5), (2, 5) (winograd_conv5x5)
        self.m, self.r = m, r

    def supports(self, x, weight, stride, padding, dilation, groups):
        tile = winograd_tile()
        if self.m == 6:  # bf16 storage only, in F(4,3)'s place where winograd6_use picks it
            return (tile == 4 and x.dtype == torch.bfloat16 and winograd6_use(x.shape[2], x.shape[3])
                    and self.fits(x, weight, stride, padding, dilation, groups))
        # the tile setting picks m for 3x3 and 5x5 alike (training picks its own: cpu_algorithm)
        return tile == self.m and self.fits(x, weight, stride, padding, dilation, groups)

    def fits(self, x, weight, stride, padding, dilation, groups) -> bool:
        """The call is one the kernel runs and its rule (``winograd_use``, ``winograd5_use``; for bfloat16 also
        ``winograd_bf16``) measured faster (whatever the tile setting)."""
        r = self.r
        use = functools.partial(winograd_use if r == 3 else winograd5_use, m=self.m)
        dt = x.dtype
        return (weight.dtype == dt and (dt == torch.float32 or (
                    dt == torch.bfloat16 and winograd_bf16(self.m, r, weight.shape[1], weight.shape[0])))
                and groups == 1 and weight.shape[2] == r and weight.shape[3] == r and tuple(stride) == (1, 1)
                and tuple(padding) == (r // 2, r // 2) and tuple(dilation) == (1, 1)
                and use(weight.shape[1], weight.shape[0], x.shape[2], x.shape[3]))

    def pack(self, weight, stride, padding, dilation, groups, input_shape):
        w = weight.detach().float()  # a bf16 conv keeps its transformed weight in float32 (exact from bf16)
        return winograd_weight(w, self.m) if self.r == 3 else winograd_weight5(w, self.m)

    def weight_step(self, weight: Tensor, grad_input: bool = False) -> Tensor:
        """The transformed weight of a plain 4-D ``weight`` per call (one float32 matmul, no autograd);
        ``grad_input``: of the input-gradient conv (weight rotated and transposed)."""
        if self.r == 5:  # training's F(2,5) (cpu_algorithm)
            return winograd_weight5_step(weight, grad_input=grad_input)
        return winograd_weight_step(weight, self.m, grad_input=grad_input)

    def run(self, x, weight, bias, stride, padding, dilation, groups, activation, residual):
        if weight.dim() == 4:  # an unpacked weight (the op called directly, training): transform per call
            weight = self.weight_step(weight)
        op = torch.ops.srkernels.winograd_conv5x5 if self.r == 5 else torch.ops.srkernels.winograd_conv3x3
        # fits() chose x's dtype (bf16 storage or float32): no autocast rule may change it
        return _dispatch.call_cast(op, x, weight, bias, activation, residual)

    def bind(self, packed, stride, padding, dilation, groups):
        op = torch.ops.srkernels.winograd_conv5x5 if self.r == 5 else torch.ops.srkernels.winograd_conv3x3
        return lambda x, bias, activation, residual: op(x, packed, bias, activation, residual)  # autocast off

    def grad_input(self, grad: Tensor, weight: Tensor, residual: Tensor | None = None) -> Tensor:
        """The input gradient of a conv this algorithm ``supports`` (r x r, stride 1, padding r // 2),
        ``+ residual``: ``conv(grad, weight.flip(2, 3).transpose(0, 1), padding=r // 2)``, the same Winograd
        kernel. ``weight`` is the plain 4-D weight."""
        op = torch.ops.srkernels.winograd_conv5x5 if self.r == 5 else torch.ops.srkernels.winograd_conv3x3
        return op(grad, self.weight_step(weight, grad_input=True), None, "none", residual)


class Direct(CpuAlgorithm):
    """The ``direct_conv2d`` kernel (csrc/cpu/direct_conv2d.cpp) for inference convs with 1-4 outputs (a model's
    last conv: 64 -> 3, 256 -> 1, 32 -> 1), float32 or bf16 storage, 3x3 or 5x5, stride 1, zero padding
    ``R // 2``, where ``direct_use`` measured it faster than Winograd and oneDNN. The packed weight is
    ``direct_weight(weight)`` in float32. Inference only: training keeps its convs on the other algorithms."""

    name = "direct"

    def supports(self, x, weight, stride, padding, dilation, groups):
        r = weight.shape[2]
        return (x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype and groups == 1
                and weight.shape[3] == r and tuple(stride) == (1, 1) and tuple(padding) == (r // 2, r // 2)
                and tuple(dilation) == (1, 1) and direct_use(weight.shape[1], weight.shape[0], r, x.shape[2],
                                                             x.shape[3]))

    def pack(self, weight, stride, padding, dilation, groups, input_shape):
        return direct_weight(weight.detach().float())

    def run(self, x, weight, bias, stride, padding, dilation, groups, activation, residual):
        if weight.shape[-1] == weight.shape[-2]:  # plain [C_out, C_in, R, R] (packed: [R, R, <= 4, >= 16])
            weight = direct_weight(weight.detach().float())
        # supports() chose x's dtype (bf16 storage or float32): no autocast rule may change it
        return _dispatch.call_cast(torch.ops.srkernels.direct_conv2d, x, weight, bias, activation, residual)

    def bind(self, packed, stride, padding, dilation, groups):
        op = torch.ops.srkernels.direct_conv2d
        return lambda x, bias, activation, residual: op(x, packed, bias, activation, residual)  # autocast off


WINOGRAD45 = Winograd(4, 5)
WINOGRAD5 = Winograd(2, 5)
DIRECT = Direct()
ALGORITHMS: list[CpuAlgorithm] = [DIRECT, Winograd(6), Winograd(4), Winograd(2), WINOGRAD45, WINOGRAD5, ONEDNN,
                                  ONEDNN_FP32]  # best first
# The input gradient's tile where training runs Winograd, whatever the forward's: its rounding enters the
# gradient linearly (the ReLU masks come from the forward), and RCAN's gradients against float64 came out the
# same to two digits as with F(2,3) (benchmarks/bench_train_accuracy.py, docs/ops.md ## conv2d_pointwise).
GRAD_INPUT_WINOGRAD = Winograd(4)


def cpu_algorithm(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int, *,
                  training: bool = False) -> CpuAlgorithm | None:
    """The first of ``ALGORITHMS`` that supports this CPU call, or None (then the reference runs).
    ``training``: a call autograd records (forward or backward); Winograd's tile is then
    ``winograd_train_tile()`` instead of ``winograd_tile()``."""
    tile = winograd_train_tile() if training else None
    for alg in ALGORITHMS:
        if training and isinstance(alg, Winograd):
            if x.dtype != torch.float32:  # bf16 Winograd serves inference only
                continue
            # 3x3: the input-gradient conv (C_out -> C_in, Winograd F(4,3): GRAD_INPUT_WINOGRAD) must fit the
            # rule as well (winograd_use takes fewer outputs than inputs, not the reverse)
            if (alg.r == 3 and alg.m == tile and alg.fits(x, weight, stride, padding, dilation, groups)
                    and winograd_use(weight.shape[0], weight.shape[1], x.shape[2], x.shape[3])):
                return alg
            # 5x5: F(2,5) whenever training runs Winograd; its input-gradient conv (C_out -> C_in) must fit the
            # rule as well (winograd5_use is not symmetric on AVX-512)
            if (alg is WINOGRAD5 and tile and alg.fits(x, weight, stride, padding, dilation, groups)
                    and winograd5_use(weight.shape[0], weight.shape[1], x.shape[2], x.shape[3])):
                return alg
        elif (not (training and alg in (ONEDNN_FP32, DIRECT))
              and alg.supports(x, weight, stride, padding, dilation, groups)):
            return alg
    return None


def conv_backward(grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, stride, padding, dilation, groups: int,
                  mask: tuple[bool, bool, bool], grad_x_plus: Tensor | None = None) -> tuple:
    """``(grad_x, grad_weight, grad_bias)`` of ``F.conv2d(x, weight, bias)`` for the output gradient ``grad``
    (``mask`` says which are needed; the others are None). ``grad_x_plus`` is added to grad_x (a skip path's
    gradient; the Winograd kernel adds it in its epilogue). grad_x by Winograd F(4,3) (``GRAD_INPUT_WINOGRAD``)
    where training runs Winograd (``winograd_train_tile()`` not 0 and the call fits), else ATen; grad_weight and
    grad_bias by ATen (oneDNN on CPU)."""
    gx = None
    alg = None
    if mask[0] and x.is_cpu:
        alg = cpu_algorithm(x, weight, stride, padding, dilation, groups, training=True)
    if isinstance(alg, Winograd):  # 3x3: F(4,3) whatever the forward's tile; 5x5: F(2,5)
        gx = (GRAD_INPUT_WINOGRAD if alg.r == 3 else alg).grad_input(grad, weight, grad_x_plus)
        mask = (False, mask[1], mask[2])
    bias_sizes = [weight.shape[0]] if has_bias else None
    if mask[0] or mask[1] or (mask[2] and has_bias):
        gx2, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups,
            [mask[0], mask[1], mask[2] and has_bias])
    else:
        gx2 = gw = gb = None
    if gx is None:
        gx = gx2 if grad_x_plus is None or gx2 is None else gx2.add_(grad_x_plus)
    return gx, gw, gb


def run_cpu(x, weight, bias, stride, padding, dilation, groups, activation, residual, *,
            training: bool | None = None):
    """The op's CPU kernel (no validation, no autograd): the first supporting algorithm, else the reference.
    ``training`` (``cpu_algorithm``) defaults to whether any tensor requires grad: the kernel cannot see grad
    mode (the autograd layer turns it off before calling it), so a no_grad call on such tensors counts too."""
    if training is None:
        training = any(t is not None and t.requires_grad for t in (x, weight, bias, residual))
    alg = cpu_algorithm(x, weight, stride, padding, dilation, groups, training=training)
    if alg is None:
        return reference(x, weight, bias, stride, padding, dilation, groups, activation, residual)
    return alg.run(x, weight, bias, stride, padding, dilation, groups, activation, residual)


def _other_device(x, weight, bias, stride, padding, dilation, groups, activation, residual):
    return reference(x, weight, bias, stride, padding, dilation, groups, activation, residual)


# ---- the public op ------------------------------------------------------------------------------------------

def _pair(name: str, v, low: int) -> list[int]:
    vals = [v, v] if isinstance(v, int) else list(v) if isinstance(v, (tuple, list)) else None
    if vals is None or len(vals) != 2 or any(isinstance(i, bool) or not isinstance(i, int) or i < low for i in vals):
        raise ValueError(f"{name} must be an int >= {low} or a pair of them, got {v!r}")
    return vals


def out_shape(x_shape, weight_shape, stride, padding, dilation) -> tuple[int, int, int, int]:
    """[N, Cout, Hout, Wout] of the conv."""
    n, _, h, w = x_shape
    kh, kw = weight_shape[2:]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n, weight_shape[0], ho, wo


def conv2d_pointwise(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                     groups: int = 1, *, activation: str | None = None, residual: Tensor | None = None) -> Tensor:
    """``act(F.conv2d(x, weight, bias, stride, padding, dilation, groups)) (+ residual)`` as one call.

    Args:
        x: ``[N, C, H, W]``, any memory format.
        weight: ``[Cout, C / groups, kh, kw]``; bias: ``(Cout,)`` or None (same dtype and device as x).
        stride, padding, dilation: an int or a pair (zero padding); groups: divides C and Cout.
        activation: None/``"none"`` or ``"relu"``, applied before the residual add.
        residual: optional tensor of the output's shape.
    """
    _checks.feature_map("x", x)
    x, weight, bias, residual = _dispatch.autocast_args(OP, x, weight, bias, residual)
    _checks.like("weight", weight, x)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [Cout, C/groups, kh, kw], got shape {list(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    cout = weight.shape[0]
    if x.shape[1] != weight.shape[1] * groups or cout % groups:
        raise ValueError(f"weight {list(weight.shape)} with groups={groups} does not fit x with {x.shape[1]} "
                         "channels")
    stride, padding, dilation = _pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    shape = out_shape(x.shape, weight.shape, stride, padding, dilation)
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"x {list(x.shape)} is smaller than the dilated kernel {list(weight.shape[2:])}")
    if bias is not None:
        _checks.like("bias", bias, x, ((cout,),))
    activation = _checks.choice("activation", "none" if activation is None else activation, ACTIVATIONS)
    if residual is not None:
        _checks.like("residual", residual, x, (shape,))
    args = (x, weight, bias, stride, padding, dilation, groups, activation, residual)
    backend = _dispatch.choose(OP, x.device.type)
    return _dispatch.run(backend, OP, args, lambda: reference(*args))


# ---- the spec: schema, fake, autograd, Python kernels (srkernels/ops/_registry.py registers them) ------------

def _fake(x, weight, bias, stride, padding, dilation, groups, activation, residual):
    torch._check(activation in ACTIVATIONS, lambda: f"{OP}: activation must be one of {ACTIVATIONS}")
    return reference(x, weight, bias, stride, padding, dilation, groups, activation, residual)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, activation, residual = inputs
    # ReLU's mask: the output itself, unless the residual was added after it (then recomputed in backward)
    mask = output if activation == "relu" and residual is None else None
    ctx.save_for_backward(x, weight, bias, mask)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.activation, ctx.has_residual = activation, residual is not None
    # the algorithm rule the forward kernel applied (run_cpu), for a mask recomputed in backward
    ctx.training = any(t is not None and t.requires_grad for t in (x, weight, bias, residual))


def _backward(ns, ctx, grad):
    x, weight, bias, mask = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    g = grad
    if ctx.activation == "relu":
        if mask is None:  # the conv output again, by the forward's own algorithm (the same bits)
            with torch.no_grad():
                mask = (run_cpu(x, weight, bias, stride, padding, dilation, groups, "none", None,
                                training=ctx.training) if x.is_cpu
                        else reference(x, weight, bias, stride, padding, dilation, groups, "none", None))
        g = torch.ops.aten.threshold_backward(grad, mask, 0)
    need = ctx.needs_input_grad
    gx, gw, gb = conv_backward(g, x, weight, bias is not None, stride, padding, dilation, groups,
                               (need[0], need[1], need[2]))
    return gx, gw, gb, None, None, None, None, None, grad if ctx.has_residual else None


SPEC = OpSpec(
    name=OP,
    schemas={OP: "(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
                 "int groups, str activation, Tensor? residual) -> Tensor"},
    fakes={OP: _fake},
    autograd={OP: (_setup_context, _backward)},
    reference=reference,
    backends=(),
    kernels={OP: {"CPU": run_cpu, "CUDA": _other_device}},
)
