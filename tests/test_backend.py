import pytest
import torch

import srkernels
from srkernels import _backend, ops, use_backend


def test_build_info_reports_backends():
    info = srkernels.build_info()
    for key in ("version", "torch", "compiled", "cpu_capabilities", "cpu_capability", "cuda", "cuda_archs", "triton", "ops"):
        assert key in info
    for op in ops.OPS:
        assert info["ops"][op]["cpu"][-1] == "reference"


def test_forced_reference_matches_default():
    x = torch.randn(2, 8, 5, 5)
    w1, w2 = torch.randn(2, 8), torch.randn(8, 2)
    with use_backend("reference"):
        ref = ops.channel_attention(x, w1, None, w2, None)
    torch.testing.assert_close(ops.channel_attention(x, w1, None, w2, None), ref)


def test_env_var_forces_and_fails_loudly(monkeypatch):
    monkeypatch.setenv("SRKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SRKERNELS_BACKEND must be one of"):
        _backend.choose("channel_attention", "cpu")
    monkeypatch.setenv("SRKERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run channel_attention on cpu"):
        _backend.choose("channel_attention", "cpu")


def test_use_backend_rejects_unknown():
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("fast"):
            pass


def test_unloadable_extension_warns_with_the_reason():
    """A built _C that fails to load (missing libcudart, ABI mismatch) is reported once at import, not
    silently replaced by the reference."""
    import subprocess
    import sys

    code = """
import importlib, warnings
real = importlib.import_module
def fail_C(name, *a, **k):
    if name == "srkernels._C":
        raise ImportError("libcudart.so.13: cannot open shared object file")
    return real(name, *a, **k)
importlib.import_module = fail_C
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import srkernels
msgs = [str(w.message) for w in caught if "srkernels._C failed to load" in str(w.message)]
assert len(msgs) == 1 and "libcudart.so.13" in msgs[0], [str(w.message) for w in caught]
info = srkernels.build_info()
assert not info["compiled"] and "libcudart.so.13" in info["compiled_error"]
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
