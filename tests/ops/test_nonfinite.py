"""NaN / Inf conventions of the fused ops (docs/ops.md, "NaN and Inf"), forward and backward, every CPU backend,
against the float64 reference (autograd) on the same rounded values: NaN positions equal, Inf positions and signs
equal, finite values within the dtype's tolerance.

Regressions: issue 16 finding 9 (``pool="avg+std"`` with an Inf: the reference took that channel's std as 0),
the fuzz's bf16 ``dense_block`` bug (border rows zeroed by multiplying with a 0/1 mask: NaN * 0 is NaN, so a NaN
or Inf leaked through the padding into neighbouring pixels and the next sample), and issue 14 fix 5 (ReLU backward
at a NaN pre-activation zeroed the gradient on CPU and Triton; ATen passes it).
"""
from __future__ import annotations

import pytest
import torch

from srkernels import ops, use_backend
from srkernels.ops.dense_block import rdb_plan

from ..conftest import cpu_backends
from ._parity import assert_match

pytestmark = pytest.mark.usefixtures("one_thread")
INF, NAN = float("inf"), float("nan")


def run_both(fn, tensors: dict, backend: str, dtype: torch.dtype, grad_seed: int = 0):
    """fn(**tensors) fused in ``dtype`` and on the reference in float64 over the same rounded values: returns
    ((out, grads), (ref_out, ref_grads)), grads in the order of ``tensors``."""
    results = []
    for b, dt in ((backend, dtype), ("reference", torch.float64)):
        ins = {k: v.to(dtype).to(dt).requires_grad_(v.is_floating_point()) if v is not None else None
               for k, v in tensors.items()}
        with use_backend(b):
            out = fn(**ins)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
        leaves = [v for v in ins.values() if v is not None]
        grads = torch.autograd.grad(out, leaves, go.to(dtype).to(dt), allow_unused=True)
        results.append((out.detach(), [g if g is not None else torch.zeros_like(v) for g, v in zip(grads, leaves)]))
    return results


# ----------------------------------------------------------------------------------------- avg+std pooling

def test_reference_std_is_torch_std():
    """The convention itself: the pooled std of a channel is torch.std(correction=0) of it, NaN included."""
    from srkernels.reference.functional import _pool_std
    x = torch.tensor([[[1., 2., 3., 4.], [1., INF, 3., 4.], [-INF, 2., 3., 4.], [INF, -INF, 0., 0.],
                       [NAN, 2., 3., 4.], [5., 5., 5., 5.], [INF, INF, INF, INF]]]).view(1, 7, 2, 2)
    got = _pool_std(x).flatten()
    want = x.flatten(2).std(dim=2, correction=0).flatten()
    assert torch.equal(got.isnan(), want.isnan()) and torch.allclose(got[~want.isnan()], want[~want.isnan()])
    assert got[5] == 0 and got[1:5].isnan().all() and got[6].isnan()


CA_CASES = {  # (sample, channel, pixel) -> value, in x [2, 5, 4, 5]
    "+inf": {(0, 1, 3): INF},
    "-inf": {(0, 2, 0): -INF},
    "nan": {(0, 0, 7): NAN},
    "+inf-inf one channel": {(0, 3, 1): INF, (0, 3, 9): -INF},
    "inf and nan": {(0, 1, 2): INF, (0, 4, 4): NAN},
    "inf whole channel": {(0, 1, p): INF for p in range(20)},
    "both samples": {(0, 1, 3): INF, (1, 4, 19): -INF},
}


def _ca_cases():
    for backend in cpu_backends("channel_attention"):
        for dtype in (torch.float32, torch.bfloat16):
            for fmt in ("contiguous", "channels_last"):
                for act in ("relu", "prelu"):
                    # Triton (interpreted: slow) on a subset: every case, both acts, and bf16 channels_last once
                    if backend == "triton" and (dtype, fmt) not in ((torch.float32, "contiguous"),
                                                                    (torch.bfloat16, "channels_last")):
                        continue
                    if backend == "triton" and dtype == torch.bfloat16 and act == "prelu":
                        continue
                    yield pytest.param(backend, dtype, fmt, act, id=f"{backend}-{str(dtype)[6:]}-{fmt}-{act}")


@pytest.mark.parametrize("backend,dtype,fmt,act", list(_ca_cases()))
@pytest.mark.parametrize("case", list(CA_CASES))
def test_channel_attention_avg_std_nonfinite(backend, dtype, fmt, act, case):
    """A NaN or +-Inf in a channel makes its std NaN, so s = mean + std is NaN and every gate of that sample is
    NaN: the whole sample's output (and its gradients) is NaN, the other samples are untouched."""
    g = torch.Generator().manual_seed(16)
    N, C, H, W, Cr = 2, 5, 4, 5, 3
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    for (n, c, p), v in CA_CASES[case].items():
        x.view(N, C, H * W)[n, c, p] = v
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    t = dict(x=x, w1=torch.randn(Cr, C, generator=g, dtype=torch.float64) * 0.5,
             b1=torch.randn(Cr, generator=g, dtype=torch.float64) * 0.1,
             w2=torch.randn(C, Cr, generator=g, dtype=torch.float64) * 0.5,
             b2=torch.randn(C, generator=g, dtype=torch.float64) * 0.1,
             residual=torch.randn(N, C, H, W, generator=g, dtype=torch.float64),
             act_weight=torch.rand(Cr, generator=g, dtype=torch.float64) * 0.25 if act == "prelu" else None)

    def fn(x, w1, b1, w2, b2, residual, act_weight):
        return ops.channel_attention(x, w1, b1, w2, b2, residual=residual, act=act, act_weight=act_weight,
                                     pool="avg+std")

    (out, grads), (ref, ref_grads) = run_both(fn, t, backend, dtype)
    bad = {n for (n, _, _) in CA_CASES[case]}
    for n in range(N):  # the convention, stated directly
        assert ref[n].isnan().all() == (n in bad), f"reference sample {n}"
    assert_match(out, ref, dtype, f"{backend} out")
    for name, a, e in zip([k for k, v in t.items() if v is not None], grads, ref_grads):
        assert_match(a, e, dtype, f"{backend} grad {name}")


# ------------------------------------------------------------------- ReLU backward at NaN (issue 14 fix 5)

@pytest.mark.parametrize("backend", cpu_backends("channel_attention"))
@pytest.mark.parametrize("pool", ["avg", "avg+std"])
def test_channel_attention_relu_backward_at_nan(backend, pool):
    """A NaN in sample 0 makes its hidden pre-activations NaN. ATen's relu backward passes the gradient there,
    so grad_b1 (a sum over samples) is NaN; the CPU and Triton kernels used to zero it (finite grad_b1)."""
    g = torch.Generator().manual_seed(14)
    N, C, H, W, Cr = 2, 6, 3, 3, 4
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    x[0, 2, 1, 1] = NAN
    t = dict(x=x, w1=torch.randn(Cr, C, generator=g, dtype=torch.float64) * 0.5,
             b1=torch.randn(Cr, generator=g, dtype=torch.float64) * 0.1,
             w2=torch.randn(C, Cr, generator=g, dtype=torch.float64) * 0.5,
             b2=torch.randn(C, generator=g, dtype=torch.float64) * 0.1)

    def fn(x, w1, b1, w2, b2):
        return ops.channel_attention(x, w1, b1, w2, b2, act="relu", pool=pool)

    (out, grads), (ref, ref_grads) = run_both(fn, t, backend, torch.float32)
    assert ref_grads[2].isnan().all()  # grad_b1: what ATen does
    assert_match(out, ref, torch.float32, "out")
    for name, a, e in zip(t, grads, ref_grads):
        assert_match(a, e, torch.float32, f"{backend} grad {name}")


@pytest.mark.parametrize("backend", cpu_backends("balanced_attention"))
def test_balanced_attention_nan_matches_reference(backend):
    """BAM with a NaN: the max-branch gradient goes to the first NaN channel, as torch.max's argmax. (Not
    separable through the op's outputs -- a NaN makes the whole sample's ACAM gate NaN -- so this checks the
    NaN pattern and the clean sample.)"""
    g = torch.Generator().manual_seed(5)
    N, C, H, W = 2, 4, 5, 5
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    x[0, 1, 2, 2] = NAN
    x[0, 3, 2, 2] = NAN
    t = dict(x=x, w1=torch.randn(2, C, generator=g, dtype=torch.float64) * 0.5,
             prelu_w=torch.rand(2, generator=g, dtype=torch.float64) * 0.25,
             w2=torch.randn(C, 2, generator=g, dtype=torch.float64) * 0.5,
             w_sa=torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.3)
    (out, grads), (ref, ref_grads) = run_both(lambda **a: ops.balanced_attention(**a), t, backend, torch.float32)
    assert ref[0].isnan().all() and ref[1].isfinite().all()
    assert_match(out, ref, torch.float32, "out")
    for name, a, e in zip(t, grads, ref_grads):
        assert_match(a, e, torch.float32, f"{backend} grad {name}")


# ------------------------------------------------------------------------------------------ dense_block

DENSE_PATHS = [("compiled", torch.float32, False), ("compiled", torch.bfloat16, False),
               ("compiled", torch.float32, True), ("compiled", torch.bfloat16, True),
               ("compiled", torch.float16, False), ("triton", torch.float32, False)]


def _dense_paths():
    have = set(cpu_backends("dense_block"))
    for backend, dtype, generic in DENSE_PATHS:
        if backend in have:
            yield pytest.param(backend, dtype, generic,
                               id=f"{backend}-{str(dtype)[6:]}" + ("-aten_path" if generic else ""))


def _dense_fn(plan, **kw):
    def fn(x, *ws):
        L = len(plan.layers)
        return ops.dense_block(x, list(ws[:L]), list(ws[L:]), plan, **kw)
    return fn


def _dense_case(C, G, L, N, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    plan = rdb_plan(C, G, L)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    ws = [torch.randn(lay.out_channels, lay.in_len, 3, 3, generator=g, dtype=torch.float64) * (9 * lay.in_len) ** -0.5
          for lay in plan.layers]
    bs = [torch.randn(w.shape[0], generator=g, dtype=torch.float64) * 0.1 for w in ws]
    return plan, x, ws, bs


def _run_dense(plan, x, ws, bs, backend, dtype, generic, monkeypatch, **kw):
    if generic:
        monkeypatch.setenv("SRKERNELS_DENSE_GENERIC", "1")
    t = {"x": x, **{f"w{i}": w for i, w in enumerate(ws)}, **{f"b{i}": b for i, b in enumerate(bs)}}
    fn = _dense_fn(plan, **kw)
    return run_both(lambda **a: fn(*a.values()), t, backend, dtype)


@pytest.mark.parametrize("backend,dtype,generic", list(_dense_paths()))
@pytest.mark.parametrize("shape", [(1, 1), (3, 4)])
def test_dense_block_nan_stays_in_its_sample(backend, dtype, generic, shape, monkeypatch):
    """The fuzz's case: an all-NaN sample 0 must not reach sample 1 through the zero border between them
    (C = 2, G = 2 so that bf16 takes the micro-kernel path too; C = 1 takes the ATen path)."""
    H, W = shape
    for C, G in ((1, 1), (2, 2)):
        plan, x, ws, bs = _dense_case(C, G, 3, 2, H, W, seed=7)
        x[0] = NAN
        (out, grads), (ref, ref_grads) = _run_dense(plan, x, ws, bs, backend, dtype, generic, monkeypatch)
        assert ref[1].isfinite().all()
        assert_match(out, ref, dtype, f"out C={C}")
        assert_match(grads[0], ref_grads[0], dtype, f"grad_x C={C}")


@pytest.mark.parametrize("backend,dtype,generic", list(_dense_paths()))
@pytest.mark.parametrize("sign", [1, -1])
def test_dense_block_inf_input(backend, dtype, generic, sign, monkeypatch):
    """The fuzz's case: x = -inf at 1x1 -> conv -> relu gives 0 or +inf in the reference, never NaN from the
    border (a border row computed from the Inf neighbour was multiplied by 0)."""
    for C, G in ((1, 2), (2, 2)):
        plan, x, ws, bs = _dense_case(C, G, 2, 2, 1, 1, seed=3)
        x[0] = sign * INF
        (out, _), (ref, _) = _run_dense(plan, x, ws, bs, backend, dtype, generic, monkeypatch)
        assert_match(out, ref, dtype, f"out C={C}")
        plan, x, ws, bs = _dense_case(C, G, 2, 2, 4, 3, seed=4)
        x[1, :, 2, 1] = sign * INF
        (out, _), (ref, _) = _run_dense(plan, x, ws, bs, backend, dtype, generic, monkeypatch)
        assert_match(out, ref, dtype, f"out 4x3 C={C}")


@pytest.mark.parametrize("backend,dtype,generic", list(_dense_paths()))
def test_dense_block_relu_backward_at_nan(backend, dtype, generic, monkeypatch):
    """A NaN pixel makes the layer outputs around it NaN. ATen's relu backward passes the (finite) output
    gradient there, so the input gradient next to the NaN is finite and equals the reference's; the kernels
    used to zero it (different finite values)."""
    plan, x, ws, bs = _dense_case(2, 2, 1, 1, 5, 5, seed=9)
    x[0, 0, 2, 2] = NAN
    (out, grads), (ref, ref_grads) = _run_dense(plan, x, ws, bs, backend, dtype, generic, monkeypatch)
    assert ref_grads[0].isfinite().any()  # something to compare
    assert_match(out, ref, dtype, "out")
    assert_match(grads[0], ref_grads[0], dtype, "grad_x")
    for i in range(len(bs)):
        assert_match(grads[1 + len(ws) + i], ref_grads[1 + len(ws) + i], dtype, f"grad bias {i}")
