"""dense_block in bfloat16 on CPUs with native bf16 (AVX512-BF16 or AMX): the micro-kernel path (oneDNN brgemm on
bf16 operands, csrc/cpu/dense_block.cpp ``bf16_brgemm_ok``) runs, not the ATen path that converts every GEMM
operand to fp32 (issue #13: that path made bf16 RDN 2.5x slower than fp32 on an AVX512-BF16 CPU without AMX)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import srkernels
from srkernels import _backend
from srkernels import nn as N
from srkernels import reference as R

from ..conftest import assert_close

conv_op = sys.modules["srkernels.ops.conv2d_pointwise"]  # (srkernels.ops.conv2d_pointwise is the function)
W = sys.modules["srkernels.ops.winograd_conv3x3"]


def _native_bf16() -> bool:
    caps = torch._C._cpu._get_cpu_capability() if hasattr(torch._C._cpu, "_get_cpu_capability") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


pytestmark = [
    pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built"),
    pytest.mark.skipif(not _native_bf16(), reason="needs a CPU with native bf16 (AVX512-BF16 or AMX)"),
    pytest.mark.skipif(bool(os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")),
                       reason="oneDNN's ISA is capped by ONEDNN_MAX_CPU_ISA: bf16 may run the ATen path by design"),
    pytest.mark.skipif(not torch.backends.mkldnn.enabled, reason="oneDNN is disabled: bf16 runs the ATen path"),
]


def _block(seed=0):
    # widths past one 64-column micro-kernel block and not multiples of 16 (packing pads them): in_len up to 64,
    # buffer 104 channels, fusion K = 104
    torch.manual_seed(seed)
    m = N.ResidualDenseBlock(24, 40, 2).to(torch.bfloat16)
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return m


def _gemm_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm") for e in prof.events())


def test_bf16_runs_the_micro_kernel_path(monkeypatch):
    monkeypatch.delenv("SRKERNELS_DENSE_GENERIC", raising=False)
    m = _block()
    x = torch.randn(2, 24, 7, 9, dtype=torch.bfloat16, requires_grad=True)
    out = []
    assert _gemm_calls(lambda: out.append(m(x))) == 0  # the ATen path: one GEMM per layer and tap
    # backward: only the fusion weight gradient is an ATen GEMM (csrc/dense_block_common.h fusion_backward)
    assert _gemm_calls(lambda: out[0].float().square().sum().backward()) <= 1


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
def test_bf16_micro_kernel_matches_aten_path_and_float64(monkeypatch, fmt):
    m = _block(1)
    ref = R.ResidualDenseBlock(24, 40, 2).double()
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x = torch.randn(2, 24, 7, 9, dtype=torch.bfloat16)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 24, 7, 9, dtype=torch.bfloat16)

    def run(generic: bool):
        monkeypatch.setenv("SRKERNELS_DENSE_GENERIC", "1" if generic else "0")
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(g)
        return [y.detach(), xi.grad, *(p.grad for p in m.parameters())]

    fast, aten = run(False), run(True)
    for i, (a, b) in enumerate(zip(fast, aten)):
        assert_close(a.float(), b.float(), torch.bfloat16, f"tensor {i}")
    assert_close(fast[0].double(), ref(x.double()), torch.bfloat16, "output vs float64")


# ---- bf16 inference: 3x3 layers of >= 64 channels in and out by Winograd F(4,3) on bf16 storage (csrc/cpu/
# dense_block.cpp, the rule of winograd_bf16 in srkernels/ops/conv2d_pointwise.py: not on AMX CPUs), the others
# and training on brgemm.

def _wide_block(growth, seed=2):
    torch.manual_seed(seed)
    m = N.ResidualDenseBlock(64, growth, 3).to(torch.bfloat16).eval()
    for p in m.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    ref = R.ResidualDenseBlock(64, growth, 3).double()
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    return m, ref


def _winograd_capability() -> bool:
    return _backend._C.cpu_capability() in ("avx2", "avx512")


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("hw", [(9, 11), (8, 8)])
def test_bf16_inference_runs_wide_layers_by_winograd(monkeypatch, fmt, hw):
    m, ref = _wide_block(64)
    x = torch.randn(2, 64, *hw).bfloat16()  # >= 64 px: inside winograd_use
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)

    def run(tile):
        monkeypatch.setenv("SRKERNELS_WINOGRAD", tile)
        with torch.no_grad():
            return m(x)

    srkernels.empty_cpu_cache()
    wino = run("4")
    # F(4,3) at either size, also where winograd6_use would pick F(6,3) for a conv (9 x 11): the cached transforms
    # of the three layers (64, 128, 192 inputs -> 64) have 36 positions (docs/ops.md ## dense_block: memory)
    cached = srkernels.cpu_cache_info()["weights"]["bytes"]
    brgemm = run("0")
    want = ref(x.double())
    assert_close(wino.double(), want, torch.bfloat16, "Winograd on bf16 storage vs float64")
    assert_close(brgemm.double(), want, torch.bfloat16, "brgemm vs float64")
    expected = _winograd_capability() and not _backend._C.amx_bf16()
    assert (not torch.equal(wino, brgemm)) == expected, "Winograd ran" if not expected else "Winograd did not run"
    if expected and conv_op.onednn_bf16():  # the bf16 fast path (without native bf16: float32 on widened maps)
        assert W.winograd6_use(*hw) == (hw == (9, 11))
        assert cached == 36 * (64 + 128 + 192) * 64 * 4
    monkeypatch.setenv("SRKERNELS_WINOGRAD", "4")
    with torch.enable_grad():  # training keeps brgemm (bf16 Winograd serves inference only)
        assert torch.equal(m(x.clone().requires_grad_()).detach(), brgemm)


def test_bf16_narrow_layers_stay_on_brgemm(monkeypatch):
    m, _ = _wide_block(32)  # growth 32 < 64: winograd_bf16 measured oneDNN's bf16 conv faster
    x = torch.randn(1, 64, 10, 10).bfloat16()
    outs = []
    for tile in ("4", "0"):
        monkeypatch.setenv("SRKERNELS_WINOGRAD", tile)
        with torch.no_grad():
            outs.append(m(x))
    assert torch.equal(*outs)
