// CPU forward/backward of srkernels::dense_block (contract: srkernels/ops/dense_block.py, buffer layout:
// csrc/dense_block_common.h).
#include "dense_block_common.h"

#include <torch/library.h>

namespace srkernels::cpu {
namespace {

using namespace srkernels::dense;

Outputs dense_block_cpu(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                        at::IntArrayRef plan, const std::optional<at::Tensor>& fuse_w,
                        const std::optional<at::Tensor>& fuse_b, const std::optional<at::Tensor>& gw1,
                        const std::optional<at::Tensor>& gb1, const std::optional<at::Tensor>& gw2,
                        const std::optional<at::Tensor>& gb2, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), kOp, ": x must be a 4-D CPU tensor");
  const Plan pl = parse_plan(plan, weights, kOp);
  TORCH_CHECK(x.size(1) == pl.Cx, kOp, ": x has ", x.size(1), " channels, the plan ", pl.Cx);
  check_args(x, weights, biases, pl, fuse_w, kOp);
  return forward_generic(x, weights, biases, pl, fuse_w, fuse_b, gw1, gb1, gw2, gb2, residual);
}

Grads dense_block_backward_cpu(const at::Tensor& grad_out, const at::Tensor& buf, const at::Tensor& stats,
                               at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                               at::IntArrayRef plan, const std::optional<at::Tensor>& fuse_w,
                               const std::optional<at::Tensor>& gw1, const std::optional<at::Tensor>& gb1,
                               const std::optional<at::Tensor>& gw2, const std::optional<at::Tensor>& gb2) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.device().is_cpu(), kOpBw, ": grad_out must be a 4-D CPU tensor");
  const Plan pl = parse_plan(plan, weights, kOpBw);
  check_args(buf, weights, biases, pl, fuse_w, kOpBw);
  return backward_generic(grad_out, buf, stats, weights, biases, pl, fuse_w, gw1, gb1, gw2, gb2);
}

}  // namespace
}  // namespace srkernels::cpu

TORCH_LIBRARY_IMPL(srkernels, CPU, m) {
  m.impl("dense_block", &srkernels::cpu::dense_block_cpu);
  m.impl("dense_block_backward", &srkernels::cpu::dense_block_backward_cpu);
}
