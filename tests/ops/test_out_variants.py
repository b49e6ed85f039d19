"""``out=`` (the ``<op>_out`` kernels) of every op and fused backend: same values as the functional call, in the
caller's buffer whatever its layout, in-place residual add (``out`` is ``residual``), and the argument errors.
Contract: docs/ops.md, "Common rules"."""
import importlib

import pytest
import torch

from srkernels import ops, use_backend

from ..conftest import assert_close, cpu_backends, layout
from ._parity import randn

BACKENDS = ["compiled", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
OPS = [name for name, spec in ops.SPECS.items() if spec.has_out]  # every op with an out= variant
OTHER = {"contiguous": "channels_last", "channels_last": "contiguous"}


def _need(op: str, backend: str) -> None:
    # every backend must provide every op's out variant: a missing one fails, it is not skipped
    assert backend in cpu_backends(op), f"{backend} cannot run {op} on CPU here"
    ns = torch.ops.srkernels if backend == "compiled" else torch.ops.srkernels_triton
    assert hasattr(ns, f"{op}_out"), f"{backend} has no {op}_out"


def _out_case(op: str, dtype: torch.dtype, backend: str, seed: int):
    """(x, residual, the op's other arguments) from ``out_case`` in the op's test module tests/ops/test_<op>.py."""
    case = getattr(importlib.import_module(f"{__package__}.test_{op}"), "out_case", None)
    if case is None:
        raise AssertionError(f"{op} has an out= variant (srkernels/ops/{op}.py) but tests/ops/test_{op}.py has no "
                             f"out_case(t, backend): add one")
    return case(lambda *shape, scale=1.0, k=0: (randn(*shape, seed=seed + k) * scale).to(dtype), backend)


def make_case(op: str, dtype: torch.dtype, fmt: str, backend: str, seed: int = 0):
    """(fn(x, residual=..., out=..., **arguments replacing the case's), x, residual) with small weights,
    everything in ``dtype``, x in ``fmt``."""
    x, res, kwargs = _out_case(op, dtype, backend, seed)

    def fn(x, residual=None, out=None, **replace):
        return getattr(ops, op)(x, **{**kwargs, **replace}, residual=residual, out=out)

    return fn, layout(x, fmt), layout(res, fmt)


def first_weight(op: str, backend: str) -> tuple[str, torch.Tensor]:
    """The name and float32 value of the first tensor argument after x in ``op``'s case (as make_case's)."""
    return next((k, v) for k, v in _out_case(op, torch.float32, backend, 0)[2].items() if isinstance(v, torch.Tensor))


def _buffer(like: torch.Tensor, fmt: str) -> torch.Tensor:
    """A buffer of ``like``'s shape filled with garbage, in ``fmt`` (``strided``: neither NCHW- nor NHWC-dense)."""
    return layout(torch.full_like(like, 7.0), fmt)


def _check_same(got, expected, backend, dtype, what):
    assert_close(got, expected, dtype, what)
    if backend == "compiled":  # the same kernel wrote both (through a temporary for a foreign layout): exact
        assert torch.equal(got, expected), f"{what}: out= differs from the functional result"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_fmt", ["same", "other", "strided"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_out_matches_functional(op, backend, fmt, out_fmt, dtype):
    _need(op, backend)
    fn, x, res = make_case(op, dtype, fmt, backend)
    with use_backend(backend), torch.no_grad():
        expected = fn(x, residual=res)
        ofmt = {"same": fmt, "other": OTHER[fmt], "strided": "strided"}[out_fmt]
        out = _buffer(expected, ofmt)
        stride, ptr = out.stride(), out.data_ptr()
        got = fn(x, residual=res, out=out)
    assert got is out
    assert out.stride() == stride and out.data_ptr() == ptr, "out was replaced, not written"
    _check_same(out, expected, backend, dtype, f"{op} out= ({ofmt})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_fmt", ["same", "other"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_out_aliases_residual(op, backend, res_fmt, dtype):
    """out is residual: the in-place residual add must read every residual value before overwriting it."""
    _need(op, backend)
    fmt = "channels_last"
    fn, x, res = make_case(op, dtype, fmt, backend, seed=10)
    with use_backend(backend), torch.no_grad():
        expected = fn(x, residual=res)
        buf = layout(res.clone(), fmt if res_fmt == "same" else OTHER[fmt])
        got = fn(x, residual=buf, out=buf)
    assert got is buf
    _check_same(buf, expected, backend, dtype, f"{op} out=residual ({res_fmt} layout)")


@pytest.fixture
def fp32_case(op, backend):
    """make_case of ``op`` in float32, contiguous, on a ``backend`` that must have its out variant."""
    _need(op, backend)
    return make_case(op, torch.float32, "contiguous", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_out_empty_batch(op, backend, fp32_case):
    fn, x, res = fp32_case
    with use_backend(backend), torch.no_grad():
        expected = fn(x[:0], residual=res[:0])
        out = torch.empty_like(expected)
        assert fn(x[:0], residual=res[:0], out=out) is out
    assert out.shape == expected.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_out_refuses_autograd(op, backend, fp32_case):
    fn, x, res = fp32_case
    with use_backend(backend):
        out = _buffer(fn(x.detach(), residual=res).detach(), "contiguous")
        for grad_arg in ("x", "residual"):
            xx = x.clone().requires_grad_(grad_arg == "x")
            rr = res.clone().requires_grad_(grad_arg == "residual")
            with pytest.raises(ValueError, match="out= is for inference"):
                fn(xx, residual=rr, out=out)
        with torch.no_grad():  # no gradient is being recorded: allowed
            assert fn(x.clone().requires_grad_(True), residual=res, out=out) is out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_out_bad_buffer(op, backend, fp32_case):
    fn, x, res = fp32_case
    with use_backend(backend), torch.no_grad():
        shape = fn(x).shape
        bad = {
            "shape": torch.empty(shape[0], shape[1], shape[2], shape[3] + 1),
            "dtype": torch.empty(shape, dtype=torch.float64),
        }
        for what, out in bad.items():
            with pytest.raises((ValueError, TypeError), match=r"\bout\b") as info:
                fn(x, residual=res, out=out)
            assert what in str(info.value), f"the error for a wrong {what} does not say so: {info.value}"
        if op != "pixel_shuffle":  # same shape as x: the buffer can be x itself
            with pytest.raises(ValueError, match="out must not overlap x"):
                fn(x, residual=res, out=x)


@pytest.mark.parametrize("op", ["channel_attention", "balanced_attention"])
def test_compiled_kernel_checks_out(op):
    """The C++ kernels check out themselves (the dispatcher op can be called without the Python wrapper)."""
    _need(op, "compiled")
    ns = torch.ops.srkernels
    x = torch.randn(2, 8, 5, 6)
    w1, w2, slope = torch.randn(2, 8), torch.randn(8, 2), torch.rand(2)
    if op == "channel_attention":
        def call(out):
            ns.channel_attention_out(x, w1, None, w2, None, None, None, "avg", out)
    else:
        def call(out):
            ns.balanced_attention_out(x, w1, slope, w2, torch.randn(3, 3), None, out)
    with pytest.raises(RuntimeError, match=f"{op}_out: out must have the shape of x"):
        call(torch.empty(2, 8, 5, 7))
    with pytest.raises(RuntimeError, match=f"{op}_out: out must have dtype"):
        call(torch.empty(2, 8, 5, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=f"{op}_out: out must not overlap x"):
        call(x)


def test_compiled_pixel_shuffle_checks_out():
    _need("pixel_shuffle", "compiled")
    x = torch.randn(1, 8, 3, 3)
    with pytest.raises(RuntimeError, match="pixel_shuffle_out: out must have shape"):
        torch.ops.srkernels.pixel_shuffle_out(x, 2, None, None, "none", None, torch.empty(1, 2, 6, 5))
    storage = torch.empty(x.numel() + 8)
    x_view = storage[: x.numel()].view_as(x).copy_(x)
    with pytest.raises(RuntimeError, match="pixel_shuffle_out: out must not overlap x"):
        torch.ops.srkernels.pixel_shuffle_out(x_view, 2, None, None, "none", None, storage[8:].view(1, 2, 6, 6))
