"""Issue 16: ``SRKERNELS_CPU_CACHE_MB`` is validated in Python at import, before _C parses it with ``atol``
("abc" silently disabled the cache, "1e3" meant 1 MiB, 99999999999999 overflowed the limit). Each case runs
``import srkernels`` in a fresh interpreter (the C++ cache reads the variable once per process)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = "import srkernels, sys; print(srkernels.cpu_cache_info()['limit_bytes'] if srkernels._backend._C else -1)"


def _run(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SRKERNELS_CPU_CACHE_MB=value)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value", ["abc", "1e3", "99999999999999", "-1", ""])
def test_bad_value_is_an_import_error_naming_the_variable(value):
    p = _run(value)
    assert p.returncode != 0, p.stdout
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: SRKERNELS_CPU_CACHE_MB"), p.stderr


@pytest.mark.parametrize("value, mb", [("0", 0), (" 512\n", 512)])
def test_good_value_is_the_limit(value, mb):
    p = _run(value)
    assert p.returncode == 0, p.stderr
    got = int(p.stdout.split()[-1])
    if got == -1:
        pytest.skip("srkernels._C is not built: nothing reads the limit")
    assert got == mb << 20
