"""A model's last conv (64->3 3x3 at the HR size; ``--channels 256 1``: SRDenseNet's, ``--kernel 5 --channels 32
1``: SRCNN's), float32, channels_last, CPU inference: ``direct_conv2d`` against Winograd and the prepacked oneDNN
conv. The 3x3 Winograd benchmark's code with these defaults (benchmarks/bench_winograd_conv3x3.py: timing, error
and record rules); ``direct_use`` (srkernels/ops/direct_conv2d.py) is the rule these runs measured.

    python benchmarks/bench_direct_conv2d.py [--threads 1] [--sizes 16 32 48 96 192] [--channels 64 3]
    python benchmarks/bench_direct_conv2d.py --kernel 5 --channels 32 1 --threads 1
    SRKERNELS_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_direct_conv2d.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_winograd_conv3x3 import main  # noqa: E402

if __name__ == "__main__":
    main(kernel=3, channels=(64, 3), sizes=(16, 32, 48, 96, 192), doc=__doc__)
