import os

import pytest
import torch

# Triton runs on CPU tensors only in interpreter mode; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import srkernels  # noqa: E402
from srkernels import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)")

# Per-dtype tolerance, relative to the largest magnitude of the expected tensor (see assert_close).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """max |actual - expected| <= TOL[dtype] * max(1, max |expected|), computed in float64."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, e.abs().max().item() if e.numel() else 0.0)
    assert err <= TOL[dtype] * scale, f"{what}: max abs err {err:.3g} > {TOL[dtype]:.1g} * {scale:.3g}"


def cpu_backends(op: str) -> list[str]:
    """Fused backends that can run ``op`` on CPU tensors here (compiled, and triton in interpreter mode)."""
    if _backend.triton_interpret():
        srkernels.ops.load_triton()  # registered on the first op call otherwise
    return [b for b in _backend.available(op, "cpu") if b != "reference"]


def layout(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, channels_last, or a non-contiguous view."""
    if fmt == "contiguous":
        return x.contiguous()
    if fmt == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if fmt == "strided":  # every other column of a wider tensor: neither NCHW- nor NHWC-dense
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(fmt)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the
    machine is shared, so one thread is much faster than two contended ones for tiny tensors, and bit-exact
    comparisons need the same thread count everywhere."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("SRKERNELS_BACKEND", raising=False)
