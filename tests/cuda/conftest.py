import os

# cuBLAS picks a GEMM's split of the reduction (and so its bits) per call unless its workspace is fixed; with
# torch.use_deterministic_algorithms(True) ATen refuses cuBLAS GEMMs without this (docs/ops.md § Determinism).
# Set before any CUDA context exists (collection happens before any test runs).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
