"""Parity harness shared by the op tests: run a fused op and its float64 reference on the same values."""
from __future__ import annotations

import pytest
import torch

from srkernels import use_backend

from ..conftest import TOL, assert_close, layout, needs_cuda

BACKENDS = ["compiled", "triton"]
FORMATS = ["contiguous", "channels_last", "strided"]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cuda_parity(test):
    """An op's CUDA parity test: needs a GPU, runs for every backend, CUDA dtype and memory format."""
    for mark in (pytest.mark.parametrize("fmt", FORMATS), pytest.mark.parametrize("dtype", CUDA_DTYPES),
                 pytest.mark.parametrize("backend", BACKENDS), needs_cuda):
        test = mark(test)
    return test


def to_cuda(inputs: dict) -> dict:
    return {k: (v.cuda() if v is not None else None) for k, v in inputs.items()}


def run_parity(fused_fn, ref_fn, inputs: dict, *, backend: str, dtype: torch.dtype, fmt: str,
               maps=("x", "residual"), seed: int = 0) -> None:
    """Forward and every gradient of ``fused_fn`` (in ``dtype``/``fmt``) against ``ref_fn`` in float64.

    ``inputs`` holds float64 tensors (or None); names in ``maps`` are feature maps laid out as ``fmt``.
    """
    fused_in, ref_in = {}, {}
    for k, v in inputs.items():
        if v is None:
            fused_in[k] = ref_in[k] = None
            continue
        low = v.to(dtype)
        if k in maps:
            low = layout(low, fmt)
        fused_in[k] = low.detach().requires_grad_(True)
        # the reference sees exactly the rounded values the fused op sees
        ref_in[k] = low.detach().double().requires_grad_(True)

    with use_backend(backend):
        out = fused_fn(**fused_in)
    ref = ref_fn(**ref_in)
    assert out.dtype == dtype
    if fmt in ("contiguous", "channels_last") and inputs["x"].shape[1] > 1 and inputs["x"][0, 0].numel() > 1:
        fmt_t = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt_t), f"output lost the {fmt} layout"
    assert_close(out, ref, dtype, "forward")

    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)).to(ref.device)
    out.backward(g.to(dtype))
    ref.backward(g)
    for k, v in fused_in.items():
        if v is None:
            continue
        assert v.grad is not None, f"no gradient for {k}"
        assert_close(v.grad, ref_in[k].grad, dtype, f"grad {k}")


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale


def assert_thread_independent(run) -> None:
    """``run()`` (-> a tuple of tensors) gives bitwise-equal results with 1 thread and, twice, with the default
    thread count, at least 2 (the kernels' reductions have a fixed order whatever the threads; the test modules'
    ``one_thread`` fixture would otherwise make it 1 against 1)."""
    runs = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, max(2, prev), max(2, prev)):
            torch.set_num_threads(threads)
            runs.append(run())
    finally:
        torch.set_num_threads(prev)
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


def assert_match(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """NaN and Inf at the same places (Inf with the same sign), finite values within TOL[dtype] (relative to
    max(1, |expected|)): the comparison of the fuzz and non-finite tests."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN positions differ ({int(a.isnan().sum())} vs " \
                                              f"{int(e.isnan().sum())})"
    inf = e.isinf()
    assert torch.equal(a.isinf(), inf) and torch.equal(a[inf], e[inf]), f"{what}: Inf positions/signs differ"
    fin = e.isfinite()
    if fin.any():
        err = (a[fin] - e[fin]).abs().max().item()
        scale = max(1.0, e[fin].abs().max().item())
        assert err <= TOL[dtype] * scale, f"{what}: max abs err {err:.3g} > {TOL[dtype]:.1g} * {scale:.3g}"
