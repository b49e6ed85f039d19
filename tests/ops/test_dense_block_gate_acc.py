"""Issue 14 fix 2: the gated fusion's backward sums E[n] = dO[n]^T F[n] over every pixel of a sample in acc (fp32)
and keeps it in acc (csrc/dense_block_common.h, pixel_sum_acc). It was rounded to the features' dtype first:
in float16 the pixel sum overflowed to Inf on large maps, and in bfloat16 the rounding error of E was amplified
by the cancellation in dg = sum_c E * fuse_w. Compared with the float64 reference on the same rounded values."""
from __future__ import annotations

import pytest
import torch

from srkernels import ops, use_backend
from srkernels.ops.dense_block import rdb_plan

from ..conftest import TOL, assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(x, ws, bs, fw, fb, gate, go, plan, backend, dtype):
    leaves = [t.to(dtype).to(torch.float64 if backend == "reference" else dtype).requires_grad_()
              for t in [x, *ws, *bs, fw, fb, *gate]]
    L = len(ws)
    xx, wl, bl, fwl, fbl, gl = leaves[0], leaves[1:1 + L], leaves[1 + L:1 + 2 * L], leaves[1 + 2 * L], \
        leaves[2 + 2 * L], tuple(leaves[3 + 2 * L:])
    with use_backend(backend):
        out = ops.dense_block(xx, wl, bl, plan, fuse_weight=fwl, fuse_bias=fbl, gate=gl)
    return torch.autograd.grad(out, leaves, go.to(dtype).to(out.dtype))


def _case(H, W, go_fn, seed):
    g = torch.Generator().manual_seed(seed)
    plan = rdb_plan(2, 2, 1)  # even sizes: bfloat16 takes the micro-kernel path
    K = plan.fuse_len
    x = torch.rand(1, 2, H, W, generator=g, dtype=torch.float64) * 4
    ws = [torch.rand(2, 2, 3, 3, generator=g, dtype=torch.float64) * 0.2]  # positive: F stays large
    bs = [torch.zeros(2, dtype=torch.float64)]
    fw = torch.tensor([[1.0] * K, [-1.0] * K], dtype=torch.float64)  # dg = E[0] - E[1]: cancellation
    fb = torch.zeros(2, dtype=torch.float64)
    gate = (torch.randn(2, K, generator=g, dtype=torch.float64) * 0.3, torch.zeros(2, dtype=torch.float64),
            torch.randn(K, 2, generator=g, dtype=torch.float64) * 0.3, torch.zeros(K, dtype=torch.float64))
    return plan, x, ws, bs, fw, fb, gate, go_fn(H, W)


NAMES = ["x", "w0", "b0", "fuse_weight", "fuse_bias", "gate_w1", "gate_b1", "gate_w2", "gate_b2"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_gradients_accumulate_in_fp32(dtype):
    # grad_out channels 1 and 1 + 2^-7 (both exact in bf16 and fp16): dg = -2^-7 * sum_p F; with E rounded
    # to bf16 (relative error up to 2^-9 per entry) dg was off by tens of percent.
    def go(H, W):
        t = torch.ones(1, 2, H, W, dtype=torch.float64)
        t[:, 1] += 2.0 ** -7
        return t
    plan, x, ws, bs, fw, fb, gate, g_out = _case(24, 24, go, seed=1)
    got = _grads(x, ws, bs, fw, fb, gate, g_out, plan, "compiled", dtype)
    ref = _grads(x, ws, bs, fw, fb, gate, g_out, plan, "reference", dtype)
    for name, a, e in zip(NAMES, got, ref):
        assert_close(a, e, dtype, f"{dtype} grad {name}")


def test_float16_pixel_sum_does_not_overflow():
    # E = sum over 64x64 pixels of grad_out (8) * F (about 2 to 4) is ~1e5 > 65504, the float16 maximum; the
    # gate (bias -5: g < 0.01) scales it back, so every gradient the reference gives is finite in float16.
    plan, x, ws, bs, fw, fb, gate, g_out = _case(64, 64, lambda H, W: torch.full((1, 2, H, W), 8.0,
                                                                                 dtype=torch.float64), seed=2)
    fw = fw.abs()  # no cancellation here: E itself is large
    gate = (gate[0], gate[1], gate[2], torch.full_like(gate[3], -5.0))
    xh = x.half().double()
    F = torch.cat([xh, torch.relu(torch.nn.functional.conv2d(xh, ws[0].half().double(), bs[0], padding=1))], 1)
    assert (8.0 * F.sum((2, 3))).max() > 1.2 * torch.finfo(torch.float16).max  # the case reaches the overflow
    got = _grads(x, ws, bs, fw, fb, gate, g_out, plan, "compiled", torch.float16)
    ref = _grads(x, ws, bs, fw, fb, gate, g_out, plan, "reference", torch.float16)
    for name, a, e in zip(NAMES, got, ref):
        assert e.isfinite().all() and e.abs().max() < torch.finfo(torch.float16).max, name
        assert_close(a, e, torch.float16, f"float16 grad {name}")
