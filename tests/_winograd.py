"""Test helpers for the Winograd CPU algorithm of ``conv2d_pointwise`` (srkernels/ops/conv2d_pointwise.py)."""
import sys

import pytest

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
