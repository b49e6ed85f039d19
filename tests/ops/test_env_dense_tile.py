"""``SRKERNELS_DENSE_TILE`` (the CPU dense_block's tile size, csrc/cpu/dense_block.cpp) is parsed strictly: a bad
value is a ValueError naming the variable (atoll read "abc" as 0 and "1e3" as 1, both silently clamped to 256).
The kernel reads the variable once per process, at the first micro-kernel call; a rejected value is not kept, so
one fresh interpreter tries every bad value in turn and then a good one."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BAD = ["abc", "1e3", "", "-512", "255", "16777217", "99999999999999999999", "4096x", "0x1000"]
PROBE = """
import os, sys, torch, srkernels
from srkernels import ops, use_backend
from srkernels.ops.dense_block import rdb_plan
if not srkernels._backend._C:
    print("no _C"); raise SystemExit(0)
plan = rdb_plan(2, 2, 1)
x = torch.randn(1, 2, 5, 5)
ws = [torch.randn(2, 2, 3, 3)]
for v in sys.argv[1:]:
    os.environ["SRKERNELS_DENSE_TILE"] = v
    try:
        with use_backend("compiled"):
            ops.dense_block(x, ws, [None], plan)
        print("ok")
    except ValueError as e:
        print("ValueError:", str(e).splitlines()[0])
"""


def _run(*values: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SRKERNELS_DENSE_GENERIC", "SRKERNELS_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-c", PROBE, *values], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    if p.stdout.strip() == "no _C":
        pytest.skip("srkernels._C is not built: nothing reads the variable")
    return p.stdout.splitlines()


def test_bad_values_are_value_errors_naming_the_variable_then_a_good_one_runs():
    lines = _run(*BAD, "256", "abc")
    assert len(lines) == len(BAD) + 2, lines
    for v, line in zip(BAD, lines):
        assert line.startswith("ValueError: SRKERNELS_DENSE_TILE") and f'got "{v}"' in line, (v, line)
    assert lines[-2:] == ["ok", "ok"]  # 256 accepted, then read once: later changes are not seen


def test_whitespace_around_a_good_value_is_accepted():
    assert _run(" 16777216\n") == ["ok"]
