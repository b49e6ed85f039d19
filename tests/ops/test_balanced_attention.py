import pytest
import torch

import srkernels
from srkernels import ops, use_backend
from srkernels.reference import functional as RF

from ..conftest import assert_close
from ._parity import BACKENDS, FORMATS, assert_thread_independent, cuda_parity, randn, run_parity, to_cuda

OP = "balanced_attention"
# (N, C, H, W, Cr): BAM in RCAB is C=64, Cr=4; odd sizes, 1x1, C not a multiple of 8, C=576
SHAPES = [(1, 16, 1, 1, 4), (2, 13, 17, 23, 3), (1, 64, 9, 7, 4), (2, 576, 3, 5, 36), (3, 8, 4, 4, 2)]
SMALL_SHAPES = [(1, 16, 1, 1, 4), (2, 13, 5, 7, 3), (1, 64, 9, 7, 4)]


def make_inputs(N, C, H, W, Cr, residual=True, K=7, seed=0):
    return dict(
        x=randn(N, C, H, W, seed=seed),
        w1=randn(Cr, C, 1, 1, seed=seed + 1, scale=C**-0.5),
        prelu_w=randn(Cr, seed=seed + 2, scale=0.1) + 0.25,
        w2=randn(C, Cr, 1, 1, seed=seed + 3, scale=Cr**-0.5),
        w_sa=randn(1, 1, K, K, seed=seed + 4, scale=1 / K),
        residual=randn(N, C, H, W, seed=seed + 5) if residual else None,
    )


def fused(x, w1, prelu_w, w2, w_sa, residual):
    return ops.balanced_attention(x, w1, prelu_w, w2, w_sa, residual=residual)


def ref(x, w1, prelu_w, w2, w_sa, residual):
    return RF.balanced_attention(x, w1, prelu_w, w2, w_sa, residual=residual)


def _cases():
    for backend in BACKENDS:
        for shape in SHAPES if backend == "compiled" else SMALL_SHAPES:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for fmt in FORMATS:
                    for residual in (True, False):
                        if backend == "triton" and not residual and dtype != torch.float32:
                            continue  # interpreter time
                        yield pytest.param(backend, shape, dtype, fmt, residual,
                                           id=f"{backend}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{fmt}-res{int(residual)}")


def out_case(t, backend):
    """This op's case of tests/ops/test_out_variants.py: (x, residual, the op's other arguments by name), drawn
    with ``t(*shape, scale=, k=)``."""
    return t(2, 8, 5, 6), t(2, 8, 5, 6, k=1), dict(
        w1=t(2, 8, k=2), prelu_w=t(2, scale=0.1, k=3).abs(), w2=t(8, 2, k=4), w_sa=t(7, 7, scale=0.1, k=5))



@pytest.mark.parametrize("backend,shape,dtype,fmt,residual", list(_cases()))
def test_parity(backend, shape, dtype, fmt, residual):
    run_parity(fused, ref, make_inputs(*shape, residual=residual), backend=backend, dtype=dtype, fmt=fmt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [3, 7])
def test_gradcheck_float64(backend, K):
    inputs = make_inputs(2, 6, 4, 5, 2, K=K, seed=7)
    names = list(inputs)
    args = [inputs[k].clone().requires_grad_(True) for k in names]

    def fn(*a):
        with use_backend(backend):
            return fused(**dict(zip(names, a)))

    # the interpreter is slow: Triton checks random projections (fast_mode), compiled every entry
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [True, False])
def test_opcheck(backend, residual):
    t = {k: (v.float().requires_grad_(True) if v is not None else None)
         for k, v in make_inputs(2, 13, 5, 3, 3, residual=residual).items()}
    args = (t["x"], t["w1"].reshape(3, 13), t["prelu_w"], t["w2"].reshape(13, 3), t["w_sa"].reshape(7, 7), t["residual"])
    with use_backend(backend):
        ns = torch.ops.srkernels if backend == "compiled" else torch.ops.srkernels_triton
        torch.library.opcheck(getattr(ns, OP), args)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        out, mean, maxmap = getattr(ns, OP)(*plain)
        torch.library.opcheck(getattr(ns, OP + "_backward"), (torch.randn_like(out), plain[0], mean, maxmap, *plain[1:5]))


def test_max_gradient_goes_to_lowest_tied_channel():
    """Ties in the channel max (common in bf16) route the spatial gradient like torch.max: lowest index."""
    x = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
    x[:, 1] = 1.0
    x[:, 3] = 1.0  # channels 1 and 3 tie for the max everywhere
    inputs = make_inputs(1, 4, 3, 3, 1, residual=False, K=3, seed=2)
    inputs["x"] = x
    for backend in BACKENDS:
        run_parity(fused, ref, inputs, backend=backend, dtype=torch.float32, fmt="contiguous")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    t = {k: v.float() for k, v in make_inputs(2, 8, 3, 3, 2).items()}
    w1 = t["w1"].requires_grad_(True)
    with use_backend(backend):
        out = ops.balanced_attention(t["x"][:0], w1, t["prelu_w"], t["w2"], t["w_sa"], residual=t["residual"][:0])
    assert out.shape == (0, 8, 3, 3)
    out.sum().backward()
    assert torch.equal(w1.grad, torch.zeros_like(w1))


def test_deterministic_and_thread_independent():
    t = {k: v.float() for k, v in make_inputs(3, 64, 20, 21, 4).items()}

    def run():
        x = t["x"].clone().requires_grad_(True)
        w_sa = t["w_sa"].clone().requires_grad_(True)
        with use_backend("compiled"):
            out = ops.balanced_attention(x, t["w1"], t["prelu_w"], t["w2"], w_sa, residual=t["residual"])
        out.backward(torch.ones_like(out))
        return out.detach(), x.grad, w_sa.grad

    assert_thread_independent(run)


def test_module_keys_and_fuse():
    ref_m = srkernels.reference.BalancedAttention(64, 16)
    assert list(ref_m.state_dict()) == ["ca.fc1.weight", "ca.relu1.weight", "ca.fc2.weight", "sa.conv1.weight"]
    block = srkernels.reference.RCAB(64, 16, attention="bam")
    expected = block(torch.randn(1, 64, 6, 6, generator=torch.Generator().manual_seed(0)))
    srkernels.nn.fuse(block)
    assert type(block.body[3]) is srkernels.nn.BalancedAttention
    out = block(torch.randn(1, 64, 6, 6, generator=torch.Generator().manual_seed(0)))
    assert_close(out, expected, torch.float32, "fused RCAB-BAM")


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(x=torch.randn(8, 3, 3)), ValueError, "x must be 4-D"),
        (dict(x=torch.ones(2, 8, 3, 3, dtype=torch.int32)), TypeError, "x must be a floating"),
        (dict(w1=torch.randn(2, 9)), ValueError, "w1 must have shape"),
        (dict(prelu_w=torch.randn(3)), ValueError, "prelu_w must have shape"),
        (dict(w2=torch.randn(8, 3)), ValueError, "w2 must have shape"),
        (dict(w_sa=torch.randn(1, 1, 6, 6)), ValueError, "w_sa must be an odd"),
        (dict(w_sa=torch.randn(2, 1, 7, 7)), ValueError, "w_sa must have shape"),
        (dict(w_sa=torch.randn(7, 7, dtype=torch.float64)), TypeError, "w_sa has dtype"),
        (dict(residual=torch.randn(1, 8, 3, 3)), ValueError, "residual must have shape"),
    ],
)
def test_bad_input(change, exc, match):
    kw = dict(x=torch.randn(2, 8, 3, 3), w1=torch.randn(2, 8), prelu_w=torch.randn(2), w2=torch.randn(8, 2),
              w_sa=torch.randn(7, 7), residual=None)
    kw.update(change)
    with pytest.raises(exc, match=match):
        fused(**kw)


@cuda_parity
def test_parity_cuda(backend, dtype, fmt):
    for shape in SHAPES:
        inputs = to_cuda(make_inputs(*shape))
        run_parity(fused, ref, inputs, backend=backend, dtype=dtype, fmt=fmt)
