"""Build and load the CUDA emulator extension (csrc/cuda_emu; docs/cuda_emulation.md).

The csrc/cuda sources are compiled as C++ for the CPU by torch.utils.cpp_extension.load into a cached build
directory (SRKERNELS_EMU_BUILD_DIR, default build/cuda_emu in the repo): the first build takes about a minute
and a half on 2 cores, later ones only recompile what changed (ninja)."""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EMU = ROOT / "csrc" / "cuda_emu"
SOURCES = ["emu_module.cpp", "emu_channel_attention.cpp", "emu_balanced_attention.cpp", "emu_pixel_shuffle.cpp"]
# -O1: the kernels run on small shapes here, so compile time matters more than code speed.
# -fno-extern-tls-init: the kernels' `extern __shared__` (thread_local here) needs no dynamic initialisation.
CFLAGS = ["-O1", "-std=c++20", "-Wno-unknown-pragmas", "-fno-strict-aliasing", "-fno-extern-tls-init"]


def build_dir() -> Path:
    d = Path(os.environ.get("SRKERNELS_EMU_BUILD_DIR") or ROOT / "build" / "cuda_emu")
    d.mkdir(parents=True, exist_ok=True)
    return d


@lru_cache(maxsize=1)
def load():
    """The emulator module (built on first use)."""
    from torch.utils.cpp_extension import load as _load

    os.environ.setdefault("MAX_JOBS", "2")
    # cpp_extension runs `ninja` from PATH: the venv's (pip's ninja, a build dependency) when not activated
    venv_bin = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(venv_bin, "ninja")) and venv_bin not in os.environ.get("PATH", "").split(":"):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    return _load(name="srk_cuda_emu", sources=[str(EMU / s) for s in SOURCES],
                 extra_include_paths=[str(EMU / "shadow"), str(EMU), str(ROOT / "csrc")], extra_cflags=CFLAGS,
                 build_directory=str(build_dir()), verbose=bool(os.environ.get("SRKERNELS_EMU_VERBOSE")))
