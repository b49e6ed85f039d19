// csrc/cuda/channel_attention.cu, compiled as C++ against the emulator (csrc/cuda_emu/cuda_emu.h).
#include "cuda_emu.h"
// clang-format off
#include "../cuda/channel_attention.cu"
// clang-format on
#include "api.h"

namespace srk_emu_api {
std::tuple<T, T> channel_attention(const T& x, const T& w1, const OT& b1, const T& w2, const OT& b2, const OT& residual,
                                   const OT& act_weight, const std::string& pool) {
  return srkernels::cuda::ChannelAttention::forward(x, w1, b1, w2, b2, residual, act_weight, pool);
}
std::tuple<T, T, T, T, T, T> channel_attention_backward(const T& go, const T& x, const T& stats, const T& w1,
                                                        const OT& b1, const T& w2, const OT& b2, const OT& act_weight,
                                                        const std::string& pool) {
  return srkernels::cuda::channel_attention_backward_cuda(go, x, stats, w1, b1, w2, b2, act_weight, pool);
}
void channel_attention_out(const T& x, const T& w1, const OT& b1, const T& w2, const OT& b2, const OT& residual,
                           const OT& act_weight, const std::string& pool, const T& out) {
  srkernels::cuda::ChannelAttention::out(x, w1, b1, w2, b2, residual, act_weight, pool, out);
}
void set_limits_channel_attention(int64_t max_grid_y, int chunks_per_sample) {
  srkernels::cuda::kMaxGridY = max_grid_y;
  srkernels::cuda::kChunksPerSample = chunks_per_sample;
}
}  // namespace srk_emu_api
