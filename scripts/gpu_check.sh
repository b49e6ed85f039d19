#!/usr/bin/env bash
# One command for the day a GPU is here (issue #14): build the CUDA kernels for this GPU's arch only, run the
# CUDA tests, the op benchmarks (--cuda --quick), compiled-CUDA vs Triton per op and a model benchmark on CUDA,
# and write report.json + report.md into OUTDIR. Prints the CUDA_PREFERENCE (srkernels/_backend.py) each op
# should have by these measurements. Exit status: non-zero if a CUDA test fails (or the build does).
# Budget: < 8 min on one H100-class GPU: build (this arch, CPU kernels at the "default" capability only) and
# the tests always run; each benchmark step gets what is left of GPU_CHECK_BUDGET seconds (default 450) and is
# cut off (and marked so in the logs) when it runs over. Not yet timed on a GPU (none so far).
#
#   scripts/gpu_check.sh OUTDIR            # without a GPU: checks its prerequisites, says so, exits 0
#   scripts/gpu_check.sh --check OUTDIR    # prerequisites only, even with a GPU
#
# PYTHON (default .venv/bin/python, else python3) and CUDA_HOME (default /usr/local/cuda) are honoured.
set -uo pipefail

check_only=0
if [[ "${1:-}" == "--check" ]]; then check_only=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: $0 [--check] OUTDIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
root=$PWD
out=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create $1" >&2; exit 2; }
py=${PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
cuda_home=${CUDA_HOME:-/usr/local/cuda}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

# ---- prerequisites (also the whole run without a GPU)
fail=0
command -v "$py" >/dev/null 2>&1 || { echo "PROBLEM: no python at $py"; fail=1; }
nvcc=""
if [[ -x "$cuda_home/bin/nvcc" ]]; then nvcc="$cuda_home/bin/nvcc"; elif command -v nvcc >/dev/null 2>&1; then nvcc=$(command -v nvcc); fi
if [[ -n "$nvcc" ]]; then echo "nvcc: $nvcc ($("$nvcc" --version | grep -o 'release [0-9.]*'))"; else echo "PROBLEM: no nvcc (set CUDA_HOME)"; fail=1; fi
[[ $fail -eq 0 ]] && { "$py" scripts/gpu_check.py check || fail=1; }
if [[ $fail -ne 0 ]]; then
  echo "gpu_check: prerequisites missing (above)"
  exit 1
fi
has_gpu=$("$py" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ $check_only -eq 1 || "$has_gpu" != "1" ]]; then
  [[ "$has_gpu" != "1" ]] && echo "gpu_check: no CUDA GPU on this machine: prerequisites checked, nothing run"
  [[ $check_only -eq 1 ]] && echo "gpu_check: --check: prerequisites checked, nothing run"
  exit 0
fi

# ---- build for this GPU only
t0=$SECONDS
arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
echo "== build (arch $arch) -> $out/build.log"
if ! SRKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" CUDA_HOME="$cuda_home" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    SRKERNELS_CPU_CAPABILITIES="${SRKERNELS_CPU_CAPABILITIES:-default}" \
    "$py" setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  tail -30 "$out/build.log"
  echo "gpu_check: build FAILED"
  exit 1
fi
"$py" -c "import srkernels, json; print(json.dumps(srkernels.build_info()))" | tee "$out/build_info.json"
echo "build: $((SECONDS - t0)) s"

# ---- CUDA tests (the emulator's tests too: cheap, and they pin the same kernels on CPU)
echo "== CUDA tests -> $out/cuda_tests.log"
"$py" -m pytest -q tests/cuda tests/cuda_emu --junitxml="$out/cuda_tests.xml" -rs >"$out/cuda_tests.log" 2>&1
tests_rc=$?
tail -5 "$out/cuda_tests.log"
echo "tests: $((SECONDS - t0)) s"

budget=${GPU_CHECK_BUDGET:-450}
left() { echo $((budget - (SECONDS - t0))); }
bounded() {  # bounded NAME CMD...: run CMD with the time left, or skip it
  local name=$1; shift
  local l; l=$(left)
  if (( l < 20 )); then echo "$name: SKIPPED (time budget of ${budget}s used up)"; return 0; fi
  timeout "$l" "$@"; local rc=$?
  (( rc == 124 )) && echo "$name: CUT OFF after the time budget (${budget}s)"
  return $rc
}

# ---- op benchmarks: the JSON lines each appends to benchmarks/results/<bench>.jsonl are collected
echo "== op benchmarks (--cuda --quick) -> $out/op_benchmarks.log"
: >"$out/op_benchmarks.jsonl"
for b in channel_attention balanced_attention pixel_shuffle dense_block; do
  res=benchmarks/results/$b.jsonl
  before=$( [[ -f $res ]] && wc -l <"$res" || echo 0)
  bounded "bench_$b" "$py" benchmarks/bench_$b.py --cuda --quick >>"$out/op_benchmarks.log" 2>&1 ||
    echo "bench_$b failed or was cut off (see $out/op_benchmarks.log)"
  [[ -f $res ]] && tail -n +"$((before + 1))" "$res" >>"$out/op_benchmarks.jsonl"
done
"$py" -c "import json,sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1]) if l.strip()]))" \
  "$out/op_benchmarks.jsonl" >"$out/op_benchmarks.json"
echo "op benchmarks: $((SECONDS - t0)) s"

echo "== compiled CUDA vs Triton per op -> $out/backends.json"
bounded backends "$py" scripts/gpu_check.py backends "$out/backends.json" 2>&1 | tee "$out/backends.log" |
  grep "CUDA_PREFERENCE\|CUT OFF\|SKIPPED"
echo "== models on CUDA -> $out/models.json"
bounded models "$py" scripts/gpu_check.py models "$out/models.json" >"$out/models.log" 2>&1 ||
  echo "model benchmark failed or was cut off (see $out/models.log)"
"$py" scripts/gpu_check.py report "$out"
echo "gpu_check: $((SECONDS - t0)) s in all"
if [[ $tests_rc -ne 0 ]]; then
  echo "gpu_check: CUDA tests FAILED (exit $tests_rc): $out/cuda_tests.log"
  exit 1
fi
echo "gpu_check: CUDA tests passed"
