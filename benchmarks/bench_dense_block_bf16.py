"""Fused dense blocks in bfloat16 vs float32 on CPU (issue #13: bf16 is the fast path where the CPU has native
bf16), and one 64->64 3x3 oneDNN conv in both dtypes, the bound on what bf16 can gain on this CPU.

    python benchmarks/bench_dense_block_bf16.py [--rounds 5] [--sizes 32,48]

One thread, process CPU time per call (the machine is shared), variants interleaved, min and median over rounds.
Blocks at their published configs: RDN's RDB and RDCAB (64 features, growth 64, 8 layers), SRDenseNet's block
(128 in, growth 16, 8 layers); [1, C, LR, LR] channels_last; inference (no_grad) and a training step (forward +
backward of sum()). Which bf16 path ran is printed: the micro-kernel path (oneDNN brgemm on bf16 operands) or the
ATen path (fp32 GEMMs on converted operands; CPUs without native bf16, see docs/ops.md dense_block).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import srkernels
from srkernels import nn as N
from srkernels.benchmark import describe_machine

BLOCKS = {"rdb": (N.ResidualDenseBlock, (64, 64, 8), False), "rdcab": (N.RDCAB, (64, 64, 8), True),
          "srdense": (N.SRDenseBlock, (128, 16, 8), False)}


def cpu_ms(fn, calls: int) -> float:
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls * 1e3


def run(cases: dict, rounds: int, calls: int) -> dict:
    for f in cases.values():
        f()
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, f in cases.items():
            times[k].append(cpu_ms(f, calls))
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def bf16_path() -> str:
    m = N.ResidualDenseBlock(8, 4, 2).to(torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        m(torch.randn(1, 8, 4, 4, dtype=torch.bfloat16))
    return "ATen (fp32 GEMMs)" if any(e.name == "aten::mm" for e in prof.events()) else "micro-kernel (bf16 brgemm)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default="32,48")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cap = srkernels.build_info().get("cpu_capability")
    print(f"{describe_machine().get('cpu', '?')}; srkernels cpu_capability {cap}; torch "
          f"{torch.backends.cpu.get_cpu_capability()}; 1 thread; CPU time; dense_block bf16 path: {bf16_path()}")
    for lr in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(1, 64, lr, lr).contiguous(memory_format=torch.channels_last)
        w = torch.randn(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            conv = run({"conv fp32": lambda: F.conv2d(x, w, padding=1),
                        "conv bf16": (lambda xb, wb: lambda: F.conv2d(xb, wb, padding=1))(x.bfloat16(), w.bfloat16())},
                       args.rounds, max(1, 20 * 32 * 32 // (lr * lr)))
        gflop = 2 * lr * lr * 9 * 64 * 64 / 1e9
        print(f"LR {lr}: one 64->64 3x3 conv (oneDNN, channels_last): fp32 {conv['conv fp32'][0]:.3f} ms "
              f"({gflop / conv['conv fp32'][0] * 1e3:.0f} GFLOP/s), bf16 {conv['conv bf16'][0]:.3f} ms "
              f"({gflop / conv['conv bf16'][0] * 1e3:.0f} GFLOP/s): bf16 {conv['conv fp32'][0] / conv['conv bf16'][0]:.2f}x")
        cases = {}
        for name, (cls, a, extra) in BLOCKS.items():
            for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                torch.manual_seed(0)
                m = cls(*a).to(dt)
                xi = torch.randn(1, a[0], lr, lr).to(dt).contiguous(memory_format=torch.channels_last)
                rest = (torch.randn_like(xi),) if extra else ()
                xg = xi.clone().requires_grad_(True)

                def fwd(m=m, xi=xi, rest=rest):
                    with torch.no_grad():
                        m(xi, *rest)

                def train(m=m, xg=xg, rest=rest):
                    m(xg, *rest).sum().backward()

                cases[(name, "inference", tag)] = fwd
                cases[(name, "train step", tag)] = train
        res = run(cases, args.rounds, 2)
        print(f"| LR {lr} | block | pass | fp32 ms (min / median) | bf16 ms (min / median) | bf16 speed-up (min) |")
        print("|---|---|---|---|---|---|")
        for name in BLOCKS:
            for what in ("inference", "train step"):
                f, b = res[(name, what, "fp32")], res[(name, what, "bf16")]
                print(f"| | {name} | {what} | {f[0]:.2f} / {f[1]:.2f} | {b[0]:.2f} / {b[1]:.2f} | {f[0] / b[0]:.2f}x |")


if __name__ == "__main__":
    main()
