"""A/B of the Winograd kernels' next-weight prefetch (csrc/cpu/winograd.h ``predict_next``) on whole fused
models: the same model and input, ``SRKERNELS_WINOGRAD_PREFETCH`` switched between 1 (default) and 0 before
each call (the kernel reads it per call), interleaved in one process.

    python benchmarks/bench_winograd_prefetch.py [--models rcan,rcan_bam] [--sizes 32,48,96] [--rounds 9]
                                                 [--threads 1]

Prints min and median ms per forward (process CPU time / threads with ``--threads 1``, wall clock otherwise)
and the ratio off / on; the outputs of both runs must be identical (prefetching moves no value).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from srkernels.benchmark import describe_machine  # noqa: E402
from srkernels.models import build  # noqa: E402

ENV = "SRKERNELS_WINOGRAD_PREFETCH"
CONFIGS = {"rcan": ("rcan", {}), "rcan_bam": ("rcan", {"bam": True}), "srcnn": ("srcnn", {}), "rdn": ("rdn", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="rcan,rcan_bam")
    ap.add_argument("--sizes", default="32,48,96")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scale", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.threads == 1 else time.perf_counter
    m = describe_machine()
    print(f"# {m.get('cpu')}, capability {m['cpu_capability']}, {a.threads} thread(s), torch {m['torch']}")
    print("| model | LR | prefetch on ms (min / med) | off ms (min / med) | off / on (min) |")
    print("|---|---|---|---|---|")
    saved = os.environ.get(ENV)
    try:
        for name in a.models.split(","):
            arch, cfg = CONFIGS[name]
            model = build(arch, a.scale, **cfg).eval()
            for lr in (int(s) for s in a.sizes.split(",")):
                x = torch.rand(1, model.in_channels, lr, lr, generator=torch.Generator().manual_seed(0)) * model.input_range
                times: dict[str, list[float]] = {"1": [], "0": []}
                outs = {}
                with torch.inference_mode():
                    for v in times:  # warm-up: weight transforms, and the kernel learns the weight sequence
                        os.environ[ENV] = v
                        model(x)
                        outs[v] = model(x)
                    if not torch.equal(outs["1"], outs["0"]):
                        raise SystemExit(f"{name} LR {lr}: outputs differ with and without prefetch")
                    for r in range(a.rounds):
                        for v in (("1", "0") if r % 2 == 0 else ("0", "1")):
                            os.environ[ENV] = v
                            t = clock()
                            model(x)
                            times[v].append((clock() - t) * 1e3)
                on, off = times["1"], times["0"]
                print(f"| {name} | {lr} | {min(on):.1f} / {statistics.median(on):.1f} | {min(off):.1f} / "
                      f"{statistics.median(off):.1f} | {min(off) / min(on):.3f} |", flush=True)
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved


if __name__ == "__main__":
    main()
