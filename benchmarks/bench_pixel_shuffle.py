"""Upsampling epilogue: pixel shuffle (+ bias) vs F.pixel_shuffle, the conv 64->256 + shuffle(2) pair, and
conv + ReLU through the oneDNN epilogue vs eager.

    python benchmarks/bench_pixel_shuffle.py [--quick] [--cpu|--cuda] [--malloc=fresh|reuse]
    pytest benchmarks/bench_pixel_shuffle.py --benchmark-group-by=group

Bytes model of the shuffle stage: read x + write out = 2 passes (3 with a residual). Eager bias + shuffle
makes 4 (x + b reads and writes; the shuffle reads and writes, on CPU far below copy speed). On GPU the
fused kernel is one coalesced read and one coalesced write per element.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from srkernels import ops  # noqa: E402
from srkernels.nn import conv2d  # noqa: E402

BENCH = "pixel_shuffle"
SHUFFLE_SHAPE = (1, 256, 150, 250)  # -> [1, 64, 300, 500]: 38 MB of fp32 output
PAIR_SHAPE = (1, 64, 135, 240)
DTYPES = harness.DTYPES


def _t(*s, dtype, device, scale=1.0):
    return (torch.randn(*s, generator=torch.Generator().manual_seed(len(s))) * scale).to(device=device, dtype=dtype)


def shuffle_variants(dtype, device):
    x = _t(*SHUFFLE_SHAPE, dtype=dtype, device=device)
    b = _t(SHUFFLE_SHAPE[1], dtype=dtype, device=device)
    out = torch.empty(1, 64, 300, 500, dtype=dtype, device=device)
    return x, {
        "eager": lambda: F.pixel_shuffle(x, 2),
        "srkernels": lambda: ops.pixel_shuffle(x, 2),
        "srkernels (cache off)": harness.cache_off(lambda: ops.pixel_shuffle(x, 2)),
        "srkernels+prealloc": lambda: ops.pixel_shuffle(x, 2, out=out),
        "eager bias+shuffle": lambda: F.pixel_shuffle(x + b[:, None, None], 2),
        "srkernels bias+shuffle": lambda: ops.pixel_shuffle(x, 2, bias=b),
    }


def pair_variants(dtype, device, channels_last=False):
    """The reference upsampling stage (nn.Conv2d with bias, then F.pixel_shuffle) vs the fused one as
    srkernels.nn.Upsampler runs it in inference (bias-free conv on prepacked oneDNN weights, then
    ops.pixel_shuffle adding the bias)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _t(*PAIR_SHAPE, dtype=dtype, device=device).contiguous(memory_format=fmt)
    conv = torch.nn.Conv2d(64, 256, 3, padding=1).to(device=device, dtype=dtype)

    def fused():
        return ops.pixel_shuffle(conv2d(conv, x, with_bias=False), 2, bias=conv.bias)

    return x, {
        "eager": lambda: F.pixel_shuffle(conv(x), 2),
        "srkernels": fused,
        "srkernels (cache off)": harness.cache_off(fused),
    }


def conv_relu_variants(dtype, device):
    x = _t(*PAIR_SHAPE, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device=device, dtype=dtype)
    return x, {
        "eager": lambda: F.relu(conv(x)),
        "srkernels": lambda: conv2d(conv, x, "relu"),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["eager", "srkernels", "srkernels (cache off)", "srkernels+prealloc",
                                     "eager bias+shuffle", "srkernels bias+shuffle"])
def test_shuffle(benchmark, dtype, variant):
    benchmark.group = f"pixel_shuffle {list(SHUFFLE_SHAPE)} {dtype}"
    with torch.no_grad():
        benchmark(shuffle_variants(dtype, "cpu")[1][variant])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["eager", "srkernels", "srkernels (cache off)"])
def test_conv_shuffle_pair(benchmark, dtype, variant):
    benchmark.group = f"conv64->256 + shuffle(2) {list(PAIR_SHAPE)} {dtype}"
    with torch.no_grad():
        benchmark(pair_variants(dtype, "cpu")[1][variant])


def main() -> None:
    harness.enter_malloc_regime(harness.malloc_arg())
    device = harness.device_arg()
    quick = "--quick" in sys.argv
    rounds = 5 if quick else 15
    copy = harness.copy_bandwidth(device=device)
    print(f"copy bandwidth: {copy:.1f} GB/s (read + write)")
    rows = []
    with torch.no_grad():
        for dtype in DTYPES[:1] if quick else DTYPES:
            name = str(dtype)[6:]
            x, v = shuffle_variants(dtype, device)
            rows += harness.compare(f"shuffle(2) {list(SHUFFLE_SHAPE)} {name}", v, nbytes=2 * x.numel() * x.element_size(),
                                    copy_gbps=copy, baseline="eager", device=device, rounds=rounds, copy_of=x)
            for cl in (False, True):
                x, v = pair_variants(dtype, device, cl)
                rows += harness.compare(f"conv+shuffle {list(PAIR_SHAPE)} {name}{' NHWC' if cl else ''}", v,
                                        nbytes=2 * x.numel() * x.element_size() * 4, copy_gbps=copy,
                                        baseline="eager", device=device, rounds=rounds)
            x, v = conv_relu_variants(dtype, device)
            rows += harness.compare(f"conv+relu {list(PAIR_SHAPE)} {name} NHWC", v,
                                    nbytes=2 * x.numel() * x.element_size(), copy_gbps=copy, baseline="eager",
                                    device=device, rounds=rounds)
    table = harness.markdown(rows)
    print(table)
    path = harness.record(BENCH, rows, {"device": device, "copy_gbps": copy})
    if not quick:
        harness.update_readme(f"{BENCH}-{device}", f"Shuffle rows: % copy against their row `copy 256MB`, % "
                              f"same-size copy against their row `copy` (x into a preallocated tensor), both timed in "
                              f"the same rounds; GB/s counts read x + write out. Conv rows are compute-bound (GB/s not "
                              f"meaningful). `srkernels` allocates from its CPU output cache, `(cache off)` from "
                              f"PyTorch's default allocator each call (as the eager ops do); commit `{harness.git_sha()}`.\n\n{table}")
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
