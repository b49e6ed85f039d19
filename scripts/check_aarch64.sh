#!/usr/bin/env bash
# Compile (syntax and templates, no code generation) the CPU kernels and the runtime for aarch64 with Debian's
# cross compiler, as the build does on a non-x86 host: only the `default` capability, no x86 flags. No machine
# of this project is an ARM one; this is the check that the sources hold no x86-only code outside the avx2 /
# avx512 capabilities. Needs g++-aarch64-linux-gnu (apt) and a venv with torch (its headers).
# usage: scripts/check_aarch64.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
CXX=${CXX_AARCH64:-aarch64-linux-gnu-g++}
INC=$("$PY" -c 'import torch.utils.cpp_extension as ce; print(" ".join("-isystem " + p for p in ce.include_paths()))')
ABI=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
for f in csrc/cpu/*.cpp csrc/runtime/*.cpp; do
  # -Wno-psabi: GCC's note that std::pair argument passing changed in GCC 10.1 (inside ATen's headers)
  # shellcheck disable=SC2086
  "$CXX" -std=c++20 -fsyntax-only -fopenmp -Wall -Wno-psabi -Wno-unused-function -I csrc $INC \
    -DCPU_CAPABILITY=DEFAULT -D_GLIBCXX_USE_CXX11_ABI="$ABI" "$f"
  echo "aarch64 ok: $f"
done
