"""srkernels.toolkit.data: image I/O, HR/LR pairing, PairedImageFolder (alignment, augmentation, seeding, caches)."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import srkernels.toolkit.data as sd
from srkernels.toolkit.data import (
    PairedImageFolder,
    dihedral,
    find_dataset_dirs,
    find_lr_file,
    imresize,
    load_image,
    save_image,
)
from srkernels.toolkit.metrics import rgb_to_y


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path)
    return path


def _noise(h, w, seed, c=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()


def _photo(h, w, seed):
    # a crop of a bundled photograph, so images have structure as well as detail
    img = skdata.astronaut()
    y, x = 40 * seed, 60 + 30 * seed
    return np.ascontiguousarray(img[y : y + h, x : x + w])


def _u8(t):
    return torch.round(t * 255).to(torch.uint8)


def _find(big: torch.Tensor, small: torch.Tensor):
    """All (y, x) where ``small`` [C, p, q] occurs in ``big`` [C, H, W]."""
    p, q = small.shape[-2:]
    win = big.unfold(1, p, 1).unfold(2, q, 1)  # [C, H-p+1, W-q+1, p, q]
    hit = (win == small[:, None, None]).all(dim=(0, 3, 4))
    return [tuple(v) for v in hit.nonzero().tolist()]


def _which_transform(a, b):
    """The dihedral t with dihedral(a, t) == b (None if there is none)."""
    hits = [t for t in range(8) if dihedral(a, t).shape == b.shape and torch.equal(dihedral(a, t), b)]
    return hits[0] if len(hits) == 1 else None


# ---- image I/O -----------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    x = torch.rand(3, 9, 7, generator=torch.Generator().manual_seed(0))
    save_image(x, tmp_path / "a.png")
    back = load_image(tmp_path / "a.png")
    assert back.dtype == torch.float32 and back.shape == (3, 9, 7)
    expect = torch.floor(x.double() * 255 + 0.5)
    assert torch.equal(load_image(tmp_path / "a.png", dtype=torch.uint8), expect.to(torch.uint8))
    torch.testing.assert_close(back, expect.float() / 255, rtol=0, atol=1e-7)
    # uint8 tensors are written as they are; grey [H, W] and [1, C, H, W] are accepted
    u = torch.from_numpy(_noise(5, 6, 1)).permute(2, 0, 1).contiguous()
    save_image(u[None], tmp_path / "sub" / "b.bmp")
    assert torch.equal(load_image(tmp_path / "sub" / "b.bmp", dtype=torch.uint8), u)
    save_image(u[0], tmp_path / "g.png")
    assert torch.equal(load_image(tmp_path / "g.png", mode=None, dtype=torch.uint8), u[:1])
    assert torch.equal(load_image(tmp_path / "g.png", dtype=torch.uint8), u[:1].expand(3, -1, -1))
    assert sorted(os.listdir(tmp_path)) == ["a.png", "g.png", "sub"]  # no temp files left


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    save_image(torch.zeros(3, 4, 4), path)
    before = path.read_bytes()

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_image(torch.ones(3, 4, 4), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.png"]


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="out.xyz"):
        save_image(torch.zeros(3, 4, 4), tmp_path / "out.xyz")
    with pytest.raises(ValueError, match="C, H, W"):
        save_image(torch.zeros(5, 4, 4), tmp_path / "out.png")
    with pytest.raises(TypeError, match="img must be a torch.Tensor"):
        save_image(np.zeros((4, 4, 3)), tmp_path / "out.png")


def test_load_modes(tmp_path):
    rgba = _noise(4, 5, 2, c=4)
    _png(tmp_path / "rgba.png", rgba)
    assert torch.equal(load_image(tmp_path / "rgba.png", dtype=torch.uint8), torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))
    assert load_image(tmp_path / "rgba.png", mode=None).shape == (4, 4, 5)
    pal = Image.fromarray(_noise(4, 5, 3)).convert("P")
    pal.save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png").shape == (3, 4, 5)
    with pytest.raises(ValueError, match="mode"):
        load_image(tmp_path / "pal.png", mode="CMYK")


def test_corrupt_and_missing_files_are_named(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match="garbage.png"):
        load_image(tmp_path / "garbage.png")
    good = _png(tmp_path / "good.png", _noise(40, 40, 4))
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:300])  # valid header, truncated data
    with pytest.raises(ValueError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")


# ---- pairing rules -------------------------------------------------------------------------------------


def test_pairing_conventions(tmp_path):
    img = _noise(4, 4, 5)
    # DIV2K / EDSR benchmark: X{s}/{stem}x{s}.png
    hr = _png(tmp_path / "div2k" / "HR" / "0001.png", img)
    lr = _png(tmp_path / "div2k" / "LR" / "X2" / "0001x2.png", img)
    _png(tmp_path / "div2k" / "LR" / "X3" / "0001x3.png", img)
    assert find_lr_file(hr, tmp_path / "div2k" / "LR", 2) == lr
    assert find_lr_file(hr, tmp_path / "div2k" / "LR" / "X2", 2) == lr
    # SelfExSR: HR, LR and other methods' results in one folder
    d = tmp_path / "srf"
    for name in ("img_001_SRF_2_HR", "img_001_SRF_2_LR", "img_001_SRF_2_bicubic", "img_002_SRF_2_HR", "img_002_SRF_2_LR"):
        _png(d / f"{name}.png", img)
    assert find_lr_file(d / "img_001_SRF_2_HR.png", d, 2) == d / "img_001_SRF_2_LR.png"
    assert PairedImageFolder(d, 2, lr_dir=d).names == ["img_001_SRF_2_HR", "img_002_SRF_2_HR"]
    # RCAN_TestCode: baby_HR_x2 <-> baby_LRBI_x2
    hr = _png(tmp_path / "rcan" / "HR" / "baby_HR_x2.png", img)
    lr = _png(tmp_path / "rcan" / "LR" / "baby_LRBI_x2.png", img)
    assert find_lr_file(hr, tmp_path / "rcan" / "LR", 2) == lr
    # BasicSR: GTmod12/baby.png <-> LRbicx2/baby.png
    hr = _png(tmp_path / "basicsr" / "GTmod12" / "baby.png", img)
    lr = _png(tmp_path / "basicsr" / "LRbicx2" / "baby.png", img)
    assert find_lr_file(hr, tmp_path / "basicsr" / "LRbicx2", 2) == lr


def test_pairing_errors(tmp_path):
    img = _noise(4, 4, 6)
    hr = _png(tmp_path / "HR" / "bird.png", img)
    _png(tmp_path / "LR" / "other.png", img)
    with pytest.raises(ValueError, match="bird.png"):
        find_lr_file(hr, tmp_path / "LR", 2)
    with pytest.raises(ValueError, match="bird.png"):
        PairedImageFolder(tmp_path / "HR", 2, lr_dir=tmp_path / "LR")
    _png(tmp_path / "LR" / "birdx2.png", img)
    _png(tmp_path / "LR" / "birdx2.bmp", img)
    with pytest.raises(ValueError, match="ambiguous"):
        find_lr_file(hr, tmp_path / "LR", 2)
    with pytest.raises(ValueError, match="lr_dir"):
        find_lr_file(hr, tmp_path / "missing", 2)


def test_find_dataset_dirs(tmp_path):
    img = _noise(4, 4, 7)
    _png(tmp_path / "benchmark" / "Set5" / "HR" / "baby.png", img)
    _png(tmp_path / "benchmark" / "Set5" / "LR_bicubic" / "X2" / "babyx2.png", img)
    assert find_dataset_dirs(tmp_path, "Set5", 2) == (
        tmp_path / "benchmark" / "Set5" / "HR",
        tmp_path / "benchmark" / "Set5" / "LR_bicubic",
    )
    _png(tmp_path / "BSDS100" / "GTmod12" / "1.png", img)
    (tmp_path / "BSDS100" / "LRbicx4").mkdir()
    assert find_dataset_dirs(tmp_path, "B100", 4) == (tmp_path / "BSDS100" / "GTmod12", tmp_path / "BSDS100" / "LRbicx4")
    _png(tmp_path / "DIV2K" / "DIV2K_valid_HR" / "0801.png", img)
    assert find_dataset_dirs(tmp_path, "DIV2K", 3, split="valid") == (tmp_path / "DIV2K" / "DIV2K_valid_HR", None)
    _png(tmp_path / "Urban100" / "img_001.png", img)
    assert find_dataset_dirs(tmp_path, "urban100", 2) == (tmp_path / "Urban100", None)
    with pytest.raises(ValueError, match="Set14"):
        find_dataset_dirs(tmp_path, "Set14", 2)


# ---- dataset: LR made on the fly -----------------------------------------------------------------------


@pytest.fixture
def hr_folder(tmp_path):
    d = tmp_path / "hr"
    for i in range(3):  # sizes that are not multiples of the scale
        _png(d / f"{i:04d}.png", _photo(50 + i, 37 + 2 * i, i))
    _png(d / "0003.png", _noise(41, 44, 9))
    return d


def test_on_the_fly_lr_is_matlab_uint8_bicubic_of_modcropped_hr(hr_folder):
    ds = PairedImageFolder(hr_folder, 3)
    assert len(ds) == 4 and ds.names == ["0000", "0001", "0002", "0003"]
    for i in range(len(ds)):
        lr, hr = ds[i]
        with Image.open(ds.hr_files[i]) as im:
            src = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        h, w = src.shape[1] // 3 * 3, src.shape[2] // 3 * 3
        assert hr.dtype == lr.dtype == torch.float32
        assert hr.shape == (3, h, w) and lr.shape == (3, h // 3, w // 3)
        assert torch.equal(_u8(hr), src[:, :h, :w])
        assert torch.equal(_u8(lr), imresize(src[:, :h, :w].contiguous(), 1 / 3))
        assert float(lr.min()) >= 0 and float(lr.max()) <= 1


def test_patches_are_aligned_on_the_fly(hr_folder):
    s, p = 2, 6
    full = PairedImageFolder(hr_folder, s)
    ds = PairedImageFolder(hr_folder, s, patch_size=p)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            lr_p, hr_p = ds[i]
            lr, hr = full[i]
            assert lr_p.shape == (3, p, p) and hr_p.shape == (3, p * s, p * s)
            spots = _find(lr, lr_p)
            assert len(spots) == 1
            y, x = spots[0]
            assert torch.equal(hr_p, hr[:, s * y : s * (y + p), s * x : s * (x + p)])


def test_patches_are_aligned_with_given_lr(tmp_path):
    # HR made by replicating each LR pixel s x s times: an aligned HR patch is exactly the LR patch
    # replicated, a shift of a single HR pixel is not. Extra bottom/right HR pixels must be cropped away.
    s, p = 3, 4
    for i in range(3):
        lr = _noise(9 + i, 11, 10 + i)
        hr = np.kron(lr, np.ones((s, s, 1), dtype=np.uint8))
        hr = np.pad(hr, ((0, 2), (0, 1), (0, 0)), mode="wrap")  # not a multiple of s
        _png(tmp_path / "HR" / f"{i:04d}.png", hr)
        _png(tmp_path / "LR" / f"X{s}" / f"{i:04d}x{s}.png", lr)
    ds = PairedImageFolder(tmp_path / "HR", s, lr_dir=tmp_path / "LR", patch_size=p, augment=True, seed=3)
    whole = PairedImageFolder(tmp_path / "HR", s, lr_dir=tmp_path / "LR")
    assert whole[0][1].shape == (3, 27, 33)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            lr_p, hr_p = ds[i]
            assert torch.equal(hr_p, lr_p.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2))


def test_lr_size_must_be_floor_of_hr(tmp_path):
    _png(tmp_path / "HR" / "a.png", _noise(20, 20, 11))
    _png(tmp_path / "LR" / "a.png", _noise(9, 10, 12))
    ds = PairedImageFolder(tmp_path / "HR", 2, lr_dir=tmp_path / "LR")
    with pytest.raises(ValueError, match=r"LR file .*a\.png is 10x9 but HR file .*a\.png is 20x20"):
        ds[0]


def test_augmentation_is_one_dihedral_transform_for_both(hr_folder):
    plain = PairedImageFolder(hr_folder, 2, patch_size=5, seed=1)
    aug = PairedImageFolder(hr_folder, 2, patch_size=5, seed=1, augment=True)
    seen = set()
    for epoch in range(10):
        plain.set_epoch(epoch)
        aug.set_epoch(epoch)
        for i in range(len(aug)):
            (lr0, hr0), (lr1, hr1) = plain[i], aug[i]  # same crop (drawn first), then the transform
            t_lr, t_hr = _which_transform(lr0, lr1), _which_transform(hr0, hr1)
            assert t_lr is not None and t_lr == t_hr
            seen.add(t_lr)
    assert seen == set(range(8))


def test_seeded_per_seed_epoch_index(hr_folder):
    a = PairedImageFolder(hr_folder, 2, patch_size=4, augment=True, seed=7)
    b = PairedImageFolder(hr_folder, 2, patch_size=4, augment=True, seed=7)
    order_a = [a[i] for i in range(4)]
    order_b = [b[i] for i in reversed(range(4))][::-1]  # access order does not matter
    for (la, ha), (lb, hb) in zip(order_a, order_b):
        assert torch.equal(la, lb) and torch.equal(ha, hb)
    a.set_epoch(1)
    assert any(not torch.equal(a[i][0], order_a[i][0]) for i in range(4))
    a.set_epoch(0)
    assert all(torch.equal(a[i][0], order_a[i][0]) for i in range(4))
    c = PairedImageFolder(hr_folder, 2, patch_size=4, augment=True, seed=8)
    assert any(not torch.equal(c[i][0], order_a[i][0]) for i in range(4))


def test_dataloader_workers_give_the_same_batches(hr_folder):
    ds = PairedImageFolder(hr_folder, 2, patch_size=4, augment=True, seed=5)
    ds.set_epoch(2)
    serial = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0))
    parallel = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2))
    assert serial[0][0].shape == (2, 3, 4, 4) and serial[0][1].shape == (2, 3, 8, 8)
    for (l0, h0), (l1, h1) in zip(serial, parallel):
        assert torch.equal(l0, l1) and torch.equal(h0, h1)


def test_y_only(hr_folder):
    rgb = PairedImageFolder(hr_folder, 2, patch_size=6)
    y = PairedImageFolder(hr_folder, 2, patch_size=6, y_only=True)
    lr_y, hr_y = y[1]
    lr, hr = rgb[1]
    assert lr_y.shape == (1, 6, 6) and hr_y.shape == (1, 12, 12)
    torch.testing.assert_close(lr_y, rgb_to_y(lr))
    torch.testing.assert_close(hr_y, rgb_to_y(hr))
    assert float(hr_y.min()) >= 16 / 255 - 1e-6 and float(hr_y.max()) <= 235 / 255 + 1e-6


# ---- caches --------------------------------------------------------------------------------------------


@pytest.fixture
def count_resizes(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return imresize(*args, **kwargs)

    monkeypatch.setattr(sd, "imresize", counting)
    return calls


def test_memory_cache_computes_lr_once(hr_folder, count_resizes):
    ds = PairedImageFolder(hr_folder, 2, patch_size=4, augment=True)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ds[i]
    assert len(count_resizes) == len(ds)


def test_disk_cache(hr_folder, tmp_path, count_resizes):
    cache = tmp_path / "cache"
    a = PairedImageFolder(hr_folder, 3, cache_dir=cache)
    first = [a[i] for i in range(len(a))]
    assert len(count_resizes) == 4
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and all(f.endswith(".npy") and "_x3_" in f for f in files)
    b = PairedImageFolder(hr_folder, 3, cache_dir=cache)  # a fresh process would see the same
    for i in range(len(b)):
        assert torch.equal(b[i][0], first[i][0])
    assert len(count_resizes) == 4
    # a changed HR file gets a new cache entry (key: path, size, mtime)
    _png(hr_folder / "0000.png", _noise(30, 30, 13))
    lr, hr = b[0]
    assert len(count_resizes) == 5 and lr.shape == (3, 10, 10)
    # a damaged cache file is recomputed with a warning, then rewritten
    damaged = cache / files[1]
    damaged.write_bytes(b"junk")
    with pytest.warns(UserWarning, match="LR cache file"):
        lr, _ = b[1]
    assert torch.equal(lr, first[1][0]) and len(count_resizes) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b[1]
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]


# ---- dataset errors ------------------------------------------------------------------------------------


def test_dataset_errors(tmp_path, hr_folder):
    with pytest.raises(ValueError, match="hr_dir is not a directory"):
        PairedImageFolder(tmp_path / "missing", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        PairedImageFolder(tmp_path / "empty", 2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="scale"):
            PairedImageFolder(hr_folder, bad)
    with pytest.raises(ValueError, match="patch_size"):
        PairedImageFolder(hr_folder, 2, patch_size=0)
    with pytest.raises(ValueError, match="patch_size 30"):
        PairedImageFolder(hr_folder, 2, patch_size=30)[0]
    with pytest.raises(IndexError):
        PairedImageFolder(hr_folder, 2)[4]


def test_corrupt_image_in_dataset_is_named(hr_folder):
    (hr_folder / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    ds = PairedImageFolder(hr_folder, 2)
    ds[1]
    with pytest.raises(ValueError, match="0002.png"):
        ds[2]


def test_grey_hr_is_replicated_to_rgb(tmp_path):
    g = _noise(12, 12, 14, c=1)
    _png(tmp_path / "g.png", g)
    lr, hr = PairedImageFolder(tmp_path, 2)[0]
    assert hr.shape == (3, 12, 12) and torch.equal(hr[0], hr[2]) and torch.equal(lr[0], lr[1])


def _png16(path, arr):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB)."""
    import struct
    import zlib

    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("c", [1, 2, 3, 4])
def test_16bit_images_are_refused_never_truncated(tmp_path, c):
    arr = (np.arange(4 * 5 * c).reshape(4, 5, c) * 997 + 3).astype(np.uint16)
    path = _png16(tmp_path / "deep.png", arr)
    for mode in ("RGB", None):
        with pytest.raises(ValueError, match="16/32-bit"):
            load_image(path, mode=mode)


def test_grey_alpha_keeps_its_two_channels(tmp_path):
    la = _noise(4, 5, 2, c=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    got = load_image(tmp_path / "la.png", mode=None, dtype=torch.uint8)
    assert torch.equal(got, torch.from_numpy(la).permute(2, 0, 1))
    save_image(got, tmp_path / "out.png")
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "LA" and np.array_equal(np.asarray(im), la)
