"""``srkernels`` command line: ``info`` (what was built), ``bench`` (reference vs fused, with a parity check),
``upscale`` / ``eval`` / ``convert`` (``srkernels.toolkit.commands``)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ._validate import DTYPES


def _attention_cases(shape, dtype, device):
    from . import ops
    from .reference import functional as RF

    N, C, H, W = shape
    g = torch.Generator().manual_seed(0)

    def t(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)

    Cr = max(1, C // 16)
    x, r = t(N, C, H, W), t(N, C, H, W)
    ca = (t(Cr, C, scale=C**-0.5), t(Cr, scale=0.1), t(C, Cr, scale=Cr**-0.5), t(C, scale=0.1))
    bam = (t(Cr, C, scale=C**-0.5), t(Cr, scale=0.1) + 0.25, t(C, Cr, scale=Cr**-0.5), t(7, 7, scale=1 / 7))
    return {
        "channel_attention+residual": (lambda: RF.channel_attention(x, *ca, residual=r),
                                       lambda: ops.channel_attention(x, *ca, residual=r)),
        "balanced_attention+residual": (lambda: RF.balanced_attention(x, *bam, residual=r),
                                        lambda: ops.balanced_attention(x, *bam, residual=r)),
    }


# (registry name, scale, config) of the models `bench` runs by default: every architecture, published configs
BENCH_MODELS = [("srcnn", 2, {}), ("srdensenet", 4, {}), ("rcan", 4, {}), ("rcan_bam", 4, {}),
                ("rdn", 2, {}), ("rdcab", 4, {"variant": "ipiu"}), ("rdcab", 4, {"variant": "split"}),
                ("rdcab", 4, {"variant": "fd_irb"})]


def _model_cases(names, size, dtype, device):
    from .models import build

    for name, scale, cfg in BENCH_MODELS:
        label = name + "".join(f" {v}" for v in cfg.values()) + f" x{scale}"
        if names and name not in names:
            continue
        torch.manual_seed(0)
        ref = build(name, scale, fused=False, **cfg).eval()
        fused = build(name, scale, fused=True, **cfg).eval()
        fused.load_state_dict(ref.state_dict())
        ref.to(device=device, dtype=dtype)
        fused.to(device=device, dtype=dtype)
        x = torch.rand(1, ref.in_channels, size, size, generator=torch.Generator().manual_seed(1)) * ref.input_range
        x = x.to(device=device, dtype=dtype)
        params = sum(p.numel() for p in ref.parameters())
        yield f"{label} ({params / 1e6:.2f}M)", (lambda m=ref, x=x: m(x)), (lambda m=fused, x=x: m(x))


def _run_cases(cases, dtype, device, rounds, tol, slower: list | None = None) -> bool:
    """Time and check each case; the names of cases where fused is slower than the reference (by min and by
    median: a one-sided noise spike does not flag) are appended to ``slower``."""
    from .benchmark import interleaved

    ok = True
    for name, ref, fused in cases:
        a, b = ref(), fused()
        diff = (a.double() - b.double()).abs().max().item()
        good = diff <= tol * max(1.0, a.abs().max().item())
        ok &= good
        t = interleaved({"ref": ref, "fused": fused}, device=device, rounds=rounds, warmup=1, min_round_ms=1.0)
        slow = t["fused"].min > t["ref"].min and t["fused"].median > t["ref"].median
        if slow and slower is not None:
            slower.append(name)
        print(f"{name:34s} {t['ref'].min:8.2f}/{t['ref'].median:<9.2f} {t['fused'].min:8.2f}/{t['fused'].median:<9.2f}"
              f" {t['ref'].median / t['fused'].median:7.2f}x {diff:11.2e}{'' if good else '  MISMATCH'}"
              f"{'  FUSED SLOWER' if slow else ''}")
    return ok


def cmd_bench(args) -> int:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shape = tuple(args.shape)
    if any(n < 1 for n in shape):
        print(f"srkernels bench: error: --shape N C H W must be positive ints, got {list(shape)}", file=sys.stderr)
        return 2
    # relative to the output's magnitude; deep models in fp32 accumulate rounding differences of ~1e-6
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    header = f"{'case':34s} {'ref ms min/med':>18s} {'fused ms min/med':>18s} {'speed-up':>8s} {'max |diff|':>11s}"
    print(f"srkernels bench on {device}, {args.dtype}, {args.rounds} interleaved rounds; speed-up by median")
    slower: list[str] = []
    with torch.no_grad():
        print(f"\nops at {list(shape)}\n{header}")
        ops_cases = [(n, r, f) for n, (r, f) in _attention_cases(shape, dtype, device).items()]
        ok = _run_cases(ops_cases, dtype, device, args.rounds, tol, slower)
        if args.models != "none":
            names = None if args.models == "all" else set(args.models.split(","))
            print(f"\nmodels, one {args.size}x{args.size} LR image\n{header}")
            ok &= _run_cases(_model_cases(names, args.size, dtype, device), dtype, device, max(3, args.rounds // 2), tol,
                             slower)
    if slower:
        print(f"\nFLAGGED: fused slower than the reference (by min and median) in {len(slower)} case(s): "
              f"{', '.join(slower)}")
    else:
        print("\nfused at least as fast as the reference in every case (by min or median)")
    print("parity: OK" if ok else "parity: FAILED")
    return 0 if ok else 1


def cmd_info(args) -> int:
    import srkernels

    print(json.dumps(srkernels.build_info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srkernels", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time reference vs fused on a built-in input and check they agree")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--dtype", choices=list(DTYPES), default="float32")
    b.add_argument("--shape", type=int, nargs=4, default=[16, 64, 48, 48], metavar=("N", "C", "H", "W"))
    b.add_argument("--rounds", type=int, default=10)
    b.add_argument("--models", default="all", help="all, none, or a comma-separated list of registry names")
    b.add_argument("--size", type=int, default=32, help="LR image size for the model benchmark")
    b.set_defaults(func=cmd_bench)
    i = sub.add_parser("info", help="print build_info() as JSON")
    i.set_defaults(func=cmd_info)
    _add_toolkit_commands(sub)
    return p


def _add_toolkit_commands(sub) -> None:
    """``upscale``, ``eval`` and ``convert``: thin over ``srkernels.toolkit.commands``."""
    from .toolkit import commands as C

    u = sub.add_parser("upscale", help="upscale an image or a folder (tiled; shipped model by default)")
    C.add_upscale_arguments(u)
    u.set_defaults(func=lambda a: C.upscale_main(args=a))
    e = sub.add_parser("eval", help="PSNR/SSIM table of checkpoints on image folders (same as python/test.py)")
    C.add_eval_arguments(e)
    e.set_defaults(func=lambda a: C.eval_main(prog="srkernels eval", args=a))
    c = sub.add_parser("convert", help="convert a checkpoint (upstream or training run) to srkernels safetensors")
    C.add_convert_arguments(c)
    c.set_defaults(func=lambda a: C.convert_main(args=a))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # Ctrl-C is the user's choice, not a crash: one line, the shell's status for SIGINT. Outputs are
        # published atomically and training resumes from its last checkpoint, so nothing half-written remains.
        print("srkernels: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
