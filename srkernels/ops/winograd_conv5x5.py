"""``winograd_conv5x5``: a 5x5, stride 1, zero-padding 2 convolution by Winograd's minimal filtering F(4x4, 5x5)
or F(2x2, 5x5), with the conv epilogue ``act(conv + bias) (+ residual)`` fused in. CPU, float32 (or bfloat16
storage with float32 arithmetic), inference.

The 5x5 sibling of ``winograd_conv3x3`` (srkernels/ops/winograd_conv3x3.py, whose matrices, reference and
argument checks it shares): F(2x2, 5x5) takes 6x6 input tiles on the same points (0, +-1, +-2, inf) as F(4x4,
3x3), so the same input transform; 36 multiplies per 2x2 outputs instead of 100, 2.78x fewer than a direct conv.
Used for SRCNN's 5x5 64->32 layer (~89% of its FLOPs). F(4x4, 5x5) takes 8x8 tiles on F(6x6, 3x3)'s points
(adding +-1/2), so that op's input transform: 64 multiplies per 4x4 outputs (6.25x fewer than direct), with
1.1-2x F(2,5)'s float32 rounding (~5x oneDNN's, F(4,3)'s class): the inference tile; F(2,5) is training's (its
rounding enters the gradients) and ``SRKERNELS_WINOGRAD=2``'s. ``winograd_weight5(weight, m)`` transforms a
``[C_out, C_in, 5, 5]`` weight once (float64, rounded once); ``winograd5_use`` is the measured rule for when it
beats oneDNN. Kernel contract: docs/ops.md.
"""
from __future__ import annotations

from torch import Tensor

from ._registry import OpSpec
from .winograd_conv3x3 import (_check_weight, current_capability, fake_for, run_op, tiled_reference,
                               transform_weight, transform_weight_step, winograd_channels)

OP = "winograd_conv5x5"
R = 5
TILES5 = {36: 2, 64: 4}  # transform positions -> output tile m: F(2x2, 5x5), F(4x4, 5x5)


def winograd_weight5(weight: Tensor, m: int = 2) -> Tensor:
    """``[C_out, C_in, 5, 5]`` conv weight -> ``[(m+4)^2, C_in, C_out]`` transformed weight ``U = G g G^T`` of
    F(m x m, 5x5) (m = 2 or 4), computed in float64 and rounded once to ``weight``'s dtype;
    contiguous, differentiable. Position ``p = a * (m+4) + b`` of the tile."""
    _check_weight(weight, m, R, tuple(TILES5.values()))
    return transform_weight(weight, m, R)


def winograd_weight5_step(weight: Tensor, *, grad_input: bool = False) -> Tensor:
    """``winograd_weight5`` for a weight that changes every training step: one matmul in ``weight``'s dtype
    (``winograd_conv3x3.winograd_weight_step``'s rules), no autograd. ``grad_input=True``: the weight of the
    input-gradient conv ``conv5x5(grad_y, weight.flip(2, 3).transpose(0, 1), padding=2)``, ``[36, C_out,
    C_in]``. F(2x2, 5x5) only (training's tile)."""
    _check_weight(weight, 2, R, (2,))
    return transform_weight_step(weight, 2, R, grad_input)


def check_positions(weight_t: Tensor) -> int:
    """The output tile size of a transformed weight (36 positions in dim 0: 2, 64: 4), else a ValueError."""
    P = weight_t.shape[0]
    if P not in TILES5:
        raise ValueError(f"weight_t must have 36 (F(2x2,5x5)) or 64 (F(4x4,5x5)) transform positions in dim 0, "
                         f"got {P}")
    return TILES5[P]


def reference(x: Tensor, weight_t: Tensor, bias: Tensor | None = None, act: str = "none",
              residual: Tensor | None = None) -> Tensor:
    """The op in plain torch ops on ``weight_t`` (any dtype and device, differentiable): the kernel's tiles and
    transforms in ``x``'s dtype; in exact arithmetic ``act(F.conv2d(x, w, bias, padding=2)) (+ residual)`` for
    ``weight_t = winograd_weight5(w)``."""
    return tiled_reference(x, weight_t, bias, act, residual, check_positions(weight_t), R)


def winograd_conv5x5(
    x: Tensor,
    weight_t: Tensor,
    bias: Tensor | None = None,
    *,
    act: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``act(conv5x5(x) + bias) (+ residual)``, stride 1, zero padding 2, by Winograd F(m x m, 5x5).

    Arguments, result and gradient rule as ``winograd_conv3x3`` (float32 or bfloat16 x with a float32 weight_t;
    float64 or a call that needs a gradient runs the torch reference), with ``weight_t = winograd_weight5(weight,
    m)``, ``[(m+4)^2, C_in, C_out]``.
    """
    return run_op(OP, winograd_channels(check_positions), reference, x, weight_t, bias, act, residual)


def winograd5_use(c_in: int, c_out: int, height: int, width: int, capability: str | None = None,
                  m: int = 2) -> bool:
    """Whether to run this float32 5x5 stride-1 padding-2 conv as ``winograd_conv5x5`` F(m, 5) rather than the
    prepacked oneDNN conv: the ``avx2`` / ``avx512`` builds and at least 16 input and output channels; for F(2,5)
    on ``avx512`` also more than 16 output channels. Measured on an AMD EPYC (Zen 5), one thread, against the
    prepacked oneDNN conv (``benchmarks/bench_winograd_conv5x5.py``; docs/ops.md "winograd_conv5x5"), AVX-512;
    forced AVX2:

    - F(4,5): 64->32 (SRCNN) at 6-96 px 1.5-3.5x; 1.5-4.6x, 16->16 at 16-48 px 1.8-2.2x; 2.2-2.4x, 32->24
      1.6-3.1x; 1.1-2.6x (6-96 px), 16->48 2.2-2.7x: every case measured, and faster than F(2,5) in all but
      one (32->24 at 6 px with AVX2: 1.11x against 1.17x);
    - F(2,5): 64->32 1.6-1.7x; 2.2-2.7x at 32-192 px, 1.3-1.5x at 2-6 px, C_in 16-32 x C_out 24-48 1.3-1.6x;
      1.3-2.4x; 16 output channels at 48-96 px 0.6-1.04x on AVX-512 (one vector of output channels: oneDNN's
      best case), 1.5-1.7x on AVX2; 8->8, 3->64, 32->1 lose or tie at 48 px.

    No pixel threshold. ``height``/``width`` are kept for the signature of ``winograd_use``. ``capability``
    defaults to the one srkernels runs."""
    cap = current_capability(capability)
    if cap not in ("avx2", "avx512"):
        return False
    return min(c_in, c_out) >= 16 and (m == 4 or cap == "avx2" or c_out > 16)


# ---- the spec (srkernels/ops/_registry.py registers it) ----


SPEC = OpSpec(
    name=OP,
    schemas={OP: "(Tensor x, Tensor weight_t, Tensor? bias, str act, Tensor? residual) -> Tensor"},
    fakes={OP: fake_for(OP)},
    autograd={},
    reference=reference,
    backends=("cpu",),  # a CPU algorithm, like winograd_conv3x3
    autocast={OP: "fp32"},  # float32 arithmetic under autocast (winograd_conv3x3's reasoning)
)
