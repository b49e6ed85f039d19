"""RCAN's residual group (n RCABs with channel attention, then a conv, + the group's skip), CPU inference, 64
channels, hidden width 4, Winograd F(4,3): ``residual_group`` (one call per group) against the same group layer by
layer through the existing ops, and against the rate a single hot conv reaches.

    python benchmarks/bench_residual_group.py [--sizes 32,48,96] [--blocks 20] [--threads 1] [--rounds 15]
                                              [--clock wall|cpu] [--bf16] [--record]
    python benchmarks/bench_residual_group.py --sizes 48 --rounds 5      # quick

Variants, timed interleaved in one process (``srkernels.benchmark.interleaved``; ``--clock cpu``: the process CPU
time per call, as benchmarks/bench_models.py), min and median of the rounds:

- ``residual_group``: the dispatcher op ``torch.ops.srkernels.residual_group`` on one group (what
  ``srkernels.nn``'s RCAN calls, its arguments prepared once);
- ``layers``: the same group op by op: per RCAB ``winograd_conv3x3`` (+ ReLU), ``winograd_conv3x3``,
  ``channel_attention`` with the block's skip as residual; then the tail ``winograd_conv3x3`` with the group's
  skip (the path ``srkernels.nn`` takes without ``residual_group``);
- ``hot conv x (2n+1)``: one 64->64 ``winograd_conv3x3`` call on one input and weight, repeated 2n + 1 times (the
  group's convs with every weight and map hot in cache and no attention: the rate a group could reach).

``residual_group`` is checked against ``layers`` in the same run (max |a - b| / max(1, max |b|) is printed), so
both compute the same group. "speed-up vs layers" is layers' min over the variant's min; "% hot conv" the hot
convs' min over the variant's min (100% = the group's 2n + 1 convs at the hot conv's rate); GFLOP/s counts the
direct conv's FLOPs of the 2n + 1 convs (2 * 9 * C^2 * H * W each, Winograd's rate is effective). ``--bf16`` adds
bf16-storage rows (activations bf16; transformed weights, arithmetic float32). ``--record`` appends the rows to
benchmarks/results/residual_group.jsonl (harness.record: git sha, machine, build).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models  # noqa: E402  (its ``timed``: interleaved wall clock, or process CPU time per call)
import harness  # noqa: E402

import srkernels  # noqa: E402
from srkernels.benchmark import describe_machine  # noqa: E402
from srkernels.ops.winograd_conv3x3 import winograd_weight  # noqa: E402

BENCH = "residual_group"
C, CR, M = 64, 4, 4  # RCAN's width, hidden width (64 // 16) and F(4,3)
LAYERS, OP, HOT = "layers", "residual_group", "hot conv x (2n+1)"


def group_inputs(size: int, blocks: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """x [1, C, size, size] channels_last in ``dtype``; per conv a float32 transformed weight and bias; per block
    the attention's FCs, float32 for ``residual_group`` and in x's dtype for ``channel_attention`` (the same
    values: drawn, then rounded to ``dtype``)."""
    t = harness.seeded_randn("cpu", torch.float32, seed)
    x = t(1, C, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
    convs = 2 * blocks + 1
    us = [winograd_weight(t(C, C, 3, 3, scale=1 / (3 * C ** 0.5)), M) for _ in range(convs)]
    bs = [t(C, scale=0.1).to(dtype).float() for _ in range(convs)]
    fc = [[t(CR, C, scale=C ** -0.5), t(CR, scale=0.1), t(C, CR, scale=CR ** -0.5), t(C, scale=0.1)]
          for _ in range(blocks)]
    fc = [[p.to(dtype).float() for p in f] for f in fc]
    return dict(x=x, us=us, bs=bs, fc=fc, fc_x=[[p.to(dtype) for p in f] for f in fc])


def variants(a: dict) -> dict:
    x, us, bs, fc, fc_x = a["x"], a["us"], a["bs"], a["fc"], a["fc_x"]
    n = len(fc)
    wc, ca, rg = (torch.ops.srkernels.winograd_conv3x3, torch.ops.srkernels.channel_attention,
                  torch.ops.srkernels.residual_group)
    rg_args = (x, us, bs, *([f[i] for f in fc] for i in range(4)))

    def layers():
        h = x
        for k in range(n):
            r = wc(h, us[2 * k], bs[2 * k], "relu", None)
            y = wc(r, us[2 * k + 1], bs[2 * k + 1], "none", None)
            h = ca(y, *fc_x[k], h, None, "avg")[0]  # (out, pool stats)
        return wc(h, us[-1], bs[-1], "none", x)

    def hot():
        for _ in range(2 * n + 1):
            out = wc(x, us[0], bs[0], "none", None)
        return out

    return {OP: lambda: rg(*rg_args), LAYERS: layers, HOT: hot}


def run_case(size: int, blocks: int, dtype: torch.dtype, rounds: int) -> tuple[list[dict], float]:
    fns = variants(group_inputs(size, blocks, dtype))
    a, b = fns[OP]().double(), fns[LAYERS]().double()
    diff = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    t = bench_models.timed(fns, rounds)
    flop = (2 * blocks + 1) * 2 * 9 * C * C * size * size
    rows = [dict(size=size, dtype=str(dtype)[6:], blocks=blocks, variant=name, ms_min=tim.min, ms_median=tim.median,
                 speedup_vs_layers=t[LAYERS].min / tim.min, pct_hot=100 * t[HOT].min / tim.min,
                 gflops=flop / (tim.min * 1e-3) / 1e9)
            for name, tim in t.items()]
    return rows, diff


def sizes_arg(values: list[str]) -> list[int]:
    return [int(s) for v in values for s in v.split(",") if s]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["32,48,96"], help="LR sizes (comma- or space-separated)")
    ap.add_argument("--blocks", type=int, default=20, help="RCABs per group (RCAN: 20)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall clock, or process CPU time per call (needs --threads 1; robust on a shared machine)")
    ap.add_argument("--bf16", action="store_true", help="also bf16-storage rows")
    ap.add_argument("--record", action="store_true", help=f"append the rows to benchmarks/results/{BENCH}.jsonl")
    args = ap.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1 (CPU time of several threads is not latency)")
    if args.blocks < 0:
        ap.error("--blocks must be >= 0")
    torch.set_num_threads(args.threads)
    bench_models.CLOCK = args.clock
    machine = describe_machine()
    cap = srkernels.build_info()["cpu_capability"]
    print(f"{machine.get('cpu', '?')}; srkernels cpu_capability {cap}; torch {machine['cpu_capability']}; "
          f"{torch.get_num_threads()} thread(s); clock {args.clock}; {args.rounds} interleaved rounds", flush=True)
    print(f"# one residual group: {args.blocks} RCABs + tail conv, C={C}, Cr={CR}, F({M},3), batch 1, channels_last")
    dtypes = [torch.float32] + ([torch.bfloat16] if args.bf16 else [])
    rows, checks = [], []
    with torch.no_grad():
        for size in sizes_arg(args.sizes):
            for dtype in dtypes:
                r, diff = run_case(size, args.blocks, dtype, args.rounds)
                rows += r
                checks.append(f"LR {size} {str(dtype)[6:]}: residual_group vs layers max rel diff {diff:.1e}")
                print(checks[-1], flush=True)
    print(harness.md_table(
        ["LR", "dtype", "variant", "ms min", "ms median", "speed-up vs layers (min)", "% hot conv", "GFLOP/s"],
        [[str(r["size"]), r["dtype"], r["variant"], f"{r['ms_min']:.3f}", f"{r['ms_median']:.3f}",
          f"{r['speedup_vs_layers']:.2f}x", f"{r['pct_hot']:.0f}%", f"{r['gflops']:.0f}"] for r in rows]))
    if args.record:
        path = harness.record(BENCH, rows, {"device": "cpu", "threads": torch.get_num_threads(), "clock": args.clock,
                                            "cpu_capability": cap, "checks": checks, "args": vars(args)})
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
