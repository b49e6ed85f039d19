"""python/train.py, python/test.py and python/configs: the shipped recipes describe the published models, the
scripts run end to end on a tiny folder, and DDP (two CPU processes, gloo) matches one process."""
import multiprocessing as mp
import os
import re
import runpy
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage import data as skdata

from srkernels.toolkit import checkpoint as ckio
from srkernels.toolkit import load_config
from srkernels.toolkit import trainer
from srkernels.toolkit.commands import train_main
from srkernels.models import build

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "python" / "configs").glob("*.yaml"))

# parameter counts of the published models (docs/architectures.md §2-§6; RCAN counts include the 24 MeanShift
# parameters)
PUBLISHED_PARAMS = {
    "srcnn_x3": 57_281,
    "srdensenet_x4": 2_004_225,
    "rcan_x4": 15_592_379,
    "rcan_bam_x4": 15_589_379,
    "rdn_x2": 22_123_395,
    "rdcab_ipiu_x4": 2_111_783,
    "rdcab_split_x4": 1_218_677,
    "rdcab_fd_irb_x4": 1_659_524,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hr")
    img = skdata.coffee()
    for i in range(4):
        Image.fromarray(np.ascontiguousarray(img[60 * i: 60 * i + 40, 100 + 50 * i: 148 + 50 * i])).save(d / f"c{i}.png")
    return d


def tiny_yaml(path: Path, hr_dir: Path, **train) -> Path:
    cfg = {
        "name": "tiny",
        "device": "cpu",
        "model": {"name": "rdn", "scale": 2, "fused": False,  # reference layers: the engine is under test here
                  "args": {"num_features": 8, "num_blocks": 1, "num_layers": 2, "growth": 4, "rgb_range": 1}},
        "data": {"train": {"hr_dir": str(hr_dir)}, "val": [{"hr_dir": str(hr_dir), "limit": 2}],
                 "patch_size": 6, "batch_size": 4, "repeat": 2, "num_workers": 0},
        "train": {"iterations": 4, "val_every": 2, "ckpt_every": 2, "log_every": 1, "optimizer": {"lr": 1e-3},
                  **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_script(name: str, argv: list[str]) -> int:
    """Run python/<name> as __main__ in this process (a fresh interpreter costs seconds of imports here)."""
    old = sys.argv
    sys.argv = [str(ROOT / "python" / name), *argv]
    try:
        runpy.run_path(str(ROOT / "python" / name), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = old
    return 0


# ---- configs ---------------------------------------------------------------------------------------------------


def test_a_config_per_published_model_and_scale():
    names = {p.stem for p in CONFIGS}
    want = {"srcnn_x2", "srcnn_x3", "srcnn_x4", "srdensenet_x4", "rcan_x2", "rcan_x3", "rcan_x4", "rcan_x8",
            "rcan_bam_x2", "rcan_bam_x3", "rcan_bam_x4", "rdn_x2", "rdn_x3", "rdn_x4", "rdcab_ipiu_x2",
            "rdcab_ipiu_x3", "rdcab_ipiu_x4", "rdcab_split_x4", "rdcab_fd_irb_x4", "rdn_small_x2", "rdn_small_x4"}
    assert want <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid_and_names_its_model(path):
    cfg = load_config(path)
    m = cfg["model"]
    stem = path.stem
    assert cfg["name"] == stem
    assert stem.endswith(f"_x{m['scale']}")
    base = stem.rsplit("_x", 1)[0]
    assert base == m["name"] or base == "rdn_small" and m["name"] == "rdn"
    # the patch makes whole HR pixels at every scale, and the schedule fits in the run
    s = cfg["train"]["scheduler"]
    if s["name"] == "multistep":
        assert max(s["milestones"]) < cfg["train"]["iterations"]
    if stem in PUBLISHED_PARAMS:
        with torch.device("meta"):
            net = build(m["name"], m["scale"], fused=m["fused"], **m["args"])
        assert sum(p.numel() for p in net.parameters()) == PUBLISHED_PARAMS[stem]


def test_recipes_follow_the_spec():
    rcan = load_config(ROOT / "python/configs/rcan_x4.yaml")
    assert (rcan["data"]["patch_size"], rcan["data"]["batch_size"], rcan["train"]["loss"]) == (48, 16, "l1")
    assert rcan["train"]["scheduler"] == {"name": "step", "step_size": 200000, "milestones": [], "gamma": 0.5}
    assert rcan["model"]["init_from"]  # x4 starts from x2
    srcnn = load_config(ROOT / "python/configs/srcnn_x3.yaml")
    assert srcnn["train"]["loss"] == "mse" and srcnn["train"]["optimizer"]["name"] == "sgd"
    assert srcnn["data"]["patch_size"] * 3 == 33
    rdcab = load_config(ROOT / "python/configs/rdcab_ipiu_x4.yaml")
    assert rdcab["seed"] == 123 and rdcab["train"]["scheduler"]["milestones"] == [160000]


# ---- scripts ---------------------------------------------------------------------------------------------------


def test_train_then_test_scripts(hr_dir, tmp_path, capsys):
    cfg = tiny_yaml(tmp_path / "tiny.yaml", hr_dir)
    run = tmp_path / "run"
    assert run_script("train.py", [str(cfg), "-o", str(run), "--no-progress", "--stop-after", "2"]) == 0
    assert [it for it, _ in ckio.list_checkpoints(run)] == [2]
    assert run_script("train.py", ["--resume", "-o", str(run), "--no-progress"]) == 0
    assert (run / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "iteration 4" in out

    # a second start in the same directory is refused, the run is untouched
    before = (run / "train.csv").read_bytes()
    assert run_script("train.py", [str(cfg), "-o", str(run), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "train.csv").read_bytes() == before

    # test.py: two checkpoints of the run, a Markdown table with the bicubic column
    code = run_script("test.py", ["--weights", str(run), str(run / "model.safetensors"), "--data", str(hr_dir),
                                  "--per-image", "--reference"])
    assert code == 0
    text = capsys.readouterr().out
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert table[0] == "| set | scale | bicubic | run | run/model |"
    cells = table[2].split("|")[3:-1]
    vals = [tuple(float(v) for v in c.split("/")) for c in cells]
    assert all(10 < p < 60 and 0 < s <= 1 for p, s in vals)
    assert vals[1] == vals[2]  # the run directory and its final model are the same weights
    assert "c0" in text and "c3" in text  # per-image lines


def test_test_script_options_and_errors(hr_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_script("train.py", [str(tiny_yaml(tmp_path / "t.yaml", hr_dir, iterations=2)), "-o", str(run),
                                   "--no-progress"]) == 0
    capsys.readouterr()
    w = str(run / "model.safetensors")
    assert run_script("test.py", ["--reference", "-w", w, "-d", str(hr_dir), "--self-ensemble", "--quantize", "--y-coeffs",
                                  "typo64738", "--no-bicubic", "--digits", "3"]) == 0
    out = capsys.readouterr().out
    assert "typo64738" in out and "x8 self-ensemble" in out and "uint8-quantised" in out
    row = [ln for ln in out.splitlines() if ln.startswith(f"| {hr_dir.name} |")][0]
    assert re.search(r"\| \d+\.\d{3} / \d\.\d{4} \|$", row)
    assert run_script("test.py", ["-w", w, "-d", str(hr_dir), "--chop", "--reference"]) == 0
    capsys.readouterr()
    # errors: exit status 2 and one line naming the problem
    for argv, needle in [
        (["-w", str(tmp_path / "missing.pt"), "-d", str(hr_dir)], "missing.pt"),
        (["-w", w], "nothing to evaluate"),
        (["-w", w, "-d", str(tmp_path / "nodir")], "nodir"),
        (["-w", w, "-d", str(hr_dir), "--scale", "3"], "scale 3"),
        (["-w", w, w, "-d", str(hr_dir), "--scale", "2", "2", "2"], "one per weights"),
    ]:
        assert run_script("test.py", argv) == 2, argv
        assert needle in capsys.readouterr().err


def test_train_script_errors(tmp_path, capsys):
    assert run_script("train.py", [str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: rdn, scale: 2}\ntrain: {iterations: 3, lossy: l1}\ndata: {train: {hr_dir: x}}\n")
    assert run_script("train.py", [str(bad), "-o", str(tmp_path / "r")]) == 2
    assert "train.lossy" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert run_script("train.py", ["--resume"]) == 2
    assert "--output-dir" in capsys.readouterr().err


# ---- DDP ---------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, argv: list[str], log: str, late_rank: int | None) -> None:
    # what torchrun sets up for each process; forked, so torch is not imported again. The parent's stderr is
    # pytest's capture, lost with the child: each rank writes its own file, shown when a rank fails.
    sys.stderr = open(log, "w", buffering=1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == late_rank:
        # this rank is slow between joining the group and looking at the output directory, as a loaded machine
        # makes any rank now and then
        setup = trainer._setup_dist

        def slow_setup(*args, **kwargs):
            d = setup(*args, **kwargs)
            time.sleep(1.0)
            return d

        trainer._setup_dist = slow_setup
    sys.exit(train_main(argv))


def _ddp(argv: list[str], logs: Path, world: int = 2, timeout: float = 120, late_rank: int | None = None) -> None:
    ctx = mp.get_context("fork")
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs = [ctx.Process(target=_ddp_worker, args=(r, world, port, argv, str(logs / f"rank{r}.err"), late_rank))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
    finally:
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join()
    errs = "\n".join(f"rank {r}: " + (logs / f"rank{r}.err").read_text() for r in range(world))
    assert not alive, f"DDP workers timed out\n{errs}"
    assert [p.exitcode for p in procs] == [0] * world, errs


def test_ddp_two_cpu_processes_match_one(hr_dir, tmp_path, capsys):
    """Two gloo ranks with half the batch each take the same steps as one process with the whole batch
    (DistributedSampler interleaves one shuffled order); a DDP run stopped and resumed lands there too."""
    cfg = tiny_yaml(tmp_path / "tiny.yaml", hr_dir, ema=0.9)
    # rank 1 late: rank 0 must not write config.yaml before rank 1 has checked the directory is free
    _ddp([str(cfg), "-o", str(tmp_path / "ddp"), "--no-progress", "--stop-after", "2"], tmp_path / "logs1",
         late_rank=1)
    _ddp(["--resume", "-o", str(tmp_path / "ddp"), "--no-progress"], tmp_path / "logs2")
    assert train_main([str(cfg), "-o", str(tmp_path / "single"), "--no-progress"]) == 0
    ddp, single = ckio.load_latest(tmp_path / "ddp")[0], ckio.load_latest(tmp_path / "single")[0]
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2 and single["world_size"] == 1
    assert ddp["iteration"] == single["iteration"] == 4
    for key in ("params", "params_ema"):
        for k, v in single[key].items():
            torch.testing.assert_close(ddp[key][k], v, rtol=1e-4, atol=1e-5, msg=f"{key}.{k}")
    # the weights did change (the comparison is not between two untouched initialisations)
    torch.manual_seed(0)
    init = build("rdn", 2, fused=False, **load_config(cfg)["model"]["args"]).state_dict()
    assert any((init[k] - ddp["params"][k]).abs().max() > 1e-3 for k in init)
    # rank 0 alone wrote the logs: one row per logged iteration
    rows = (tmp_path / "ddp" / "train.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["iteration", "1", "2", "3", "4"]
