"""scripts/gpu_check.sh in its checking mode (what runs without a GPU), and its report step on recorded data."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(args, **env):
    e = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=e, timeout=120)


def _has_nvcc() -> bool:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return os.access(os.path.join(cuda_home, "bin", "nvcc"), os.X_OK) or shutil.which("nvcc") is not None


def test_check_mode(tmp_path):
    """Passes where its prerequisites are (nvcc is one: the machines of this project have it); else says which."""
    r = run(["--check", str(tmp_path / "out")])
    if not _has_nvcc():
        assert r.returncode == 1 and "no nvcc" in r.stdout, r.stdout + r.stderr
        return
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prerequisites checked" in r.stdout
    assert "PROBLEM" not in r.stdout


def test_missing_nvcc_is_reported(tmp_path):
    r = run([str(tmp_path / "out")], CUDA_HOME=str(tmp_path / "no-cuda"), PATH="/usr/bin:/bin")
    assert r.returncode == 1 and "no nvcc" in r.stdout, r.stdout + r.stderr


def test_usage_error():
    assert run([]).returncode == 2


def test_report_from_recorded_steps(tmp_path):
    (tmp_path / "backends.json").write_text(json.dumps({
        "rows": [{"op": "pixel_shuffle", "case": "[1, 64, 48, 48] float32", "compiled_ms_min": 0.02,
                  "triton_ms_min": 0.03, "compiled_over_triton": 0.667}],
        "preference": {"pixel_shuffle": {"geomean_compiled_over_triton": 0.667, "measured": ["compiled", "triton"],
                                         "current": ["compiled", "triton"]}}}))
    (tmp_path / "models.json").write_text(json.dumps([{"model": "rcan", "dtype": "float32", "lr": 48, "scale": 4,
                                                       "variant": "reference", "ms_min": 5.0, "ms_median": 5.1,
                                                       "speedup_vs_reference": 1.0}]))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "report", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "report.md").read_text()
    assert "`pixel_shuffle`: measured ('compiled', 'triton')" in md and "| rcan | float32 | reference |" in md
    assert json.loads((tmp_path / "report.json").read_text())["models"][0]["model"] == "rcan"
