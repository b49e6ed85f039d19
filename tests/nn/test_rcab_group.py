"""``srkernels.nn.attention.rcab_group``: RCAN's residual group as one autograd node in training (issue 13).
Gradients against the per-layer reference (gradcheck in float64; fp32 and bf16 parity), the saved activations
(2 feature maps per RCAB instead of 3) and when the path does not apply."""
import pytest
import torch
from torch import nn

from srkernels import reference as R
from srkernels.benchmark import saved_bytes
from srkernels.nn import RCAB
from srkernels.nn.attention import rcab_group

from .._winograd import TRAIN_ENVS, count_winograd, needs_winograd, winograd_env  # noqa: F401 (fixtures)
from ..conftest import assert_close, cpu_backends

pytestmark = pytest.mark.skipif(not cpu_backends("channel_attention"),
                                reason="needs a compiled channel_attention kernel")


def _group(n=2, c=8, reduction=4, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    blocks = nn.ModuleList(RCAB(c, reduction) for _ in range(n))
    tail = nn.Conv2d(c, c, 3, padding=1)
    with torch.no_grad():  # biases and gates away from their init
        for p in [*blocks.parameters(), *tail.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    return blocks.to(dtype), tail.to(dtype)


def _eager(blocks, tail, x):
    """The same group one reference layer at a time (RCAB's forward as srkernels.reference.RCAB runs it)."""
    h = x
    for b in blocks:
        h = R.RCAB.forward(b, h)
    return tail(h) + x


class _Wrap(nn.Module):
    def __init__(self, blocks, tail, fused):
        super().__init__()
        self.blocks, self.tail, self.fused = blocks, tail, fused

    def forward(self, x):
        return rcab_group(self.blocks, self.tail, x) if self.fused else _eager(self.blocks, self.tail, x)


def test_gradcheck_float64():
    """gradcheck of the input and every parameter (2 blocks of 4 channels)."""
    blocks, tail = _group(n=2, c=4, reduction=2, dtype=torch.float64)
    mods = nn.ModuleDict({"b": blocks, "t": tail})
    names = [n for n, _ in mods.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in mods.parameters()]
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(mods, dict(zip(names, ps))):
            return rcab_group(mods["b"], mods["t"], x)

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_matches_the_layer_by_layer_group(dtype, fmt):
    """Output and every gradient against the same layers run one by one in the same dtype (bf16: both round
    through 3 blocks, so each is compared with the other rather than with float64), and fp32 also against
    float64."""
    blocks, tail = _group(n=3, c=16, reduction=4, dtype=dtype)
    params = [*blocks.parameters(), *tail.parameters()]
    names = ["x"] + [n for n, _ in [*blocks.named_parameters(), *tail.named_parameters()]]
    x = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(1)).to(dtype).contiguous(memory_format=fmt)
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = rcab_group(blocks, tail, xf)
    assert y is not None and y.dtype == dtype
    want = _eager(blocks, tail, xe)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    refs = [(want, torch.autograd.grad(want, [xe, *params], g), dtype)]
    if dtype == torch.float32:
        bd, td = _group(n=3, c=16, reduction=4)
        bd.load_state_dict(blocks.state_dict()), td.load_state_dict(tail.state_dict())
        bd, td = bd.double(), td.double()
        xd = x.double().requires_grad_()
        wd = _eager(bd, td, xd)
        refs.append((wd, torch.autograd.grad(wd, [xd, *bd.parameters(), *td.parameters()], g.double()), dtype))
    got = torch.autograd.grad(y, [xf, *params], g)
    for want_y, want_g, tol_dtype in refs:
        assert_close(y, want_y, tol_dtype, "output")
        for n, a, e in zip(names, got, want_g):
            assert a.shape == e.shape, n
            assert_close(a, e, tol_dtype, f"grad {n}")


def test_saves_two_feature_maps_per_block():
    n, c = 4, 8
    blocks, tail = _group(n=n, c=c, reduction=4)
    x = torch.randn(2, c, 6, 6, requires_grad=True)
    fmap = x.numel() * x.element_size()
    fused, eager = saved_bytes(_Wrap(blocks, tail, True), x), saved_bytes(_Wrap(blocks, tail, False), x)
    assert eager >= (3 * n + 1) * fmap  # input, ReLU output, conv2 output per block; the tail's input
    # the group input, then ReLU output and conv2 output per block, plus the attention's [N, 1, C] fp32 stats
    assert fused == (2 * n + 1) * fmap + n * 2 * c * 4


def test_falls_back_when_it_does_not_apply():
    blocks, tail = _group(n=2)
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    with torch.no_grad():
        assert rcab_group(blocks, tail, x) is None  # inference: the prepacked per-layer path
    frozen = [p for p in [*blocks.parameters(), *tail.parameters()]]
    for p in frozen:
        p.requires_grad_(False)
    assert rcab_group(blocks, tail, x.detach()) is None  # nothing to differentiate
    assert rcab_group(blocks, tail, x) is not None  # input gradient only
    for p in frozen:
        p.requires_grad_(True)
    bam = nn.ModuleList([RCAB(8, 4, attention="bam")])
    assert rcab_group(bam, tail, x) is None
    assert rcab_group(blocks, nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), x) is None


@needs_winograd
@pytest.mark.parametrize("env, tile", TRAIN_ENVS, ids=str)
def test_winograd_convs_match_float64(winograd_env, count_winograd, env, tile):
    """At >= 16 channels and >= 64 pixels every 3x3 conv of the group runs Winograd forward (the training
    tile) and for its input gradient (F(4,3)); off: none, oneDNN. Output and every gradient against float64
    within fp32 TOL."""
    winograd_env(*env)
    n = 3
    blocks, tail = _group(n=n, c=16, reduction=4)
    params = [*blocks.parameters(), *tail.parameters()]
    x = torch.randn(2, 16, 9, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = rcab_group(blocks, tail, x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(y, [x, *params], g)
    bd, td = _group(n=n, c=16, reduction=4)
    bd.load_state_dict(blocks.state_dict()), td.load_state_dict(tail.state_dict())
    bd, td = bd.double(), td.double()
    xd = x.detach().double().requires_grad_()
    yd = _eager(bd, td, xd)
    want = torch.autograd.grad(yd, [xd, *bd.parameters(), *td.parameters()], g.double())
    assert_close(y, yd, torch.float32, "output")
    names = ["x"] + [k for k, _ in [*blocks.named_parameters(), *tail.named_parameters()]]
    for k, a, e in zip(names, got, want):
        assert_close(a, e, torch.float32, f"grad {k}")
    convs = (2 * n + 1) * (tile != 0)
    assert count_winograd == {"run": convs, "grad_input": convs, "run_tiles": {tile} if convs else set(),
                              "grad_tiles": {4} if convs else set()}
