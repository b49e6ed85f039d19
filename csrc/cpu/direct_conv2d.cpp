// direct_conv2d on CPU: an R x R (odd R), stride 1, zero padding R / 2 convolution with few output channels,
// computed directly and vectorised over the input channels, with the conv epilogue act(conv + bias) (+ residual).
// Contract: docs/ops.md "direct_conv2d".
//
// Why: a model's last conv (64 -> 3 at the HR size, SRDenseNet's 256 -> 1) has too few outputs for a kernel
// that vectorises over them: Winograd pads 3 outputs to one vector of 16 (5.3x wasted GEMM work) and oneDNN
// does worse. Here every output pixel keeps NK accumulator vectors over input channels (one per output
// channel), PX pixels of a row at a time: per tap and input-channel vector, NK weight loads and PX input loads
// feed PX * NK FMAs. The accumulators are summed across lanes once per pixel.
//
// Activations float32 or bfloat16 (storage: widened on load, float32 arithmetic, one rounding of the result);
// computed channels_last (NHWC), so input channels are contiguous. The weight comes as weight_t [R, R, K, C]
// float32 (srkernels/ops/direct_conv2d.py direct_weight): tap-major, then output channel, input channels
// contiguous.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/vec_io.h"
#include "runtime/cpu_dispatch.h"
#include "runtime/output_cache.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace srkernels::cpu {
inline namespace CPU_CAPABILITY {  // one copy per compiled capability (runtime/cpu_dispatch.h)
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VW = Vec::size();

// Output channels per pass (NK <= kMaxNK) and the accumulators kept in registers: 24 of AVX-512's 32 vector
// registers, 12 of AVX2's 16 (plus NK weight vectors and one input vector).
constexpr int kMaxNK = 4;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kAcc = 24;
#else
constexpr int kAcc = 12;
#endif

// x in a register: without this GCC folds the load of x into each of its NK FMAs, tripling the load uops of
// the inner loop (the load ports, not the FMAs, then bound it).
inline Vec in_register(Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = v;
  __asm__("" : "+v"(r));
  return Vec(r);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 r = v;
  __asm__("" : "+x"(r));
  return Vec(r);
#else
  return v;
#endif
}

template <typename S>
struct Args {
  const S* x;         // NHWC
  const float* w;     // [R, R, K, C]
  const float* bias;  // [K] or null
  const S* res;       // NHWC [N, H, W, K] or null
  S* out;             // NHWC [N, H, W, K]
  int64_t H, W, C, K, R;
  bool relu;
};

// Output channels [k0, k0 + NK) of pixels w0 .. w0 + PX - 1 of row (n, h), taps i in [i0, i1), j in [j0, j1).
template <int PX, int NK, typename S>
inline void pixels(const Args<S>& a, int64_t n, int64_t h, int64_t w0, int64_t k0, int64_t i0, int64_t i1,
                   int64_t j0, int64_t j1) {
  using IO = VecIO<S>;
  const int64_t C = a.C, p = a.R / 2;
  Vec acc[PX][NK];
  for (int q = 0; q < PX; ++q)
    for (int k = 0; k < NK; ++k) acc[q][k] = Vec(0.f);
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j = j0; j < j1; ++j) {
      const S* xp = a.x + ((n * a.H + h + i - p) * a.W + w0 + j - p) * C;  // pixel w0's input at tap (i, j)
      const float* wp = a.w + ((i * a.R + j) * a.K + k0) * C;
      int64_t c = 0;
      for (; c + VW <= C; c += VW) {
        Vec wv[NK];
        for (int k = 0; k < NK; ++k) wv[k] = Vec::loadu(wp + k * C + c);
        for (int q = 0; q < PX; ++q) {
          const Vec xv = in_register(IO::load(xp + q * C + c));
          for (int k = 0; k < NK; ++k) acc[q][k] = at::vec::fmadd(xv, wv[k], acc[q][k]);
        }
      }
      if (c < C) {  // masked tail: lanes past C load as zero
        const int64_t cnt = C - c;
        Vec wv[NK];
        for (int k = 0; k < NK; ++k) wv[k] = Vec::loadu(wp + k * C + c, cnt);
        for (int q = 0; q < PX; ++q) {
          const Vec xv = IO::load(xp + q * C + c, cnt);
          for (int k = 0; k < NK; ++k) acc[q][k] = at::vec::fmadd(xv, wv[k], acc[q][k]);
        }
      }
    }
  }
  for (int q = 0; q < PX; ++q) {
    const int64_t off = ((n * a.H + h) * a.W + w0 + q) * a.K + k0;
    for (int k = 0; k < NK; ++k) {
      float v = at::vec::vec_reduce_all<float>([](const Vec& u, const Vec& t) { return u + t; }, acc[q][k]);
      if (a.bias != nullptr) v += a.bias[k0 + k];
      if (a.relu) v = std::max(v, 0.f);
      if (a.res != nullptr) v += static_cast<float>(a.res[off + k]);
      a.out[off + k] = static_cast<S>(v);
    }
  }
}

// One output row, output channels [k0, k0 + NK): edge pixels one at a time with their taps clipped, the
// interior PX pixels at a time with all R columns of taps.
template <int NK, typename S>
void row(const Args<S>& a, int64_t n, int64_t h, int64_t k0) {
  constexpr int PX = kAcc / NK;
  const int64_t p = a.R / 2, W = a.W, R = a.R;
  const int64_t i0 = std::max<int64_t>(0, p - h), i1 = std::min<int64_t>(R, a.H + p - h);
  const auto one = [&](int64_t w) {
    pixels<1, NK>(a, n, h, w, k0, i0, i1, std::max<int64_t>(0, p - w), std::min<int64_t>(R, W + p - w));
  };
  const int64_t lo = std::min(p, W), hi = std::max(lo, W - p);  // interior columns [lo, hi)
  for (int64_t w = 0; w < lo; ++w) one(w);
  int64_t w = lo;
  for (; w + PX <= hi; w += PX) pixels<PX, NK>(a, n, h, w, k0, i0, i1, 0, R);
  for (; w < hi; ++w) pixels<1, NK>(a, n, h, w, k0, i0, i1, 0, R);
  for (w = hi; w < W; ++w) one(w);
}

template <typename S>
void run(const Args<S>& a, int64_t N) {
  at::parallel_for(0, N * a.H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / a.H, h = r % a.H;
      for (int64_t k0 = 0; k0 < a.K; k0 += kMaxNK) {
        switch (std::min<int64_t>(kMaxNK, a.K - k0)) {
          case 1: row<1>(a, n, h, k0); break;
          case 2: row<2>(a, n, h, k0); break;
          case 3: row<3>(a, n, h, k0); break;
          default: row<4>(a, n, h, k0); break;
        }
      }
    }
  });
}

// x [N, C, H, W] float32 or bfloat16 (any layout; computed channels_last), weight_t [R, R, K, C] float32.
at::Tensor direct_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight_t,
                             const std::optional<at::Tensor>& bias_in, c10::string_view act_s,
                             const std::optional<at::Tensor>& residual) {
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(x_in.dim() == 4 && (dt == at::kFloat || dt == at::kBFloat16),
              "direct_conv2d: x must be 4-D float32 or bfloat16");
  TORCH_CHECK(weight_t.dim() == 4 && weight_t.scalar_type() == at::kFloat && weight_t.size(0) == weight_t.size(1) &&
                  weight_t.size(0) % 2 == 1,
              "direct_conv2d: weight_t must be float32 [R, R, C_out, C_in] with odd R");
  TORCH_CHECK(act_s == "none" || act_s == "relu", "direct_conv2d: act must be none or relu, got ", act_s);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t R = weight_t.size(0), K = weight_t.size(2);
  TORCH_CHECK(weight_t.size(3) == C, "direct_conv2d: weight_t has ", weight_t.size(3), " input channels, x has ", C);
  const auto fmt = x_in.suggest_memory_format();
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(cl);
  const at::Tensor w = weight_t.contiguous();
  at::Tensor out = empty_output({N, K, H, W}, x.options(), cl);
  if (out.numel() != 0) {
    std::vector<float> bias_f;
    if (bias_in) {
      TORCH_CHECK(bias_in->numel() == K && (bias_in->scalar_type() == at::kFloat || bias_in->scalar_type() == dt),
                  "direct_conv2d: bias must be [", K, "] of x's dtype or float32");
      const at::Tensor b = bias_in->contiguous();
      if (b.scalar_type() == at::kFloat) {
        bias_f.assign(b.const_data_ptr<float>(), b.const_data_ptr<float>() + K);
      } else {
        const at::BFloat16* src = b.const_data_ptr<at::BFloat16>();
        bias_f.assign(src, src + K);  // exact: every bf16 is a float
      }
    }
    at::Tensor res;
    if (residual) {
      TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == dt,
                  "direct_conv2d: residual must have x's dtype and shape ", out.sizes());
      res = residual->contiguous(cl);
    }
    auto go = [&](auto zero) {
      using S = decltype(zero);
      const Args<S> a{x.const_data_ptr<S>(), w.const_data_ptr<float>(), bias_in ? bias_f.data() : nullptr,
                      res.defined() ? res.const_data_ptr<S>() : nullptr, out.mutable_data_ptr<S>(),
                      H, W, C, K, R, act_s == "relu"};
      run(a, N);
    };
    if (dt == at::kBFloat16) {
      go(at::BFloat16{});
    } else {
      go(0.f);
    }
  }
  if (fmt == cl) return out;
  at::Tensor o = empty_output({N, K, H, W}, x.options(), fmt);
  o.copy_(out);
  return o;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace srkernels::cpu

SRK_CPU_OP(direct_conv2d, direct_conv2d_cpu)
