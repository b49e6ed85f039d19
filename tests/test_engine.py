"""srkernels.toolkit: config checks, the train loop (every model, AMP, EMA, schedules), exact resume after a
stop or a SIGKILL, atomic checkpoints, evaluation and the inference pipeline (tiling, ensemble, chop, Y)."""
import csv
import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from srkernels.toolkit.data import imresize
from srkernels.toolkit import (
    ConfigError,
    Upscaler,
    evaluate,
    evaluate_bicubic,
    load_config,
    load_model,
    markdown_table,
    resolve_dataset,
    rgb_to_ycbcr,
    train,
    ycbcr_to_rgb,
)
from srkernels.toolkit import checkpoint as ckio
from srkernels.toolkit.inference import self_ensemble, tile_spans, tiled
from srkernels.toolkit.metrics import psnr, rgb_to_y
from srkernels.models import build, chop


# one tiny configuration per zoo model: (registry name, scale, constructor args)
TINY = {
    "srcnn": ("srcnn", 2, {"kernel_sizes": [3, 1, 3], "channels": [4, 4]}),
    "srcnn_valid": ("srcnn", 3, {"kernel_sizes": [3, 1, 3], "channels": [4, 4], "padding": "valid"}),
    "srdensenet": ("srdensenet", 2, {"num_features": 8, "num_blocks": 2, "num_layers": 2, "growth": 4, "bottleneck": 8}),
    "rcan": ("rcan", 2, {"n_resgroups": 1, "n_resblocks": 1, "n_feats": 8, "reduction": 4}),
    "rcan_bam": ("rcan_bam", 2, {"n_resgroups": 1, "n_resblocks": 1, "n_feats": 8, "reduction": 4}),
    "rdn": ("rdn", 2, {"num_features": 8, "num_blocks": 1, "num_layers": 2, "growth": 4, "rgb_range": 1}),
    "rdcab_ipiu": ("rdcab_ipiu", 2, {"num_features": 8, "growth": 8, "num_layers": 2, "num_recursions": 2}),
    "rdcab_split": ("rdcab_split", 4, {"num_features": 16, "growth": 16, "num_layers": 2, "num_recursions": 2}),
    "rdcab_fd_irb": ("rdcab_fd_irb", 2, {"num_features": 16, "growth": 16, "num_layers": 2, "num_recursions": 2}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    """Five 48x48 crops of real photographs (bundled with scikit-image)."""
    d = tmp_path_factory.mktemp("hr")
    astro, coffee = skdata.astronaut(), skdata.coffee()
    crops = [astro[100:148, 180:228], astro[300:348, 60:108], coffee[50:98, 200:248], coffee[200:248, 300:348],
             astro[20:68, 20:68]]
    for i, c in enumerate(crops):
        Image.fromarray(np.ascontiguousarray(c)).save(d / f"img{i}.png")
    return d


def tiny_cfg(hr_dir, key="rdn", **over):
    name, scale, args = TINY[key]
    cfg = {
        "name": f"tiny_{key}",
        "device": "cpu",
        # reference layers: these tests are about the engine; test_train_fused_layers covers the fused ones
        "model": {"name": name, "scale": scale, "fused": False, "args": dict(args)},
        "data": {"train": {"hr_dir": str(hr_dir)}, "val": [{"hr_dir": str(hr_dir), "limit": 2, "name": "tiny"}],
                 "patch_size": 6, "batch_size": 4, "repeat": 2, "num_workers": 0},
        "train": {"iterations": 3, "val_every": 3, "ckpt_every": 3, "log_every": 1,
                  "optimizer": {"lr": 1e-3}},
    }
    for k, v in over.items():
        node = cfg
        *path, last = k.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return cfg


def params(run_dir, it=None):
    ck = ckio.load_latest(run_dir)[0] if it is None else ckio.read_checkpoint_file(
        ckio.checkpoint_dir(run_dir) / f"iter_{it:08d}.pt")
    return ck


def same_state(a, b):
    for k in ("params", "params_ema"):
        if a.get(k) is None:
            assert b.get(k) is None
            continue
        assert a[k].keys() == b[k].keys()
        for n in a[k]:
            assert torch.equal(a[k][n], b[k][n]), f"{k}.{n} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for n, v in sa[i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[i][n])), f"optimizer state {i}.{n} differs"
    assert a["scheduler"] == b["scheduler"]
    assert (a["iteration"], a["epoch"], a["step_in_epoch"]) == (b["iteration"], b["epoch"], b["step_in_epoch"])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- config ------------------------------------------------------------------------------------------------


def test_config_defaults_and_overrides(hr_dir):
    cfg = load_config(tiny_cfg(hr_dir), ["train.iterations=7", "model.args={num_features: 4}", "data.augment=false"])
    assert cfg["train"]["iterations"] == 7
    assert cfg["model"]["args"] == {"num_features": 4}
    assert cfg["data"]["augment"] is False
    assert cfg["train"]["optimizer"]["betas"] == [0.9, 0.999]  # default filled in
    assert cfg["train"]["loss"] == "l1"


@pytest.mark.parametrize("over, needle", [
    (["train.iteratons=5"], "train.iteratons"),
    (["train.loss=huber"], "train.loss"),
    (["train.amp=fp8"], "train.amp"),
    (["train.iterations=0"], "train.iterations"),
    (["data.train.hr_dir=null"], "data.train"),
    (["train.scheduler={name: step}"], "step_size"),
    (["train.scheduler={name: multistep, milestones: [5, 2]}"], "milestones"),
    (["model.args={scale: 3}"], "model.args"),
    (["train.ema=1.5"], "train.ema"),
    (["bogus"], "key.sub=value"),
])
def test_config_errors_name_the_key(hr_dir, over, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        load_config(tiny_cfg(hr_dir), over)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


# ---- training smoke runs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(TINY))
def test_train_every_model(hr_dir, tmp_path, key):
    name, scale, args = TINY[key]
    patch = 6 if scale < 4 else 4
    cfg = tiny_cfg(hr_dir, key, data__patch_size=patch)
    torch.manual_seed(0)
    init = build(name, scale, fused=False, **args).state_dict()
    res = train(cfg, output_dir=tmp_path / "run", progress=False)
    assert res.iteration == 3 and not res.stopped_early
    ck = params(tmp_path / "run")
    assert ck["iteration"] == 3
    # the weights moved away from the seeded initialisation
    assert any(not torch.equal(init[k], ck["params"][k]) for k in init)
    rows = read_csv(tmp_path / "run" / "train.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    val = read_csv(tmp_path / "run" / "val.csv")
    assert len(val) == 1 and np.isfinite(float(val[0]["psnr"]))
    # every artefact loads back as the same model, and runs
    for src in (tmp_path / "run", tmp_path / "run" / "model.safetensors", tmp_path / "run" / "best.safetensors"):
        m = load_model(src, fused=False)
        assert type(m) is type(build(name, scale, fused=False, **args)) and m.scale == scale
    m = load_model(tmp_path / "run" / "model.safetensors", fused=False)
    for k, v in m.state_dict().items():
        assert torch.equal(v, ck["params"][k])
    sr = Upscaler(m)(torch.rand(3, 10, 9))
    assert sr.shape == (3, 10 * scale, 9 * scale) and 0 <= sr.min() and sr.max() <= 1


@pytest.mark.parametrize("key", ["rcan", "rcan_bam", "rdn", "rdcab_ipiu"])
def test_train_fused_layers(hr_dir, tmp_path, key):
    """The models as users build them (fused=True, the default): training runs and moves the weights, and the
    checkpoint's model matches the same weights in reference layers."""
    name, scale, args = TINY[key]
    res = train(tiny_cfg(hr_dir, key, model__fused=True), output_dir=tmp_path / "run", progress=False)
    assert res.iteration == 3
    fused, ref = load_model(tmp_path / "run", fused=True), load_model(tmp_path / "run", fused=False)
    x = torch.rand(1, 3, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


def test_train_bf16_channels_last_clip_ema(hr_dir, tmp_path):
    cfg = tiny_cfg(hr_dir, "rcan", train__amp="bf16", train__channels_last=True,
                   train__grad_clip=0.01, train__ema=0.5)
    res = train(cfg, output_dir=tmp_path / "run", progress=False)
    ck = params(tmp_path / "run")
    assert res.iteration == 3
    ema, raw = ck["params_ema"], ck["params"]
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    # load_model and the final safetensors take the EMA weights
    for m in (load_model(tmp_path / "run", fused=False), load_model(tmp_path / "run" / "model.safetensors", fused=False)):
        assert all(torch.equal(v, ema[k]) for k, v in m.state_dict().items())


def test_fp16_on_cpu_is_refused(hr_dir, tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        train(tiny_cfg(hr_dir, train__amp="fp16"), output_dir=tmp_path / "run", progress=False)


def test_sgd_lr_mult_and_step_schedule(hr_dir, tmp_path):
    cfg = tiny_cfg(hr_dir, "srcnn", train__iterations=5, train__ckpt_every=5, train__val_every=5,
                   train__optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                                     "lr_mult": {"reconstruction": 0.1}},
                   train__scheduler={"name": "step", "step_size": 2, "gamma": 0.5})
    train(cfg, output_dir=tmp_path / "run", progress=False)
    opt = params(tmp_path / "run")["optimizer"]
    lrs = sorted(g["lr"] for g in opt["param_groups"])
    # 5 iterations, halved after 2 and 4: 0.1 * 0.25, and the reconstruction group at a tenth of it
    assert lrs == pytest.approx([0.0025, 0.025])
    logged = [float(r["lr"]) for r in read_csv(tmp_path / "run" / "train.csv")]
    assert logged == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025]) or logged == pytest.approx(
        [0.01, 0.005, 0.005, 0.0025, 0.0025])
    with pytest.raises(ConfigError, match="lr_mult"):
        train(tiny_cfg(hr_dir, "srcnn", train__optimizer={"lr_mult": {"nothing": 0.1}}),
              output_dir=tmp_path / "run2", progress=False)


def test_training_reduces_loss(hr_dir, tmp_path):
    cfg = tiny_cfg(hr_dir, "rdn", train__iterations=40, train__log_every=10, train__val_every=40,
                   train__ckpt_every=40, data__repeat=8)
    train(cfg, output_dir=tmp_path / "run", progress=False)
    losses = [float(r["loss"]) for r in read_csv(tmp_path / "run" / "train.csv")]
    assert losses[-1] < 0.7 * losses[0]


def test_init_from_copies_matching_tensors(hr_dir, tmp_path):
    """RCAN x4 starts from a trained x2: every tensor but the upsampler's first conv is copied."""
    train(tiny_cfg(hr_dir, "rcan"), output_dir=tmp_path / "x2", progress=False)
    x2 = load_model(tmp_path / "x2" / "model.safetensors", fused=False).state_dict()
    cfg = tiny_cfg(hr_dir, "rcan", model__scale=4, model__init_from=str(tmp_path / "x2" / "model.safetensors"),
                   train__iterations=1, data__patch_size=4, seed=1)  # another seed: another fresh init
    res = train(cfg, output_dir=tmp_path / "x4", stop_after=1, progress=False)
    assert res.iteration == 1
    x4 = ckio.load_latest(tmp_path / "x4")[0]["params"]
    torch.manual_seed(1)
    fresh = build("rcan", 4, fused=False, **TINY["rcan"][2]).state_dict()
    # after one Adam step (lr 1e-3) copied tensors are within 1e-3 of x2, the rest near their fresh init
    assert (x4["head.0.weight"] - x2["head.0.weight"]).abs().max() <= 1.1e-3
    assert (x4["tail.1.weight"] - x2["tail.1.weight"]).abs().max() <= 1.1e-3
    assert (x4["head.0.weight"] - fresh["head.0.weight"]).abs().max() > 1e-2
    assert "tail.0.2.weight" not in x2  # x4's second shuffle stage: fresh init, one step away from it
    assert (x4["tail.0.2.weight"] - fresh["tail.0.2.weight"]).abs().max() <= 1.1e-3
    with pytest.raises(ValueError, match="init_from"):
        bad = tiny_cfg(hr_dir, "srcnn", model__init_from=str(tmp_path / "x2" / "model.safetensors"))
        train(bad, output_dir=tmp_path / "bad", progress=False)


def test_dataset_forms(tmp_path, hr_dir):
    root = tmp_path / "bench"
    (root / "Set5" / "HR").mkdir(parents=True)
    for p in sorted(hr_dir.iterdir())[:2]:
        (root / "Set5" / "HR" / p.name).write_bytes(p.read_bytes())
    spec = resolve_dataset({"root": str(root), "set": "Set5"}, 2)
    assert spec.hr_dir == root / "Set5" / "HR" and spec.name == "Set5"
    sk = resolve_dataset("skimage:coins,camera", 2, cache_root=tmp_path / "cache")
    assert sorted(p.name for p in sk.hr_dir.iterdir()) == ["camera.png", "coins.png"]
    img = np.asarray(Image.open(sk.hr_dir / "coins.png"))
    assert img.shape == (*skdata.coins().shape, 3) and np.array_equal(img[..., 0], skdata.coins())
    # the cached folder is reused, but a file with other content in it is never overwritten
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(sk.hr_dir / "coins.png")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        resolve_dataset("skimage:coins,camera", 2, cache_root=tmp_path / "cache")
    with pytest.raises(ValueError, match="unknown skimage photograph"):
        resolve_dataset("skimage:nosuch", 2, cache_root=tmp_path / "cache")
    with pytest.raises(ValueError, match="not found"):
        resolve_dataset(tmp_path / "missing", 2)


# ---- run directories, resume, checkpoints --------------------------------------------------------------------


def test_existing_run_is_never_reused_without_resume(hr_dir, tmp_path):
    train(tiny_cfg(hr_dir), output_dir=tmp_path / "run", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_cfg(hr_dir), output_dir=tmp_path / "run", progress=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert before == after
    with pytest.raises(ValueError, match="config.yaml"):
        train(tiny_cfg(hr_dir), output_dir=tmp_path / "empty", resume=True, progress=False)


def test_resume_is_exact(hr_dir, tmp_path):
    # 7 iterations with 2 steps per epoch: the stop falls mid-epoch; EMA, a schedule and augmentation are on
    over = dict(train__iterations=7, train__ckpt_every=1, train__val_every=4, train__ema=0.9,
                train__scheduler={"name": "step", "step_size": 3, "gamma": 0.5}, data__augment=True,
                data__cache_images=True)
    train(tiny_cfg(hr_dir, **over), output_dir=tmp_path / "straight", progress=False)
    part = train(tiny_cfg(hr_dir, **over), output_dir=tmp_path / "split", stop_after=3, progress=False)
    assert part.iteration == 3 and part.stopped_early
    assert not (tmp_path / "split" / "model.safetensors").exists()
    # resume from the run directory alone (its saved config)
    done = train(None, output_dir=tmp_path / "split", resume=True, progress=False)
    assert done.iteration == 7 and not done.stopped_early
    same_state(params(tmp_path / "straight"), params(tmp_path / "split"))
    assert read_csv(tmp_path / "straight" / "train.csv") != []
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("it_per_s", "elapsed_s")} for r in rows]  # noqa
    assert strip(read_csv(tmp_path / "straight" / "train.csv")) == strip(read_csv(tmp_path / "split" / "train.csv"))
    assert read_csv(tmp_path / "straight" / "val.csv") == read_csv(tmp_path / "split" / "val.csv")


def test_resume_rejects_trajectory_changes(hr_dir, tmp_path):
    train(tiny_cfg(hr_dir, train__iterations=4), output_dir=tmp_path / "run", stop_after=2, progress=False)
    with pytest.raises(ConfigError, match="optimizer.lr"):
        train(None, output_dir=tmp_path / "run", resume=True, overrides=["train.optimizer.lr=0.5"], progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        train(tiny_cfg(hr_dir, train__iterations=4, data__batch_size=2), output_dir=tmp_path / "run", resume=True,
              progress=False)
    # schedule-neutral changes are fine: more iterations
    res = train(None, output_dir=tmp_path / "run", resume=True, overrides=["train.iterations=5"], progress=False)
    assert res.iteration == 5


def _newest_of_a_stopped_run(hr_dir, tmp_path):
    """A 6-iteration run to the end in ``ref`` and stopped after 4 in ``run``: the newest checkpoint of ``run``."""
    cfg = tiny_cfg(hr_dir, train__iterations=6, train__ckpt_every=2, train__keep_checkpoints=3)
    train(cfg, output_dir=tmp_path / "ref", progress=False)
    train(cfg, output_dir=tmp_path / "run", stop_after=4, progress=False)
    files = ckio.list_checkpoints(tmp_path / "run")
    assert [it for it, _ in files] == [4, 2]
    return files[0][1]


def _resume_falls_back(tmp_path, warning):
    """Resuming ``run`` warns (skipping the damaged newest checkpoint) and ends where ``ref`` did."""
    with pytest.warns(UserWarning, match=warning):
        res = train(None, output_dir=tmp_path / "run", resume=True, progress=False)
    assert res.iteration == 6
    same_state(params(tmp_path / "ref"), params(tmp_path / "run"))


def test_truncated_newest_checkpoint_falls_back(hr_dir, tmp_path):
    newest = _newest_of_a_stopped_run(hr_dir, tmp_path)
    newest.write_bytes(newest.read_bytes()[: 200])  # a writer killed half-way (without the atomic rename)
    _resume_falls_back(tmp_path, "skipping checkpoint")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckio.save_checkpoint({"format": ckio.FORMAT, "version": 1, "x": torch.arange(5)}, run, 1, keep=2)

    def dying_save(obj, f):
        f.write(b"partial data")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckio.save_checkpoint({"format": ckio.FORMAT, "version": 1, "x": torch.arange(6)}, run, 2, keep=1)
    monkeypatch.undo()
    # the old checkpoint is intact, no partial new file and no temp file is left behind
    assert [p.name for p in ckio.checkpoint_dir(run).iterdir()] == ["iter_00000001.pt"]
    ck, path = ckio.load_latest(run)
    assert torch.equal(ck["x"], torch.arange(5))


def test_rotation_keeps_newest(tmp_path):
    for it in range(1, 5):
        ckio.save_checkpoint({"format": ckio.FORMAT, "version": 1, "it": it}, tmp_path, it, keep=2)
    assert [it for it, _ in ckio.list_checkpoints(tmp_path)] == [4, 3]


def _train_in_child(cfg, out):
    torch.set_num_threads(1)
    train(cfg, output_dir=out, progress=False)


def test_resume_after_sigkill_is_exact(hr_dir, tmp_path):
    """A real kill -9 of a training process mid-run; the resumed run ends with the straight run's weights.
    The child is forked (no second torch import, which takes many seconds on a loaded machine)."""
    import multiprocessing as mp

    cfg = tiny_cfg(hr_dir, train__iterations=100000, train__ckpt_every=1, train__val_every=100000,
                   train__log_every=1000, train__keep_checkpoints=3)
    proc = mp.get_context("fork").Process(target=_train_in_child, args=(cfg, tmp_path / "killed"), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            its = [it for it, _ in ckio.list_checkpoints(tmp_path / "killed")]
            if its and max(its) >= 4:
                break
            if not proc.is_alive():
                pytest.fail(f"training exited early with code {proc.exitcode}")
            time.sleep(0.005)
        else:
            pytest.fail("no checkpoint within 60 s")
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    got = ckio.load_latest(tmp_path / "killed")
    assert got is not None
    k = got[0]["iteration"]
    assert k >= 4
    end = k + 3
    res = train(None, output_dir=tmp_path / "killed", resume=True, overrides=[f"train.iterations={end}"],
                progress=False)
    assert res.iteration == end
    train(tiny_cfg(hr_dir, train__iterations=end, train__ckpt_every=1, train__val_every=100000,
                   train__log_every=1000), output_dir=tmp_path / "straight", progress=False)
    same_state(params(tmp_path / "straight"), params(tmp_path / "killed"))


# ---- evaluation ------------------------------------------------------------------------------------------------


def _identity_srcnn(scale):
    """SRCNN with 1x1 identity convs: its output is the bicubic-upsampled Y (ReLU is a no-op on Y >= 16/255)."""
    m = build("srcnn", scale, fused=False, kernel_sizes=[1, 1, 1], channels=[1, 1])
    with torch.no_grad():
        for conv in (m.features[0], m.map[0], m.reconstruction):
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    return m.eval()


def test_evaluate_identity_srcnn_matches_bicubic(hr_dir):
    spec = resolve_dataset(hr_dir, 2)
    model = evaluate(_identity_srcnn(2), [spec])[0]
    bic = evaluate_bicubic([spec], 2)[0]
    assert len(model.per_image) == 5
    # same Y up to where bicubic RGB overshoots [0, 1] (the baseline clamps RGB, the Y model clamps Y)
    for (n1, p1, s1), (n2, p2, s2) in zip(model.per_image, bic.per_image):
        assert n1 == n2
        assert p1 == pytest.approx(p2, abs=0.05) and s1 == pytest.approx(s2, abs=2e-3)
    # and an independent recomputation of one image's bicubic PSNR
    from srkernels.toolkit.data import PairedImageFolder

    lr, hr = PairedImageFolder(hr_dir, 2)[0]
    ref = psnr(imresize(lr, 2).clamp(0, 1), hr, crop_border=2)
    assert bic.per_image[0][1] == pytest.approx(ref, abs=1e-9)


def test_evaluate_options_and_table(hr_dir):
    spec = resolve_dataset({"hr_dir": str(hr_dir), "limit": 2, "name": "mini"}, 2)
    m = build(*TINY["rdn"][:2], fused=False, **TINY["rdn"][2]).eval()
    plain = evaluate(m, [spec])[0]
    q = evaluate(m, [spec], quantize=True)[0]
    typo = evaluate(m, [spec], y_coeffs="typo64738")[0]
    ens = evaluate(m, [spec], ensemble=True)[0]
    assert len(plain.per_image) == 2
    assert plain.psnr != q.psnr and plain.psnr != typo.psnr and plain.psnr != ens.psnr
    assert abs(plain.psnr - q.psnr) < 0.5
    table = markdown_table({"tiny-rdn": [plain]}, [evaluate_bicubic([spec], 2)[0]])
    lines = table.splitlines()
    assert lines[0] == "| set | scale | bicubic | tiny-rdn |"
    assert lines[2].startswith("| mini | x2 | ") and f"{plain.psnr:.2f} / {plain.ssim:.4f}" in lines[2]
    # a model without results for a row gets a dash
    other = evaluate(build("rdn", 3, fused=False, **TINY["rdn"][2]).eval(), [spec])[0]
    t2 = markdown_table({"a": [plain], "b": [other]})
    assert "| mini | x3 | — |" in t2


# ---- inference pipeline ------------------------------------------------------------------------------------


def test_ycbcr_round_trip_and_y_matches_metrics():
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    for c in ("bt601", "typo64738"):
        ycc = rgb_to_ycbcr(x, c)
        assert torch.allclose(ycc[:, :1], rgb_to_y(x, coeffs=c, data_range=1.0), atol=1e-12)
        assert torch.allclose(ycbcr_to_rgb(ycc, c), x, atol=1e-12)


@pytest.mark.parametrize("length, tile, overlap", [(37, 16, 4), (16, 16, 4), (10, 16, 2), (50, 11, 5), (64, 20, 0)])
def test_tile_spans_partition(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    cores = [(a, b) for _, _, a, b in spans]
    assert cores[0][0] == 0 and cores[-1][1] == length
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(cores, cores[1:]))
    for s0, s1, a, b in spans:
        assert 0 <= s0 <= a < b <= s1 <= length and s1 - s0 == min(tile, length)
        assert a - s0 >= min(overlap, a) and s1 - b >= min(overlap, length - b)
    with pytest.raises(ValueError, match="overlap"):
        tile_spans(length, 8, 4)


@pytest.mark.parametrize("key", ["rdn", "srcnn", "srcnn_valid", "srdensenet"])
def test_tiled_equals_full_forward_for_local_models(key):
    name, scale, args = TINY[key]
    torch.manual_seed(1)
    m = build(name, scale, fused=False, **args).eval()
    lr = torch.from_numpy(skdata.chelsea()[60:97, 150:201].copy()).permute(2, 0, 1).float() / 255  # 37 x 51
    full = Upscaler(m)(lr)
    # receptive radius of these tiny nets is < 8 LR px (SRCNN: plus 2 px of bicubic support)
    tiled_out = Upscaler(m, tile=24, overlap=8)(lr)
    assert Upscaler(m, tile=24, overlap=8).n_tiles(37, 51) > 4
    assert torch.allclose(tiled_out, full, atol=2e-6), (tiled_out - full).abs().max()
    # without enough overlap the seams show: the comparison above is not vacuous
    seams = Upscaler(m, tile=12, overlap=0)(lr)
    assert (seams - full).abs().max() > 1e-4
    # uint8 output is the rounded float output
    u8 = Upscaler(m, tile=24, overlap=8)(lr, out_dtype=torch.uint8)
    assert u8.dtype == torch.uint8 and (u8.float() - full * 255).abs().max() <= 0.5 + 1e-3


def test_tiled_rcan_runs_and_is_close():
    name, scale, args = TINY["rcan"]
    m = build(name, scale, fused=False, **args).eval()
    lr = torch.rand(1, 3, 30, 34)
    full, tl = Upscaler(m)(lr), Upscaler(m, tile=16, overlap=6)(lr)
    assert tl.shape == full.shape == (1, 3, 60, 68)
    assert (tl - full).abs().max() < 0.05  # global channel attention sees per-tile statistics


def test_chop_with_wide_shave_equals_full_forward():
    name, scale, args = TINY["rdn"]
    m = build(name, scale, fused=False, **args).eval()
    lr = torch.rand(1, 3, 26, 30)
    full = Upscaler(m).native(lr)
    chopped = Upscaler(m, chop=True).native(lr)  # 10 px shave > the tiny net's receptive radius
    assert torch.allclose(full, chopped, atol=2e-6)
    assert torch.equal(chopped, chop(lambda t: m(t), lr, scale))


def test_self_ensemble_is_the_mean_over_rotations_and_flips():
    name, scale, args = TINY["rdn"]
    m = build(name, scale, fused=False, **args).eval()
    lr = torch.rand(1, 3, 9, 13)
    got = Upscaler(m, ensemble=True).native(lr)
    with torch.no_grad():
        outs = []
        for flip in (False, True):
            x = lr.flip(-1) if flip else lr
            for k in range(4):
                y = torch.rot90(m(torch.rot90(x, k, (-2, -1))), -k, (-2, -1))
                outs.append(y.flip(-1) if flip else y)
    assert torch.allclose(got, torch.stack(outs).mean(0), atol=1e-6)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
    assert torch.allclose(self_ensemble(up, lr), up(lr))  # an equivariant map is unchanged


def test_y_only_models_keep_bicubic_chroma():
    m = _identity_srcnn(2)
    with torch.no_grad():
        m.reconstruction.bias.fill_(0.01)  # the network's Y = bicubic Y + 0.01
    lr = torch.rand(1, 3, 12, 10) * 0.5 + 0.25  # mid-range, so nothing clips
    up = Upscaler(m)
    rgb = up(lr)
    ycc = rgb_to_ycbcr(rgb.double()).float()
    bic = imresize(rgb_to_ycbcr(lr), 2)
    assert torch.allclose(up.native(lr), bic[:, :1] + 0.01, atol=1e-6)
    assert torch.allclose(ycc[:, :1], bic[:, :1] + 0.01, atol=1e-5)  # Y from the network
    assert torch.allclose(ycc[:, 1:], bic[:, 1:], atol=1e-5)  # Cb/Cr bicubic


def test_input_range_255_is_handled():
    name, scale, args = TINY["rdn"]
    torch.manual_seed(3)
    m1 = build(name, scale, fused=False, **args).eval()
    m255 = build(name, scale, fused=False, **{**args, "rgb_range": 255}).eval()
    m255.load_state_dict(m1.state_dict())
    lr = torch.rand(1, 3, 8, 8)
    # same weights on [0, 255] input: Upscaler scales in and out, so the result is m(255 x) / 255
    with torch.no_grad():
        assert torch.allclose(Upscaler(m255).native(lr), m1(lr * 255) / 255, atol=1e-5)


def test_upscaler_input_errors():
    m = build("rdn", 2, fused=False, **TINY["rdn"][2])
    with pytest.raises(TypeError, match="lr"):
        Upscaler(m)(np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="RGB"):
        Upscaler(m)(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="exclusive"):
        Upscaler(m, chop=True, tile=8)
    with pytest.raises(TypeError, match="zoo model"):
        Upscaler(torch.nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="tile"):
        tiled(lambda t: t, torch.rand(1, 1, 4, 4), 1, 0, 0)


def _flip_byte_in_tensor(path):
    """Flip one byte inside the first stored tensor of a torch zip file (no change to its size or layout)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 8)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupted_newest_checkpoint_falls_back(hr_dir, tmp_path):
    newest = _newest_of_a_stopped_run(hr_dir, tmp_path)
    _flip_byte_in_tensor(newest)  # bit rot in a tensor: torch.load alone reads it without a word
    with pytest.raises(ValueError, match="CRC"):
        ckio.read_checkpoint_file(newest)
    _resume_falls_back(tmp_path, "skipping checkpoint.*corrupt")


def test_resume_before_the_first_checkpoint_starts_over(hr_dir, tmp_path):
    import shutil

    cfg = tiny_cfg(hr_dir, train__iterations=4, train__ckpt_every=2)
    train(cfg, output_dir=tmp_path / "ref", progress=False)
    train(cfg, output_dir=tmp_path / "run", stop_after=2, progress=False)
    # as if killed before the first checkpoint: config.yaml and a few log rows, no checkpoint
    shutil.rmtree(ckio.checkpoint_dir(tmp_path / "run"))
    with pytest.warns(UserWarning, match="no checkpoint yet"):
        res = train(None, output_dir=tmp_path / "run", resume=True, progress=False)
    assert res.iteration == 4
    same_state(params(tmp_path / "ref"), params(tmp_path / "run"))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("it_per_s", "elapsed_s")} for r in rows]  # noqa
    assert strip(read_csv(tmp_path / "ref" / "train.csv")) == strip(read_csv(tmp_path / "run" / "train.csv"))


def test_logged_loss_after_resume_equals_the_uninterrupted_run(hr_dir, tmp_path):
    # log every 3 iterations, checkpoint every 2: the stop at 4 falls inside a logging window
    cfg = tiny_cfg(hr_dir, train__iterations=9, train__ckpt_every=2, train__log_every=3, train__val_every=9)
    train(cfg, output_dir=tmp_path / "straight", progress=False)
    train(cfg, output_dir=tmp_path / "split", stop_after=4, progress=False)
    train(None, output_dir=tmp_path / "split", resume=True, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("it_per_s", "elapsed_s")} for r in rows]  # noqa
    straight = strip(read_csv(tmp_path / "straight" / "train.csv"))
    assert [r["iteration"] for r in straight] == ["3", "6", "9"]
    assert straight == strip(read_csv(tmp_path / "split" / "train.csv"))


# ---- untrusted training checkpoints loaded directly (issue 16 follow-ups) ---------------------------------


def _one_checkpoint(hr_dir, tmp_path, key="rdn"):
    train(tiny_cfg(hr_dir, key, train__iterations=2, train__ckpt_every=2), output_dir=tmp_path / "run",
          progress=False)
    ((_, path),) = ckio.list_checkpoints(tmp_path / "run")
    return path


def test_directly_loaded_training_checkpoint_is_crc_checked(hr_dir, tmp_path):
    from srkernels.models.convert import CheckpointError

    path = _one_checkpoint(hr_dir, tmp_path)
    load_model(path, fused=False)  # intact: loads
    _flip_byte_in_tensor(path)  # bit rot in a tensor: torch.load alone reads it without a word
    with pytest.raises(CheckpointError, match="CRC"):
        load_model(path, fused=False)


@pytest.mark.parametrize("edit, field", [
    # sizes the tensors do not have (30000 features would be a 32 GB model; nothing is allocated)
    (lambda m: m["args"].update(num_features=30000), "config.model.args.num_features"),
    (lambda m: m["args"].update(num_blocks=3), "config.model.args.num_blocks"),
    (lambda m: m.update(args="notadict"), "config.model.args"),
    (lambda m: m["args"].update(bogus=1), "config.model.args.bogus"),
    (lambda m: m["args"].update(growth=[1, 2]), "config.model.args.growth"),
    (lambda m: m.update(name=5), "config.model.name"),
    (lambda m: m.update(name="nope"), "config.model.name"),
    (lambda m: m.update(scale="2"), "config.model.scale"),
    (lambda m: m.pop("args"), "config.model.args"),
])
def test_training_checkpoint_model_settings_are_validated(hr_dir, tmp_path, edit, field):
    import re

    from srkernels.models.convert import CheckpointError

    ck = torch.load(_one_checkpoint(hr_dir, tmp_path), weights_only=True)
    edit(ck["config"]["model"])
    evil = tmp_path / "iter_00000099.pt"
    torch.save(ck, evil)
    with pytest.raises(CheckpointError, match=re.escape(field)):
        load_model(evil, fused=False)


def test_training_checkpoint_max_params(hr_dir, tmp_path):
    from srkernels.models.convert import CheckpointError

    path = _one_checkpoint(hr_dir, tmp_path)
    with pytest.raises(CheckpointError, match="max_params"):
        load_model(path, fused=False, max_params=100)
    with pytest.raises(CheckpointError, match="max_params"):  # a run directory too
        load_model(tmp_path / "run", fused=False, max_params=100)
    assert load_model(path, fused=False) is not None


def test_a_run_that_fails_to_set_up_can_be_started_again(hr_dir, tmp_path):
    bad = tiny_cfg(hr_dir)
    bad["data"]["train"] = {"hr_dir": str(tmp_path / "missing")}
    with pytest.raises(ValueError, match="not a directory"):
        train(bad, output_dir=tmp_path / "run", progress=False)
    # the corrected command starts the run (before: "already holds a training run; pass --resume")
    assert train(tiny_cfg(hr_dir), output_dir=tmp_path / "run", progress=False).iteration == 3


def test_training_checkpoint_field_types_are_checked(hr_dir, tmp_path):
    from srkernels.models.convert import CheckpointError

    path = _one_checkpoint(hr_dir, tmp_path)
    ck = torch.load(path, weights_only=True)
    ck["params"] = "not a state dict"
    torch.save(ck, path)  # the newest (and only) checkpoint of the run
    with pytest.raises(CheckpointError, match="field params"):
        ckio.read_checkpoint_file(path)
    with pytest.warns(UserWarning, match="skipping checkpoint.*field params"):
        assert ckio.load_latest(tmp_path / "run") is None
