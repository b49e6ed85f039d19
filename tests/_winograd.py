"""Test helpers for the Winograd CPU algorithm of ``conv2d_pointwise`` (srkernels/ops/conv2d_pointwise.py)."""
import os
import subprocess
import sys

import pytest
import torch

import srkernels

conv_op = sys.modules["srkernels.ops.conv2d_pointwise"]  # (srkernels.ops.conv2d_pointwise is the function)

needs_winograd = pytest.mark.skipif(srkernels.build_info().get("cpu_capability") not in ("avx2", "avx512"),
                                    reason="Winograd serves the avx2 and avx512 builds only (winograd_use)")


@pytest.fixture
def count_winograd(monkeypatch):
    """Counts the Winograd algorithm's forward runs and input-gradient convs, and collects the tiles each ran
    ("run_tiles", "grad_tiles"; a dict, updated in place)."""
    calls = {"run": 0, "grad_input": 0, "run_tiles": set(), "grad_tiles": set()}
    for name, tiles in (("run", "run_tiles"), ("grad_input", "grad_tiles")):
        orig = getattr(conv_op.Winograd, name)

        def wrapped(self, *a, _orig=orig, _name=name, _tiles=tiles, **kw):
            calls[_name] += 1
            calls[_tiles].add(self.m)
            return _orig(self, *a, **kw)
        monkeypatch.setattr(conv_op.Winograd, name, wrapped)
    return calls


@pytest.fixture
def winograd_env(monkeypatch):
    """``set_(inference, train=None)``: SRKERNELS_WINOGRAD and (unless None) SRKERNELS_WINOGRAD_TRAIN for one
    test (each read once per process: the caches are cleared before and after)."""
    def clear():
        conv_op.winograd_tile.cache_clear()
        conv_op.winograd_train_tile.cache_clear()

    def set_(value, train=None):
        monkeypatch.setenv("SRKERNELS_WINOGRAD", value)
        if train is None:
            monkeypatch.delenv("SRKERNELS_WINOGRAD_TRAIN", raising=False)
        else:
            monkeypatch.setenv("SRKERNELS_WINOGRAD_TRAIN", train)
        clear()
    yield set_
    monkeypatch.delenv("SRKERNELS_WINOGRAD", raising=False)
    monkeypatch.delenv("SRKERNELS_WINOGRAD_TRAIN", raising=False)
    clear()


# (SRKERNELS_WINOGRAD, SRKERNELS_WINOGRAD_TRAIN) -> the training tile: default F(2,3), F(4,3), off both ways
TRAIN_ENVS = [(("4", None), 2), (("4", "4"), 4), (("0", "4"), 0), (("4", "0"), 0)]


# ---- shared by tests/ops/test_winograd_conv3x3.py and test_winograd_conv5x5.py (the kernels share a core) ----

# (bias, act, residual): every epilogue combination
EPILOGUES = [(False, "none", False), (True, "none", False), (True, "relu", False), (True, "none", True),
             (True, "relu", True), (False, "relu", True)]


def conv_inputs(N, C, K, H, W, k, bias, res, seed=0):
    """float32 x [N, C, H, W], a k x k weight ~ 1 / (k sqrt(C)) (unit-scale outputs), bias and residual (or
    None), from float64 draws."""
    def randn(*shape, seed, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
                * scale).float()
    x = randn(N, C, H, W, seed=seed)
    w = randn(K, C, k, k, seed=seed + 1, scale=1 / (k * C ** 0.5))
    b = randn(K, seed=seed + 2) if bias else None
    r = randn(N, K, H, W, seed=seed + 3) if res else None
    return x, w, b, r


def rel_err(y, ref):
    """max |y - ref| / max(1, max |ref|)."""
    return (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def as_double(t):
    return None if t is None else t.double()


def check_parity(op, reference, conv_reference, x, w, u, b, act, r, tol, fmt):
    """``op(x, u, b, act=, residual=)`` against ``reference`` (float64, same ``u``) and ``conv_reference``
    (float64 F.conv2d on ``w``) within ``tol`` relative, float32, in the expected memory format."""
    y = op(x, u, b, act=act, residual=r)
    N, _, H, W = x.shape
    assert y.dtype == torch.float32 and y.shape == (N, w.shape[0], H, W)
    want_cl = fmt == "channels_last" or (fmt == "strided" and x.is_contiguous(memory_format=torch.channels_last))
    if H * W > 1 and w.shape[0] > 1 and fmt != "strided":
        assert y.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
    same_algo = reference(x.double(), u.double(), as_double(b), act, as_double(r))
    direct = conv_reference(x.double(), w.double(), as_double(b), act, as_double(r))
    assert rel_err(y, same_algo) <= tol, rel_err(y, same_algo)
    assert rel_err(y, direct) <= tol, rel_err(y, direct)


def check_every_capability(script: str, *args: str) -> None:
    """Run ``script`` (argv: capability, *args; prints "ok ..." on success) in one process per compiled
    capability this CPU supports, SRKERNELS_CPU_CAPABILITY set to it, one thread."""
    from srkernels import _backend

    caps = [c for c in srkernels.build_info()["cpu_capabilities"] if c in _backend._C.supported_cpu_capabilities()]
    env = {k: v for k, v in os.environ.items() if k not in ("SRKERNELS_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    procs = {c: subprocess.Popen([sys.executable, "-c", script, c, *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 env={**env, "SRKERNELS_CPU_CAPABILITY": c, "OMP_NUM_THREADS": "1"})
             for c in caps}
    for c, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.startswith("ok"), f"{c}: {err[-2000:]}"


def bad_input_cases(x, u, u_other_c, positions: tuple[slice, str]):
    """(kwargs, exception, message) for a Winograd op called on x [1, 4, 5, 5] with weight_t ``u`` (6 output
    channels): each argument wrong in turn. ``u_other_c``: a weight_t for 3 input channels; ``positions``: a
    slice of u's positions that is wrong, and the error's pattern."""
    return [
        (dict(x=torch.randn(4, 5, 5)), ValueError, "x must be 4-D"),
        (dict(x=x.half()), TypeError, "x must be float32"),
        (dict(x=x.long()), TypeError, "x must be a floating"),
        (dict(weight_t=u.double()), TypeError, "weight_t has dtype"),
        (dict(weight_t=u[0]), ValueError, "weight_t must be 3-D"),
        (dict(weight_t=u[positions[0]]), ValueError, positions[1]),
        (dict(weight_t=u_other_c), ValueError, "weight_t has 3 input channels"),
        (dict(bias=torch.randn(4)), ValueError, "bias must have shape"),
        (dict(act="gelu"), ValueError, "act must be one of"),
        (dict(residual=torch.randn(1, 4, 5, 5)), ValueError, "residual must have shape"),
        (dict(residual=torch.randn(1, 6, 5, 5).double()), TypeError, "residual has dtype"),
    ]


def check_bad_input(op, x, u, kw, exc, match):
    args = dict(x=x, weight_t=u, bias=None, act=None, residual=None) | kw
    x, u = args.pop("x"), args.pop("weight_t")
    with pytest.raises(exc, match=match):
        op(x, u, args.pop("bias"), **args)
