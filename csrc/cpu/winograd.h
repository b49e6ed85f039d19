// Winograd minimal filtering F(m x m, r x r): F(2x2, 3x3) (4x4 input tiles), F(4x4, 3x3) and F(2x2, 5x5) (both
// 6x6 tiles, the same points and input transform), F(6x6, 3x3) (bf16 storage only) and F(4x4, 5x5) (both 8x8
// tiles), fp32 arithmetic, one copy per compiled capability: the core shared by
// winograd_conv3x3 / winograd_conv5x5 (csrc/cpu/winograd_conv.cpp, NHWC tensors) and the 3x3 layers of
// dense_block (csrc/cpu/dense_block.cpp, channel ranges of its padded row buffer). The kernel size R is a
// template argument defaulting to 3, so the 3x3 entry points keep their names.
//
// Pixels are addressed by strides (Pixels, Epilogue below), so the transforms read and write either layout.
// Per block of TB output tiles (one thread):
//   1. input transform: V[p][t][c] = (B^T d_t B)[p] for the T x T input patch d_t of tile t (zero outside);
//   2. P independent GEMMs M[p] = V[p] @ U[p] ([TB x C] @ [C x Kc], Kc <= 64 output channels at a time: a wider
//      conv repeats 2-3 per chunk): the hot loop, a register-blocked micro-kernel (R tiles x NV vectors of output
//      channels held in registers, one broadcast per tile and input channel);
//   3. output transform y_t = A^T M_t A and the conv epilogue (bias, ReLU, residual, split destinations),
//      stored to the m x m output pixels.
// U = G g G^T is [P][C][Kp] (Kp: output channels padded with zeros to a multiple of 16).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include "cpu/vec_io.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace srkernels::cpu {
inline namespace CPU_CAPABILITY {  // one copy per compiled capability (runtime/cpu_dispatch.h)
namespace wino {

using at::vec::Vectorized;
using Vec = Vectorized<float>;
constexpr int64_t VW = Vec::size();  // 16 (AVX-512), 8 otherwise

// Whether this capability runs Winograd at all: the `default` compile is at::vec's portable code, ~12x slower
// than oneDNN (srkernels/ops/winograd_conv3x3.py winograd_use).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kIsaOk = true;
#else
constexpr bool kIsaOk = false;
#endif

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The value of environment variable `name` without surrounding whitespace, or nullopt when unset (also used by
// dense_block's SRKERNELS_DENSE_TILE).
inline std::optional<std::string> env_trimmed(const char* name) {
  const char* e = std::getenv(name);
  if (e == nullptr) return std::nullopt;
  std::string v(e);
  const auto ws = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  while (!v.empty() && ws(v.back())) v.pop_back();
  size_t b = 0;
  while (b < v.size() && ws(v[b])) ++b;
  return v.substr(b);
}

// A Winograd tile variable, as srkernels/ops/conv2d_pointwise.py reads it: 4 (F(4x4,3x3)), 2 (F(2x2,3x3)) or
// 0 (off), `fallback` when unset; anything else is a ValueError naming the variable.
inline int tile_env(const char* name, int fallback) {
  const std::optional<std::string> v = env_trimmed(name);
  if (!v) return fallback;
  TORCH_CHECK_VALUE(*v == "0" || *v == "2" || *v == "4", name, " must be 4 (F(4x4,3x3)), 2 (F(2x2,3x3)) or 0 (off; ",
                    "default ", fallback, "), got '", std::getenv(name), "'");
  return (*v)[0] - '0';
}

// SRKERNELS_WINOGRAD (conv2d_pointwise.py winograd_tile): default 4.
inline int tile_from_env() { return tile_env("SRKERNELS_WINOGRAD", 4); }

// dense_block's 3x3 layers: the main case of winograd_use (srkernels/ops/winograd_conv3x3.py), >= 16 channels in
// and out, >= 64 pixels (its extension to fewer outputs was measured on single convs only).
inline bool use(int64_t c_in, int64_t c_out, int64_t H, int64_t W) {
  return kIsaOk && std::min(c_in, c_out) >= 16 && H * W >= 64;
}

// Micro-kernel shape: R tile rows x NV vectors of output channels in registers (accumulators R * NV, plus NV
// weight vectors and one broadcast): 24 + 5 of AVX-512's 32 registers, 12 + 3 of AVX2's 16.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kR = 6, kNV = 4;
#else
constexpr int kR = 6, kNV = 2;
#endif

// acc[r][j] over c < C: M[r][k0 + j*VW ..] = sum_c V[r][c] * U[c][k0 + j*VW ..]. Rows of V are vs apart,
// rows of U us apart, rows of M ms apart (us and ms multiples of VW).
template <int R, int NV>
inline void micro(const float* __restrict v, int64_t vs, const float* __restrict u, int64_t us, int64_t C,
                  float* __restrict m, int64_t ms) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = Vec(0.f);
  for (int64_t c = 0; c < C; ++c) {
    Vec b[NV];
    for (int j = 0; j < NV; ++j) b[j] = Vec::loadu(u + c * us + j * VW);
    for (int r = 0; r < R; ++r) {
      const Vec a(v[r * vs + c]);
      for (int j = 0; j < NV; ++j) acc[r][j] = at::vec::fmadd(a, b[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j].store(m + r * ms + j * VW);
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);

template <int R, int... NV>
constexpr std::array<MicroFn, sizeof...(NV)> row_table(std::integer_sequence<int, NV...>) {
  return {&micro<R, NV + 1>...};
}
template <int... R>
constexpr std::array<std::array<MicroFn, kNV>, sizeof...(R)> micro_table(std::integer_sequence<int, R...>) {
  return {row_table<R + 1>(std::make_integer_sequence<int, kNV>{})...};
}
// kMicro[r - 1][nv - 1]: the kernel for r rows and nv vectors (block edges).
inline constexpr auto kMicro = micro_table(std::make_integer_sequence<int, kR>{});

// M[t][0..Kc) = V[t][0..C) @ U[.][0..Kc) for tb rows: Kc (a multiple of VW) in chunks of kNV vectors, rows in
// kR. Rows of U are us apart (us >= Kc: U may be a column range of a wider weight), rows of M Kc apart.
// One vector of output channels (Kc == VW: a conv with <= 16 outputs on AVX-512, e.g. a 64 -> 3 tail) runs
// 2 * kR rows at a time: kR accumulators alone are too few independent FMA chains to hide the FMA latency.
inline void gemm(const float* v, int64_t vs, const float* u, int64_t us, int64_t C, int64_t Kc, float* m,
                 int64_t tb) {
  const int64_t nvk = Kc / VW;
  if (nvk == 1) {
    int64_t r0 = 0;
    for (; r0 + 2 * kR <= tb; r0 += 2 * kR) micro<2 * kR, 1>(v + r0 * vs, vs, u, us, C, m + r0 * Kc, Kc);
    for (; r0 < tb; r0 += kR) {
      const int r = static_cast<int>(std::min<int64_t>(kR, tb - r0));
      kMicro[r - 1][0](v + r0 * vs, vs, u, us, C, m + r0 * Kc, Kc);
    }
    return;
  }
  for (int64_t k0 = 0; k0 < nvk; k0 += kNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, nvk - k0));
    for (int64_t r0 = 0; r0 < tb; r0 += kR) {
      const int r = static_cast<int>(std::min<int64_t>(kR, tb - r0));
      kMicro[r - 1][nv - 1](v + r0 * vs, vs, u + k0 * VW, us, C, m + r0 * Kc + k0 * VW, Kc);
    }
  }
}

// ---- transforms, one vector of channels at a time -------------------------------------------------------
// 1-D transforms of a column / row of T values; the 2-D ones apply them to columns, then rows.

template <int M, int R = 3>
struct Wino;

template <>
struct Wino<2, 3> {  // F(2, 3): points 0, 1, -1, inf
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
  static inline void g(const Vec* w, Vec* o) {  // G w (3 -> 4)
    const Vec h(0.5f);
    const Vec s = h * (w[0] + w[2]);
    o[0] = w[0];
    o[1] = at::vec::fmadd(h, w[1], s);
    o[2] = at::vec::fnmadd(h, w[1], s);
    o[3] = w[2];
  }
};

template <>
struct Wino<4, 3> {  // F(4, 3): points 0, 1, -1, 2, -2, inf
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
  static inline void g(const Vec* w, Vec* o) {  // G w (3 -> 6), rows of G in winograd_conv3x3.py _G
    const Vec s02 = w[0] + w[2];
    const Vec e = Vec(1.f / 6.f) * (s02 + w[1]), f = Vec(1.f / 6.f) * (s02 - w[1]);
    const Vec q = at::vec::fmadd(Vec(1.f / 24.f), w[0], Vec(1.f / 6.f) * w[2]);
    const Vec r = Vec(1.f / 12.f) * w[1];
    o[0] = Vec(0.25f) * w[0];
    o[1] = Vec(0.f) - e;
    o[2] = Vec(0.f) - f;
    o[3] = q + r;
    o[4] = q - r;
    o[5] = w[2];
  }
};

template <>
struct Wino<6, 3> {  // F(6, 3): points 0, 1, -1, 2, -2, 1/2, -1/2, inf (8x8 tiles; bf16 storage's tile)
  static constexpr int T = 8;
  static inline void bt(const Vec* d, Vec* o) {  // rows of B^T in winograd_conv3x3.py _BT[8], pairwise
    const Vec c21(21.f / 4.f), c17(17.f / 4.f), c5(5.f), c54(5.f / 4.f), c52(5.f / 2.f), q(0.25f), h(0.5f),
        two(2.f), four(4.f);
    o[0] = at::vec::fmadd(c21, d[2] - d[4], d[6] - d[0]);
    o[7] = at::vec::fmadd(c21, d[3] - d[5], d[7] - d[1]);
    Vec a = at::vec::fnmadd(c17, d[4], d[2] + d[6]), b = at::vec::fnmadd(c17, d[3], d[1] + d[5]);
    o[1] = a + b;
    o[2] = a - b;
    a = at::vec::fnmadd(c54, d[4], at::vec::fmadd(q, d[2], d[6]));
    b = at::vec::fmadd(two, d[5], at::vec::fnmadd(c52, d[3], h * d[1]));
    o[3] = a + b;
    o[4] = a - b;
    a = at::vec::fnmadd(c5, d[4], at::vec::fmadd(four, d[2], d[6]));
    b = at::vec::fmadd(h, d[5], at::vec::fnmadd(c52, d[3], two * d[1]));
    o[5] = a + b;
    o[6] = a - b;
  }
  static inline void at(const Vec* s, Vec* y) {  // A^T row i: p^i on the finite points
    const Vec a1 = s[1] + s[2], b1 = s[1] - s[2], a2 = s[3] + s[4], b2 = s[3] - s[4], a3 = s[5] + s[6],
              b3 = s[5] - s[6];
    y[0] = s[0] + a1 + a2 + a3;
    y[1] = at::vec::fmadd(Vec(0.5f), b3, at::vec::fmadd(Vec(2.f), b2, b1));
    y[2] = at::vec::fmadd(Vec(0.25f), a3, at::vec::fmadd(Vec(4.f), a2, a1));
    y[3] = at::vec::fmadd(Vec(0.125f), b3, at::vec::fmadd(Vec(8.f), b2, b1));
    y[4] = at::vec::fmadd(Vec(1.f / 16.f), a3, at::vec::fmadd(Vec(16.f), a2, a1));
    y[5] = at::vec::fmadd(Vec(1.f / 32.f), b3, at::vec::fmadd(Vec(32.f), b2, b1)) + s[7];
  }
};

// F(2, 5): the points of F(4, 3), so the same 6-point input transform; A^T rows p^0, p^1 (plus the inf column).
// G is not needed here: the 5x5 weight is transformed in Python (srkernels/ops/winograd_conv3x3.py _G).
template <>
struct Wino<2, 5> {
  static constexpr int T = 6;
  static inline void bt(const Vec* d, Vec* o) { Wino<4, 3>::bt(d, o); }
  static inline void at(const Vec* s, Vec* y) {
    const Vec a = s[1] + s[2], b = s[1] - s[2], c = s[3] + s[4], d = s[3] - s[4];
    y[0] = s[0] + a + c;
    y[1] = at::vec::fmadd(Vec(2.f), d, b) + s[5];
  }
};

// F(4, 5): the points of F(6, 3), so its 8-point input transform; A^T rows p^0 .. p^3 (plus the inf column).
// The inference tile of 5x5 convs (SRCNN's 64->32 layer): 64 multiplies per 4x4 outputs against F(2, 5)'s 36 per
// 2x2.
template <>
struct Wino<4, 5> {
  static constexpr int T = 8;
  static inline void bt(const Vec* d, Vec* o) { Wino<6, 3>::bt(d, o); }
  static inline void at(const Vec* s, Vec* y) {
    const Vec a1 = s[1] + s[2], b1 = s[1] - s[2], a2 = s[3] + s[4], b2 = s[3] - s[4], a3 = s[5] + s[6],
              b3 = s[5] - s[6];
    y[0] = s[0] + a1 + a2 + a3;
    y[1] = at::vec::fmadd(Vec(0.5f), b3, at::vec::fmadd(Vec(2.f), b2, b1));
    y[2] = at::vec::fmadd(Vec(0.25f), a3, at::vec::fmadd(Vec(4.f), a2, a1));
    y[3] = at::vec::fmadd(Vec(0.125f), b3, at::vec::fmadd(Vec(8.f), b2, b1)) + s[7];
  }
};

// Output tiles of an N x H x W image: th x tw per sample.
struct Geo {
  int64_t N, C, H, W, K, Kp, Cp, th, tw;  // C input channels (V rows padded to Cp), K output channels (Kp)
};

// Where input pixels live: pixel (n, h, w), channel c at base + n * ns + h * hs + w * ws + c, readable for h in
// [lo, H + hi_pad), w in [lo, W + hi_pad) (a padded buffer whose border holds zeros: lo = -1, hi_pad = 1), zero
// elsewhere. S: the activations' storage type, float or bf16 (widened on load: the transforms and GEMMs always
// run in float).
template <typename S = float>
struct Pixels {
  const S* base;
  int64_t ns, hs, ws, lo, hi_pad;
};

// The epilogue: z = conv + bias; y = act(z) + res, or act(z + res) (res_first); channels k < split go to out,
// the rest to out2 (channel k - split). out, out2 and res share the strides of Pixels (ns, hs, ws) and its
// storage type S (a bf16 result is rounded once, after the residual add); the bias is float.
// pool (when set): tile t's sum of its stored outputs per channel k, at pool[t * pool_ts + k] (the channel
// attention's average pool without a pass of its own; residual_group).
// shuffle r > 1: a pixel shuffle in the store (winograd_conv3x3's `upscale`; no residual, no split): channel k =
// (i * r + j) * (K / r^2) + c of pixel (h, w) goes to channel c of pixel (h * r + i, w * r + j); ns, hs, ws are
// then the strides of the r-times larger output, of K / r^2 channels.
enum class Act { None, Relu };
template <typename S = float>
struct Epilogue {
  S* out;
  S* out2;
  int64_t split;
  const S* res;
  bool res_first;
  Act act;
  const float* bias;
  int64_t ns, hs, ws;
  float* pool = nullptr;
  int64_t pool_ts = 0;
  int64_t shuffle = 1;
};

// v as stored in S and read back (bf16: rounded; float: itself).
template <typename S>
inline Vec stored(const Vec& v) {
  if constexpr (std::is_same_v<S, float>) {
    return v;
  } else {
    return at::vec::convert<float>(at::vec::convert<S>(v));
  }
}

// Input transform of tiles [t0, t0 + tb) into V[p][t - t0][0..Cp) (row stride Cp, position stride ps).
// Columns first, each loaded and transformed at once (rows and columns outside the readable range are zero).
template <int M, int R, typename S>
void input_transform(const Pixels<S>& x, const Geo& g, int64_t t0, int64_t tb, float* V, int64_t ps) {
  using Wn = Wino<M, R>;
  constexpr int T = Wn::T;
  const int64_t C = g.C, Cp = g.Cp, hs = x.hs, ws = x.ws;
  const int64_t hmin = x.lo, hmax = g.H + x.hi_pad, wmax = g.W + x.hi_pad;
  for (int64_t i = 0; i < tb; ++i) {
    const int64_t t = t0 + i;
    const int64_t n = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
    const int64_t h0 = ty * M - R / 2, w0 = tx * M - R / 2;  // padding R / 2
    // readable rows [a0, a1) and columns [b0, b1) of the patch
    const int a0 = static_cast<int>(std::max<int64_t>(0, hmin - h0));
    const int a1 = static_cast<int>(std::min<int64_t>(T, hmax - h0));
    const int b0 = static_cast<int>(std::max<int64_t>(0, hmin - w0));
    const int b1 = static_cast<int>(std::min<int64_t>(T, wmax - w0));
    const bool inside = a0 == 0 && b0 == 0 && a1 == T && b1 == T;
    const S* xt = x.base + n * x.ns;  // + (h0 + a) * hs + (w0 + b) * ws: only formed for readable pixels
    float* vt = V + i * Cp;
    for (int64_t c = 0; c < Cp; c += VW) {
      const int64_t cnt = std::min(VW, C - c);
      // the column results go through this L1 buffer, not T * T live vectors: 36 of them (F(4,3)) exceed the
      // register file and the compiler's spills were slower (one thread, AMD EPYC Zen 5, 64->64 at 48 / 96 px:
      // the whole conv 3-4% faster on AVX-512, ~2% with AVX2 forced, bf16 storage 2-3%, 64->256 unchanged)
      alignas(64) float e[T][T][VW];
      for (int b = 0; b < T; ++b) {
        Vec col[T], o[T];
        if (inside && cnt == VW) {
          const S* p = xt + h0 * hs + (w0 + b) * ws + c;
          for (int a = 0; a < T; ++a) col[a] = VecIO<S>::load(p + a * hs);
        } else {
          for (int a = 0; a < T; ++a) {
            if (a >= a0 && a < a1 && b >= b0 && b < b1) {
              col[a] = load_n(xt + (h0 + a) * hs + (w0 + b) * ws + c, cnt);
            } else {
              col[a] = Vec(0.f);
            }
          }
        }
        Wn::bt(col, o);  // B^T d[.][b]
        for (int a = 0; a < T; ++a) o[a].store(e[a][b]);
      }
      for (int a = 0; a < T; ++a) {  // rows: e[a][.] B
        Vec row[T], o[T];
        for (int b = 0; b < T; ++b) row[b] = Vec::loadu(e[a][b]);
        Wn::bt(row, o);
        for (int b = 0; b < T; ++b) o[b].store(vt + (a * T + b) * ps + c);
      }
    }
  }
}

// Output transform of tiles [t0, t0 + tb), output channels [k0, k0 + Kc) (clipped to K), from
// M[p][t - t0][0..Kc) (position stride ps) with the epilogue.
template <int M, int R, typename S>
void output_transform(const float* Mb, const Geo& g, int64_t t0, int64_t tb, int64_t k0, int64_t Kc, int64_t ps,
                      const Epilogue<S>& ep) {
  using Wn = Wino<M, R>;
  constexpr int T = Wn::T;
  const int64_t K = std::min(g.K, k0 + Kc);
  const Vec zero(0.f);
  for (int64_t i = 0; i < tb; ++i) {
    const int64_t t = t0 + i;
    const int64_t n = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
    const int64_t h0 = ty * M, w0 = tx * M;
    const int64_t mh = std::min<int64_t>(M, g.H - h0), mw = std::min<int64_t>(M, g.W - w0);
    const float* mt = Mb + i * Kc;  // channel k of the tile at mt[k - k0]
    for (int64_t k = k0; k < K; k += VW) {  // M's padding columns past K are never read
      const int64_t cnt = std::min(VW, K - k);
      Vec e[M][T];
      for (int b = 0; b < T; ++b) {
        Vec col[T], y[M];
        for (int a = 0; a < T; ++a) col[a] = Vec::loadu(mt + (a * T + b) * ps + k - k0);
        Wn::at(col, y);
        for (int a = 0; a < M; ++a) e[a][b] = y[a];
      }
      const Vec vb = ep.bias ? (cnt == VW ? Vec::loadu(ep.bias + k) : Vec::loadu(ep.bias + k, cnt)) : zero;
      Vec psum(0.f);  // lanes past cnt stay 0: M's padding columns are 0 and the bias load is masked
      // the pixel shuffle: sub-pixel (si, sj) of this vector's channels, channel kc of the output
      const int64_t rs = ep.shuffle, cs = g.K / (rs * rs), sub = k / cs, kc = rs > 1 ? k % cs : k;
      const int64_t si = rs > 1 ? sub / rs : 0, sj = rs > 1 ? sub % rs : 0;
      const bool straddles = rs > 1 && (k + cnt - 1) / cs != sub;
      for (int a = 0; a < mh; ++a) {
        Vec y[M];
        Wn::at(e[a], y);
        for (int b = 0; b < mw; ++b) {
          const int64_t off = n * ep.ns + ((h0 + a) * rs + si) * ep.hs + ((w0 + b) * rs + sj) * ep.ws;
          Vec v = y[b] + vb;
          const Vec r = ep.res ? load_n(ep.res + off + k, cnt) : zero;
          if (ep.res_first) v = v + r;
          if (ep.act == Act::Relu) v = at::vec::clamp_min(v, zero);
          if (!ep.res_first) v = v + r;
          if (ep.pool != nullptr) psum = psum + stored<S>(v);
          if (rs > 1) {
            if (!straddles) {
              store_n(ep.out + off + kc, v, cnt);
            } else {  // channels of two sub-pixels (K / r^2 not a multiple of the vector): one at a time
              alignas(64) float tmp[VW];
              v.store(tmp);
              for (int64_t q = 0; q < cnt; ++q) {
                const int64_t kq = k + q, sq = kq / cs;
                const int64_t o = n * ep.ns + ((h0 + a) * rs + sq / rs) * ep.hs + ((w0 + b) * rs + sq % rs) * ep.ws;
                ep.out[o + kq % cs] = static_cast<S>(tmp[q]);
              }
            }
          } else if (k + cnt <= ep.split) {
            store_n(ep.out + off + k, v, cnt);
          } else if (k >= ep.split) {
            store_n(ep.out2 + off + k - ep.split, v, cnt);
          } else {  // the vector straddles the split
            alignas(64) float tmp[VW];
            v.store(tmp);
            const int64_t n1 = ep.split - k;
            for (int64_t j = 0; j < n1; ++j) ep.out[off + k + j] = static_cast<S>(tmp[j]);
            for (int64_t j = n1; j < cnt; ++j) ep.out2[off + k + j - ep.split] = static_cast<S>(tmp[j]);
          }
        }
      }
      if (ep.pool != nullptr) psum.store(ep.pool + t * ep.pool_ts + k);
    }
  }
}

// Floats between two transform positions of a block's V (tb rows of Cp) or M (tb rows of Kc): the rows' size
// rounded up to an odd number of 64-byte lines. Whole multiples of 4 KB and other even line counts put the
// P = 36-64 positions on few L1 sets (V of 6 tiles x 512 channels: 192 lines apart, every position in one
// 12-way set), so the transforms' stores and loads missed. Measured (one thread, AMD EPYC Zen 5): a 512 -> 64
// conv at 32 px 1.23x faster, 256 -> 64 1.06x; fused models x4 at LR 32 / 48, off / on interleaved in one process
// (benchmarks/bench_winograd_switch.py --switch SRKERNELS_WINOGRAD_ODD_STRIDES): RDN 1.04-1.07x (fp32, bf16),
// RDCAB 1.02-1.05x, SRDenseNet fp32 1.03-1.04x, split / FD-IRB 0.995-1.03x, RCAN 0.99-1.05x (its 64-channel
// blocks were 72 lines apart already: 8 sets); AVX2 forced, fp32: RDN 1.10x, RDCAB 1.04-1.09x, FD-IRB
// 1.07-1.10x, SRDenseNet 1.08x, split 0.97-1.02x, RCAN 1.00-1.03x. SRKERNELS_WINOGRAD_ODD_STRIDES=0 turns it off
// (the A/B; read per call).
inline bool odd_strides_on() {
  const std::optional<std::string> v = env_trimmed("SRKERNELS_WINOGRAD_ODD_STRIDES");
  return !v || *v != "0";
}
inline int64_t pos_stride(int64_t floats, bool odd) { return odd ? (div_up(floats, 16) | 1) * 16 : floats; }

// Tiles per block: V and M of a block (P * TB * (Cp + Kc) floats, Kc the output channels of one M chunk) within
// `budget` floats, a multiple of kR, and enough blocks for every thread.
inline int64_t tile_block(int64_t P, int64_t Cp, int64_t Kc, int64_t tiles, int64_t threads, int64_t budget) {
  int64_t tb = std::max<int64_t>(kR, budget / (P * (Cp + Kc)) / kR * kR);
  return std::min(tb, std::max<int64_t>(kR, div_up(div_up(tiles, threads), kR) * kR));
}

// V and M of a block within this many floats for output tiles m x m: SRKERNELS_WINOGRAD_BLOCK_KB (a tuning knob,
// for every tile), else 384 KB for m = 4 and 128 KB for m = 2. m = 4 (F(4,3)): leaves L2 room for U; measured on
// RDN's RDB at LR 32-64 (AVX-512 / forced AVX2): 1024 KB was up to ~10% faster on AVX-512 and ~7% slower on
// AVX2, within the noise of this shared machine otherwise. m = 2 (F(2,3), F(2,5): 4 outputs per tile, 4x the V
// and M per output pixel of F(4,3)), 128 KB instead of 384 KB (benchmarks/bench_winograd_conv5x5.py, _conv3x3.py,
// one thread): SRCNN's 5x5 64->32 layer at 32-96 px 1.45 -> 1.65x oneDNN on AVX-512, 1.9 -> 2.6x forced AVX2;
// F(2,3) 64->64 at 32-96 px 1.5 -> 1.65x and 1.6 -> 1.85x; F(4,3) unchanged at 128 KB.
inline int64_t block_budget(int m = 4) {
  static const char* s = std::getenv("SRKERNELS_WINOGRAD_BLOCK_KB");
  static const int64_t set = s ? std::atoll(s) * 1024 / 4 : 0;
  return set ? set : (m == 2 ? 128 : 384) * 1024 / 4;
}

// Next-weight prefetch (winograd_conv3x3 / _conv5x5 only). In a network every conv streams its own transformed
// weight (RCAN: 411 x 590 KB, far more than the last-level cache), so each conv's first block waits on memory.
// The calling thread remembers which weight followed which in its previous calls (inference repeats the same
// sequence every forward), and each block prefetches its share of the predicted next weight into L2 behind
// its own GEMMs. A wrong or stale prediction costs only the prefetches (they never fault).
// Measured, fused RCAN x4, one thread, interleaved in one process (AMD EPYC Zen 5): LR 32 / 48 2-3% faster,
// LR 96 unchanged; two threads at LR 48 2% faster. Not in dense_block: its layers read a shared feature buffer
// that the prefetched weight evicts (RDN 3% slower with it).
// SRKERNELS_WINOGRAD_PREFETCH=0 turns it off; read per call, so one process can time both (the A/B of
// benchmarks/bench_winograd_prefetch.py).
inline bool prefetch_on() {
  const std::optional<std::string> v = env_trimmed("SRKERNELS_WINOGRAD_PREFETCH");
  return !v || *v != "0";
}
struct NextWeight {
  const char* p;
  int64_t bytes;
};
inline NextWeight predict_next(const float* u, int64_t bytes) {
  thread_local std::unordered_map<const float*, NextWeight> next;  // weight -> the one called after it
  thread_local const float* last = nullptr;
  if (last != nullptr && last != u) {
    if (next.size() > 8192) next.clear();  // bounded: a new model or image size starts over
    next[last] = NextWeight{reinterpret_cast<const char*>(u), bytes};
  }
  last = u;
  const auto it = next.find(u);
  return it == next.end() ? NextWeight{nullptr, 0} : it->second;
}

// Output channels per M chunk: a block's GEMMs and output transform run over chunks of at most this many output
// channels, so M holds one chunk and a wide conv gets the tile block of a 64 -> 64 one. Without the chunks, a
// 64 -> 256 conv (RCAN's upsampler) had blocks of 6 tiles, each streaming the whole 2.4 MB weight from L3.
constexpr int64_t kChunkK = 64;

// The whole conv: x -> epilogue, with U [P][C][Kp]; blocks of tile_block(.., budget) tiles over the threads.
// R x R kernel, zero padding R / 2.
// nx: a weight to prefetch into L2 while this conv runs (nullptr: none; residual_group knows its next conv's);
// the overload below takes `prefetch` instead: prefetch the weight predict_next predicts.
template <int M, int R = 3, typename S = float>
void run(const Pixels<S>& x, const float* u, const Geo& g, const Epilogue<S>& ep, int64_t budget, NextWeight nx) {
  constexpr int64_t P = Wino<M, R>::T * Wino<M, R>::T;
  const int64_t tiles = g.N * g.th * g.tw;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t Kc = std::min(g.Kp, kChunkK), nk = div_up(g.Kp, Kc);
  const int64_t TB = tile_block(P, g.Cp, Kc, tiles, threads, budget);
  const int64_t nb = div_up(tiles, TB);
  const bool odd = odd_strides_on();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    // Per-thread scratch kept between calls: a fresh ~0.3-1 MB buffer per call costs page faults and zeroing
    // comparable to a small conv. Every element read is written first in the same block.
    // Aligned to 64 bytes: V's rows are whole vectors apart, so no vector load splits a cache line.
    thread_local std::vector<float> scratch;
    const size_t need = static_cast<size_t>(P * (pos_stride(TB * g.Cp, odd) + pos_stride(TB * Kc, odd))) + 16;
    if (scratch.size() < need) scratch.resize(need);
    float* V = scratch.data();
    V += (64 - reinterpret_cast<uintptr_t>(V) % 64) % 64 / sizeof(float);
    float* Mb = V + P * pos_stride(TB * g.Cp, odd);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * TB, tb = std::min(TB, tiles - t0), vps = pos_stride(tb * g.Cp, odd);
      input_transform<M, R>(x, g, t0, tb, V, vps);
      for (int64_t kc = 0; kc < nk; ++kc) {
        const int64_t k0 = kc * Kc, kw = std::min(Kc, g.Kp - k0), mps = pos_stride(tb * kw, odd);
        for (int64_t p = 0; p < P; ++p) {
          gemm(V + p * vps, g.Cp, u + p * g.C * g.Kp + k0, g.Kp, g.C, kw, Mb + p * mps, tb);
          if (nx.p != nullptr) {  // this thread's share: slot (block, chunk, position) of its (b1 - b0) * nk * P
            const int64_t slot = ((blk - b0) * nk + kc) * P + p, slots = (b1 - b0) * nk * P;
            for (int64_t o = nx.bytes * slot / slots / 64 * 64; o < nx.bytes * (slot + 1) / slots; o += 64)
              __builtin_prefetch(nx.p + o, 0, 3);
          }
        }
        output_transform<M, R>(Mb, g, t0, tb, k0, kw, mps, ep);
      }
    }
  });
}

template <int M, int R = 3, typename S = float>
void run(const Pixels<S>& x, const float* u, const Geo& g, const Epilogue<S>& ep, int64_t budget,
         bool prefetch = false) {
  constexpr int64_t P = Wino<M, R>::T * Wino<M, R>::T;
  run<M, R, S>(x, u, g, ep, budget,
               prefetch ? predict_next(u, P * g.C * g.Kp * sizeof(float)) : NextWeight{nullptr, 0});
}

// The output tile m of a 3x3 transformed weight with P positions (16: F(2,3), 36: F(4,3), 64: F(6,3)), 0 for any
// other P (srkernels/ops/winograd_conv3x3.py tile_of).
inline int tile_of(int64_t P) { return P == 16 ? 2 : P == 36 ? 4 : P == 64 ? 6 : 0; }

// run<m, 3> for a tile m of tile_of.
template <typename S>
void run3(int m, const Pixels<S>& x, const float* u, const Geo& g, const Epilogue<S>& ep, int64_t budget,
          NextWeight nx) {
  if (m == 2) {
    run<2, 3, S>(x, u, g, ep, budget, nx);
  } else if (m == 4) {
    run<4, 3, S>(x, u, g, ep, budget, nx);
  } else {
    run<6, 3, S>(x, u, g, ep, budget, nx);
  }
}

// U[p][c][0..Kp) = (G w_c G^T)[p] from a 3x3 weight stored tap-major: tap (i, j), input channel c, output
// channel k at w[(i * 3 + j) * tap_stride + c * K + k]; columns [K, Kp) zero. fp32 vector arithmetic over the
// output channels (rounding a few ulp, against the ~1e-6 relative error of F(4,3) itself); cheap next to the
// conv (9 -> P values per weight pair).
template <int M>
void transform_weight(const float* w, int64_t tap_stride, int64_t C, int64_t K, int64_t Kp, float* U) {
  constexpr int T = Wino<M>::T;
  at::parallel_for(0, C, 16, [=](int64_t c0, int64_t c1) {  // by value: no reloads of C, K.. around the stores
    const int64_t ps = C * Kp;  // position stride of U
    for (int64_t c = c0; c < c1; ++c) {
      float* uc = U + c * Kp;
      const float* wc = w + c * K;
      for (int64_t k = 0; k < Kp; k += VW) {
        const int64_t cnt = std::max<int64_t>(0, std::min(VW, K - k));
        Vec e[T][3];  // G g, column by column
        for (int j = 0; j < 3; ++j) {
          Vec col[3];
          for (int i = 0; i < 3; ++i) {
            const float* p = wc + (i * 3 + j) * tap_stride + k;
            col[i] = cnt == VW ? Vec::loadu(p) : (cnt > 0 ? Vec::loadu(p, cnt) : Vec(0.f));
          }
          Vec o[T];
          Wino<M>::g(col, o);
          for (int a = 0; a < T; ++a) e[a][j] = o[a];
        }
        for (int a = 0; a < T; ++a) {
          Vec o[T];
          Wino<M>::g(e[a], o);
          float* ua = uc + a * T * ps + k;
          for (int b = 0; b < T; ++b) o[b].store(ua + b * ps);
        }
      }
    }
  });
}

}  // namespace wino
}  // namespace CPU_CAPABILITY
}  // namespace srkernels::cpu
