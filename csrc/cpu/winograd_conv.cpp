// winograd_conv3x3 on CPU: 3x3, stride 1, zero padding 1 convolution, fp32, forward only, by Winograd's
// minimal filtering F(m x m, 3 x 3) with m = 2 (4x4 input tiles), 4 (6x6) or 6 (8x8, bf16 storage), and the
// conv epilogue act(conv + bias) (+ residual) fused into the output transform. Contract: docs/ops.md "winograd_conv3x3".
// winograd_conv5x5: the same for a 5x5, zero padding 2 conv by F(2x2, 5x5) (6x6 tiles) or F(4x4, 5x5) (8x8
// tiles; docs/ops.md "winograd_conv5x5").
//
// Activations float32 or bfloat16 (bf16 storage: widened on load, transforms and GEMMs in float32, the result
// rounded once after the epilogue, so the error is a bf16 rounding of a float32 conv; the weight stays float32).
// Layout: activations channels_last (NHWC), so every transform runs on vectors of channels. The weight comes
// pre-transformed (Python, float64 then rounded once: srkernels/ops/winograd_conv3x3.py) as U[P][C][K], P =
// (m+2)^2 transform positions. Transforms, GEMMs and the tile loop: csrc/cpu/winograd.h (shared with
// dense_block). TB is chosen so V and M (P * TB * (C + min(K, 64)) floats: M holds one chunk of output channels)
// stay in L2 next to U. The output comes from the CPU output cache (runtime/output_cache.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "runtime/cpu_dispatch.h"
#include "runtime/output_cache.h"
#include "cpu/winograd.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace srkernels::cpu {
inline namespace CPU_CAPABILITY {  // one copy per compiled capability (runtime/cpu_dispatch.h)
namespace {

using namespace wino;

// x [N, C, H, W] float32 or bfloat16 (any layout; computed channels_last), weight_t [P, C, K] float32; an R x R
// kernel (3: P = 16 F(2,3), 36 F(4,3) or 64 F(6,3); 5: P = 36 F(2,5) or 64 F(4,5)).
at::Tensor winograd_conv_cpu(const char* name, int R, const at::Tensor& x_in, const at::Tensor& weight_t,
                             const std::optional<at::Tensor>& bias_in, c10::string_view act_s,
                             const std::optional<at::Tensor>& residual, int64_t upscale = 1) {
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(x_in.dim() == 4 && (dt == at::kFloat || dt == at::kBFloat16), name,
              ": x must be 4-D float32 or bfloat16");
  TORCH_CHECK(weight_t.dim() == 3 && weight_t.scalar_type() == at::kFloat, name,
              ": weight_t must be 3-D float32 [P, C_in, C_out]");
  TORCH_CHECK(act_s == "none" || act_s == "relu", name, ": act must be none or relu, got ", act_s);
  const Act act = act_s == "relu" ? Act::Relu : Act::None;
  const int64_t P = weight_t.size(0);
  if (R == 3) {
    TORCH_CHECK(tile_of(P) != 0, name, ": weight_t must have 16 (F(2,3)), 36 (F(4,3)) or 64 (F(6,3)) positions, got ",
                P);
  } else {
    TORCH_CHECK(P == 36 || P == 64, name, ": weight_t must have 36 (F(2,5)) or 64 (F(4,5)) positions, got ", P);
  }
  const int M = R == 5 ? (P == 36 ? 2 : 4) : tile_of(P);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), K = weight_t.size(2);
  TORCH_CHECK(weight_t.size(1) == C, name, ": weight_t has ", weight_t.size(1), " input channels, x has ", C);
  // upscale r: the output pixel-shuffled in the store (docs/ops.md: channel (i * r + j) * K / r^2 + c)
  const int64_t r = upscale;
  TORCH_CHECK(r >= 1 && K % (r * r) == 0, name, ": upscale must be >= 1 and divide C_out (", K, ") by its square, ",
              "got ", r);
  TORCH_CHECK(r == 1 || !residual.has_value(), name, ": a residual cannot be added with upscale > 1");
  const int64_t Ko = K / (r * r), Ho = H * r, Wo = W * r;
  // computed channels_last; returned in x's suggested format (the fake's rule: srkernels/ops/winograd_conv3x3.py)
  const auto fmt = x_in.suggest_memory_format();
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(cl);
  // from the output cache: an upsampler conv's output (RCAN x4 at LR 96: 38 MB) would be page-faulted afresh on
  // every call (runtime/output_cache.h)
  at::Tensor out = empty_output({N, Ko, Ho, Wo}, x.options(), cl);
  auto finish = [&]() {
    if (fmt == cl) return out;
    at::Tensor o = empty_output({N, Ko, Ho, Wo}, x.options(), fmt);
    o.copy_(out);
    return o;
  };
  if (out.numel() == 0) return finish();
  // U with K padded to a multiple of VW (zeros) so the micro-kernel needs no masked loads.
  const int64_t Kp = div_up(K, 16) * 16;
  at::Tensor u = weight_t.contiguous();
  if (Kp != K) {
    at::Tensor up = at::zeros({P, C, Kp}, u.options());
    up.narrow(2, 0, K).copy_(u);
    u = up;
  }
  // the bias in float32; a bf16 one widened here (at::Tensor::to costs ~4 us per call through the dispatcher,
  // 1.8 ms of a bf16 RCAN forward)
  at::Tensor bias;
  std::vector<float> bias_f;
  const float* b = nullptr;
  if (bias_in) {
    TORCH_CHECK(bias_in->numel() == K && (bias_in->scalar_type() == at::kFloat || bias_in->scalar_type() == dt),
                name, ": bias must be [", K, "] of x's dtype or float32");
    bias = bias_in->contiguous();
    if (bias.scalar_type() == at::kFloat) {
      b = bias.const_data_ptr<float>();
    } else {
      const at::BFloat16* src = bias.const_data_ptr<at::BFloat16>();
      bias_f.assign(src, src + K);  // exact: every bf16 is a float
      b = bias_f.data();
    }
  }
  at::Tensor res;
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == dt, name,
                ": residual must have x's dtype and shape ", out.sizes());
    res = residual->contiguous(cl);
  }
  const Geo g{N, C, H, W, K, Kp, div_up(C, VW) * VW, div_up(H, M), div_up(W, M)};
  auto go = [&](auto zero) {
    using S = decltype(zero);
    const S* rp = res.defined() ? res.const_data_ptr<S>() : nullptr;
    // NHWC: zero outside the image
    const Pixels<S> px{x.const_data_ptr<S>(), H * W * C, W * C, C, 0, 0};
    S* o = out.mutable_data_ptr<S>();
    const Epilogue<S> ep{o, o, K, rp, /*res_first=*/false, act, b, Ho * Wo * Ko, Wo * Ko, Ko, nullptr, 0, r};
    const bool pf = prefetch_on();
    const float* up = u.const_data_ptr<float>();
    if (R == 5 && M == 2) {
      run<2, 5>(px, up, g, ep, block_budget(2), pf);
    } else if (R == 5) {
      run<4, 5>(px, up, g, ep, block_budget(4), pf);
    } else {
      const NextWeight nx = pf ? predict_next(up, P * C * Kp * sizeof(float)) : NextWeight{nullptr, 0};
      run3(M, px, up, g, ep, block_budget(M), nx);
    }
  };
  if (dt == at::kBFloat16) {
    go(at::BFloat16{});
  } else {
    go(0.f);
  }
  return finish();
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& weight_t, const std::optional<at::Tensor>& bias,
                                c10::string_view act, const std::optional<at::Tensor>& residual, int64_t upscale) {
  return winograd_conv_cpu("winograd_conv3x3", 3, x, weight_t, bias, act, residual, upscale);
}

at::Tensor winograd_conv5x5_cpu(const at::Tensor& x, const at::Tensor& weight_t, const std::optional<at::Tensor>& bias,
                                c10::string_view act, const std::optional<at::Tensor>& residual) {
  return winograd_conv_cpu("winograd_conv5x5", 5, x, weight_t, bias, act, residual);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace srkernels::cpu

#ifndef SRK_WINOGRAD_PROTOTYPE
SRK_CPU_OP(winograd_conv3x3, winograd_conv3x3_cpu)
SRK_CPU_OP(winograd_conv5x5, winograd_conv5x5_cpu)
#endif
