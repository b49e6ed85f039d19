"""``winograd_conv3x3``: a 3x3, stride 1, zero-padding 1 convolution by Winograd's minimal filtering F(m x m, 3x3)
(m = 2, 4 or 6), with the conv epilogue ``act(conv + bias) (+ residual)`` fused in. CPU, float32 (or bfloat16
storage with float32 arithmetic), inference.

Two steps: ``winograd_weight(weight, m)`` transforms a ``[C_out, C_in, 3, 3]`` conv weight once (float64, rounded
once to float32; the caller caches it and rebuilds it when the weight changes), then ``winograd_conv3x3(x,
weight_t, bias, act=, residual=)`` runs per call. F(4x4, 3x3) does 4x fewer multiplies than a direct conv and
F(2x2, 3x3) 2.25x; the price is rounding error: on 64-channel convs with unit-scale data, F(4,3) is ~6x and
F(2,3) ~0.4x oneDNN's own float32 error against float64 (benchmarks/bench_winograd_conv3x3.py prints both).
``winograd_use(...)`` is the measured rule for when it beats oneDNN. Kernel contract: docs/ops.md.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _dispatch
from ._registry import OpSpec

OP = "winograd_conv3x3"
ACTS = ("none", "relu")
TILES = (2, 4, 6)  # output tile size m: F(2x2, 3x3), F(4x4, 3x3) and F(6x6, 3x3)

# Lavin & Gray's matrices (points 0, +-1, +-2, inf; F(6,3) and F(4,5) add +-1/2), keyed by (m, r): y = A^T
# [(G g G^T) * (B^T d B)] A for one tile, T = m + r - 1. B^T depends only on the points, so F(2,5) shares
# F(4,3)'s and F(4,5) F(6,3)'s; A^T row i is p^i on the finite points (plus 1 in the inf column of the last row);
# G row p is [1, p, .., p^(r-1)] / prod_{q != p}(p - q) over the finite points, the inf row picks the last tap
# (tests check each pair against F.conv2d in float64).
_G = {
    (2, 3): ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
    (4, 3): ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
             (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
    (6, 3): ((-1, 0, 0), (-2 / 9, -2 / 9, -2 / 9), (-2 / 9, 2 / 9, -2 / 9), (1 / 90, 1 / 45, 2 / 45),
             (1 / 90, -1 / 45, 2 / 45), (32 / 45, 16 / 45, 8 / 45), (32 / 45, -16 / 45, 8 / 45), (0, 0, 1)),
    (2, 5): ((1 / 4, 0, 0, 0, 0), (-1 / 6, -1 / 6, -1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 6),
             (1 / 24, 1 / 12, 1 / 6, 1 / 3, 2 / 3), (1 / 24, -1 / 12, 1 / 6, -1 / 3, 2 / 3), (0, 0, 0, 0, 1)),
    (4, 5): ((-1, 0, 0, 0, 0), (-2 / 9, -2 / 9, -2 / 9, -2 / 9, -2 / 9), (-2 / 9, 2 / 9, -2 / 9, 2 / 9, -2 / 9),
             (1 / 90, 1 / 45, 2 / 45, 4 / 45, 8 / 45), (1 / 90, -1 / 45, 2 / 45, -4 / 45, 8 / 45),
             (32 / 45, 16 / 45, 8 / 45, 4 / 45, 2 / 45), (32 / 45, -16 / 45, 8 / 45, -4 / 45, 2 / 45), (0, 0, 0, 0, 1)),
}
_BT = {  # by tile size T
    4: ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    6: ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
        (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
    8: ((-1, 0, 21 / 4, 0, -21 / 4, 0, 1, 0), (0, 1, 1, -17 / 4, -17 / 4, 1, 1, 0),
        (0, -1, 1, 17 / 4, -17 / 4, -1, 1, 0), (0, 1 / 2, 1 / 4, -5 / 2, -5 / 4, 2, 1, 0),
        (0, -1 / 2, 1 / 4, 5 / 2, -5 / 4, -2, 1, 0), (0, 2, 4, -5 / 2, -5, 1 / 2, 1, 0),
        (0, -2, 4, 5 / 2, -5, -1 / 2, 1, 0), (0, -1, 0, 21 / 4, 0, -21 / 4, 0, 1)),
}
_AT = {
    (2, 3): ((1, 1, 1, 0), (0, 1, -1, -1)),
    (4, 3): ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
    (6, 3): ((1, 1, 1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 1 / 2, -1 / 2, 0), (0, 1, 1, 4, 4, 1 / 4, 1 / 4, 0),
             (0, 1, -1, 8, -8, 1 / 8, -1 / 8, 0), (0, 1, 1, 16, 16, 1 / 16, 1 / 16, 0),
             (0, 1, -1, 32, -32, 1 / 32, -1 / 32, 1)),
    (2, 5): ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 1)),
    (4, 5): ((1, 1, 1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 1 / 2, -1 / 2, 0), (0, 1, 1, 4, 4, 1 / 4, 1 / 4, 0),
             (0, 1, -1, 8, -8, 1 / 8, -1 / 8, 1)),
}


def _mat(table: dict, key, like: Tensor) -> Tensor:
    return torch.tensor(table[key], dtype=like.dtype, device=like.device)


def tile_of(weight_t: Tensor) -> int:
    """The output tile size m of a transformed weight (16 positions: 2, 36: 4, 64: 6)."""
    P = weight_t.shape[0]
    if P not in (16, 36, 64):
        raise ValueError(f"weight_t must have 16 (F(2,3)), 36 (F(4,3)) or 64 (F(6,3)) transform positions in dim 0, "
                         f"got {P}")
    return {16: 2, 36: 4, 64: 6}[P]


def _check_weight(weight, m: int, r: int = 3, tiles: tuple = TILES) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating, got dtype {weight.dtype}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (r, r):
        raise ValueError(f"weight must be [C_out, C_in, {r}, {r}], got shape {list(weight.shape)}")
    if m not in tiles:
        raise ValueError(f"m must be one of {tiles}, got {m!r}")


def transform_weight(weight: Tensor, m: int, r: int) -> Tensor:
    """``[C_out, C_in, r, r]`` -> ``[(m+r-1)^2, C_in, C_out]``, ``U = G g G^T`` of F(m x m, r x r) in float64,
    rounded once to ``weight``'s dtype; contiguous, differentiable (the shared body of ``winograd_weight`` and
    ``winograd_conv5x5.winograd_weight5``; the weight is checked by them)."""
    # one float64 matmul by G (x) G (U[a*T+b, c, k] = sum_ij G[a,i] G[b,j] w[k,c,i,j]): fewer and smaller
    # temporaries than an einsum then a reshape copy, which made RCAN's first call (413 weights) page-fault
    # ~800 MB of fresh memory
    w = weight.double()
    k, c = w.shape[:2]
    T = m + r - 1
    u = torch.mm(_kron_g(m, False, torch.float64, w.device, r), w.transpose(0, 1).reshape(c * k, r * r).t())
    return u.view(T * T, c, k).to(weight.dtype).contiguous()


def winograd_weight(weight: Tensor, m: int = 4) -> Tensor:
    """``[C_out, C_in, 3, 3]`` conv weight -> ``[(m+2)^2, C_in, C_out]`` transformed weight ``U = G g G^T``,
    computed in float64 and rounded once to ``weight``'s dtype; contiguous. Differentiable (plain torch ops).
    Position ``p = a * (m+2) + b`` of the ``(m+2) x (m+2)`` tile."""
    _check_weight(weight, m)
    return transform_weight(weight, m, 3)


@functools.cache
def _kron_g(m: int, flip: bool, dtype: torch.dtype, device: torch.device, r: int = 3) -> Tensor:
    """``G (x) G`` of F(m, r) as a ``[(m+r-1)^2, r^2]`` matrix (row ``a * T + b``, column ``i * r + j``:
    ``G[a, i] G[b, j]``), built in float64; ``flip`` reverses the columns, i.e. transforms the kernel rotated by
    180 degrees."""
    g = torch.tensor(_G[(m, r)], dtype=torch.float64)
    k = torch.kron(g, g)
    return (k.flip(1) if flip else k).to(dtype=dtype, device=device)


def transform_weight_step(weight: Tensor, m: int, r: int, grad_input: bool) -> Tensor:
    """The body of ``winograd_weight_step`` for F(m, r) (also ``winograd_conv5x5.winograd_weight5_step``):
    one matmul in ``weight``'s dtype, no autograd; the weight is checked by the callers."""
    w = weight.detach()
    k, c = w.shape[:2]
    T = m + r - 1
    mat = _kron_g(m, grad_input, w.dtype, w.device, r)
    if grad_input:  # out[p, k, c] = sum_j flipped[p, j] w[k, c, j]: w's own memory order
        return torch.mm(mat, w.reshape(k * c, r * r).t()).view(T * T, k, c)
    return torch.mm(mat, w.transpose(0, 1).reshape(c * k, r * r).t()).view(T * T, c, k)


def winograd_weight_step(weight: Tensor, m: int = 4, *, grad_input: bool = False) -> Tensor:
    """``winograd_weight`` for a weight that changes every training step: one matmul in ``weight``'s dtype
    (float32: within ~1 ulp of ``winograd_weight``'s float64-then-rounded result; 40-70 us instead of ~350 us
    for 64->64 on one Zen 5 core). No autograd (the weight is detached).

    ``grad_input=True`` transforms the weight of the conv that computes the input gradient of a 3x3 stride-1
    padding-1 conv, ``conv3x3(grad_y, weight.flip(2, 3).transpose(0, 1), padding=1)``: ``[(m+2)^2, C_out,
    C_in]``, flip and transpose folded into the matmul (no copy of the weight)."""
    _check_weight(weight, m)
    return transform_weight_step(weight, m, 3, grad_input)


def tiled_reference(x: Tensor, weight_t: Tensor, bias: Tensor | None, act: str, residual: Tensor | None, m: int,
                    r: int) -> Tensor:
    """F(m x m, r x r) on ``weight_t`` in plain torch ops (any dtype and device, differentiable; zero padding
    r // 2): the same tiles and transforms as the kernel, in ``x``'s dtype (bf16 / fp16: in float32, rounded once
    at the end, as the kernel does). The body of ``reference`` here and in winograd_conv5x5.py."""
    if x.dtype in (torch.bfloat16, torch.float16):
        f = (lambda t: None if t is None else t.float())
        return tiled_reference(x.float(), weight_t.float(), f(bias), act, f(residual), m, r).to(x.dtype)
    T = m + r - 1
    N, C, H, W = x.shape
    K = weight_t.shape[2]
    th, tw = -(-H // m), -(-W // m)
    # pad r // 2 on top / left and up to the last tile's far edge on the bottom / right
    p = r // 2
    xp = F.pad(x, (p, tw * m + T - m - p - W, p, th * m + T - m - p - H))
    d = xp.unfold(2, T, m).unfold(3, T, m)  # [N, C, th, tw, T, T]
    bt, at = _mat(_BT, T, x), _mat(_AT, (m, r), x)
    v = torch.einsum("ai,nchwij,bj->abnhwc", bt, d, bt)
    mm = torch.einsum("abnhwc,abck->abnhwk", v, weight_t.reshape(T, T, C, K).to(x.dtype))
    y = torch.einsum("ia,abnhwk,jb->nkhiwj", at, mm, at).reshape(N, K, th * m, tw * m)[:, :, :H, :W]
    if bias is not None:
        y = y + bias.view(1, K, 1, 1)
    if act == "relu":
        y = torch.relu(y)
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=_checks.suggest_memory_format(x))


def reference(x: Tensor, weight_t: Tensor, bias: Tensor | None = None, act: str = "none",
              residual: Tensor | None = None, upscale: int = 1) -> Tensor:
    """The op in plain torch ops on ``weight_t`` (any dtype and device, differentiable): the same tiles and
    transforms as the kernel, in ``x``'s dtype. The exact-arithmetic equal of
    ``act(F.conv2d(x, w, bias, padding=1)) (+ residual)`` for ``weight_t = winograd_weight(w, m)``; with
    ``upscale`` r, then ``subpixel_shuffle(y, r)``."""
    y = tiled_reference(x, weight_t, bias, act, residual, tile_of(weight_t), 3)
    return y if upscale == 1 else subpixel_shuffle(y, upscale)


def subpixel_shuffle(y: Tensor, r: int) -> Tensor:
    """The op's ``upscale`` rearrangement: channel ``(i * r + j) * (C / r^2) + c`` of pixel (h, w) -> channel c of
    pixel (h * r + i, w * r + j) (sub-pixel-major: a vector of channels stays one sub-pixel's, so the kernel
    stores it whole). ``torch.pixel_shuffle(y, r)`` is this for ``y``'s channels in ``shuffle_order(C, r)``."""
    N, C, H, W = y.shape
    c = C // (r * r)
    out = y.reshape(N, r, r, c, H, W).permute(0, 3, 4, 1, 5, 2).reshape(N, c, H * r, W * r)
    return out.contiguous(memory_format=_checks.suggest_memory_format(y))


def shuffle_order(channels: int, r: int) -> Tensor:
    """The permutation of a conv's ``channels`` output channels after which ``upscale=r`` equals
    ``torch.pixel_shuffle``: ``winograd_weight(w[order], m)`` and ``bias[order]`` (channel ``c * r^2 + i * r + j``
    of torch's order moves to ``(i * r + j) * (channels / r^2) + c``)."""
    c = channels // (r * r)
    return torch.arange(channels).view(c, r * r).t().reshape(-1)


def conv_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, act: str = "none",
                   residual: Tensor | None = None) -> Tensor:
    """What the op approximates, with the original weight: ``act(F.conv2d(x, weight, bias, padding=1))
    (+ residual)``, the formula of ``srkernels.nn.conv.conv2d`` (padding ``weight``'s size // 2: also the 5x5
    op's)."""
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)
    if act == "relu":
        y = torch.relu(y)
    return y if residual is None else y + residual


def winograd_conv3x3(
    x: Tensor,
    weight_t: Tensor,
    bias: Tensor | None = None,
    *,
    act: str | None = None,
    residual: Tensor | None = None,
    upscale: int = 1,
) -> Tensor:
    """``act(conv3x3(x) + bias) (+ residual)``, stride 1, zero padding 1, by Winograd F(m x m, 3x3).

    Args:
        x: ``[N, C_in, H, W]`` float32 or bfloat16 (float64 runs the torch reference), contiguous or
            channels_last (channels_last is the kernel's native layout; other layouts are converted first).
            bfloat16 is storage only: the transforms and GEMMs run in float32 and the result is rounded once.
        weight_t: ``winograd_weight(weight, m)``, ``[(m+2)^2, C_in, C_out]``, x's dtype; float32 for a
            bfloat16 x (a bf16 transformed weight would cost F(4,3) ~7x the error of a bf16 conv, docs/ops.md).
        bias: ``(C_out,)`` of x's dtype or float32, or None.
        act: None/``"none"`` or ``"relu"`` (applied before the residual add).
        residual: optional ``[N, C_out, H, W]`` tensor added last (any layout).
        upscale: r >= 1; r > 1 stores the result pixel-shuffled (``subpixel_shuffle``: ``[N, C_out / r^2, H r,
            W r]``; no residual), the upsampler's conv + shuffle in one pass: for ``torch.pixel_shuffle``'s
            result, prepare ``weight_t`` and ``bias`` in ``shuffle_order(C_out, r)``.

    Returns ``[N, C_out, H, W]`` (``upscale`` r: ``[N, C_out / r^2, H r, W r]``) in ``x``'s memory format.
    Inference: no autograd through the compiled kernel; a call that needs a gradient runs the (differentiable,
    slow) torch reference instead.
    """
    return run_op(OP, winograd_channels(tile_of), reference, x, weight_t, bias, act, residual, upscale)


def winograd_channels(tile_of_fn):
    """The ``channels`` check of ``run_op`` for a Winograd weight_t ``[P, C_in, C_out]`` (``tile_of_fn`` checks
    its positions P)."""
    def channels(weight_t: Tensor) -> tuple[int, int]:
        if weight_t.dim() != 3:
            raise ValueError(f"weight_t must be 3-D [P, C_in, C_out] (from the op's weight transform), got shape "
                             f"{list(weight_t.shape)}")
        tile_of_fn(weight_t)
        return weight_t.shape[1], weight_t.shape[2]
    return channels


def run_op(op: str, channels, ref, x, weight_t, bias, act, residual, upscale: int = 1) -> Tensor:
    """Validate and run ``op`` (a conv kernel on a prepared weight: winograd_conv3x3, winograd_conv5x5,
    direct_conv2d); ``channels(weight_t)`` checks weight_t's layout (ValueError) and returns its ``(C_in,
    C_out)``, ``ref`` is the op's reference: the body of their public functions. ``upscale`` (winograd_conv3x3
    only) is passed on when not 1."""
    _checks.feature_map("x", x)
    x, weight_t, bias, residual = _dispatch.autocast_args(op, x, weight_t, bias, residual)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise TypeError(f"x must be float32 or bfloat16 (or float64 for the reference), got dtype {x.dtype}")
    if x.dtype == torch.bfloat16:  # bf16 storage, float32 arithmetic: the transformed weight stays float32
        if isinstance(weight_t, Tensor) and weight_t.dtype != torch.float32:
            raise TypeError(f"weight_t must be float32 for a bfloat16 x (prepared from weight.float()), got dtype "
                            f"{weight_t.dtype}")
        _checks.like("weight_t", weight_t, x, dtype=torch.float32)
    else:
        _checks.like("weight_t", weight_t, x)
    c_in, K = channels(weight_t)
    N, C, H, W = x.shape
    if c_in != C:
        raise ValueError(f"weight_t has {c_in} input channels but x has {C}")
    if K == 0:
        raise ValueError("weight_t has 0 output channels")
    if bias is not None:
        # x's dtype, or float32 (the kernel's arithmetic) for a bf16 x
        f32_ok = x.dtype == torch.bfloat16 and isinstance(bias, Tensor) and bias.dtype == torch.float32
        _checks.like("bias", bias, x, ((K,),), dtype=torch.float32 if f32_ok else None)
    act = _checks.choice("act", "none" if act is None else act, ACTS)
    if residual is not None:
        _checks.like("residual", residual, x, ((N, K, H, W),))
    args = (x, weight_t, bias, act, residual)
    if upscale != 1:
        if isinstance(upscale, bool) or not isinstance(upscale, int) or upscale < 1:
            raise ValueError(f"upscale must be an int >= 1, got {upscale!r}")
        if K % (upscale * upscale):
            raise ValueError(f"upscale {upscale} needs C_out divisible by {upscale * upscale}, got {K}")
        if residual is not None:
            raise ValueError("residual cannot be added with upscale > 1")
        args += (upscale,)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:3] + args[4:5])
    backend = "reference" if needs_grad or x.dtype == torch.float64 else _dispatch.choose(op, x.device.type)
    return _dispatch.run(backend, op, args, lambda: ref(*args))


def winograd_use(c_in: int, c_out: int, height: int, width: int, capability: str | None = None, m: int = 4) -> bool:
    """Whether to run this float32 3x3 conv as ``winograd_conv3x3`` F(m, 3) rather than the prepacked oneDNN
    conv: the compiled kernel's ``avx2`` / ``avx512`` variants (``default`` is at::vec's portable code, ~12x
    slower than oneDNN), at least 16 input and output channels and at least 64 pixels -- or, for F(4,3) only,
    fewer than 16 outputs from 32-64 inputs on at least 32x32 pixels (conv2d_pointwise sends 1-4 outputs, a
    model's last conv, to ``direct_conv2d`` first). Measured on an AMD EPYC (Zen 5), one thread, AVX-512 and forced AVX2
    (benchmarks/results/winograd_models.md, benchmarks/bench_winograd_conv3x3.py): 64->64 at LR 8-192 1.7-3.6x
    faster, 16->16 and 32->32 1.6-2.7x, 64->256 2.1-2.4x; 3->64 and 8->8 only 1.0-1.5x (left to oneDNN).
    Fewer outputs (``--channels 64 3``, ``32 3``, ``256 1``, ``16 8``; docs/ops.md ``## winograd_conv3x3``):
    64->3 and 32->3 at 32-192 px 1.30-1.57x on both; left to oneDNN: 16 px (0.76x with AVX2), 256->1 (0.79-0.90x
    with AVX2), 16->8 at 32 px (0.82x with AVX2), F(2,3) (0.88-1.25x). ``capability`` defaults to the one
    srkernels runs (``srkernels.build_info()["cpu_capability"]``)."""
    if not (vector_isa(capability) and c_in >= 16 and height * width >= 64):
        return False
    return c_out >= 16 or (m == 4 and 32 <= c_in <= 64 and height * width >= 32 * 32)


def tile_work(m: int, height: int, width: int) -> int:
    """The GEMM work of F(m, 3) on one ``height x width`` image, in transform positions times tiles (the edge
    tiles computed whole)."""
    return -(-height // m) * -(-width // m) * (m + 2) ** 2


def winograd6_use(height: int, width: int) -> bool:
    """Whether a bf16-storage 3x3 conv that runs as Winograd runs F(6x6, 3x3) rather than F(4x4, 3x3): when F(6,3)
    does >= 1.18x less GEMM work (``tile_work``: 24, 48, 64, 96, 192 px yes; 32 and 40 px no; F(6,3)'s 1.78
    multiplies per output against 2.25 are lost to edge tiles otherwise). Its float32 arithmetic rounds ~2x more
    than F(4,3)'s (64->64: 1.7e-6 against 8.8e-7 relative), a thousandth of bf16 storage's own rounding (1.7e-3
    for either); RCAN x4 on bf16 storage lands as far from float64 with either tile (60.8-67.0 dB Y-PSNR,
    docs/ops.md ``## winograd_conv3x3``). Measured, one thread, AMD EPYC (Zen 5), bf16 storage, F(4,3) / F(6,3)
    time (AVX-512; AVX2 forced): 64->64 at 24 px 1.16x; 1.08x, 32 px 0.95x; 0.87x, 40 px 1.05x; 0.98x, 48 px
    1.17x; 1.10x, 64 px 1.11x; 1.05x, 96 px 1.17x; 1.10x, 192 px 1.19x; 1.10x; 64->256 at 48 and 96 px 1.24x;
    1.14-1.16x. float32 convs keep F(4,3): their numbers are the ones the tests and the README hold."""
    return tile_work(4, height, width) >= 1.18 * tile_work(6, height, width)


def vector_isa(capability: str | None = None) -> bool:
    """Whether ``capability`` (default: the one srkernels runs) is one the Winograd kernels run on: ``avx2`` or
    ``avx512``."""
    return current_capability(capability) in ("avx2", "avx512")


def current_capability(capability: str | None = None) -> str | None:
    """``capability``, or the one srkernels runs (``srkernels.build_info()["cpu_capability"]``; None without the
    compiled extension)."""
    if capability is None:
        from .. import _backend

        if _backend._C is None:
            return None
        capability = _backend._C.cpu_capability()
    return capability


# ---- the spec (srkernels/ops/_registry.py registers it) ----


def fake_for(op: str):
    """The fake (meta) kernel of ``op``: this op's and winograd_conv5x5's (the same output rule; ``upscale``:
    this op's only)."""
    def _fake(x, weight_t, bias, act, residual, upscale=1):
        torch._check(act in ACTS, lambda: f"{op}: act must be one of {ACTS}, got {act!r}")
        N, _, H, W = x.shape
        shape = (N, weight_t.shape[2] // (upscale * upscale), H * upscale, W * upscale)
        return x.new_empty(shape).contiguous(memory_format=_checks.suggest_memory_format(x))
    return _fake


SPEC = OpSpec(
    name=OP,
    schemas={OP: "(Tensor x, Tensor weight_t, Tensor? bias, str act, Tensor? residual, int upscale=1) -> Tensor"},
    fakes={OP: fake_for(OP)},
    autograd={},
    reference=reference,
    backends=("cpu",),  # a CPU algorithm: no CUDA or Triton kernel (cuDNN has its own Winograd)
    # float32 under autocast: the op's own autocast rule keeps the arithmetic of the float32 kernel (a bf16
    # transformed weight would round F(4,3)'s already larger error further); autocast's bf16 model convs reach
    # the kernel's bf16 storage through conv2d_pointwise's winograd_bf16 rule instead, which calls the op with
    # the autocast key excluded (_dispatch.call_cast)
    autocast={OP: "fp32"},
)
