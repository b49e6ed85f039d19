"""How close a float32 training step's gradients are to float64, per conv algorithm (issue 13): the eager
reference in float32, and the fused model with its training convs' forward as oneDNN (Winograd off),
Winograd F(2,3) and F(4,3) (``SRKERNELS_WINOGRAD_TRAIN``; the input gradient is F(4,3) whenever Winograd
is on), all against the eager reference in float64 with the same weights
and input (``bench_models.model_pair``: seeded random init; L1 loss, as the train table of bench_models.py).

Printed per variant: the output's relative error; the gradients' max |diff| over all parameters / max |grad|
("global"), and per parameter max |diff| / its max |grad| (median and worst over parameters); the input
gradient's relative error. The tile is switched per call through ``conv2d_pointwise.winograd_train_tile`` and,
for ``dense_block``'s layers (RDN, RDCAB: "oneDNN" is then its brgemm path), ``SRKERNELS_WINOGRAD_TRAIN``.
Prints only (the numbers are in docs/ops.md, ``## conv2d_pointwise``).

    python benchmarks/bench_train_accuracy.py [--models rcan,rcan_bam] [--lr 32] [--seeds 0,3,7]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_models  # noqa: E402  (model_pair)

TRAIN_ENV = "SRKERNELS_WINOGRAD_TRAIN"
conv_op = sys.modules[__import__("srkernels.ops.conv2d_pointwise", fromlist=["_"]).__name__]


def grads(m, x):
    m.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    y = m(xx)
    y.abs().mean().backward()
    return y.detach(), [xx.grad] + [p.grad for p in m.parameters()]


def errors(y, g, yd, gd) -> dict:
    pairs = [(a.double(), b) for a, b in zip(g[1:], gd[1:]) if b is not None]
    per = [((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in pairs]
    return {"out": ((y.double() - yd).abs().max() / yd.abs().max()).item(),
            "global": max((a - b).abs().max().item() for a, b in pairs) / max(b.abs().max().item() for _, b in pairs),
            "median": statistics.median(per), "worst": max(per),
            "input": ((g[0].double() - gd[0]).abs().max() / gd[0].abs().max()).item()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="rcan", help="comma list of bench_models.MODELS keys")
    ap.add_argument("--lr", type=int, default=32)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--seeds", default="0", help="input seeds, comma list")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    orig = conv_op.winograd_train_tile
    for key in args.models.split(","):
        ref, fused = bench_models.model_pair(key, args.scale, train=True)
        ref64 = copy.deepcopy(ref).double()
        for seed in map(int, args.seeds.split(",")):
            gen = torch.Generator().manual_seed(seed)
            x = torch.rand(2, ref.in_channels, args.lr, args.lr, generator=gen) * ref.input_range
            yd, gd = grads(ref64, x.double())
            rows = [("eager fp32", errors(*grads(ref, x), yd, gd))]
            env = os.environ.get(TRAIN_ENV)
            try:
                for name, m in (("fused, oneDNN", 0), ("fused, F(2,3)", 2), ("fused, F(4,3)", 4)):
                    conv_op.winograd_train_tile = lambda m=m: m
                    os.environ[TRAIN_ENV] = str(m)  # dense_block reads it per call (0: its brgemm path)
                    rows.append((name, errors(*grads(fused, x), yd, gd)))
            finally:
                conv_op.winograd_train_tile = orig
                if env is None:
                    os.environ.pop(TRAIN_ENV, None)
                else:
                    os.environ[TRAIN_ENV] = env
            print(f"{key} x{args.scale} LR {args.lr} batch 2, input seed {seed}")
            for name, e in rows:
                print(f"  {name:14s} out {e['out']:.1e} | grads global {e['global']:.1e}, per-param median "
                      f"{e['median']:.1e}, worst {e['worst']:.1e} | input grad {e['input']:.1e}", flush=True)


if __name__ == "__main__":
    main()
