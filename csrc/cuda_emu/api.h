// Entry points of the emulated CUDA ops (csrc/cuda_emu/emu_*.cpp): the csrc/cuda host functions, called on CPU
// tensors, running the kernels through cuda_emu.h. Same arguments as the srkernels op schemas (srkernels/ops/<op>.py).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace srk_emu_api {
using T = at::Tensor;
using OT = std::optional<at::Tensor>;

std::tuple<T, T> channel_attention(const T& x, const T& w1, const OT& b1, const T& w2, const OT& b2, const OT& residual,
                                   const OT& act_weight, const std::string& pool);
std::tuple<T, T, T, T, T, T> channel_attention_backward(const T& go, const T& x, const T& stats, const T& w1,
                                                        const OT& b1, const T& w2, const OT& b2, const OT& act_weight,
                                                        const std::string& pool);
void channel_attention_out(const T& x, const T& w1, const OT& b1, const T& w2, const OT& b2, const OT& residual,
                           const OT& act_weight, const std::string& pool, const T& out);
void set_limits_channel_attention(int64_t max_grid_y, int chunks_per_sample);

std::tuple<T, T, T> balanced_attention(const T& x, const T& w1, const T& prelu_w, const T& w2, const T& w_sa,
                                       const OT& residual);
std::tuple<T, T, T, T, T> balanced_attention_backward(const T& go, const T& x, const T& mean, const T& maxmap,
                                                      const T& w1, const T& prelu_w, const T& w2, const T& w_sa);
void balanced_attention_out(const T& x, const T& w1, const T& prelu_w, const T& w2, const T& w_sa, const OT& residual,
                            const T& out);
void set_limits_balanced_attention(int64_t max_grid_y, int chunks_per_sample);

T pixel_shuffle(const T& x, int64_t r, const OT& bias, const OT& act_weight, const std::string& act,
                const OT& residual);
std::tuple<T, T, T> pixel_shuffle_backward(const T& go, const OT& x, int64_t r, const OT& bias, const OT& act_weight,
                                           const std::string& act);
void pixel_shuffle_out(const T& x, int64_t r, const OT& bias, const OT& act_weight, const std::string& act,
                       const OT& residual, const T& out);
T pixel_unshuffle(const T& x, int64_t r);
void set_limits_pixel_shuffle(int64_t max_grid_y, int chunks_per_sample);
}  // namespace srk_emu_api
