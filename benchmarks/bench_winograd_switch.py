"""A/B of a per-call switch of the Winograd kernels on whole fused models: the same model and input, the switch
set to 1 (default) and 0 before each call (the kernels read it per call), interleaved in one process.

- ``SRKERNELS_WINOGRAD_PREFETCH``: the next-weight prefetch (csrc/cpu/winograd.h ``predict_next``);
- ``SRKERNELS_WINOGRAD_ODD_STRIDES``: the blocks' transform positions an odd number of cache lines apart
  (csrc/cpu/winograd.h ``pos_stride``).

    python benchmarks/bench_winograd_switch.py [--switch SRKERNELS_WINOGRAD_PREFETCH] [--models rcan,rcan_bam]
                                               [--sizes 32,48,96] [--dtypes float32,bfloat16] [--rounds 9]
                                               [--threads 1]
    python benchmarks/bench_winograd_switch.py --switch SRKERNELS_WINOGRAD_ODD_STRIDES --models rdn,rdcab,rcan \
        --sizes 32,48 --dtypes float32,bfloat16

Models as ``benchmarks/bench_models.py`` builds them (published configs, x4). Prints min and median ms per forward
(process CPU time with ``--threads 1``, wall clock otherwise) and the ratio off / on; the outputs of both runs
must be identical (neither switch changes a value).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_models import MODELS, model_pair  # noqa: E402

from srkernels.benchmark import describe_machine  # noqa: E402

SWITCHES = ("SRKERNELS_WINOGRAD_PREFETCH", "SRKERNELS_WINOGRAD_ODD_STRIDES")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--switch", choices=SWITCHES, default=SWITCHES[0])
    ap.add_argument("--models", default="rcan,rcan_bam", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--sizes", default="32,48,96")
    ap.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scale", type=int, default=4)
    a = ap.parse_args()
    env = a.switch
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.threads == 1 else time.perf_counter
    m = describe_machine()
    print(f"# {m.get('cpu')}, capability {m['cpu_capability']}, {a.threads} thread(s), torch {m['torch']}; {env}")
    print("| model | dtype | LR | on ms (min / med) | off ms (min / med) | off / on (min) |")
    print("|---|---|---|---|---|---|")
    saved = os.environ.get(env)
    try:
        for name in a.models.split(","):
            if name not in MODELS:
                raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
            _, fused = model_pair(name, a.scale, train=False)
            for dt in (getattr(torch, d) for d in a.dtypes.split(",")):
                model = fused.to(dt)
                for lr in (int(s) for s in a.sizes.split(",")):
                    g = torch.Generator().manual_seed(0)
                    x = (torch.rand(1, model.in_channels, lr, lr, generator=g) * model.input_range).to(dt)
                    times: dict[str, list[float]] = {"1": [], "0": []}
                    outs = {}
                    with torch.inference_mode():
                        for v in times:  # warm-up: weight transforms (the prefetch learns the weight sequence)
                            os.environ[env] = v
                            model(x)
                            outs[v] = model(x)
                        if not torch.equal(outs["1"], outs["0"]):
                            raise SystemExit(f"{name} {dt} LR {lr}: outputs differ with {env} on and off")
                        for r in range(a.rounds):
                            for v in (("1", "0") if r % 2 == 0 else ("0", "1")):
                                os.environ[env] = v
                                t = clock()
                                model(x)
                                times[v].append((clock() - t) * 1e3)
                    on, off = times["1"], times["0"]
                    print(f"| {name} | {str(dt)[6:]} | {lr} | {min(on):.1f} / {statistics.median(on):.1f} | "
                          f"{min(off):.1f} / {statistics.median(off):.1f} | {min(off) / min(on):.3f} |", flush=True)
    finally:
        if saved is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = saved


if __name__ == "__main__":
    main()
