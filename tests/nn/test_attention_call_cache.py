"""The attention layers' checked-call cache (srkernels/nn/attention.py ``_checked_call``): a layer runs its op's
front-end checks once per input shape and parameter state, then calls the dispatcher op with the kept
arguments. The cache must never change a result, hide bad input, or outlive a parameter change."""
import pytest
import torch

import srkernels
from srkernels import nn as snn
from srkernels.nn import attention as att
from srkernels.reference import attention as R

from ..conftest import assert_close, cpu_backends

pytestmark = pytest.mark.skipif("compiled" not in cpu_backends("channel_attention"),
                                reason="the compiled extension is not built")

LAYERS = {
    "ca": (lambda: snn.ChannelAttention(20, 4), lambda: R.ChannelAttention(20, 4), "ca_checked_args"),
    "bam": (lambda: snn.BalancedAttention(20, 4), lambda: R.BalancedAttention(20, 4), "bam_checked_args"),
}


def _pair(kind, seed=0):
    make, make_ref, _ = LAYERS[kind]
    torch.manual_seed(seed)
    fused = make().eval()
    ref = make_ref().eval()
    ref.load_state_dict(fused.state_dict())
    return fused, ref


@pytest.fixture
def checks(monkeypatch):
    """Counts of the ops' front-end checks run by the layers (per kind)."""
    counts = {kind: 0 for kind in LAYERS}
    for kind, (_, _, name) in LAYERS.items():
        orig = getattr(att, name)

        def counted(*a, _orig=orig, _kind=kind, **k):
            counts[_kind] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(att, name, counted)
    return counts


def _ref_out(ref, x, residual):
    y = ref(x)
    return y if residual is None else y + residual


@pytest.mark.parametrize("kind", list(LAYERS))
def test_checks_run_once_per_shape_and_results_match(kind, checks):
    fused, ref = _pair(kind)
    x = torch.randn(2, 20, 7, 9)
    r = torch.randn(2, 20, 7, 9)
    with torch.no_grad():
        for i in range(3):
            assert_close(fused(x, residual=r), _ref_out(ref, x, r), torch.float32, f"call {i}")
        assert checks[kind] == 1
        # a new x of the same shape reuses the checks; the values are its own
        x2 = torch.randn(2, 20, 7, 9)
        assert_close(fused(x2, residual=r), _ref_out(ref, x2, r), torch.float32, "new values")
        assert checks[kind] == 1
        # another shape, no residual, channels_last, a non-contiguous view: checked again where the key differs
        for xi, ri in ((torch.randn(1, 20, 5, 4), None),
                       (torch.randn(2, 20, 7, 9).contiguous(memory_format=torch.channels_last), r),
                       (torch.randn(2, 20, 7, 18)[..., ::2], r)):
            assert_close(fused(xi, residual=ri), _ref_out(ref, xi, ri), torch.float32, f"{tuple(xi.shape)}")
        assert checks[kind] == 3  # the strided view has the first call's shape: no check of its own


@pytest.mark.parametrize("kind", list(LAYERS))
def test_parameter_change_is_seen(kind, checks):
    fused, ref = _pair(kind)
    x = torch.randn(1, 20, 6, 6)
    with torch.no_grad():
        before = fused(x)
        p = next(fused.parameters())
        p.mul_(-1.5)  # in place: same tensor, new version
        ref.load_state_dict(fused.state_dict())
        after = fused(x)
        assert_close(after, ref(x), torch.float32, "after an in-place update")
        assert not torch.equal(before, after)
        assert checks[kind] == 2
        # a parameter replaced by a new tensor (same version number, new identity and storage)
        p_name = next(n for n, _ in fused.named_parameters())
        mod_name, _, attr = p_name.rpartition(".")
        setattr(fused.get_submodule(mod_name), attr, torch.nn.Parameter(torch.randn_like(p)))
        ref.load_state_dict(fused.state_dict())
        assert_close(fused(x), ref(x), torch.float32, "after a replaced parameter")
        assert checks[kind] == 3


@pytest.mark.parametrize("kind", list(LAYERS))
def test_bad_input_after_a_good_call_still_raises(kind):
    fused, _ = _pair(kind)
    with torch.no_grad():
        fused(torch.randn(1, 20, 6, 6))
        with pytest.raises(ValueError, match="x must be 4-D"):
            fused(torch.randn(20, 6, 6))
        with pytest.raises(ValueError, match="w1|channels|C"):
            fused(torch.randn(1, 19, 6, 6))
        with pytest.raises(TypeError, match="dtype|float64|float32"):
            fused(torch.randn(1, 20, 6, 6, dtype=torch.float64))
        with pytest.raises(ValueError, match="residual"):
            fused(torch.randn(1, 20, 6, 6), residual=torch.randn(1, 20, 6, 5))
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            fused([1.0])
        with pytest.raises(TypeError, match="residual"):
            fused(torch.randn(1, 20, 6, 6), residual=[1.0])


@pytest.mark.parametrize("kind", list(LAYERS))
def test_not_used_under_autocast_or_the_reference_backend(kind, checks):
    fused, ref = _pair(kind)
    x = torch.randn(1, 20, 6, 6)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fused(x)
        assert y.dtype == torch.bfloat16
        with srkernels.use_backend("reference"):
            assert_close(fused(x), ref(x), torch.float32, "reference backend")
    assert checks[kind] == 0


@pytest.mark.parametrize("kind", list(LAYERS))
def test_inference_mode_then_no_grad(kind, checks):
    fused, ref = _pair(kind)
    x = torch.randn(1, 20, 6, 6)
    with torch.inference_mode():
        y1 = fused(x)
    with torch.no_grad():  # the kept arguments are normal tensors: usable outside inference_mode
        y2 = fused(x)
    assert torch.equal(y1, y2)
    assert checks[kind] == 1


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradients_after_an_inference_call(kind, checks):
    fused, ref = _pair(kind)
    x = torch.randn(1, 20, 5, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.no_grad():
        fused(x.detach())  # fills the cache
    fused(x).square().sum().backward()  # grad mode: the full path, with autograd to the parameters
    ref(x_ref).square().sum().backward()
    assert checks[kind] == 1
    assert_close(x.grad, x_ref.grad, torch.float32, "grad x")
    for (n, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad {n}")


def test_parametrized_weights_are_followed():
    """A fused RCAB whose conv and attention FC weights are parametrized (weight_norm: no `weight` in
    `_parameters`) matches the reference before and after the parametrization changes: the inference hot paths
    of `nn.conv2d` and the attention layers read such weights through the attribute."""
    from torch.nn.utils import parametrizations as P
    torch.manual_seed(0)
    fused, ref = snn.RCAB(16, reduction=4).eval(), R.RCAB(16, reduction=4).eval()
    ref.load_state_dict(fused.state_dict())
    for m in (fused, ref):
        P.weight_norm(m.body[0])
        P.weight_norm(m.body[3].conv_du[0])
    x = torch.randn(1, 16, 9, 8)
    with torch.no_grad():
        for step in range(3):
            fused(x)  # a repeated call: the cached (hot) path
            assert_close(fused(x), ref(x), torch.float32, f"step {step}")
            for m in (fused, ref):
                m.body[0].parametrizations.weight.original0.mul_(1.5)
                m.body[3].conv_du[0].parametrizations.weight.original0.mul_(-2.0)
