"""conv2d_pointwise on CPU: conv + bias + ReLU (+ residual) as eager ops, as the dispatcher op
``ops.conv2d_pointwise`` (plain weight: oneDNN reorders it inside every call) and as ``srkernels.nn.conv2d``
(the op's CPU algorithm called directly on a weight packed once per module and input shape).

    python benchmarks/bench_conv2d_pointwise.py [--threads 1] [--rounds 30]

The "overhead" case is a 4->4 3x3 conv on a 4x4 image, where the time is nearly all per-call cost: it compares
the bare oneDNN call on the packed weight with ``nn.conv2d`` (its cache lookup and checks) and with the same
packed call behind a dispatcher op with a Python kernel (what routing ``nn.conv2d`` through
``torch.ops.srkernels.conv2d_pointwise`` would add). The "64ch" cases are RCAN-sized convs (64->64 3x3).
Interleaved, many rounds, min and median, each sample the process's CPU time over a batch of calls (on a shared
machine a time-sliced call then does not count other processes' time).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import srkernels
from srkernels import ops
from srkernels.benchmark import describe_machine
from srkernels.nn import conv2d

ONEDNN = sys.modules["srkernels.ops.conv2d_pointwise"].ONEDNN
_lib = None


def _dispatcher_twin():
    """A throwaway dispatcher op whose Python kernel is ``ONEDNN.run``; registered for MkldnnCPU too, since a
    packed weight is a oneDNN tensor (its dispatch key)."""
    global _lib
    if _lib is None:
        _lib = torch.library.Library("srkernels_bench", "DEF")
        _lib.define("conv(Tensor x, Tensor w, Tensor? b, int[2] stride, int[2] padding, int[2] dilation, int groups, "
                    "str act, Tensor? residual) -> Tensor")
        for key in ("CPU", "MkldnnCPU"):
            _lib.impl("conv", ONEDNN.run, key)
    return torch.ops.srkernels_bench.conv.default


def variants(c: int, hw: int, residual: bool) -> dict:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c, c, 3, padding=1).eval()
    x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
    r = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last) if residual else None
    act = "none" if residual else "relu"
    packed = ONEDNN.pack(conv.weight, [1, 1], [1, 1], [1, 1], 1, tuple(x.shape))
    twin = _dispatcher_twin()
    w, b = conv.weight, conv.bias

    def eager():
        y = F.conv2d(x, w, b, 1, 1)
        return y + r if residual else F.relu(y)

    return {
        "eager": eager,
        "bare oneDNN, packed": lambda: ONEDNN.run(x, packed, b, [1, 1], [1, 1], [1, 1], 1, act, r),
        "nn.conv2d (direct, packed)": lambda: conv2d(conv, x, None if residual else "relu", r),
        "dispatcher twin, packed": lambda: twin(x, packed, b, [1, 1], [1, 1], [1, 1], 1, act, r),
        "ops.conv2d_pointwise (plain w)": lambda: ops.conv2d_pointwise(x, w, b, 1, 1, activation=act, residual=r),
    }


def cpu_time_us(fns: dict, rounds: int, sample_ms: float = 5.0) -> dict[str, list[float]]:
    """Per-call CPU time (us) of each callable, ``rounds`` samples each, the callables interleaved."""
    inner = {}
    for name, fn in fns.items():
        fn()
        t0 = time.process_time_ns()
        fn()
        inner[name] = max(1, int(sample_ms * 1e6 / max(time.process_time_ns() - t0, 1000)))
    out: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            fn, n = fns[name], inner[name]
            t0 = time.process_time_ns()
            for _ in range(n):
                fn()
            out[name].append((time.process_time_ns() - t0) / n / 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    torch.set_grad_enabled(False)
    m = describe_machine()
    print(f"{m.get('cpu')}; srkernels cpu_capability {srkernels.build_info()['cpu_capability']}; torch "
          f"{m['cpu_capability']}; {torch.get_num_threads()} threads")
    for case, (c, hw) in {"overhead 4ch 4x4": (4, 4), "64ch 32x32": (64, 32), "64ch 48x48": (64, 48)}.items():
        for residual in (False, True):
            res = cpu_time_us(variants(c, hw, residual), opts.rounds)
            base = min(res["bare oneDNN, packed"])
            print(f"\n{case}, {'+ residual' if residual else '+ ReLU'}  (us per call; min - bare packed oneDNN)")
            for name, t in res.items():
                lo, med = min(t), statistics.median(t)
                print(f"  {name:32s} min {lo:9.2f}  median {med:9.2f}  ({lo - base:+8.2f})")


if __name__ == "__main__":
    main()
