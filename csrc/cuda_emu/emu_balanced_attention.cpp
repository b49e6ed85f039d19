// csrc/cuda/balanced_attention.cu, compiled as C++ against the emulator (csrc/cuda_emu/cuda_emu.h).
#include "cuda_emu.h"
// clang-format off
#include "../cuda/balanced_attention.cu"
// clang-format on
#include "api.h"

namespace srk_emu_api {
std::tuple<T, T, T> balanced_attention(const T& x, const T& w1, const T& prelu_w, const T& w2, const T& w_sa,
                                       const OT& residual) {
  return srkernels::cuda::BalancedAttention::forward(x, w1, prelu_w, w2, w_sa, residual);
}
std::tuple<T, T, T, T, T> balanced_attention_backward(const T& go, const T& x, const T& mean, const T& maxmap,
                                                      const T& w1, const T& prelu_w, const T& w2, const T& w_sa) {
  return srkernels::cuda::balanced_attention_backward_cuda(go, x, mean, maxmap, w1, prelu_w, w2, w_sa);
}
void balanced_attention_out(const T& x, const T& w1, const T& prelu_w, const T& w2, const T& w_sa, const OT& residual,
                            const T& out) {
  srkernels::cuda::BalancedAttention::out(x, w1, prelu_w, w2, w_sa, residual, out);
}
void set_limits_balanced_attention(int64_t max_grid_y, int chunks_per_sample) {
  srkernels::cuda::kMaxGridY = max_grid_y;
  srkernels::cuda::kChunksPerSample = chunks_per_sample;
}
}  // namespace srk_emu_api
