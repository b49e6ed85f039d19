"""Every op declared in ``srkernels/ops/<op>.py`` (``SPEC``, found by ``srkernels.ops._registry``) is complete:
each of its dispatcher ops has a kernel for every backend the spec names (CPU, CUDA when the extension was built
with CUDA, Triton), a fake kernel and autograd in both namespaces, one schema shared by both, a parity test
file and a section in docs/ops.md; an op implemented by a library call instead has the Python kernels its spec
names (``kernels``). Adding an op: docs/ops.md, "Adding an op"."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._library.simple_registry import singleton as _simple_registry

import srkernels
from srkernels import _backend, ops
from srkernels import triton as kernels

ROOT = Path(__file__).resolve().parents[2]
SPECS = list(ops.SPECS.values())
compiled = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")


def _dispatcher_ops():
    return [(spec, op) for spec in SPECS for op in spec.schemas]


def _has_kernel(qual: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qual, key)


def test_registry_finds_the_ops_and_exports_them():
    assert {"channel_attention", "balanced_attention", "pixel_shuffle", "dense_block"} <= set(ops.OPS)
    for spec in SPECS:
        assert spec.module == spec.name
        for name in spec.public:
            assert name in ops.__all__ and callable(getattr(ops, name)), name
    assert set(srkernels.build_info()["ops"]) == set(ops.OPS)


@compiled
@pytest.mark.parametrize("spec,op", _dispatcher_ops(), ids=lambda v: getattr(v, "name", v))
def test_compiled_kernels_fakes_and_autograd(spec, op):
    qual = f"srkernels::{op}"
    assert str(getattr(torch.ops.srkernels, op).default._schema) == str(torch._C.parse_schema(qual + spec.schemas[op]))
    keys = [k for k, b in (("CPU", "cpu"), ("CUDA", "cuda")) if b in spec.backends]
    if not _backend._C.build_info().get("cuda", False):
        keys = [k for k in keys if k != "CUDA"]
    for key in keys:
        assert _has_kernel(qual, key), f"csrc has no {key} kernel for {qual} (TORCH_LIBRARY_IMPL(srkernels, {key}, m))"
    # an op whose implementation is a library call (no csrc kernel) registers Python kernels from its spec instead
    for key in spec.kernels.get(op, {}):
        assert _has_kernel(qual, key), f"no {key} kernel for {qual} (SPEC.kernels)"
    assert keys or spec.kernels.get(op), f"{qual} has neither a csrc kernel nor a Python kernel (SPEC.kernels)"
    assert _simple_registry.find(qual).fake_impl.kernel is not None, f"no fake for {qual}"
    if op in spec.autograd:
        assert _has_kernel(qual, "Autograd"), f"no autograd for {qual}"


@compiled
def test_no_compiled_kernel_without_a_spec():
    # a TORCH_LIBRARY_IMPL(srkernels, ...) for an op no SPEC declares would never be reachable
    declared = {f"srkernels::{op}" for _, op in _dispatcher_ops()}
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("srkernels::")}
    assert registered <= declared, f"kernels without a SPEC schema: {sorted(registered - declared)}"


@pytest.mark.skipif(not kernels.AVAILABLE, reason="triton is not installed")
@pytest.mark.parametrize("spec,op", [(s, o) for s, o in _dispatcher_ops() if "triton" in s.backends],
                         ids=lambda v: getattr(v, "name", v))
def test_triton_ops_share_the_schema_and_fake(spec, op):
    assert ops.load_triton()
    qual = f"srkernels_triton::{op}"
    schema = getattr(torch.ops.srkernels_triton, op).default._schema
    assert str(schema) == str(torch._C.parse_schema(qual + spec.schemas[op]))
    assert _simple_registry.find(qual).fake_impl.kernel is not None, f"no fake for {qual}"
    if op in spec.autograd:
        assert _has_kernel(qual, "Autograd"), f"no autograd for {qual}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_op_has_a_parity_test_bench_and_docs(spec):
    test = ROOT / "tests" / "ops" / f"test_{spec.name}.py"
    assert test.is_file(), f"{spec.name} has no parity test {test.relative_to(ROOT)}"
    assert "_parity" in test.read_text(), f"{test.relative_to(ROOT)} does not use tests/ops/_parity.py"
    assert f"\n## {spec.name}" in (ROOT / "docs" / "ops.md").read_text(), f"docs/ops.md has no '## {spec.name}'"
    bench = ROOT / "benchmarks" / f"bench_{spec.name}.py"
    assert bench.is_file(), f"{spec.name} has no benchmark {bench.relative_to(ROOT)}"
    if spec.has_out:
        from .test_out_variants import make_case
        make_case(spec.name, torch.float32, "contiguous", "compiled")  # raises when test_<op>.py has no out_case


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_op_has_the_signature_of_its_reference(spec):
    # the front end and its reference take the same arguments, in the same order (plus out=); defaults and
    # keyword-only markers may differ (a reference written like the schema)
    import inspect

    def names(fn):
        return [p for p in inspect.signature(fn).parameters if p != "out"]

    assert names(getattr(ops, spec.name)) == names(spec.reference)


_DEF_THEN_IMPL = """
import json, sys, torch
lib = torch.library.Library("srkernels", "DEF")
for op, schema in json.loads(sys.argv[2]).items():
    lib.define(op + schema)
torch.ops.load_library(sys.argv[1])  # the kernels register after the schemas this time
missing = [op for op in json.loads(sys.argv[2])
           if not torch._C._dispatch_has_kernel_for_dispatch_key("srkernels::" + op, "CPU")]
assert not missing, missing
print(torch.ops.srkernels.pixel_unshuffle(torch.randn(1, 1, 4, 4), 2).shape)
"""


@compiled
def test_schemas_defined_before_the_kernels_load():
    # import srkernels loads _C (kernels) before the Python definitions; the other order must work as well
    schemas = {op: spec.schemas[op] for spec, op in _dispatcher_ops() if "cpu" in spec.backends}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", _DEF_THEN_IMPL, _backend._C.__file__, json.dumps(schemas)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 4, 2, 2])" in out.stdout
