"""Imports flow one way: models -> nn -> ops -> kernels (triton, the compiled _C via _backend) and the
reference; the shared leaves (``_util``, ``_validate``, ``_io``, ``dense_plan``) import nothing from srkernels. A module importing a
layer above its own fails here (issue 15: triton/dense_block.py imported ops/dense_block.py)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "srkernels"
RANK = {"_util": 0, "_validate": 0, "_io": 0, "dense_plan": 0, "_backend": 1, "triton": 1, "reference": 1, "ops": 2, "nn": 3, "models": 4}


def _layer(parts: list[str]) -> str | None:
    return parts[0] if parts and parts[0] in RANK else None


def _imports(path: Path) -> list[list[str]]:
    """The srkernels-relative module paths ``path`` imports (absolute or relative, at any depth of the file)."""
    here = list(path.relative_to(PKG).with_suffix("").parts)
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                found += [target + [a.name] if not node.module else target for a in node.names]
            elif node.module and node.module.split(".")[0] == "srkernels":
                found.append(node.module.split(".")[1:])
        elif isinstance(node, ast.Import):
            found += [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "srkernels"]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("srkernels."):
                found.append(arg.value.split(".")[1:])
    return found


FILES = [p for p in sorted(PKG.rglob("*.py")) if _layer(list(p.relative_to(PKG).with_suffix("").parts))]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_import_from_a_higher_layer(path):
    own = _layer(list(path.relative_to(PKG).with_suffix("").parts))
    for target in _imports(path):
        layer = _layer(target)
        if layer is not None:
            assert RANK[layer] <= RANK[own], f"{path.relative_to(PKG)} ({own}) imports srkernels.{'.'.join(target)}"
