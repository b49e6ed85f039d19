"""The CPU output cache (csrc/cpu/output_cache.*): large outputs reuse freed blocks, never a live one; the byte
limit holds; results stay exact through reuse, resize and concurrent use."""
import threading

import pytest
import torch
import torch.nn.functional as F

import srkernels
from srkernels import ops

pytest.importorskip("srkernels._C", reason="the cache belongs to the compiled CPU kernels")

BIG = (1, 64, 64, 64)  # 1 MiB of float32 input; the r=2 shuffle output is as large (cache threshold: 1 MiB)


@pytest.fixture(autouse=True)
def fresh_cache():
    limit = srkernels.cpu_cache_info()["limit_bytes"]
    srkernels.empty_cpu_cache()
    srkernels.set_cpu_cache_limit(256 << 20)
    yield
    srkernels.set_cpu_cache_limit(limit)


def test_reuse_gives_fresh_results_and_never_a_live_block():
    xs = [torch.randn(*BIG, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    y0 = ops.pixel_shuffle(xs[0], 2)
    before = srkernels.cpu_cache_info()
    y1 = ops.pixel_shuffle(xs[1], 2)
    assert y1.data_ptr() != y0.data_ptr()  # y0 is alive: its block is not in the cache
    ptr = y1.data_ptr()
    del y1
    assert srkernels.cpu_cache_info()["cached_bytes"] >= 1 << 20
    y2 = ops.pixel_shuffle(xs[2], 2)
    after = srkernels.cpu_cache_info()
    assert y2.data_ptr() == ptr and after["hits"] == before["hits"] + 1
    assert torch.equal(y2, F.pixel_shuffle(xs[2], 2)) and torch.equal(y0, F.pixel_shuffle(xs[0], 2))


def test_small_outputs_bypass_the_cache():
    before = srkernels.cpu_cache_info()
    for _ in range(3):
        ops.pixel_shuffle(torch.randn(1, 8, 5, 7), 2)
    after = srkernels.cpu_cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_limit_and_empty():
    ys = [ops.pixel_shuffle(torch.randn(*BIG), 2) for _ in range(4)]  # 4 distinct live blocks of 2 MiB
    srkernels.set_cpu_cache_limit(5 << 20)
    del ys  # only two fit under the limit; the rest go back to the system
    info = srkernels.cpu_cache_info()
    assert 0 < info["cached_bytes"] <= 5 << 20
    srkernels.empty_cpu_cache()
    assert srkernels.cpu_cache_info()["cached_bytes"] == 0
    srkernels.set_cpu_cache_limit(0)  # disabled: nothing is kept, results unchanged
    x = torch.randn(*BIG)
    y = ops.pixel_shuffle(x, 2)
    del y
    assert srkernels.cpu_cache_info()["cached_bytes"] == 0
    assert torch.equal(ops.pixel_shuffle(x, 2), F.pixel_shuffle(x, 2))


def test_paused_bypasses_and_keeps_the_cache():
    x = torch.randn(*BIG)
    del_me = ops.pixel_shuffle(x, 2)
    ptr = del_me.data_ptr()
    del del_me
    held = srkernels.cpu_cache_info()
    assert held["cached_bytes"] >= 1 << 20 and not held["paused"]
    with srkernels.cpu_cache_paused():
        assert srkernels.cpu_cache_info()["paused"]
        y = ops.pixel_shuffle(x, 2)  # from the default allocator: the held block stays where it is
        assert y.data_ptr() != ptr and torch.equal(y, F.pixel_shuffle(x, 2))
        info = srkernels.cpu_cache_info()
        assert (info["cached_bytes"], info["hits"], info["misses"]) == (held["cached_bytes"], held["hits"],
                                                                         held["misses"])
        del y
    assert not srkernels.cpu_cache_info()["paused"]
    y = ops.pixel_shuffle(x, 2)
    assert y.data_ptr() == ptr and srkernels.cpu_cache_info()["hits"] == held["hits"] + 1


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_limit(bad):
    with pytest.raises(ValueError, match="nbytes"):
        srkernels.set_cpu_cache_limit(bad)


def test_cached_tensor_behaves_like_any_tensor():
    x = torch.randn(*BIG)
    y = ops.pixel_shuffle(x, 2)
    ref = F.pixel_shuffle(x, 2)
    y.resize_(2, *ref.shape[1:])  # grows through the tensor's own allocator
    assert torch.equal(y[:1], ref)
    z = ops.channel_attention(torch.randn(*BIG), torch.randn(4, 64), None, torch.randn(64, 4), None)
    z.add_(1).mul_(2)
    assert z.is_contiguous() and torch.isfinite(z).all()
    w = ops.channel_attention(torch.randn(*BIG).to(memory_format=torch.channels_last), torch.randn(4, 64), None,
                              torch.randn(64, 4), None)
    assert w.is_contiguous(memory_format=torch.channels_last)  # the input's layout, as empty_like


def test_concurrent_threads_get_correct_results():
    errors = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(20):
            x = torch.randn(*BIG, generator=g)
            if not torch.equal(ops.pixel_shuffle(x, 2), F.pixel_shuffle(x, 2)):
                errors.append(seed)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_winograd_conv_outputs_come_from_the_cache():
    """winograd_conv3x3's output (an upsampler conv's is tens of MB) reuses a freed block, in either format."""
    import importlib
    W = importlib.import_module("srkernels.ops.winograd_conv3x3")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(16, 16, 3, 3, generator=g) / 12, torch.randn(16, generator=g)
    u = W.winograd_weight(w, 4)
    for fmt in (torch.channels_last, torch.contiguous_format):
        xs = [torch.randn(*BIG[:1], 16, 128, 128, generator=g).contiguous(memory_format=fmt) for _ in range(2)]
        y0 = ops.winograd_conv3x3(xs[0], u, b)  # 1 MiB: the cache threshold
        ptr = y0.data_ptr()
        del y0
        before = srkernels.cpu_cache_info()["hits"]
        y1 = ops.winograd_conv3x3(xs[1], u, b)
        assert srkernels.cpu_cache_info()["hits"] > before
        if fmt == torch.channels_last:  # the kernel's own format: no copy, the freed block itself
            assert y1.data_ptr() == ptr
        assert y1.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y1, F.conv2d(xs[1], w, b, padding=1), rtol=0, atol=2e-4)
