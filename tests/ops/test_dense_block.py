"""dense_block: every flavour's fused module against its torch.cat reference module (forward and every gradient),
float64 gradcheck, opcheck, torch.compile, state_dict loading, and the memory claim (saved activations linear in
depth). The Triton backend runs in the interpreter (TRITON_INTERPRET=1, set by conftest) on tiny shapes."""
import pytest
import torch

import srkernels
from srkernels import nn as N
from srkernels import ops, use_backend
from srkernels import reference as R
from srkernels.benchmark import saved_bytes
from srkernels.ops.dense_block import DenseLayer, DensePlan, fdirb_plan, rdb_plan, split_plan, srdense_plan

from ..conftest import assert_close, cpu_backends, layout
from ._parity import randn

OP = "dense_block"
# "compiled" is the CPU micro-kernel path for float32/bfloat16; "generic" the ATen path the CUDA kernel uses
# (forced on CPU), "reference" the Python torch.cat formulation of a plan, "triton" the Triton kernels (interpreted).
BACKENDS = ["compiled", "generic", "reference", "triton"]
HAS_TRITON = "triton" in cpu_backends(OP)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed or TRITON_INTERPRET is off")

# (name, ctor args, ctor kwargs, extra forward input)
FLAVOURS = {
    "rdb": (R.ResidualDenseBlock, N.ResidualDenseBlock, (8, 4, 3), {}, False),
    "rdcab": (R.RDCAB, N.RDCAB, (8, 6, 3), dict(reduction=4), True),
    "srdense": (R.SRDenseBlock, N.SRDenseBlock, (8, 4, 3), {}, False),
    "split": (R.SplitBlock, N.SplitBlock, (8, 3), dict(reduction=4), False),
    "fdirb": (R.FDIRB, N.FDIRB, (8, 3), dict(sub_channels=4, reduction=4), False),
}
SHAPES = [(1, 5, 7), (2, 6, 5), (3, 1, 9)]  # (N, H, W): N=1 and N>1, odd sizes, a single row
# The interpreter runs every program in Python: smaller maps, still N=1 and N>1, odd sizes, a single row.
TRITON_SHAPES = [(1, 3, 5), (2, 3, 3), (2, 1, 5)]


@pytest.fixture
def backend_ctx(monkeypatch):
    def enter(backend):
        if backend == "generic":
            monkeypatch.setenv("SRKERNELS_DENSE_GENERIC", "1")
            return use_backend("compiled")
        monkeypatch.delenv("SRKERNELS_DENSE_GENERIC", raising=False)
        return use_backend(backend)

    return enter


def make_pair(flavour, dtype, seed=0, cfg=None):
    ref_cls, fused_cls, args, kwargs, extra = FLAVOURS[flavour]
    if cfg is not None:
        args, kwargs = cfg
    torch.manual_seed(seed)
    fused = fused_cls(*args, **kwargs).to(dtype)
    for p in fused.parameters():  # biases away from 0 and attention weights large enough to matter
        p.data.add_(0.05 * torch.randn_like(p))
    ref = ref_cls(*args, **kwargs).double()
    # the reference sees exactly the rounded weights the fused module sees
    ref.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    ref.channels = args[0]
    return ref, fused, extra


def check_module(ref, fused, extra, shape, dtype, fmt, ctx, seed=0):
    """Forward and every gradient of ``fused`` (in dtype/fmt) against ``ref`` in float64.

    In bfloat16/float16 a ReLU whose input is within rounding of 0 can flip between the two computations and
    move a few gradient entries by O(1) (the eager reference module run in the same dtype shows the same), so a
    gradient also passes if its relative L2 error is at most 3x that of the eager module in the same dtype
    (or 5%). A wrong kernel is off everywhere and fails both bounds."""
    Nb, H, W = shape
    C = ref.channels
    xs = [randn(Nb, C, H, W, seed=seed)] + ([randn(Nb, C, H, W, seed=seed + 7)] if extra else [])
    fin = [layout(x.to(dtype), fmt).requires_grad_(True) for x in xs]
    rin = [x.detach().double().requires_grad_(True) for x in fin]
    with ctx:
        out = fused(*fin)
    expected = ref(*rin)
    assert out.dtype == dtype and out.shape == expected.shape
    if fmt == "channels_last" and H * W > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, expected, dtype, "forward")
    g = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    out.backward(g.to(dtype))
    expected.backward(g)
    got = [(f"grad input {i}", a.grad, b.grad) for i, (a, b) in enumerate(zip(fin, rin))]
    got += [(f"grad {n}", p.grad, q.grad) for (n, p), q in zip(fused.named_parameters(), ref.parameters())]
    eager_rel = [None] * len(got)
    if dtype in (torch.bfloat16, torch.float16):
        eager = _low_copy(ref, dtype)
        lin = [x.detach().to(dtype).requires_grad_(True) for x in rin]
        eager(*lin).backward(g.to(dtype))
        lows = [x.grad for x in lin] + [p.grad for p in eager.parameters()]
        eager_rel = [_rel(lo, e) for lo, (_, _, e) in zip(lows, got)]
    for (what, a, e), er in zip(got, eager_rel):
        assert a is not None, f"{what}: no gradient"
        if er is not None and _rel(a, e) <= max(0.05, 3 * er):
            continue
        assert_close(a, e, dtype, what)


def _rel(a, e):
    return ((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)).item()


def _low_copy(ref, dtype):
    import copy

    eager = copy.deepcopy(ref).to(dtype)
    eager.zero_grad(set_to_none=True)
    return eager


def _triton_case(flavour, shape, fmt, dtype):
    """Interpreter time: float32 on every shape, in one layout per shape (alternating with the flavour);
    bfloat16 on one shape with N > 1, contiguous for some flavours and channels_last for the others."""
    i = list(FLAVOURS).index(flavour)
    if dtype == torch.float32:
        return fmt == ("contiguous", "channels_last")[(i + TRITON_SHAPES.index(shape)) % 2]
    return shape == TRITON_SHAPES[1] and fmt == ("contiguous", "channels_last")[i % 2]


def _cases():
    for backend in BACKENDS:
        marks = [needs_triton] if backend == "triton" else []
        for flavour in FLAVOURS:
            for shape in TRITON_SHAPES if backend == "triton" else SHAPES:
                for fmt in ("contiguous", "channels_last"):
                    for dtype in (torch.float32, torch.bfloat16):
                        if backend == "triton":
                            if not _triton_case(flavour, shape, fmt, dtype):
                                continue
                        elif backend != "compiled" and (dtype != torch.float32 or shape != SHAPES[1]):
                            continue  # the other paths: one shape, float32
                        yield pytest.param(backend, flavour, shape, fmt, dtype, marks=marks,
                                           id=f"{backend}-{flavour}-{'x'.join(map(str, shape))}-{fmt}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend,flavour,shape,fmt,dtype", list(_cases()))
def test_parity(backend_ctx, backend, flavour, shape, fmt, dtype):
    ref, fused, extra = make_pair(flavour, dtype)
    check_module(ref, fused, extra, shape, dtype, fmt, backend_ctx(backend))


@pytest.mark.parametrize("backend", ["compiled", "generic", pytest.param("triton", marks=needs_triton)])
def test_float16_and_strided_input(backend_ctx, backend):
    ref, fused, extra = make_pair("rdb", torch.float16)
    check_module(ref, fused, extra, (2, 4, 5) if backend != "triton" else (2, 3, 3), torch.float16, "strided",
                 backend_ctx(backend))


@needs_triton
@pytest.mark.parametrize("flavour", ["rdcab", "split"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_triton_float16(backend_ctx, flavour, fmt):
    ref, fused, extra = make_pair(flavour, torch.float16)
    check_module(ref, fused, extra, (2, 3, 3), torch.float16, fmt, backend_ctx("triton"))


@needs_triton
@pytest.mark.parametrize("kernel_size", [1, 5])
def test_triton_kernel_sizes_and_wide_tiles(backend_ctx, kernel_size):
    """k = 1 (no border) and k = 5 (p = 2), with several tiles everywhere: 72 pixels per sample (64-pixel tiles,
    so the gate's pooled sums merge two tiles), an 80-channel buffer (64-wide channel tiles) and layer inputs of
    40 and 60 channels (32-wide reduction chunks)."""
    ref, fused, extra = make_pair("rdcab", torch.float32,
                                  cfg=((40, 20, 2), dict(reduction=16, kernel_size=kernel_size)))
    check_module(ref, fused, extra, (1, 9, 8), torch.float32, "contiguous", backend_ctx("triton"))


@pytest.mark.parametrize("shape", [(1, 3, 5), (2, 3, 5)], ids=["odd-pixels", "even-pixels"])
def test_compiled_bf16_1x1(backend_ctx, shape):
    """bf16 micro-kernel path with 1x1 convs (no border rows): an odd N*H*W must not take the VNNI-pair path,
    whose last pair would read past the buffer; both counts match the reference."""
    ref, fused, extra = make_pair("rdcab", torch.bfloat16, cfg=((8, 6, 3), dict(reduction=4, kernel_size=1)))
    check_module(ref, fused, extra, shape, torch.bfloat16, "contiguous", backend_ctx("compiled"))


@pytest.mark.parametrize("flavour,cfg,shape,fmt", [
    ("rdb", ((64, 64, 8), {}), (1, 5, 6), "contiguous"),  # RDN config B: G0 = G = 64, C = 8
    ("rdcab", ((64, 64, 8), {}), (2, 3, 4), "channels_last"),  # RDCAB-RecursiveSRNet: 576-wide concat, CA 576/36
    ("srdense", ((128, 16, 8), {}), (2, 4, 3), "contiguous"),  # SRDenseNet block 1
    ("split", ((64, 8), {}), (1, 4, 5), "channels_last"),  # Split version: 16 distilled + 48 remaining
    ("fdirb", ((64, 8), dict(sub_channels=32)), (1, 3, 5), "contiguous"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_published_configs(backend_ctx, flavour, cfg, shape, fmt, dtype):
    ref, fused, extra = make_pair(flavour, dtype, cfg=cfg)
    check_module(ref, fused, extra, shape, dtype, fmt, backend_ctx("compiled"))


def test_row_segments_and_multi_row_tiles(backend_ctx):
    """Work items: a 70-pixel row is cut into segments (64 pixels per tile at G = 64); 3-pixel rows are grouped."""
    ref, fused, extra = make_pair("rdb", torch.float32, cfg=((16, 64, 2), {}))
    check_module(ref, fused, extra, (1, 3, 70), torch.float32, "contiguous", backend_ctx("compiled"))
    check_module(ref, fused, extra, (2, 9, 3), torch.float32, "channels_last", backend_ctx("compiled"))


def _gradcheck_cases():
    for backend in ("compiled", "reference", "triton"):
        for flavour in FLAVOURS:
            # interpreter time: rdb is rdcab without the gate, srdense's no-fusion path has its parity tests
            if backend == "triton" and flavour in ("rdb", "srdense"):
                continue
            yield pytest.param(backend, flavour, marks=[needs_triton] if backend == "triton" else [],
                               id=f"{flavour}-{backend}")


@pytest.mark.parametrize("backend,flavour", list(_gradcheck_cases()))
def test_gradcheck_float64(backend_ctx, backend, flavour):
    cfg = {"rdb": ((3, 2, 2), {}), "rdcab": ((3, 4, 2), dict(reduction=2)), "srdense": ((3, 2, 3), {}),
           "split": ((4, 2), dict(reduction=2)), "fdirb": ((3, 3), dict(sub_channels=2, reduction=3))}[flavour]
    _, fused, extra = make_pair(flavour, torch.float64, seed=2, cfg=cfg)
    C = cfg[0][0]
    names = [n for n, _ in fused.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in fused.parameters()]
    xs = [randn(2, C, 3, 4, seed=5).requires_grad_(True)] + ([randn(2, C, 3, 4, seed=6).requires_grad_(True)]
                                                               if extra else [])

    def fn(*a):
        state = dict(zip(names, a[len(xs):]))
        with backend_ctx(backend):
            return torch.func.functional_call(fused, state, tuple(a[:len(xs)]))

    # the interpreter is slow: the Triton op gets the fast (random projection) gradcheck
    assert torch.autograd.gradcheck(fn, (*xs, *params), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=backend == "triton")


def _op_args(dtype=torch.float32, gate=True, requires_grad=True):
    plan = rdb_plan(6, 4, 2)
    g = torch.Generator().manual_seed(0)
    def t(*s, scale=0.3):
        return (torch.randn(*s, generator=g) * scale).to(dtype).requires_grad_(requires_grad)
    x = t(2, 6, 5, 3, scale=1.0)
    ws = [t(4, 6 + 4 * i, 3, 3) for i in range(2)]
    bs = [t(4), t(4)]
    K = plan.fuse_len
    gw = (t(3, K), t(3), t(K, 3), t(K)) if gate else (None,) * 4
    return (x, ws, bs, plan.ints(), t(6, K), t(6), *gw, t(2, 6, 5, 3, scale=1.0))


def _detach(a):
    if isinstance(a, list):
        return [_detach(b) for b in a]
    return a.detach() if isinstance(a, torch.Tensor) else a


@pytest.mark.parametrize("backend", ["compiled", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("gate", [True, False])
def test_opcheck(backend_ctx, backend, gate):
    args = _op_args(gate=gate)
    with backend_ctx(backend):
        ns = torch.ops.srkernels if backend == "compiled" else torch.ops.srkernels_triton
        torch.library.opcheck(ns.dense_block, args)
        det = tuple(_detach(a) for a in args)
        out, buf, stats = ns.dense_block(*det)
        bargs = (torch.randn_like(out), buf, stats, det[1], det[2], det[3], det[4], *det[6:10])
        torch.library.opcheck(ns.dense_block_backward, bargs)


@needs_triton
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_op_matches_compiled_op(gate, dtype):
    """The raw ops: the same (out, buffer, stats) triple (the buffer layout contract, zero border and margin
    included) and the same backward outputs as the C++ op."""
    args = tuple(_detach(a) for a in _op_args(dtype=dtype, gate=gate, requires_grad=False))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    outs = [ns.dense_block(*args) for ns in (torch.ops.srkernels, torch.ops.srkernels_triton)]
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        torch.testing.assert_close(b, a, **tol)
    out, buf, stats = outs[0]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    bargs = (g, buf, stats, args[1], args[2], args[3], args[4], *args[6:10])
    grads = [ns.dense_block_backward(*bargs) for ns in (torch.ops.srkernels, torch.ops.srkernels_triton)]

    def flat(t):
        return [u for v in t for u in (v if isinstance(v, list) else [v])]

    for a, b in zip(flat(grads[0]), flat(grads[1])):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("flavour", ["rdb", "rdcab", "fdirb"])
def test_compile_fullgraph(backend_ctx, flavour):
    ref, fused, extra = make_pair(flavour, torch.float32)
    ref = ref.float()
    compiled = torch.compile(fused, fullgraph=True)
    xs = [torch.randn(2, 8, 5, 6, requires_grad=True)] + ([torch.randn(2, 8, 5, 6)] if extra else [])
    x2 = [x.detach().clone().requires_grad_(x.requires_grad) for x in xs]
    with backend_ctx("compiled"):
        out = compiled(*xs)
    expected = ref(*x2)
    assert_close(out, expected, torch.float32, "compiled forward")
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_close(xs[0].grad, x2[0].grad, torch.float32, "compiled grad x")
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"compiled grad {name}")


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_loads_reference_state_dict_and_fuse(flavour):
    ref_cls, fused_cls, args, kwargs, extra = FLAVOURS[flavour]
    torch.manual_seed(3)
    ref = ref_cls(*args, **kwargs)
    fused = fused_cls(*args, **kwargs)
    fused.load_state_dict(ref.state_dict())  # strict: same keys and shapes
    assert list(fused.state_dict()) == list(ref.state_dict())
    swapped = srkernels.nn.fuse(ref_cls(*args, **kwargs))
    assert type(swapped) is fused_cls
    swapped.load_state_dict(ref.state_dict())
    xs = [torch.randn(2, args[0], 4, 5)] + ([torch.randn(2, args[0], 4, 5)] if extra else [])
    with torch.no_grad():
        assert_close(fused(*xs), ref(*xs), torch.float32, "fused")
        assert_close(swapped(*xs), ref(*xs), torch.float32, "fuse()")




@pytest.mark.parametrize("flavour", ["rdb", "rdcab"])
def test_saved_activation_memory_is_linear_in_depth(backend_ctx, flavour):
    ref_cls, fused_cls = FLAVOURS[flavour][:2]
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    extra = (torch.randn(2, 16, 12, 12),) if flavour == "rdcab" else ()
    fused_b, ref_b = [], []
    for depth in (2, 4, 8):
        torch.manual_seed(0)
        ref = ref_cls(16, 16, depth)
        fused = fused_cls(16, 16, depth)
        fused.load_state_dict(ref.state_dict())
        with backend_ctx("compiled"):
            fused_b.append(saved_bytes(fused, x, *extra))
        ref_b.append(saved_bytes(ref, x, *extra))
    # equal steps in depth (2 -> 4 -> 8 is +2 then +4 layers): linear means the second step is twice the first
    f1, f2 = fused_b[1] - fused_b[0], fused_b[2] - fused_b[1]
    r1, r2 = ref_b[1] - ref_b[0], ref_b[2] - ref_b[1]
    assert f2 == 2 * f1, f"fused saved bytes {fused_b} are not linear in depth"
    assert r2 > 2 * r1 * 1.2, f"reference saved bytes {ref_b} should grow quadratically"
    assert fused_b[2] <= 0.5 * ref_b[2], f"fused {fused_b[2]} B vs reference {ref_b[2]} B at depth 8"


def test_saves_only_the_buffer(backend_ctx):
    """Saved for backward: one [rows, T] buffer (x and every layer output) and weights; no per-layer tensors."""
    _, fused, _ = make_pair("rdb", torch.float32)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    saved = []
    params = {p.data_ptr() for p in fused.parameters()}
    with backend_ctx("compiled"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused(x)
    acts = [t for t in saved if t.numel() > 1 and t.data_ptr() not in params]
    big = [t for t in acts if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].shape == (2 * 8 * 8 + 2 * 9, 8 + 3 * 4)


@pytest.mark.parametrize("backend", ["compiled", "generic", "reference", pytest.param("triton", marks=needs_triton)])
def test_empty_batch(backend_ctx, backend):
    _, fused, _ = make_pair("rdcab", torch.float32)
    x = torch.randn(0, 8, 4, 4, requires_grad=True)
    with backend_ctx(backend):
        out = fused(x, torch.zeros(0, 8, 4, 4))
    assert out.shape == (0, 8, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert all(torch.count_nonzero(p.grad) == 0 for p in fused.parameters())


def test_deterministic_and_thread_independent(backend_ctx):
    _, fused, _ = make_pair("rdb", torch.float32, cfg=((16, 16, 3), {}))
    x0 = torch.randn(3, 16, 13, 11)
    runs = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, prev, prev):
            torch.set_num_threads(threads)
            fused.zero_grad()
            x = x0.clone().requires_grad_(True)
            with backend_ctx("compiled"):
                out = fused(x)
            out.backward(torch.ones_like(out))
            runs.append((out.detach(), x.grad, fused.convs[0].conv[0].weight.grad.clone(), fused.LFF.bias.grad.clone()))
    finally:
        torch.set_num_threads(prev)
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


@needs_triton
def test_triton_deterministic(backend_ctx, monkeypatch):
    """No atomics: two runs give bitwise equal outputs and gradients, also with the pixel reductions cut into
    several partials (more pixels than _SPLIT_ROWS would need a big map, so the split size is lowered), which
    must still match the reference."""
    from srkernels.triton import dense_block as TD

    ref, fused, extra = make_pair("rdcab", torch.float32, cfg=((8, 4, 2), dict(reduction=4)))
    monkeypatch.setattr(TD, "_SPLIT_ROWS", 16)  # 70 pixels -> 5 partials per weight, bias and fusion gradient
    check_module(ref, fused, extra, (2, 5, 7), torch.float32, "contiguous", backend_ctx("triton"))
    x0 = torch.randn(2, 8, 5, 7)
    runs = []
    for _ in range(2):
        fused.zero_grad()
        x = x0.clone().requires_grad_(True)
        with backend_ctx("triton"):
            out = fused(x)
        out.backward(torch.ones_like(out))
        runs.append([out.detach(), x.grad] + [p.grad.clone() for p in fused.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_triton
def test_build_info_lists_triton():
    assert "triton" in srkernels.build_info()["ops"][OP]["cpu"]


def test_models_pick_up_fused_blocks():
    from srkernels.models import build

    m = build("rdn", 2, fused=True, num_features=8, num_blocks=1, num_layers=2, growth=4)
    assert type(m.RDBs[0]) is N.ResidualDenseBlock
    m = build("srdensenet", 4, fused=True, num_features=8, num_blocks=1, num_layers=2, growth=4, bottleneck=8)
    assert type(m.dcb1[0]) is N.SRDenseBlock


def test_plans():
    p = rdb_plan(64, 64, 8)
    assert p.channels == 576 and p.fuse_len == 576 and p.layers[7].in_len == 512
    s = srdense_plan(128, 16, 8)
    assert (s.layers[0].in_start, s.layers[1].in_start, s.layers[7].in_len) == (0, 128, 112)
    sp = split_plan(64, 8, 16)
    assert [lay.in_len for lay in sp.layers] == [64, 112, 160, 208, 256, 304, 352, 400] and sp.fuse_len == 128
    f = fdirb_plan(64, 8, 32)
    assert f.channels == 64 * 8 + 32 and f.layers[1].res_start == 64 and not f.layers[7].relu


@pytest.mark.parametrize("change,exc,match", [
    (dict(x=torch.randn(2, 6, 5)), ValueError, "x must be 4-D"),
    (dict(x=torch.randn(2, 5, 5, 3)), ValueError, "channels but the plan"),
    (dict(weights=[torch.randn(4, 6, 3, 3)]), ValueError, "layers but got"),
    (dict(weights=[torch.randn(4, 6, 3, 3), torch.randn(4, 9, 3, 3)]), ValueError, r"weights\[1\] must have shape"),
    (dict(biases=[torch.randn(5), None]), ValueError, r"biases\[0\] must have shape"),
    (dict(fuse_weight=torch.randn(6, 13)), ValueError, "fuse_weight must have shape"),
    (dict(fuse_weight=None), ValueError, "needs fuse_weight"),
    (dict(residual=torch.randn(2, 6, 5, 4)), ValueError, "residual must have shape"),
    (dict(gate=(torch.randn(3, 13), None, torch.randn(14, 3), None)), ValueError, "gate w1 must have shape"),
    (dict(weights=[torch.randn(4, 6, 3, 3, dtype=torch.float64), torch.randn(4, 10, 3, 3)]), TypeError, "dtype"),
    (dict(plan="rdb"), TypeError, "plan must be a DensePlan"),
])
def test_validation(change, exc, match):
    x, ws, bs, _plan, fw, fb, gw1, gb1, gw2, gb2, res = _op_args(requires_grad=False)
    kw = dict(x=x, weights=ws, biases=bs, plan=rdb_plan(6, 4, 2), fuse_weight=fw, fuse_bias=fb,
              gate=(gw1, gb1, gw2, gb2), residual=res)
    kw.update(change)
    with pytest.raises(exc, match=match):
        ops.dense_block(kw.pop("x"), kw.pop("weights"), kw.pop("biases"), kw.pop("plan"), **kw)


@pytest.mark.parametrize("layers,match", [
    ((DenseLayer(0, 5, 4, 2),), "reads buffer channel 4 before"),
    ((DenseLayer(0, 4, 3, 2),), "already written"),
    ((DenseLayer(0, 4, 9, 2),), "outside the buffer"),
    ((DenseLayer(0, 4, 4, 2, split=3),), "split must be in"),
    ((DenseLayer(0, 4, 4, 2, res_start=5),), "residual channel"),
])
def test_plan_validation(layers, match):
    with pytest.raises(ValueError, match=match):
        DensePlan(8, 4, 3, layers, 0, 6)


# ---- Winograd: float32 3x3 layers of the compiled CPU path run as Winograd F(4,3) / F(2,3) (csrc/cpu/winograd.h)
# where winograd_conv3x3 would (SRKERNELS_WINOGRAD, winograd_use: avx2/avx512 builds, >= 16 channels in and out,
# >= 64 pixels). The shapes above are mostly below 64 pixels (the brgemm path); these cover the Winograd one.

def _winograd_capability():
    return srkernels._backend._C is not None and srkernels._backend._C.cpu_capability() in ("avx2", "avx512")


needs_winograd = pytest.mark.skipif(not _winograd_capability(),
                                    reason="Winograd runs on the avx2/avx512 variants of the compiled extension only")

# Every plan the models build (srkernels/models/rdn.py, rdcab.py): RDN's RDB (G0 = G = 64, C = 8), RDCAB
# (64, 64, 8; its gated fusion), the Split block (16 distilled + 48 remaining: split destinations) and FD-IRB
# (residual layers, a last layer without ReLU); plus a split of 24 that straddles a 16-lane vector.
WINO_CONFIGS = {
    "rdb": ((64, 64, 8), {}),
    "rdcab": ((64, 64, 8), {}),
    "split": ((64, 8), {}),
    "fdirb": ((64, 8), dict(sub_channels=32)),
    "split-24": ((48, 3), dict(distillation_rate=0.5)),
}
# F(4,3) rounding: ~3e-6 of the output range on these (float64 reference); the brgemm path ~3e-7.
WINO_TOL = {4: 3e-5, 2: 1e-5}


def _wino_module(flavour):
    base = "split" if flavour == "split-24" else flavour
    args, kwargs = WINO_CONFIGS[flavour]
    return make_pair(base, torch.float32, cfg=(args, kwargs))


def _forward_err(fused, ref, extra, shape, fmt, seed=0):
    Nb, H, W = shape
    C = ref.channels
    xs = [randn(Nb, C, H, W, seed=seed)] + ([randn(Nb, C, H, W, seed=seed + 7)] if extra else [])
    with torch.no_grad():
        out = fused(*[layout(x.float(), fmt) for x in xs])
        expected = ref(*[x.double() for x in xs])
    if fmt == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    return out, (out.double() - expected).abs().max().item() / max(1.0, expected.abs().max().item())


@needs_winograd
@pytest.mark.parametrize("m", [4, 2])
@pytest.mark.parametrize("flavour,shape,fmt", [
    ("rdb", (1, 9, 11), "contiguous"),  # odd H and W: partial tiles on both far edges
    ("rdcab", (2, 8, 13), "channels_last"),  # N > 1: tiles of two samples in one block
    ("split", (1, 13, 7), "channels_last"),
    ("fdirb", (2, 11, 9), "contiguous"),
    ("split-24", (1, 10, 10), "contiguous"),
])
def test_winograd_forward(backend_ctx, monkeypatch, m, flavour, shape, fmt):
    """Forward vs float64 within WINO_TOL, and really Winograd: not the brgemm result (SRKERNELS_WINOGRAD=0),
    which stays within the float32 tolerance."""
    ref, fused, extra = _wino_module(flavour)
    with backend_ctx("compiled"):
        monkeypatch.setenv("SRKERNELS_WINOGRAD", str(m))
        out, err = _forward_err(fused, ref, extra, shape, fmt)
        monkeypatch.setenv("SRKERNELS_WINOGRAD", "0")
        direct, err0 = _forward_err(fused, ref, extra, shape, fmt)
    assert err <= WINO_TOL[m], f"F({m},3): relative max error {err:.3g} > {WINO_TOL[m]}"
    assert err0 <= 2e-6, f"brgemm path: relative max error {err0:.3g}"
    assert not torch.equal(out, direct), "the Winograd path did not run"


@needs_winograd
@pytest.mark.parametrize("train_tile", ["2", "4"])
@pytest.mark.parametrize("flavour", ["rdcab", "split", "fdirb"])
def test_winograd_training(backend_ctx, monkeypatch, flavour, train_tile):
    """Training uses the Winograd forward too (SRKERNELS_WINOGRAD_TRAIN's tile; the saved buffer holds its
    outputs; backward is the brgemm one): every gradient vs float64 within 1e-4 of its scale (measured
    ~1e-6 .. 1e-5)."""
    monkeypatch.setenv("SRKERNELS_WINOGRAD", "4")
    monkeypatch.setenv("SRKERNELS_WINOGRAD_TRAIN", train_tile)
    ref, fused, extra = _wino_module(flavour)
    Nb, H, W = 1, 9, 10
    xs = [randn(Nb, 64, H, W, seed=3)] + ([randn(Nb, 64, H, W, seed=4)] if extra else [])
    fin = [x.float().requires_grad_(True) for x in xs]
    rin = [x.double().requires_grad_(True) for x in xs]
    with backend_ctx("compiled"):
        out = fused(*fin)
    expected = ref(*rin)
    g = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out.backward(g.float())
    expected.backward(g)
    pairs = [(a.grad, b.grad) for a, b in zip(fin, rin)]
    pairs += [(p.grad, q.grad) for p, q in zip(fused.parameters(), ref.parameters())]
    for a, e in pairs:
        err = (a.double() - e).abs().max().item() / max(1.0, e.abs().max().item())
        assert err <= 1e-4, err


@needs_winograd
def test_winograd_weight_cache_sees_updates(backend_ctx, monkeypatch):
    """The transformed weights are cached in C++ per weight (storage, version, shape): an in-place update and a
    new weight at the same address must both be seen."""
    monkeypatch.setenv("SRKERNELS_WINOGRAD", "4")
    ref, fused, extra = _wino_module("rdb")
    shape = (1, 8, 9)
    with backend_ctx("compiled"):
        _, err = _forward_err(fused, ref, extra, shape, "contiguous")
        assert err <= WINO_TOL[4]
        with torch.no_grad():
            for p in fused.parameters():
                p.mul_(1.5)
        ref.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
        _, err = _forward_err(fused, ref, extra, shape, "contiguous")
        assert err <= WINO_TOL[4]


def test_winograd_env_validation(backend_ctx, monkeypatch):
    """SRKERNELS_WINOGRAD is checked as conv2d_pointwise checks it: a ValueError naming the variable."""
    monkeypatch.setenv("SRKERNELS_WINOGRAD", "3")
    _, fused, _ = make_pair("rdb", torch.float32, cfg=((16, 16, 2), {}))
    with backend_ctx("compiled"), torch.no_grad(), pytest.raises(ValueError, match="SRKERNELS_WINOGRAD"):
        fused(torch.randn(1, 16, 8, 8))


# ---- Winograd tile of training and the transformed-weight cache (csrc/cpu/dense_block.cpp winograd_tile,
# csrc/runtime/weight_cache.h). An RDB-like plan small enough for a fast test but inside winograd_use
# (in_len and G >= 16, H*W >= 64).

def _rdb_args(seed=0, requires_grad=False):
    plan = rdb_plan(16, 16, 2)
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return (0.1 * torch.randn(*shape, generator=g)).requires_grad_(requires_grad)

    x = torch.randn(1, 16, 9, 10, generator=g)
    ws = [t(lay.out_channels, lay.in_len, 3, 3) for lay in plan.layers]
    bs = [t(lay.out_channels) for lay in plan.layers]
    return x, ws, bs, plan, t(16, plan.fuse_len), t(16)


def _rdb_call(args):
    x, ws, bs, plan, fw, fb = args
    return ops.dense_block(x, ws, bs, plan, fuse_weight=fw, fuse_bias=fb).detach()


@needs_winograd
def test_winograd_training_tile(backend_ctx, monkeypatch):
    """A call autograd records (grad mode on and a tensor requiring grad) takes SRKERNELS_WINOGRAD_TRAIN
    (default 2: F(2,3); 0 = brgemm; 0 also when SRKERNELS_WINOGRAD=0), any other SRKERNELS_WINOGRAD, as
    conv2d_pointwise's 3x3 convs do: bit for bit the inference result of that tile."""
    monkeypatch.delenv("SRKERNELS_WINOGRAD", raising=False)
    monkeypatch.delenv("SRKERNELS_WINOGRAD_TRAIN", raising=False)
    infer, train = _rdb_args(), _rdb_args(requires_grad=True)
    with backend_ctx("compiled"):
        by_tile = {}
        for m in ("4", "2", "0"):
            monkeypatch.setenv("SRKERNELS_WINOGRAD", m)
            by_tile[m] = _rdb_call(infer)
        assert not torch.equal(by_tile["4"], by_tile["2"]) and not torch.equal(by_tile["2"], by_tile["0"])
        monkeypatch.delenv("SRKERNELS_WINOGRAD")
        assert torch.equal(_rdb_call(infer), by_tile["4"])  # inference default: F(4,3)
        assert torch.equal(_rdb_call(train), by_tile["2"])  # training default: F(2,3)
        monkeypatch.setenv("SRKERNELS_WINOGRAD_TRAIN", "0")
        x_grad = (infer[0].clone().requires_grad_(), *infer[1:])
        assert torch.equal(_rdb_call(x_grad), by_tile["0"])  # the input alone requiring grad counts too
        with torch.no_grad():  # not recorded: inference, whatever requires grad
            assert torch.equal(_rdb_call(train), by_tile["4"])
        assert torch.equal(_rdb_call(infer), by_tile["4"])
        for env, train_env, tile in (("4", "4", "4"), ("4", "0", "0"), ("2", "4", "4"), ("0", "4", "0")):
            monkeypatch.setenv("SRKERNELS_WINOGRAD", env)
            monkeypatch.setenv("SRKERNELS_WINOGRAD_TRAIN", train_env)
            assert torch.equal(_rdb_call(train), by_tile[tile]), (env, train_env)
            assert torch.equal(_rdb_call(infer), by_tile[env]), (env, train_env)  # inference: unaffected
        monkeypatch.setenv("SRKERNELS_WINOGRAD", "4")
        monkeypatch.setenv("SRKERNELS_WINOGRAD_TRAIN", " 3")
        assert torch.equal(_rdb_call(infer), by_tile["4"])  # inference does not read it
        with pytest.raises(ValueError, match="SRKERNELS_WINOGRAD_TRAIN"):
            _rdb_call(train)


@needs_winograd
def test_winograd_training_tile_module(backend_ctx, monkeypatch):
    """Through nn.ResidualDenseBlock: its inference (no_grad; parameters that require grad) keeps
    SRKERNELS_WINOGRAD's F(4,3), its training forward takes F(2,3) by default."""
    monkeypatch.delenv("SRKERNELS_WINOGRAD", raising=False)
    monkeypatch.delenv("SRKERNELS_WINOGRAD_TRAIN", raising=False)
    torch.manual_seed(0)
    block = N.ResidualDenseBlock(16, 16, 2)
    x = torch.randn(1, 16, 9, 10)
    with backend_ctx("compiled"):
        train = {m: None for m in ("default", "2", "4")}
        for m in train:
            if m != "default":
                monkeypatch.setenv("SRKERNELS_WINOGRAD_TRAIN", m)
            train[m] = block(x).detach()
        with torch.no_grad():
            infer = block(x)
    assert torch.equal(train["default"], train["2"]) and torch.equal(infer, train["4"])
    assert not torch.equal(train["2"], train["4"])


@needs_winograd
def test_winograd_weight_cache_release(backend_ctx, monkeypatch):
    """The transformed weights of freed weights are released at the next dense_block call (the cache keeps
    hitting for live ones) and by srkernels.empty_cpu_cache(); cpu_cache_info()["weights"] counts them."""
    monkeypatch.setenv("SRKERNELS_WINOGRAD", "4")
    srkernels.empty_cpu_cache()

    def info():
        return srkernels.cpu_cache_info()["weights"]

    def u_bytes(args):  # 36 taps x in_len x G rounded up to 16, float32, per 3x3 layer
        return sum(36 * w.shape[1] * ((w.shape[0] + 15) // 16 * 16) * 4 for w in args[1])

    assert info()["bytes"] == 0 and info()["entries"] == 0
    live, dead = _rdb_args(seed=1), _rdb_args(seed=2)
    L = len(live[1])
    with backend_ctx("compiled"), torch.no_grad():
        first = _rdb_call(live)
        _rdb_call(dead)
        held = info()
        assert (held["bytes"], held["entries"]) == (u_bytes(live) + u_bytes(dead), 2 * L)
        del dead
        again = _rdb_call(live)
        now = info()
        assert (now["bytes"], now["entries"]) == (u_bytes(live), L), "the freed weights' entries were kept"
        assert (now["hits"], now["misses"]) == (held["hits"] + L, held["misses"]), "a live weight was re-transformed"
        assert torch.equal(again, first)
        srkernels.empty_cpu_cache()
        assert (info()["bytes"], info()["entries"]) == (0, 0)
        assert torch.equal(_rdb_call(live), first)
        assert info()["misses"] == now["misses"] + L
