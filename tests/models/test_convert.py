"""Checkpoint converters: synthetic files in each upstream layout and container, round trips, bad files.

Upstream files are made by renaming our own keys into the upstream names listed in docs/architectures.md and
saving them in the upstream container (raw state_dict, Lornatang ``.pth.tar`` dict, BasicSR ``params``/``params_ema``, ...).
The optional peer test builds super-image's own ``RcanModel`` (skipped when super-image is not installed).
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from srkernels.models import build, load_pretrained, save_pretrained
from srkernels.models.convert import CheckpointError, read_checkpoint
from srkernels.reference.upsample import DIV2K_RGB_MEAN

SMALL_RCAN = dict(n_resgroups=2, n_resblocks=3, n_feats=16, reduction=4)


def same_output(a, b, x, exact=False):
    a.eval(), b.eval()
    with torch.no_grad():
        ya, yb = a(x), b(x)
    if exact:
        return torch.equal(ya, yb)
    return torch.allclose(ya, yb, rtol=1e-5, atol=1e-5 * max(1.0, ya.abs().max().item()))


def rename(sd, rules):
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            if re.fullmatch(pat, k):
                k = re.sub(pat, rep, k)
                break
        out[k] = v.clone()
    return out


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


# ------------------------------------------------------------------------------------- upstream layouts


def to_upstream_rcan(model, names: dict, upsample: list) -> dict:
    """Our RCAN's state dict in an upstream layout, less the MeanShift convs (upstream keeps the mean as a
    constant). ``names``: each part's upstream prefix (regex groups: residual group, then block; ``{nb}``:
    blocks per group); ``upsample``: the rules for ``tail.0``."""
    ng, nb = model.config["n_resgroups"], model.config["n_resblocks"]
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("sub_mean", "add_mean"))}
    rcab, du = names["rcab"], names["rcab"] + ".3." + names["du"]
    return rename(sd, [
        (r"head\.0\.(\w+)", names["head"] + r".\1"),
        (r"body\.(\d+)\.body\.(\d+)\.body\.([02])\.(\w+)", rcab + r".\3.\4"),
        (r"body\.(\d+)\.body\.(\d+)\.body\.3\.conv_du\.0\.(\w+)", du + r".1.\3"),
        (r"body\.(\d+)\.body\.(\d+)\.body\.3\.conv_du\.2\.(\w+)", du + r".3.\3"),
        (rf"body\.(\d+)\.body\.{nb}\.(\w+)", names["group_conv"].format(nb=nb) + r".\2"),
        (rf"body\.{ng}\.(\w+)", names["body_conv"] + r".\1"),
        *upsample,
        (r"tail\.1\.(\w+)", names["last"] + r".\1"),
    ])


def to_lornatang_rcan(model):
    sd = to_upstream_rcan(model, dict(
        head="conv1", rcab=r"trunk.\1.residual_group.\2.residual_channel_attention_block", du="channel_attention_layer",
        group_conv=r"trunk.\1.residual_group.{nb}", body_conv="conv2", last="conv3",
    ), [(rf"tail\.0\.{2 * i}\.(\w+)", rf"upsampling.{i}.upsample_block.0.\1") for i in range(3)])
    sd["mean"] = torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1)
    return sd


def to_basicsr_rcan(model):
    return to_upstream_rcan(model, dict(
        head="conv_first", rcab=r"body.\1.residual_group.\2.rcab", du="attention", group_conv=r"body.\1.conv",
        body_conv="conv_after_body", last="conv_last",
    ), [(r"tail\.0\.(\d+)\.(\w+)", r"upsample.\1.\2")])


def to_yjn870_rdn(model):
    last = 4 if model.scale == 4 else 2
    return rename(model.state_dict(), [
        (r"SFENet([12])\.(\w+)", r"sfe\1.\2"),
        (r"RDBs\.(\d+)\.convs\.(\d+)\.conv\.0\.(\w+)", r"rdbs.\1.layers.\2.conv.\3"),
        (r"RDBs\.(\d+)\.LFF\.(\w+)", r"rdbs.\1.lff.\2"),
        (r"GFF\.(\d)\.(\w+)", r"gff.\1.\2"),
        (rf"UPNet\.{last}\.(\w+)", r"output.\1"),
        (r"UPNet\.(\d)\.(\w+)", r"upscale.\1.\2"),
    ])


def lornatang_container(sd):
    return {"epoch": 7, "best_psnr": 30.5, "best_ssim": 0.87, "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.99), "params": [0, 1]}]}}


# -------------------------------------------------------------------------------------------- RCAN


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_official_rcan_raw_state_dict(tmp_path, scale):
    src = randomise(build("rcan", scale, fused=False, **SMALL_RCAN))
    path = tmp_path / f"RCAN_BIX{scale}.pt"
    torch.save(src.state_dict(), path)
    m = load_pretrained("rcan", path, scale, fused=False)
    assert m.meanshift == "official_255" and m.input_range == 255.0 and not m.training
    assert m.config == src.config
    assert same_output(src, m, torch.rand(1, 3, 5, 6) * 255, exact=True)


def test_official_rcan_published_config(tmp_path):
    src = build("rcan", 4, fused=False)
    path = tmp_path / "RCAN_BIX4.pt"
    torch.save(src.state_dict(), path)
    sd, _ = read_checkpoint(path)
    assert len(sd) == 1634
    m = load_pretrained("rcan", path, 4, fused=False)
    assert m.config == src.config
    assert same_output(src, m, torch.rand(1, 3, 8, 8) * 255, exact=True)


def test_dataparallel_prefix_is_removed(tmp_path):
    src = randomise(build("rcan", 2, fused=False, **SMALL_RCAN))
    path = tmp_path / "dp.pt"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)
    assert same_output(src, load_pretrained("rcan", path, 2, source="official", fused=False), torch.rand(1, 3, 4, 4))


def test_loaded_meanshift_values_come_from_the_file(tmp_path):
    src = build("rcan", 2, fused=False, **SMALL_RCAN)
    with torch.no_grad():  # trained MeanShift drifts away from its init (docs/architectures.md §4.4)
        src.sub_mean.bias.add_(3.0)
        src.add_mean.weight.mul_(1.1)
    path = tmp_path / "drift.pt"
    torch.save(src.state_dict(), path)
    m = load_pretrained("rcan", path, 2, fused=False)
    assert torch.equal(m.sub_mean.bias, src.sub_mean.bias) and torch.equal(m.add_mean.weight, src.add_mean.weight)


@pytest.mark.parametrize("bam", [False, True])
def test_super_image_layout(tmp_path, bam):
    src = randomise(build("rcan", 3, fused=False, bam=bam, meanshift="rgb255_on_unit", **SMALL_RCAN))
    path = tmp_path / "pytorch_model_3x.pt"
    torch.save(src.state_dict(), path)
    m = load_pretrained("rcan", path, 3, fused=False)  # auto: super-image by file name
    assert m.meanshift == "rgb255_on_unit" and m.input_range == 1.0 and m.bam is bam
    assert same_output(src, m, torch.rand(1, 3, 5, 5))


def test_bam_repo_layout_skips_meanshift(tmp_path):
    src = randomise(build("rcan", 4, fused=False, bam=True, meanshift="none", **SMALL_RCAN))
    path = tmp_path / "rcan_bam.pth"
    torch.save(src.state_dict(), path)
    m = load_pretrained("rcan", path, 4, source="bam", fused=False)
    assert m.meanshift == "none" and m.bam
    assert same_output(src, m, torch.rand(1, 3, 4, 4))
    # the same file read as super-image applies the 255 MeanShift: a different network
    other = load_pretrained("rcan", path, 4, source="super_image", fused=False)
    assert not same_output(src, other, torch.rand(1, 3, 4, 4))


@pytest.mark.parametrize("scale", [2, 3, 8])
def test_lornatang_rcan(tmp_path, scale):
    src = randomise(build("rcan", scale, fused=False, meanshift="unit", **SMALL_RCAN))
    with torch.no_grad():  # Lornatang's mean is a fixed buffer: x - mean ... + mean
        src.sub_mean.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        src.add_mean.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        src.sub_mean.bias.copy_(-torch.tensor(DIV2K_RGB_MEAN))
        src.add_mean.bias.copy_(torch.tensor(DIV2K_RGB_MEAN))
    sd = to_lornatang_rcan(src)
    ckpt = lornatang_container(sd)
    ckpt["ema_state_dict"] = {**{"module." + k: v * 0 for k, v in sd.items()}, "n_averaged": torch.tensor(5)}
    path = tmp_path / f"RCAN_x{scale}-DIV2K.pth.tar"
    torch.save(ckpt, path)
    m = load_pretrained("rcan", path, scale, fused=False)
    assert m.meanshift == "unit" and m.input_range == 1.0
    x = torch.rand(1, 3, 5, 5)
    assert same_output(src, m, x)
    ema = load_pretrained("rcan", path, scale, fused=False, state_key="ema_state_dict")
    assert not any(p.abs().sum() for k, p in ema.named_parameters() if not k.startswith(("sub_", "add_")))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_basicsr_rcan_is_the_official_network_on_unit_range(tmp_path, scale):
    official = build("rcan", scale, fused=False, **SMALL_RCAN)
    fresh_meanshift = {k: v.clone() for k, v in official.state_dict().items() if k.startswith(("sub_", "add_"))}
    randomise(official).load_state_dict(fresh_meanshift, strict=False)  # BasicSR's mean is not trainable
    sd = {"module." + k: v for k, v in to_basicsr_rcan(official).items()}
    path = tmp_path / "net_g_latest.pth"
    torch.save({"params": sd}, path)
    m = load_pretrained("rcan", path, scale, fused=False)
    assert m.input_range == 1.0
    x = torch.rand(1, 3, 5, 4)
    with torch.no_grad():  # BasicSR: (x - mean) * 255 -> net -> / 255 + mean
        assert torch.allclose(m(x), official(x * 255) / 255, atol=2e-5)


def test_basicsr_prefers_params_ema(tmp_path):
    a, b = (build("rcan", 2, fused=False, **SMALL_RCAN) for _ in range(2))
    for net, seed in ((a, 1), (b, 2)):  # perturb everything but the (fixed, in BasicSR) MeanShift
        with torch.no_grad():
            for k, p in net.named_parameters():
                if not k.startswith(("sub_", "add_")):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    path = tmp_path / "net_g.pth"
    torch.save({"params": to_basicsr_rcan(a), "params_ema": to_basicsr_rcan(b)}, path)
    x = torch.rand(1, 3, 4, 4)
    ema = load_pretrained("rcan", path, 2, fused=False)
    plain = load_pretrained("rcan", path, 2, fused=False, state_key="params")
    with torch.no_grad():
        assert torch.allclose(ema(x), b(x * 255) / 255, atol=2e-5)
        assert torch.allclose(plain(x), a(x * 255) / 255, atol=2e-5)


# ------------------------------------------------------------------------------------- other archs


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_rdn_official_and_yjn870(tmp_path, scale):
    src = randomise(build("rdn", scale, fused=False, num_features=16, num_blocks=3, num_layers=2, growth=16))
    torch.save(src.state_dict(), tmp_path / "rdn.pt")
    m = load_pretrained("rdn", tmp_path / "rdn.pt", scale, fused=False)
    assert m.input_range == 255.0 and same_output(src, m, torch.rand(1, 3, 4, 5), exact=True)
    torch.save(to_yjn870_rdn(src), tmp_path / "rdn_x.pth")
    y = load_pretrained("rdn", tmp_path / "rdn_x.pth", scale, fused=False)
    assert y.input_range == 1.0 and same_output(src, y, torch.rand(1, 3, 4, 5), exact=True)


def test_rdn_config_a_is_recognised(tmp_path):
    with torch.device("meta"):
        src = build("rdn", 2, fused=False, config="A")
    sd = {k: torch.zeros(v.shape) for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "rdn_a.pt")
    assert load_pretrained("rdn", tmp_path / "rdn_a.pt", 2, fused=False).config["config"] == "A"


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_srcnn_lornatang(tmp_path, padding):
    src = randomise(build("srcnn", 3, fused=False, kernel_sizes=(9, 1, 5)))
    path = tmp_path / "srcnn_x3-T91.pth.tar"
    torch.save(lornatang_container(src.state_dict()), path)
    m = load_pretrained("srcnn", path, 3, fused=False, padding=padding)
    assert m.config["kernel_sizes"] == [9, 1, 5]
    if padding == "same":
        assert same_output(src, m, torch.rand(1, 1, 20, 20), exact=True)
    else:
        assert m(torch.rand(1, 1, 20, 20)).shape == (1, 1, 8, 8)


@pytest.mark.parametrize("scale, kernel", [(4, None), (3, None), (2, 3)])
def test_srdensenet_lornatang(tmp_path, scale, kernel):
    cfg = dict(num_features=32, num_blocks=2, num_layers=3, growth=8, bottleneck=16, deconv_kernel=kernel)
    src = randomise(build("srdensenet", scale, fused=False, **cfg))
    path = tmp_path / "SRDenseNet.pth.tar"
    torch.save(lornatang_container(src.state_dict()), path)
    m = load_pretrained("srdensenet", path, scale, fused=False)
    assert m.config == src.config
    assert same_output(src, m, torch.rand(1, 1, 4, 5), exact=True)


@pytest.mark.parametrize("scale, cfg", [
    (2, dict(num_recursions=3)),
    (3, dict(num_blocks=2, num_recursions=2, b_squared=True)),
    (4, dict(variant="split", num_recursions=2)),
    (3, dict(variant="fd_irb", num_recursions=3)),
])
def test_heejowoo(tmp_path, scale, cfg):
    small = dict(num_features=16, growth=16, num_layers=3) if cfg.get("variant") != "split" else {}
    src = randomise(build("rdcab", scale, fused=False, **small, **cfg))
    path = tmp_path / "best.pth"
    torch.save(src.state_dict(), path)
    m = load_pretrained("rdcab", path, scale, fused=False)  # variant, U, B and b_squared from the file
    assert m.config == src.config
    assert same_output(src, m, torch.rand(1, 3, 4, 4), exact=True)


# --------------------------------------------------------------------------------- srkernels format


@pytest.mark.parametrize("name, scale, cfg", [
    ("srcnn", 2, dict(padding="valid")),
    ("rcan", 4, dict(bam=True, meanshift="rgb255_on_unit", **SMALL_RCAN)),
    ("rdn", 3, dict(num_features=16, num_blocks=2, num_layers=2, growth=8, rgb_range=1)),
    ("rdcab", 4, dict(variant="fd_irb", num_features=16, growth=16, num_layers=3, num_recursions=2)),
    ("srdensenet", 8, dict(num_features=16, num_blocks=2, num_layers=2, growth=8, bottleneck=8, deconv_kernel=4)),
])
def test_save_pretrained_round_trip(tmp_path, name, scale, cfg):
    src = randomise(build(name, scale, fused=False, **cfg))
    path = save_pretrained(src, tmp_path / "sub" / "model.safetensors")
    info = json.loads((tmp_path / "sub" / "model.json").read_text())
    assert info["arch"] == src.arch and info["scale"] == scale and info["config"] == src.config
    m = load_pretrained(None, path, fused=False)
    assert type(m) is type(src) and m.config == src.config and m.input_range == src.input_range
    x = torch.rand(1, src.in_channels, 20, 20)
    assert same_output(src, m, x, exact=True)
    assert type(load_pretrained(name, path, scale, fused=False)) is type(src)
    with pytest.raises(ValueError, match="scale"):
        load_pretrained(name, path, scale + 1, fused=False)
    other = "rdn" if name != "rdn" else "rcan"
    with pytest.raises(ValueError, match="arch"):
        load_pretrained(other, path, fused=False)
    with pytest.raises(ValueError, match="source"):
        load_pretrained(None, path, source="official", fused=False)


def test_config_from_sidecar_json_when_metadata_is_absent(tmp_path):
    from safetensors.torch import save_file

    src = randomise(build("rdcab", 2, fused=False, num_features=16, growth=16, num_layers=2, num_recursions=2))
    save_pretrained(src, tmp_path / "a.safetensors")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "b.safetensors"))
    (tmp_path / "b.json").write_text((tmp_path / "a.json").read_text())
    assert same_output(src, load_pretrained(None, tmp_path / "b.safetensors", fused=False), torch.rand(1, 3, 4, 4))


def test_foreign_safetensors_needs_arch_and_scale(tmp_path):
    from safetensors.torch import save_file

    src = randomise(build("rdcab", 2, fused=False, num_features=16, growth=16, num_layers=2, num_recursions=3))
    path = tmp_path / "x2.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    (tmp_path / "x2.json").write_text('{"model_type": "something else"}')  # another tool's sidecar: ignored
    with pytest.raises(ValueError, match="arch"):
        load_pretrained(None, path)
    with pytest.raises(ValueError, match="scale"):
        load_pretrained("rdcab", path)
    with pytest.raises(CheckpointError, match="no srkernels config"):
        load_pretrained("rdcab", path, 2, source="srkernels")
    assert same_output(src, load_pretrained("rdcab", path, 2, fused=False), torch.rand(1, 3, 4, 4))


def test_save_pretrained_checks(tmp_path):
    m = build("srcnn", 2, fused=False)
    with pytest.raises(TypeError, match="model"):
        save_pretrained(torch.nn.Conv2d(1, 1, 1), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        save_pretrained(m, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="path"):
        save_pretrained(m, 3)


# ------------------------------------------------------------------------------------------- errors


@pytest.fixture
def srcnn_file(tmp_path):
    path = tmp_path / "srcnn.pth"
    torch.save(build("srcnn", 2, fused=False).state_dict(), path)
    return path


def test_truncated_torch_file(tmp_path, srcnn_file):
    data = srcnn_file.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_pretrained("srcnn", bad, 2, fused=False)


def test_garbage_file(tmp_path):
    bad = tmp_path / "junk.pth"
    for data in (b"definitely not a checkpoint", bytes(range(7, 200, 3)), b""):
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match="cannot read"):
            load_pretrained("srcnn", bad, 2, fused=False)


def test_truncated_safetensors(tmp_path):
    path = save_pretrained(build("srcnn", 2, fused=False), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_pretrained(None, path, fused=False)
    path.write_bytes(b"\xff" * 4)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_pretrained(None, path, fused=False)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_refuses_arbitrary_pickles(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_pretrained("srcnn", path, 2, fused=False)
    assert "must never run" not in capsys.readouterr().out


def test_strict_error_lists_every_mismatch(tmp_path, srcnn_file):
    sd = torch.load(srcnn_file, weights_only=True)
    del sd["map.0.bias"]
    sd["extra.weight"] = torch.zeros(2)
    sd["reconstruction.weight"] = torch.zeros(1, 32, 3, 3)
    torch.save(sd, srcnn_file)
    with pytest.raises(CheckpointError) as e:
        load_pretrained("srcnn", srcnn_file, 2, fused=False, kernel_sizes=(9, 5, 5))
    msg = str(e.value)
    assert "1 missing key(s):\n    map.0.bias" in msg
    assert "1 unexpected key(s):\n    extra.weight" in msg
    assert "reconstruction.weight: checkpoint (1, 32, 3, 3) vs model (1, 32, 5, 5)" in msg


def test_wrong_architecture_is_reported(tmp_path):
    src = build("rcan", 2, fused=False, **SMALL_RCAN)
    torch.save(src.state_dict(), tmp_path / "rcan.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrained("rdn", tmp_path / "rcan.pt", 2, fused=False)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_pretrained("rcan", tmp_path / "rcan.pt", 3, fused=False)  # x2 tail in an x3 model


def test_container_errors(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"epoch": 3, "notes": "x"}, path)
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_pretrained("srcnn", path, 2, fused=False)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="dict of tensors"):
        load_pretrained("srcnn", path, 2, fused=False)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_pretrained("srcnn", path, 2, fused=False)
    torch.save({"state_dict": {"a": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="'params'"):
        load_pretrained("srcnn", path, 2, fused=False, state_key="params")
    torch.save({"a.weight": torch.zeros(1), "module.a.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="twice"):
        load_pretrained("srcnn", path, 2, fused=False)


def test_argument_errors(tmp_path, srcnn_file):
    with pytest.raises(FileNotFoundError):
        load_pretrained("srcnn", tmp_path / "missing.pth", 2)
    with pytest.raises(CheckpointError, match="directory"):
        load_pretrained("srcnn", tmp_path, 2)
    with pytest.raises(TypeError, match="path"):
        load_pretrained("srcnn", 42, 2)
    with pytest.raises(ValueError, match="source must be"):
        load_pretrained("srcnn", srcnn_file, 2, source="hub")
    with pytest.raises(ValueError, match="not a known layout"):
        load_pretrained("srcnn", srcnn_file, 2, source="basicsr")
    with pytest.raises(ValueError, match="unknown model"):
        load_pretrained("vdsr", srcnn_file, 2)
    with pytest.raises(ValueError, match="scale"):
        load_pretrained("srcnn", srcnn_file, None)
    with pytest.raises(ValueError, match="arch"):
        load_pretrained(None, srcnn_file, 2)


# ----------------------------------------------------------------------------- super-image peer parity


@pytest.mark.parametrize("bam", [False, True], ids=["rcan", "rcan-bam"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_super_image_peer_parity(tmp_path, scale, bam):
    si = pytest.importorskip("super_image")
    torch.manual_seed(scale)
    # the published depth once per attention type (x4, the released rcan-bam scale); shallower elsewhere
    depth = {} if scale == 4 else dict(n_resgroups=2, n_resblocks=3)
    peer = si.RcanModel(si.RcanConfig(scale=scale, bam=bam, **depth)).eval()
    with torch.no_grad():  # MeanShift is trainable upstream: make sure its stored values are the ones used
        for ms in (peer.sub_mean, peer.add_mean):
            ms.weight.mul_(1 + 0.05 * torch.rand(ms.weight.shape))
            ms.bias.add_(torch.randn(ms.bias.shape))
    peer.save_pretrained(str(tmp_path))
    path = tmp_path / f"pytorch_model_{scale}x.pt"
    m = load_pretrained("rcan", path, scale, fused=False)
    assert m.bam is bam and m.meanshift == "rgb255_on_unit" and m.input_range == 1.0
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        want, got = peer(x.clone()), m(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))


# ---------------------------------------------------------------------------- untrusted metadata (issue 16)


def _with_meta(tmp_path, meta: dict, name="evil.safetensors"):
    from safetensors.torch import save_file

    src = build("srcnn", 2, fused=False)
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path),
              metadata={"format": "pt", "srkernels": json.dumps(meta)})
    return path


@pytest.mark.parametrize("meta, field", [
    ({"arch": "rdn", "scale": 2, "config": {"num_features": 30000, "num_blocks": 2, "num_layers": 2,
                                             "growth": 8}}, "num_features"),
    ({"arch": "srcnn", "scale": 2, "config": "notadict"}, "config"),
    ({"arch": "srcnn", "scale": 2, "config": {}, "format_version": "1"}, "format_version"),
    ({"arch": "srcnn", "scale": "2", "config": {}}, "scale"),
    ({"arch": 5, "scale": 2, "config": {}}, "arch"),
    ({"arch": "srcnn", "scale": 2, "config": {"bogus": 1}}, "config.bogus"),
    ({"arch": "srcnn", "scale": 2, "config": {"channels": [64, 10 ** 9]}}, "config.channels"),
    ({"arch": "srcnn", "scale": 2, "config": {"channels": [64, 33]}}, "config.channels"),
])
def test_untrusted_metadata_is_checked_before_building(tmp_path, meta, field):
    # before the fix: a 32 GB allocation for the first case, TypeErrors for the next ones
    path = _with_meta(tmp_path, meta)
    with pytest.raises(CheckpointError, match=re.escape(field)):
        load_pretrained(None, path)


def test_untrusted_metadata_matching_tensors_is_compared(tmp_path):
    from safetensors.torch import save_file

    src = build("rdn", 2, fused=False, num_features=16, num_blocks=2, num_layers=2, growth=8)
    meta = {"arch": "rdn", "scale": 2, "config": {**src.config, "num_blocks": 3}}
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path),
              metadata={"format": "pt", "srkernels": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="config.num_blocks"):
        load_pretrained(None, path)


def test_max_params_limit(tmp_path):
    path = save_pretrained(build("srcnn", 2, fused=False), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="max_params"):
        load_pretrained(None, path, fused=False, max_params=1000)
    assert load_pretrained(None, path, fused=False) is not None


def test_save_pretrained_refuses_to_overwrite(tmp_path):
    a, b = build("srcnn", 2, fused=False), randomise(build("srcnn", 2, fused=False))
    path = save_pretrained(a, tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(b, path)
    assert path.read_bytes() == before
    save_pretrained(b, path, overwrite=True)
    assert same_output(b, load_pretrained(None, path, fused=False), torch.rand(1, 1, 8, 8), exact=True)
    assert not [q.name for q in tmp_path.iterdir() if q.name.startswith(".")]  # no temp files left


def test_save_pretrained_never_touches_an_unrelated_sidecar(tmp_path):
    foreign = '{"model_type": "another tool"}'
    (tmp_path / "m.json").write_text(foreign)
    m = randomise(build("srcnn", 2, fused=False))
    with pytest.warns(UserWarning, match="not an srkernels sidecar"):
        path = save_pretrained(m, tmp_path / "m.safetensors")
    assert (tmp_path / "m.json").read_text() == foreign
    assert same_output(m, load_pretrained(None, path, fused=False), torch.rand(1, 1, 8, 8), exact=True)
    with pytest.warns(UserWarning), pytest.raises(FileExistsError):
        save_pretrained(m, path)
    with pytest.warns(UserWarning):
        save_pretrained(m, path, overwrite=True)
    assert (tmp_path / "m.json").read_text() == foreign


@pytest.mark.parametrize("wording", [
    "Unsupported global: GLOBAL builtins.print was not an allowed global by default.",
    "unsupported GLOBAL builtins.print was not an allowed global by default.",  # torch 2.14
    "UNSUPPORTED   GLOBAL builtins.print",
])
def test_refusal_is_recognised_whatever_the_torch_wording(tmp_path, monkeypatch, wording):
    import pickle

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1)}, path)

    def refuse(*a, **k):
        raise pickle.UnpicklingError(
            "Weights only load failed. This file can still be loaded ...\n"
            f"Please file an issue with the following so that we can make `weights_only=True` compatible with "
            f"your use case: WeightsUnpickler error: {wording}\n\nCheck the documentation of torch.load ...")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(CheckpointError, match="refusing to unpickle") as e:
        load_pretrained("srcnn", path, 2, fused=False)
    assert "corrupt" not in str(e.value)
