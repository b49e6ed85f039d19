"""CMakeLists.txt's decisions, checked by configuring (not building) it: CUDA archs and versions, CPU
capabilities. A fake nvcc (a wrapper that reports another CUDA version) stands in for other toolkits."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit) to configure a CUDA build")
cmake_mod = pytest.importorskip("cmake", reason="the build's cmake (PyPI) is not installed")
ninja_mod = pytest.importorskip("ninja", reason="the build's ninja (PyPI) is not installed")


def configure(tmp_path: Path, cuda: str = "0", archs: str | None = None, cuda_home: str | None = None,
              caps: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME")}
    if archs is not None:
        env["TORCH_CUDA_ARCH_LIST"] = archs
    if cuda_home is not None:
        env["CUDA_HOME"] = cuda_home
    cmd = [str(Path(cmake_mod.CMAKE_BIN_DIR) / "cmake"), "-S", str(ROOT), "-B", str(tmp_path / "b"), "-G", "Ninja",
           f"-DCMAKE_MAKE_PROGRAM={Path(ninja_mod.BIN_DIR) / 'ninja'}",
           f"-DPython_EXECUTABLE={sys.executable}", f"-DSRKERNELS_CUDA={cuda}"]
    if caps is not None:
        cmd.append(f"-DSRKERNELS_CPU_CAPABILITIES={caps}")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def summary(r: subprocess.CompletedProcess) -> str:
    m = re.search(r"srkernels: CUDA=(\w+) archs='([^']*)' cpu capabilities='([^']*)'", r.stdout)
    assert m, r.stdout + r.stderr
    return m.groups()


def fake_nvcc(tmp_path: Path, release: str) -> str:
    """A CUDA_HOME whose nvcc says it is `release` but compiles with the real one."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = --version ] && '
                    f'{{ echo "Cuda compilation tools, release {release}, V{release}.0"; exit 0; }}; done\n'
                    f'exec {NVCC} "$@"\n')
    nvcc.chmod(0o755)
    return str(home)


@needs_nvcc
def test_default_arch_list_configures(tmp_path):
    r = configure(tmp_path, cuda="1", cuda_home=str(Path(NVCC).parents[1]))
    assert r.returncode == 0, r.stderr
    on, archs, _ = summary(r)
    assert on == "ON" and archs == "7.5 8.0 8.6 8.9 9.0 10.0 12.0+PTX"
    # the list reaches the compiler as one definition (a ';' list would split into broken -D flags)
    ninja = (tmp_path / "b" / "build.ninja").read_text()
    assert 'SRKERNELS_CUDA_ARCHS="\\"7.5 8.0 8.6 8.9 9.0 10.0 12.0+PTX\\""' in ninja
    assert "-D10.0" not in ninja


@needs_nvcc
def test_archs_nvcc_cannot_build(tmp_path):
    home = str(Path(NVCC).parents[1])
    r = configure(tmp_path, cuda="auto", archs="5.0;9.0", cuda_home=home)
    assert r.returncode == 0, r.stderr
    assert "dropping CUDA arch 5.0" in r.stdout and summary(r)[:2] == ("ON", "9.0")
    r = configure(tmp_path / "strict", cuda="1", archs="5.0;9.0", cuda_home=home)
    assert r.returncode != 0 and "cannot compile arch 5.0" in r.stderr


@needs_nvcc
def test_nvcc_torch_cuda_major_mismatch(tmp_path):
    import torch

    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch")
    other = "12.8" if not torch.version.cuda.startswith("12.") else "13.0"
    home = fake_nvcc(tmp_path, other)
    r = configure(tmp_path, cuda="auto", cuda_home=home)
    assert r.returncode == 0, r.stderr
    assert summary(r)[0] == "OFF" and f"nvcc is CUDA {other} but torch was built with CUDA" in r.stdout
    r = configure(tmp_path / "strict", cuda="1", cuda_home=home)
    assert r.returncode != 0 and f"nvcc is CUDA {other}" in r.stderr


def test_cpu_capabilities(tmp_path):
    r = configure(tmp_path)
    assert r.returncode == 0, r.stderr
    x86 = os.uname().machine in ("x86_64", "AMD64")
    assert summary(r)[2] == ("default avx2 avx512" if x86 else "default")
    if x86:  # narrowing keeps default, and the lowest-first order the link relies on
        r = configure(tmp_path / "narrow", caps="avx512")
        assert r.returncode == 0, r.stderr
        assert summary(r)[2] == "default avx512"
    r = configure(tmp_path / "bad", caps="sse9")
    assert r.returncode != 0 and "'sse9' is not one of" in r.stderr
