"""``srkernels`` command line: ``info`` (what was built) and ``bench`` (reference vs fused, with a parity check)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def cmd_bench(args) -> int:
    from .benchmark import interleaved

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shape = tuple(args.shape)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    print(f"srkernels bench: {list(shape)} {args.dtype} on {device}, {args.rounds} interleaved rounds")
    print(f"{'case':32s} {'ref ms min/med':>16s} {'fused ms min/med':>18s} {'speed-up':>9s} {'max |diff|':>11s}")
    ok = True
    with torch.no_grad():
        for name, (ref, fused) in _attention_cases(shape, dtype, device).items():
            diff = (ref().double() - fused().double()).abs().max().item()
            t = interleaved({"ref": ref, "fused": fused}, device=device, rounds=args.rounds)
            good = diff <= tol * max(1.0, ref().abs().max().item())
            ok &= good
            print(f"{name:32s} {t['ref'].min:7.3f}/{t['ref'].median:<8.3f} {t['fused'].min:8.3f}/{t['fused'].median:<9.3f}"
                  f" {t['ref'].median / t['fused'].median:8.2f}x {diff:11.2e}{'' if good else '  MISMATCH'}")
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
    b.set_defaults(func=cmd_bench)
    i = sub.add_parser("info", help="print build_info() as JSON")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
