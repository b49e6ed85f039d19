"""``SRKERNELS_DENSE_TILE`` (the CPU dense_block's tile size, csrc/cpu/dense_block.cpp) is parsed strictly: a bad
value is a ValueError naming the variable (atoll read "abc" as 0 and "1e3" as 1, both silently clamped to 256).
Each case runs in a fresh interpreter: the kernel reads the variable once per process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import torch, srkernels
from srkernels import ops, use_backend
from srkernels.ops.dense_block import rdb_plan
if not srkernels._backend._C:
    print("no _C"); raise SystemExit(0)
plan = rdb_plan(2, 2, 1)
x = torch.randn(1, 2, 5, 5)
ws = [torch.randn(2, 2, 3, 3)]
with use_backend("compiled"):
    for _ in range(2):  # a failed parse is not cached as a value
        try:
            ops.dense_block(x, ws, [None], plan)
            print("ok")
        except ValueError as e:
            print("ValueError:", e)
"""


def _run(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SRKERNELS_DENSE_TILE=value)
    for k in ("SRKERNELS_DENSE_GENERIC", "SRKERNELS_BACKEND"):  # the micro-kernel path must run
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value", ["abc", "1e3", "", "-512", "255", "99999999999999999999", "4096x", "0x1000"])
def test_bad_value_is_a_value_error_naming_the_variable(value):
    p = _run(value)
    assert p.returncode == 0, p.stderr
    if p.stdout.strip() == "no _C":
        pytest.skip("srkernels._C is not built: nothing reads the variable")
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 2 and all(l.startswith("ValueError: SRKERNELS_DENSE_TILE") for l in lines), p.stdout
    assert repr(value)[1:-1] in lines[0] or value == "", lines[0]


@pytest.mark.parametrize("value", ["256", " 4096\n", "16777216"])
def test_good_value_runs(value):
    p = _run(value)
    assert p.returncode == 0, p.stderr
    if p.stdout.strip() == "no _C":
        pytest.skip("srkernels._C is not built: nothing reads the variable")
    assert p.stdout.split() == ["ok", "ok"], p.stdout
