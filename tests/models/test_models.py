"""Model zoo: parameter counts and keys against docs/architectures.md, scale checks, forward semantics, fused parity.

Counts and key lists are checked on the meta device (no memory, no init cost); forwards use tiny inputs and,
except where a published configuration is the point, shrunken depths.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from srkernels import reference as R
from srkernels.benchmark import saved_bytes
from srkernels.models import ALIASES, MODELS, RCAN, build, chop, resolve


def meta(name, scale, **cfg):
    with torch.device("meta"):
        return build(name, scale, fused=False, **cfg)


def nparams(m, skip=()):
    return sum(p.numel() for k, p in m.named_parameters() if not k.startswith(skip))


def shapes(m):
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


# ------------------------------------------------------------------ counts (docs/architectures.md)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (dict(kernel_sizes=(9, 1, 5)), 8_129),
        (dict(kernel_sizes=(9, 3, 5)), 24_513),
        (dict(), 57_281),
        (dict(channels=(128, 64)), 216_961),
        (dict(in_channels=3), 69_251),
    ],
)
def test_srcnn_params(cfg, expected):
    assert nparams(meta("srcnn", 2, **cfg)) == expected


@pytest.mark.parametrize("scale, expected, nkeys", [(2, 1_741_825, 136), (3, 2_069_505, 136), (4, 2_004_225, 138),
                                                    (8, 2_266_625, 140)])
def test_srdensenet_params(scale, expected, nkeys):
    m = meta("srdensenet", scale)
    assert nparams(m) == expected
    assert len(m.state_dict()) == nkeys


def test_srdensenet_x4_breakdown_and_keys():
    m = meta("srdensenet", 4)
    s = shapes(m)
    assert s["conv1.0.weight"] == (128, 1, 3, 3)
    assert s["dcb8.0.conv1.weight"] == (16, 1024, 3, 3)
    for k in range(2, 9):
        assert s[f"dcb3.0.conv{k}.weight"] == (16, 16 * (k - 1), 3, 3)
    assert s["conv2.weight"] == (256, 1152, 1, 1)
    assert s["upsampling.1.upsample_block.0.weight"] == (256, 256, 2, 2)
    assert s["conv3.weight"] == (1, 256, 3, 3)
    assert nparams(m.conv1) == 1_280
    assert sum(nparams(getattr(m, f"dcb{b}")) for b in range(1, 9)) == 1_180_672
    assert nparams(m.conv2) == 295_168
    assert nparams(m.upsampling) == 2 * 262_400
    assert nparams(m.conv3) == 2_305


RCAN_COUNTS = {2: (15_444_643, 1632), 3: (15_629_283, 1632), 4: (15_592_355, 1634), 8: (15_740_067, 1636)}


@pytest.mark.parametrize("bam", [False, True], ids=["ca", "bam"])
@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_rcan_params_and_key_counts(scale, bam):
    m = meta("rcan", scale, bam=bam)
    without, nkeys = RCAN_COUNTS[scale]
    if bam:
        without -= 3_000  # 200 blocks x (580 CALayer - 565 BAM)
    assert nparams(m, skip=("sub_mean", "add_mean")) == without
    assert nparams(m) == without + 24  # the two trainable 3x3 + 3 MeanShift convs
    assert len(m.state_dict()) == nkeys


def test_rcan_bam_x4_published_count():
    assert nparams(meta("rcan_bam", 4)) == 15_589_379


def test_rcan_official_keys():
    m = meta("rcan", 4)
    keys = list(m.state_dict())
    assert keys[:6] == ["sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias",
                        "head.0.weight", "head.0.bias"]
    s = shapes(m)
    assert s["sub_mean.weight"] == (3, 3, 1, 1)
    assert s["body.9.body.19.body.0.weight"] == (64, 64, 3, 3)
    assert s["body.0.body.0.body.3.conv_du.0.weight"] == (4, 64, 1, 1)
    assert s["body.0.body.0.body.3.conv_du.2.bias"] == (64,)
    assert s["body.3.body.20.weight"] == (64, 64, 3, 3)
    assert s["body.10.weight"] == (64, 64, 3, 3)
    assert s["tail.0.0.weight"] == s["tail.0.2.weight"] == (256, 64, 3, 3)
    assert s["tail.1.weight"] == (3, 64, 3, 3)
    assert "tail.0.4.weight" not in s
    assert shapes(meta("rcan", 3))["tail.0.0.weight"] == (576, 64, 3, 3)
    assert shapes(meta("rcan", 8))["tail.0.4.weight"] == (256, 64, 3, 3)


def test_rcan_bam_keys():
    s = shapes(meta("rcan", 4, bam=True))
    p = "body.5.body.7.body.3."
    assert s[p + "ca.fc1.weight"] == (4, 64, 1, 1)
    assert s[p + "ca.relu1.weight"] == (4,)
    assert s[p + "ca.fc2.weight"] == (64, 4, 1, 1)
    assert s[p + "sa.conv1.weight"] == (1, 1, 7, 7)
    assert not any("conv_du" in k for k in s)


RDN_B = {2: 22_123_395, 3: 22_308_035, 4: 22_271_107}


def rdn_param_formula(scale, d, c, g, g0=64, n_colors=3):
    """Parameter count of the EDSR-PyTorch topology, from the layer list in docs/architectures.md §6.1
    (independent of the code)."""
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731
    total = conv(n_colors, g0, 3) + conv(g0, g0, 3)
    rdb = sum(conv(g0 + i * g, g, 3) for i in range(c)) + conv(g0 + c * g, g0, 1)
    total += d * rdb + conv(d * g0, g0, 1) + conv(g0, g0, 3)
    if scale == 4:
        total += conv(g0, 4 * g, 3) + conv(g, 4 * g, 3)
    else:
        total += conv(g0, g * scale * scale, 3)
    return total + conv(g, n_colors, 3)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_rdn_params(scale):
    assert nparams(meta("rdn", scale)) == RDN_B[scale] == rdn_param_formula(scale, 16, 8, 64)
    assert nparams(meta("rdn", scale, config="A")) == rdn_param_formula(scale, 20, 6, 32)


def test_rdn_a_x2_count():
    assert nparams(meta("rdn", 2, config="A")) == 5_541_795  # by hand from the EDSR layer list


def test_rdn_keys():
    s = shapes(meta("rdn", 4))
    assert s["SFENet1.weight"] == (64, 3, 3, 3)
    assert s["RDBs.15.convs.7.conv.0.weight"] == (64, 64 + 7 * 64, 3, 3)
    assert s["RDBs.0.LFF.weight"] == (64, 64 + 8 * 64, 1, 1)
    assert s["GFF.0.weight"] == (64, 16 * 64, 1, 1)
    assert s["GFF.1.weight"] == (64, 64, 3, 3)
    assert s["UPNet.0.weight"] == s["UPNet.2.weight"] == (256, 64, 3, 3)
    assert s["UPNet.4.weight"] == (3, 64, 3, 3)
    s2 = shapes(meta("rdn", 3))
    assert s2["UPNet.0.weight"] == (576, 64, 3, 3) and s2["UPNet.2.weight"] == (3, 64, 3, 3)


@pytest.mark.parametrize(
    "scale, cfg, expected",
    [
        (2, {}, 1_668_647),
        (3, {}, 1_853_287),
        (4, {}, 2_111_783),
        (4, dict(num_recursions=3), 2_087_207),
        (4, dict(num_blocks=2), 3_555_275),
        (4, dict(num_blocks=3), 4_998_767),
        (4, dict(variant="split"), 1_218_677),
        (4, dict(variant="split", num_recursions=3), 1_194_101),
        (2, dict(variant="fd_irb"), 1_511_812),
        (3, dict(variant="fd_irb"), 1_696_452),
        (4, dict(variant="fd_irb"), 1_659_524),
        (4, dict(variant="fd_irb", num_recursions=3), 1_634_948),
    ],
)
def test_rdcab_params(scale, cfg, expected):
    assert nparams(meta("rdcab", scale, **cfg)) == expected


def test_rdcab_ipiu_keys():
    s = shapes(meta("rdcab", 4))
    p = "recursive_SR.0.rdcabs."
    assert s["sfe1.weight"] == (64, 3, 3, 3)
    for c in range(8):
        assert s[f"{p}layers.{c}.conv.weight"] == (64, 64 + 64 * c, 3, 3)
    assert s[p + "conv_du.0.weight"] == (36, 576, 1, 1)
    assert s[p + "conv_du.2.weight"] == (576, 36, 1, 1)
    assert s[p + "lff.weight"] == (64, 576, 1, 1)
    assert s["gff.0.weight"] == (64, 576, 1, 1)
    assert s["upscale.0.weight"] == (1024, 64, 3, 3)
    assert s["output.weight"] == (3, 64, 3, 3)
    assert "upscale.2.weight" not in s
    assert shapes(meta("rdcab", 4, num_recursions=3))["gff.0.weight"] == (64, 192, 1, 1)


def test_rdcab_split_keys():
    s = shapes(meta("rdcab", 4, variant="split"))
    p = "recursive_SR.0.rdbs."
    assert [s[f"{p}layer{k}.0.weight"][1] for k in range(1, 9)] == [64, 112, 160, 208, 256, 304, 352, 400]
    assert s[p + "lff.weight"] == (64, 128, 1, 1)
    assert s[p + "conv_du.0.weight"] == (4, 64, 1, 1)
    assert s["upscale1.weight"] == (48, 64, 3, 3)
    assert s["upscale1_scale.scale"] == (1,)


def test_rdcab_fd_irb_keys():
    s = shapes(meta("rdcab", 4, variant="fd_irb", num_recursions=3))
    p = "recursive_SR.0.rdbs."
    assert s[p + "layer8.weight"] == (32, 512, 3, 3)
    assert s[p + "layer3.weight"] == (64, 192, 3, 3)
    assert s[p + "layer7_sub.weight"] == (32, 64, 1, 1)
    assert p + "layer8_sub.weight" not in s
    assert s[p + "lff.weight"] == (64, 256, 1, 1)
    assert s["upscale.2.weight"] == (256, 64, 3, 3)
    assert s["middle_pointwise.weight"] == (32, 64, 1, 1)
    assert s["convIRB_4.0.weight"] == (32, 32, 3, 3) and "convIRB_4.0.bias" not in s
    assert s["convIRB.0.weight"] == (3, 32, 3, 3)
    assert s["gff.0.weight"] == (64, 192, 1, 1)


# ------------------------------------------------------------------------------------ argument checks


@pytest.mark.parametrize(
    "name, scale, cfg",
    [
        ("srcnn", 1, {}), ("srcnn", 2.0, {}), ("srdensenet", 5, {}), ("srdensenet", 6, {}), ("rcan", 5, {}),
        ("rcan", 6, {}), ("rcan", 1, {}), ("rcan", True, {}), ("rdn", 8, {}), ("rdn", 1, {}),
        ("rdcab", 8, {}), ("rdcab", 2, dict(variant="split")), ("rdcab", 3, dict(variant="split")),
        ("rdcab", 8, dict(variant="fd_irb")), ("rdcab", "4", {}),
    ],
)
def test_unsupported_scale(name, scale, cfg):
    with pytest.raises(ValueError, match="scale"):
        meta(name, scale, **cfg)


@pytest.mark.parametrize(
    "name, cfg, exc, word",
    [
        ("rcan", dict(meanshift="bogus"), ValueError, "meanshift"),
        ("rcan", dict(bam=1), TypeError, "bam"),
        ("rcan", dict(n_resgroups=0), ValueError, "n_resgroups"),
        ("rdn", dict(config="C"), ValueError, "config"),
        ("rdcab", dict(variant="dense"), ValueError, "variant"),
        ("rdcab", dict(variant="fd_irb", growth=32), ValueError, "growth"),
        ("rdcab", dict(num_recursions=0), ValueError, "num_recursions"),
        ("rdcab", dict(variant="fd_irb", num_blocks=2, b_squared=True), ValueError, "b_squared"),
        ("srcnn", dict(padding="full"), ValueError, "padding"),
        ("srcnn", dict(kernel_sizes=(9, 4, 5)), ValueError, "kernel_sizes"),
        ("srdensenet", dict(growth=-1), ValueError, "growth"),
    ],
)
def test_bad_config(name, cfg, exc, word):
    with pytest.raises(exc, match=word):
        meta(name, 4 if name != "srcnn" else 2, **cfg)


def test_fused_must_be_bool():
    with pytest.raises(TypeError, match="fused"):
        build("srcnn", 2, fused="yes")


def test_registry():
    assert set(MODELS) == {"srcnn", "srdensenet", "rcan", "rdn", "rdcab"}
    assert resolve("RCAN-BAM") == (RCAN, {"bam": True})
    for alias, (base, _) in ALIASES.items():
        assert resolve(alias)[0] is MODELS[base]
    with pytest.raises(ValueError, match="unknown model"):
        resolve("edsr")
    with pytest.raises(TypeError, match="name"):
        resolve(3)
    with pytest.raises(ValueError, match="bam"):
        build("rcan_bam", 4, bam=False)
    assert meta("rdcab_fd_irb", 4).variant == "fd_irb"


@pytest.mark.parametrize("name, scale, cfg", [
    ("srcnn", 3, dict(padding="valid")), ("srdensenet", 3, dict(deconv_kernel=3)),
    ("rcan", 8, dict(bam=True, meanshift="none", n_resgroups=3)), ("rdn", 2, dict(config="A")),
    ("rdcab", 4, dict(variant="split", num_recursions=3)),
])
def test_config_rebuilds_same_architecture(name, scale, cfg):
    m = meta(name, scale, **cfg)
    with torch.device("meta"):
        again = type(m)(scale=m.scale, fused=False, **m.config)
    assert shapes(again) == shapes(m)
    assert again.config == m.config


def test_input_checks():
    m = build("rcan", 2, fused=False, n_resgroups=1, n_resblocks=1, n_feats=16, reduction=4)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="x must be"):
        m([1, 2])
    with pytest.raises(ValueError, match="valid"):
        build("srcnn", 2, fused=False, padding="valid")(torch.rand(1, 1, 16, 16))


# ------------------------------------------------------------------------------------------ forwards


SMALL = {
    "srcnn": dict(),
    "srdensenet": dict(num_features=32, num_blocks=2, num_layers=3, growth=8, bottleneck=16),
    "rcan": dict(n_resgroups=2, n_resblocks=2, n_feats=16, reduction=4),
    "rdn": dict(num_features=16, num_blocks=2, num_layers=3, growth=8),
    "rdcab": dict(num_features=16, growth=16, num_layers=3, num_recursions=2, num_blocks=2),
}


def cases():
    yield "srcnn", 3, {}
    for s in (2, 3, 4, 8):
        yield "srdensenet", s, {}
        yield "rcan", s, {}
        yield "rcan", s, dict(bam=True)
    for s in (2, 3, 4):
        yield "rdn", s, {}
        yield "rdcab", s, {}
        yield "rdcab", s, dict(variant="fd_irb")
    yield "rdcab", 4, dict(variant="split", num_features=64, growth=64)


@pytest.mark.parametrize("name, scale, cfg", list(cases()))
def test_forward_shape_small(name, scale, cfg):
    torch.manual_seed(0)
    m = build(name, scale, fused=False, **{**SMALL[name], **cfg}).eval()
    x = torch.rand(2, m.in_channels, 6, 5)
    x0 = x.clone()
    with torch.no_grad():
        y = m(x)
    out_scale = 1 if name == "srcnn" else scale
    assert y.shape == (2, m.in_channels, 6 * out_scale, 5 * out_scale)
    assert torch.isfinite(y).all()
    assert torch.equal(x, x0), "the input must not be modified (Lornatang's RCAN does it in place)"


@pytest.mark.parametrize("name, scale, cfg", [
    ("rcan", 4, {}), ("rdn", 3, {}), ("rdcab", 4, {}), ("rdcab", 4, dict(variant="split")),
    ("rdcab", 2, dict(variant="fd_irb", num_recursions=3)), ("srdensenet", 4, {}),
])
def test_forward_published_config_tiny_input(name, scale, cfg):
    torch.manual_seed(0)
    m = build(name, scale, fused=False, **cfg).eval()
    with torch.no_grad():
        y = m(torch.rand(1, m.in_channels, 8, 8) * m.input_range)
    assert y.shape == (1, m.in_channels, 8 * scale, 8 * scale) and torch.isfinite(y).all()


def test_backward_runs():
    m = build("rdcab", 4, fused=False, variant="split", num_recursions=2)
    x = torch.rand(1, 3, 5, 5, requires_grad=True)
    m(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert m.upscale1_scale.scale.grad is not None


def test_srcnn_padding_modes():
    for ks, border in (((9, 5, 5), 8), ((9, 1, 5), 6)):
        m = build("srcnn", 2, fused=False, kernel_sizes=ks, padding="valid")
        assert m.border == border
        assert m(torch.rand(1, 1, 20, 21)).shape == (1, 1, 20 - 2 * border, 21 - 2 * border)
    assert build("srcnn", 2, fused=False).border == 0


def test_srcnn_init_is_lornatangs():
    torch.manual_seed(0)
    m = build("srcnn", 2, fused=False)
    assert float(m.reconstruction.weight.detach().std()) == pytest.approx(1e-3, rel=0.15)
    assert float(m.features[0].weight.detach().std()) == pytest.approx((2 / (64 * 81)) ** 0.5, rel=0.1)
    assert not m.features[0].bias.any()


@pytest.mark.parametrize("kernel", [None, 3, 4])
@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_srdensenet_deconv_kernels_upsample_exactly(scale, kernel):
    m = build("srdensenet", scale, fused=False, **SMALL["srdensenet"], deconv_kernel=kernel)
    assert m(torch.rand(1, 1, 5, 7)).shape == (1, 1, 5 * scale, 7 * scale)


def _rcan_small(**cfg):
    return build("rcan", 2, fused=False, **{**SMALL["rcan"], **cfg}).eval()


def test_rcan_meanshift_modes():
    torch.manual_seed(0)
    off = _rcan_small()
    assert off.input_range == 255.0
    assert torch.allclose(off.sub_mean.bias, torch.tensor([-114.444, -111.4605, -103.02]))
    assert torch.allclose(off.add_mean.bias, torch.tensor([114.444, 111.4605, 103.02]))
    assert off.sub_mean.weight.requires_grad and off.add_mean.bias.requires_grad  # trainable, as upstream
    unit = _rcan_small(meanshift="unit")
    assert unit.input_range == 1.0 and torch.allclose(unit.sub_mean.bias, -torch.tensor(R.upsample.DIV2K_RGB_MEAN))
    x = torch.rand(1, 3, 6, 6)
    # rgb255_on_unit is the official network (255 MeanShift) fed [0, 1] data: same maths, other input range
    quirk = _rcan_small(meanshift="rgb255_on_unit")
    quirk.load_state_dict(off.state_dict())
    assert quirk.input_range == 1.0
    with torch.no_grad():
        assert torch.equal(quirk(x), off(x))
    # none: MeanShift kept (keys) but skipped, i.e. identical to an identity MeanShift
    none = _rcan_small(meanshift="none")
    none.load_state_dict(off.state_dict())
    with torch.no_grad():
        for ms in (off.sub_mean, off.add_mean):
            ms.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            ms.bias.zero_()
        assert torch.allclose(none(x), off(x), atol=1e-6)
    assert set(none.state_dict()) == set(off.state_dict())


def test_rcan_meanshift_custom_std():
    ms = R.MeanShift(255, (0.5, 0.5, 0.5), (0.5, 0.25, 1.0), sign=1)
    assert torch.allclose(ms.weight.view(3, 3).diag(), torch.tensor([2.0, 4.0, 1.0]))
    assert torch.allclose(ms.bias, torch.tensor([255.0, 510.0, 127.5]))
    with pytest.raises(ValueError, match="sign"):
        R.MeanShift(sign=0)
    with pytest.raises(ValueError, match="rgb_std"):
        R.MeanShift(rgb_std=(1, 0, 1))
    with pytest.raises(ValueError, match="rgb_range"):
        R.MeanShift(rgb_range=-1)


class _Counter:
    def __init__(self, module):
        self.n = 0
        module.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))


def test_rdcab_recursion_counts_and_b_squared():
    torch.manual_seed(0)
    base = dict(num_features=16, growth=16, num_layers=2, num_recursions=3)
    x = torch.rand(1, 3, 5, 5)
    one = build("rdcab", 2, fused=False, **base)
    sq1 = build("rdcab", 2, fused=False, **base, b_squared=True)
    sq1.load_state_dict(one.state_dict())
    with torch.no_grad():
        assert torch.equal(one(x), sq1(x))  # B = 1: upstream's loop is the same network
    chain = build("rdcab", 2, fused=False, **base, num_blocks=2)
    sq2 = build("rdcab", 2, fused=False, **base, num_blocks=2, b_squared=True)
    sq2.load_state_dict(chain.state_dict())
    counters = [_Counter(b.rdcabs) for b in chain.recursive_SR] + [_Counter(b.rdcabs) for b in sq2.recursive_SR]
    with torch.no_grad():
        assert not torch.allclose(chain(x), sq2(x))
    assert [c.n for c in counters] == [3, 3, 6, 6]  # B*U once chained, B*B*U with upstream's re-run
    _, cat = chain.features(x)
    assert cat.shape[1] == 16 * 3 * 2


def test_rdcab_passes_recursion_input():
    blk = R.RDCAB(8, 8, 2, reduction=4)
    x, r = torch.rand(1, 8, 4, 4), torch.rand(1, 8, 4, 4)
    with torch.no_grad():
        assert torch.allclose(blk(x, r), blk(x) + r)


def test_fdirb_layer1_sub_reads_block_input():
    torch.manual_seed(0)
    blk = R.FDIRB(8, 3, sub_channels=4, reduction=4)
    seen = {}
    blk.layer1_sub.register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0]))
    x = torch.rand(1, 8, 4, 4)
    y = blk(x)
    assert y.shape == x.shape and torch.equal(seen["inp"], x)


def test_dense_blocks_formulas():
    torch.manual_seed(0)
    x = torch.rand(1, 4, 5, 5)
    rdb = R.ResidualDenseBlock(4, 3, 2)
    h = torch.cat((x, F.relu(rdb.convs[0].conv[0](x))), 1)
    h = torch.cat((h, F.relu(rdb.convs[1].conv[0](h))), 1)
    assert torch.allclose(rdb(x), rdb.LFF(h) + x)
    sdb = R.SRDenseBlock(4, growth=3, num_layers=3)
    o1 = F.relu(sdb.conv1(x))
    o2 = F.relu(sdb.conv2(o1))
    o3 = F.relu(sdb.conv3(torch.cat((o1, o2), 1)))
    assert torch.allclose(sdb(x), torch.cat((o1, o2, o3), 1))
    split = R.SplitBlock(8, 2, reduction=4)
    a = split.layer1(x.repeat(1, 2, 1, 1))
    assert split(x.repeat(1, 2, 1, 1)).shape == (1, 8, 5, 5) and a.shape[1] == 8
    assert split.distilled == 2 and split.remaining == 6


def test_upsamplers():
    assert [k for k in R.Upsampler(8, 4).state_dict() if k.endswith("weight")] == ["0.weight", "2.weight",
                                                                                 "4.weight"]
    assert R.Upsampler(3, 4)(torch.rand(1, 4, 2, 3)).shape == (1, 4, 6, 9)
    up = R.PixelShuffleUpsampler(4, 8)
    assert up[0].weight.shape == (128, 8, 3, 3) and up(torch.rand(1, 8, 2, 2)).shape == (1, 8, 8, 8)
    assert R.UPNet(4, 8, 4, 3)(torch.rand(1, 8, 2, 2)).shape == (1, 3, 8, 8)
    for bad in (5, 6, 1, 0):
        with pytest.raises(ValueError, match="scale"):
            R.Upsampler(bad, 4)
    with pytest.raises(ValueError, match="scale"):
        R.UPNet(8, 8, 8)
    with pytest.raises(ValueError, match="kernel_size"):
        R.Upsampler(2, 4, kernel_size=2)


def test_chop_equals_full_forward_for_a_local_op():
    up = lambda t: F.interpolate(t, scale_factor=3, mode="nearest")  # noqa: E731
    x = torch.rand(1, 2, 23, 30)
    assert torch.equal(chop(up, x, 3, shave=4), up(x))
    calls = []
    counted = lambda t: (calls.append(t.shape), up(t))[1]  # noqa: E731
    assert torch.equal(chop(counted, x, 3, shave=2, min_size=100), up(x))  # splits twice
    assert len(calls) == 16
    with pytest.raises(ValueError, match="too small"):
        chop(up, torch.rand(1, 1, 6, 6), 3, shave=10)


def test_rcan_forward_chop_shape():
    m = _rcan_small()
    with torch.no_grad():
        y = m.forward_chop(torch.rand(1, 3, 24, 26) * 255, shave=4)
    assert y.shape == (1, 3, 48, 52)


# ------------------------------------------------------------------------------------ fused parity


@pytest.mark.parametrize("name, scale, cfg", [
    ("srdensenet", 2, {}), ("rcan", 3, {}), ("rcan", 2, dict(bam=True)), ("rdn", 4, {}),
    ("rdcab", 2, {}), ("rdcab", 3, dict(variant="fd_irb")), ("rdcab", 4, dict(variant="split", num_features=64,
                                                                               growth=64)),
])
def test_fused_matches_reference(name, scale, cfg):
    pytest.importorskip("srkernels.nn")
    torch.manual_seed(0)
    ref = build(name, scale, fused=False, **{**SMALL[name], **cfg}).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no compiled kernel" warnings when the extension is not built
        fused = build(name, scale, fused=True, **{**SMALL[name], **cfg}).eval()
        fused.load_state_dict(ref.state_dict())
        assert list(fused.state_dict()) == list(ref.state_dict())
        x = torch.rand(1, ref.in_channels, 6, 6) * ref.input_range
        with torch.no_grad():
            a, b = ref(x), fused(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, a.abs().max().item()))


# ------------------------------------------------------------------- fused SRDenseNet: one dense_block op


def test_srdensenet_network_plan():
    from srkernels.nn.srdensenet import network_plan, upstream_index

    plan = network_plan(128, 16, 8, 8)
    assert (plan.channels, plan.in_channels, plan.kernel_size) == (1152, 128, 3)
    assert (plan.fuse_start, plan.fuse_len) == (0, 1152)  # the bottleneck reads every feature
    assert len(plan.layers) == 64
    for b in range(8):
        base = 128 + 128 * b  # block b+1's slice starts after conv1 and the earlier blocks
        first = plan.layers[8 * b]
        assert (first.in_start, first.in_len, first.out_start, first.out_channels) == (0, base, base, 16)
        for k in range(1, 8):
            lay = plan.layers[8 * b + k]
            assert (lay.in_start, lay.in_len, lay.out_start, lay.relu) == (base, 16 * k, base + 16 * k, True)
    # buffer [X0 (4) | B1 (2) | B2 (2)] vs upstream's X_2 = cat(B2, cat(B1, X0)) = [B2 | B1 | X0]
    assert upstream_index(4, 2, 2).tolist() == [4, 5, 6, 7, 2, 3, 0, 1]
    assert upstream_index(4, 2, 1).tolist() == [2, 3, 4, 5, 0, 1]


def _srdensenet_pair(scale=4, **cfg):
    torch.manual_seed(0)
    ref = build("srdensenet", scale, fused=False, **cfg)
    fused = build("srdensenet", scale, fused=True, **cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("scale, cfg", [
    (4, dict(deconv_kernel=3)), (2, dict(deconv_kernel=4)), (3, dict(in_channels=3)), (8, dict(in_channels=2)),
])
def test_srdensenet_fused_tails_match_reference(scale, cfg):
    """Both fused tails (GEMM stages for kernel == stride, oneDNN otherwise), outputs and every gradient."""
    pytest.importorskip("srkernels._C")
    ref, fused = _srdensenet_pair(scale, **SMALL["srdensenet"], **cfg)
    x = torch.rand(2, ref.in_channels, 7, 5)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fused(xf)
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    fp = dict(fused.named_parameters())
    pairs = [("output", yr.detach(), yf.detach()), ("input grad", xr.grad, xf.grad)]
    pairs += [(k, p.grad, fp[k].grad) for k, p in ref.named_parameters()]
    for what, a, b in pairs:
        assert b is not None and a.shape == b.shape, what
        assert (a - b).abs().max() <= 1e-4 * a.abs().max(), what


def test_srdensenet_fused_is_one_op_without_cat():
    """The published x4 model: the dense part + bottleneck is ONE srkernels::dense_block call, and no aten::cat runs
    in forward or backward (the profiler sees ATen calls made from C++ too)."""
    pytest.importorskip("srkernels._C")
    _, fused = _srdensenet_pair()
    x = torch.rand(1, 1, 8, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as fwd:
        y = fused(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as bwd:
        y.square().mean().backward()
    names = [e.name for e in fwd.events()]
    assert names.count("srkernels::dense_block") == 1
    assert "aten::cat" not in names
    bnames = [e.name for e in bwd.events()]
    assert bnames.count("srkernels::dense_block_backward") == 1
    assert "aten::cat" not in bnames
    assert all(p.grad is not None for p in fused.parameters())


def test_srdensenet_fused_saves_at_most_half_the_activations():
    """Published x4 config at 16x16: bytes saved for backward per sample (batch 2 minus batch 1). The difference
    cancels what does not scale with the input: the fused forward also saves the permuted copies of the blocks'
    first-conv and bottleneck weights and the GEMM-layout deconv weights (~5.5 MB, parameter-sized)."""
    pytest.importorskip("srkernels._C")
    ref, fused = _srdensenet_pair()
    xs = [torch.rand(n, 1, 16, 16) for n in (1, 2)]
    r1, r2 = (saved_bytes(ref, x) for x in xs)
    f1, f2 = (saved_bytes(fused, x) for x in xs)
    assert r2 - r1 > 10 * 2**20  # sanity: the reference keeps every concatenation (~15 MB per 16x16 sample)
    assert f2 - f1 <= 0.5 * (r2 - r1), f"fused {f2 - f1} B vs reference {r2 - r1} B per sample"
    assert f2 < r2


def test_srdensenet_gemm_tail_gradcheck():
    """The fused SRDenseNet's deconv tail (GEMM stages with in-place ReLU masks in backward) in float64."""
    from srkernels.nn.srdensenet import _GemmTail

    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    u, wz = t(6, 3), t(2, 5)
    w1, b1, w2 = t(3, 4 * 4), t(4 * 4), t(4, 9 * 2)  # stage 1: s=2, 4 outputs; stage 2: s=3, 2 outputs, no bias
    torch.autograd.gradcheck(lambda *a: _GemmTail.apply(a[0], a[1], (4, 2), a[2], a[3], a[4], None),
                             (u, wz, w1, b1, w2))


def test_a_missing_fused_twin_is_an_error(monkeypatch):
    # models ask for layers by name: without a fused twin, fused=True must not quietly run the reference layer
    import srkernels.nn as fused_layers
    import srkernels.reference as reference_layers
    from srkernels.models._common import layer

    assert layer(True, "RCAB") is fused_layers.RCAB
    monkeypatch.delattr(fused_layers, "RCAB")
    with pytest.raises(LookupError, match="srkernels.nn has no layer 'RCAB'"):
        layer(True, "RCAB")
    assert layer(False, "RCAB") is reference_layers.RCAB


@pytest.mark.parametrize("name", ["srcnn", "srdensenet", "rcan", "rdn"])
def test_reference_models_trace(name):
    """The reference models trace with torch.jit.trace (what torch.onnx.export(dynamo=False) runs; the
    benchmark exports them for ONNX Runtime): no layout query the tracer cannot record."""
    kw = {"n_resgroups": 1, "n_resblocks": 1} if name == "rcan" else {"num_blocks": 2, "num_layers": 2} if name == "rdn" else {}
    m = build(name, 2, fused=False, **kw).eval()
    x = torch.rand(1, m.in_channels, 12, 10)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, (x,))
        assert torch.equal(traced(x), m(x))
