"""Fused dense blocks in CPU inference keep their weights in the kernel's layout (``ops.dense_block.cpu_layout``)
cached on the module (issue 13): same bits as passing the parameters, no weight copy per call, and the cache
follows the weights (in-place edits, load_state_dict, new Parameter objects, dtype) and training."""
import pytest
import torch
from torch import nn

from srkernels.nn import dense as D
from srkernels.ops.dense_block import cpu_layout

torch.manual_seed(0)


def _blocks():
    return {
        "rdb": (lambda: D.ResidualDenseBlock(8, 4, 3), 8),
        "rdcab": (lambda: D.RDCAB(8, 4, 3, reduction=4), 8),
        "srdense": (lambda: D.SRDenseBlock(8, 4, 3), 8),
        "split": (lambda: D.SplitBlock(16, 3, reduction=4), 16),
        "fdirb": (lambda: D.FDIRB(8, 3, sub_channels=4, reduction=4), 8),
    }


def _uncached(m, x):
    """The block's forward with the cache bypassed (as in training: the parameters go straight to the op)."""
    m.__dict__.pop("_srk_dense_cache", None)
    with torch.enable_grad():
        for p in m.parameters():
            p.requires_grad_(True)
        y = m(x).detach()
        assert "_srk_dense_cache" not in m.__dict__
    return y


@pytest.fixture(params=list(_blocks()))
def block(request):
    """(a fused dense block in eval mode, its input channels, the constructor), one of each kind."""
    make, c = _blocks()[request.param]
    return make().eval(), c, make


@pytest.mark.parametrize("cl", [False, True])
def test_cached_weights_give_the_same_bits(block, cl):
    m, c, _ = block
    x = torch.randn(2, c, 7, 6)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    want = _uncached(m, x)
    with torch.no_grad():
        got1, got2 = m(x), m(x)
    assert "_srk_dense_cache" in m.__dict__
    assert torch.equal(got1, want) and torch.equal(got2, want)


def test_no_weight_copy_per_call(block):
    m, c, _ = block
    x = torch.randn(1, c, 6, 6)
    with torch.no_grad():
        m(x)
        with torch.profiler.profile() as prof:
            m(x)
    names = [e.key for e in prof.key_averages()]
    assert "aten::clone" not in names, names  # the kernel's permute().contiguous() of each weight was a clone


def test_cache_follows_the_weights(block):
    m, c, make = block
    x = torch.randn(1, c, 5, 5)
    with torch.no_grad():
        m(x)
        # in-place edit (optimizer step, copy_)
        for p in m.parameters():
            p.mul_(1.5)
    want = _uncached(m, x)
    with torch.no_grad():
        assert torch.equal(m(x), want)
    # load_state_dict from another block
    other = make()
    m.load_state_dict(other.state_dict())
    want = _uncached(m, x)
    with torch.no_grad():
        m(x)
        assert torch.equal(m(x), want)
    # a new Parameter object for every weight
    with torch.no_grad():
        m(x)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            mod.weight = nn.Parameter(torch.randn_like(mod.weight))
    want = _uncached(m, x)
    with torch.no_grad():
        assert torch.equal(m(x), want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cache_follows_dtype(dtype):
    m = D.ResidualDenseBlock(8, 4, 3).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        m(x)
        m.to(dtype)
        y = m(x.to(dtype))
    assert y.dtype == dtype
    assert torch.equal(y, _uncached(m, x.to(dtype)))


def test_training_gets_gradients_on_the_parameters():
    m = D.ResidualDenseBlock(8, 4, 3)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        m(x)  # fills the cache
    m(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_cpu_layout_keeps_values_and_shapes():
    ws = [torch.randn(4, 8, 3, 3), torch.randn(4, 12, 3, 3)]
    fw = torch.randn(8, 16, 1, 1)
    pws, pfw = cpu_layout(ws, fw)
    for w, p in zip(ws, pws):
        assert p.shape == w.shape and torch.equal(p, w) and p.permute(2, 3, 1, 0).is_contiguous()
    assert pfw.shape == (8, 16) and torch.equal(pfw, fw.flatten(1)) and pfw.t().is_contiguous()


@pytest.mark.parametrize("name, cfg", [("rcan", dict(n_resgroups=1, n_resblocks=1, n_feats=16, reduction=4)),
                                       ("rdn", dict(num_features=16, num_blocks=2, num_layers=2, growth=8)),
                                       ("srdensenet", dict(num_features=16, num_blocks=2, num_layers=2, growth=8,
                                                           bottleneck=16))])
def test_used_model_can_be_copied_and_pickled(name, cfg):
    """After inference filled the caches (oneDNN-packed weights have no storage), ``copy.deepcopy`` and
    ``pickle`` of the model work, and the copy computes the same output (it rebuilds its own caches)."""
    import copy
    import io
    import warnings

    from srkernels.models import build

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = build(name, 2, fused=True, **cfg).eval()
    x = torch.rand(1, m.in_channels, 8, 8) * m.input_range
    with torch.no_grad():
        y = m(x)
        c = copy.deepcopy(m)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        p = torch.load(buf, weights_only=False)
        assert torch.equal(c(x), y) and torch.equal(p(x), y)
