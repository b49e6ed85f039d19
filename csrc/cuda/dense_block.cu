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
#include "runtime/register.h"

#include <c10/cuda/CUDAGuard.h>

namespace srkernels::cuda {
namespace {

using namespace srkernels::dense;

// The device of t (x, or grad_out), which must be a 4-D CUDA tensor: the device the entry point's guard selects.
c10::Device cuda_device(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.dim() == 4 && t.is_cuda(), op, ": ", what, " must be a 4-D CUDA tensor");
  return t.device();
}

// t, dense in its own suggested memory format (NCHW or channels_last), as the generic functions take it.
at::Tensor own_layout(const at::Tensor& t) {
  return t.contiguous(t.suggest_memory_format());
}

Outputs dense_block_cuda(const at::Tensor& x_in, at::TensorList weights, at::TensorList biases, at::IntArrayRef plan,
                         const std::optional<at::Tensor>& fuse_w, const std::optional<at::Tensor>& fuse_b,
                         const std::optional<at::Tensor>& gw1, const std::optional<at::Tensor>& gb1,
                         const std::optional<at::Tensor>& gw2, const std::optional<at::Tensor>& gb2,
                         const std::optional<at::Tensor>& residual) {
  const c10::cuda::CUDAGuard guard(cuda_device(x_in, "x", kOp));
  const Plan pl = parse_plan(plan, weights, kOp);
  TORCH_CHECK(x_in.size(1) == pl.Cx, kOp, ": x has ", x_in.size(1), " channels, the plan ", pl.Cx);
  check_args(x_in, weights, biases, pl, fuse_w, kOp);
  check_forward_args(x_in, pl, fuse_w, fuse_b, gw1, gw2, residual);
  return forward_generic(own_layout(x_in), weights, biases, pl, fuse_w, fuse_b, gw1, gb1, gw2, gb2, residual);
}

Grads dense_block_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& buf, const at::Tensor& stats,
                                at::TensorList weights, at::TensorList biases, at::IntArrayRef plan,
                                const std::optional<at::Tensor>& fuse_w, const std::optional<at::Tensor>& gw1,
                                const std::optional<at::Tensor>& gb1, const std::optional<at::Tensor>& gw2,
                                const std::optional<at::Tensor>& gb2) {
  const c10::cuda::CUDAGuard guard(cuda_device(grad_out_in, "grad_out", kOpBw));
  const Plan pl = parse_plan(plan, weights, kOpBw);
  check_args(buf, weights, biases, pl, fuse_w, kOpBw);
  check_backward_args(grad_out_in, buf, pl, fuse_w, gw1, gw2);
  return backward_generic(own_layout(grad_out_in), buf, stats, weights, biases, pl, fuse_w, gw1, gb1, gw2, gb2);
}

}  // namespace
}  // namespace srkernels::cuda

SRK_CUDA_OP(dense_block, dense_block_cuda)
SRK_CUDA_OP(dense_block_backward, dense_block_backward_cuda)
