"""Balanced attention (BAM) + residual: eager reference vs torch.compile(reference) vs srkernels.

    python benchmarks/bench_balanced_attention.py [--quick] [--cpu|--cuda] [--malloc=fresh|reuse]
    pytest benchmarks/bench_balanced_attention.py --benchmark-group-by=group

Bytes model (forward): floor 3 passes (read x, read residual, write out). Eager makes 9: mean reads x, max
reads x, x*ca reads x and writes t, t*sa reads and writes t, t+r reads t and r and writes out. The fused
op reads x once for both statistics, then once more (cache-resident per sample on CPU) to write out.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from srkernels import ops  # noqa: E402
from srkernels.reference import functional as RF  # noqa: E402

BENCH = "balanced_attention"
SHAPES, DTYPES = harness.ATTENTION_SHAPES, harness.DTYPES  # also read by scripts/gpu_check.py


def make(shape, dtype, device):
    return harness.attention_inputs(shape, dtype, device, lambda t, C, Cr: dict(
        w1=t(Cr, C, scale=C**-0.5), prelu_w=t(Cr, scale=0.1) + 0.25, w2=t(C, Cr, scale=Cr**-0.5),
        w_sa=t(7, 7, scale=1 / 7)))


def variants(a: dict) -> dict:
    x, r = a["x"], a["residual"]
    w = (a["w1"], a["prelu_w"], a["w2"], a["w_sa"])
    out, tmp = torch.empty_like(x), torch.empty_like(x)

    def eager_prealloc():
        ca = torch.sigmoid(F.linear(F.prelu(F.linear(x.mean((2, 3)), w[0]), w[1]), w[2]))
        sa = torch.sigmoid(F.conv2d(x.amax(1, keepdim=True), w[3][None, None], padding=3))
        torch.mul(x, ca[:, :, None, None], out=tmp)
        tmp.mul_(sa)
        return torch.add(tmp, r, out=out)

    return harness.standard_variants(RF.balanced_attention, ops.balanced_attention, (x, *w), r, eager_prealloc, out)


test_balanced_attention = harness.pytest_benchmark(BENCH, SHAPES, DTYPES, make, variants)


if __name__ == "__main__":
    harness.main(BENCH, SHAPES, DTYPES, make, variants)
