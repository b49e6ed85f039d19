"""Post-link check of the runtime CPU dispatch (csrc/runtime/cpu_dispatch.h), run by CMakeLists.txt.

Inline functions outside our capability namespaces (std::, c10::) are emitted by every compile that calls
them, and the linker keeps one copy. A capability may only ever call a copy that needs no more than it has:
for every global function that a capability's archive defines, the copy kept in the module must use no
instruction beyond the lowest capability that defines it. Fails the build otherwise.

usage: check_isa.py MODULE default=libsrk_cpu_default.a avx2=libsrk_cpu_avx2.a ...
"""
from __future__ import annotations

import re
import subprocess
import sys

LEVELS = {"default": 0, "avx2": 1, "avx512": 2}
_AVX512 = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b")
_HEAD = re.compile(r"^([0-9a-f]+) <(.*)>:$")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def global_functions(path: str) -> dict[str, int]:
    """Defined global/weak text symbols -> address (0 for archives)."""
    out = {}
    for line in run("nm", "--defined-only", path).splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "TW":
            out[parts[2]] = int(parts[0], 16)
    return out


def isa_levels(module: str) -> dict[int, int]:
    """Function start address -> the highest capability its instructions need (VEX: avx2, EVEX: avx512)."""
    levels: dict[int, int] = {}
    addr = None
    for line in run("objdump", "-d", "--no-show-raw-insn", module).splitlines():
        m = _HEAD.match(line)
        if m:
            addr = int(m.group(1), 16)
            levels[addr] = 0
            continue
        if addr is None or "\t" not in line:
            continue
        ins = line.split("\t", 1)[1]
        mnemonic = ins.split()[0] if ins.split() else ""
        if _AVX512.search(ins):
            levels[addr] = 2
        elif levels[addr] < 1 and (mnemonic.startswith("v") or "%ymm" in ins):
            levels[addr] = 1
    return levels


def main(argv: list[str]) -> int:
    module, archives = argv[0], dict(a.split("=", 1) for a in argv[1:])
    lowest: dict[str, int] = {}
    for cap, path in archives.items():
        for sym in global_functions(path):
            lowest[sym] = min(lowest.get(sym, 99), LEVELS[cap])
    kept = global_functions(module)
    levels = isa_levels(module)
    names = {v: k for k, v in LEVELS.items()}
    bad = [(sym, levels[kept[sym]], lvl) for sym, lvl in lowest.items()
           if sym in kept and levels.get(kept[sym], 0) > lvl]
    for sym, got, allowed in bad[:20]:
        print(f"check_isa: {sym} is kept in its {names[got]} copy but called from {names[allowed]} code",
              file=sys.stderr)
    if bad:
        print(f"check_isa: {len(bad)} functions break the capability link order", file=sys.stderr)
        return 1
    print(f"check_isa: OK ({len(lowest)} global functions of {', '.join(archives)} checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
