"""Shared by the Triton attention ops: layouts, tile sizes, the tiny MLP (torch ops in the acc dtype; it is
[N, C] x [C, Cr], not worth a kernel) and the partials-merge kernel."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .._util import acc_dtype  # noqa: F401  (the launchers' accumulation dtype)

# Elements per [BLOCK_C, BLOCK_P] tile: enough bytes in flight per program, modest register use.
TILE = 4096
MAX_BLOCK_P = 1024
MAX_BLOCK_C_CL = 128
MAP_TILE = 4096  # [pixels, kernel row] elements per program for the KxK map kernels


def kernel_layout(x: Tensor) -> tuple[Tensor, torch.memory_format]:
    """``x`` in a layout the kernels read natively (NCHW or NHWC), and that layout."""
    if x.is_contiguous():
        return x, torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, torch.channels_last
    fmt = suggest_memory_format(x)
    return x.contiguous(memory_format=fmt), fmt


def like_layout(t: Tensor, fmt: torch.memory_format) -> Tensor:
    return t.contiguous(memory_format=fmt)


def out_target(out: Tensor | None, x_in: Tensor, x: Tensor, fmt: torch.memory_format, op: str) -> Tensor:
    """Where a forward's final kernel writes: a new tensor in ``x``'s (converted) layout ``fmt``; for an
    ``_out`` op, ``out`` itself when it has that layout (then its strides address the same elements as x's),
    else such a temporary, which the caller copies into ``out``."""
    if out is None:
        return torch.empty_like(x)
    torch._check(
        out.shape == x.shape, lambda: f"{op}: out must have the shape of x {list(x.shape)}, got {list(out.shape)}"
    )
    torch._check(out.dtype == x.dtype, lambda: f"{op}: out must have dtype {x.dtype}, got {out.dtype}")
    torch._check(out.device == x.device, lambda: f"{op}: out must be on {x.device}, got {out.device}")
    torch._check(not torch._C._overlaps(out, x_in), lambda: f"{op}: out must not overlap x")
    return out if out.is_contiguous(memory_format=fmt) else torch.empty_like(x)


def kernel_residual(
    residual: Tensor | None, x: Tensor, fmt: torch.memory_format, dst: Tensor, op: str
) -> Tensor | None:
    """``residual`` in layout ``fmt``, safe to read while the kernels write ``dst``: the very same elements
    (``out=residual``) are fine, as each element is loaded before it is stored, by the same program; any
    other overlap would race between programs, so that residual is copied first."""
    if residual is None:
        return None
    torch._check(residual.shape == x.shape, lambda: f"{op}: residual must have the shape of x {list(x.shape)}")
    residual = like_layout(residual, fmt)
    if torch._C._overlaps(residual, dst) and not (
        residual.storage_offset() == dst.storage_offset() and strides(residual) == strides(dst)
    ):
        residual = residual.clone(memory_format=fmt)
    return residual


def strides(t: Tensor) -> tuple[int, int, int]:
    """(batch, channel, pixel) strides; H and W are merged into one pixel index p = h * W + w, which both
    supported layouts allow (stride(H) == W * stride(W)). Size-1 dims may carry any stride, hence the cases."""
    _, _, h, w = t.shape
    if w == 1:
        sp = t.stride(2) if h > 1 else 1
    else:
        torch._check(h == 1 or t.stride(2) == w * t.stride(3), lambda: "srkernels_triton: H and W must merge")
        sp = t.stride(3)
    return t.stride(0), t.stride(1), sp


def tile_blocks(C: int, HW: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): the contiguous dim gets the long side of the tile."""
    np2 = triton.next_power_of_2
    if channels_last:
        bc = min(np2(max(C, 1)), MAX_BLOCK_C_CL)
        bp = min(np2(max(HW, 1)), max(1, TILE // bc))
    else:
        bp = min(np2(max(HW, 1)), MAX_BLOCK_P)
        bc = min(np2(max(C, 1)), max(1, TILE // bp))
    return bc, bp


def map_block(HW: int, K: int) -> int:
    return min(triton.next_power_of_2(max(HW, 1)), max(16, MAP_TILE // triton.next_power_of_2(K)))


# ---- the squeeze-excite MLP, in acc ---------------------------------------------------------------------


def _slopes(act_weight: Tensor, acc: torch.dtype) -> Tensor:
    return act_weight.reshape(-1).to(acc)  # [Cr] (or [1], broadcast)


def mlp_forward(
    s: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, act_weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """s [N, C] acc -> (h, a, g): pre-activation, activation [N, Cr], gate sigmoid(z) [N, C]."""
    acc = s.dtype
    h = s @ w1.to(acc).t()
    if b1 is not None:
        h = h + b1.to(acc)
    if act_weight is None:
        a = torch.relu(h)
    else:
        a = torch.where(h > 0, h, h * _slopes(act_weight, acc))
    z = a @ w2.to(acc).t()
    if b2 is not None:
        z = z + b2.to(acc)
    return h, a, torch.sigmoid(z)


def mlp_backward(
    dg: Tensor,
    s: Tensor,
    h: Tensor,
    a: Tensor,
    g: Tensor,
    w1: Tensor,
    w2: Tensor,
    act_weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """From dL/dg [N, C] (acc) -> (ds [N, C], grad_w1, grad_b1, grad_w2, grad_b2, grad_act_weight), all acc;
    batch sums are matmuls / dim-0 sums (fixed order)."""
    acc = dg.dtype
    dz = dg * g * (1 - g)
    grad_w2 = dz.t() @ a
    grad_b2 = dz.sum(0)
    da = dz @ w2.to(acc)
    pos = h > 0
    if act_weight is None:
        # ATen's relu backward, threshold_backward(grad, relu(h), 0): 0 where h <= 0, so a NaN h passes da
        dh = torch.where(h <= 0, torch.zeros_like(da), da)
        grad_aw = None
    else:
        sl = _slopes(act_weight, acc)
        dh = torch.where(pos, da, da * sl)
        grad_aw = torch.where(pos, torch.zeros_like(da), da * h).sum(0)
        if act_weight.numel() == 1:
            grad_aw = grad_aw.sum()
        grad_aw = grad_aw.reshape(act_weight.shape)
    grad_w1 = dh.t() @ s
    grad_b1 = dh.sum(0)
    ds = dh @ w1.to(acc)
    return ds, grad_w1, grad_b1, grad_w2, grad_b2, grad_aw


# ---- kernels shared by both ops ------------------------------------------------------------------------


@triton.jit
def merge_partials_kernel(
    psum_ptr, pm2_ptr, out_ptr, C, HW, NPB, BLOCK_P_SRC, denom,
    WITH_M2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Per-pixel-block partials [N, NPB, C] -> out[n, 0, c] = sum_k psum / denom, and with WITH_M2
    # out[n, 1, c] = population std by Chan's merge of the block (sum, centred M2) pairs. Tiles are reduced
    # in a fixed order (no atomics), so results do not depend on scheduling.
    cb = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    acc_ty = psum_ptr.dtype.element_ty
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    base = n * NPB * C
    total = tl.zeros([BLOCK_C], dtype=acc_ty)
    for k0 in range(0, NPB, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m = (offs_k < NPB)[:, None] & mc[None, :]
        p = tl.load(psum_ptr + base + offs_k.to(tl.int64)[:, None] * C + offs_c[None, :], mask=m, other=0.0)
        total += tl.sum(p, axis=0)
    mean = total / denom
    n_out: tl.constexpr = 2 if WITH_M2 else 1
    tl.store(out_ptr + n * n_out * C + offs_c, mean, mask=mc)
    if WITH_M2:
        m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
        for k0 in range(0, NPB, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < NPB
            m = mk[:, None] & mc[None, :]
            off = base + offs_k.to(tl.int64)[:, None] * C + offs_c[None, :]
            p = tl.load(psum_ptr + off, mask=m, other=0.0)
            q = tl.load(pm2_ptr + off, mask=m, other=0.0)
            cnt = tl.maximum(tl.minimum(HW - offs_k * BLOCK_P_SRC, BLOCK_P_SRC), 1).to(acc_ty)
            d = p / cnt[:, None] - mean[None, :]
            m2 += tl.sum(tl.where(m, q + cnt[:, None] * d * d, 0.0), axis=0)
        var = m2 / HW
        if acc_ty == tl.float64:
            std = tl.sqrt(var)
        else:
            std = tl.sqrt_rn(var)  # tl.sqrt may be the approximate one for fp32
        tl.store(out_ptr + n * n_out * C + C + offs_c, std, mask=mc)


def merge_block_k(npb: int) -> int:
    return min(triton.next_power_of_2(max(npb, 1)), 64)


# ---- registration helpers -------------------------------------------------------------------------------


def _keep_opaque(mode, op, types, args, kwargs):
    return mode.__torch_dispatch__(op, types, args, kwargs)


def finish_registration(op, fake) -> None:
    """Register the shape-only fake kernel (triton_op's default fake runs the body, which under
    TRITON_INTERPRET=1 would execute interpreted kernels on fake tensors), and, in interpreter mode, keep
    the op opaque under functionalization (an interpreted kernel cannot be traced into a graph; compiled
    graphs then call the op eagerly)."""
    op.register_fake(fake)
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return
    if isinstance(merge_partials_kernel, InterpretedFunction):  # every kernel here is jitted in the same mode
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)


# ---- helpers shared by the op modules' kernels and launchers -----------------------------------------------

from torch.library import wrap_triton  # noqa: E402


@triton.jit
def tile_2d(C, HW, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # The [BLOCK_C, BLOCK_P] tile of program (pixel block pb, channel block, sample n) of an (NPB, NCB, N) grid:
    # -> pb, n (int64), channel / pixel offsets and masks, the tile mask, and the offsets as int64 [BLOCK_C, 1]
    # and [1, BLOCK_P] columns for the strided address math n * s_n + c64 * s_c + p64 * s_p.
    pb = tl.program_id(0)
    cb = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mc = offs_c < C
    mp = offs_p < HW
    mask = mc[:, None] & mp[None, :]
    return pb, n, offs_c, offs_p, mc, mp, mask, offs_c.to(tl.int64)[:, None], offs_p.to(tl.int64)[None, :]


@triton.jit
def pixel_block(HW, BLOCK_P: tl.constexpr):
    # Program (pixel block pb, sample n) of an (NPB, N) grid whose programs loop over all channels (with
    # channel_chunk): -> pb, n (int64), the block's pixel offsets and their mask.
    pb = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    return pb, n, offs_p, offs_p < HW


@triton.jit
def channel_chunk(c0, C, mp, BLOCK_C: tl.constexpr):
    # Channels [c0, c0 + BLOCK_C) of a pixel_block program's loop: offsets, mask, and the [BLOCK_C, BLOCK_P] mask.
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    return offs_c, mc, mc[:, None] & mp[None, :]


def geometry(x: Tensor):
    """Tiling of an [N, C, H, W] tensor in a kernel layout for the tile_2d kernels:
    (N, C, H, W, HW, (s_n, s_c, s_p), BLOCK_C, BLOCK_P, pixel blocks NPB, channel blocks NCB)."""
    N, C, H, W = x.shape
    HW = H * W
    sxn, sxc, sxp = strides(x)
    BC, BP = tile_blocks(C, HW, sxc == 1 and C > 1)
    return N, C, H, W, HW, (sxn, sxc, sxp), BC, BP, triton.cdiv(HW, BP), triton.cdiv(C, BC)


def backward_operands(x: Tensor, grad_out: Tensor):
    """The start of a backward launcher: (x in its kernel layout, grad_out in that same layout, geometry(x),
    strides(grad_out), the accumulation dtype)."""
    x, fmt = kernel_layout(x)
    grad_out = like_layout(grad_out, fmt)
    return x, grad_out, geometry(x), strides(grad_out), acc_dtype(x.dtype)


def merge_partials(
    psum: Tensor, pm2: Tensor, out: Tensor, C: int, HW: int, NPB: int, block_p: int, denom, *, batches: int,
    with_m2: bool = False, block_c: int | None = None,
) -> None:
    """Launch merge_partials_kernel over ``batches`` x [NPB, C] partials (see the kernel); BLOCK_C defaults to
    next_power_of_2(C) capped at 128."""
    MBC = min(triton.next_power_of_2(C), 128) if block_c is None else block_c
    wrap_triton(merge_partials_kernel)[(triton.cdiv(C, MBC), batches)](
        psum, pm2, out, C, HW, NPB, block_p, denom, WITH_M2=with_m2, BLOCK_K=merge_block_k(NPB), BLOCK_C=MBC
    )


def forward_operands(
    x: Tensor, residual: Tensor | None, out: Tensor | None, op: str
) -> tuple[Tensor, torch.memory_format, Tensor, Tensor | None]:
    """The start of a forward that has an ``_out`` variant -> (x in its kernel layout, that layout, where the
    final kernel writes (``out_target``), the residual safe to read meanwhile (``kernel_residual``))."""
    x_in = x
    x, fmt = kernel_layout(x)
    dst = out_target(out, x_in, x, fmt, op)
    return x, fmt, dst, kernel_residual(residual, x, fmt, dst, op)


def residual_operand(residual: Tensor | None, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """(pointer, (s_n, s_c, s_p) strides) of an optional residual for a HAS_RES kernel; absent: x and zero
    strides (never read)."""
    return (x, (0, 0, 0)) if residual is None else (residual, strides(residual))


def finish_out(out: Tensor | None, dst: Tensor) -> None:
    """The end of an ``_out`` forward: copy the result from a temporary (see ``out_target``) into ``out``."""
    if out is not None and dst is not out:
        out.copy_(dst)


@triton.jit
def acc(v, F64: tl.constexpr):
    # v in the accumulation dtype: float64 for float64 kernels (F64), float32 for every other dtype
    if F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)
