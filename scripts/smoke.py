#!/usr/bin/env python3
"""Smoke test of an installed srkernels on the CPU it runs on: fast enough for an emulated CPU.

Prints the CPU capability ``srkernels.build_info()`` chose (and checks it with ``--expect``), then runs every fused
op -- channel_attention, balanced_attention, pixel_shuffle, pixel_unshuffle, dense_block -- forward and backward
through the compiled CPU kernels in float32 and bfloat16, contiguous and channels_last, against the reference
backend in float64 on the same rounded values, and two tiny fused models (RCAN, RDN) against their ``fused=False``
twins; and the Winograd conv kernels F(4,3), F(2,3), F(2,5) in both dtypes (bf16: bf16 storage). One line per
check; exit status 1 if any check failed.

CI runs it under ``qemu-x86_64 -cpu Haswell`` (AVX2, no AVX-512) and ``-cpu Nehalem`` (SSE4.2): an instruction the
emulated CPU lacks kills the process with SIGILL. And from a fresh venv holding only the wheel, with
``--installed-under VENV``, so that nothing comes from the source tree.

    python scripts/smoke.py [--expect default|avx2|avx512] [--installed-under PREFIX]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

T0 = time.perf_counter()

import torch  # noqa: E402

T_TORCH = time.perf_counter() - T0

import srkernels  # noqa: E402
from srkernels import ops  # noqa: E402
from srkernels.models import build  # noqa: E402
from srkernels.ops.dense_block import rdb_plan  # noqa: E402

T_IMPORT = time.perf_counter() - T0

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FORMATS = ("contiguous", "channels_last")

# Tolerances per dtype. "max": max |actual - expected| / max(1, max |expected|) (as tests/conftest.py);
# "l2": ||actual - expected|| / ||expected||. The expected values are float64 computations on the same rounded
# inputs and weights, so the bounds only cover the fused kernels' own rounding (accumulation in float32; in
# bfloat16 also the rounded output and intermediates).
OP_TOL = {  # (forward bound, gradient bound, gradient metric), both "max" unless said
    torch.float32: (2e-5, 2e-5, "max"),
    torch.bfloat16: (3e-2, 3e-2, "max"),
}
# A dense block in bfloat16 keeps its layer outputs in bfloat16: a ReLU input within rounding of 0 can flip
# between the two computations and move a few gradient entries by O(1) (tests/ops/test_dense_block.py), so its
# gradients are bounded in relative L2 error, where a wrong kernel (off everywhere) still fails.
DENSE_BF16_GRAD = (5e-2, "l2")
# Models: float32 as tests/models (1e-4 of the range); bfloat16 rounds every layer's output, through ~10 layers.
MODEL_TOL = {  # (forward bound "max", gradient bound, gradient metric)
    torch.float32: (1e-4, 1e-4, "max"),
    torch.bfloat16: (5e-2, 1e-1, "l2"),
}


class Mismatch(Exception):
    pass


def error(actual: torch.Tensor, expected: torch.Tensor, metric: str) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        raise Mismatch(f"shape {tuple(a.shape)} != {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        raise Mismatch("non-finite values")
    if a.numel() == 0:
        return 0.0
    if metric == "max":
        return (a - e).abs().max().item() / max(1.0, e.abs().max().item())
    return (a - e).norm().item() / max(e.norm().item(), 1e-30)


def compare(pairs, fwd_tol: float, grad_tol: float, grad_metric: str) -> str:
    """pairs: [(name, actual, expected)], the forward first. Raises Mismatch naming every tensor out of bounds."""
    worst, bad = {}, []
    for i, (name, a, e) in enumerate(pairs):
        metric, tol = ("max", fwd_tol) if i == 0 else (grad_metric, grad_tol)
        try:
            err = error(a, e, metric)
        except Mismatch as m:
            bad.append(f"{name}: {m}")
            continue
        if err > tol:
            bad.append(f"{name}: {metric} err {err:.2e} > {tol:g}")
        worst[name] = err
    if bad:
        raise Mismatch("; ".join(bad))
    grads = [v for k, v in worst.items() if k != pairs[0][0]]
    if len(pairs) == 1:  # a forward-only kernel
        return f"fwd {worst[pairs[0][0]]:.1e} (tol {fwd_tol:g})"
    return (f"fwd {worst[pairs[0][0]]:.1e} (tol {fwd_tol:g}), {len(grads)} grads <= {max(grads, default=0):.1e} "
            f"({grad_metric}, tol {grad_tol:g})")


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale


def to_layout(t: torch.Tensor, fmt: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)


# ---- the ops: (name, fn(**tensors) -> tensor, float64 inputs, names of feature maps) -------------------------
# C = 20 channels and odd spatial sizes: vector loops of every width (4, 8, 16 floats) have a tail.
N, C, H, W, CR = 2, 20, 5, 7, 5


def op_cases():
    s = 1 / C ** 0.5
    yield ("channel_attention", lambda x, w1, b1, w2, b2, residual: ops.channel_attention(
        x, w1, b1, w2, b2, residual=residual), dict(
        x=randn(N, C, H, W, seed=1), w1=randn(CR, C, seed=2, scale=s), b1=randn(CR, seed=3, scale=0.1),
        w2=randn(C, CR, seed=4, scale=CR ** -0.5), b2=randn(C, seed=5, scale=0.1), residual=randn(N, C, H, W, seed=6)),
        ("x", "residual"))
    yield ("channel_attention avg+std prelu", lambda x, w1, w2, a: ops.channel_attention(
        x, w1, None, w2, None, act="prelu", act_weight=a, pool="avg+std"), dict(
        x=randn(N, C, H, W, seed=11), w1=randn(CR, C, seed=12, scale=s), w2=randn(C, CR, seed=13, scale=CR ** -0.5),
        a=randn(CR, seed=14, scale=0.25)), ("x",))
    yield ("balanced_attention", lambda x, w1, p, w2, w_sa, residual: ops.balanced_attention(
        x, w1, p, w2, w_sa, residual=residual), dict(
        x=randn(N, C, H, W, seed=21), w1=randn(CR, C, seed=22, scale=s), p=randn(CR, seed=23, scale=0.25),
        w2=randn(C, CR, seed=24, scale=CR ** -0.5), w_sa=randn(7, 7, seed=25, scale=1 / 7),
        residual=randn(N, C, H, W, seed=26)), ("x", "residual"))
    r, c = 2, 5
    yield ("pixel_shuffle prelu+residual", lambda x, bias, a, residual: ops.pixel_shuffle(
        x, r, bias=bias, act="prelu", act_weight=a, residual=residual), dict(
        x=randn(N, c * r * r, H, W, seed=31), bias=randn(c * r * r, seed=32, scale=0.1), a=randn(c, seed=33, scale=0.25),
        residual=randn(N, c, H * r, W * r, seed=34)), ("x", "residual"))
    yield ("pixel_unshuffle", lambda x: ops.pixel_unshuffle(x, r), dict(x=randn(N, c, H * r, W * r, seed=41)), ("x",))
    g, layers = 4, 3
    plan = rdb_plan(C, g, layers)
    ws = {f"w{i}": randn(g, C + i * g, 3, 3, seed=50 + i, scale=(9 * (C + i * g)) ** -0.5) for i in range(layers)}
    bs = {f"b{i}": randn(g, seed=60 + i, scale=0.1) for i in range(layers)}

    def dense(x, fw, fb, gw1, gb1, gw2, gb2, **wb):
        return ops.dense_block(x, [wb[f"w{i}"] for i in range(layers)], [wb[f"b{i}"] for i in range(layers)], plan,
                               fuse_weight=fw, fuse_bias=fb, gate=(gw1, gb1, gw2, gb2), residual=x)

    K = C + layers * g
    yield ("dense_block rdb+gate+residual", dense, dict(
        x=randn(N, C, H, W, seed=51), fw=randn(C, K, seed=70, scale=K ** -0.5), fb=randn(C, seed=71, scale=0.1),
        gw1=randn(4, K, seed=72, scale=K ** -0.5), gb1=randn(4, seed=73, scale=0.1), gw2=randn(K, 4, seed=74, scale=0.5),
        gb2=randn(K, seed=75, scale=0.1), **ws, **bs), ("x",))
    # >= 16 channels per layer and >= 64 pixels: the avx2 / avx512 builds run these float32 layers by Winograd
    # F(4x4,3x3) (csrc/cpu/winograd.h, winograd_use), which the block above (4 channels per layer) never reaches
    cw, gw, lw, hw, ww = 16, 16, 2, 9, 8
    plan_w = rdb_plan(cw, gw, lw)
    ws_w = {f"w{i}": randn(gw, cw + i * gw, 3, 3, seed=80 + i, scale=(9 * (cw + i * gw)) ** -0.5) for i in range(lw)}
    bs_w = {f"b{i}": randn(gw, seed=90 + i, scale=0.1) for i in range(lw)}

    def dense_w(x, fw, **wb):
        return ops.dense_block(x, [wb[f"w{i}"] for i in range(lw)], [wb[f"b{i}"] for i in range(lw)], plan_w,
                               fuse_weight=fw, residual=x)

    Kw = cw + lw * gw
    yield ("dense_block winograd layers", dense_w, dict(
        x=randn(N, cw, hw, ww, seed=81), fw=randn(cw, Kw, seed=82, scale=Kw ** -0.5), **ws_w, **bs_w), ("x",))


def check_op(name, fn, inputs, maps, dtype, fmt) -> str:
    fused_in = {k: (to_layout(v.to(dtype), fmt) if k in maps else v.to(dtype)).requires_grad_() for k, v in inputs.items()}
    ref_in = {k: v.detach().double().requires_grad_() for k, v in fused_in.items()}  # the same rounded values
    with srkernels.use_backend("compiled"):
        out = fn(**fused_in)
    with srkernels.use_backend("reference"):
        ref = fn(**ref_in)
    if out.dtype != dtype:
        raise Mismatch(f"output dtype {out.dtype}, expected {dtype}")
    grad = randn(*ref.shape, seed=99)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    pairs = [("forward", out, ref)] + [(f"grad {k}", fused_in[k].grad, ref_in[k].grad) for k in inputs]
    missing = [k for k, v in fused_in.items() if v.grad is None]
    if missing:
        raise Mismatch(f"no gradient for {', '.join(missing)}")
    fwd_tol, grad_tol, metric = OP_TOL[dtype]
    if name.startswith("dense_block") and dtype == torch.bfloat16:
        grad_tol, metric = DENSE_BF16_GRAD
    return compare(pairs, fwd_tol, grad_tol, metric)


def check_winograd(r: int, m: int, dtype) -> str:
    """The Winograd conv kernel F(m, r) called directly (whatever the capability's rule; bf16: bf16 storage with
    float32 arithmetic) against its float64 reference on the same rounded tensors, channels_last, C = 20."""
    import importlib

    mod = importlib.import_module(f"srkernels.ops.winograd_conv{r}x{r}")
    x = to_layout(randn(N, C, H + 4, W + 2, seed=71).to(dtype), "channels_last")
    w = randn(C + 3, C, r, r, seed=72, scale=(r * r * C) ** -0.5).to(dtype)
    b, res = randn(C + 3, seed=73, scale=0.1).to(dtype), randn(N, C + 3, H + 4, W + 2, seed=74).to(dtype)
    u = mod.winograd_weight(w.float(), m) if r == 3 else mod.winograd_weight5(w.float())
    op = getattr(torch.ops.srkernels, f"winograd_conv{r}x{r}")
    out = op(x, u, b, "relu", res)
    ref = mod.reference(x.double(), u.double(), b.double(), "relu", res.double())
    if out.dtype != dtype:
        raise Mismatch(f"output dtype {out.dtype}, expected {dtype}")
    # float32: F(4,3)'s own rounding (tests/ops/test_winograd_conv3x3.py TOL); bf16: one rounding of the output
    return compare([("forward", out, ref)], 2e-5 if dtype == torch.float32 else 2 ** -7, 0.0, "max")


MODELS = {
    "rcan": dict(n_resgroups=1, n_resblocks=1, n_feats=16, reduction=4),
    "rdn": dict(num_features=16, num_blocks=1, num_layers=2, growth=8),
    # 5x5 convs 32->24 (and 24->32 for its input gradient): the Winograd F(2,5) kernel (winograd5_use)
    "srcnn": dict(channels=(32, 24)),
}


def check_model(name, cfg, dtype) -> str:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = build(name, 2, fused=True, **cfg)
        ref = build(name, 2, fused=False, **cfg)
    with torch.no_grad():  # biases and attention gates away from their init (zeros / tiny values)
        for p in fused.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fused.to(dtype)
    ref.double().load_state_dict({k: v.double() for k, v in fused.state_dict().items()})  # the rounded weights
    # 9 x 8 = 72 pixels and 16 channels: RCAN's 3x3 convs take the Winograd training path (winograd_use)
    x = (torch.rand(1, fused.in_channels, 9, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
         * fused.input_range)
    xf = x.to(dtype).requires_grad_()
    xr = xf.detach().double().requires_grad_()
    with srkernels.use_backend("compiled"):
        out = fused(xf)
    ref_out = ref(xr)
    grad = randn(*ref_out.shape, seed=98)
    out.backward(grad.to(dtype))
    ref_out.backward(grad)
    with torch.no_grad(), srkernels.use_backend("compiled"):  # inference: prepacked convs, Winograd ops
        out_inference = fused(xf.detach())
    pairs = [("forward", out, ref_out), ("inference forward", out_inference, ref_out),
             ("grad input", xf.grad, xr.grad)]
    fp = dict(fused.named_parameters())
    for k, p in ref.named_parameters():
        if p.grad is None and fp[k].grad is None:
            continue  # unused by the forward
        if fp[k].grad is None:
            raise Mismatch(f"{k}: no gradient in the fused model")
        pairs.append((f"grad {k}", fp[k].grad, p.grad))
    return compare(pairs, *MODEL_TOL[dtype])


def loaded_from_outside(prefix: str) -> str:
    """srkernels and every torch/srkernels shared library this process mapped lie under ``prefix``."""
    prefix = os.path.realpath(prefix) + os.sep
    paths = {os.path.realpath(srkernels.__file__)}
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if ".so" in path and ("/torch/" in path or "/srkernels/" in path):
                paths.add(os.path.realpath(path))
    outside = sorted(p for p in paths if not p.startswith(prefix))
    if outside:
        raise Mismatch(f"loaded from outside {prefix}: {', '.join(outside)}")
    return f"srkernels and {len(paths) - 1} torch/srkernels libraries from {prefix}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--expect", choices=["default", "avx2", "avx512"],
                    help="the CPU capability build_info() must report as chosen")
    ap.add_argument("--installed-under", metavar="PREFIX",
                    help="fail unless srkernels and the torch libraries were loaded from under PREFIX (a venv)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of " + ",".join(DTYPES))
    args = ap.parse_args()
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]

    info = srkernels.build_info()
    print(f"smoke: python {sys.version.split()[0]}, torch {torch.__version__} (ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}), srkernels {srkernels.__version__} from "
          f"{os.path.dirname(srkernels.__file__)}")
    print(f"smoke: import torch {T_TORCH:.1f} s, import srkernels {T_IMPORT - T_TORCH:.1f} s; "
          f"SRKERNELS_CPU_CAPABILITY={os.environ.get('SRKERNELS_CPU_CAPABILITY', '(unset)')}; build_info: "
          f"cpu_capability={info.get('cpu_capability')!r} cpu_capabilities={info.get('cpu_capabilities')!r} "
          f"cuda={info['cuda']} openmp={info['openmp']}", flush=True)

    failed, passed = [], 0

    def check(label: str, fn) -> None:
        nonlocal passed
        t = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as e:  # noqa: BLE001  (every failure is reported, the run goes on)
            detail, ok = (str(e) if isinstance(e, Mismatch) else f"{type(e).__name__}: {e}"), False
        print(f"{'ok  ' if ok else 'FAIL'} {label:<52} {detail} [{time.perf_counter() - t:.1f} s]", flush=True)
        if ok:
            passed += 1
        else:
            failed.append(label)

    def compiled() -> str:
        if not info["compiled"]:
            raise Mismatch(f"srkernels._C is not loaded: {info['compiled_error']}")
        lacking = [op for op, where in info["ops"].items() if where["cpu"][:1] != ["compiled"]]
        if lacking:
            raise Mismatch(f"no compiled CPU kernel for {', '.join(lacking)}")
        return f"{len(info['ops'])} ops"

    check("compiled CPU kernels loaded", compiled)

    if args.expect:
        def capability() -> str:
            if "cpu_capability" not in info:
                raise Mismatch(f"build_info() has no 'cpu_capability' key (expected {args.expect!r}): this build "
                               f"predates per-capability CPU kernels (issue 12); it reports cpu_isa="
                               f"{info.get('cpu_isa')!r}")
            if info["cpu_capability"] != args.expect:
                raise Mismatch(f"chose {info['cpu_capability']!r}, expected {args.expect!r} "
                               f"(compiled: {info.get('cpu_capabilities')!r})")
            return f"{info['cpu_capability']!r} of {info.get('cpu_capabilities')!r}"

        check(f"cpu_capability is {args.expect}", capability)

    if args.installed_under:
        check(f"loaded from {args.installed_under}", lambda: loaded_from_outside(args.installed_under))

    if info["compiled"]:  # without the extension, "compiled" cannot run: that failure is reported above
        for dtype in dtypes:
            dname = str(dtype).removeprefix("torch.")
            for name, fn, inputs, maps in op_cases():
                for fmt in FORMATS:
                    check(f"{name} {dname} {fmt}", lambda: check_op(name, fn, inputs, maps, dtype, fmt))
            for r, m in ((3, 4), (3, 2), (5, 2)):
                check(f"winograd F({m},{r}) {dname}", lambda: check_winograd(r, m, dtype))
            for mname, cfg in MODELS.items():
                check(f"model {mname} x2 {dname} (fused vs fused=False)", lambda: check_model(mname, cfg, dtype))

    total = time.perf_counter() - T0
    if failed:
        print(f"smoke: {len(failed)} of {passed + len(failed)} checks FAILED ({total:.0f} s): {'; '.join(failed)}")
        return 1
    print(f"smoke: all {passed} checks passed ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
