"""srkernels.benchmark: interleaved timing, its page-fault count (the column that says whether a
"default allocation" row paid first-touch faults) and the malloc regimes that pin those faults."""
import mmap
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from srkernels.benchmark import MALLOC_REGIMES, interleaved, malloc_env, malloc_regime

PAGES = 1024


def touch_fresh_pages():
    m = mmap.mmap(-1, PAGES * mmap.PAGESIZE)  # anonymous: every page faults on its first write
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # with THP "always" a huge page would fault once for 512 pages
        m.madvise(mmap.MADV_NOHUGEPAGE)
    for i in range(0, PAGES * mmap.PAGESIZE, mmap.PAGESIZE):
        m[i] = 1
    m.close()


def test_interleaved_times_every_variant_every_round():
    t = interleaved({"a": lambda: None, "b": lambda: sum(range(100))}, rounds=4, min_round_ms=0.1)
    assert set(t) == {"a", "b"}
    for tim in t.values():
        assert len(tim.times_ms) == 4 and tim.min > 0 and tim.min <= tim.median


def test_faults_per_call_counts_first_touch():
    t = interleaved({"fresh": touch_fresh_pages, "reused": lambda: sum(range(100))}, rounds=3, min_round_ms=1.0)
    assert len(t["fresh"].faults) == 3
    assert t["fresh"].faults_per_call >= PAGES * 0.9
    assert t["reused"].faults_per_call < 10


# --- malloc regimes: the benchmarks can pin where large CPU tensors come from --------------------------------


def test_malloc_env_sets_replaces_and_keeps_other_tunables():
    base = {"GLIBC_TUNABLES": "glibc.cpu.x86_ibt=on:glibc.malloc.arena_max=2", "HOME": "/h"}
    env = malloc_env("fresh", base)
    assert env["HOME"] == "/h" and base["GLIBC_TUNABLES"].startswith("glibc.cpu")  # input not modified
    assert env["GLIBC_TUNABLES"] == "glibc.cpu.x86_ibt=on:" + MALLOC_REGIMES["fresh"]
    assert malloc_regime(env) == "fresh"
    assert malloc_regime(malloc_env("reuse", env)) == "reuse"
    assert malloc_env("default", env)["GLIBC_TUNABLES"] == "glibc.cpu.x86_ibt=on"
    assert "GLIBC_TUNABLES" not in malloc_env("default", {})
    assert malloc_regime({}) == "default" and malloc_regime(base) == "custom"
    with pytest.raises(ValueError, match="regime"):
        malloc_env("mmap", {})


ALLOC_LOOP = """
import resource, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    torch.empty(10 << 18).fill_(1)  # 10 MB, freed at once: glibc settles its thresholds, the heap its size
f0 = faults()
for _ in range(20):
    torch.empty(10 << 18).fill_(1)
print((faults() - f0) / 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="GLIBC_TUNABLES are read by glibc only")
@pytest.mark.parametrize("regime", ["fresh", "reuse"])
def test_malloc_regime_decides_first_touch_faults(regime):
    """A new process in the regime: `fresh` faults every page of a 10 MB tensor on every allocation, `reuse`
    none (the heap keeps and reuses the freed block)."""
    out = subprocess.run([sys.executable, "-c", ALLOC_LOOP], env=malloc_env(regime), capture_output=True,
                         text=True, check=True).stdout
    per_call = float(out.split()[-1])
    pages = (10 << 20) // 4096
    if regime == "fresh":
        assert per_call >= 0.9 * pages / 512  # at least one fault per 2 MB even if THP maps huge pages
        assert per_call >= 0.9 * pages or _thp_always(), per_call
    else:
        assert per_call < 0.01 * pages, per_call


def _thp_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


def test_readme_block_per_malloc_regime(tmp_path, monkeypatch):
    """A pinned-regime run writes its own table beside the suite's default one and leaves that one alone."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import harness
    finally:
        sys.path.pop(0)
    readme = tmp_path / "README.md"
    readme.write_text("# B\n\n<!-- bench:s-cpu -->\nold\n<!-- /bench:s-cpu -->\n\ntail\n")
    monkeypatch.setattr(harness, "HERE", tmp_path)
    monkeypatch.setenv("GLIBC_TUNABLES", MALLOC_REGIMES["reuse"])
    harness.update_readme("s-cpu", "first")
    harness.update_readme("s-cpu", "second")
    monkeypatch.delenv("GLIBC_TUNABLES")
    harness.update_readme("s-cpu", "new")
    text = readme.read_text()
    assert text.index("\nnew\n") < text.index("<!-- bench:s-cpu-malloc-reuse -->") < text.index("second") < text.index("tail")
    assert "first" not in text and "old" not in text and "`--malloc=reuse`" in text


# --- benchmarks/bench_models.py: its optional rows run (a lazy import there failed only with --upscale) ---------


def test_bench_models_upscale_row_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_models

    rows = bench_models.bench_upscale(1, 1, lr_hw=(20, 28), tile=16, overlap=4, key="srcnn")
    assert [r["variant"] for r in rows] == ["reference", "fused"]
    assert all(r["out_shape"] == [1, 3, 80, 112] for r in rows)
    assert float(rows[1]["note"].split()[-1]) < 1e-4  # fused output checked against the reference in the run


# --- benchmarks/bench_winograd_bf16.py: its simulation is the Winograd conv, and bf16 rounding is where it says ----


def test_bench_winograd_bf16_simulation(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import torch
    import torch.nn.functional as F

    import bench_winograd_bf16 as b

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float64)
    w = torch.randn(3, 5, 3, 3, generator=g, dtype=torch.float64)
    for m in (2, 4, 6):  # without rounding: the conv itself, odd sizes included
        torch.testing.assert_close(b.winograd_sim(x, w, m, lambda t: t), F.conv2d(x, w, padding=1), rtol=1e-12,
                                   atol=1e-12)
    err = b.single_conv()
    assert err["fp32 direct"] < 1e-6 and err["fp32 F(4,3)"] < 1e-5  # float32 stays float32
    assert err["bf16 direct"] < err["bf16 F(2,3)"] < err["bf16 F(4,3)"]  # rounding V and U costs accuracy
    # bf16 storage, float32 Winograd (the fused bf16 models): either tile as close as the bf16 direct conv
    assert max(err["bf16 storage F(4,3)"], err["bf16 storage F(6,3)"]) < 1.1 * err["bf16 direct"]


# --- benchmarks/bench_winograd_conv3x3.py --cold: the same conv, on a new weight every call ------------------------


@pytest.mark.parametrize("k", [3, 5])
def test_bench_winograd_cold_weights_cycle(monkeypatch, k):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import torch

    import bench_winograd_conv3x3 as b

    monkeypatch.setattr(b, "COLD_MB", 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
    w, bias = torch.randn(24, 16, k, k, generator=g) / (4 * k), torch.randn(24, generator=g)
    fns = b.variants(x, w, bias, cold=True)
    hot = {n: f() for n, f in fns.items() if "cold" not in n}
    cold = [n for n in fns if "cold" in n]
    assert len(cold) == 2
    for n in cold:  # the first call is the measured weight (the error column checks it), the next ones are not
        first, second = fns[n](), fns[n]()
        torch.testing.assert_close(first, hot[n.removesuffix(", cold weights")])
        assert (second - first).abs().max() > 1e-2


# --- tracked benchmark records name no machine's local paths --------------------------------------------------

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_recorded_results_hold_no_absolute_paths():
    import json

    records = sorted((BENCH_DIR / "results").glob("*.jsonl"))
    assert records
    for f in records:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            bad = [s for s in _strings(json.loads(line)) if s.startswith("/")]
            assert not bad, f"{f.name}:{i}: absolute paths {bad}"


def test_harness_record_makes_paths_portable(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import harness

    inside, outside = str(BENCH_DIR / "results" / "models.png"), str(tmp_path / "p.png")  # tmp_path: not in the repo
    got = harness.portable({"args": {"plot": inside, "other": outside, "n": 3, "rel": "a/b"}, "l": [outside]})
    assert got == {"args": {"plot": "benchmarks/results/models.png", "other": "<outside>/p.png", "n": 3,
                            "rel": "a/b"}, "l": ["<outside>/p.png"]}
