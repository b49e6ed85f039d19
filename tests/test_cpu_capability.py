"""Runtime CPU dispatch (csrc/runtime/cpu_dispatch.h): which compiled capability runs, how to force one, and
how results compare across capabilities (the contract in docs/ops.md "Results across CPUs and threads")."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import srkernels
from srkernels import _backend

from .conftest import TOL, assert_close

pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")

ORDER = ("default", "avx2", "avx512")
PROBE = Path(__file__).with_name("capability_probe.py")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SRKERNELS_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    env.update(extra)
    return env


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=_env(**env), capture_output=True, text=True,
                          timeout=300)


def _runnable() -> list[str]:
    info = srkernels.build_info()
    supported = _backend._C.supported_cpu_capabilities()
    return [c for c in info["cpu_capabilities"] if c in supported]


def test_build_info_reports_compiled_and_chosen():
    info = srkernels.build_info()
    compiled = info["cpu_capabilities"]
    assert compiled[0] == "default" and compiled == [c for c in ORDER if c in compiled]
    assert info["cpu_capability"] in _runnable()
    forced = os.environ.get("SRKERNELS_CPU_CAPABILITY")
    if forced:
        assert info["cpu_capability"] == forced.lower()
    else:  # the best we have that ATen would also use
        aten = torch.backends.cpu.get_cpu_capability().lower()
        limit = ORDER.index(aten) if aten in ORDER else 0
        assert info["cpu_capability"] == [c for c in _runnable() if ORDER.index(c) <= limit][-1]


def test_follows_aten_cpu_capability():
    r = _python("import srkernels; print(srkernels.build_info()['cpu_capability'])", ATEN_CPU_CAPABILITY="default")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "default"


def test_unknown_capability_is_a_clear_error():
    r = _python("import srkernels", SRKERNELS_CPU_CAPABILITY="avx1024")
    assert r.returncode != 0
    assert "ValueError: SRKERNELS_CPU_CAPABILITY must be default, avx2 or avx512, got 'avx1024'" in r.stderr


def test_capability_beyond_the_cpu_is_a_clear_error():
    missing = [c for c in srkernels.build_info()["cpu_capabilities"] if c not in _runnable()]
    if not missing:
        pytest.skip("this CPU runs every compiled capability (scripts/smoke.py checks this under qemu)")
    r = _python("import srkernels", SRKERNELS_CPU_CAPABILITY=missing[-1])
    assert r.returncode != 0 and f"this CPU does not support {missing[-1]}" in r.stderr


# Results that must be bitwise equal across capabilities (docs/ops.md): everything of dense_block and
# pixel_unshuffle, pixel_shuffle's output and input gradient. The rest (reductions whose partial sums follow
# the vector width) must agree within the dtype's tolerance.
BITWISE = ("dense_block/", "dense_block_rdcab/", "pixel_unshuffle/")
BITWISE_SUFFIX = {"pixel_shuffle/": ("/out", "/grad_x")}


def _bitwise(key: str) -> bool:
    if key.startswith(BITWISE):
        return True
    return any(key.startswith(p) and key.endswith(s) for p, s in BITWISE_SUFFIX.items())


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """capability_probe.py's results under every capability this CPU runs, computed side by side."""
    out = tmp_path_factory.mktemp("probe")
    procs = {}
    for cap in _runnable():
        procs[cap] = subprocess.Popen([sys.executable, str(PROBE), str(out / f"{cap}.pt")],
                                      env=_env(SRKERNELS_CPU_CAPABILITY=cap, OMP_NUM_THREADS="1"),
                                      stderr=subprocess.PIPE, text=True)
    results = {}
    for cap, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{cap}: {err}"
        results[cap] = torch.load(out / f"{cap}.pt")
        assert results[cap].pop("_capability") == cap
    return results


def test_results_across_capabilities(probes):
    if len(probes) < 2:
        pytest.skip("this CPU runs only the default capability")
    best = max(probes, key=ORDER.index)
    checked = 0
    for cap, res in probes.items():
        if cap == best:
            continue
        assert res.keys() == probes[best].keys()
        for key, got in res.items():
            want = probes[best][key]
            if _bitwise(key):
                assert torch.equal(got, want), f"{key}: {cap} differs from {best}"
            else:
                assert_close(got, want, got.dtype, f"{key} {cap} vs {best}")
            checked += 1
    assert checked > 100


def test_tolerances_are_the_documented_ones():
    # docs/ops.md quotes these numbers; keep them in step.
    text = (Path(__file__).parents[1] / "docs" / "ops.md").read_text()
    assert f"{TOL[torch.float32]:g}" in text and f"{TOL[torch.bfloat16]:g}" in text
