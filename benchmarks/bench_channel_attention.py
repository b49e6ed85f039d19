"""Channel attention + residual (RCAB's tail): eager reference vs torch.compile(reference) vs srkernels.

    python benchmarks/bench_channel_attention.py [--quick] [--cpu|--cuda] [--malloc=fresh|reuse]
        # table, JSON line, README update (--malloc: pin glibc's allocation regime, see srkernels.benchmark)
    pytest benchmarks/bench_channel_attention.py --benchmark-group-by=group  # pytest-benchmark view

Bytes model (forward, inference): the op must read x and the residual and write out: 3 tensor passes. Eager
PyTorch makes 6 (pool reads x; x*g reads x, writes t; t+r reads t and r, writes out); a pool kernel + a
scale kernel make 4; 3 is the floor, reached on CPU when a sample stays cache-resident between the two.
The row `apply only` times just out = r + x * g (3 passes, no pooling): no implementation of the op can beat it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from srkernels import ops  # noqa: E402
from srkernels.reference import functional as RF  # noqa: E402

BENCH = "channel_attention"
SHAPES, DTYPES = harness.ATTENTION_SHAPES, harness.DTYPES  # also read by scripts/gpu_check.py


def make(shape, dtype, device):
    return harness.attention_inputs(shape, dtype, device, lambda t, C, Cr: dict(
        w1=t(Cr, C, scale=C**-0.5), b1=t(Cr, scale=0.1), w2=t(C, Cr, scale=Cr**-0.5), b2=t(C, scale=0.1)))


def variants(a: dict) -> dict:
    x, r = a["x"], a["residual"]
    w = (a["w1"], a["b1"], a["w2"], a["b2"])
    out, tmp = torch.empty_like(x), torch.empty_like(x)

    def eager_prealloc():
        g = torch.sigmoid(torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(
            x.mean((2, 3)), w[0], w[1])), w[2], w[3]))
        torch.mul(x, g[:, :, None, None], out=tmp)
        return torch.add(tmp, r, out=out)

    gate = torch.rand(x.shape[0], x.shape[1], 1, 1, dtype=x.dtype, device=x.device)
    return {
        **harness.standard_variants(RF.channel_attention, ops.channel_attention, (x, *w), r, eager_prealloc, out),
        # the op's last step alone (no pooling, no MLP): a lower bound for any implementation of the op
        "apply only (addcmul+prealloc)": lambda: torch.addcmul(r, x, gate, out=out),
    }


test_channel_attention = harness.pytest_benchmark(BENCH, SHAPES, DTYPES, make, variants)


if __name__ == "__main__":
    harness.main(BENCH, SHAPES, DTYPES, make, variants)
