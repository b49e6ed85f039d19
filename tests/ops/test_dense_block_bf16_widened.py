"""dense_block in bfloat16 inference on a CPU without the bf16 brgemm (no AVX512-BF16 or AMX; here oneDNN capped at
AVX2): the float32 fast path on widened tensors, rounded to bf16 once (csrc/cpu/dense_block.cpp
``dense_block_bf16_widened``), instead of the generic path's ATen bf16 GEMMs. Training keeps the generic path."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import srkernels
from srkernels import _backend

pytestmark = [
    pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built"),
    pytest.mark.skipif(srkernels.build_info().get("cpu_capability") not in ("avx2", "avx512"),
                       reason="the widened path serves the avx2 and avx512 builds (the float32 Winograd layers)"),
]

_SCRIPT = """
import torch, srkernels
from srkernels import nn as N, reference as R
torch.manual_seed(0)
m = N.ResidualDenseBlock(24, 40, 3).to(torch.bfloat16)  # in_len 24..104: not multiples of 16
for p in m.parameters():
    p.data.add_(0.05 * torch.randn_like(p))
ref = R.ResidualDenseBlock(24, 40, 3).double()
ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
x = torch.randn(2, 24, 9, 10, dtype=torch.bfloat16)  # 90 pixels: the 3x3 layers take Winograd (winograd_use)
want = ref(x.double())

def gemms(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::convolution") for e in prof.events())

for fmt in (torch.contiguous_format, torch.channels_last):
    xf = x.contiguous(memory_format=fmt)
    out = []
    with torch.no_grad():
        n = gemms(lambda: out.append(m(xf)))
    y = out[0]
    err = ((y.double() - want).abs().max() / want.abs().max()).item()
    print("inference", fmt, y.dtype, "gemms", n, "err", err)
info = srkernels.cpu_cache_info()["weights"]
print("weights cached", info["entries"], "hits", info["hits"])
xt = x.clone().requires_grad_(True)
y = m(xt)
y.float().sum().backward()
err = ((y.detach().double() - want).abs().max() / want.abs().max()).item()
print("training", y.dtype, "err", err, "grad", xt.grad is not None and bool(torch.isfinite(xt.grad).all()))
"""


def test_bf16_inference_widens_to_the_float32_path():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEDNN_", "DNNL_", "SRKERNELS_DENSE"))}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT)], capture_output=True, text=True,
                          env={**env, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    lines = [line.split() for line in out.splitlines() if line.startswith("inference")]
    assert len(lines) == 2, out
    for line in lines:
        # bf16 out, no ATen GEMM or conv (the generic path runs one per layer and tap), one bf16 rounding of the
        # float32 block (2^-8 relative) and a little float32 arithmetic
        assert line[2] == "torch.bfloat16" and line[4] == "0" and float(line[6]) <= 2 ** -7, out
    cached = out.split("weights cached")[1].split()
    assert int(cached[0]) >= 3 and int(cached[2]) >= 3, out  # the widened layer weights (and their U), reused
    train = out.split("training")[1].split()
    assert train[0] == "torch.bfloat16" and float(train[2]) <= 3e-2 and train[4] == "True", out
