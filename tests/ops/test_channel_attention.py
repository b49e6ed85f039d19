import pytest
import torch

import srkernels
from srkernels import ops, use_backend
from srkernels.reference import functional as RF

from ..conftest import assert_close, needs_cuda
from ._parity import BACKENDS, FORMATS, assert_thread_independent, cuda_parity, randn, run_parity, to_cuda

OP = "channel_attention"
# (N, C, H, W, Cr): N=1 and N>1, 1x1 and odd spatial sizes, C not a multiple of 8, RCAN (64/4) and RDCAB (576/36)
SHAPES = [(1, 16, 1, 1, 4), (2, 13, 17, 23, 3), (1, 64, 9, 7, 4), (2, 576, 3, 5, 36), (3, 8, 4, 4, 2)]
SMALL_SHAPES = [(1, 16, 1, 1, 4), (2, 13, 5, 7, 3), (2, 576, 2, 3, 36)]
# (pool, act, bias, residual)
VARIANTS = [
    ("avg", "relu", True, True),  # RCAB
    ("avg", "relu", True, False),  # CALayer alone
    ("avg", "prelu", False, True),
    ("avg+std", "relu", True, True),  # contrast-aware (RDCAB Split / FD-IRB)
    ("avg+std", "prelu", True, False),
]
DTYPES = {"compiled": [torch.float32, torch.bfloat16, torch.float16],
          "triton": [torch.float32, torch.bfloat16, torch.float16]}


def make_inputs(N, C, H, W, Cr, pool, act, bias, residual, seed=0):
    x = randn(N, C, H, W, seed=seed)
    if pool == "avg+std":
        x = x + randn(1, C, 1, 1, seed=seed + 9)  # channels with distinct means exercise the stable std
    return dict(
        x=x,
        w1=randn(Cr, C, 1, 1, seed=seed + 1, scale=C**-0.5),
        b1=randn(Cr, seed=seed + 2, scale=0.1) if bias else None,
        w2=randn(C, Cr, 1, 1, seed=seed + 3, scale=Cr**-0.5),
        b2=randn(C, seed=seed + 4, scale=0.1) if bias else None,
        residual=randn(N, C, H, W, seed=seed + 5) if residual else None,
        act_weight=(randn(Cr, seed=seed + 6, scale=0.1) + 0.25) if act == "prelu" else None,
    ), dict(act=act, pool=pool)


def _fused(opts):
    return lambda x, w1, b1, w2, b2, residual, act_weight: ops.channel_attention(
        x, w1, b1, w2, b2, residual=residual, act_weight=act_weight, **opts)


def _ref(opts):
    return lambda x, w1, b1, w2, b2, residual, act_weight: RF.channel_attention(
        x, w1, b1, w2, b2, residual=residual, act_weight=act_weight, **opts)


def _cases():
    for backend in BACKENDS:
        shapes = SHAPES if backend == "compiled" else SMALL_SHAPES
        for shape in shapes:
            for dtype in DTYPES[backend]:
                for fmt in FORMATS:
                    for variant in VARIANTS:
                        if backend == "triton" and (dtype != torch.float32 or fmt == "strided") and variant != VARIANTS[3]:
                            continue  # interpreter time: the full variant set runs in fp32
                        yield pytest.param(backend, shape, dtype, fmt, variant,
                                           id=f"{backend}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{fmt}-{'-'.join(map(str, variant))}")


def out_case(t, backend):
    """This op's case of tests/ops/test_out_variants.py: (x, residual, the op's other arguments by name), drawn
    with ``t(*shape, scale=, k=)``."""
    return t(2, 8, 5, 6), t(2, 8, 5, 6, k=1), dict(
        w1=t(2, 8, k=2), b1=t(2, k=3), w2=t(8, 2, k=4), b2=t(8, k=5), act="prelu",
        act_weight=t(2, scale=0.1, k=6).abs(), pool="avg+std")



@pytest.mark.parametrize("backend,shape,dtype,fmt,variant", list(_cases()))
def test_parity(backend, shape, dtype, fmt, variant):
    pool, act, bias, residual = variant
    inputs, opts = make_inputs(*shape, pool, act, bias, residual)
    run_parity(_fused(opts), _ref(opts), inputs, backend=backend, dtype=dtype, fmt=fmt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_float64(backend, variant):
    pool, act, bias, residual = variant
    inputs, opts = make_inputs(2, 6, 3, 4, 2, pool, act, bias, residual, seed=3)
    names = [k for k, v in inputs.items() if v is not None]
    args = [inputs[k].clone().requires_grad_(True) for k in names]

    def fn(*a):
        kw = dict(inputs)
        kw.update(zip(names, a))
        with use_backend(backend):
            return _fused(opts)(**kw)

    # the interpreter is slow: Triton checks random projections (fast_mode), compiled every entry
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[2], VARIANTS[3]])
def test_opcheck(backend, variant):
    pool, act, bias, residual = variant
    inputs, opts = make_inputs(2, 13, 5, 3, 3, pool, act, bias, residual)
    t = {k: (v.float().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    w1, w2 = t["w1"].reshape(3, 13), t["w2"].reshape(13, 3)
    with use_backend(backend):
        ns = torch.ops.srkernels if backend == "compiled" else torch.ops.srkernels_triton
        args = (t["x"], w1, t["b1"], w2, t["b2"], t["residual"], t["act_weight"], pool)
        torch.library.opcheck(getattr(ns, OP), args)
        out, stats = getattr(ns, OP)(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        g = torch.randn_like(out)
        bargs = (g, t["x"].detach(), stats, w1.detach(), t["b1"], w2.detach(), t["b2"], t["act_weight"], pool)
        bargs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bargs)
        torch.library.opcheck(getattr(ns, OP + "_backward"), bargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    inputs, opts = make_inputs(2, 8, 3, 3, 2, "avg", "relu", True, True)
    t = {k: v.float()[:0] if k in ("x", "residual") else v.float().requires_grad_(True) for k, v in inputs.items() if v is not None}
    with use_backend(backend):
        out = ops.channel_attention(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], residual=t["residual"])
    assert out.shape == (0, 8, 3, 3)
    out.sum().backward()
    assert torch.equal(t["w1"].grad, torch.zeros_like(t["w1"]))


def test_deterministic_and_thread_independent():
    inputs, opts = make_inputs(3, 64, 20, 21, 4, "avg+std", "relu", True, True)
    t = {k: v.float() for k, v in inputs.items() if v is not None}

    def run():
        x = t["x"].clone().requires_grad_(True)
        w1 = t["w1"].clone().requires_grad_(True)
        with use_backend("compiled"):
            out = ops.channel_attention(x, w1, t["b1"], t["w2"], t["b2"], residual=t["residual"], pool="avg+std")
        out.backward(torch.ones_like(out))
        return out.detach(), x.grad, w1.grad

    assert_thread_independent(run)


def test_saves_only_what_backward_needs():
    """Saved for backward: x, the [N, P, C] statistics and the weights -- no second x-sized tensor."""
    inputs, _ = make_inputs(2, 16, 32, 32, 4, "avg", "relu", True, True)
    t = {k: v.float().requires_grad_(True) for k, v in inputs.items() if v is not None}
    saved = []

    def pack(s):
        saved.append(s)
        return s

    with use_backend("compiled"), torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        ops.channel_attention(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], residual=t["residual"])
    big = [s for s in saved if s.numel() >= t["x"].numel()]
    assert len(big) == 1 and big[0].data_ptr() == t["x"].data_ptr()


@pytest.mark.parametrize("attention", ["ca", "bam"])
def test_rcab_compile_fullgraph(attention):
    torch.manual_seed(0)
    ref = srkernels.reference.RCAB(16, 4, attention=attention)
    fused = srkernels.nn.RCAB(16, 4, attention=attention)
    fused.load_state_dict(ref.state_dict())
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 16, 9, 11, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out = compiled(x)
    expected = ref(x2)
    assert_close(out, expected, torch.float32, "compiled forward")
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_close(x.grad, x2.grad, torch.float32, "compiled grad x")


def test_module_keys_and_fuse():
    ref = srkernels.reference.ChannelAttention(64, 16)
    assert list(ref.state_dict()) == ["conv_du.0.weight", "conv_du.0.bias", "conv_du.2.weight", "conv_du.2.bias"]
    fused = srkernels.nn.fuse(srkernels.reference.RCAB(64, 16))
    assert type(fused.body[3]) is srkernels.nn.ChannelAttention and type(fused) is srkernels.nn.RCAB
    ref2 = srkernels.reference.RCAB(64, 16)
    ref2.load_state_dict(fused.state_dict())
    x = torch.randn(1, 64, 6, 6)
    assert_close(fused(x), ref2(x), torch.float32, "fused RCAB")


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(x=torch.randn(2, 8, 3)), ValueError, "x must be 4-D"),
        (dict(x=torch.ones(2, 8, 3, 3, dtype=torch.int64)), TypeError, "x must be a floating"),
        (dict(x=torch.randn(2, 0, 3, 3)), ValueError, "x must have non-empty"),
        (dict(w1=torch.randn(2, 7)), ValueError, "w1 must have shape"),
        (dict(w2=torch.randn(8, 3)), ValueError, "w2 must have shape"),
        (dict(b1=torch.randn(3)), ValueError, "b1 must have shape"),
        (dict(b2=torch.randn(2)), ValueError, "b2 must have shape"),
        (dict(w1=torch.randn(2, 8, dtype=torch.float64)), TypeError, "w1 has dtype"),
        (dict(residual=torch.randn(2, 8, 3, 4)), ValueError, "residual must have shape"),
        (dict(w2="nope"), TypeError, "w2 must be a torch.Tensor"),
        (dict(act="gelu"), ValueError, "act must be one of"),
        (dict(pool="max"), ValueError, "pool must be one of"),
        (dict(act="prelu"), ValueError, "act='prelu' needs act_weight"),
        (dict(act_weight=torch.randn(2)), ValueError, "act_weight is only used"),
    ],
)
def test_bad_input(change, exc, match):
    kw = dict(x=torch.randn(2, 8, 3, 3), w1=torch.randn(2, 8), b1=torch.randn(2), w2=torch.randn(8, 2),
              b2=torch.randn(8), residual=None, act="relu", act_weight=None, pool="avg")
    kw.update(change)
    x, w1, b1, w2, b2 = (kw.pop(k) for k in ("x", "w1", "b1", "w2", "b2"))
    with pytest.raises(exc, match=match):
        ops.channel_attention(x, w1, b1, w2, b2, **kw)


@needs_cuda
def test_mixed_devices():
    with pytest.raises(ValueError, match="w1 is on"):
        ops.channel_attention(torch.randn(1, 8, 2, 2, device="cuda"), torch.randn(2, 8), None, torch.randn(8, 2), None)


@cuda_parity
@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_cuda(backend, dtype, fmt, variant):
    pool, act, bias, residual = variant
    for shape in SHAPES:
        inputs, opts = make_inputs(*shape, pool, act, bias, residual)
        run_parity(_fused(opts), _ref(opts), to_cuda(inputs), backend=backend, dtype=dtype, fmt=fmt)
