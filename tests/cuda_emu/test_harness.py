"""The emulator itself (csrc/cuda_emu/cuda_emu.h): barriers, shuffles and the checks it promises can fail."""
from __future__ import annotations

import pytest
import torch

from .emu import load


@pytest.fixture(scope="module")
def emu():
    m = load()
    yield m
    m.set_schedule(threads=0, blocks=0)


def rotate(emu, barrier, sched, blocks=2, threads=64):
    x = torch.arange(blocks * threads, dtype=torch.float32)
    out = torch.empty_like(x)
    emu.set_schedule(threads=sched[0], blocks=sched[1])
    try:
        emu.self_test("rotate", x, out, blocks, threads, int(barrier))
    finally:
        emu.set_schedule(threads=0, blocks=0)
    want = x.view(blocks, threads).roll(-1, dims=1).reshape(-1)
    return torch.equal(out, want)


def test_barrier_orders_shared_memory(emu):
    for sched in [(0, 0), (1, 1), (2, 0), (3, 2), (4, 3)]:
        assert rotate(emu, True, sched), sched


def test_missing_barrier_shows_up(emu):
    """Without the __syncthreads between the shared-memory write and the read of a neighbour's slot, the
    result is wrong under some schedule (the emulator poisons shared memory and runs threads in several
    orders): a race of this kind in a real kernel would fail test_schedule_independent or the parity tests."""
    results = [rotate(emu, False, s) for s in [(0, 0), (1, 0), (2, 0), (3, 0), (5, 0)]]
    assert not all(results), results


def test_divergent_barrier_is_an_error(emu):
    with pytest.raises(RuntimeError, match="deadlock|divergent|non-uniform"):
        emu.self_test("divergent_barrier", torch.zeros(32), torch.zeros(32), 1, 32, 0)


def test_shuffle_with_exited_lane_is_an_error(emu):
    with pytest.raises(RuntimeError, match="exited"):
        emu.self_test("exited_lane_shuffle", torch.zeros(32), torch.zeros(32), 1, 32, 0)


@pytest.mark.parametrize("width", [32, 16, 4, 1])
def test_shfl_down_segments(emu, width):
    x = torch.arange(64, dtype=torch.float32)
    out = torch.empty_like(x)
    emu.self_test("segment_sum", x, out, 1, 64, width)
    # lane 0 of each segment holds the segment's sum (a tree of __shfl_down_sync with that width)
    seg = x.view(-1, width).sum(1)
    assert torch.equal(out.view(-1, width)[:, 0], seg)


def test_launch_limits_are_checked(emu):
    with pytest.raises(RuntimeError, match="block beyond"):
        emu.self_test("rotate", torch.zeros(2048), torch.zeros(2048), 1, 2048, 1)
