#!/usr/bin/env bash
# Create ./.venv (if missing), install the dependencies and build srkernels in place (editable).
# Environment: SRKERNELS_CUDA=auto|0|1 (0 = CPU-only, fastest local build), TORCH_CUDA_ARCH_LIST, MAX_JOBS,
# SRKERNELS_CPU_CAPABILITIES (e.g. "default avx2": narrows the CPU variants compiled), CMAKE_ARGS, VENV (default .venv),
# TORCH (a pip requirement for torch, installed first; default: keep the venv's torch, or torch==2.14.1 if none).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
# The extension is compiled against the torch of this venv. A fresh venv gets torch 2.14.1 (the newest tested: a
# CUDA 13.0 build, on local disk here); a venv that already has a torch keeps it (tested range: 2.13.0 to 2.14.1).
# TORCH=<pip requirement> installs that one instead (e.g. TORCH=torch==2.13.0).
if [ -n "${TORCH:-}" ]; then
  pip install --quiet --disable-pip-version-check "$TORCH"
elif ! python -c "import torch" 2>/dev/null; then
  pip install --quiet --disable-pip-version-check torch==2.14.1
fi
pip install --quiet --disable-pip-version-check "cmake>=3.30" ninja "pybind11>=2.12" "setuptools>=77" wheel
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# --no-build-isolation: build against the torch just installed (no second multi-GB torch in a build env)
pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test]"
# Peer-parity tests load super-image's RCAN. Its own requirements would pull the GUI OpenCV build, so its
# runtime imports are installed explicitly (headless OpenCV; the torchvision release of this venv's torch,
# 2.X.Y -> 0.(X+15).Y, so that it does not replace torch).
pip install --quiet --disable-pip-version-check --no-deps super-image==0.2.0
TORCHVISION=$(python -c 'import torch; _, mi, pa = torch.__version__.split("+")[0].split(".")[:3]; print(f"0.{int(mi) + 15}.{pa}")')
pip install --quiet --disable-pip-version-check "torchvision==$TORCHVISION" opencv-python-headless h5py huggingface_hub
python -c "import json, srkernels; print(json.dumps(srkernels.build_info()))"
