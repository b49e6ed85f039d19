"""An extension compiled against one torch, imported under another (issue 17): one clear error at
``import srkernels``, naming both versions and the rebuild command, raised BEFORE srkernels._C is loaded
(loading it under another torch fails with undefined symbols, or loads and misbehaves).

The other torch is faked: a copy of the installed package whose recorded build version
(``srkernels/_build_config.py``, written by the build next to _C) is changed, imported in a subprocess."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import srkernels
from srkernels import _backend

compiled = pytest.mark.skipif(_backend._C is None, reason="the extension is not built")
REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _copy_package(tmp_path: Path) -> Path:
    src = Path(srkernels.__file__).resolve().parent
    dst = tmp_path / "site" / "srkernels"

    def link_binaries(a, b):  # the .py files are copied, the (large, with CUDA) extension is linked
        return os.symlink(a, b) if a.endswith(".so") else shutil.copy2(a, b)

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "weights"), copy_function=link_binaries)
    return dst


def _import_copy(site: Path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("SRKERNELS_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], cwd=site, env=env, capture_output=True, text=True,
                          timeout=300)


IMPORT_AND_REPORT = """
import sys
try:
    import srkernels
except ImportError as e:
    assert type(e).__name__ == "TorchMismatchError", repr(e)
    assert "srkernels._C" not in sys.modules, "_C was loaded before the check"
    print("ERROR:", e)
    sys.exit(3)
print("IMPORTED", srkernels.__file__)
"""


@compiled
def test_build_records_the_torch_it_was_compiled_against():
    info = srkernels.build_info()
    assert info["torch_built"] == torch.__version__
    assert info["cxx11_abi"] == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    recorded = _backend.build_config()
    assert recorded == {"torch_version": torch.__version__, "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI)}


@compiled
@pytest.mark.parametrize("fake", ["other_version", "other_local_tag", "other_abi"])
def test_other_torch_is_one_clear_error(tmp_path, fake):
    pkg = _copy_package(tmp_path)
    running = torch.__version__
    release = running.split("+")[0]
    abi = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    built, built_abi = {
        "other_version": ("2.12.0" + running[len(release):], abi),  # e.g. 2.12.0+cu130
        "other_local_tag": (release + ("+cu999" if "+cpu" in running else "+cpu"), abi),
        "other_abi": (running, not abi),
    }[fake]
    (pkg / "_build_config.py").write_text(f'TORCH_VERSION = "{built}"\nCXX11_ABI = {built_abi}\n')
    r = _import_copy(pkg.parent, IMPORT_AND_REPORT)
    assert r.returncode == 3, r.stdout + r.stderr
    msg = r.stdout
    assert f"built against torch {built}" in msg and f"runs torch {running}" in msg, msg
    assert REBUILD in msg and "scripts/setup.sh" in msg, msg
    if fake == "other_abi":
        assert f"_GLIBCXX_USE_CXX11_ABI={int(built_abi)}" in msg and f"_GLIBCXX_USE_CXX11_ABI={int(abi)}" in msg


@compiled
def test_same_torch_imports(tmp_path):
    pkg = _copy_package(tmp_path)
    r = _import_copy(pkg.parent, IMPORT_AND_REPORT + "\nassert srkernels.build_info()['compiled']\n")
    assert r.returncode == 0 and "IMPORTED " + str(pkg) in r.stdout, r.stdout + r.stderr


@compiled
def test_missing_record_falls_back_to_the_modules_own(tmp_path):
    """Without _build_config.py (an .so copied alone), _C's build_info() is checked right after loading."""
    pkg = _copy_package(tmp_path)
    (pkg / "_build_config.py").unlink()
    r = _import_copy(pkg.parent, "import srkernels; assert srkernels.build_info()['compiled']")
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_torch_rule(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    abi = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    _backend.check_torch("2.13.0+cpu", abi)  # equal: fine
    for other in ("2.13.1+cpu", "2.14.1+cpu", "2.13.0+cu130", "2.13.0"):
        with pytest.raises(_backend.TorchMismatchError, match=r"built against torch .* runs torch 2\.13\.0\+cpu"):
            _backend.check_torch(other, abi)
    with pytest.raises(_backend.TorchMismatchError, match="_GLIBCXX_USE_CXX11_ABI"):
        _backend.check_torch("2.13.0+cpu", not abi)
