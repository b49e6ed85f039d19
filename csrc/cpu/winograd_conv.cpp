// winograd_conv3x3 on CPU: 3x3, stride 1, zero padding 1 convolution, fp32, forward only, by Winograd's
// minimal filtering F(m x m, 3 x 3) with m = 2 (4x4 input tiles) or m = 4 (6x6), and the conv epilogue
// act(conv + bias) (+ residual) fused into the output transform. Contract: docs/ops.md "winograd_conv3x3".
//
// Layout: activations channels_last (NHWC), so every transform runs on vectors of channels. The weight comes
// pre-transformed (Python, float64 then rounded once: srkernels/ops/winograd_conv3x3.py) as U[P][C][K], P =
// (m+2)^2 transform positions. Per block of TB output tiles (one thread):
//   1. input transform: V[p][t][c] = (B^T d_t B)[p] for the T x T input patch d_t of tile t (zero outside);
//   2. P independent GEMMs M[p] = V[p] @ U[p] ([TB x C] @ [C x K]): the hot loop, a register-blocked
//      micro-kernel (R tiles x NV vectors of output channels held in registers, one broadcast per tile and
//      input channel);
//   3. output transform y_t = A^T M_t A, + bias, ReLU, + residual, stored to the m x m output pixels.
// TB is chosen so V and M (2 * P * TB * C floats) stay in L2 next to U.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "runtime/cpu_dispatch.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace srkernels::cpu {
inline namespace CPU_CAPABILITY {  // one copy per compiled capability (runtime/cpu_dispatch.h)
namespace {

using at::vec::Vectorized;
using Vec = Vectorized<float>;
constexpr int64_t VW = Vec::size();  // 16 (AVX-512), 8 otherwise

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Micro-kernel shape: R tile rows x NV vectors of output channels in registers (accumulators R * NV, plus NV
// weight vectors and one broadcast): 24 + 5 of AVX-512's 32 registers, 12 + 3 of AVX2's 16.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kR = 6, kNV = 4;
#else
constexpr int kR = 6, kNV = 2;
#endif

// acc[r][j] over c < C: M[r][k0 + j*VW ..] = sum_c V[r][c] * U[c][k0 + j*VW ..]. Rows of V are vs apart,
// rows of U and M are ks apart (ks a multiple of VW).
template <int R, int NV>
inline void micro(const float* __restrict v, int64_t vs, const float* __restrict u, int64_t ks, int64_t C,
                  float* __restrict m) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = Vec(0.f);
  for (int64_t c = 0; c < C; ++c) {
    Vec b[NV];
    for (int j = 0; j < NV; ++j) b[j] = Vec::loadu(u + c * ks + j * VW);
    for (int r = 0; r < R; ++r) {
      const Vec a(v[r * vs + c]);
      for (int j = 0; j < NV; ++j) acc[r][j] = at::vec::fmadd(a, b[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j].store(m + r * ks + j * VW);
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*);

template <int R, int... NV>
constexpr std::array<MicroFn, sizeof...(NV)> row_table(std::integer_sequence<int, NV...>) {
  return {&micro<R, NV + 1>...};
}
template <int... R>
constexpr std::array<std::array<MicroFn, kNV>, sizeof...(R)> micro_table(std::integer_sequence<int, R...>) {
  return {row_table<R + 1>(std::make_integer_sequence<int, kNV>{})...};
}
// kMicro[r - 1][nv - 1]: the kernel for r rows and nv vectors (block edges).
constexpr auto kMicro = micro_table(std::make_integer_sequence<int, kR>{});

// M[t][0..Kp) = V[t][0..C) @ U for tb rows: Kp (a multiple of VW) in chunks of kNV vectors, rows in kR.
inline void gemm(const float* v, int64_t vs, const float* u, int64_t C, int64_t Kp, float* m, int64_t tb) {
  const int64_t nvk = Kp / VW;
  for (int64_t k0 = 0; k0 < nvk; k0 += kNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, nvk - k0));
    for (int64_t r0 = 0; r0 < tb; r0 += kR) {
      const int r = static_cast<int>(std::min<int64_t>(kR, tb - r0));
      kMicro[r - 1][nv - 1](v + r0 * vs, vs, u + k0 * VW, Kp, C, m + r0 * Kp + k0 * VW);
    }
  }
}

// ---- transforms, one vector of channels at a time -------------------------------------------------------
// 1-D transforms of a column / row of T values; the 2-D ones apply them to columns, then rows.

template <int M>
struct Wino;

template <>
struct Wino<2> {  // F(2, 3): points 0, 1, -1, inf
  static constexpr int T = 4;
  static inline void bt(const Vec* d, Vec* o) {  // B^T d
    o[0] = d[0] - d[2];
    o[1] = d[1] + d[2];
    o[2] = d[2] - d[1];
    o[3] = d[1] - d[3];
  }
  static inline void at(const Vec* s, Vec* y) {  // A^T s
    y[0] = s[0] + s[1] + s[2];
    y[1] = s[1] - s[2] - s[3];
  }
};

template <>
struct Wino<4> {  // F(4, 3): points 0, 1, -1, 2, -2, inf
  static constexpr int T = 6;
  static inline void bt(const Vec* d, Vec* o) {
    const Vec four(4.f), two(2.f), five(5.f);
    const Vec t1 = at::vec::fnmadd(four, d[2], d[4]);  // d4 - 4 d2
    const Vec t2 = at::vec::fnmadd(four, d[1], d[3]);  // d3 - 4 d1
    const Vec t3 = d[4] - d[2];
    const Vec t4 = two * (d[3] - d[1]);
    o[0] = at::vec::fmadd(four, d[0], at::vec::fnmadd(five, d[2], d[4]));
    o[1] = t1 + t2;
    o[2] = t1 - t2;
    o[3] = t3 + t4;
    o[4] = t3 - t4;
    o[5] = at::vec::fmadd(four, d[1], at::vec::fnmadd(five, d[3], d[5]));
  }
  static inline void at(const Vec* s, Vec* y) {
    const Vec a = s[1] + s[2], b = s[1] - s[2], c = s[3] + s[4], d = s[3] - s[4];
    y[0] = s[0] + a + c;
    y[1] = at::vec::fmadd(Vec(2.f), d, b);
    y[2] = at::vec::fmadd(Vec(4.f), c, a);
    y[3] = at::vec::fmadd(Vec(8.f), d, b) + s[5];
  }
};

struct Geo {
  int64_t N, C, H, W, K, Kp, Cp, th, tw;  // tiles per image th x tw
};

// Input transform of tiles [t0, t0 + tb) into V[p][t - t0][0..Cp) (row stride Cp, position stride tb * Cp).
template <int M>
void input_transform(const float* x, const Geo& g, int64_t t0, int64_t tb, float* V) {
  constexpr int T = Wino<M>::T;
  const int64_t C = g.C, Cp = g.Cp, ps = tb * Cp;
  for (int64_t i = 0; i < tb; ++i) {
    const int64_t t = t0 + i;
    const int64_t n = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
    const int64_t h0 = ty * M - 1, w0 = tx * M - 1;
    const bool inside = h0 >= 0 && w0 >= 0 && h0 + T <= g.H && w0 + T <= g.W;
    const float* xn = x + n * g.H * g.W * C;
    float* vt = V + i * Cp;
    for (int64_t c = 0; c < Cp; c += VW) {
      const int64_t cnt = std::min(VW, C - c);
      Vec d[T][T];
      for (int a = 0; a < T; ++a) {
        for (int b = 0; b < T; ++b) {
          const int64_t h = h0 + a, w = w0 + b;
          if (inside || (h >= 0 && h < g.H && w >= 0 && w < g.W)) {
            const float* p = xn + (h * g.W + w) * C + c;
            d[a][b] = cnt == VW ? Vec::loadu(p) : Vec::loadu(p, cnt);
          } else {
            d[a][b] = Vec(0.f);
          }
        }
      }
      // columns: e[.][b] = B^T d[.][b]; rows: o[a][.] = e[a][.] B  (i.e. B^T applied to the row)
      Vec e[T][T];
      for (int b = 0; b < T; ++b) {
        Vec col[T], o[T];
        for (int a = 0; a < T; ++a) col[a] = d[a][b];
        Wino<M>::bt(col, o);
        for (int a = 0; a < T; ++a) e[a][b] = o[a];
      }
      for (int a = 0; a < T; ++a) {
        Vec o[T];
        Wino<M>::bt(e[a], o);
        for (int b = 0; b < T; ++b) o[b].store(vt + (a * T + b) * ps + c);
      }
    }
  }
}

enum class Act { None, Relu };

// Output transform of tiles [t0, t0 + tb) from M[p][t - t0][0..Kp) with the epilogue.
template <int M>
void output_transform(const float* Mb, const Geo& g, int64_t t0, int64_t tb, const float* bias, Act act,
                      const float* res, float* out) {
  constexpr int T = Wino<M>::T;
  const int64_t K = g.K, Kp = g.Kp, ps = tb * Kp;
  const Vec zero(0.f);
  for (int64_t i = 0; i < tb; ++i) {
    const int64_t t = t0 + i;
    const int64_t n = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
    const int64_t h0 = ty * M, w0 = tx * M;
    const int64_t mh = std::min<int64_t>(M, g.H - h0), mw = std::min<int64_t>(M, g.W - w0);
    const int64_t base = n * g.H * g.W * K;
    const float* mt = Mb + i * Kp;
    for (int64_t k = 0; k < K; k += VW) {  // M's padding columns past K are never read
      const int64_t cnt = std::min(VW, K - k);
      Vec e[M][T];
      for (int b = 0; b < T; ++b) {
        Vec col[T], y[M];
        for (int a = 0; a < T; ++a) col[a] = Vec::loadu(mt + (a * T + b) * ps + k);
        Wino<M>::at(col, y);
        for (int a = 0; a < M; ++a) e[a][b] = y[a];
      }
      const Vec vb = bias ? (cnt == VW ? Vec::loadu(bias + k) : Vec::loadu(bias + k, cnt)) : zero;
      for (int a = 0; a < mh; ++a) {
        Vec y[M];
        Wino<M>::at(e[a], y);
        for (int b = 0; b < mw; ++b) {
          const int64_t off = base + ((h0 + a) * g.W + w0 + b) * K + k;
          Vec v = y[b] + vb;
          if (act == Act::Relu) v = at::vec::clamp_min(v, zero);
          if (res) v = v + (cnt == VW ? Vec::loadu(res + off) : Vec::loadu(res + off, cnt));
          if (cnt == VW) {
            v.store(out + off);
          } else {
            v.store(out + off, cnt);
          }
        }
      }
    }
  }
}

// Tiles per block: V and M of a block (P * TB * (Cp + Kp) floats) within a budget that leaves L2 room for U.
int64_t tile_block(int64_t P, int64_t Cp, int64_t Kp, int64_t tiles, int64_t threads) {
  static const int64_t budget = [] {
    const char* s = std::getenv("SRKERNELS_WINOGRAD_BLOCK_KB");
    return (s ? std::atoll(s) : 384) * 1024 / 4;
  }();
  int64_t tb = std::max<int64_t>(kR, budget / (P * (Cp + Kp)) / kR * kR);
  // enough blocks for every thread
  tb = std::min(tb, std::max<int64_t>(kR, div_up(div_up(tiles, threads), kR) * kR));
  return tb;
}

template <int M>
void run(const float* x, const float* u, const Geo& g, const float* bias, Act act, const float* res, float* out) {
  constexpr int64_t P = Wino<M>::T * Wino<M>::T;
  const int64_t tiles = g.N * g.th * g.tw;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t TB = tile_block(P, g.Cp, g.Kp, tiles, threads);
  const int64_t nb = div_up(tiles, TB);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    // Per-thread scratch kept between calls: a fresh ~0.3-1 MB buffer per call costs page faults and zeroing
    // comparable to a small conv. Every element read is written first in the same block.
    // Aligned to 64 bytes: V's rows are whole vectors apart, so no vector load splits a cache line.
    thread_local std::vector<float> scratch;
    const size_t need = static_cast<size_t>(P * TB * (g.Cp + g.Kp)) + 16;
    if (scratch.size() < need) scratch.resize(need);
    float* V = scratch.data();
    V += (64 - reinterpret_cast<uintptr_t>(V) % 64) % 64 / sizeof(float);
    float* Mb = V + P * TB * g.Cp;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * TB, tb = std::min(TB, tiles - t0);
      input_transform<M>(x, g, t0, tb, V);
      for (int64_t p = 0; p < P; ++p)
        gemm(V + p * tb * g.Cp, g.Cp, u + p * g.C * g.Kp, g.C, g.Kp, Mb + p * tb * g.Kp, tb);
      output_transform<M>(Mb, g, t0, tb, bias, act, res, out);
    }
  });
}

// x [N, C, H, W] (any layout; computed channels_last), weight_t [P, C, K] fp32 (P = 16: F(2,3), 36: F(4,3)).
at::Tensor winograd_conv3x3_cpu(const at::Tensor& x_in, const at::Tensor& weight_t,
                                const std::optional<at::Tensor>& bias_in, c10::string_view act_s,
                                const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat, "winograd_conv3x3: x must be 4-D float32");
  TORCH_CHECK(weight_t.dim() == 3 && weight_t.scalar_type() == at::kFloat,
              "winograd_conv3x3: weight_t must be 3-D float32 [P, C_in, C_out]");
  TORCH_CHECK(act_s == "none" || act_s == "relu", "winograd_conv3x3: act must be none or relu, got ", act_s);
  const Act act = act_s == "relu" ? Act::Relu : Act::None;
  const int64_t P = weight_t.size(0);
  TORCH_CHECK(P == 16 || P == 36, "winograd_conv3x3: weight_t must have 16 (F(2,3)) or 36 (F(4,3)) positions, got ",
              P);
  const int M = P == 16 ? 2 : 4;
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), K = weight_t.size(2);
  TORCH_CHECK(weight_t.size(1) == C, "winograd_conv3x3: weight_t has ", weight_t.size(1), " input channels, x has ",
              C);
  // computed channels_last; returned in x's suggested format (the fake's rule: srkernels/ops/winograd_conv3x3.py)
  const auto fmt = x_in.suggest_memory_format();
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(cl);
  at::Tensor out = at::empty({N, K, H, W}, x.options().memory_format(cl));
  auto finish = [&]() {
    if (fmt == cl) return out;
    at::Tensor o = at::empty({N, K, H, W}, x.options().memory_format(fmt));
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
  at::Tensor bias;
  if (bias_in) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.numel() == K && bias.scalar_type() == at::kFloat, "winograd_conv3x3: bias must be [", K, "]");
  }
  at::Tensor res;
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == at::kFloat,
                "winograd_conv3x3: residual must be float32 of shape ", out.sizes());
    res = residual->contiguous(cl);
  }
  const Geo g{N, C, H, W, K, Kp, div_up(C, VW) * VW, div_up(H, M), div_up(W, M)};
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const float* r = res.defined() ? res.const_data_ptr<float>() : nullptr;
  if (M == 2) {
    run<2>(x.const_data_ptr<float>(), u.const_data_ptr<float>(), g, b, act, r, out.mutable_data_ptr<float>());
  } else {
    run<4>(x.const_data_ptr<float>(), u.const_data_ptr<float>(), g, b, act, r, out.mutable_data_ptr<float>());
  }
  return finish();
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace srkernels::cpu

#ifndef SRK_WINOGRAD_PROTOTYPE
SRK_CPU_OP(winograd_conv3x3, winograd_conv3x3_cpu)
#endif
