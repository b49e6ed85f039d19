"""``conv2d_pointwise`` (srkernels/ops/conv2d_pointwise.py): the op against its float64 reference, forward and
every gradient, over dtypes, memory formats, odd sizes and conv parameters; float64 gradcheck; opcheck; a
CPU algorithm plugged into ``ALGORITHMS`` serves both the op and ``srkernels.nn.conv2d``; argument errors."""
import copy
import sys

import pytest
import torch

import srkernels
from srkernels import ops

from .._winograd import TRAIN_ENVS, count_winograd, needs_winograd, winograd_env  # noqa: F401 (fixtures)
from ._parity import FORMATS, randn, run_parity

conv_op = sys.modules["srkernels.ops.conv2d_pointwise"]  # (srkernels.ops.conv2d_pointwise is the function)
W = sys.modules["srkernels.ops.winograd_conv3x3"]
pytestmark = pytest.mark.skipif(not hasattr(torch.ops.srkernels, "conv2d_pointwise"),
                                reason="the compiled extension is not built (the op is registered with it)")

# (N, C, H, W, Cout, k, stride, padding, dilation, groups): odd sizes, 1x1, strided, dilated, grouped
SHAPES = [(1, 3, 7, 5, 4, 3, 1, 1, 1, 1), (2, 5, 9, 6, 7, 1, 1, 0, 1, 1), (1, 4, 8, 7, 6, 3, 2, 1, 1, 2),
          (2, 6, 5, 9, 6, 3, 1, 2, 2, 3), (1, 8, 6, 6, 8, 5, 1, 2, 1, 1),
          # float32 on an AVX2 / AVX-512 build: Winograd's (3x3, stride 1, padding 1, >= 16 channels, >= 64 pixels)
          (1, 16, 9, 11, 24, 3, 1, 1, 1, 1), (2, 17, 8, 8, 16, 3, 1, 1, 1, 1)]
# (bias, activation, residual)
VARIANTS = [(True, "none", False), (False, "relu", False), (True, "none", True), (True, "relu", True)]


def make_inputs(N, C, H, W, Cout, k, stride, padding, dilation, groups, bias, residual, seed=0):
    Ho = (H + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    return dict(x=randn(N, C, H, W, seed=seed), weight=randn(Cout, C // groups, k, k, seed=seed + 1, scale=0.3),
                bias=randn(Cout, seed=seed + 2) if bias else None,
                residual=randn(N, Cout, Ho, Wo, seed=seed + 3) if residual else None)


def _fn(f, stride, padding, dilation, groups, act):
    return lambda x, weight, bias, residual: f(x, weight, bias, stride, padding, dilation, groups,
                                               activation=act, residual=residual)


def _reference(x, weight, bias, stride, padding, dilation, groups, *, activation, residual):
    return conv_op.reference(x, weight, bias, [stride] * 2, [padding] * 2, [dilation] * 2, groups, activation,
                             residual)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_parity(shape, dtype, fmt, variant):
    bias, act, residual = variant
    meta = shape[6:]
    run_parity(_fn(ops.conv2d_pointwise, *meta, act), _fn(_reference, *meta, act),
               make_inputs(*shape, bias, residual), backend="compiled", dtype=dtype, fmt=fmt)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_gradcheck_float64(variant):
    bias, act, residual = variant
    shape = (1, 4, 4, 3, 4, 3, 1, 1, 1, 2)
    inputs = {k: v for k, v in make_inputs(*shape, bias, residual, seed=5).items() if v is not None}
    names = list(inputs)
    meta = shape[6:]

    def fn(*a):
        kw = {"bias": None, "residual": None, **dict(zip(names, a))}
        return _fn(ops.conv2d_pointwise, *meta, act)(**kw)

    args = [v.clone().requires_grad_(True) for v in inputs.values()]
    # float64 runs the reference convolution; ReLU's kink: random values rarely land within eps of 0
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_opcheck(dtype, variant):
    bias, act, residual = variant
    inp = make_inputs(2, 4, 6, 5, 6, 3, 1, 1, 1, 2, bias, residual, seed=7)
    t = {k: (v.to(dtype).requires_grad_(k != "residual") if v is not None else None) for k, v in inp.items()}
    torch.library.opcheck(torch.ops.srkernels.conv2d_pointwise.default,
                          (t["x"], t["weight"], t["bias"], [1, 1], [1, 1], [1, 1], 2, act, t["residual"]))


class _Recording(conv_op.CpuAlgorithm):
    """A stand-in CPU algorithm (3x3 stride-1 fp32 only, as a Winograd kernel would be): records its calls and
    computes with the reference; its packed weight is a tuple, so ``run`` sees which form it got."""

    name = "recording"

    def __init__(self):
        self.packs, self.plain_runs, self.packed_runs = 0, 0, 0

    def supports(self, x, weight, stride, padding, dilation, groups):
        return x.dtype == torch.float32 and tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (1, 1)

    def pack(self, weight, stride, padding, dilation, groups, input_shape):
        self.packs += 1
        return ("packed", weight.detach().clone())

    def run(self, x, weight, bias, stride, padding, dilation, groups, activation, residual):
        packed = isinstance(weight, tuple)
        self.packed_runs += packed
        self.plain_runs += not packed
        return conv_op.reference(x, weight[1] if packed else weight, bias, stride, padding, dilation, groups,
                                 activation, residual)


def test_a_plugged_in_cpu_algorithm_serves_the_op_and_nn(monkeypatch):
    alg = _Recording()
    monkeypatch.setattr(conv_op, "ALGORITHMS", [alg, conv_op.ONEDNN])
    x = torch.randn(1, 4, 6, 5)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        want = torch.relu(conv(x))
        # the op: the plain weight
        got = ops.conv2d_pointwise(x, conv.weight, conv.bias, 1, 1, activation="relu")
        assert torch.equal(got, want) and (alg.packs, alg.plain_runs, alg.packed_runs) == (0, 1, 0)
        # nn.conv2d: packs once per input shape, then runs the packed weight
        for _ in range(3):
            assert torch.equal(srkernels.nn.conv2d(conv, x, "relu"), want)
        assert (alg.packs, alg.plain_runs, alg.packed_runs) == (1, 1, 3)
        # a 1x1 conv is not the stand-in's: oneDNN serves it
        c1 = torch.nn.Conv2d(4, 6, 1)
        assert torch.allclose(srkernels.nn.conv2d(c1, x), c1(x), atol=1e-5)
        assert (alg.packs, alg.plain_runs, alg.packed_runs) == (1, 1, 3)


@pytest.mark.skipif(srkernels.build_info().get("cpu_capability") not in ("avx2", "avx512"),
                    reason="Winograd serves the avx2 and avx512 builds only (winograd_use)")
@pytest.mark.parametrize("env, want", [(None, "winograd4"), ("4", "winograd4"), ("2", "winograd2"),
                                       ("0", "onednn")])
def test_winograd_is_the_float32_3x3_algorithm(winograd_env, env, want):
    """SRKERNELS_WINOGRAD picks F(4,3) (default), F(2,3) or oneDNN for float32 3x3 convs; other convs and
    dtypes keep oneDNN; nn.conv2d's packed weight is the Winograd transform, built once per shape."""
    if env is not None:
        winograd_env(env)
    x = torch.randn(1, 16, 9, 11).to(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1)
    meta = ([1, 1], [1, 1], [1, 1], 1)
    alg = conv_op.cpu_algorithm(x, conv.weight, *meta)
    assert alg.name + str(getattr(alg, "m", "")) == want
    for other in (conv_op.cpu_algorithm(x, torch.randn(24, 16, 1, 1), [1, 1], [0, 0], [1, 1], 1),  # 1x1
                  conv_op.cpu_algorithm(x, conv.weight, [2, 2], [1, 1], [1, 1], 1),                 # strided
                  conv_op.cpu_algorithm(x[:, :8], torch.randn(24, 8, 3, 3), *meta),                 # 8 channels
                  conv_op.cpu_algorithm(x.double(), conv.weight.double(), *meta)):                  # float64
        assert other is None or other.name == "onednn"
    with torch.no_grad():
        want_y = conv_op.reference(x.double(), conv.weight.double(), conv.bias.double(), *meta, "relu", None)
        for _ in range(2):
            y = srkernels.nn.conv2d(conv, x, "relu")
            assert torch.allclose(y.double(), want_y, atol=2e-5 * max(1.0, want_y.abs().max().item()), rtol=0)
    packs = conv.__dict__["_srk_packed"].data
    assert list(packs) == [tuple(x.shape)] and packs[tuple(x.shape)][0] is alg
    if alg.name == "winograd":
        assert packs[tuple(x.shape)][1].shape == ((alg.m + 2) ** 2, 16, 24)


@needs_winograd
@pytest.mark.parametrize("env, tile", TRAIN_ENVS, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_training_runs_winograd_forward_and_input_gradient(winograd_env, count_winograd, env, tile, variant):
    """Training through the op (what srkernels.nn.conv2d runs for a Winograd conv): Winograd forward at the
    training tile (ReLU + residual: the mask recomputed by it too), input gradient by Winograd F(4,3), ATen
    weight and bias gradients; every gradient against float64 within fp32 TOL (conftest.py); off: none runs."""
    winograd_env(*env)
    bias, act, residual = variant
    inputs = make_inputs(2, 16, 9, 11, 24, 3, 1, 1, 1, 1, bias, residual, seed=3)
    inputs["weight"] = inputs["weight"] / 4  # ~1/sqrt(9 C): unit-scale outputs, as in a trained network
    run_parity(_fn(ops.conv2d_pointwise, 1, 1, 1, 1, act), _fn(_reference, 1, 1, 1, 1, act), inputs,
               backend="compiled", dtype=torch.float32, fmt="channels_last")
    on = tile != 0
    mask_again = act == "relu" and residual
    assert count_winograd == {"run": on * (1 + mask_again), "grad_input": on, "run_tiles": {tile} if on else set(),
                              "grad_tiles": {4} if on else set()}  # the input gradient: F(4,3) (GRAD_INPUT_WINOGRAD)


def test_inference_and_training_tiles(winograd_env):
    """No tensor requiring grad: SRKERNELS_WINOGRAD's tile; one that does: SRKERNELS_WINOGRAD_TRAIN's."""
    x, w = torch.randn(1, 16, 9, 9), torch.randn(16, 16, 3, 3)
    meta = ([1, 1], [1, 1], [1, 1], 1)
    winograd_env("4")
    cap = srkernels.build_info().get("cpu_capability")
    for training, want in ((False, 4), (True, 2)):
        alg = conv_op.cpu_algorithm(x, w, *meta, training=training)
        assert getattr(alg, "m", None) == (want if cap in ("avx2", "avx512") else None)
    winograd_env("4", "x")
    with pytest.raises(ValueError, match="SRKERNELS_WINOGRAD_TRAIN"):
        conv_op.winograd_train_tile()


def test_winograd_env_is_checked(winograd_env):
    winograd_env("yes")
    with pytest.raises(ValueError, match="SRKERNELS_WINOGRAD"):
        conv_op.winograd_tile()


def test_argument_errors():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.conv2d_pointwise([1], w)
    with pytest.raises(TypeError, match="weight has dtype"):
        ops.conv2d_pointwise(x, w.double())
    with pytest.raises(ValueError, match="weight must be 4-D"):
        ops.conv2d_pointwise(x, w[0])
    with pytest.raises(ValueError, match="groups=2 does not fit"):
        ops.conv2d_pointwise(x, w, groups=2)
    with pytest.raises(ValueError, match="stride must be"):
        ops.conv2d_pointwise(x, w, stride=0)
    with pytest.raises(ValueError, match="padding must be"):
        ops.conv2d_pointwise(x, w, padding=(1, 1, 1))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.conv2d_pointwise(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.conv2d_pointwise(x, w, activation="gelu")
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.conv2d_pointwise(x, w, padding=1, residual=torch.randn(1, 6, 3, 3))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        ops.conv2d_pointwise(x, w, dilation=3)


@pytest.mark.parametrize("native, amx, want", [
    (False, False, "all"),                             # eager bf16 convs (no native bf16): always
    # AVX512-BF16: F(4,3), F(6,3) with >= 64 channels; F(4,5)
    (True, False, {(4, 3, 64, 64), (4, 3, 64, 256), (6, 3, 64, 64), (4, 5, 64, 32), (4, 5, 16, 16)}),
    (True, True, set()),                               # AMX: oneDNN's tile convs
], ids=["no native bf16", "avx512-bf16", "amx"])
def test_winograd_bf16_rule(monkeypatch, native, amx, want):
    monkeypatch.setattr(conv_op, "onednn_bf16", lambda: native)
    monkeypatch.setattr(conv_op, "_amx", lambda: amx)
    cases = {(4, 3, 64, 64), (2, 3, 64, 64), (2, 5, 64, 32), (4, 3, 16, 16), (4, 3, 64, 256), (4, 3, 32, 32),
             (6, 3, 64, 64), (6, 3, 32, 32), (4, 5, 64, 32), (4, 5, 16, 16)}
    assert {c for c in cases if conv_op.winograd_bf16(*c)} == (cases if want == "all" else want)


@needs_winograd
@pytest.mark.parametrize("c_out, k, size, positions", [
    (64, 3, (9, 13), 36),  # 64->64 3x3: F(4,3)
    (32, 5, (11, 9), 64),  # SRCNN's 64->32 5x5: F(4,5)
], ids=["3x3 F(4,3)", "5x5 F(4,5)"])
@pytest.mark.parametrize("native", [False, True])
def test_bf16_inference_runs_winograd(monkeypatch, count_winograd, native, c_out, k, size, positions):
    """A bf16 inference conv takes Winograd with tile 4 (bf16 storage, float32 arithmetic, its transformed weight
    float32 [positions, C_in, C_out]) where the rule says so, and is the bf16 conv to a bf16 rounding; with autograd
    recording it stays on ATen."""
    monkeypatch.setattr(conv_op, "onednn_bf16", lambda: native)
    monkeypatch.setattr(conv_op, "_amx", lambda: False)
    pad = [k // 2] * 2
    conv = torch.nn.Conv2d(64, c_out, k, padding=k // 2).bfloat16()
    x = torch.randn(1, 64, *size).bfloat16()
    want = conv_op.reference(x.double(), conv.weight.double(), conv.bias.double(), [1, 1], pad, [1, 1], 1,
                             "relu", None)
    with torch.no_grad():
        y = srkernels.nn.conv2d(conv, x, "relu")
    assert y.dtype == torch.bfloat16 and count_winograd["run"] == 1 and count_winograd["run_tiles"] == {4}
    assert (y.double() - want).abs().max() <= 2 ** -8 * want.abs().max() + 1e-4
    packed = conv.__dict__["_srk_packed"].data[tuple(x.shape)][1]
    assert packed.dtype == torch.float32 and packed.shape == (positions, 64, c_out)
    y2 = srkernels.nn.conv2d(conv, x.requires_grad_(True), "relu")  # training: bf16 Winograd is inference-only
    assert count_winograd["run"] == 1 and y2.requires_grad
    assert (y2.double() - want).abs().max() <= 2 ** -7 * want.abs().max() + 1e-3


@needs_winograd
@pytest.mark.parametrize("native", [False, True])
def test_bf16_inference_tile_follows_the_image_size(monkeypatch, winograd_env, count_winograd, native):
    """bf16 storage takes F(6,3) where winograd6_use picks it (48 px: 1.27x less GEMM work than F(4,3)) and F(4,3)
    elsewhere (32 px: the same work); float32 keeps F(4,3) and SRKERNELS_WINOGRAD=2 F(2,3); every run within a
    bf16 rounding of float64."""
    monkeypatch.setattr(conv_op, "onednn_bf16", lambda: native)
    monkeypatch.setattr(conv_op, "_amx", lambda: False)
    assert W.winograd6_use(48, 48) and W.winograd6_use(96, 96) and W.winograd6_use(24, 24)
    assert not W.winograd6_use(32, 32) and not W.winograd6_use(40, 40) and not W.winograd6_use(9, 13)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    meta = ([1, 1], [1, 1], [1, 1], 1)
    for env, dtype, hw, tile in ((None, torch.bfloat16, 48, 6), (None, torch.bfloat16, 32, 4),
                                 (None, torch.float32, 48, 4), ("2", torch.bfloat16, 48, 2 if not native else None)):
        if env is not None:
            winograd_env(env)
        c = copy.deepcopy(conv).to(dtype)
        x = torch.randn(1, 64, hw, hw + 1 if tile != 6 else hw).to(dtype)
        alg = conv_op.cpu_algorithm(x, c.weight, *meta)
        assert getattr(alg, "m", None) == tile, (env, dtype, hw)
        want = conv_op.reference(x.double(), c.weight.double(), c.bias.double(), *meta, "relu", None)
        count_winograd["run_tiles"].clear()
        with torch.no_grad():
            y = srkernels.nn.conv2d(c, x, "relu")
        assert count_winograd["run_tiles"] == ({tile} if tile else set())
        tol = 2 ** -8 if dtype == torch.bfloat16 else 2e-5
        assert (y.double() - want).abs().max() <= tol * want.abs().max() + 1e-4
        if tile:
            assert c.__dict__["_srk_packed"].data[tuple(x.shape)][1].shape == ((tile + 2) ** 2, 64, 64)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs torch's oneDNN")
@pytest.mark.parametrize("native", [False, True])
def test_bf16_without_native_bf16_runs_a_float32_onednn_conv(monkeypatch, native):
    """A bf16 conv Winograd does not serve (3->64, 9x9 as SRCNN's first layer; 64->3) on a CPU whose oneDNN has
    no native bf16 runs oneDNN's float32 conv between a widening and one rounding (not the slow eager bf16 conv):
    within a bf16 rounding of float64, residual and ReLU included; with native bf16 oneDNN's own bf16 conv; in
    training the reference."""
    monkeypatch.setattr(conv_op, "onednn_bf16", lambda: native)
    runs = []
    orig = conv_op.OneDNNFloat32.run
    monkeypatch.setattr(conv_op.OneDNNFloat32, "run", lambda self, *a: runs.append(1) or orig(self, *a))
    for cin, cout, k in ((3, 64, 9), (64, 3, 3)):
        conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2).bfloat16()
        x = torch.randn(1, cin, 11, 10).bfloat16()
        r = torch.randn(1, cout, 11, 10).bfloat16()
        meta = ([1, 1], [k // 2] * 2, [1, 1], 1)
        want_alg = "onednn" if native else "onednn_fp32"
        assert conv_op.cpu_algorithm(x, conv.weight, *meta).name == want_alg
        assert conv_op.cpu_algorithm(x, conv.weight, *meta, training=True) is (conv_op.ONEDNN if native else None)
        want = conv_op.reference(x.double(), conv.weight.double(), conv.bias.double(), *meta, "relu", r.double())
        with torch.no_grad():
            y = srkernels.nn.conv2d(conv, x, "relu", r)
        assert y.dtype == torch.bfloat16 and y.shape == want.shape
        assert (y.double() - want).abs().max() <= 2 ** -7 * want.abs().max() + 1e-3
    assert len(runs) == (0 if native else 2)
