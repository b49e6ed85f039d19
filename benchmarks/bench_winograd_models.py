"""Benchmark-only estimate of what ``winograd_conv3x3`` would do to a fused model end to end: every 3x3 stride-1
conv that ``winograd_use`` accepts is routed to Winograd F(4,3) (or F(2,3)) by patching the conv entry points
of srkernels.nn for this process only (the library is not changed: plugging the op in is the lead's call).

    python benchmarks/bench_winograd_models.py [--model rcan] [--sizes 48] [--rounds 3] [--threads 1] [--m 4]

Times (process CPU time / threads, interleaved rounds, min and median): eager reference NCHW and channels_last,
fused, fused + Winograd. Accuracy: max |y - y64| / max |y64| against the reference model run in float64, for
the eager, fused and Winograd outputs.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import srkernels  # noqa: E402
import srkernels.nn.attention  # noqa: E402
import srkernels.nn.conv  # noqa: E402
import srkernels.nn.upsample  # noqa: E402
from srkernels.benchmark import describe_machine  # noqa: E402
from srkernels.models import build  # noqa: E402
W = importlib.import_module("srkernels.ops.winograd_conv3x3")  # the module: ops.<name> is the function

_orig = srkernels.nn.conv.conv2d
_PATCHED = (srkernels.nn.conv, srkernels.nn.attention, srkernels.nn.upsample)
stats = {"winograd": 0, "onednn": 0}


def make_wino_conv2d(m: int):
    def conv2d(conv, x, activation=None, residual=None, *, with_bias=True):
        if (not torch.is_grad_enabled() and x.dtype == torch.float32 and x.is_cpu and conv.kernel_size == (3, 3)
                and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
                and conv.groups == 1 and conv.padding_mode == "zeros"
                and W.winograd_use(conv.in_channels, conv.out_channels, x.shape[2], x.shape[3])):
            w = conv.weight
            key = (w._version, w.data_ptr())
            cache = conv.__dict__.setdefault("_wino", {})  # per m: the variants alternate in one process
            c = cache.get(m)
            if c is None or c[0] != key:
                c = cache[m] = (key, W.winograd_weight(w.detach(), m))
            stats["winograd"] += 1
            return W.winograd_conv3x3(x, c[1], conv.bias if with_bias else None, act=activation, residual=residual)
        stats["onednn"] += 1
        return _orig(conv, x, activation, residual, with_bias=with_bias)
    return conv2d


def patched(fn, m):
    def run():
        new = make_wino_conv2d(m)
        for mod in _PATCHED:
            mod.conv2d = new
        try:
            return fn()
        finally:
            for mod in _PATCHED:
                mod.conv2d = _orig
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="rcan")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=[48])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--m", type=int, nargs="+", default=[4])
    ap.add_argument("--onnx", action="store_true", help="add ONNX Runtime (model exported from the reference)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    info = describe_machine()
    print(f"# {info.get('cpu')}, srkernels capability {srkernels.build_info()['cpu_capability']}, torch "
          f"{info['cpu_capability']}, threads {a.threads}, model {a.model} x{a.scale}, CPU time / threads")
    torch.manual_seed(0)
    ref = build(a.model, a.scale, fused=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = build(a.model, a.scale, fused=True).eval()
    fused.load_state_dict(ref.state_dict())
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    ref64 = copy.deepcopy(ref).double()
    for lr in a.sizes:
        x = torch.rand(1, ref.in_channels, lr, lr) * getattr(ref, "input_range", 1.0)
        xcl = x.contiguous(memory_format=torch.channels_last)
        fns = {"eager NCHW": lambda: ref(x), "eager CL": lambda: ref_cl(xcl), "fused": lambda: fused(xcl)}
        for m in a.m:
            fns[f"fused+winograd F({m},3)"] = patched(lambda: fused(xcl), m)
        if a.onnx:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from bench_models import export_onnx, onnx_session

            path, why = export_onnx(ref, x)
            sess, why = onnx_session(path, a.threads) if path is not None else (None, why)
            if sess is None:
                print(f"ONNX Runtime skipped: {why}")
            else:
                xn = x.numpy()
                fns["ONNX Runtime"] = lambda: torch.from_numpy(sess.run(None, {"x": xn})[0])
        with torch.no_grad():
            y64 = ref64(x.double())
            errs = {}
            for k, f in fns.items():
                stats.update(winograd=0, onednn=0)
                y = f()
                errs[k] = ((y.double() - y64).abs().max() / y64.abs().max()).item()
                if "winograd" in k:
                    print(f"{k}: {stats['winograd']} convs by Winograd, {stats['onednn']} by oneDNN")
            times = {k: [] for k in fns}
            for _ in range(a.rounds):
                for k, f in fns.items():
                    t = time.process_time()
                    f()
                    times[k].append((time.process_time() - t) / a.threads)
        best_eager = min(min(times["eager NCHW"]), min(times["eager CL"]))
        print(f"| LR | variant | ms min | ms median | vs best eager | vs fused | rel err vs float64 |")
        print("|---|---|---|---|---|---|---|")
        for k, v in times.items():
            print(f"| {lr} | {k} | {min(v) * 1e3:.1f} | {statistics.median(v) * 1e3:.1f} | "
                  f"{best_eager / min(v):.2f}x | {min(times['fused']) / min(v):.2f}x | {errs[k]:.1e} |")


if __name__ == "__main__":
    main()
