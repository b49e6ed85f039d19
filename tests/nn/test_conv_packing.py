"""The oneDNN path of ``srkernels.nn.conv2d``: which CPUs may take it, and that its prepacked weights are the
ones the primitive wants (issues 12 and 13).

Two facts are only visible from oneDNN itself, so they are checked in a subprocess: ``ONEDNN_MAX_CPU_ISA=AVX2``
makes oneDNN behave as on an AVX2-only CPU (it refuses bf16 as such a CPU does), and ``ONEDNN_VERBOSE=1``
prints every primitive oneDNN runs, weight reorders included, on the C stdout.
"""
import os
import platform
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import srkernels
from srkernels.nn import conv as conv_mod

conv_op = sys.modules["srkernels.ops.conv2d_pointwise"]  # (srkernels.ops.conv2d_pointwise is the function)

from .._models import SMALL_MODELS
from ..conftest import assert_close

ONEDNN = torch.backends.mkldnn.is_available()
X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")
needs_x86 = pytest.mark.skipif(not (ONEDNN and X86), reason="ONEDNN_MAX_CPU_ISA=AVX2 needs an x86-64 oneDNN")


def _run(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (oneDNN reads its environment once per process); its stdout."""
    # oneDNN settings of the calling shell would change what is measured: only ``env``'s apply
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEDNN_", "DNNL_"))} | env
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


# --- issue 12: bf16 without AVX-512 ----------------------------------------------------------------------------

class _RefuseBf16:
    """Stands in for a oneDNN op packet (and its overloads) on a CPU without bf16 support: bf16 raises as oneDNN
    does there, anything else runs."""

    def __init__(self, op):
        self.op = op

    def __call__(self, *args, **kwargs):
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            raise RuntimeError("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq")
        return self.op(*args, **kwargs)

    def __getattr__(self, overload):
        return _RefuseBf16(getattr(self.op, overload))


@needs_onednn
@pytest.mark.parametrize("activation,residual", [(None, False), ("relu", False), (None, True), ("relu", True)])
def test_bf16_never_reaches_onednn_bf16_without_cpu_support(monkeypatch, activation, residual):
    """With the feature check saying no, no bf16 tensor reaches oneDNN (which would raise): bf16 inference runs
    its float32 conv on widened tensors (OneDNNFloat32) and matches float64 within bf16 rounding."""
    monkeypatch.setattr(conv_op, "onednn_bf16", lambda: False)
    for name in ("_reorder_convolution_weight", "_convolution_pointwise"):
        monkeypatch.setattr(torch.ops.mkldnn, name, _RefuseBf16(getattr(torch.ops.mkldnn, name)))
    torch.manual_seed(4)
    conv = srkernels.nn.Conv2d(8, 12, 3, padding=1, activation=activation).bfloat16()
    x = torch.randn(2, 8, 7, 9, dtype=torch.bfloat16)
    r = torch.randn(2, 12, 7, 9, dtype=torch.bfloat16) if residual else None
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    ref = F.relu(ref) if activation else ref
    ref = ref + r.double() if residual else ref
    with torch.no_grad():
        assert_close(conv(x, r), ref, torch.bfloat16, "bf16 without native bf16")
        # float32 still takes oneDNN (the stand-ins let it through)
        c32 = conv.float()
        assert_close(c32(x.float(), None if r is None else r.float()), ref, torch.float32, "fp32 oneDNN")
        assert c32._srk_packed.data, "fp32 should have used prepacked weights"


@needs_onednn
@pytest.mark.parametrize("activation", [None, "relu"])
def test_bf16_transposed_conv_without_cpu_support(monkeypatch, activation):
    """SRDenseNet's deconvolution in bf16 inference on a CPU without native bf16: oneDNN's float32 deconvolution
    on widened tensors and a float32 pack (no bf16 tensor reaches oneDNN, which would raise; not ATen's
    slow_conv_transpose2d), one bf16 rounding of float64."""
    monkeypatch.setattr(conv_op, "onednn_bf16", lambda: False)
    for name in ("_reorder_convolution_transpose_weight", "_convolution_transpose_pointwise"):
        monkeypatch.setattr(torch.ops.mkldnn, name, _RefuseBf16(getattr(torch.ops.mkldnn, name)))
    torch.manual_seed(5)
    deconv = torch.nn.ConvTranspose2d(12, 10, 3, stride=2, padding=1, output_padding=1).bfloat16()
    x = torch.randn(1, 12, 5, 7, dtype=torch.bfloat16)
    ref = F.conv_transpose2d(x.double(), deconv.weight.double(), deconv.bias.double(), 2, 1, 1)
    ref = F.relu(ref) if activation else ref
    with torch.no_grad(), torch.profiler.profile() as prof:
        y = conv_mod.conv_transpose2d(deconv, x, activation)
    names = {e.name for e in prof.events()}
    assert "mkldnn::_convolution_transpose_pointwise" in names and "aten::slow_conv_transpose2d" not in names
    assert y.dtype == torch.bfloat16
    assert_close(y, ref, torch.bfloat16, "bf16 deconvolution without native bf16")
    (packed,) = deconv._srk_packed.data.values()
    assert packed.dtype == torch.float32


@needs_onednn
def test_bf16_feature_check_is_torchs():
    """The check is the one oneDNN's bf16 ops themselves apply, asked once per process."""
    conv_op.onednn_bf16.cache_clear()
    assert conv_op.onednn_bf16() == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert conv_op.onednn_bf16.cache_info().currsize == 1


@needs_x86
def test_bf16_without_native_bf16_runs():
    """For real: oneDNN capped at AVX2 refuses bf16 weight packing; conv2d and a fused bf16 RCAN still run and
    match float64 (within bf16 tolerance); float32 keeps the oneDNN path, and bf16 inference runs oneDNN's
    float32 conv on a float32 pack of the bf16 weight (OneDNNFloat32)."""
    out = _run("""
        import torch, torch.nn.functional as F
        import srkernels
        from srkernels.models import build
        assert not torch.ops.mkldnn._is_mkldnn_bf16_supported(), "ONEDNN_MAX_CPU_ISA=AVX2 did not apply"
        try:
            torch.ops.mkldnn._reorder_convolution_weight(torch.randn(4, 4, 3, 3).bfloat16(), [1, 1], [1, 1], [1, 1], 1)
            raise SystemExit("oneDNN packed bf16 weights although capped at AVX2")
        except RuntimeError as e:
            assert "bf16 path needs the cpu support" in str(e), e
        torch.manual_seed(0)
        conv = srkernels.nn.Conv2d(8, 12, 3, padding=1, activation="relu")
        x, r = torch.randn(2, 8, 7, 9), torch.randn(2, 12, 7, 9)
        ref = F.relu(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)) + r.double()
        m = build("rcan", 2, fused=True, n_resgroups=1, n_resblocks=2).eval()
        lr = torch.rand(1, 3, 6, 5)
        with torch.no_grad():
            m_ref = m.double()(lr.double())
            for dtype in (torch.float32, torch.bfloat16):  # fp32 first: bf16 rounds the weights
                for fmt in (torch.contiguous_format, torch.channels_last):
                    got = conv.to(dtype)(x.to(dtype).contiguous(memory_format=fmt), r.to(dtype)).double()
                    print(dtype, fmt, "conv err", (got - ref).abs().max().item() / ref.abs().max().item())
                    got = m.to(dtype)(lr.to(dtype).contiguous(memory_format=fmt)).double()
                    print(dtype, fmt, "rcan err", (got - m_ref).abs().max().item() / m_ref.abs().max().item())
                packs = conv._srk_packed
                print(f"packed {dtype}:", packs.key[1] == dtype and all(a.name == "onednn" + ("_fp32" if dtype ==
                      torch.bfloat16 else "") and w.dtype == torch.float32 for a, w, _ in packs.data.values()))
    """, ONEDNN_MAX_CPU_ISA="AVX2")
    errs = re.findall(r"(torch\.\w+) .* (conv|rcan) err (\S+)", out)
    assert len(errs) == 8, out
    for dtype, what, err in errs:
        assert float(err) <= (3e-2 if dtype == "torch.bfloat16" else 1e-5), out
    assert "packed torch.float32: True" in out and "packed torch.bfloat16: True" in out, out


# --- issue 13: weights packed for the input the primitive sees -------------------------------------------------

# ONEDNN_VERBOSE lines: "onednn_verbose,v1,primitive,exec,cpu,<primitive>,<impl>,<prop_kind>,<mds>,<attrs>,
# <aux>,<problem>,<ms>"; a conv's problem reads like "mb1_ic64oc256_ih12oh12kh3sh1dh0ph1_iw16ow16kw3sw1dw0pw1"
# (with "g<n>" first for groups), a reorder's like "256x64x3x3".
_EXEC = re.compile(r"^onednn_verbose(?:,v\d+)?,(?:primitive,)?exec,cpu,(\w+),[^,]*,([^,]*),(.*),([^,]*),([^,]*)$")


def _weight_dims(problem: str) -> str:
    """The dims oneDNN prints for the weight of a 2-d convolution problem."""
    f = {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", problem)}
    dims = [f["oc"], f["ic"], f.get("kh", 1), f.get("kw", 1)]
    g = f.get("g", 1)
    return "x".join(map(str, [g, dims[0] // g, dims[1] // g, *dims[2:]] if g > 1 else dims))


def _weight_reorders(lines: list[str]) -> tuple[list[str], int, int]:
    """(weight reorders feeding a prepacked-path convolution, prepacked-path convolutions, eager weight reorders).

    A reorder is charged to the convolution executed next. It is a weight reorder when its dims are that
    convolution's weight dims (an input reorder would be NxCxHxW). The prepacked path
    (``mkldnn._convolution_pointwise``) runs ``forward_inference``; ATen's eager convolution runs ``forward_training``
    and reorders its plain weight on every call by design, which is not this module's concern.
    """
    ours, n_ours, eager, pending = [], 0, 0, []
    for line in lines:
        m = _EXEC.match(line.strip())
        if not m:
            continue
        prim, prop, problem = m.group(1), m.group(2), m.group(4)
        if prim == "reorder":
            pending.append((problem, line))
        elif prim == "convolution":
            wdims = _weight_dims(problem)
            hits = [ln for dims, ln in pending if dims == wdims]
            if prop == "forward_inference":
                n_ours += 1
                ours += hits
            else:
                eager += len(hits)
            pending = []
    return ours, n_ours, eager


def test_weight_reorder_parser():
    v = "onednn_verbose,v1,primitive,exec,cpu,"
    lines = [
        v + "reorder,jit:uni,undef,src:f32::blocked:abcd::f0 dst:f32::blocked:Acdb16a::f0,,,1x64x12x16,0.01",
        v + "reorder,simple:any,undef,src:f32::blocked:Acdb16a::f0 dst:f32:p:blocked:Acdb24a::f0,attr-scratchpad:user,"
            ",256x64x3x3,10.0",
        v + "convolution,brg_conv_fwd:avx2,forward_inference,src:f32::blocked:acdb::f0 wei:f32:ap:blocked:Acdb24a::f0 "
            "bia:undef::undef::: dst:f32::blocked:acdb::f0,attr-scratchpad:user,alg:convolution_direct,"
            "mb1_ic64oc256_ih12oh12kh3sh1dh0ph1_iw16ow16kw3sw1dw0pw1,0.2",
        v + "reorder,jit:uni,undef,src:f32::blocked:acdb::f0 dst:f32:p:blocked:Acdb8a::f0,,,3x64x3x3,0.01",
        v + "convolution,brg_conv_fwd:avx2,forward_training,src:f32::blocked:acdb::f0 wei:f32:ap:blocked:Acdb8a::f0 "
            "bia:f32:a:blocked:a::f0 dst:f32::blocked:acdb::f0,attr-scratchpad:user,alg:convolution_direct,"
            "mb1_ic64oc3_ih24oh24kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1,0.1",
        v + "convolution,jit:avx2,forward_inference,src:f32::blocked:acdb::f0 wei:f32::blocked:Abcde8a::f0 "
            "bia:undef::undef::: dst:f32::blocked:acdb::f0,,alg:convolution_direct,"
            "mb1_g8ic8oc8_ih5oh5kh3sh1dh0ph1_iw5ow5kw3sw1dw0pw1,0.1",
    ]
    ours, n_ours, eager = _weight_reorders(lines)
    assert [ln.split(",")[-2] for ln in ours] == ["256x64x3x3"] and n_ours == 2 and eager == 1
    assert _weight_dims("mb1_g8ic8oc8_ih5oh5kh3sh1dh0ph1_iw5ow5kw3sw1dw0pw1") == "8x1x1x3x3"


_WARM_THEN_MEASURE = """
    import sys, torch
    import srkernels
    from srkernels.models import build
    torch.manual_seed(0)
    dtypes = [torch.float32] + ([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
    work = []  # (module, args) for every dtype x layout x size
    for dtype in dtypes:
        convs = [srkernels.nn.Conv2d(64, 64, 3, padding=1, activation="relu"),  # unary post-op
                 srkernels.nn.Conv2d(64, 64, 3, padding=1),                     # binary add post-op
                 srkernels.nn.Conv2d(64, 256, 3, padding=1, bias=False)]        # upsampler's shape
        convs = [c.to(dtype) for c in convs]
        rcan = build("rcan", 2, fused=True, n_resgroups=1, n_resblocks=2).eval().to(dtype)
        for fmt in (torch.contiguous_format, torch.channels_last):
            for h, w in ((12, 16), (9, 11), (32, 32)):
                x = torch.randn(1, 64, h, w, dtype=dtype).contiguous(memory_format=fmt)
                work += [(convs[0], (x,)), (convs[1], (x, torch.randn_like(x))), (convs[2], (x,))]
                work.append((rcan, (torch.rand(1, 3, h, w, dtype=dtype).contiguous(memory_format=fmt),)))
    with torch.no_grad():
        for m, args in work:
            m(*args)
        sys.stdout.flush()
        print("=== measure", flush=True)
        for m, args in work:
            m(*args)
    print("=== done", flush=True)
"""


@needs_onednn
@pytest.mark.parametrize("isa", ["native", pytest.param("AVX2", marks=needs_x86)])
def test_no_weight_reorder_after_warmup(isa):
    """Once every input has been seen, a forward of nn.Conv2d (unary and binary post-ops, contiguous and
    channels_last input, several sizes) and of a fused RCAN reorders no prepacked weight: each weight was packed
    in the format the primitive for that input wants. Structural, from ONEDNN_VERBOSE, not timed."""
    # the oneDNN algorithm's property: Winograd (the first choice for float32 3x3 convs) is switched off here
    env = {"ONEDNN_VERBOSE": "1", "SRKERNELS_WINOGRAD": "0"}
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    out = _run(_WARM_THEN_MEASURE, **env)
    assert "=== done" in out, out[-3000:]
    measured = out.split("=== measure", 1)[1].splitlines()
    ours, n_ours, _ = _weight_reorders(measured)
    assert n_ours >= 30, f"the prepacked path hardly ran ({n_ours} convolutions):\n" + "\n".join(measured[:40])
    assert not ours, f"{len(ours)} weight reorders after warm-up ({isa}), e.g.:\n" + "\n".join(ours[:6])


# --- the cache itself ------------------------------------------------------------------------------------------

@needs_onednn
def test_packed_cache_is_per_input_shape_and_bounded():
    conv = srkernels.nn.Conv2d(4, 6, 3, padding=1)
    sizes = [(5 + i, 7) for i in range(conv_mod._PACK_CACHE_SIZE + 2)]
    with torch.no_grad():
        for h, w in sizes:
            x = torch.randn(1, 4, h, w)
            assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), torch.float32, f"{h}x{w}")
            conv(x.contiguous(memory_format=torch.channels_last))  # same primitive input: no new entry
        packs = conv._srk_packed.data
        assert len(packs) == conv_mod._PACK_CACHE_SIZE
        assert list(packs) == [(1, 4, h, w) for h, w in sizes[-conv_mod._PACK_CACHE_SIZE:]]  # least recent go
        conv.weight.add_(1)  # a new weight version drops every pack
        conv(torch.randn(1, 4, 5, 7))
        assert list(conv._srk_packed.data) == [(1, 4, 5, 7)]


@needs_onednn
def test_packed_fast_path_never_serves_a_stale_weight():
    """The per-call shortcut (same weight object, version, storage and input shape as the previous call -> the
    previous packed weight) must miss on every kind of weight change: in-place update, ``.data`` swap (no version
    bump), a new Parameter, a dtype change; and a module copy starts without it."""
    import copy

    conv = srkernels.nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 7, 9)

    def check(what):
        assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), conv.weight.dtype, what)

    with torch.no_grad():
        check("first call")
        check("second call (shortcut)")
        conv.weight.mul_(-2)
        check("in-place update")
        conv.weight.data = torch.randn_like(conv.weight)
        check(".data swap")
        conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight))
        check("new Parameter")
        conv.bias.add_(1)
        check("bias update (never cached)")
        twin = copy.deepcopy(conv)
        assert twin.__dict__["_srk_last"].data is None
        twin.weight.mul_(3)
        assert_close(twin(x), F.conv2d(x, twin.weight, twin.bias, padding=1), torch.float32, "copy")
        check("original after the copy changed")
        # the same shape under autocast, or in grad mode, must not take the shortcut
        with pytest.raises(RuntimeError, match="type"):  # as eager: a float64 input to float32 weights
            conv(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv(x).dtype == torch.bfloat16
        check("float32 again")
    xg = x.clone().requires_grad_()
    conv(xg).sum().backward()  # grad mode after inference calls: autograd reaches x and the weight
    assert xg.grad is not None and conv.weight.grad is not None
    with torch.no_grad():
        if conv_op.onednn_bf16():
            conv.to(torch.bfloat16)
            x = x.to(torch.bfloat16)
            check("bf16")


# --- issue 13: every conv of a fused model on the prepacked path --------------------------------------------------

_MODEL_CASES = SMALL_MODELS  # tests/_models.py

_MODELS_WARM_THEN_MEASURE = """
    import sys, torch
    import torch.nn.functional as F
    from srkernels.models import build
    cases = {cases!r}
    # ATen convolutions that do not go through oneDNN at all (small channel counts) are invisible to
    # ONEDNN_VERBOSE: count every eager conv call (nn.Conv2d's forward calls F.conv2d) as well
    eager_calls = [0]
    _conv2d = F.conv2d
    def counting_conv2d(*args, **kwargs):
        eager_calls[0] += 1
        return _conv2d(*args, **kwargs)
    F.conv2d = counting_conv2d
    torch.manual_seed(0)
    with torch.no_grad():
        for key, (name, scale, cfg) in cases.items():
            m = build(name, scale, fused=True, **cfg).eval()
            for fmt in ("contiguous", "channels_last"):
                x = torch.rand(1, m.in_channels, 12, 10)
                if fmt == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                m(x), m(x)
                sys.stdout.flush()
                print(f"=== measure {{key}} {{fmt}}", flush=True)
                eager_calls[0] = 0
                m(x)
                sys.stdout.flush()
                print(f"eager F.conv2d calls: {{eager_calls[0]}}", flush=True)
                print("=== end", flush=True)
    print("=== done", flush=True)
"""


def _sections(out: str) -> dict[str, list[str]]:
    """{"<case> <layout>": the ONEDNN_VERBOSE lines between its "=== measure" and "=== end" markers}."""
    found = {}
    for part in out.split("=== measure ")[1:]:
        head, _, rest = part.partition("\n")
        found[head.strip()] = rest.split("=== end", 1)[0].splitlines()
    return found


def _eager_convolutions(lines: list[str]) -> list[str]:
    """Convolutions oneDNN ran outside the prepacked path (ATen's eager convolution runs ``forward_training``
    and reorders its plain weight on every call). Deconvolutions are not judged by prop kind: torch's prepacked
    ``_convolution_transpose_pointwise`` (``nn.conv_transpose2d``) also creates a ``forward_training``
    primitive; for them the weight-reorder count (checked too) tells the prepacked path from the eager one."""
    out = []
    for line in lines:
        m = _EXEC.match(line.strip())
        if m and m.group(1) == "convolution" and m.group(2) != "forward_inference":
            out.append(line)
    return out


@needs_onednn
def test_fused_models_reorder_no_weight_after_warmup():
    """A fused model's CPU inference forward runs every convolution on the prepacked path: after warm-up, no
    weight reorder at all (neither of a packed weight nor an eager convolution's) and no eager convolution
    (oneDNN's forward_training, or any F.conv2d call, which also catches ATen's non-oneDNN kernels), for every
    architecture, contiguous and channels_last input. Structural, from ONEDNN_VERBOSE, not timed. (The dense
    blocks' convolutions are srkernels' own kernels, not oneDNN's.)"""
    out = _run(_MODELS_WARM_THEN_MEASURE.format(cases=_MODEL_CASES), ONEDNN_VERBOSE="1")
    assert "=== done" in out, out[-3000:]
    sections = _sections(out)
    assert len(sections) == 2 * len(_MODEL_CASES), sorted(sections)
    problems = []
    for case, lines in sections.items():
        ours, n_ours, eager = _weight_reorders(lines)
        eager_convs = _eager_convolutions(lines)
        calls = next(int(ln.rsplit(":", 1)[1]) for ln in lines if ln.startswith("eager F.conv2d calls:"))
        if ours or eager or eager_convs or calls or n_ours == 0:
            problems.append(f"{case}: {n_ours} prepacked convolutions, {len(ours)} reorders of packed weights, "
                            f"{eager} eager weight reorders, {len(eager_convs)} eager oneDNN convolutions, "
                            f"{calls} eager F.conv2d calls, e.g.\n    "
                            + "\n    ".join((ours + eager_convs)[:3]))
    assert not problems, "\n".join(problems)


@needs_onednn
@pytest.mark.parametrize("key", ["rcan", "rcan_bam", "srcnn"])
def test_fused_model_keeps_one_layout(key):
    """One layout from head to tail: after warm-up a fused RCAN (+BAM) / SRCNN forward on a channels_last input
    copies no tensor at all (no NCHW <-> channels_last conversion between layers), and on an NCHW input only
    the input itself, once, at the entry, and the few-channel output back to NCHW at the exit: the output has
    the input's memory format, as eager PyTorch's. (RDN / RDCAB / SRDenseNet are not listed: they ``torch.cat``
    block outputs, as the reference does.)"""
    from torch.profiler import ProfilerActivity, profile

    from srkernels.models import build

    name, scale, cfg = _MODEL_CASES[key]
    torch.manual_seed(0)
    m = build(name, scale, fused=True, **cfg).eval()
    x = torch.rand(1, m.in_channels, 12, 10)
    for fmt, allowed in ((torch.channels_last, 0), (torch.contiguous_format, 2)):
        xf = x.contiguous(memory_format=fmt)
        with torch.no_grad():
            m(xf), m(xf)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                y = m(xf)
        copies = [e for e in prof.events() if e.name == "aten::copy_"]
        assert len(copies) <= allowed, f"{key} {fmt}: {len(copies)} copies (allowed {allowed})"
        assert y.is_contiguous(memory_format=fmt)


@needs_onednn
@pytest.mark.parametrize("stride,kernel,pad,out_pad", [(2, 2, 0, 0), (3, 3, 0, 0), (2, 4, 1, 0), (2, 3, 1, 1)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_conv_transpose2d_matches_eager(stride, kernel, pad, out_pad, activation):
    """``nn.conv_transpose2d`` (SRDenseNet's inference tail): prepacked oneDNN deconvolution + ReLU post-op equals
    the eager ops, for NCHW and channels_last input, and again after the weight changes (cache dropped)."""
    torch.manual_seed(0)
    d = torch.nn.ConvTranspose2d(8, 6, kernel, stride, pad, output_padding=out_pad).eval()
    x = torch.randn(2, 8, 5, 7)
    for _ in range(2):
        want = F.conv_transpose2d(x, d.weight, d.bias, stride, pad, out_pad)
        want = F.relu(want) if activation else want
        for xf in (x, x.contiguous(memory_format=torch.channels_last)):
            with torch.no_grad():
                got = conv_mod.conv_transpose2d(d, xf, activation)
            assert_close(got, want, torch.float32, "conv_transpose2d")
        with torch.no_grad():
            d.weight.mul_(-0.5)
