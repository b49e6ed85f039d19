"""Training through ``srkernels.nn.conv2d`` on CPU (issue 13): a conv Winograd serves runs the ``conv2d_pointwise``
op's autograd (Winograd forward and input gradient, ATen weight gradient); every gradient against float64 and
the eager layer; inference keeps its prepacked path; Winograd off (either variable at 0) falls back to the reference."""
import copy

import pytest
import torch
from torch import nn

from srkernels.benchmark import saved_bytes
from srkernels.nn import Conv2d
from srkernels.nn import conv as conv_mod

from .._winograd import TRAIN_ENVS, count_winograd, needs_winograd, winograd_env  # noqa: F401 (fixtures)
from ..conftest import assert_close

pytestmark = needs_winograd


def _conv(cin=16, cout=24, act="relu", seed=0):
    torch.manual_seed(seed)
    c = Conv2d(cin, cout, 3, padding=1, activation=act)
    with torch.no_grad():
        c.bias.add_(0.1 * torch.randn_like(c.bias))
    return c


def _eager(c, x, residual):
    y = nn.functional.conv2d(x, c.weight, c.bias, padding=1)
    y = torch.relu(y) if c.activation == "relu" else y
    return y if residual is None else y + residual


@pytest.mark.parametrize("env, tile", TRAIN_ENVS, ids=str)
@pytest.mark.parametrize("act, residual", [("relu", False), (None, True), ("relu", True)])
def test_gradients_match_float64(winograd_env, count_winograd, env, tile, act, residual):
    winograd_env(*env)
    c = _conv(act=act)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 9, 11, generator=g, requires_grad=True)
    r = torch.randn(2, 24, 9, 11, generator=g, requires_grad=True) if residual else None
    y = c(x, r)
    gy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, [x, c.weight, c.bias] + ([r] if residual else []), gy)
    cd = copy.deepcopy(c).double()
    xd = x.detach().double().requires_grad_(True)
    rd = r.detach().double().requires_grad_(True) if residual else None
    yd = _eager(cd, xd, rd)
    want = torch.autograd.grad(yd, [xd, cd.weight, cd.bias] + ([rd] if residual else []), gy.double())
    assert_close(y, yd, torch.float32, "output")
    for name, a, e in zip(["x", "weight", "bias", "residual"], grads, want):
        assert_close(a, e, torch.float32, f"grad {name}")
    on = tile != 0
    assert count_winograd["grad_input"] == on and count_winograd["run"] >= on
    assert count_winograd["run_tiles"] == ({tile} if on else set())
    assert count_winograd["grad_tiles"] == ({4} if on else set())
    if on:  # the kernel's layout (as the packed inference path): models restore the caller's at their end
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_saves_what_the_eager_layer_saves():
    c = _conv()
    x = torch.randn(2, 16, 9, 11, requires_grad=True)

    class Eager(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = c

        def forward(self, x):
            return _eager(self.c, x, None)
    # x (channels_last copy, the op's input), the ReLU output as its mask
    assert saved_bytes(c, x) == saved_bytes(Eager(), x)


def test_inference_and_non_winograd_calls_keep_their_paths(monkeypatch, count_winograd):
    calls = []
    orig = conv_mod._train_conv2d
    monkeypatch.setattr(conv_mod, "_train_conv2d", lambda *a: calls.append(1) or orig(*a))
    c = _conv()
    x = torch.randn(1, 16, 9, 11)
    with torch.no_grad():
        c(x)
    assert calls == [] and "_srk_packed" in c.__dict__  # the prepacked inference path
    small = _conv(cin=8, cout=8)  # < 16 channels: not Winograd's; training runs the reference
    xs = torch.randn(1, 8, 9, 11, requires_grad=True)
    small(xs).sum().backward()
    assert calls == [1] and count_winograd["grad_input"] == 0
