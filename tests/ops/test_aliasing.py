"""``out=`` aliasing rules (docs/ops.md, "Common rules"): ``out`` may be exactly ``residual`` (in-place residual
add, checked for correctness here), must not partially overlap ``residual`` and must not overlap ``x`` or a
weight at all; a clear ValueError names the argument. Issue 16: a partly overlapping ``out`` gave silently
wrong results."""
import pytest
import torch

from srkernels import use_backend

from ..conftest import assert_close
from .test_out_variants import OPS, first_weight, make_case

BACKENDS = ["compiled", "reference"]


def _in_buffer(t: torch.Tensor, extra: int = 1) -> torch.Tensor:
    """A fresh flat buffer of ``t.numel() + extra`` elements whose first ``t.numel()`` hold ``t`` (NCHW)."""
    buf = torch.randn(t.numel() + extra).to(t.dtype)
    buf[:t.numel()] = t.contiguous().reshape(-1)
    return buf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_out_partially_overlapping_residual_is_refused(op, backend):
    fn, x, res = make_case(op, torch.float32, "contiguous", "compiled")
    n = res.numel()
    buf = _in_buffer(res)
    residual, out = buf[:n].view(res.shape), buf[1:].view(res.shape)
    with use_backend(backend), torch.no_grad(), pytest.raises(ValueError, match="out partially overlaps residual"):
        fn(x, residual=residual, out=out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_out_overlapping_x_is_refused(op, backend):
    fn, x, res = make_case(op, torch.float32, "contiguous", "compiled")
    with use_backend(backend), torch.no_grad():
        expected = fn(x, residual=res)
        buf = _in_buffer(x, extra=expected.numel())
        xs = buf[:x.numel()].view(x.shape)
        for start in (0, 1, x.numel() - 1):  # full / partial / one element shared
            out = buf[start:start + expected.numel()].view(expected.shape)
            with pytest.raises(ValueError, match="out must not overlap x"):
                fn(xs, residual=res, out=out)
        # right after x in the same buffer: disjoint, allowed
        out = buf[x.numel():].view(expected.shape)
        assert fn(xs, residual=res, out=out) is out
    assert_close(out, expected, torch.float32, f"{op} out next to x")


@pytest.mark.parametrize("op", OPS)
def test_out_overlapping_a_weight_is_refused(op):
    fn, x, res = make_case(op, torch.float32, "contiguous", "compiled")
    with torch.no_grad():
        expected = fn(x, residual=res)
    # the op's first weight living inside out's buffer
    name, weight = first_weight(op, "compiled")
    buf = torch.zeros(expected.numel())
    out = buf.view(expected.shape)
    inside = buf[:weight.numel()].view(weight.shape).copy_(weight)
    with torch.no_grad(), pytest.raises(ValueError, match=f"out must not overlap {name}"):
        fn(x, out=out, **{name: inside})


@pytest.mark.parametrize("op", OPS)
def test_out_with_internal_overlap_is_refused(op):
    fn, x, res = make_case(op, torch.float32, "contiguous", "compiled")
    with torch.no_grad():
        expected = fn(x)
        out = torch.zeros(expected.shape[1:]).expand(expected.shape)
        with pytest.raises(ValueError, match="out has internal overlap"):
            fn(x, out=out)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("op", OPS)
def test_out_is_residual_is_correct(op, backend, fmt):
    fn, x, res = make_case(op, torch.float32, fmt, backend)
    with use_backend(backend), torch.no_grad():
        expected = fn(x, residual=res)
        buf = res.clone()
        got = fn(x, residual=buf, out=buf)
    assert got is buf
    assert_close(buf, expected, torch.float32, f"{op} out is residual ({backend}, {fmt})")
    if backend != "triton":
        assert torch.equal(buf, expected), f"{op}: in-place residual add differs from the functional result"


@pytest.mark.parametrize("op", OPS)
def test_out_and_residual_disjoint_in_one_buffer(op):
    fn, x, res = make_case(op, torch.float32, "contiguous", "compiled")
    n = res.numel()
    with torch.no_grad():
        expected = fn(x, residual=res)
        buf = _in_buffer(res, extra=n)
        residual, out = buf[:n].view(res.shape), buf[n:].view(res.shape)
        fn(x, residual=residual, out=out)
    assert torch.equal(out, expected)
    assert torch.equal(residual, res), "residual was modified"
