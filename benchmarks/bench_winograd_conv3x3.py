"""3x3 64->64 conv (RCAN's body conv), float32, channels_last, CPU inference: Winograd (srkernels
``winograd_conv3x3``, F(2,3), F(4,3) and F(6,3), the last bf16 storage's tile where ``winograd6_use`` picks it)
against ``F.conv2d`` and the prepacked oneDNN conv the fused models use (``mkldnn._convolution_pointwise`` on a
weight packed for the input size, srkernels/nn/conv.py). ``--kernel 5``: the 5x5 conv (padding 2; SRCNN's 64->32
layer with ``--channels 64 32``) by ``winograd_conv5x5`` (F(2,5), and F(4,5): bf16 storage's tile). With at most 8 output channels also
``direct_conv2d`` (benchmarks/bench_direct_conv2d.py: a model's last conv).

    python benchmarks/bench_winograd_conv3x3.py [--threads 1 2] [--sizes 32 48 96] [--rounds 15] [--channels 64 64]
    python benchmarks/bench_winograd_conv3x3.py --kernel 5 --channels 64 32 --sizes 32 48 96 192 --threads 1
    python benchmarks/bench_winograd_conv3x3.py --cold --threads 1   # + weights read from memory on every call
    SRKERNELS_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_winograd_conv3x3.py
    python benchmarks/bench_winograd_conv3x3.py --dtype bfloat16   # bf16 activations and weights: oneDNN's bf16
        # conv (where it runs bf16: else the baseline is F.conv2d's) against Winograd on bf16 storage, the
        # transformed weight and the arithmetic in float32 (srkernels/ops/conv2d_pointwise.py winograd_bf16)

Time: process CPU time of all threads (``time.process_time``: the machine is shared) and wall time, variants
interleaved, min and median of the rounds; the rate counts the direct conv's FLOPs (2 * k^2 * C_in * C_out * H * W)
for every variant, so Winograd's rate is "effective". Error: max |y - float64 F.conv2d| / max(1, max |ref|) for each variant. Each
result row is appended to benchmarks/results/winograd_conv.jsonl with the machine, capability and threads.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import srkernels  # noqa: E402
from srkernels.benchmark import describe_machine  # noqa: E402
W = importlib.import_module("srkernels.ops.winograd_conv3x3")  # the module: ops.<name> is the function
W5 = importlib.import_module("srkernels.ops.winograd_conv5x5")
D = importlib.import_module("srkernels.ops.direct_conv2d")
from srkernels.ops.conv2d_pointwise import onednn_bf16  # noqa: E402


COLD_MB = 256  # --cold: distinct weights per variant, more than the last-level cache a core sees


def cycling(fn, pool):
    """A call of ``fn(weight)`` on the next weight of ``pool`` (the first call: pool[0], the measured weight)."""
    it = itertools.cycle(pool)
    return lambda: fn(next(it))


def variants(x, w, b, cold=False):
    k = w.shape[-1]
    pad = [k // 2] * 2

    def pack(wt):
        return torch.ops.mkldnn._reorder_convolution_weight(wt, pad, [1, 1], [1, 1], 1, list(x.shape))

    def onednn(pw):
        return torch.ops.mkldnn._convolution_pointwise(x, pw, b, pad, [1, 1], [1, 1], 1, "none", [None], "")

    fns = {"F.conv2d": lambda: F.conv2d(x, w, b, padding=k // 2)}
    has_onednn = w.dtype == torch.float32 or onednn_bf16()
    if has_onednn:
        pw = pack(w)
        fns["onednn prepacked"] = lambda: onednn(pw)
    # the transformed weight is float32 whatever the activations' dtype
    if k == 5:
        transform = (lambda wt: W5.winograd_weight5(wt.float()))
        u = transform(w)
        wino, name = (lambda ut: W5.winograd_conv5x5(x, ut, b)), "winograd F(2,5)"
        fns[name] = lambda: wino(u)
        u45 = W5.winograd_weight5(w.float(), 4)
        fns["winograd F(4,5)"] = lambda: W5.winograd_conv5x5(x, u45, b)
    else:
        u2, u = W.winograd_weight(w.float(), 2), W.winograd_weight(w.float(), 4)
        wino, name, transform = (lambda ut: W.winograd_conv3x3(x, ut, b)), "winograd F(4,3)", (
            lambda wt: W.winograd_weight(wt.float(), 4))
        u6 = W.winograd_weight(w.float(), 6)
        fns["winograd F(2,3)"] = lambda: W.winograd_conv3x3(x, u2, b)
        fns[name] = lambda: wino(u)
        fns["winograd F(6,3)"] = lambda: W.winograd_conv3x3(x, u6, b)
    if w.shape[0] <= 8:  # few outputs: the direct kernel (direct_use takes it up to 4)
        wd = D.direct_weight(w.float())
        fns["direct_conv2d"] = lambda: D.direct_conv2d(x, wd, b)
    if cold:  # the same calls on weights that are not in any cache
        g = torch.Generator().manual_seed(1)

        def pool(first, make):  # first + distinct weights up to COLD_MB (RCAN x4's 411 F(4,3) weights: 242 MB)
            n = max(2, -(-COLD_MB * 2**20 // (first.numel() * first.element_size())))
            return [first] + [make(torch.randn(w.shape, generator=g) * w.std()) for _ in range(n - 1)]

        if has_onednn:
            fns["onednn prepacked, cold weights"] = cycling(onednn, pool(pw, lambda wt: pack(wt.to(w.dtype))))
        fns[f"{name}, cold weights"] = cycling(wino, pool(u, transform))
    return fns


def run_case(cin, cout, size, threads, rounds, k=3, cold=False, dtype=torch.float32):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, size, size, generator=g).contiguous(memory_format=torch.channels_last).to(dtype)
    w = (torch.randn(cout, cin, k, k, generator=g) / (k * cin ** 0.5)).to(dtype)
    b = torch.randn(cout, generator=g).to(dtype)
    fns = variants(x, w, b, cold)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=k // 2)
    err = {n: ((f().double() - ref).abs().max() / max(1.0, ref.abs().max().item())).item() for n, f in fns.items()}
    flop = 2 * k * k * cin * cout * size * size
    inner = max(1, int(1e8 / flop))  # ~0.5 ms or more per timed sample
    times = {k: [] for k in fns}
    walls = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for k, f in fns.items():
                t, w0 = time.process_time(), time.perf_counter()
                for _ in range(inner):
                    f()
                walls[k].append((time.perf_counter() - w0) / inner)
                times[k].append((time.process_time() - t) / inner)  # CPU time of all threads
    first = "onednn prepacked" if "onednn prepacked" in times else "F.conv2d"  # the baseline of the ratios
    base, wbase = min(times[first]), min(walls[first])
    rows = []
    for k, v in times.items():
        rows.append(dict(variant=k, cpu_ms_min=min(v) * 1e3, cpu_ms_median=statistics.median(v) * 1e3,
                         wall_ms_min=min(walls[k]) * 1e3, gflops_per_cpu_s=flop / min(v) / 1e9,
                         vs_onednn_cpu=base / min(v), vs_onednn_wall=wbase / min(walls[k]), err=err[k]))
    return rows


def main(kernel: int = 3, channels=(64, 64), sizes=(32, 48, 96), doc: str = __doc__) -> None:
    """The command line; ``kernel``, ``channels``, ``sizes``: the defaults (benchmarks/bench_winograd_conv5x5.py
    passes the 5x5 ones)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(sizes))
    ap.add_argument("--channels", type=int, nargs=2, default=list(channels), metavar=("C_IN", "C_OUT"))
    ap.add_argument("--kernel", type=int, choices=(3, 5), default=kernel, help="conv kernel size (5: winograd_conv5x5)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cold", action="store_true",
                    help=f"also oneDNN and Winograd F(4,3) / F(2,5) cycling through {COLD_MB} MB of distinct weights "
                         "(each call reads its weight from memory, as in a network)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="activations' and weights' dtype (bfloat16: Winograd keeps float32 arithmetic)")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    info = describe_machine()
    cap = srkernels.build_info()["cpu_capability"]
    print(f"# {info.get('cpu')} srkernels capability {cap}, torch {info['cpu_capability']}, {a.rounds} interleaved "
          f"rounds; CPU ms = process CPU time of all threads per call, GFLOP per CPU-second; wall ms min")
    print(f"# {a.kernel}x{a.kernel} conv, {a.dtype}" + ("" if dtype == torch.float32 else
          f" (oneDNN native bf16: {onednn_bf16()}; without it the ratios are against F.conv2d)"))
    print("| C_in->C_out | LR | threads | variant | CPU ms min | CPU ms median | GFLOP/CPU-s | vs oneDNN (CPU) | "
          "wall ms min | vs oneDNN (wall) | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for threads in a.threads:
        for size in a.sizes:
            rows = run_case(*a.channels, size, threads, a.rounds, a.kernel, a.cold, dtype)
            for r in rows:
                print(f"| {a.channels[0]}->{a.channels[1]} | {size} | {threads} | {r['variant']} | "
                      f"{r['cpu_ms_min']:.3f} | {r['cpu_ms_median']:.3f} | {r['gflops_per_cpu_s']:.0f} | "
                      f"{r['vs_onednn_cpu']:.2f}x | {r['wall_ms_min']:.3f} | {r['vs_onednn_wall']:.2f}x | "
                      f"{r['err']:.1e} |")
            if not a.no_save:
                with open(ROOT / "benchmarks" / "results" / "winograd_conv.jsonl", "a") as f:
                    f.write(json.dumps(dict(machine=info, srkernels_capability=cap, threads=threads, size=size,
                                            channels=a.channels, kernel=a.kernel, dtype=a.dtype, time=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                    time.gmtime()),
                                            rows=rows)) + "\n")


if __name__ == "__main__":
    main()
