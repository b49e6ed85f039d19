"""Dense blocks: torch.cat reference modules vs the fused one-buffer ``dense_block`` op.

    python benchmarks/bench_dense_block.py [--quick] [--cpu-time]   # table, JSON line, README update
    pytest benchmarks/bench_dense_block.py --benchmark-group-by=group

Cases (CPU): RDN's RDB (G0 = G = 64, C = 8) on [1,64,96,96] and on [16,64,32,32] (a training batch of 32x32 LR
patches), and the whole SRDenseNet x4 (``models.build("srdensenet", 4, fused=...)``, 8 blocks of 8 layers,
growth 16) on [1,1,64,64] and [8,1,32,32]. Per shape: inference ms, training-step ms (forward + backward of a
mean-square loss) and activation memory: bytes of the distinct tensors autograd saves for backward (parameters
excluded), plus the peak-RSS growth of the process during one training step.

Variants: ``reference`` (NCHW input, as most callers feed), ``reference-cl`` (channels_last: oneDNN's best
layout for the reference's convs), ``fused`` and ``fused-cl``. ``--cpu-time`` runs one thread and reports thread
CPU time instead of interleaved wall-clock time; on this shared 2-core VM that is the number that reproduces.

Bytes-moved model, forward of one RDB, per pixel, in channel passes (elements read + written; conv reads its
input once, which is the floor for an implicit-GEMM conv):
- eager: per layer c (input C_c = G0 + c*G): conv reads C_c and writes G, ReLU reads and writes G, cat reads
  C_c + G and writes C_c + G; then LFF reads T = G0 + C*G and writes G0, the residual add reads 2*G0, writes G0.
- fused: x written into the buffer once (read G0, write G0); per layer the conv reads C_c and writes G (bias and
  ReLU in the epilogue); the fusion reads T and the residual G0 and writes G0.
See ``bytes_model`` below (G0 = G = 64, C = 8: 10,304 vs 3,648 channel passes, 2.8x fewer bytes).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from srkernels import models  # noqa: E402
from srkernels import nn as N  # noqa: E402
from srkernels import reference as R  # noqa: E402

BENCH = "dense_block"
VARIANTS = ("reference", "reference-cl", "fused", "fused-cl")


def bytes_model(g0: int = 64, g: int = 64, c: int = 8) -> dict:
    """Channel passes per pixel of one RDB forward (multiply by N*H*W*element size for bytes)."""
    t = g0 + c * g
    eager = fused = 0
    for i in range(c):
        cin = g0 + i * g
        eager += cin + g + 2 * g + 2 * (cin + g)  # conv, relu, cat
        fused += cin + g  # conv reading the buffer prefix, epilogue writing its slice
    eager += t + g0 + 3 * g0  # LFF, residual add
    fused += 2 * g0 + t + g0 + g0  # x into the buffer; fusion reads T and the residual, writes G0
    return {"eager": eager, "fused": fused, "ratio": round(eager / fused, 2)}


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


def make(case: str, variant: str, dtype, shape):
    build = CASES[case][0]
    fmt = torch.channels_last if variant.endswith("-cl") else torch.contiguous_format
    m = build(variant.startswith("fused"), dtype, fmt)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype).contiguous(memory_format=fmt)
    return m, x


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


def saved_bytes(m, x) -> int:
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(x)
    del out
    return sum(seen.values())


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
    """Min thread CPU time per call (one thread): insensitive to other processes on a shared machine."""
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            t0 = time.thread_time()
            fns[k]()
            best[k] = min(best[k], (time.thread_time() - t0) * 1e3)
    return best


def run_case(case: str, dtype, *, cpu_time: bool, rounds: int, quick: bool) -> list[dict]:
    shapes = CASES[case][1][:1] if quick else CASES[case][1]
    rows = []
    for mode, shape in [(m, s) for s in shapes for m in ("inference", "training step")]:
        built = {v: make(case, v, dtype, shape) for v in VARIANTS}
        fns = {v: (infer_fn if mode == "inference" else train_fn)(*built[v]) for v in VARIANTS}
        if cpu_time:
            t = cpu_time_ms(fns, rounds)
            times = {v: (t[v], t[v]) for v in VARIANTS}
        else:
            tim = harness.interleaved(fns, rounds=rounds)
            times = {v: (tim[v].min, tim[v].median) for v in VARIANTS}
        for v in VARIANTS:
            row = {"case": f"{case} {mode} {list(shape)} {str(dtype)[6:]}", "variant": v,
                   "ms_min": round(times[v][0], 3), "ms_median": round(times[v][1], 3),
                   "speedup_vs_reference": round(times["reference"][0] / times[v][0], 3),
                   "speedup_vs_reference_cl": round(times["reference-cl"][0] / times[v][0], 3)}
            if mode == "training step":
                row["saved_MB"] = round(saved_bytes(*built[v]) / 2**20, 2)
                growth = peak_rss_growth(fns[v])
                row["peak_rss_growth_MB"] = None if growth is None else round(growth / 2**20, 1)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| case | variant | ms min | ms median | vs reference | vs reference-cl | saved for backward MB | "
            "peak RSS growth MB |\n|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['case']} | {r['variant']} | {r['ms_min']:.1f} | {r['ms_median']:.1f} | "
        f"{r['speedup_vs_reference']:.2f}x | {r['speedup_vs_reference_cl']:.2f}x | {r.get('saved_MB', '')} | "
        f"{r.get('peak_rss_growth_MB', '')} |\n"
        for r in rows
    )
    return head + body


@pytest.mark.parametrize("case,shape", [(c, s) for c in CASES for s in CASES[c][1]])
@pytest.mark.parametrize("mode", ["inference", "training step"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_block(benchmark, case, shape, mode, variant):
    benchmark.group = f"dense_block {case} {mode} {list(shape)}"
    m, x = make(case, variant, torch.float32, shape)
    benchmark((infer_fn if mode == "inference" else train_fn)(m, x))


def main() -> None:
    quick = "--quick" in sys.argv
    cpu_time = "--cpu-time" in sys.argv
    if cpu_time:
        torch.set_num_threads(1)
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    rows = []
    for case in (["rdb"] if quick else list(CASES)):
        for dtype in dtypes:
            if case == "srdensenet-x4" and dtype != torch.float32:
                continue  # the model-level comparison runs in float32 only (time)
            rows += run_case(case, dtype, cpu_time=cpu_time, rounds=3 if quick else int(os.environ.get("ROUNDS", 5)),
                             quick=quick)
            print(markdown(rows), flush=True)
    table = markdown(rows)
    bm = bytes_model()
    timing = "thread CPU time, 1 thread" if cpu_time else f"wall clock, {torch.get_num_threads()} threads, interleaved"
    path = harness.record(BENCH, rows, {"device": "cpu", "timing": timing, "bytes_model": bm})
    if not quick:
        harness.update_readme(
            f"{BENCH}-cpu", f"Timing: {timing}; commit `{harness.git_sha()}`; "
            f"{harness.describe_machine().get('cpu', 'cpu')}. Bytes model (RDB forward, channel passes per pixel): "
            f"eager {bm['eager']}, fused {bm['fused']} ({bm['ratio']}x).\n\n{table}")
    print(table)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
