"""Two rooms: the kernel library never imports the SR toolkit; the toolkit uses only public names."""
import ast
from pathlib import Path

import srkernels
import srkernels.toolkit

ROOT = Path(srkernels.__file__).parent
# the command line is the front door of both rooms; everything else below srkernels/ is the kernel library
FRONT = {ROOT / "cli.py", ROOT / "__main__.py"}
# the low-level modules both rooms share (they import nothing of srkernels): atomic writes, argument checks
SHARED = {"_io", "_validate"}


def _imports(path: Path):
    """(absolute module, imported names) of every import statement in ``path``, lazy ones included."""
    pkg = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            yield mod, names
            for n in names:  # "from . import toolkit"
                yield f"{mod}.{n}", []


def test_the_library_never_imports_the_toolkit():
    bad = []
    for p in sorted(ROOT.rglob("*.py")):
        if (ROOT / "toolkit") in p.parents or p in FRONT:
            continue
        bad += [f"{p.relative_to(ROOT)}: {m}" for m, _ in _imports(p)
                if m == "srkernels.toolkit" or m.startswith("srkernels.toolkit.")]
    assert not bad, bad


def test_the_toolkit_imports_no_private_names():
    bad = []
    for p in sorted((ROOT / "toolkit").glob("*.py")):
        for mod, names in _imports(p):
            if mod.startswith("srkernels"):
                bad += [f"{p.name}: from {mod} import {n}" for n in names if n.startswith("_")]
                bad += [f"{p.name}: {mod}" for part in mod.split(".")[1:] if part.startswith("_") and part not in SHARED]
    assert not bad, bad


def test_public_api_resolves():
    api = srkernels.toolkit.__all__
    assert len(api) == len(set(api))
    missing = [n for n in api if not hasattr(srkernels.toolkit, n)]
    assert not missing, missing
    for n in ("train", "load_model", "Upscaler", "evaluate", "imresize", "psnr", "ssim", "PairedImageFolder"):
        assert n in api
