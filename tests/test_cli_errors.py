"""Every user error of the toolkit commands (``train.py``, ``srkernels eval|upscale|convert``) is one line on
stderr and a non-zero exit status, never a traceback."""
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage import data as skdata

from srkernels.cli import main as cli
from srkernels.toolkit.commands import shipped_weights, train_main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"name": "srcnn", "scale": 2, "fused": False, "args": {"kernel_sizes": [3, 1, 3], "channels": [4, 4]}}


@pytest.fixture
def files(tmp_path, monkeypatch):
    """In tmp_path (the working directory): hr/ (three real 24x24 crops), photo.png, ok.yaml (a valid tiny
    recipe), afile (a plain file), bad.yaml, mismatch.pt (tensors no model has), a training run with one
    checkpoint whose tensor bytes are damaged (rot.pt)."""
    monkeypatch.chdir(tmp_path)
    img = skdata.astronaut()
    (tmp_path / "hr").mkdir()
    for i in range(3):
        Image.fromarray(np.ascontiguousarray(img[100 + 30 * i: 124 + 30 * i, 180:204])).save(f"hr/{i}.png")
    Image.fromarray(np.ascontiguousarray(img[:20, :24])).save("photo.png")
    cfg = {"device": "cpu", "model": TINY,
           "data": {"train": {"hr_dir": "hr"}, "patch_size": 6, "batch_size": 2, "repeat": 2, "num_workers": 0},
           "train": {"iterations": 2, "val_every": 2, "ckpt_every": 2, "log_every": 1}}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "bad.yaml").write_text("model: [\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_text("not an image")
    torch.save({"foo.weight": torch.zeros(2, 2), "bar.bias": torch.zeros(2)}, "mismatch.pt")
    return tmp_path


def _rotten_checkpoint(tmp_path):
    import struct
    import zipfile

    assert train_main(["ok.yaml", "-o", "run", "--no-progress"]) == 0
    (path,) = (tmp_path / "run" / "checkpoints").glob("iter_*.pt")
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 8)
    data = bytearray(path.read_bytes())
    n, extra = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    data[info.header_offset + 30 + n + extra + info.file_size // 2] ^= 0x40
    (tmp_path / "rot.pt").write_bytes(bytes(data))


W = str(shipped_weights()[2])
CASES = {
    # train (python/train.py)
    "train: output dir is a file": ("train", ["ok.yaml", "-o", "afile"], "File exists"),
    "train: output dir below a file": ("train", ["ok.yaml", "-o", "afile/run"], "Not a directory"),
    "train: YAML syntax": ("train", ["bad.yaml", "-o", "r1"], "not valid YAML"),
    "train: --set YAML syntax": ("train", ["ok.yaml", "-o", "r2", "--set", "model.args=[1"], "not valid YAML"),
    "train: unknown key": ("train", ["ok.yaml", "-o", "r3", "--set", "foo=1"], "unknown config key"),
    "train: data folder": ("train", ["ok.yaml", "-o", "r4", "--set", "data.train={hr_dir: nope}"], "nope"),
    "train: model option": ("train", ["ok.yaml", "-o", "r5", "--set", "model.args.padding=weird"], "padding"),
    "train: resume nothing": ("train", ["--resume", "-o", "nothing"], "cannot resume"),
    # eval
    "eval: damaged iter_*.pt": ("cli", ["eval", "-w", "rot.pt", "-d", "hr"], "CRC"),
    "eval: keys of no model": ("cli", ["eval", "-w", "mismatch.pt", "-m", "rdn", "-s", "2", "-d", "hr"], "does not match"),
    "eval: data folder": ("cli", ["eval", "-w", W, "-d", "nope"], "not found"),
    "eval: not an image": ("cli", ["eval", "-w", W, "-d", "junk"], "cannot read image"),
    "eval: tile": ("cli", ["eval", "-w", W, "-d", "hr", "--tile", "8"], "overlap"),
    # upscale
    "upscale: damaged iter_*.pt": ("cli", ["upscale", "photo.png", "o1.png", "-w", "rot.pt"], "CRC"),
    "upscale: keys of no model": ("cli", ["upscale", "photo.png", "o2.png", "-w", "mismatch.pt", "-m", "rdn",
                                          "-s", "2"], "does not match"),
    "upscale: extension": ("cli", ["upscale", "photo.png", "o.xyz"], "extension"),
    "upscale: scale": ("cli", ["upscale", "photo.png", "o3.png", "-s", "3"], "no shipped weights"),
    # one line per image that fails, then how many failed (the other images are still written)
    "upscale: not an image": ("cli", ["upscale", "junk", "out"], "cannot read image", 2),
    # convert
    "convert: damaged iter_*.pt": ("cli", ["convert", "rot.pt", "o1.safetensors"], "CRC"),
    "convert: keys of no model": ("cli", ["convert", "mismatch.pt", "o2.safetensors", "-m", "rdn", "-s", "2"],
                                  "does not match"),
    "convert: output below a file": ("cli", ["convert", W, "afile/o.safetensors"], "File exists"),
    "convert: extension": ("cli", ["convert", W, "o.txt"], ".safetensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line(files, capsys, case):
    how, argv, needle, *n = CASES[case]
    if "rot.pt" in argv:
        _rotten_checkpoint(files)
        capsys.readouterr()
    if how == "train":
        rc = train_main(argv + ["--no-progress"])
    else:
        rc = cli(argv + (["--no-progress"] if argv[0] == "upscale" else []))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0
    assert len(lines) == (n[0] if n else 1), err
    assert lines[0].split(": error: ", 1)[0] in ("train.py", "srkernels upscale", "srkernels eval",
                                                 "srkernels convert"), err
    assert needle in lines[0], err


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    """Ctrl-C during a command: one line and exit status 130, no traceback."""
    import srkernels.cli as cli_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "cmd_info", interrupted)
    assert cli(["info"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "srkernels: interrupted"


def test_ctrl_c_during_training_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import srkernels.toolkit.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: srcnn\n")
    assert train_main([str(cfg)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith("interrupted; run it again with --resume to continue from the last checkpoint"), err
    assert "\n" not in err
