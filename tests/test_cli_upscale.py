"""``srkernels upscale|eval|convert`` end to end on real photographs (scikit-image's bundled ones), the
shipped model (present, loadable, better than bicubic on held-out photographs) and the no-overwrite rule."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from srkernels.cli import main as cli
from srkernels.toolkit.data import imresize, load_image
from srkernels.toolkit import Upscaler, load_model
from srkernels.toolkit.commands import shipped_weights
from srkernels.toolkit.metrics import psnr, ssim
from srkernels.models import build

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def save_png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(np.ascontiguousarray(arr)).save(path)
    return path


@pytest.fixture
def photo(tmp_path):
    """A 40x52 crop of a real photograph (the cat of skimage.data.chelsea)."""
    return save_png(tmp_path / "photo.png", skdata.chelsea()[80:120, 160:212])


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


# ---- the shipped model -------------------------------------------------------------------------------------------


def test_shipped_weights_are_present_small_and_documented():
    shipped = shipped_weights()
    assert set(shipped) == {2, 4}
    readme = (ROOT / "python" / "README.md").read_text()
    for s, path in shipped.items():
        assert path.stat().st_size < 1_000_000  # a few hundred KB
        info = json.loads(path.with_suffix(".json").read_text())
        assert info["arch"] == "rdn" and info["scale"] == s
        m = load_model(path)
        assert m.scale == s and type(m).__name__ == "RDN"
        assert path.name in readme
    assert "python python/train.py python/configs/rdn_small_x2.yaml" in readme


@pytest.mark.parametrize("scale", [2, 4])
def test_shipped_model_beats_bicubic_on_heldout_photographs(scale):
    # held-out photographs (never trained on): crops of astronaut and camera
    crops = [skdata.astronaut()[180:308, 160:288], np.repeat(skdata.camera()[100:228, 200:328, None], 3, axis=2)]
    up = Upscaler(load_model(shipped_weights()[scale], fused=False))
    for hr_np in crops:
        hr_u8 = torch.from_numpy(np.ascontiguousarray(hr_np)).permute(2, 0, 1)
        lr = imresize(hr_u8, 1 / scale).float() / 255  # MATLAB uint8 bicubic, as in training
        hr = hr_u8.float() / 255
        sr, bic = up(lr), imresize(lr, scale).clamp(0, 1)
        assert psnr(sr, hr, crop_border=scale) > psnr(bic, hr, crop_border=scale) + 0.2
        assert ssim(sr, hr, crop_border=scale) > ssim(bic, hr, crop_border=scale)


# ---- upscale ------------------------------------------------------------------------------------------------------


def test_upscale_defaults_to_the_shipped_x4_model(photo, capsys):
    assert cli(["upscale", str(photo)]) == 0  # with the progress bar
    out = photo.with_name("photo_x4.png")
    assert f"-> {out}" in capsys.readouterr().out
    got = read(out)
    assert got.shape == (160, 208, 3) and got.dtype == np.uint8
    want = Upscaler(load_model(shipped_weights()[4]), tile=256)(load_image(photo), out_dtype=torch.uint8)
    assert np.array_equal(got, want.permute(1, 2, 0).numpy())


def test_upscale_never_overwrites_without_flag(photo, tmp_path, capsys):
    dst = tmp_path / "big.png"
    dst.write_bytes(b"the user's file")
    assert cli(["upscale", str(photo), str(dst), "--scale", "2", "--no-progress", "--reference"]) == 2
    err = capsys.readouterr().err
    assert "output exists" in err and "--overwrite" in err
    assert dst.read_bytes() == b"the user's file"
    assert cli(["upscale", str(photo), str(dst), "--scale", "2", "--no-progress", "--reference", "--overwrite"]) == 0
    assert read(dst).shape == (80, 104, 3)
    # the input itself is never replaced, not even with --overwrite
    before = photo.read_bytes()
    assert cli(["upscale", str(photo), str(photo), "-s", "2", "--overwrite", "--no-progress", "--reference"]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert photo.read_bytes() == before
    # no temp files are left next to the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png", "photo.png"]


def test_tiled_upscale_matches_the_whole_image_forward(photo, tmp_path):
    whole, tiles = tmp_path / "whole.png", tmp_path / "tiles.png"
    assert cli(["upscale", str(photo), str(whole), "-s", "2", "--no-tile", "--no-progress", "--reference"]) == 0
    assert cli(["upscale", str(photo), str(tiles), "-s", "2", "--tile", "36", "--overlap", "16", "--no-progress", "--reference"]) == 0
    a, b = read(whole).astype(int), read(tiles).astype(int)
    # the shipped RDN is convolutional (receptive radius < 16 LR px): equal up to rounding at .5 boundaries
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.001
    seams = tmp_path / "seams.png"
    assert cli(["upscale", str(photo), str(seams), "-s", "2", "--tile", "12", "--overlap", "0", "--no-progress", "--reference"]) == 0
    assert np.abs(read(seams).astype(int) - a).max() > 1


def test_upscale_grey_rgba_and_bf16(tmp_path):
    grey = save_png(tmp_path / "grey.png", skdata.camera()[200:230, 220:260])
    assert cli(["upscale", str(grey), "-s", "2", "--no-progress", "--reference"]) == 0
    g = read(tmp_path / "grey_x2.png")
    assert g.shape == (60, 80)
    rgba = np.concatenate([skdata.coffee()[100:130, 300:340], np.full((30, 40, 1), 128, np.uint8)], axis=2)
    src = save_png(tmp_path / "rgba.png", rgba)
    assert cli(["upscale", str(src), "-s", "2", "--no-progress", "--reference"]) == 0
    r = read(tmp_path / "rgba_x2.png")
    assert r.shape == (60, 80, 4) and (r[..., 3] == 128).all()
    assert cli(["upscale", str(src), str(tmp_path / "bf16.png"), "-s", "2", "--dtype", "bfloat16", "--no-progress", "--reference"]) == 0
    diff = np.abs(read(tmp_path / "bf16.png")[..., :3].astype(int) - r[..., :3].astype(int))
    assert diff.mean() < 2 and diff.max() < 40


def test_upscale_folder(tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    save_png(src / "a.png", skdata.astronaut()[:24, :30])
    save_png(src / "b.jpg", skdata.coffee()[:20, :28])
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert cli(["upscale", str(src), "-s", "2", "--no-progress", "--reference"]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "1 of 3 image(s) failed" in err
    out = tmp_path / "photos_x2"
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert read(out / "a.png").shape == (48, 60, 3) and read(out / "b.png").shape == (40, 56, 3)
    (src / "broken.png").unlink()
    assert cli(["upscale", str(src), "-s", "2", "--no-progress", "--reference"]) == 2  # outputs exist now
    assert "a.png" in capsys.readouterr().err
    assert cli(["upscale", str(src), str(src), "-s", "2", "--no-progress", "--reference", "--overwrite"]) == 2
    assert "must differ" in capsys.readouterr().err


def test_upscale_errors(photo, tmp_path, capsys):
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    x2 = str(shipped_weights()[2])
    rdcab = tmp_path / "rdcab_split.pth"  # an upstream-style raw state_dict of an x4-only architecture
    torch.save(build("rdcab_split", 4, num_features=16, growth=16, num_layers=2, num_recursions=2).state_dict(), rdcab)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases = [
        (["upscale", str(tmp_path / "missing.png")], 2, "input not found"),
        (["upscale", str(photo), "--weights", str(garbage), "--model", "rdn", "-s", "2"], 2, "wrong or unreadable weights"),
        (["upscale", str(photo), "--weights", str(tmp_path / "none.pt"), "-m", "rdn", "-s", "2"], 2, "none.pt"),
        (["upscale", str(photo), "--scale", "3"], 2, "scale 3 has no shipped weights"),
        (["upscale", str(photo), "--weights", x2, "--scale", "4"], 2, "does not match"),
        (["upscale", str(photo), "--model", "edsr"], 2, "unknown model name"),
        (["upscale", str(photo), "--model", "rcan"], 2, "no shipped weights for --model rcan"),
        (["upscale", str(photo), "-w", str(rdcab), "-m", "rdcab_split", "-s", "2"], 2, "scale 2 is not supported"),
        (["upscale", str(photo), str(tmp_path / "out.xyz"), "-s", "2"], 2, "unknown image extension"),
        (["upscale", str(broken), "-s", "2", "--no-progress"], 1, "cannot read image file"),
        (["upscale", str(photo), "--device", "cuda:0"] if not torch.cuda.is_available() else
         ["upscale", str(photo), "--device", "nonsense"], 2, "--device"),
    ]
    for argv, code, needle in cases:
        assert cli(argv + ["--reference"]) == code, argv
        assert needle in capsys.readouterr().err, argv
    assert not list(tmp_path.glob("*_x*.png"))  # nothing was written by the failures
    # the x4-only architecture works at x4 with the same file
    assert cli(["upscale", str(photo), str(tmp_path / "ok.png"), "-w", str(rdcab), "-m", "rdcab_split", "-s", "4",
                "--no-progress", "--reference"]) == 0
    assert read(tmp_path / "ok.png").shape == (160, 208, 3)


# ---- eval and convert ------------------------------------------------------------------------------------------


def test_eval_subcommand_table(tmp_path, capsys):
    d = tmp_path / "heldout"
    d.mkdir()
    save_png(d / "astronaut.png", skdata.astronaut()[100:196, 150:246])
    save_png(d / "chelsea.png", skdata.chelsea()[60:156, 150:246])
    assert cli(["eval", "-w", str(shipped_weights()[2]), str(shipped_weights()[4]), "-d", str(d), "--reference"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| heldout")]
    assert [r.split("|")[2].strip() for r in rows] == ["x2", "x4"]
    for r in rows:
        cells = [c.strip() for c in r.split("|")[3:-1]]
        bic = float(cells[0].split("/")[0])
        ours = [float(c.split("/")[0]) for c in cells[1:] if c != "—"]
        assert len(ours) == 1 and ours[0] > bic


def test_convert_subcommand(tmp_path, capsys):
    tiny = dict(num_features=8, num_blocks=1, num_layers=2, growth=4)
    torch.manual_seed(0)
    ref = build("rdn", 2, **tiny)
    upstream = tmp_path / "rdn_official.pt"  # EDSR-PyTorch layout: a raw state_dict
    torch.save(ref.state_dict(), upstream)
    out = tmp_path / "rdn.safetensors"
    assert cli(["convert", str(upstream), str(out), "-m", "rdn", "-s", "2"]) == 0
    m = load_model(out)
    assert m.input_range == 255.0  # official RDN weights expect [0, 255]
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())
    stamp = out.read_bytes()
    assert cli(["convert", str(upstream), str(out), "-m", "rdn", "-s", "2"]) == 2
    assert "output exists" in capsys.readouterr().err
    assert out.read_bytes() == stamp
    assert cli(["convert", str(upstream), str(tmp_path / "x.pt"), "-m", "rdn", "-s", "2"]) == 2
    assert ".safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("config", [{"num_features": 30000}, "notadict"])
def test_upscale_untrusted_metadata_is_one_line(photo, tmp_path, capsys, config):
    from safetensors.torch import save_file

    src = build("srcnn", 2, fused=False)
    w = tmp_path / "evil.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(w),
              metadata={"format": "pt", "srkernels": json.dumps({"arch": "rdn", "scale": 2, "config": config})})
    assert cli(["upscale", str(photo), str(tmp_path / "o.png"), "-w", str(w), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "config" in err
    assert cli(["convert", str(w), str(tmp_path / "c.safetensors")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "config" in err


def test_upscale_grey_alpha_stays_grey_alpha(tmp_path):
    la = np.stack([skdata.camera()[200:230, 220:260], np.full((30, 40), 77, np.uint8)], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert cli(["upscale", str(tmp_path / "la.png"), "-s", "2", "--no-progress", "--reference"]) == 0
    with Image.open(tmp_path / "la_x2.png") as im:
        assert im.mode == "LA" and im.size == (80, 60)
        assert (np.asarray(im)[..., 1] == 77).all()
    grey = save_png(tmp_path / "grey.png", la[..., 0])
    assert cli(["upscale", str(grey), "-s", "2", "--no-progress", "--reference"]) == 0
    assert np.array_equal(read(tmp_path / "grey_x2.png"), np.asarray(Image.open(tmp_path / "la_x2.png"))[..., 0])


def test_upscale_removes_stale_temp_files_of_killed_runs(photo, tmp_path, capsys):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = child.pid  # a pid that no longer runs
    out = tmp_path / "out"
    out.mkdir()
    # the names a killed run leaves: _publish's temp, and save_image's own temp inside it
    stale = [out / f".k1.png.{dead}.440c6fcb.tmp.png", out / f"..k1.png.{dead}.440c6fcb.tmp.png.{dead}.6e79aa30.tmp"]
    live = out / f".k2.png.{os.getpid()}.0123abcd.tmp.png"  # a writer that still runs: kept
    other = out / ".hidden.tmp"  # not ours: kept
    for p in (*stale, live, other):
        p.write_bytes(b"partial")
    assert cli(["upscale", str(photo), str(out / "k1.png"), "-s", "2", "--no-progress", "--reference"]) == 0
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists()
    assert "stale temp file" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, other.name, "k1.png"])
