"""Dense blocks: torch.cat reference modules vs the fused one-buffer ``dense_block`` op.

    python benchmarks/bench_dense_block.py [--quick] [--cpu-time] [--cuda] [--case rdb|srdensenet-x4]
        # table, JSON line; the README table is updated by full runs (all cases, no --quick)
    pytest benchmarks/bench_dense_block.py --benchmark-group-by=group

Cases (CPU): RDN's RDB (G0 = G = 64, C = 8) on [1,64,96,96] and on [16,64,32,32] (a training batch of 32x32 LR
patches), and the whole SRDenseNet x4 (``models.build("srdensenet", 4, fused=...)``, 8 blocks of 8 layers,
growth 16) on [1,1,64,64] and [8,1,32,32]. Per shape: inference ms, training-step ms (forward + backward of a
mean-square loss) and activation memory: bytes of the distinct tensors autograd saves for backward (parameters
excluded), plus the peak-RSS growth of the process during one training step.

Variants: ``reference`` (NCHW input, as most callers feed), ``reference-cl`` (channels_last: oneDNN's best
layout for the reference's convs), ``fused`` and ``fused-cl``. ``--cpu-time`` runs one thread and reports thread
CPU time instead of interleaved wall-clock time; on this shared 2-core VM that is the number that reproduces.

Bytes-moved model (the GPU view: these convs are narrow, so bandwidth matters), per pixel in channel passes
(elements read + written; a conv reads its input once and writes its output once, the floor of an implicit-GEMM
conv; multiply by N*H*W*element size for bytes). See ``rdb_bytes`` / ``srdensenet_bytes`` below:
- eager forward, per layer c (input C_c = G0 + c*G): conv reads C_c and writes G, ReLU reads and writes G, cat
  reads C_c + G and writes C_c + G; then LFF reads T = G0 + C*G and writes G0, the residual add reads 2*G0 and
  writes G0. Fused: x copied into the buffer (read G0, write G0), per layer the conv reads C_c and writes G into
  its slice (bias and ReLU in the epilogue), the fusion reads T and the residual and writes G0.
- backward, per layer: eager = ReLU backward (read dY, Y, write dZ) + dgrad (read dZ, write C_c) + wgrad (read
  dZ and the layer input) + autograd's accumulation of the input gradient (the cat's slice + the conv's dgrad:
  read 2*C_c, write C_c); fused = dZ (read the gradient buffer slice and Y, write dZ) + wgrad (read dZ and the
  buffer range) + dgrad added in place into the gradient buffer (read dZ, read-modify-write C_c); LFF / fusion
  and the residual are the same in both.
- saved for backward: eager keeps every conv input (the cats) and every ReLU output; fused keeps the buffer.
RDB (G0 = G = 64, C = 8): forward 10,304 vs 3,648 (2.8x), backward 15,552 vs 11,072 (1.4x), saved 3,392 vs 576
(5.9x; the zero border adds 13% at 32x32). SRDenseNet x4 dense part + bottleneck (one op, conv1's output
given): forward 33,152 vs 10,880 (3.0x), saved 10,368 vs 1,280 (8.1x).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from srkernels import models  # noqa: E402
from srkernels.benchmark import saved_bytes  # noqa: E402
from srkernels import nn as N  # noqa: E402
from srkernels import reference as R  # noqa: E402

BENCH = "dense_block"
VARIANTS = ("reference", "reference-cl", "fused", "fused-cl")


def rdb_bytes(g0: int = 64, g: int = 64, c: int = 8) -> dict:
    """Channel passes per pixel of one RDB (eager vs fused): forward, backward, saved activations."""
    t = g0 + c * g
    fwd_e = fwd_f = bwd_e = bwd_f = saved_e = 0
    for i in range(c):
        cin = g0 + i * g
        fwd_e += cin + g + 2 * g + 2 * (cin + g)  # conv, relu, cat
        fwd_f += cin + g  # conv reading the buffer prefix, epilogue writing its slice
        bwd_e += 3 * g + (g + cin) + (g + cin) + 3 * cin  # relu bwd, dgrad, wgrad, accumulate the input grad
        bwd_f += 3 * g + (g + cin) + (g + 2 * cin)  # dZ, wgrad, dgrad added in place
        saved_e += cin + g  # conv input (x or a cat), ReLU output
    fwd_e += t + g0 + 3 * g0  # LFF, residual add
    fwd_f += 2 * g0 + t + g0 + g0  # x into the buffer; fusion reads T and the residual, writes G0
    tail = (g0 + t) + (g0 + t) + 3 * g0  # LFF / fusion dgrad and wgrad, the residual's gradient add
    bwd_e += tail
    bwd_f += tail + 2 * g0  # + gx out of the gradient buffer
    saved_e += t  # LFF input
    return {"forward": (fwd_e, fwd_f, round(fwd_e / fwd_f, 2)), "backward": (bwd_e, bwd_f, round(bwd_e / bwd_f, 2)),
            "saved": (saved_e, t, round(saved_e / t, 2))}


def srdensenet_bytes(f: int = 128, g: int = 16, nl: int = 8, nb: int = 8, bott: int = 256) -> dict:
    """Channel passes per LR pixel of SRDenseNet's dense part + bottleneck (conv1's output X0 given)."""
    fwd_e = fwd_f = saved_e = 0
    width = f
    for _ in range(nb):
        for k in range(1, nl + 1):
            cin = width if k == 1 else g * (k - 1)
            fwd_e += cin + g + 2 * g + 2 * g * k  # conv, relu, cat(out_1..out_k)
            fwd_f += cin + g
            saved_e += (cin if k > 1 else 0) + g  # layer input (a cat), ReLU output
        saved_e += width  # the block input X_{b-1}, saved by its first conv
        fwd_e += 2 * (width + g * nl)  # new-first concat with the block input
        width += g * nl
    fwd_e += width + bott  # bottleneck
    fwd_f += 2 * f + width + bott  # X0 into the buffer; the fusion
    saved_e += width  # bottleneck input X_B
    saved_f = width + f  # the buffer, and conv1's ReLU output (eager: the same storage as block 1's input)
    return {"forward": (fwd_e, fwd_f, round(fwd_e / fwd_f, 2)),
            "saved": (saved_e, saved_f, round(saved_e / saved_f, 2))}


def bytes_model() -> dict:
    return {"rdb": rdb_bytes(), "srdensenet-x4": srdensenet_bytes()}


def _rdb(fused: bool, dtype, fmt):
    torch.manual_seed(0)
    m = (N.ResidualDenseBlock if fused else R.ResidualDenseBlock)(64, 64, 8)
    return m.to(dtype).to(memory_format=fmt)


def _srdensenet(fused: bool, dtype, fmt):
    torch.manual_seed(0)
    return models.build("srdensenet", 4, fused=fused).to(dtype).to(memory_format=fmt)


CASES = {
    # name: (builder, shapes (inference and training step on each))
    "rdb": (_rdb, [(1, 64, 96, 96), (16, 64, 32, 32)]),
    "srdensenet-x4": (_srdensenet, [(1, 1, 64, 64), (8, 1, 32, 32)]),
}


DEVICE = "cpu"  # --cuda: "cuda" (scripts/gpu_check.sh)


def make(case: str, variant: str, dtype, shape):
    build = CASES[case][0]
    fmt = torch.channels_last if variant.endswith("-cl") else torch.contiguous_format
    m = build(variant.startswith("fused"), dtype, fmt).to(DEVICE)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    return m, x.contiguous(memory_format=fmt)


def infer_fn(m, x):
    def run():
        with torch.no_grad():
            return m(x)
    return run


def train_fn(m, x):
    def run():
        m.zero_grad(set_to_none=True)
        m(x).float().square().mean().backward()
    return run


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_rss_growth(fn) -> int | None:
    """Bytes the process's peak RSS grows during fn(), after resetting the high-water mark (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _rss_kb("VmRSS:")
    fn()
    return (_rss_kb("VmHWM:") - before) * 1024


def cpu_time_ms(fns: dict, rounds: int) -> dict:
    """(min, median) thread CPU time per call, ms (one thread, variants interleaved in alternating order):
    insensitive to other processes on a shared machine."""
    for f in fns.values():
        f()
    samples = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            t0 = time.thread_time()
            fns[k]()
            samples[k].append((time.thread_time() - t0) * 1e3)
    return {k: (min(v), statistics.median(v)) for k, v in samples.items()}


def run_case(case: str, dtype, *, cpu_time: bool, rounds: int, quick: bool) -> list[dict]:
    shapes = CASES[case][1][:1] if quick else CASES[case][1]
    rows = []
    for mode, shape in [(m, s) for s in shapes for m in ("inference", "training step")]:
        built = {v: make(case, v, dtype, shape) for v in VARIANTS}
        fns = {v: (infer_fn if mode == "inference" else train_fn)(*built[v]) for v in VARIANTS}
        if cpu_time:
            times = cpu_time_ms(fns, rounds)
        else:
            tim = harness.interleaved(fns, device=DEVICE, rounds=rounds)
            times = {v: (tim[v].min, tim[v].median) for v in VARIANTS}
        for v in VARIANTS:
            row = {"case": f"{case} {mode} {list(shape)} {str(dtype)[6:]}", "variant": v,
                   "ms_min": round(times[v][0], 3), "ms_median": round(times[v][1], 3),
                   "speedup_vs_reference": round(times["reference"][0] / times[v][0], 3),
                   "speedup_vs_reference_cl": round(times["reference-cl"][0] / times[v][0], 3)}
            if mode == "training step":
                row["saved_MB"] = round(saved_bytes(*built[v]) / 2**20, 2)
                growth = peak_rss_growth(fns[v]) if DEVICE == "cpu" else None
                row["peak_rss_growth_MB"] = None if growth is None else round(growth / 2**20, 1)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    header = ["case", "variant", "ms min", "ms median", "vs reference", "vs reference-cl", "saved for backward MB",
              "peak RSS growth MB"]
    return harness.md_table(header, [
        [r["case"], r["variant"], f"{r['ms_min']:.1f}", f"{r['ms_median']:.1f}", f"{r['speedup_vs_reference']:.2f}x",
         f"{r['speedup_vs_reference_cl']:.2f}x", str(r.get("saved_MB", "")), str(r.get("peak_rss_growth_MB", ""))]
        for r in rows
    ])


@pytest.mark.parametrize("case,shape", [(c, s) for c in CASES for s in CASES[c][1]])
@pytest.mark.parametrize("mode", ["inference", "training step"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_block(benchmark, case, shape, mode, variant):
    benchmark.group = f"dense_block {case} {mode} {list(shape)}"
    m, x = make(case, variant, torch.float32, shape)
    benchmark((infer_fn if mode == "inference" else train_fn)(m, x))


def main() -> None:
    global DEVICE
    quick = "--quick" in sys.argv
    cpu_time = "--cpu-time" in sys.argv
    if "--cuda" in sys.argv:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda: no CUDA GPU here")
        if cpu_time:
            raise SystemExit("--cpu-time measures CPU threads; it has no meaning with --cuda")
        DEVICE = "cuda"
    if cpu_time:
        torch.set_num_threads(1)
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    only = sys.argv[sys.argv.index("--case") + 1] if "--case" in sys.argv else None
    if only is not None and only not in CASES:
        raise SystemExit(f"--case must be one of {', '.join(CASES)}")
    rows = []
    for case in ([only] if only else ["rdb"] if quick else list(CASES)):
        for dtype in dtypes:
            if case == "srdensenet-x4" and dtype != torch.float32:
                continue  # the model-level comparison runs in float32 only (time)
            rows += run_case(case, dtype, cpu_time=cpu_time, rounds=3 if quick else int(os.environ.get("ROUNDS", 5)),
                             quick=quick)
            print(markdown(rows), flush=True)
    table = markdown(rows)
    bm = bytes_model()
    r = bm["rdb"]
    timing = "thread CPU time, 1 thread" if cpu_time else f"wall clock, {torch.get_num_threads()} threads, interleaved"
    path = harness.record(BENCH, rows, {"device": DEVICE, "timing": timing, "bytes_model": bm})
    if not quick and only is None and DEVICE == "cpu":
        harness.update_readme(
            f"{BENCH}-cpu", f"Timing: {timing}; commit `{harness.git_sha()}`; "
            f"{harness.describe_machine().get('cpu', 'cpu')}. Bytes model (RDB, channel passes per pixel, eager vs "
            f"fused): forward {r['forward'][0]} vs {r['forward'][1]}, backward {r['backward'][0]} vs "
            f"{r['backward'][1]}, saved {r['saved'][0]} vs {r['saved'][1]}.\n\n{table}")
    print(table)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
