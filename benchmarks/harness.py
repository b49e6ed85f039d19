"""Shared plumbing of the benchmark suites: run interleaved comparisons, GB/s against a copy bandwidth measured
in the same process, JSON-lines results (git sha, versions, machine) and the Markdown table of benchmarks/README.md.

Timing itself lives in ``srkernels.benchmark`` (also used by ``srkernels bench``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import srkernels
from srkernels.benchmark import (MALLOC_REGIME_NOTES, MALLOC_REGIMES, copy_bandwidth, describe_machine, gbps,
                                 interleaved, malloc_env, malloc_regime)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def git_sha() -> str:
    """Short HEAD sha, with "+dirty" when tracked files differ from it (the numbers are then not HEAD's)."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        # the suite's own outputs (results/, README tables) do not count
        dirty = run("status", "--porcelain", "-uno", "--", ":/", ":(top,exclude)benchmarks/results",
                    ":(top,exclude)benchmarks/README.md")
        return run("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


DTYPES = [torch.float32, torch.bfloat16]
# attention benchmarks: a training batch of 48x48 patches, and one 480x270 frame (inference)
ATTENTION_SHAPES = [(16, 64, 48, 48), (1, 64, 270, 480)]


def seeded_randn(device, dtype, seed: int = 0):
    """t(*shape, scale=1.0): standard normals * scale from one generator seeded once, so every run of a
    benchmark draws the same inputs; drawn in float32 on CPU, then moved to ``device``/``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)


def attention_inputs(shape, dtype, device, weights) -> dict:
    """Inputs of an attention suite: ``x`` [N, C, H, W], the weights ``weights(t, C, Cr)`` draws (Cr = C // 16,
    ``t`` as from ``seeded_randn``) and ``residual`` like x, drawn in that order."""
    N, C, H, W = shape
    t = seeded_randn(device, dtype)
    x = t(N, C, H, W)
    return dict(x=x, **weights(t, C, C // 16), residual=t(N, C, H, W))


BIG_COPY_BYTES = 256 << 20  # per buffer: well beyond L2, the "copy bandwidth" of the memory system


def compare(case: str, variants: dict, *, nbytes: int, copy_gbps: float, baseline: str, device="cpu",
            rounds: int = 15, copy_of=None) -> list[dict]:
    """Time ``variants`` interleaved; one row per variant with ms min/median, GB/s (``nbytes`` model),
    % of copy bandwidth and speed-up over ``baseline`` (by min and by median).

    ``copy_of`` (a tensor): two copies join the interleaved rounds, so the reference rates are measured at
    the same moments as the variants (a copy timed once drifts with the load of a shared machine):
    ``copy 256MB`` (a 256 MB buffer into a preallocated one; ``pct_copy`` is against it) and ``copy``
    (``copy_of`` into a preallocated tensor; ``pct_same`` is against it: the stricter figure where a working
    set of this size sits in a large LLC). Without ``copy_of``, ``pct_copy`` is against ``copy_gbps``."""
    moved = {name: nbytes for name in variants}
    if copy_of is not None:
        dst = torch.empty_like(copy_of)
        big = torch.rand(BIG_COPY_BYTES // 4, device=copy_of.device)
        big_dst = torch.empty_like(big)
        variants = {**variants, "copy": lambda: dst.copy_(copy_of), "copy 256MB": lambda: big_dst.copy_(big)}
        moved["copy"] = 2 * copy_of.numel() * copy_of.element_size()
        moved["copy 256MB"] = 2 * BIG_COPY_BYTES
    t = interleaved(variants, device=device, rounds=rounds)
    same_gbps = None
    if copy_of is not None:
        copy_gbps = gbps(moved["copy 256MB"], t["copy 256MB"].min)
        same_gbps = gbps(moved["copy"], t["copy"].min)
    base = t[baseline]
    rows = []
    for name, tim in t.items():
        rate = gbps(moved[name], tim.min)
        rows.append({
            "case": case, "variant": name, "ms_min": round(tim.min, 4), "ms_median": round(tim.median, 4),
            "gbps": round(rate, 2), "pct_copy": round(100 * rate / copy_gbps, 1),
            "pct_same": None if same_gbps is None else round(100 * rate / same_gbps, 1),
            "speedup_min": round(base.min / tim.min, 3), "speedup_median": round(base.median / tim.median, 3),
            "baseline": baseline,
            "faults_per_call": None if tim.faults_per_call is None else round(tim.faults_per_call, 1),
        })
    return rows


def cache_off(fn):
    """``fn`` with srkernels' CPU output cache paused (every large output from PyTorch's default allocator,
    as PyTorch's own ops get): the "default allocation without the cache" rows."""

    def run():
        with srkernels.cpu_cache_paused():  # paused, not emptied: the cached rows around it keep their blocks
            return fn()

    return run


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _faults(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table from a header and rows of already formatted cells."""
    line = lambda cells: "| " + " | ".join(cells) + " |\n"  # noqa: E731
    return line(header) + "|" + "---|" * len(header) + "\n" + "".join(line(r) for r in rows)


def markdown(rows: list[dict]) -> str:
    header = ["case", "variant", "ms min", "ms median", "GB/s", "% copy", "% same-size copy", "page faults / call",
              "speed-up (min / median)"]
    return md_table(header, [
        [r["case"], r["variant"], f"{r['ms_min']:.3f}", f"{r['ms_median']:.3f}", f"{r['gbps']:.1f}",
         _pct(r["pct_copy"]), _pct(r.get("pct_same")), _faults(r.get("faults_per_call")),
         f"{r['speedup_min']:.2f}x / {r['speedup_median']:.2f}x vs {r['baseline']}"]
        for r in rows
    ])


def portable(value):
    """``value`` (nested dicts/lists) with every absolute path string made portable for a tracked record: relative
    to the repository when inside it, else ``<outside>/`` + its file name (no machine's local paths)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        p = Path(value).resolve()
        try:
            return str(p.relative_to(HERE.parent))
        except ValueError:
            return "<outside>/" + p.name
    return value


def record(bench: str, rows: list[dict], extra: dict) -> Path:
    """Append one JSON line per run under benchmarks/results/<bench>.jsonl (paths made ``portable``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}.jsonl"
    entry = portable({"bench": bench, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": git_sha(),
                      "srkernels": srkernels.build_info(), "machine": describe_machine(), **extra, "rows": rows})
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return path


def update_readme(bench: str, text: str) -> None:
    """Replace the block between <!-- bench:NAME --> markers in benchmarks/README.md with ``text``; a run in a
    pinned malloc regime (``--malloc``) has its own block, NAME-malloc-REGIME."""
    regime, after = malloc_regime(), None
    if regime != "default":
        after = f"<!-- /bench:{bench} -->"  # a new regime block goes beside the suite's default one
        bench += f"-malloc-{regime}"
        text = f"glibc malloc regime `{regime}` (`--malloc={regime}`: {MALLOC_REGIME_NOTES.get(regime, 'custom GLIBC_TUNABLES')}); " + text
    readme = HERE / "README.md"
    src = readme.read_text() if readme.exists() else "# Benchmarks\n"
    start, end = f"<!-- bench:{bench} -->", f"<!-- /bench:{bench} -->"
    block = f"{start}\n{text}\n{end}"
    if start in src and end in src:
        src = src[: src.index(start)] + block + src[src.index(end) + len(end):]
    elif after is not None and after in src:
        at = src.index(after) + len(after)
        src = src[:at] + "\n\n" + block + src[at:]
    else:
        src = src.rstrip() + "\n\n" + block + "\n"
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(src)
    os.replace(tmp, readme)


def device_arg() -> str:
    return "cuda" if "--cuda" in sys.argv or (torch.cuda.is_available() and "--cpu" not in sys.argv) else "cpu"


__all__ = ["compare", "cache_off", "malloc_arg", "enter_malloc_regime", "markdown", "md_table", "record",
           "update_readme", "copy_bandwidth", "device_arg", "git_sha", "STANDARD_VARIANTS", "standard_variants",
           "pytest_benchmark"]


def malloc_arg() -> str:
    """``--malloc=fresh|reuse|default``: the glibc malloc regime to run in (srkernels.benchmark.MALLOC_REGIMES)."""
    regime = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--malloc=")), "default")
    if regime not in MALLOC_REGIMES:
        sys.exit(f"--malloc must be one of {', '.join(MALLOC_REGIMES)}, got {regime!r}")
    return regime


def enter_malloc_regime(regime: str) -> None:
    """Re-execute this script with GLIBC_TUNABLES set for ``regime`` (glibc reads them only at start-up)."""
    if malloc_regime() != regime:
        os.execve(sys.executable, [sys.executable, *sys.argv], malloc_env(regime))


def main(bench: str, shapes: list, dtypes: list, make, variants, passes: int = 3) -> None:
    """Script entry of a suite: ``make(shape, dtype, device)`` builds inputs, ``variants(inputs)`` the
    callables (baseline "eager"); GB/s counts ``passes`` passes over ``inputs["x"]``."""
    enter_malloc_regime(malloc_arg())
    device = device_arg()
    quick = "--quick" in sys.argv
    copy = copy_bandwidth(device=device)
    print(f"copy bandwidth: {copy:.1f} GB/s (read + write)")
    rows = []
    with torch.no_grad():
        for shape in shapes[:1] if quick else shapes:
            for dtype in dtypes:
                a = make(shape, dtype, device)
                nbytes = passes * a["x"].numel() * a["x"].element_size()
                rows += compare(f"{list(shape)} {str(dtype)[6:]}", variants(a), nbytes=nbytes, copy_gbps=copy,
                                baseline="eager", device=device, rounds=5 if quick else 15, copy_of=a["x"])
    table = markdown(rows)
    print(table)
    path = record(bench, rows, {"device": device, "copy_gbps": copy})
    if not quick:
        update_readme(f"{bench}-{device}", f"% copy: against the row `copy 256MB`, % same-size copy: against "
                      f"the row `copy` (x into a preallocated tensor), both timed in the same rounds; GB/s "
                      f"counts {passes} passes over x; `srkernels` allocates from its CPU output cache, "
                      f"`(cache off)` from PyTorch's default allocator each call; commit `{git_sha()}`; {describe_machine().get('cpu', device)}.\n\n{table}")
    print(f"appended to {path}")


# The variants of a suite for an op with ``residual=`` and ``out=`` (the attention ops), in table order.
STANDARD_VARIANTS = ("eager", "eager+prealloc", "compile(ref)", "srkernels", "srkernels (cache off)",
                     "srkernels+prealloc")


def standard_variants(reference, op, args: tuple, residual, eager_prealloc, out) -> dict:
    """STANDARD_VARIANTS for ``op(*args, residual=residual)`` and its plain-PyTorch ``reference``:
    ``eager_prealloc`` is the hand-written eager version into preallocated buffers, ``out`` the srkernels
    ``out=`` buffer."""
    compiled_ref = torch.compile(reference)
    return {
        "eager": lambda: reference(*args, residual=residual),
        "eager+prealloc": eager_prealloc,
        "compile(ref)": lambda: compiled_ref(*args, residual=residual),
        "srkernels": lambda: op(*args, residual=residual),
        "srkernels (cache off)": cache_off(lambda: op(*args, residual=residual)),
        "srkernels+prealloc": lambda: op(*args, residual=residual, out=out),
    }


def pytest_benchmark(bench: str, shapes: list, dtypes: list, make, variants, names=STANDARD_VARIANTS):
    """The pytest-benchmark view of a suite (``pytest benchmarks/bench_<bench>.py``), as a test function to bind
    to a ``test_*`` name: one case per shape, dtype and variant name (a key of ``variants(inputs)``), on CPU,
    grouped by shape and dtype."""
    import pytest

    @pytest.mark.parametrize("shape", shapes, ids=lambda s: "x".join(map(str, s)))
    @pytest.mark.parametrize("dtype", dtypes, ids=str)
    @pytest.mark.parametrize("variant", names)
    def test(benchmark, shape, dtype, variant):
        benchmark.group = f"{bench} {list(shape)} {dtype}"
        with torch.no_grad():
            benchmark(variants(make(shape, dtype, "cpu"))[variant])

    return test
