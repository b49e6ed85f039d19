"""5x5 64->32 conv (SRCNN's mapping layer), float32, channels_last, CPU inference: Winograd F(2x2,5x5) (srkernels
``winograd_conv5x5``) against ``F.conv2d`` and the prepacked oneDNN conv the fused models use. The 3x3
benchmark's code with the 5x5 defaults (benchmarks/bench_winograd_conv3x3.py: timing, error and record rules).

    python benchmarks/bench_winograd_conv5x5.py [--threads 1] [--sizes 32 48 96 192] [--rounds 15] [--channels 64 32]
    SRKERNELS_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_winograd_conv5x5.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_winograd_conv3x3 import main  # noqa: E402

if __name__ == "__main__":
    main(kernel=5, channels=(64, 32), sizes=(32, 48, 96, 192), doc=__doc__)
