"""The Python steps of scripts/gpu_check.sh (run from the repo root):

    python scripts/gpu_check.py check                 # prerequisites only (what runs without a GPU)
    python scripts/gpu_check.py backends OUT.json     # compiled CUDA vs Triton per op, interleaved
    python scripts/gpu_check.py models OUT.json       # whole models on CUDA: reference, compile(ref), fused x2
    python scripts/gpu_check.py report OUTDIR         # report.json + report.md from the step files in OUTDIR

Timing: srkernels.benchmark.interleaved (variants interleaved, CUDA-synchronised, min and median of rounds)."""
from __future__ import annotations

import importlib
import json
import math
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

REQUIRED = ["scripts/gpu_check.sh", "benchmarks/bench_channel_attention.py", "benchmarks/bench_balanced_attention.py",
            "benchmarks/bench_pixel_shuffle.py", "benchmarks/bench_dense_block.py", "benchmarks/bench_models.py",
            "tests/cuda/test_cuda_kernels.py", "setup.py"]
MODELS = ["rdn", "rcan_bam", "rcan"]  # together they run every op (bench_models.MODELS names)


def check() -> int:
    """Prerequisites: files, python modules, torch with CUDA support compiled in, nvcc on PATH or CUDA_HOME."""
    problems = [f"missing {p}" for p in REQUIRED if not (ROOT / p).exists()]
    for mod in ("torch", "pytest", "srkernels", "harness"):
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - every failure is a finding
            problems.append(f"cannot import {mod}: {type(e).__name__}: {e}")
    try:
        import torch

        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} is a CPU-only build")
        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); GPU visible: {torch.cuda.is_available()}")
    except Exception:  # noqa: BLE001
        pass
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        print("note: triton not importable: the Triton rows will be skipped")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


def _forced(backend, fn):
    from srkernels import use_backend

    def run():
        with use_backend(backend):
            return fn()
    return run


def backends(out: Path) -> None:
    """Compiled CUDA kernel vs Triton kernel for every op, inference, on the op benchmarks' first shape."""
    import torch

    from srkernels import _backend, ops
    from srkernels.benchmark import interleaved

    rows = []
    with torch.no_grad():
        for op in ("channel_attention", "balanced_attention", "pixel_shuffle"):
            mod = importlib.import_module(f"bench_{op}")
            for dtype in mod.DTYPES:
                a = mod.make(mod.SHAPES[0], dtype, "cuda")
                fn = mod.variants(a)["srkernels"]
                rows += _time(op, f"{list(mod.SHAPES[0])} {str(dtype)[6:]}", fn, interleaved)
        bd = importlib.import_module("bench_dense_block")
        bd.DEVICE = "cuda"
        for dtype in (torch.float32, torch.bfloat16):
            shape = bd.CASES["rdb"][1][0]
            m, x = bd.make("rdb", "fused", dtype, shape)
            rows += _time("dense_block", f"rdb {list(shape)} {str(dtype)[6:]}", bd.infer_fn(m, x), interleaved)
    prefs = {}
    for op in ops.OPS:
        ratios = [r["compiled_over_triton"] for r in rows if r["op"] == op and r["compiled_over_triton"]]
        if ratios:
            gm = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
            prefs[op] = {"geomean_compiled_over_triton": round(gm, 3),
                         "measured": ["compiled", "triton"] if gm <= 1 else ["triton", "compiled"],
                         "current": list(_backend.CUDA_PREFERENCE.get(op, ("compiled", "triton")))}
    out.write_text(json.dumps({"rows": rows, "preference": prefs}, indent=1))
    for op, p in prefs.items():
        change = "keep" if p["measured"] == p["current"] else "CHANGE"
        print(f"CUDA_PREFERENCE[{op!r}] = {tuple(p['measured'])}  # {change}: compiled/triton time "
              f"{p['geomean_compiled_over_triton']}x (geomean), now {tuple(p['current'])}")


def _time(op, case, fn, interleaved):
    variants = {"compiled": _forced("compiled", fn)}
    try:
        _forced("triton", fn)()
        variants["triton"] = _forced("triton", fn)
    except Exception as e:  # noqa: BLE001 - reported in the row
        print(f"{op} {case}: triton unavailable ({type(e).__name__}: {str(e)[:120]})")
    t = interleaved(variants, device="cuda", rounds=10)
    row = {"op": op, "case": case, **{f"{k}_ms_min": round(v.min, 4) for k, v in t.items()},
           **{f"{k}_ms_median": round(v.median, 4) for k, v in t.items()},
           "compiled_over_triton": round(t["compiled"].min / t["triton"].min, 3) if "triton" in t else None}
    print(json.dumps(row), flush=True)
    return [row]


def models(out: Path, lr: int = 48, scale: int = 4) -> None:
    """Inference at [1, 3, lr, lr], fp32 and bf16: eager reference, torch.compile(reference), fused with the
    compiled CUDA kernels, fused with Triton."""
    import torch
    from bench_models import model_pair

    from srkernels.benchmark import interleaved

    rows = []
    for dtype in (torch.bfloat16, torch.float32):  # most wanted first: the step may be cut off by the budget
        for key in MODELS:
            ref, fused = model_pair(key, scale, train=False)
            ref, fused = ref.to("cuda", dtype), fused.to("cuda", dtype)
            x = (torch.rand(1, ref.in_channels, lr, lr) * ref.input_range).to("cuda", dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                comp = torch.compile(ref)
            with torch.no_grad():
                variants = {"reference": lambda: ref(x), "compile(reference)": lambda: comp(x),
                            "fused compiled-CUDA": _forced("compiled", lambda: fused(x)),
                            "fused triton": _forced("triton", lambda: fused(x))}
                ok = {}
                want = ref(x).float()
                for name, fn in variants.items():
                    try:
                        got = fn().float()
                        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
                        ok[name] = fn
                        print(f"{key} {str(dtype)[6:]} {name}: max rel err vs reference {err:.2e}", flush=True)
                    except Exception as e:  # noqa: BLE001 - reported, the others still run
                        print(f"{key} {str(dtype)[6:]} {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
                t = interleaved(ok, device="cuda", rounds=5)
            base = t["reference"].min
            for name, tim in t.items():
                rows.append({"model": key, "dtype": str(dtype)[6:], "lr": lr, "scale": scale, "variant": name,
                             "ms_min": round(tim.min, 3), "ms_median": round(tim.median, 3),
                             "speedup_vs_reference": round(base / tim.min, 3)})
                print(json.dumps(rows[-1]), flush=True)
            out.write_text(json.dumps(rows, indent=1))  # after every model: a cut-off run keeps what it measured


def report(outdir: Path) -> None:
    import torch

    import srkernels
    from srkernels.benchmark import describe_machine

    def load(name, default):
        p = outdir / name
        return json.loads(p.read_text()) if p.exists() else default

    tests = {}
    junit = outdir / "cuda_tests.xml"
    if junit.exists():
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    rep = {
        "machine": describe_machine(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "srkernels": srkernels.build_info(),
        "cuda_tests": tests, "op_benchmarks": load("op_benchmarks.json", []),
        "backends": load("backends.json", {}), "models": load("models.json", []),
    }
    (outdir / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    md = [f"# srkernels GPU check\n\nGPU: {rep['gpu']}; torch {rep['torch']} (CUDA {rep['cuda']})\n",
          f"## CUDA tests\n\n{tests}\n", "## CUDA_PREFERENCE from measurements\n"]
    for op, p in rep["backends"].get("preference", {}).items():
        md.append(f"- `{op}`: measured {tuple(p['measured'])}, now {tuple(p['current'])} (compiled/triton "
                  f"{p['geomean_compiled_over_triton']}x)")
    md.append("\n## Compiled CUDA vs Triton per op\n\n| op | case | compiled ms | triton ms | compiled/triton |\n"
              "|---|---|---|---|---|")
    for r in rep["backends"].get("rows", []):
        md.append(f"| {r['op']} | {r['case']} | {r.get('compiled_ms_min')} | {r.get('triton_ms_min')} | "
                  f"{r['compiled_over_triton']} |")
    md.append("\n## Models (inference, [1, 3, 48, 48], x4)\n\n| model | dtype | variant | ms min | ms median | "
              "speed-up |\n|---|---|---|---|---|---|")
    for r in rep["models"]:
        md.append(f"| {r['model']} | {r['dtype']} | {r['variant']} | {r['ms_min']} | {r['ms_median']} | "
                  f"{r['speedup_vs_reference']}x |")
    md.append("\n## Op benchmarks (`--cuda --quick`)\n")
    for b in rep["op_benchmarks"]:
        md.append(f"### {b.get('bench')}\n\n| case | variant | ms min | speed-up vs eager |\n|---|---|---|---|")
        for r in b.get("rows", []):
            md.append(f"| {r.get('case')} | {r.get('variant')} | {r.get('ms_min')} | "
                      f"{r.get('speedup_min', r.get('speedup_vs_reference'))} |")
    (outdir / "report.md").write_text("\n".join(md) + "\n")
    print(f"wrote {outdir / 'report.json'} and {outdir / 'report.md'}")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd = argv[0]
    if cmd == "check":
        return check()
    if cmd == "backends":
        backends(Path(argv[1]))
    elif cmd == "models":
        models(Path(argv[1]))
    elif cmd == "report":
        report(Path(argv[1]))
    else:
        print(f"unknown step {cmd!r}\n{__doc__}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
