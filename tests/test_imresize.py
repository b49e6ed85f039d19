"""srkernels.toolkit.data.imresize: MATLAB bicubic, checked against a slow independent re-derivation and properties."""
import math

import numpy as np
import pytest
import torch

from srkernels.toolkit.data import dihedral, imresize, modcrop, quantize_uint8, to_uint8

SCALES = [1 / 2, 1 / 3, 1 / 4, 2, 3, 4]


# ---- independent reference: MATLAB's documented algorithm, one output pixel at a time -------------------


def _ref_cubic(t: float) -> float:
    a = abs(t)
    if a <= 1:
        return 1.5 * a**3 - 2.5 * a**2 + 1
    if a <= 2:
        return -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2
    return 0.0


def _ref_linear(t: float) -> float:
    return max(0.0, 1 - abs(t))


def _ref_source(j: int, n: int, padding: str) -> int:
    """1-based tap position -> 0-based pixel, by walking back into the image (not a lookup table)."""
    if padding == "replicate":
        return min(max(j, 1), n) - 1
    while j < 1 or j > n:  # half-sample symmetric: 0 -> 1, -1 -> 2, n+1 -> n
        j = 1 - j if j < 1 else 2 * n + 1 - j
    return j - 1


def _ref_matrix(n_in, n_out, scale, padding="replicate", kernel="cubic", antialias=True) -> np.ndarray:
    """Dense [n_out, n_in] operator of one axis; repeated border taps add up in the same column."""
    k, support = (_ref_cubic, 4.0) if kernel == "cubic" else (_ref_linear, 2.0)
    stretch = scale < 1 and antialias
    width = support / scale if stretch else support
    m = np.zeros((n_out, n_in))
    for i in range(1, n_out + 1):
        centre = i / scale + 0.5 * (1 - 1 / scale)
        first = math.floor(centre - width / 2)
        taps = [(j, scale * k(scale * (centre - j)) if stretch else k(centre - j))
                for j in range(first, first + math.ceil(width) + 2)]
        total = sum(w for _, w in taps)
        for j, w in taps:
            m[i - 1, _ref_source(j, n_in, padding)] += w / total
    return m


def _ref_imresize(img: np.ndarray, scale, padding="replicate", kernel="cubic", antialias=True, uint8=False):
    """img [H, W] float64 -> resized; uint8=True rounds (half away) + saturates after each axis, smaller
    scale first (MATLAB's uint8 path)."""
    sh, sw = (scale, scale) if np.isscalar(scale) else scale
    h, w = img.shape
    mh = _ref_matrix(h, math.ceil(sh * h), sh, padding, kernel, antialias)
    mw = _ref_matrix(w, math.ceil(sw * w), sw, padding, kernel, antialias)

    def q(v):
        return np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), 0, 255) if uint8 else v

    out = img.astype(np.float64)
    if sw < sh:
        out = q(out @ mw.T)
        return q(mh @ out)
    out = q(mh @ out)
    return q(out @ mw.T)


# ---- exactness against the reference -------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["replicate", "symmetric"])
@pytest.mark.parametrize("scale", SCALES + [0.7, 1.5, (0.5, 3)])
def test_matches_reference_float64(scale, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 13, 10, generator=g, dtype=torch.float64)
    out = imresize(x, scale, padding=padding)
    for c in range(2):
        ref = _ref_imresize(x[c].numpy(), scale, padding)
        assert out[c].shape == ref.shape
        np.testing.assert_allclose(out[c].numpy(), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kernel,antialias", [("linear", True), ("cubic", False), ("linear", False)])
@pytest.mark.parametrize("scale", [1 / 3, 2])
def test_matches_reference_other_kernels(kernel, antialias, scale):
    x = torch.rand(11, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = imresize(x, scale, kernel=kernel, antialias=antialias)
    ref = _ref_imresize(x.numpy(), scale, kernel=kernel, antialias=antialias)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-10)


def test_padding_differs_only_near_the_border():
    x = torch.rand(40, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a, b = imresize(x, 1 / 4), imresize(x, 1 / 4, padding="symmetric")
    diff = (a - b).abs() > 1e-12
    assert diff.any()
    # kernel half-width is 2 output pixels at any downscale; one more for the tap rounding
    assert not diff[3:-3, 3:-3].any()


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 3, (1 / 3, 2), (2, 1 / 3)])
def test_uint8_is_matlab_uint8_pipeline(scale):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (3, 12, 15), generator=g, dtype=torch.uint8)
    out = imresize(x, scale)
    assert out.dtype == torch.uint8
    for c in range(3):
        ref = _ref_imresize(x[c].double().numpy(), scale, uint8=True)
        np.testing.assert_array_equal(out[c].numpy(), ref.astype(np.uint8))


def test_uint8_rounds_after_each_axis_not_once():
    x = torch.randint(0, 256, (3, 24, 24), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    once = to_uint8(imresize(x.double(), 1 / 3), 255)
    assert not torch.equal(imresize(x, 1 / 3), once)


# ---- properties ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["replicate", "symmetric"])
@pytest.mark.parametrize("scale", SCALES + [0.3, 2.5])
def test_constant_image_preserved(scale, padding):
    x = torch.full((3, 9, 14), 0.37, dtype=torch.float64)
    out = imresize(x, scale, padding=padding)
    torch.testing.assert_close(out, torch.full_like(out, 0.37), rtol=0, atol=1e-12)


def _centres(n_out: int, scale: float) -> torch.Tensor:
    # 0-based input coordinate each output pixel samples (MATLAB mapping, shifted to 0-based)
    i = torch.arange(1, n_out + 1, dtype=torch.float64)
    return i / scale + 0.5 * (1 - 1 / scale) - 1


@pytest.mark.parametrize("scale", SCALES)
def test_linear_ramp_preserved_in_the_interior(scale):
    h, w = 24, 30
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    x = 0.3 * yy - 0.7 * xx + 5.0
    out = imresize(x, scale)
    cy, cx = _centres(out.shape[0], scale), _centres(out.shape[1], scale)
    expect = 0.3 * cy[:, None] - 0.7 * cx[None, :] + 5.0
    # taps reach 2 input pixels (2/scale when antialiased) from the centre: stay that far from the border
    reach = 2 / scale if scale < 1 else 2
    ok_y = (cy - reach >= 0) & (cy + reach <= h - 1)
    ok_x = (cx - reach >= 0) & (cx + reach <= w - 1)
    assert ok_y.sum() >= 2 and ok_x.sum() >= 2
    torch.testing.assert_close(out[ok_y][:, ok_x], expect[ok_y][:, ok_x], rtol=0, atol=1e-10)
    # near the border the ramp bends (end pixels are replicated): the check above is not vacuous
    assert (out - expect).abs().max() > 1e-3


@pytest.mark.parametrize(
    "shape,scale,size,expected",
    [
        ((7, 9), 1 / 2, None, (4, 5)),
        ((7, 9), 1 / 3, None, (3, 3)),
        ((7, 9), 1 / 4, None, (2, 3)),
        ((7, 9), 2.5, None, (18, 23)),
        ((7, 9), 0.3, None, (3, 3)),
        ((7, 9), (2, 0.5), None, (14, 5)),
        ((12, 12), 1 / 3, None, (4, 4)),
        ((7, 9), None, (5, 11), (5, 11)),
        ((1, 1), 3, None, (3, 3)),
    ],
)
def test_output_sizes(shape, scale, size, expected):
    out = imresize(torch.rand(2, *shape), scale, size=size)
    assert tuple(out.shape) == (2, *expected)


def test_down_then_up_shapes():
    x = torch.rand(3, 12, 18)
    assert imresize(imresize(x, 1 / 3), 3).shape == x.shape
    # not a multiple of 3: ceil(10/3) = 4, so x3 gives 12 (why HR must be modcropped first)
    assert imresize(imresize(torch.rand(3, 10, 10), 1 / 3), 3).shape[-2:] == (12, 12)
    assert imresize(imresize(modcrop(torch.rand(3, 10, 11), 3), 1 / 3), 3).shape[-2:] == (9, 9)


def test_scale_one_is_identity():
    x = torch.rand(3, 8, 5, dtype=torch.float64)
    assert torch.equal(imresize(x, 1), x)


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 3])
def test_flip_and_transpose_equivariance(scale):
    x = torch.rand(2, 12, 18, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = imresize(x, scale)
    for t in range(8):
        torch.testing.assert_close(imresize(dihedral(x, t), scale), dihedral(out, t), rtol=0, atol=1e-12)


def test_batch_equals_per_image_and_2d():
    x = torch.rand(3, 2, 10, 13, generator=torch.Generator().manual_seed(6))
    out = imresize(x, 1 / 3)
    for n in range(3):
        torch.testing.assert_close(out[n], imresize(x[n], 1 / 3), rtol=0, atol=0)
    torch.testing.assert_close(imresize(x[0, 0], 2), imresize(x[0], 2)[0], rtol=0, atol=0)


def test_layouts_give_the_same_result():
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(7))
    ref = imresize(x, 1 / 2)
    torch.testing.assert_close(imresize(x.contiguous(memory_format=torch.channels_last), 1 / 2), ref)
    torch.testing.assert_close(imresize(x.transpose(-2, -1), 1 / 2), ref.transpose(-2, -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_dtypes(dtype, tol):
    x = torch.rand(3, 16, 12, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for s in (1 / 4, 3):
        out = imresize(x.to(dtype), s)
        assert out.dtype == dtype
        # the input itself is rounded to dtype, so compare with the float64 resize of the rounded input
        torch.testing.assert_close(out.double(), imresize(x.to(dtype).double(), s), rtol=0, atol=tol)


def test_differentiable():
    x = torch.rand(1, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: imresize(t, 1 / 2), (x,))
    assert torch.autograd.gradcheck(lambda t: imresize(t, 2), (x,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_matches_cpu():
    x = torch.rand(2, 3, 20, 17, dtype=torch.float64)
    torch.testing.assert_close(imresize(x.cuda(), 1 / 3).cpu(), imresize(x, 1 / 3), rtol=0, atol=1e-12)
    u = torch.randint(0, 256, (3, 20, 17), dtype=torch.uint8)
    assert torch.equal(imresize(u.cuda(), 1 / 2).cpu(), imresize(u, 1 / 2))


# ---- quantisation helpers, modcrop, errors -------------------------------------------------------------


def test_to_uint8_rounds_half_away_and_saturates():
    v = torch.tensor([0.5, 1.5, 2.5, 127.49, 254.5, -0.4, -0.6, 255.6, 300.0, -3.0], dtype=torch.float64)
    assert to_uint8(v, 255).tolist() == [1, 2, 3, 127, 255, 0, 0, 255, 255, 0]
    q = quantize_uint8(torch.tensor([0.1, 0.5, 1.2], dtype=torch.float64))
    assert q.dtype == torch.float64
    assert torch.allclose(q * 255, torch.tensor([26.0, 128.0, 255.0], dtype=torch.float64))


def test_modcrop():
    assert modcrop(torch.zeros(3, 13, 10), 4).shape == (3, 12, 8)
    assert modcrop(np.zeros((13, 10, 3)), 3).shape == (12, 9, 3)
    assert modcrop(np.zeros((13, 10)), 1).shape == (13, 10)
    with pytest.raises(ValueError, match="scale"):
        modcrop(torch.zeros(3, 4, 4), 0)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(scale=0), ValueError, "scale"),
        (dict(scale=-2), ValueError, "scale"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(), ValueError, "exactly one"),
        (dict(scale=2, size=(4, 4)), ValueError, "exactly one"),
        (dict(size=(0, 4)), ValueError, "size"),
        (dict(size=(4,)), ValueError, "size"),
        (dict(scale=2, kernel="spline"), ValueError, "kernel"),
        (dict(scale=2, padding="zeros"), ValueError, "padding"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        imresize(torch.rand(3, 8, 8), **kwargs)


def test_bad_inputs():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        imresize(np.zeros((4, 4)), 2)
    with pytest.raises(TypeError, match="floating-point or uint8"):
        imresize(torch.zeros(4, 4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="at least 2 dims"):
        imresize(torch.zeros(4), 2)
