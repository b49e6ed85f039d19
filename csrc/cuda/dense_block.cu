// CUDA forward/backward of srkernels::dense_block (contract: srkernels/ops/dense_block.py).
//
// Host code only: the buffer layout and the ATen implementation are csrc/dense_block_common.h. Each kxk conv is
// k*k cuBLAS GEMMs on row-strided views of the buffer (leading dimension T, so a channel range is read in place
// and the concat never exists), accumulated in fp32 (addmm with out_dtype for bf16/fp16, i.e. cublasGemmEx with
// fp32 compute); bias, residual, ReLU and the border zeroing are ATen pointwise ops on [pixels, G] tiles; the
// backward adds every layer's input gradient into the fp32 gradient buffer in place (addmm_ on its views).
// Compiled here without a GPU: correctness of these code paths is covered on CPU by the same generic functions
// (SRKERNELS_DENSE_GENERIC=1 in tests/ops/test_dense_block.py), not on a device.
// TODO(perf): a fused implicit-GEMM kernel (Triton or CUTLASS) that applies the k*k taps inside one GEMM and the
// epilogue in registers would remove the per-tap passes over the [pixels, G] accumulator.
#include "dense_block_common.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace srkernels::cuda {
namespace {

using namespace srkernels::dense;

Outputs dense_block_cuda(const at::Tensor& x_in, at::TensorList weights, at::TensorList biases, at::IntArrayRef plan,
                         const std::optional<at::Tensor>& fuse_w, const std::optional<at::Tensor>& fuse_b,
                         const std::optional<at::Tensor>& gw1, const std::optional<at::Tensor>& gb1,
                         const std::optional<at::Tensor>& gw2, const std::optional<at::Tensor>& gb2,
                         const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.is_cuda(), kOp, ": x must be a 4-D CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Plan pl = parse_plan(plan, weights, kOp);
  TORCH_CHECK(x_in.size(1) == pl.Cx, kOp, ": x has ", x_in.size(1), " channels, the plan ", pl.Cx);
  check_args(x_in, weights, biases, pl, fuse_w, kOp);
  check_forward_args(x_in, pl, fuse_w, fuse_b, gw1, gw2, residual);
  const at::Tensor x = x_in.contiguous(x_in.suggest_memory_format());
  return forward_generic(x, weights, biases, pl, fuse_w, fuse_b, gw1, gb1, gw2, gb2, residual);
}

Grads dense_block_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& buf, const at::Tensor& stats,
                                at::TensorList weights, at::TensorList biases, at::IntArrayRef plan,
                                const std::optional<at::Tensor>& fuse_w, const std::optional<at::Tensor>& gw1,
                                const std::optional<at::Tensor>& gb1, const std::optional<at::Tensor>& gw2,
                                const std::optional<at::Tensor>& gb2) {
  TORCH_CHECK(grad_out_in.dim() == 4 && grad_out_in.is_cuda(), kOpBw, ": grad_out must be a 4-D CUDA tensor");
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const Plan pl = parse_plan(plan, weights, kOpBw);
  check_args(buf, weights, biases, pl, fuse_w, kOpBw);
  check_backward_args(grad_out_in, buf, pl, fuse_w, gw1, gw2);
  const at::Tensor grad_out = grad_out_in.contiguous(grad_out_in.suggest_memory_format());
  return backward_generic(grad_out, buf, stats, weights, biases, pl, fuse_w, gw1, gb1, gw2, gb2);
}

}  // namespace
}  // namespace srkernels::cuda

TORCH_LIBRARY_IMPL(srkernels, CUDA, m) {
  m.impl("dense_block", &srkernels::cuda::dense_block_cuda);
  m.impl("dense_block_backward", &srkernels::cuda::dense_block_backward_cuda);
}
