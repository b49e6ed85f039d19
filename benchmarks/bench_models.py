"""Whole models, CPU inference fp32: eager reference (NCHW), eager reference channels_last, fused; optionally
ONNX Runtime on the reference exported with torch.onnx.export. Every architecture at its published config
(``srkernels.models.build(name, scale)``), interleaved in one process.

    python benchmarks/bench_models.py [--models rcan,rdn] [--sizes 32,48] [--large] [--scale 4] [--rounds 5]
                                      [--threads N] [--onnx] [--train | --train-only] [--no-record]
    python benchmarks/bench_models.py --models rcan --sizes 32 --rounds 3     # quick

GFLOP counts conv MACs (forward hooks on the reference's Conv2d / ConvTranspose2d modules, 2 FLOP per MAC); the
attention MLPs and elementwise work are left out. "% roofline" compares a variant's GFLOP/s with the best rate of
a single 64->64 3x3 conv at [1, 64, LR, LR] (eager NCHW, eager channels_last, ``srkernels.nn.conv2d`` prepacked),
timed in the same process just before the models at that size. A fused row slower (by min) than the faster of
the two eager references is FLAGGED. ``--train`` adds a training-step table (forward + backward, batch 2, reference vs fused) with the
activation bytes autograd saves (``srkernels.benchmark.saved_bytes``).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import srkernels  # noqa: E402
from srkernels.benchmark import describe_machine, interleaved, saved_bytes  # noqa: E402
from srkernels.models import build  # noqa: E402

BENCH = "models"
# benchmark name -> (registry name, extra config); each at its published defaults otherwise
MODELS = {
    "srcnn": ("srcnn", {}),
    "srdensenet": ("srdensenet", {}),
    "rcan": ("rcan", {}),
    "rcan_bam": ("rcan", {"bam": True}),
    "rdn": ("rdn", {}),
    "rdcab": ("rdcab", {}),
    "rdcab_split": ("rdcab", {"variant": "split"}),
    "rdcab_fd_irb": ("rdcab", {"variant": "fd_irb"}),
}


def conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv2d / ConvTranspose2d module called in ``model(x)``."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        if isinstance(m, nn.ConvTranspose2d):
            total += inp[0].numel() * (m.out_channels // m.groups) * k
        else:
            total += out.numel() * (m.in_channels // m.groups) * k

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    return total


def conv_roofline(lr: int, rounds: int) -> tuple[float, dict]:
    """Best GFLOP/s of one 64->64 3x3 conv at [1, 64, lr, lr] over eager NCHW, eager channels_last and the
    prepacked ``srkernels.nn.conv2d``; (best, {variant: GFLOP/s})."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1).eval()
    x = torch.randn(1, 64, lr, lr)
    xcl = x.contiguous(memory_format=torch.channels_last)
    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    flop = 2 * lr * lr * 64 * 64 * 9
    with torch.no_grad():
        t = interleaved({
            "eager NCHW": lambda: conv(x),
            "eager channels_last": lambda: conv_cl(xcl),
            "srkernels conv2d": lambda: srkernels.nn.conv2d(conv, xcl),
        }, rounds=rounds)
    rates = {k: flop / (v.min * 1e-3) / 1e9 for k, v in t.items()}
    return max(rates.values()), rates


def onnx_session(model: nn.Module, x: torch.Tensor, threads: int):
    """An ONNX Runtime session of ``model`` exported at ``x``'s shape, or (None, reason)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return None, f"onnxruntime not installed ({e})"
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    except Exception as e:  # noqa: BLE001 - any export failure is reported, not fatal
        return None, f"export failed: {type(e).__name__}: {str(e)[:200]}"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess, None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def model_pair(key: str, scale: int, *, train: bool):
    """The reference model of ``MODELS[key]`` and its fused twin with the same weights."""
    name, cfg = MODELS[key]
    torch.manual_seed(0)
    ref = build(name, scale, fused=False, **cfg).train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = build(name, scale, fused=True, **cfg).train(train)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def bench_inference(names, sizes, scale, rounds, threads, use_onnx) -> list[dict]:
    rows = []
    for lr in sizes:
        roof, roof_rates = conv_roofline(lr, rounds)
        print(f"LR {lr}: conv roofline {roof:.1f} GFLOP/s (" +
              ", ".join(f"{k} {v:.1f}" for k, v in roof_rates.items()) + ")", flush=True)
        for key in names:
            ref, fused = model_pair(key, scale, train=False)
            ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
            x = torch.rand(1, ref.in_channels, lr, lr) * ref.input_range
            xcl = x.contiguous(memory_format=torch.channels_last)
            gflop = 2 * conv_macs(ref, x) / 1e9
            variants = {
                "reference": lambda: ref(x),
                "reference channels_last": lambda: ref_cl(xcl),
                "fused": lambda: fused(x),
            }
            notes = {}
            with torch.no_grad():
                y_ref = ref(x)
                notes["fused"] = f"rel err {rel_err(fused(x), y_ref):.1e}"
                if use_onnx:
                    sess, why = onnx_session(ref, x, threads)
                    if sess is None:
                        print(f"  {key} LR {lr}: no ONNX Runtime row: {why}", flush=True)
                    else:
                        xn = x.numpy()
                        variants["onnxruntime"] = lambda: sess.run(None, {"x": xn})
                        notes["onnxruntime"] = f"rel err {rel_err(torch.from_numpy(sess.run(None, {'x': xn})[0]), y_ref):.1e}"
                t = interleaved(variants, rounds=rounds)
            base = t["reference"]
            case = f"{key} x{scale} LR{lr}"
            for v, tim in t.items():
                rate = gflop / (tim.min * 1e-3)
                row = {
                    "case": case, "model": key, "scale": scale, "lr": lr, "variant": v,
                    "ms_min": round(tim.min, 3), "ms_median": round(tim.median, 3), "gflop": round(gflop, 3),
                    "gflops": round(rate, 2), "pct_roofline": round(100 * rate / roof, 1),
                    "roofline_gflops": round(roof, 2),
                    "speedup_min": round(base.min / tim.min, 3), "speedup_median": round(base.median / tim.median, 3),
                    "baseline": "reference", "note": notes.get(v, ""),
                }
                # fused against the faster eager reference (NCHW or channels_last), by min
                best_ref = min(t["reference"].min, t["reference channels_last"].min)
                row["flag"] = "FUSED SLOWER" if v == "fused" and tim.min > best_ref else ""
                rows.append(row)
            print(f"  {case}: " + ", ".join(f"{v} {tim.min:.1f} ms" for v, tim in t.items()), flush=True)
    return rows


def bench_training(names, lr, scale, rounds) -> list[dict]:
    """Forward + backward of batch 2 at ``lr`` (L1 loss), reference vs fused; saved-activation bytes."""
    rows = []
    for key in names:
        ref, fused = model_pair(key, scale, train=True)
        x = torch.rand(2, ref.in_channels, lr, lr) * ref.input_range

        def step(m):
            def run():
                m.zero_grad(set_to_none=True)
                m(x).abs().mean().backward()
            return run

        t = interleaved({"reference": step(ref), "fused": step(fused)}, rounds=rounds, warmup=1)
        saved = {"reference": saved_bytes(ref, x), "fused": saved_bytes(fused, x)}
        base = t["reference"]
        for v, tim in t.items():
            row = {"case": f"{key} x{scale} train N2 LR{lr}", "model": key, "scale": scale, "lr": lr, "variant": v,
                   "ms_min": round(tim.min, 2), "ms_median": round(tim.median, 2),
                   "saved_mb": round(saved[v] / 2**20, 2), "speedup_min": round(base.min / tim.min, 3),
                   "baseline": "reference"}
            row["flag"] = "FUSED SLOWER" if v == "fused" and row["speedup_min"] < 1.0 else ""
            rows.append(row)
        print(f"  train {key}: " + ", ".join(f"{v} {tim.min:.0f} ms, {saved[v] / 2**20:.1f} MB saved"
                                            for v, tim in t.items()), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    return harness.md_table(
        ["case", "variant", "ms min", "ms median", "GFLOP", "GFLOP/s", "% conv roofline", "speed-up (min / median)",
         "note", "flag"],
        [[r["case"], r["variant"], f"{r['ms_min']:.1f}", f"{r['ms_median']:.1f}", f"{r['gflop']:.2f}",
          f"{r['gflops']:.1f}", f"{r['pct_roofline']:.0f}%",
          f"{r['speedup_min']:.2f}x / {r['speedup_median']:.2f}x", r["note"], f"**{r['flag']}**" if r["flag"] else ""]
         for r in rows])


def train_table(rows: list[dict]) -> str:
    return harness.md_table(
        ["case", "variant", "ms min", "ms median", "saved activations (MB)", "speed-up (min)", "flag"],
        [[r["case"], r["variant"], f"{r['ms_min']:.0f}", f"{r['ms_median']:.0f}", f"{r['saved_mb']:.1f}",
          f"{r['speedup_min']:.2f}x", f"**{r['flag']}**" if r["flag"] else ""] for r in rows])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--sizes", default="32,48", help="LR sizes (square), comma list")
    ap.add_argument("--large", action="store_true", help="also LR 96 (slow)")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--onnx", action="store_true", help="add an ONNX Runtime row (needs onnxruntime)")
    ap.add_argument("--train", action="store_true", help="also a training-step table (batch 2, first size)")
    ap.add_argument("--train-only", action="store_true", help="only the training-step table")
    ap.add_argument("--no-record", action="store_true", help="do not append to results/models.jsonl")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    sizes = [int(s) for s in args.sizes.split(",")] + ([96] if args.large else [])
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    machine = describe_machine()
    cap = srkernels.build_info().get("cpu_capability", srkernels.build_info().get("cpu_isa"))
    print(f"{machine.get('cpu', '?')}; srkernels cpu_capability {cap}; torch {machine['cpu_capability']}; "
          f"{threads} threads", flush=True)
    rows = [] if args.train_only else bench_inference(names, sizes, args.scale, args.rounds, threads, args.onnx)
    if rows:
        print(table(rows))
    slower = [r["case"] for r in rows if r["flag"]]
    if slower:
        print(f"FLAGGED: fused slower than the faster eager reference in {', '.join(slower)}")
    train_rows = []
    if args.train or args.train_only:
        train_rows = bench_training(names, sizes[0], args.scale, args.rounds)
        print(train_table(train_rows))
    if not args.no_record:
        path = harness.record(BENCH, rows + train_rows, {
            "device": "cpu", "dtype": "float32", "threads": threads, "cpu": machine.get("cpu"),
            "cpu_capability": cap, "args": vars(args)})
        print(f"appended to {path}")
        if rows and set(names) == set(MODELS):
            harness.update_readme(BENCH, readme_text(rows, train_rows, machine, cap, threads, args))


def readme_text(rows, train_rows, machine, cap, threads, args) -> str:
    slower = sorted({r["case"] for r in rows if r["flag"]})
    text = (f"fp32 CPU inference, batch 1, x{args.scale}, {args.rounds} interleaved rounds; commit `{harness.git_sha()}`; "
            f"{machine.get('cpu', '?')}, srkernels cpu_capability {cap}, {threads} thread(s); shared 2-core VM under "
            f"load (compare rows of one case, not runs). GFLOP: conv MACs x 2. Flagged (fused slower than the faster "
            f"eager reference, by min): {', '.join(slower) or 'none'}.\n\n{table(rows)}")
    if train_rows:
        text += f"\n\nTraining step (forward + backward, batch 2):\n\n{train_table(train_rows)}"
    return text


if __name__ == "__main__":
    main()
