#!/usr/bin/env bash
# Create ./.venv (if missing), install the dependencies and build srkernels in place (editable).
# Environment: SRKERNELS_CUDA=auto|0|1 (0 = CPU-only, fastest local build), TORCH_CUDA_ARCH_LIST, MAX_JOBS,
# SRKERNELS_CPU_CAPABILITIES (e.g. "default avx2": narrows the CPU variants compiled), CMAKE_ARGS, VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
# torch is pinned to the release the C++ extension is compiled against (a CUDA 13.0 build, on local disk here).
pip install --quiet --disable-pip-version-check torch==2.14.1 "cmake>=3.30" ninja "pybind11>=2.12" "setuptools>=77" wheel
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# --no-build-isolation: build against the torch just installed (no second multi-GB torch in a build env)
pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test]"
# Peer-parity tests load super-image's RCAN. Its own requirements would pull the GUI OpenCV build, so its
# runtime imports are installed explicitly (headless OpenCV; torchvision matching torch).
pip install --quiet --disable-pip-version-check --no-deps super-image==0.2.0
pip install --quiet --disable-pip-version-check torchvision==0.29.1 opencv-python-headless h5py huggingface_hub
python -c "import json, srkernels; print(json.dumps(srkernels.build_info()))"
