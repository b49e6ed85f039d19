"""Whole models, CPU inference fp32: eager reference (NCHW), eager reference channels_last, fused; optionally
ONNX Runtime on the reference exported with torch.onnx.export. Every architecture at its published config
(``srkernels.models.build(name, scale)``), interleaved in one process.

    python benchmarks/bench_models.py [--models rcan,rdn] [--sizes 32,48] [--large] [--scale 4] [--rounds 5]
                                      [--threads N] [--clock wall|cpu] [--onnx] [--openvino] [--compile]
                                      [--bf16] [--upscale] [--plot PATH] [--train | --train-only] [--no-record]
    python benchmarks/bench_models.py --models rcan --sizes 32 --rounds 3     # quick

``--clock cpu`` (needs ``--threads 1``) times each call by the process's CPU time instead of the wall clock: on
a shared machine a time-sliced call then does not count the time other processes ran (cache sharing still
counts); a model faster than 50 ms per call is called several times per round (same count for every variant)
and the per-call mean of the round is recorded. ``--onnx`` / ``--openvino``: ONNX Runtime / OpenVINO (f32 precision hint) on the reference exported with
``torch.onnx.export``; ``--compile``: ``torch.compile`` (Inductor, freezing on) of the reference and of the
fused model; their warm-up (export/compile + first call) is recorded per row. ``--bf16``: the fused model in
bfloat16 where oneDNN runs bf16 natively (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), plus the Y-PSNR of
its output against fp32's on scikit-image's bundled photographs; and on every CPU, the reference and the fused
model (fp32 weights) under ``torch.autocast("cpu", dtype=torch.bfloat16)``, each autocast row's note naming the
bf16 path that ran (``bf16_paths``: native oneDNN bf16 convs / dense_block bf16 brgemm, or their fallbacks),
with its Y-PSNR against fp32 too. ``--upscale``: RCAN x4 480x270 -> 1920x1080
through the tiled ``Upscaler`` path (tile 256, overlap 16), reference vs fused. A plot (ms against LR size, one
line per variant, per model) is written with matplotlib when more than one size ran.

GFLOP counts conv MACs (forward hooks on the reference's Conv2d / ConvTranspose2d modules, 2 FLOP per MAC); the
attention MLPs and elementwise work are left out. "% roofline" compares a variant's GFLOP/s with the best rate of
a single 64->64 3x3 conv at [1, 64, LR, LR] (eager NCHW, eager channels_last, ``srkernels.nn.conv2d`` prepacked),
timed in the same interleaved rounds as each model's variants (so it sees the same machine state). A fused row slower (by min) than the faster of
the two eager references is FLAGGED. ``--train`` adds a training-step table (forward + backward, batch 2, reference vs fused) with the
activation bytes autograd saves (``srkernels.benchmark.saved_bytes``).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import srkernels  # noqa: E402
from srkernels.benchmark import Timing, describe_machine, interleaved, saved_bytes  # noqa: E402
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


ROOF = "roofline: "  # prefix of the single-conv variants timed beside each model (not rows of the tables)


def roofline_convs(lr: int) -> tuple[dict, float]:
    """The single-conv candidates of the roofline: one 64->64 3x3 conv at [1, 64, lr, lr] by eager NCHW, eager
    channels_last and the prepacked ``srkernels.nn.conv2d``, as callables named ``ROOF + variant``; and the
    conv's FLOP."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1).eval()
    x = torch.randn(1, 64, lr, lr)
    xcl = x.contiguous(memory_format=torch.channels_last)
    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    fns = {
        ROOF + "eager NCHW": lambda: conv(x),
        ROOF + "eager channels_last": lambda: conv_cl(xcl),
        ROOF + "srkernels conv2d": lambda: srkernels.nn.conv2d(conv, xcl),
    }
    return fns, 2 * lr * lr * 64 * 64 * 9


def roofline_rates(t: dict[str, Timing], flop: float) -> dict[str, float]:
    """GFLOP/s (by min) of the roofline variants in ``t``, by variant."""
    return {k[len(ROOF):]: flop / (v.min * 1e-3) / 1e9 for k, v in t.items() if k.startswith(ROOF)}


CLOCK = "wall"  # set by --clock
MIN_ROUND_S = 0.05  # --clock cpu: shortest round (calls of a fast model are repeated, per-call time recorded)


def timed(fns: dict, rounds: int, warmup: int = 2, own_reps: set[str] = frozenset()) -> dict[str, Timing]:
    """``interleaved`` on the wall clock, or (``--clock cpu``) the process CPU time of each call, variants
    interleaved the same way (order alternating per round). Variants named in ``own_reps`` (the roofline's
    single convs) get their own call count per round instead of the models' shared one."""
    if CLOCK == "wall":
        return interleaved(fns, rounds=rounds, warmup=warmup)
    one = {}
    for k, f in fns.items():
        for _ in range(warmup):
            t = time.process_time()
            f()
            one[k] = time.process_time() - t
    # calls per round: a round of a ms-scale model (SRCNN) lasts >= MIN_ROUND_S, the same count for every variant
    # (one call of 1-2 ms is at the mercy of the other processes' cache pollution on a shared machine)
    shared = [v for k, v in one.items() if k not in own_reps]
    reps = max(1, math.ceil(MIN_ROUND_S / max(min(shared), 1e-6))) if shared else 1
    reps_of = {k: max(1, math.ceil(MIN_ROUND_S / max(one[k], 1e-6))) if k in own_reps else reps for k in fns}
    out = {k: Timing(k) for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            f, n = fns[k], reps_of[k]
            t = time.process_time()
            for _ in range(n):
                f()
            out[k].times_ms.append((time.process_time() - t) * 1e3 / n)
    return out


def export_onnx(model: nn.Module, x: torch.Tensor):
    """``model`` exported with ``torch.onnx.export`` at ``x``'s shape: (path, seconds) or (None, reason)."""
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    except Exception as e:  # noqa: BLE001 - any export failure is reported, not fatal
        return None, f"export failed: {type(e).__name__}: {str(e)[:200]}"
    return path, time.perf_counter() - t0


def onnx_session(path: Path, threads: int):
    """An ONNX Runtime session of the exported model, or (None, reason)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return None, f"onnxruntime not installed ({e})"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess, None


def openvino_model(path: Path, threads: int):
    """The exported model compiled by OpenVINO for CPU in f32 (``INFERENCE_PRECISION_HINT``: no silent bf16 on
    CPUs that have it), or (None, reason)."""
    try:
        import openvino as ov
    except ImportError as e:
        return None, f"openvino not installed ({e})"
    core = ov.Core()
    return core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                                  "PERFORMANCE_HINT": "LATENCY"}), None


def compiled(model: nn.Module):
    """``torch.compile`` of ``model`` with Inductor's freezing (weights folded as constants, oneDNN prepacked
    convs): what a user would try first."""
    import torch._inductor.config as icfg

    icfg.freezing = True
    return torch.compile(model)


def first_call(fn) -> float:
    """Seconds of the first call (compile / warm-up)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


DENSE_MODELS = ("srdensenet", "rdn", "rdcab", "rdcab_split", "rdcab_fd_irb")  # the ones running ops.dense_block


def bf16_paths() -> dict[str, str]:
    """Which bf16 kernels run on this CPU: "conv" -- oneDNN's bf16 convolution (``onednn_bf16()``: AVX-512 or
    AVX-NE-CONVERT) or eager bf16 convs (fallback), and the 3x3 / 5x5 convs that ``winograd_bf16`` gives to
    Winograd (bf16 storage, float32 arithmetic; on an avx2 / avx512 build); "dense" -- ``dense_block``'s bf16 brgemm micro-kernel (AMX or
    AVX512-BF16; its 3x3 layers of >= 64 channels by Winograd where ``winograd_bf16`` says so) or its ATen path of
    fp32 GEMMs on converted operands (fallback, told by the profiler seeing ``aten::mm``, as
    benchmarks/bench_dense_block_bf16.py)."""
    from srkernels.ops.conv2d_pointwise import onednn_bf16, winograd_bf16
    from srkernels.ops.winograd_conv3x3 import vector_isa

    m = srkernels.nn.ResidualDenseBlock(8, 4, 2).to(torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        m(torch.randn(1, 8, 4, 4, dtype=torch.bfloat16))
    aten = any(e.name == "aten::mm" for e in prof.events())
    conv = "oneDNN bf16 convs" if onednn_bf16() else "FALLBACK eager bf16 convs (no native bf16)"
    if not onednn_bf16():
        conv += " in training; inference: oneDNN float32 convs on widened bf16"
    if vector_isa() and winograd_bf16(4, 3, 64, 64):
        conv += (", 3x3 by Winograd F(4,3) / F(6,3) (by size), 5x5 by F(4,5), on bf16 storage" if onednn_bf16()
                 else ", 3x3 / 5x5 by Winograd on bf16 storage")
    dense = "FALLBACK dense_block ATen fp32 GEMMs" if aten else "dense_block bf16 brgemm"
    if not aten and onednn_bf16() and vector_isa() and winograd_bf16(4, 3, 64, 64):
        dense += " (3x3 layers of >= 64 channels by Winograd F(4,3) on bf16 storage)"
    return {"conv": conv, "dense": dense}


def bf16_note(key: str, paths: dict[str, str]) -> str:
    return paths["conv"] + (f" + {paths['dense']}" if key in DENSE_MODELS else "")


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


def bench_inference(names, sizes, scale, rounds, threads, opts) -> list[dict]:
    use_onnx = opts.onnx or opts.openvino
    rows = []
    for lr in sizes:
        roof_fns, roof_flop = roofline_convs(lr)
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
            notes, warm = {}, {}
            with torch.no_grad():
                y_ref = ref(x)
                notes["fused"] = f"rel err {rel_err(fused(x), y_ref):.1e}"
                if opts.compile:
                    for v, m in (("compile(reference)", ref), ("compile(fused)", fused)):
                        torch._dynamo.reset()
                        cm = compiled(copy.deepcopy(m))
                        try:
                            warm[v] = first_call(lambda: cm(x))
                        except Exception as e:  # noqa: BLE001 - reported, not fatal
                            print(f"  {key} LR {lr}: no {v} row: {type(e).__name__}: {str(e)[:200]}", flush=True)
                            continue
                        variants[v] = (lambda cm: lambda: cm(x))(cm)
                        notes[v] = f"rel err {rel_err(cm(x), y_ref):.1e}"
                if use_onnx:
                    path, export_s = export_onnx(ref, x)
                    if path is None:
                        print(f"  {key} LR {lr}: no ONNX Runtime / OpenVINO rows: {export_s}", flush=True)
                    xn = x.numpy()
                    if path is not None and opts.onnx:
                        sess, why = onnx_session(path, threads)
                        if sess is None:
                            print(f"  {key} LR {lr}: no ONNX Runtime row: {why}", flush=True)
                        else:
                            warm["onnxruntime"] = export_s + first_call(lambda: sess.run(None, {"x": xn}))
                            variants["onnxruntime"] = lambda: sess.run(None, {"x": xn})
                            notes["onnxruntime"] = f"rel err {rel_err(torch.from_numpy(sess.run(None, {'x': xn})[0]), y_ref):.1e}"
                    if path is not None and opts.openvino:
                        t0 = time.perf_counter()
                        ovm, why = openvino_model(path, threads)
                        if ovm is None:
                            print(f"  {key} LR {lr}: no OpenVINO row: {why}", flush=True)
                        else:
                            warm["openvino"] = export_s + time.perf_counter() - t0 + first_call(lambda: ovm(xn))
                            variants["openvino"] = lambda: ovm(xn)
                            notes["openvino"] = f"rel err {rel_err(torch.from_numpy(ovm(xn)[0]), y_ref):.1e}"
                if opts.bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
                    fb = copy.deepcopy(fused).to(torch.bfloat16)
                    xb = x.to(torch.bfloat16)
                    variants["fused bf16"] = lambda: fb(xb)
                    notes["fused bf16"] = f"rel err {rel_err(fb(xb).float(), y_ref):.1e}"
                if opts.bf16:  # autocast: every CPU (without native bf16 it runs the fallbacks, named in the note)
                    for v, m in (("reference autocast bf16", ref), ("fused autocast bf16", fused)):
                        variants[v] = (lambda m: lambda: _autocast(m, x))(m)
                        y = _autocast(m, x)
                        notes[v] = f"rel err {rel_err(y.float(), y_ref):.1e}; out {str(y.dtype)[6:]}" + (
                            f"; {bf16_note(key, opts.bf16_paths)}" if m is fused else "")
                # the roofline's single convs in the same interleaved rounds as the model: a shared machine's
                # speed drifts over a long run, so a roofline timed once per size would skew the ratios
                t = timed(variants | roof_fns, rounds=rounds, own_reps=set(roof_fns))
            roof_rates = roofline_rates(t, roof_flop)
            roof = max(roof_rates.values())
            t = {k: v for k, v in t.items() if not k.startswith(ROOF)}
            base = t["reference"]
            case = f"{key} x{scale} LR{lr}"
            print(f"  {case}: conv roofline {roof:.1f} GFLOP/s (" +
                  ", ".join(f"{k} {v:.1f}" for k, v in roof_rates.items()) + ")", flush=True)
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
                if v in warm:  # first-call seconds beyond a steady call (export / compile + first run)
                    row["warmup_s"] = round(warm[v] - tim.median * 1e-3, 2)
                    row["note"] = (row["note"] + f"; warm-up {row['warmup_s']:.1f} s").lstrip("; ")
                # fused against the faster eager reference (NCHW or channels_last), by min
                best_ref = min(t["reference"].min, t["reference channels_last"].min)
                row["flag"] = "FUSED SLOWER" if v == "fused" and tim.min > best_ref else ""
                rows.append(row)
            print(f"  {case}: " + ", ".join(f"{v} {tim.min:.1f} ms" for v, tim in t.items()), flush=True)
    return rows


def _autocast(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return m(x)


def y_psnr(a: torch.Tensor, b: torch.Tensor, border: int) -> float:
    """PSNR of the BT.601 luma (Y, 16-235) of two RGB images on [0, 1], ``border`` pixels shaved (the SR
    convention)."""
    wts = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64).view(1, 3, 1, 1) / 255.0
    ya = (a.double().clamp(0, 1) * wts).sum(1) + 16 / 255
    yb = (b.double().clamp(0, 1) * wts).sum(1) + 16 / 255
    if border:
        ya, yb = ya[..., border:-border, border:-border], yb[..., border:-border, border:-border]
    return 10 * math.log10(1.0 / ((ya - yb) ** 2).mean().item())


def photo_pair(img, scale: int, side: int = 192) -> tuple[torch.Tensor, torch.Tensor]:
    """(HR, LR) [1, 3, H, W] float tensors on [0, 1] from an HxWx3 uint8 photograph: its centre ``side`` x ``side``
    crop, and that crop downscaled by bicubic with antialiasing (clamped)."""
    hr = torch.from_numpy(img).permute(2, 0, 1).float().div(255).unsqueeze(0)
    h, w = hr.shape[-2:]
    hr = hr[..., (h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
    lr = F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    return hr, lr.clamp(0, 1)


def bench_bf16_quality(names, scale) -> list[dict]:
    """Y-PSNR of the fused model's fp32 and bf16 outputs against the HR photograph (scikit-image's bundled
    astronaut, chelsea, coffee; 192x192 centre crops, LR by bicubic antialiased downscaling), and of bf16
    against fp32. The weights are the benchmark's (seeded random init, no pretrained file here): the two
    PSNRs against HR say little about SR quality, their difference is what bf16 costs."""
    try:
        from skimage import data
    except ImportError as e:
        print(f"bf16 quality: scikit-image not installed ({e})")
        return []
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("bf16 quality: no native bf16 on this CPU (oneDNN refuses it): bf16 runs the eager fallback; skipped")
        return []
    photos = {n: getattr(data, n)() for n in ("astronaut", "chelsea", "coffee")}
    rows = []
    for key in names:
        _, fused = model_pair(key, scale, train=False)
        fb = copy.deepcopy(fused).to(torch.bfloat16)
        for pname, img in photos.items():
            hr, lr = photo_pair(img, scale)
            if fused.in_channels == 1:  # Y-channel models: feed Y, compare Y
                wts = torch.tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1) / 255.0
                lr = (lr.clamp(0, 1) * wts).sum(1, keepdim=True) + 16 / 255
                hr_in = (hr * wts).sum(1, keepdim=True) + 16 / 255
            else:
                hr_in = hr
            x = lr.clamp(0, 1) * fused.input_range
            with torch.no_grad():
                y32 = fused(x) / fused.input_range
                if y32.shape[-2:] != hr.shape[-2:]:  # a model on bicubic-upscaled input (SRCNN)
                    x = F.interpolate(x, size=hr.shape[-2:], mode="bicubic", align_corners=False)
                    y32 = fused(x) / fused.input_range
                y16 = fb(x.to(torch.bfloat16)).float() / fused.input_range
                yac = _autocast(fused, x).float() / fused.input_range
            if fused.in_channels == 1:
                def psnr(a, b, crop):
                    d = a.clamp(0, 1) - b.clamp(0, 1) if not crop else (a.clamp(0, 1) - b)[..., scale:-scale, scale:-scale]
                    return 10 * math.log10(1 / (d ** 2).mean().clamp_min(1e-20).item())
                p32, p16, pac = psnr(y32, hr_in, True), psnr(y16, hr_in, True), psnr(yac, hr_in, True)
                pb, pacb = psnr(y16, y32, False), psnr(yac, y32, False)
            else:
                p32, p16, pac = y_psnr(y32, hr_in, scale), y_psnr(y16, hr_in, scale), y_psnr(yac, hr_in, scale)
                pb, pacb = y_psnr(y16, y32, scale), y_psnr(yac, y32, scale)
            worst = max(abs(p16 - p32), abs(pac - p32))
            rows.append({"case": f"{key} x{scale} {pname}", "model": key, "photo": pname, "psnr_fp32": round(p32, 3),
                         "psnr_bf16": round(p16, 3), "delta_db": round(p16 - p32, 3), "psnr_bf16_vs_fp32": round(pb, 2),
                         "psnr_autocast": round(pac, 3), "delta_autocast_db": round(pac - p32, 3),
                         "psnr_autocast_vs_fp32": round(pacb, 2),
                         "flag": "" if worst <= 0.02 else "DELTA > 0.02 dB"})
            print(f"  bf16 {key} {pname}: Y-PSNR fp32 {p32:.3f} dB, bf16 {p16:.3f} dB (delta {p16 - p32:+.3f}), "
                  f"autocast {pac:.3f} dB (delta {pac - p32:+.3f}); vs fp32: bf16 {pb:.1f} dB, autocast {pacb:.1f} dB",
                  flush=True)
    return rows


def bench_upscale(rounds, threads, lr_hw=(270, 480), tile=256, overlap=16, key="rcan") -> list[dict]:
    """RCAN x4 on a 480x270 RGB image -> 1920x1080 through ``srkernels.toolkit.inference.Upscaler`` (tile 256,
    overlap 16: what ``srkernels upscale`` runs), reference vs fused. The other arguments exist for the test."""
    from srkernels.toolkit.inference import Upscaler

    ref, fused = model_pair(key, 4, train=False)
    h, w = lr_hw
    lr = torch.rand(1, 3, h, w)
    ups = {"reference": Upscaler(ref, tile=tile, overlap=overlap), "fused": Upscaler(fused, tile=tile, overlap=overlap)}
    with torch.no_grad():
        outs = {k: u(lr) for k, u in ups.items()}
        t = timed({k: (lambda u: lambda: u(lr))(u) for k, u in ups.items()}, rounds=rounds, warmup=0)
    err = rel_err(outs["fused"], outs["reference"])
    rows = []
    case = f"{key} x4 upscale {w}x{h}->{4 * w}x{4 * h} (tile {tile})"
    for v, tim in t.items():
        rows.append({"case": case, "model": key, "scale": 4, "lr": h,
                     "variant": v, "ms_min": round(tim.min, 1), "ms_median": round(tim.median, 1),
                     "speedup_min": round(t["reference"].min / tim.min, 3),
                     "note": f"rel err {err:.1e}" if v == "fused" else "", "out_shape": list(outs[v].shape),
                     "flag": "FUSED SLOWER" if v == "fused" and tim.min > t["reference"].min else ""})
    print(f"  upscale {w}x{h} -> {4 * w}x{4 * h}: " + ", ".join(f"{v} {tim.min / 1e3:.1f} s" for v, tim in t.items()))
    return rows


def plot(rows: list[dict], path: Path) -> Path | None:
    """ms (min) against LR size, one line per variant, one panel per model; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no plot: matplotlib not installed ({e})")
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = min(4, len(models))
    nrows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, models):
        mine = [r for r in rows if r["model"] == m]
        for v in dict.fromkeys(r["variant"] for r in mine):
            pts = sorted((r["lr"], r["ms_min"]) for r in mine if r["variant"] == v)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
        ax.set_title(m)
        ax.set_xlabel("LR size (px, square)")
        ax.set_ylabel("ms (min)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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

        t = timed({"reference": step(ref), "fused": step(fused)}, rounds=rounds, warmup=1)
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
    ap.add_argument("--openvino", action="store_true", help="add an OpenVINO row (needs openvino)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows (reference, fused; slow warm-up)")
    ap.add_argument("--bf16", action="store_true", help="fused bf16 rows + Y-PSNR vs fp32 (native bf16 CPUs); "
                    "autocast bf16 rows (reference, fused; every CPU, the path that ran in the note)")
    ap.add_argument("--upscale", action="store_true", help="RCAN x4 480x270 -> 1920x1080 tiled upscale row")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall clock, or process CPU time per call (needs --threads 1; robust on a shared machine)")
    ap.add_argument("--plot", default=None,
                    help="plot path (PNG; default results/models.png, written by a run of every model only)")
    ap.add_argument("--train", action="store_true", help="also a training-step table (batch 2, first size)")
    ap.add_argument("--train-only", action="store_true", help="only the training-step table")
    ap.add_argument("--no-record", action="store_true",
                    help="do not append to results/models.jsonl (nor write the plot or benchmarks/README.md)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    sizes = [int(s) for s in args.sizes.split(",")] + ([96] if args.large else [])
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    global CLOCK
    if args.clock == "cpu" and threads != 1:
        ap.error("--clock cpu needs --threads 1 (CPU time of several threads is not latency)")
    CLOCK = args.clock
    machine = describe_machine()
    cap = srkernels.build_info().get("cpu_capability", srkernels.build_info().get("cpu_isa"))
    print(f"{machine.get('cpu', '?')}; srkernels cpu_capability {cap}; torch {machine['cpu_capability']}; "
          f"{threads} threads", flush=True)
    args.bf16_paths = bf16_paths() if args.bf16 else {}
    print(f"clock: {CLOCK}; bf16 native: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}"
          + (f"; bf16 paths: {args.bf16_paths['conv']}, {args.bf16_paths['dense']}" if args.bf16 else ""), flush=True)
    rows = [] if args.train_only else bench_inference(names, sizes, args.scale, args.rounds, threads, args)
    if rows:
        print(table(rows))
        # --no-record leaves the committed plot alone too, and so does a run of some models without --plot
        if len(sizes) > 1 and not args.no_record and (args.plot or set(names) == set(MODELS)):
            png = plot(rows, Path(args.plot or harness.RESULTS / "models.png"))
            if png:
                print(f"plot: {png}")
    quality = bench_bf16_quality(names, args.scale) if args.bf16 and not args.train_only else []
    up_rows = bench_upscale(max(1, args.rounds // 3), threads) if args.upscale and not args.train_only else []
    slower = [r["case"] for r in rows if r["flag"]]
    if slower:
        print(f"FLAGGED: fused slower than the faster eager reference in {', '.join(slower)}")
    train_rows = []
    if args.train or args.train_only:
        train_rows = bench_training(names, sizes[0], args.scale, args.rounds)
        print(train_table(train_rows))
    if not args.no_record:
        path = harness.record(BENCH, rows + train_rows + up_rows + quality, {
            "device": "cpu", "dtype": "float32", "threads": threads, "cpu": machine.get("cpu"),
            "cpu_capability": cap, "clock": CLOCK, "bf16_native": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
            "bf16_paths": args.bf16_paths,
            "args": vars(args)})
        print(f"appended to {path}")
        # one block per capability, so that a forced-AVX2 run does not overwrite the native one, and per set of
        # sizes other than the default (an LR 96 run has its own block beside the LR 32/48 one)
        if set(names) == set(MODELS):
            if rows:
                tag = "" if sizes == [32, 48] else "-lr" + "-".join(map(str, sizes))
                harness.update_readme(f"{BENCH}-{cap}{tag}", readme_text(rows, machine, cap, threads, args))
            if train_rows:
                harness.update_readme(f"{BENCH}-train-{cap}", train_text(train_rows, machine, cap, args))


def _where(machine, cap, threads, args) -> str:
    return (f"commit `{harness.git_sha()}`, {time.strftime('%Y-%m-%d', time.gmtime())}; {machine.get('cpu', '?')}, "
            f"srkernels cpu_capability {cap}, torch {machine.get('cpu_capability')}, {threads} thread(s), clock "
            f"{args.clock}; shared 2-core VM under load (compare rows of one case, not runs)")


def readme_text(rows, machine, cap, threads, args) -> str:
    slower = sorted({r["case"] for r in rows if r["flag"]})
    return (f"fp32 CPU inference, batch 1, x{args.scale}, {args.rounds} interleaved rounds; "
            f"{_where(machine, cap, threads, args)}. GFLOP: conv MACs x 2. Flagged (fused slower than the faster "
            f"eager reference, by min): {', '.join(slower) or 'none'}.\n\n{table(rows)}")


def train_text(train_rows, machine, cap, args) -> str:
    return (f"Training step (forward + backward, batch 2), {args.rounds} rounds; "
            f"{_where(machine, cap, 1 if args.threads == 1 else torch.get_num_threads(), args)}.\n\n"
            f"{train_table(train_rows)}")


if __name__ == "__main__":
    main()
