"""srkernels.toolkit.metrics: hand-computed PSNR cases, Y coefficients, SSIM against scikit-image, edge cases."""
import math

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from srkernels.toolkit.metrics import psnr, rgb_to_y, ssim

PEAK_DB = 20 * math.log10(255)  # PSNR of an error of exactly one level everywhere


def _rand_u8(*shape, seed=0, lo=0, hi=256):
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _photo(size=48):
    """A crop of a bundled photograph, [3, H, W] uint8."""
    return torch.from_numpy(skdata.astronaut()[100 : 100 + size, 180 : 180 + size].copy()).permute(2, 0, 1)


# ---- Y channel -----------------------------------------------------------------------------------------

Y_BT601 = {"black": 16.0, "white": 235.0, "red": 16 + 65.481, "green": 16 + 128.553, "blue": 16 + 24.966}
Y_TYPO = {
    "black": 16.0,
    "white": 16 + (64.738 + 129.057 + 25.064) * 255 / 256,
    "red": 16 + 64.738 * 255 / 256,
    "green": 16 + 129.057 * 255 / 256,
    "blue": 16 + 25.064 * 255 / 256,
}
RGB = {"black": (0, 0, 0), "white": (255, 255, 255), "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.mark.parametrize("coeffs,table", [("bt601", Y_BT601), ("typo64738", Y_TYPO)])
def test_y_of_pure_colours(coeffs, table):
    pixels = torch.tensor([RGB[k] for k in table], dtype=torch.float64).T.reshape(3, 1, -1)  # [3, 1, 5]
    expect = torch.tensor(list(table.values()), dtype=torch.float64).reshape(1, 1, -1)
    torch.testing.assert_close(rgb_to_y(pixels, coeffs=coeffs, data_range=255), expect, rtol=0, atol=1e-12)
    # [0, 1] input gives Y on [0, 1]
    torch.testing.assert_close(rgb_to_y(pixels / 255, coeffs=coeffs), expect / 255, rtol=0, atol=1e-12)
    # uint8 tensors and numpy HWC arrays: same numbers
    torch.testing.assert_close(rgb_to_y(pixels.to(torch.uint8), coeffs=coeffs), expect, rtol=0, atol=1e-12)
    hwc = pixels.permute(1, 2, 0).numpy().astype(np.uint8)
    np.testing.assert_allclose(rgb_to_y(hwc, coeffs=coeffs)[..., 0], expect[0].numpy(), rtol=0, atol=1e-12)


def test_bt601_is_the_256_form_of_the_spec():
    # docs/architectures.md §1.1: 16 + (65.481 R + 128.553 G + 24.966 B)/255
    #                          == 16 + (65.738 R + 129.057 G + 25.064 B)/256
    rgb = _rand_u8(3, 5, 7, seed=1).double()
    y256 = 16 + (65.738 * rgb[0] + 129.057 * rgb[1] + 25.064 * rgb[2]) / 256
    torch.testing.assert_close(rgb_to_y(rgb, data_range=255)[0], y256, rtol=0, atol=2e-3)


def test_rgb_to_y_batched_keeps_dims_and_dtype():
    x = torch.rand(2, 3, 4, 5)
    y = rgb_to_y(x)
    assert y.shape == (2, 1, 4, 5) and y.dtype == torch.float32


def test_rgb_to_y_errors():
    with pytest.raises(ValueError, match="3, H, W"):
        rgb_to_y(torch.rand(4, 5, 5))
    with pytest.raises(ValueError, match="coeffs"):
        rgb_to_y(torch.rand(3, 5, 5), coeffs="bt709")
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_y(torch.zeros(3, 2, 2, dtype=torch.uint8), data_range=1.0)
    with pytest.raises(ValueError, match="HWC"):
        rgb_to_y(np.zeros((3, 4, 4)))


# ---- PSNR: hand-computed -------------------------------------------------------------------------------


def test_one_level_everywhere_is_20log10_255():
    hr = _rand_u8(3, 20, 20, seed=2, hi=255)
    sr = hr + 1
    assert psnr(sr, hr, crop_border=0, y_channel=False) == pytest.approx(PEAK_DB, abs=1e-12)
    # the same images as floats on [0, 1]
    assert psnr(sr.double() / 255, hr.double() / 255, crop_border=2, y_channel=False) == pytest.approx(PEAK_DB, abs=1e-9)
    # one channel is taken as Y already
    assert psnr(sr[:1], hr[:1], crop_border=0) == pytest.approx(PEAK_DB, abs=1e-12)
    # on Y of RGB, +1 in R, G and B moves Y by (65.481 + 128.553 + 24.966)/255 = 219/255
    assert psnr(sr, hr, crop_border=0) == pytest.approx(20 * math.log10(255 * 255 / 219), abs=1e-9)
    typo_step = (64.738 + 129.057 + 25.064) / 256
    assert psnr(sr, hr, crop_border=0, coeffs="typo64738") == pytest.approx(
        20 * math.log10(255 / typo_step), abs=1e-9
    )


def test_known_mse():
    hr = torch.zeros(1, 8, 8, dtype=torch.uint8)
    sr = hr.clone()
    sr[0, :4, :4] = 4  # 16 of 64 pixels off by 4: MSE = 16 * 16 / 64 = 4
    assert psnr(sr, hr, crop_border=0) == pytest.approx(10 * math.log10(255**2 / 4), abs=1e-12)
    # RGB mode averages the squared error over all channels: (1 + 4 + 0) / 3
    hr3 = _rand_u8(3, 6, 6, seed=3, lo=10, hi=200)
    sr3 = hr3 + torch.tensor([1, 2, 0], dtype=torch.uint8).view(3, 1, 1)
    assert psnr(sr3, hr3, crop_border=0, y_channel=False) == pytest.approx(10 * math.log10(255**2 / (5 / 3)), abs=1e-12)


def test_identical_is_inf_and_crop_removes_the_border():
    hr = _rand_u8(3, 16, 16, seed=4)
    assert psnr(hr, hr, crop_border=4) == math.inf
    sr = hr.clone()
    sr[:, :2, :] = 255 - sr[:, :2, :]  # damage the top two rows only
    sr[:, :, -2:] = 0
    assert psnr(sr, hr, crop_border=2) == math.inf
    assert math.isfinite(psnr(sr, hr, crop_border=1))


def test_quantize_rounds_like_an_8bit_file():
    hr = _rand_u8(3, 12, 12, seed=5, hi=255).double()
    assert psnr(hr + 0.4, hr, crop_border=0, data_range=255) < 100
    assert psnr(hr + 0.4, hr, crop_border=0, data_range=255, quantize=True) == math.inf
    # .5 rounds away from zero (not to even): +0.5 becomes exactly one level
    assert psnr(hr + 0.5, hr, crop_border=0, y_channel=False, data_range=255, quantize=True) == pytest.approx(
        PEAK_DB, abs=1e-12
    )
    # values above white are clamped first
    white = torch.full((1, 12, 12), 255.0, dtype=torch.float64)
    assert psnr(white + 40, white, crop_border=0, data_range=255, quantize=True) == math.inf
    # quantize acts on sr only; float [0, 1] input works too
    assert psnr((hr + 0.3) / 255, hr / 255, crop_border=1, quantize=True) == math.inf


def test_agrees_with_skimage_psnr_on_y():
    hr = _photo()
    noise = torch.randn(hr.shape, generator=torch.Generator().manual_seed(6)) * 6
    sr = (hr.double() + noise).clamp(0, 255) / 255
    ours = psnr(sr, hr.double() / 255, crop_border=4)
    y_sr = rgb_to_y(sr, data_range=1.0)[0, 4:-4, 4:-4].numpy() * 255
    y_hr = rgb_to_y(hr)[0, 4:-4, 4:-4].numpy()
    assert ours == pytest.approx(peak_signal_noise_ratio(y_hr, y_sr, data_range=255), abs=1e-9)


# ---- SSIM ----------------------------------------------------------------------------------------------


def test_ssim_identical_is_one():
    hr = _photo()
    assert ssim(hr, hr, crop_border=2) == pytest.approx(1.0, abs=1e-12)
    assert ssim(hr, hr, crop_border=0, y_channel=False) == pytest.approx(1.0, abs=1e-12)


def _skimage_ssim(a: np.ndarray, b: np.ndarray, **kw):
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, **kw
    )


@pytest.mark.parametrize("crop", [0, 3])
def test_ssim_matches_skimage_on_y(crop):
    # scikit-image filters with 'same' output (reflect padding) but averages only the map cropped by
    # (11 - 1) / 2 = 5 pixels, i.e. exactly the windows that lie inside the image: MATLAB's 'valid' region.
    hr = _photo()
    noise = torch.randn(hr.shape, generator=torch.Generator().manual_seed(7)) * 10
    sr = (hr.double() + noise).clamp(0, 255)
    y_sr = rgb_to_y(sr, data_range=255)[0].numpy()
    y_hr = rgb_to_y(hr)[0].numpy()
    if crop:
        y_sr, y_hr = y_sr[crop:-crop, crop:-crop], y_hr[crop:-crop, crop:-crop]
    ref, full_map = _skimage_ssim(y_hr, y_sr, full=True)
    ours = ssim(sr, hr.double(), crop_border=crop, data_range=255)
    assert ours == pytest.approx(ref, abs=1e-10)
    assert ours == pytest.approx(full_map[5:-5, 5:-5].mean(), abs=1e-10)
    # averaging the whole 'same' map (border windows see reflected pixels) is a different number
    assert abs(full_map.mean() - ours) > 1e-4


def test_ssim_rgb_mode_is_mean_of_channels_and_matches_skimage():
    hr = _photo(40)
    sr = (hr.double() + torch.randn(hr.shape, generator=torch.Generator().manual_seed(8)) * 8).clamp(0, 255)
    ours = ssim(sr, hr.double(), crop_border=2, y_channel=False, data_range=255)
    per_channel = [ssim(sr[c : c + 1], hr[c : c + 1].double(), crop_border=2, data_range=255) for c in range(3)]
    assert ours == pytest.approx(sum(per_channel) / 3, abs=1e-12)
    a = hr.permute(1, 2, 0).double().numpy()[2:-2, 2:-2]
    b = sr.permute(1, 2, 0).numpy()[2:-2, 2:-2]
    assert ours == pytest.approx(_skimage_ssim(a, b, channel_axis=2), abs=1e-10)


def test_ssim_of_constant_images():
    a = torch.full((1, 16, 16), 100.0, dtype=torch.float64)
    b = torch.full((1, 16, 16), 110.0, dtype=torch.float64)
    c1 = (0.01 * 255) ** 2
    # no variance: the structure term is C2/C2 and only luminance is left
    expect = (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1)
    assert ssim(a, b, crop_border=0, data_range=255) == pytest.approx(expect, abs=1e-12)
    assert ssim(a, a, crop_border=0, data_range=255) == pytest.approx(1.0, abs=1e-12)
    assert psnr(a, b, crop_border=0, data_range=255) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)


def test_ssim_lower_for_more_noise_and_typo_switch_matters():
    hr = _photo().double()
    g = torch.Generator().manual_seed(9)
    small = (hr + torch.randn(hr.shape, generator=g) * 3).clamp(0, 255)
    large = (hr + torch.randn(hr.shape, generator=g) * 20).clamp(0, 255)
    assert ssim(large, hr, crop_border=2, data_range=255) < ssim(small, hr, crop_border=2, data_range=255) < 1
    assert psnr(small, hr, crop_border=2, data_range=255) != pytest.approx(
        psnr(small, hr, crop_border=2, data_range=255, coeffs="typo64738"), abs=1e-3
    )


# ---- input kinds ---------------------------------------------------------------------------------------


def test_numpy_hwc_and_tensor_chw_agree():
    hr = _photo()
    sr = (hr.double() + torch.randn(hr.shape, generator=torch.Generator().manual_seed(10)) * 5).clamp(0, 255)
    sr = sr.round().to(torch.uint8)
    for fn in (psnr, ssim):
        t = fn(sr.float() / 255, hr.float() / 255, crop_border=3)
        n = fn(sr.permute(1, 2, 0).numpy(), hr.permute(1, 2, 0).numpy(), crop_border=3)
        nf = fn(sr.permute(1, 2, 0).numpy() / 255.0, hr.permute(1, 2, 0).numpy() / 255.0, crop_border=3)
        assert isinstance(t, float) and isinstance(n, float)
        # float32 [0, 1] input loses ~1e-7 relative before the float64 maths starts
        assert t == pytest.approx(n, rel=1e-6) and nf == pytest.approx(n, abs=1e-10)
    # grey HW numpy arrays
    g = hr[0].numpy()
    assert psnr(g, g, crop_border=1) == math.inf


def test_batch_gives_per_image_values():
    hr = torch.stack([_photo(), _photo().flip(-1)]).double() / 255
    sr = (hr + 0.02 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)).clamp(0, 1)
    for fn in (psnr, ssim):
        out = fn(sr, hr, crop_border=2)
        assert isinstance(out, torch.Tensor) and out.shape == (2,) and out.dtype == torch.float64
        for i in range(2):
            assert out[i].item() == pytest.approx(fn(sr[i], hr[i], crop_border=2), abs=1e-12)
        assert out[0] != out[1]
    one = psnr(sr[:1], hr[:1], crop_border=2)
    assert isinstance(one, torch.Tensor) and one.shape == (1,)


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_errors(fn):
    x = torch.rand(3, 16, 16)
    with pytest.raises(ValueError, match="sr and hr must have the same shape"):
        fn(x, torch.rand(3, 16, 15), crop_border=0)
    with pytest.raises(ValueError, match="sr/hr: y_channel=True needs 3"):
        fn(torch.rand(2, 16, 16), torch.rand(2, 16, 16), crop_border=0)
    with pytest.raises(ValueError, match="crop_border"):
        fn(x, x, crop_border=8)
    with pytest.raises(ValueError, match="crop_border"):
        fn(x, x, crop_border=-1)
    with pytest.raises(ValueError, match="coeffs"):
        fn(x, x, crop_border=0, coeffs="bt709")
    with pytest.raises(ValueError, match="hr is uint8"):
        fn(x, torch.zeros(3, 16, 16, dtype=torch.uint8), crop_border=0, data_range=1.0)
    with pytest.raises(ValueError, match="sr must be"):
        fn(torch.rand(16, 16), torch.rand(16, 16), crop_border=0)
    with pytest.raises(TypeError, match="sr must be a torch.Tensor or numpy.ndarray"):
        fn([[0.0]], x, crop_border=0)
    with pytest.raises(TypeError, match="hr must be a floating-point or uint8"):
        fn(x, torch.zeros(3, 16, 16, dtype=torch.int32), crop_border=0)
    # two channels are fine in RGB mode
    assert fn(torch.ones(2, 16, 16), torch.ones(2, 16, 16), crop_border=0, y_channel=False) > 0


def test_ssim_needs_an_11x11_window():
    x = torch.rand(3, 20, 20)
    assert ssim(x, x, crop_border=4) == pytest.approx(1.0)  # 12 x 12 left
    with pytest.raises(ValueError, match="11x11"):
        ssim(x, x, crop_border=5)
