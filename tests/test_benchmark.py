"""srkernels.benchmark: interleaved timing and its page-fault count (the column that says whether a
"default allocation" row paid first-touch faults)."""
import mmap

from srkernels.benchmark import interleaved

PAGES = 1024


def touch_fresh_pages():
    m = mmap.mmap(-1, PAGES * mmap.PAGESIZE)  # anonymous: every page faults on its first write
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # with THP "always" a huge page would fault once for 512 pages
        m.madvise(mmap.MADV_NOHUGEPAGE)
    for i in range(0, PAGES * mmap.PAGESIZE, mmap.PAGESIZE):
        m[i] = 1
    m.close()


def test_interleaved_times_every_variant_every_round():
    t = interleaved({"a": lambda: None, "b": lambda: sum(range(100))}, rounds=4, min_round_ms=0.1)
    assert set(t) == {"a", "b"}
    for tim in t.values():
        assert len(tim.times_ms) == 4 and tim.min > 0 and tim.min <= tim.median


def test_faults_per_call_counts_first_touch():
    t = interleaved({"fresh": touch_fresh_pages, "reused": lambda: sum(range(100))}, rounds=3, min_round_ms=1.0)
    assert len(t["fresh"].faults) == 3
    assert t["fresh"].faults_per_call >= PAGES * 0.9
    assert t["reused"].faults_per_call < 10
