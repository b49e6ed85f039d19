import pytest
import torch

from srkernels import ops, use_backend
from srkernels.reference import functional as RF

from ..conftest import assert_close
from ._parity import BACKENDS, FORMATS, cuda_parity, randn, run_parity, to_cuda

OP = "pixel_shuffle"
# (N, C_out, H, W, r): r in {2, 3, 4, 8}, odd sizes, 1x1, N=1 and N>1, C not a multiple of 8
SHAPES = [(1, 3, 1, 1, 2), (2, 5, 7, 9, 2), (1, 4, 5, 3, 3), (2, 3, 3, 5, 4), (1, 2, 2, 3, 8), (2, 64, 6, 5, 2)]
SMALL_SHAPES = [(1, 3, 1, 1, 2), (2, 5, 3, 5, 2), (1, 4, 3, 3, 3), (1, 2, 2, 1, 4)]
# (bias, act, residual)
VARIANTS = [(True, "none", False), (False, "none", False), (True, "relu", True), (True, "prelu", False),
            (False, "prelu", True)]


def make_inputs(N, C, H, W, r, bias, act, residual, seed=0):
    return dict(
        x=randn(N, C * r * r, H, W, seed=seed),
        bias=randn(C * r * r, seed=seed + 1) if bias else None,
        act_weight=(randn(C, seed=seed + 2, scale=0.1) + 0.25) if act == "prelu" else None,
        residual=randn(N, C, H * r, W * r, seed=seed + 3) if residual else None,
    )


def _fn(f, r, act):
    return lambda x, bias, act_weight, residual: f(x, r, bias=bias, act=act, act_weight=act_weight, residual=residual)


def _cases():
    for backend in BACKENDS:
        for shape in SHAPES if backend == "compiled" else SMALL_SHAPES:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for fmt in FORMATS:
                    for variant in VARIANTS:
                        if backend == "triton" and dtype != torch.float32 and variant != VARIANTS[2]:
                            continue  # interpreter time
                        yield pytest.param(backend, shape, dtype, fmt, variant,
                                           id=f"{backend}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{fmt}-{'-'.join(map(str, variant))}")


def out_case(t, backend):
    """This op's case of tests/ops/test_out_variants.py: (x, residual, the op's other arguments by name), drawn
    with ``t(*shape, scale=, k=)``. Compiled: C = 16 >= one CPU vector takes the vectorised NHWC r = 2 path; the
    interpreter wants small."""
    C = 16 if backend == "compiled" else 3
    return t(2, 4 * C, 3, 5), t(2, C, 6, 10, k=1), dict(
        r=2, bias=t(4 * C, k=2), act="prelu", act_weight=t(C, scale=0.1, k=3).abs())



@pytest.mark.parametrize("backend,shape,dtype,fmt,variant", list(_cases()))
def test_parity(backend, shape, dtype, fmt, variant):
    bias, act, residual = variant
    r = shape[-1]
    run_parity(_fn(ops.pixel_shuffle, r, act), _fn(RF.pixel_shuffle, r, act),
               make_inputs(*shape, bias, act, residual), backend=backend, dtype=dtype, fmt=fmt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 3, 5, 3, 2), (2, 2, 3, 3, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_unshuffle_parity(backend, shape, dtype, fmt):
    N, C, H, W, r = shape
    run_parity(lambda x: ops.pixel_unshuffle(x, r), lambda x: RF.pixel_unshuffle(x, r),
               dict(x=randn(N, C, H * r, W * r, seed=4)), backend=backend, dtype=dtype, fmt=fmt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_float64(backend, variant):
    bias, act, residual = variant
    inputs = make_inputs(2, 2, 3, 2, 2, bias, act, residual, seed=5)
    if act != "none":  # keep pre-activations away from the kink at 0, where finite differences are wrong
        inputs["x"] = inputs["x"] + torch.where(inputs["x"] >= 0, 0.1, -0.1)
    names = [k for k, v in inputs.items() if v is not None]
    args = [inputs[k].clone().requires_grad_(True) for k in names]

    def fn(*a):
        kw = dict(inputs)
        kw.update(zip(names, a))
        if kw["bias"] is not None:  # the shifted x must stay off the kink after the bias too
            kw["bias"] = kw["bias"] * 0.01
        with use_backend(backend):
            return _fn(ops.pixel_shuffle, 2, act)(**kw)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=backend == "triton")
    x = randn(1, 2, 4, 6, seed=6).requires_grad_(True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: ops.pixel_unshuffle(t, 2), [x])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[2], VARIANTS[4]])
def test_opcheck(backend, variant):
    bias, act, residual = variant
    t = {k: (v.float().requires_grad_(True) if v is not None else None)
         for k, v in make_inputs(2, 3, 3, 5, 2, bias, act, residual).items()}
    with use_backend(backend):
        ns = torch.ops.srkernels if backend == "compiled" else torch.ops.srkernels_triton
        args = (t["x"], 2, t["bias"], t["act_weight"], act, t["residual"])
        torch.library.opcheck(ns.pixel_shuffle, args)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        out = ns.pixel_shuffle(*plain)
        torch.library.opcheck(ns.pixel_shuffle_backward, (torch.randn_like(out), plain[0], 2, *plain[2:5]))
        torch.library.opcheck(ns.pixel_unshuffle, (out.detach().requires_grad_(True), 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_variant_and_empty_batch(backend):
    t = {k: v.float() for k, v in make_inputs(2, 3, 4, 5, 2, True, "relu", True).items() if v is not None}
    out = torch.empty(2, 3, 8, 10)
    with use_backend(backend), torch.no_grad():
        got = ops.pixel_shuffle(t["x"], 2, bias=t["bias"], act="relu", residual=t["residual"], out=out)
        assert got is out
        assert_close(out, RF.pixel_shuffle(t["x"], 2, bias=t["bias"], act="relu", residual=t["residual"]),
                     torch.float32, "out=")
        empty = ops.pixel_shuffle(t["x"][:0], 2, bias=t["bias"])
    assert empty.shape == (0, 3, 8, 10)


def test_compile_fullgraph():
    conv = torch.nn.Conv2d(4, 16, 3, padding=1, bias=False)
    bias = torch.randn(16, requires_grad=True)

    def up(x):
        return ops.pixel_shuffle(conv(x), 2, bias=bias, act="relu")

    x = torch.randn(2, 4, 5, 7, requires_grad=True)
    got = torch.compile(up, fullgraph=True)(x)
    expected = RF.pixel_shuffle(conv(x), 2, bias=bias, act="relu")
    assert_close(got, expected, torch.float32, "compiled")
    (g1,) = torch.autograd.grad(got.sum(), [bias])
    (g2,) = torch.autograd.grad(expected.sum(), [bias])
    assert_close(g1, g2, torch.float32, "compiled grad bias")


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(r=0), ValueError, "r must be a positive int"),
        (dict(r=2.0), ValueError, "r must be a positive int"),
        (dict(x=torch.randn(1, 6, 2, 2)), ValueError, "not a multiple of r\\*r"),
        (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
        (dict(act="gelu"), ValueError, "act must be one of"),
        (dict(act="prelu"), ValueError, "needs act_weight"),
        (dict(act="prelu", act_weight=torch.randn(3)), ValueError, "act_weight must have shape"),
        (dict(residual=torch.randn(1, 2, 4, 5)), ValueError, "residual must have shape"),
        (dict(x=torch.ones(1, 8, 2, 2, dtype=torch.int64)), TypeError, "floating"),
    ],
)
def test_bad_input(change, exc, match):
    kw = dict(x=torch.randn(1, 8, 2, 2), r=2, bias=None, act=None, act_weight=None, residual=None)
    kw.update(change)
    x, r = kw.pop("x"), kw.pop("r")
    with pytest.raises(exc, match=match):
        ops.pixel_shuffle(x, r, **kw)


def test_unshuffle_bad_input():
    with pytest.raises(ValueError, match="not divisible by r"):
        ops.pixel_unshuffle(torch.randn(1, 2, 5, 4), 2)


@cuda_parity
@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_cuda(backend, dtype, fmt, variant):
    bias, act, residual = variant
    for shape in SHAPES:
        r = shape[-1]
        inputs = to_cuda(make_inputs(*shape, bias, act, residual))
        run_parity(_fn(ops.pixel_shuffle, r, act), _fn(RF.pixel_shuffle, r, act), inputs,
                   backend=backend, dtype=dtype, fmt=fmt)
