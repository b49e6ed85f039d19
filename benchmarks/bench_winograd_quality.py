"""What Winograd costs in image quality: each fused model's float32 output with its 3x3 convs as Winograd
F(4x4,3x3) (the default) and F(2x2,3x3), against the same fused model with Winograd off (prepacked oneDNN
direct convs, dense_block's brgemm layers) and the eager reference, as Y-PSNR between the outputs and each against the HR photograph
(scikit-image's astronaut, chelsea, coffee; 192x192 centre crops, bicubic LR; seeded random weights: no
pretrained file here). The tile is switched per model copy through ``conv2d_pointwise.winograd_tile`` (the
Python convs) and ``SRKERNELS_WINOGRAD`` (dense_block's layers read it per call).

    python benchmarks/bench_winograd_quality.py [--models rcan,rdn] [--scale 4]
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_models  # noqa: E402  (model_pair, y_psnr, MODELS)
import harness  # noqa: E402

# the module, not the op function of the same name that srkernels.ops exports
conv_op = importlib.import_module("srkernels.ops.conv2d_pointwise")


def outputs(key: str, scale: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    ref, fused = bench_models.model_pair(key, scale, train=False)
    res = {}
    orig, env = conv_op.winograd_tile, os.environ.get(conv_op.WINOGRAD_ENV)
    try:
        for name, m in (("winograd F(4,3)", 4), ("winograd F(2,3)", 2), ("direct (oneDNN / brgemm)", 0)):
            conv_op.winograd_tile = lambda m=m: m  # the Python convs read it once per process ...
            os.environ[conv_op.WINOGRAD_ENV] = str(m)  # ... dense_block's C++ layers per call
            f = copy.deepcopy(fused)  # fresh pack caches for each tile
            with torch.no_grad():
                res[name] = f(x * fused.input_range) / fused.input_range
    finally:
        conv_op.winograd_tile = orig
        if env is None:
            os.environ.pop(conv_op.WINOGRAD_ENV, None)
        else:
            os.environ[conv_op.WINOGRAD_ENV] = env
    with torch.no_grad():
        res["eager reference"] = ref(x * ref.input_range) / ref.input_range
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(bench_models.MODELS))
    ap.add_argument("--scale", type=int, default=4)
    args = ap.parse_args(argv)
    from skimage import data

    torch.set_num_threads(1)
    rows = []
    for key in args.models.split(","):
        for pname in ("astronaut", "chelsea", "coffee"):
            img = getattr(data, pname)()
            hr, lr = bench_models.photo_pair(img, args.scale)
            probe = bench_models.model_pair(key, args.scale, train=False)[1]
            if probe.in_channels == 1:
                continue  # Y-channel models (SRCNN, SRDenseNet): bench_models --bf16 has their Y handling
            out = outputs(key, args.scale, lr)
            direct = out["direct (oneDNN / brgemm)"]
            for name, y in out.items():
                if name == "direct (oneDNN / brgemm)":
                    continue
                row = {"case": f"{key} x{args.scale} {pname}", "variant": name,
                       "psnr_vs_direct_db": round(bench_models.y_psnr(y, direct, args.scale), 2),
                       "delta_vs_direct_db": round(bench_models.y_psnr(y, hr, args.scale)
                                                   - bench_models.y_psnr(direct, hr, args.scale), 5),
                       "max_abs_vs_direct": float((y - direct).abs().max())}
                rows.append(row)
                print(json.dumps(row), flush=True)
    worst = {}
    for r in rows:
        w = worst.setdefault(r["variant"], [math.inf, 0.0])
        w[0] = min(w[0], r["psnr_vs_direct_db"])
        w[1] = max(w[1], abs(r["delta_vs_direct_db"]))
    for v, (p, d) in worst.items():
        print(f"{v}: min Y-PSNR against the direct-conv output {p:.1f} dB; max |delta of Y-PSNR vs HR| {d:.5f} dB")
    harness.record("winograd_quality", rows, {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


if __name__ == "__main__":
    main()
