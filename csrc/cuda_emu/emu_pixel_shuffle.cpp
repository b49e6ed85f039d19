// csrc/cuda/pixel_shuffle.cu, compiled as C++ against the emulator (csrc/cuda_emu/cuda_emu.h).
#include "cuda_emu.h"
// clang-format off
#include "../cuda/pixel_shuffle.cu"
// clang-format on
#include "api.h"

namespace srk_emu_api {
T pixel_shuffle(const T& x, int64_t r, const OT& bias, const OT& act_weight, const std::string& act,
                const OT& residual) {
  return srkernels::cuda::PixelShuffle::forward(x, r, bias, act_weight, act, residual);
}
std::tuple<T, T, T> pixel_shuffle_backward(const T& go, const OT& x, int64_t r, const OT& bias, const OT& act_weight,
                                           const std::string& act) {
  return srkernels::cuda::pixel_shuffle_backward_cuda(go, x, r, bias, act_weight, act);
}
void pixel_shuffle_out(const T& x, int64_t r, const OT& bias, const OT& act_weight, const std::string& act,
                       const OT& residual, const T& out) {
  srkernels::cuda::PixelShuffle::out(x, r, bias, act_weight, act, residual, out);
}
T pixel_unshuffle(const T& x, int64_t r) { return srkernels::cuda::pixel_unshuffle_cuda(x, r); }
void set_limits_pixel_shuffle(int64_t max_grid_y, int chunks_per_sample) {
  srkernels::cuda::kMaxGridY = max_grid_y;
  srkernels::cuda::kChunksPerSample = chunks_per_sample;
}
}  // namespace srk_emu_api
