"""Property fuzz of the fused ops on CPU (issue 16): random shapes (sizes 1, odd sizes, C not a multiple of 8,
N == 0), float32/bfloat16, contiguous / channels_last / strided inputs, with and without ``out=`` (a fresh
buffer in any layout, ``out`` being ``residual``, ``out`` partially overlapping ``residual`` or overlapping
``x``), NaN/Inf sprinkled into some inputs. Each case either matches the float64 reference (run through the
same wrapper under ``use_backend("reference")``, on the same rounded values) within the dtype's tolerance,
NaN and Inf positions included, or raises ValueError/TypeError/RuntimeError whose message names the argument.

Deterministic (``derandomize=True``, no example database). ``SRKERNELS_FUZZ_EXAMPLES`` sets the examples per
op (default 500, what CI runs: about 15 s for the file on this 2-core machine; raise it for a longer local run). See what
was exercised with ``pytest --hypothesis-show-statistics`` (events: out mode and outcome).

NaN and Inf are sprinkled into every op, dtype and pool (conventions: docs/ops.md, "NaN and Inf").
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from srkernels import ops, use_backend
from srkernels.ops.dense_block import rdb_plan

from ..conftest import layout
from ._parity import assert_match

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("SRKERNELS_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck), print_blob=False)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
FMTS = st.sampled_from(["contiguous", "channels_last", "strided"])
OUT_MODES = ["none", "fresh", "residual", "partial", "x"]
ERRORS = (ValueError, TypeError, RuntimeError)

pytestmark = pytest.mark.usefixtures("one_thread")


def _t(gen: torch.Generator, *shape, scale=1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _sprinkle(t: torch.Tensor, what: str, gen: torch.Generator) -> torch.Tensor:
    """A few NaN / +-Inf at random positions (at least one when t is non-empty)."""
    if what == "none" or t.numel() == 0:
        return t
    t = t.clone()
    flat = t.view(-1)
    k = 1 + int(torch.randint(0, 3, (1,), generator=gen))
    idx = torch.randint(0, flat.numel(), (k,), generator=gen)
    if what == "nan":
        flat[idx] = float("nan")
    else:
        sign = torch.randint(0, 2, (k,), generator=gen, dtype=torch.float64) * 2 - 1
        flat[idx] = sign * float("inf")
    return t


def _names_an_argument(msg: str, names) -> bool:
    return any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", msg) for n in names)


def run_case(fn, args: dict, maps: tuple[str, ...], dtype, fmt: str, out_mode: str, out_fmt: str, names,
             what: str) -> None:
    """``fn(**args, out=...)`` fused (``dtype``, maps in ``fmt``) against ``fn(**args)`` on the reference in
    float64 over the same rounded values; ``out_mode`` picks the ``out=`` buffer."""
    fused = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            v = v.to(dtype)
            if k in maps:
                v = layout(v, fmt)
        fused[k] = v
    ref = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in fused.items()}
    with torch.no_grad():
        try:
            with use_backend("reference"):
                expected = fn(**ref)
        except ERRORS as e:  # an invalid case: the fused op must refuse it too, naming the argument
            assert _names_an_argument(str(e), names), f"{what}: reference error names no argument: {e}"
            event(f"invalid case refused ({type(e).__name__})")
            with use_backend("compiled"), pytest.raises(type(e)):
                fn(**fused)
            return
        with use_backend("compiled"):
            if out_mode == "none":
                got = fn(**fused)
            elif out_mode == "fresh":
                out = layout(torch.full(expected.shape, 7.0, dtype=dtype), out_fmt)
                got = fn(**fused, out=out)
                assert got is out
            elif out_mode == "residual":
                got = fn(**fused, out=fused["residual"])
                assert got is fused["residual"]
            else:  # refused aliasing: out partly over residual, or over x
                src = fused["residual"] if out_mode == "partial" else fused["x"]
                n, m = src.numel(), expected.numel()
                if n <= 1 or m == 0:  # buf[:n] and buf[1:1 + m] share no element
                    return
                buf = torch.empty(max(n, m) + 1, dtype=dtype)
                buf[:n] = src.contiguous().view(-1)
                fused["residual" if out_mode == "partial" else "x"] = buf[:n].view(src.shape)
                with pytest.raises(ValueError) as info:
                    fn(**fused, out=buf[1:1 + m].view(expected.shape))
                want = "residual" if out_mode == "partial" else "x"
                assert "out" in str(info.value) and want in str(info.value), f"{what}: {info.value}"
                event(f"out={out_mode}: refused")
                return
    assert_match(got, expected, dtype, what)
    event(f"out={out_mode}: matched" + (" (non-finite)" if not expected.isfinite().all() else ""))


@st.composite
def _common(draw, has_out=True):
    seed = draw(st.integers(0, 2**31 - 1))
    dtype, fmt = draw(DTYPES), draw(FMTS)
    out_mode = draw(st.sampled_from(OUT_MODES)) if has_out else "none"
    return seed, dtype, fmt, out_mode, draw(FMTS)


def _fuzz_maps(max_c: int, max_hw: int):
    """``@FUZZ @given(...)`` of an op on one [N, C, H, W] map with ``out=``: N in 0..3, C in 1..max_c, H and W in
    1..max_hw; the test draws the rest from ``data``."""
    return lambda test: FUZZ(given(c=_common(), N=st.integers(0, 3), C=st.integers(1, max_c),
                                   H=st.integers(1, max_hw), W=st.integers(1, max_hw), data=st.data())(test))


def _draw_residual_special(data, seed, out_mode):
    """Whether a residual is passed (always when ``out`` is to alias it), which non-finite values are sprinkled,
    and the case's generator."""
    with_res = data.draw(st.booleans(), "residual") or out_mode in ("residual", "partial")
    special = data.draw(st.sampled_from(["none", "nan", "inf"]), "special")
    return with_res, special, torch.Generator().manual_seed(seed)


@_fuzz_maps(20, 9)
def test_fuzz_channel_attention(c, N, C, H, W, data):
    seed, dtype, fmt, out_mode, out_fmt = c
    Cr = data.draw(st.integers(1, C), "Cr")
    pool = data.draw(st.sampled_from(["avg", "avg+std"]), "pool")
    act = data.draw(st.sampled_from(["relu", "prelu"]), "act")
    bias = data.draw(st.booleans(), "bias")
    with_res, special, g = _draw_residual_special(data, seed, out_mode)
    args = dict(x=_sprinkle(_t(g, N, C, H, W), special, g), w1=_t(g, Cr, C, scale=C**-0.5),
                b1=_t(g, Cr, scale=0.1) if bias else None, w2=_t(g, C, Cr, scale=Cr**-0.5),
                b2=_t(g, C, scale=0.1) if bias else None, residual=_t(g, N, C, H, W) if with_res else None,
                act=act, act_weight=_t(g, Cr, scale=0.1).abs() if act == "prelu" else None, pool=pool)
    run_case(lambda **a: ops.channel_attention(a.pop("x"), a.pop("w1"), a.pop("b1"), a.pop("w2"), a.pop("b2"), **a),
             args, ("x", "residual"), dtype, fmt, out_mode, out_fmt,
             ("x", "w1", "b1", "w2", "b2", "residual", "act", "act_weight", "pool", "out"),
             f"channel_attention {[N, C, H, W]} Cr={Cr} {pool} {act} {dtype} {fmt} out={out_mode} {special}")


@_fuzz_maps(20, 9)
def test_fuzz_balanced_attention(c, N, C, H, W, data):
    seed, dtype, fmt, out_mode, out_fmt = c
    Cr = data.draw(st.integers(1, C), "Cr")
    K = data.draw(st.sampled_from([1, 3, 5, 7]), "K")
    with_res, special, g = _draw_residual_special(data, seed, out_mode)
    args = dict(x=_sprinkle(_t(g, N, C, H, W), special, g), w1=_t(g, Cr, C, scale=C**-0.5),
                prelu_w=_t(g, Cr, scale=0.1).abs(), w2=_t(g, C, Cr, scale=Cr**-0.5), w_sa=_t(g, K, K, scale=1 / K),
                residual=_t(g, N, C, H, W) if with_res else None)
    run_case(lambda **a: ops.balanced_attention(a.pop("x"), a.pop("w1"), a.pop("prelu_w"), a.pop("w2"),
                                                a.pop("w_sa"), **a),
             args, ("x", "residual"), dtype, fmt, out_mode, out_fmt,
             ("x", "w1", "prelu_w", "w2", "w_sa", "residual", "out"),
             f"balanced_attention {[N, C, H, W]} Cr={Cr} K={K} {dtype} {fmt} out={out_mode} {special}")


@_fuzz_maps(6, 7)
def test_fuzz_pixel_shuffle(c, N, C, H, W, data):
    seed, dtype, fmt, out_mode, out_fmt = c
    r = data.draw(st.integers(1, 3), "r")
    act = data.draw(st.sampled_from([None, "none", "relu", "prelu"]), "act")
    bias = data.draw(st.booleans(), "bias")
    # now and then a channel count that is not a multiple of r*r: must be refused, naming x
    Cin = C * r * r + (data.draw(st.integers(1, r * r - 1), "bad") if r > 1 and data.draw(st.booleans(), "b?")
                       and data.draw(st.booleans(), "b??") else 0)
    with_res, special, g = _draw_residual_special(data, seed, out_mode)
    args = dict(x=_sprinkle(_t(g, N, Cin, H, W), special, g), r=r, bias=_t(g, Cin, scale=0.1) if bias else None,
                act=act, act_weight=_t(g, C, scale=0.1).abs() if act == "prelu" else None,
                residual=_sprinkle(_t(g, N, C, H * r, W * r), special, g) if with_res else None)
    run_case(lambda **a: ops.pixel_shuffle(a.pop("x"), a.pop("r"), **a), args, ("x", "residual"), dtype, fmt,
             out_mode, out_fmt, ("x", "r", "bias", "act", "act_weight", "residual", "out"),
             f"pixel_shuffle {[N, Cin, H, W]} r={r} {act} {dtype} {fmt} out={out_mode} {special}")


@FUZZ
@given(c=_common(has_out=False), N=st.integers(0, 3), C=st.integers(1, 6), H=st.integers(1, 4),
       W=st.integers(1, 4), r=st.integers(1, 3), special=st.sampled_from(["none", "nan", "inf"]))
def test_fuzz_pixel_unshuffle(c, N, C, H, W, r, special):
    seed, dtype, fmt, _, _ = c
    g = torch.Generator().manual_seed(seed)
    x = _sprinkle(_t(g, N, C, H * r, W * r), special, g)
    run_case(lambda **a: ops.pixel_unshuffle(a["x"], a["r"]), dict(x=x, r=r), ("x",), dtype, fmt, "none", "",
             ("x", "r"), f"pixel_unshuffle {list(x.shape)} r={r} {dtype} {fmt} {special}")


@FUZZ
@given(c=_common(has_out=False), N=st.integers(0, 2), C=st.integers(1, 9), H=st.integers(1, 6),
       W=st.integers(1, 6), data=st.data())
def test_fuzz_dense_block(c, N, C, H, W, data):
    seed, dtype, fmt, _, _ = c
    G = data.draw(st.integers(1, 5), "growth")
    L = data.draw(st.integers(1, 3), "layers")
    plan = rdb_plan(C, G, L)
    K = plan.fuse_len
    mode = data.draw(st.sampled_from(["plain", "fuse", "fuse+res", "gate"]), "mode")
    # Found by this fuzz (bf16 ATen path: border rows zeroed by a 0/1 multiply, NaN * 0 = NaN); regression
    # tests in tests/ops/test_nonfinite.py.
    special = data.draw(st.sampled_from(["none", "nan", "inf"]), "special")
    g = torch.Generator().manual_seed(seed)
    ws = [_t(g, lay.out_channels, lay.in_len, 3, 3, scale=(9 * lay.in_len) ** -0.5) for lay in plan.layers]
    bs = [_t(g, w.shape[0], scale=0.1) if data.draw(st.booleans(), "bias") else None for w in ws]
    args = dict(x=_sprinkle(_t(g, N, C, H, W), special, g), weights=ws, biases=bs)
    if mode != "plain":
        args.update(fuse_weight=_t(g, C, K, scale=K**-0.5), fuse_bias=_t(g, C, scale=0.1))
    if mode == "fuse+res":
        args["residual"] = _t(g, N, C, H, W)
    if mode == "gate":
        Cr = data.draw(st.integers(1, K), "Cr")
        args["gate"] = (_t(g, Cr, K, scale=K**-0.5), _t(g, Cr, scale=0.1), _t(g, K, Cr, scale=Cr**-0.5),
                        _t(g, K, scale=0.1))

    def fn(**a):  # run_case casts tensors only: the lists/tuple of weights follow x's dtype here
        cast = dict(a)
        dt = cast["x"].dtype
        cast["weights"] = [w.to(dt) for w in cast["weights"]]
        cast["biases"] = [b.to(dt) if b is not None else None for b in cast["biases"]]
        if "gate" in cast:
            cast["gate"] = tuple(t.to(dt) for t in cast["gate"])
        return ops.dense_block(cast.pop("x"), cast.pop("weights"), cast.pop("biases"), plan, **cast)

    run_case(fn, args, ("x", "residual"), dtype, fmt, "none", "",
             ("x", "weights", "biases", "plan", "fuse_weight", "fuse_bias", "gate", "residual"),
             f"dense_block {[N, C, H, W]} G={G} L={L} {mode} {dtype} {fmt} {special}")
