// residual_group on CPU: RCAN's residual group in inference, n RCABs then a conv, plus the group's skip, in one
// call. Contract: docs/ops.md "residual_group".
//
//   x_0 = x;  r = relu(conv(x_k) + b);  y = conv(r) + b';  s = sigmoid(W2 relu(W1 mean(y) + b1) + b2);
//   x_{k+1} = y * s + x_k;  out = conv(x_n) + b'' + x
//
// Every conv is winograd.h's Winograd F(m, 3) on a transformed weight, as winograd_conv3x3. What the op saves
// against the layer-by-layer path (winograd_conv3x3, winograd_conv3x3, channel_attention per RCAB):
// - the attention's average pool is summed in conv2's output transform (Epilogue::pool, per tile, reduced in
//   tile order: deterministic whatever the threads), not in a pass of its own over y;
// - its scale and residual add, x_{k+1} = y * s + x_k, is one pass that updates x_k in place;
// - one dispatcher call per group instead of three per RCAB, and each conv prefetches the weight of the conv
//   that follows (known here, predicted by winograd_conv3x3).
// Activations float32 or bfloat16 storage (every stored map rounded once, as the layer-by-layer path).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "runtime/cpu_dispatch.h"
#include "runtime/output_cache.h"
#include "cpu/winograd.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace srkernels::cpu {
inline namespace CPU_CAPABILITY {  // one copy per compiled capability (runtime/cpu_dispatch.h)
namespace {

using namespace wino;
constexpr const char* kName = "residual_group";

void check_vector(const at::Tensor& t, int64_t n, const char* what, size_t i) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kFloat && t.device().is_cpu(), kName, ": ",
              what, "[", i, "] must be a float32 CPU tensor of shape [", n, "], got ", t.sizes(), " ",
              t.scalar_type());
}

void check_matrix(const at::Tensor& t, int64_t r, int64_t c, const char* what, size_t i) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == r && t.size(1) == c && t.scalar_type() == at::kFloat &&
                  t.device().is_cpu(), kName, ": ", what, "[", i, "] must be a float32 CPU tensor of shape [", r,
              ", ", c, "], got ", t.sizes(), " ", t.scalar_type());
}

at::Tensor residual_group_cpu(const at::Tensor& x_in, at::TensorList weight_t, at::TensorList bias,
                              at::TensorList fc_w1, at::TensorList fc_b1, at::TensorList fc_w2,
                              at::TensorList fc_b2) {
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(x_in.dim() == 4 && (dt == at::kFloat || dt == at::kBFloat16), kName,
              ": x must be 4-D float32 or bfloat16");
  const size_t nb = fc_w1.size();
  TORCH_CHECK(fc_b1.size() == nb && fc_w2.size() == nb && fc_b2.size() == nb, kName,
              ": fc_w1, fc_b1, fc_w2 and fc_b2 must have one entry per block");
  TORCH_CHECK(weight_t.size() == 2 * nb + 1 && bias.size() == 2 * nb + 1, kName,
              ": weight_t and bias must have 2 * blocks + 1 entries (", 2 * nb + 1, "), got ", weight_t.size(),
              " and ", bias.size());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t P = weight_t[0].dim() == 3 ? weight_t[0].size(0) : 0;
  TORCH_CHECK(tile_of(P) != 0, kName, ": weight_t[0] must be [16, 36 or 64, C, C]");
  for (size_t i = 0; i < weight_t.size(); ++i) {
    const at::Tensor& u = weight_t[i];
    TORCH_CHECK(u.dim() == 3 && u.size(0) == P && u.size(1) == C && u.size(2) == C && u.scalar_type() == at::kFloat
                    && u.device().is_cpu(), kName, ": weight_t[", i, "] must be a float32 CPU tensor of shape [",
                P, ", ", C, ", ", C, "], got ", u.sizes(), " ", u.scalar_type());
    check_vector(bias[i], C, "bias", i);
  }
  const int64_t Cr = nb > 0 ? fc_w1[0].size(0) : 0;
  for (size_t i = 0; i < nb; ++i) {
    check_matrix(fc_w1[i], Cr, C, "fc_w1", i);
    check_vector(fc_b1[i], Cr, "fc_b1", i);
    check_matrix(fc_w2[i], C, Cr, "fc_w2", i);
    check_vector(fc_b2[i], C, "fc_b2", i);
  }
  const int M = tile_of(P);
  const auto fmt = x_in.suggest_memory_format();
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(cl);
  at::Tensor out = empty_output({N, C, H, W}, x.options(), cl);
  auto finish = [&]() {
    if (fmt == cl) return out;
    at::Tensor o = empty_output({N, C, H, W}, x.options(), fmt);
    o.copy_(out);
    return o;
  };
  if (out.numel() == 0) return finish();
  // U with the output channels padded to a multiple of 16 (zeros), as winograd_conv3x3
  const int64_t Kp = div_up(C, 16) * 16, Cp = div_up(C, VW) * VW;
  std::vector<at::Tensor> us(weight_t.size());
  for (size_t i = 0; i < weight_t.size(); ++i) {
    us[i] = weight_t[i].contiguous();
    if (Kp != C) {
      at::Tensor up = at::zeros({P, C, Kp}, us[i].options());
      up.narrow(2, 0, C).copy_(us[i]);
      us[i] = up;
    }
  }
  std::vector<at::Tensor> bs(bias.size()), w1(nb), b1(nb), w2(nb), b2(nb);
  for (size_t i = 0; i < bias.size(); ++i) bs[i] = bias[i].contiguous();
  for (size_t i = 0; i < nb; ++i) {
    w1[i] = fc_w1[i].contiguous();
    b1[i] = fc_b1[i].contiguous();
    w2[i] = fc_w2[i].contiguous();
    b2[i] = fc_b2[i].contiguous();
  }
  const Geo g{N, C, H, W, C, Kp, Cp, div_up(H, M), div_up(W, M)};
  const int64_t tiles_per = g.th * g.tw, tiles = N * tiles_per;
  const int64_t wbytes = P * C * Kp * static_cast<int64_t>(sizeof(float));
  // per-tile pool partials [tiles][Kp]; the scales [N][Cp] (zero past C: the scale pass reads whole vectors)
  std::vector<float> pool(static_cast<size_t>(tiles * Kp)), scale(static_cast<size_t>(N * Cp), 0.f);
  std::vector<float> mean(C), hid(Cr);

  auto go = [&](auto zero) {
    using S = decltype(zero);
    const int64_t ns = H * W * C, hs = W * C, ws = C;
    // r (conv1's output), y (conv2's) and the block input x_k for k >= 1 (x itself is never written; x_k is
    // updated in place: x_{k+1} = y * s + x_k)
    at::Tensor rt = empty_output({N, C, H, W}, x.options(), cl), yt = empty_output({N, C, H, W}, x.options(), cl);
    at::Tensor xt = nb > 0 ? empty_output({N, C, H, W}, x.options(), cl) : at::Tensor();
    S* r = rt.mutable_data_ptr<S>();
    S* y = yt.mutable_data_ptr<S>();
    const S* x0 = x.const_data_ptr<S>();
    S* xk = nb > 0 ? xt.mutable_data_ptr<S>() : nullptr;
    const int64_t budget = block_budget(M);
    const bool pf = prefetch_on();
    auto conv = [&](const S* in, size_t i, const Epilogue<S>& ep) {
      // prefetch the next conv's weight; after the last one, winograd_conv3x3's prediction (the next group's)
      NextWeight nx{nullptr, 0};
      if (pf) {
        nx = i + 1 < us.size() ? NextWeight{reinterpret_cast<const char*>(us[i + 1].const_data_ptr<float>()), wbytes}
                               : predict_next(us[i].const_data_ptr<float>(), wbytes);
      }
      const Pixels<S> px{in, ns, hs, ws, 0, 0};
      run3(M, px, us[i].const_data_ptr<float>(), g, ep, budget, nx);
    };
    // the attention's scale and skip: xk = y * s + prev (prev: x_0, or xk itself), rounded once as the
    // channel_attention op's output. One pass: folded into the next conv's input transform instead, it re-read
    // y and x_k for every overlapping tile (2.25x with F(4,3)) and measured 3-4% slower over RCAN's groups.
    auto scale_add = [&](const S* prev) {
      at::parallel_for(0, N * H * W, 256, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const float* sp = scale.data() + (p / (H * W)) * Cp;
          for (int64_t c = 0; c < C; c += VW) {
            const int64_t cnt = std::min(VW, C - c), o = p * C + c;
            store_n(xk + o, at::vec::fmadd(load_n(y + o, cnt), Vec::loadu(sp + c), load_n(prev + o, cnt)), cnt);
          }
        }
      });
    };
    for (size_t k = 0; k < nb; ++k) {
      const S* in = k == 0 ? x0 : xk;
      conv(in, 2 * k, Epilogue<S>{r, r, C, nullptr, false, Act::Relu, bs[2 * k].const_data_ptr<float>(), ns, hs, ws});
      conv(r, 2 * k + 1, Epilogue<S>{y, y, C, nullptr, false, Act::None, bs[2 * k + 1].const_data_ptr<float>(), ns,
                                     hs, ws, pool.data(), Kp});
      // the attention's MLP per sample, on the mean of the per-tile sums (added in tile order)
      const float* pw1 = w1[k].const_data_ptr<float>();
      const float* pb1 = b1[k].const_data_ptr<float>();
      const float* pw2 = w2[k].const_data_ptr<float>();
      const float* pb2 = b2[k].const_data_ptr<float>();
      for (int64_t n = 0; n < N; ++n) {
        std::fill(mean.begin(), mean.end(), 0.f);
        for (int64_t t = n * tiles_per; t < (n + 1) * tiles_per; ++t) {
          const float* pt = pool.data() + t * Kp;
          for (int64_t c = 0; c < C; ++c) mean[c] += pt[c];
        }
        for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<float>(H * W);
        for (int64_t j = 0; j < Cr; ++j) {
          float h = pb1[j];
          for (int64_t c = 0; c < C; ++c) h += pw1[j * C + c] * mean[c];
          hid[j] = h > 0.f ? h : 0.f;
        }
        for (int64_t c = 0; c < C; ++c) {
          float z = pb2[c];
          for (int64_t j = 0; j < Cr; ++j) z += pw2[c * Cr + j] * hid[j];
          scale[n * Cp + c] = 1.f / (1.f + std::exp(-z));
        }
      }
      scale_add(in);
    }
    // the group's last conv on x_n, + the group's skip
    S* o = out.mutable_data_ptr<S>();
    conv(nb > 0 ? xk : x0, 2 * nb, Epilogue<S>{o, o, C, x0, false, Act::None, bs[2 * nb].const_data_ptr<float>(), ns,
                                              hs, ws});
  };
  if (dt == at::kBFloat16) {
    go(at::BFloat16{});
  } else {
    go(0.f);
  }
  return finish();
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace srkernels::cpu

SRK_CPU_OP(residual_group, residual_group_cpu)
