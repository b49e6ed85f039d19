// pixel_shuffle / pixel_unshuffle on CPU: the upsampler's conv epilogue (bias, activation, sub-pixel
// rearrangement, residual add) in one pass over memory. Contract: docs/ops.md "pixel_shuffle".
//
// Bytes moved: forward reads x (+ residual) and writes out once; eager bias + shuffle + add takes 3 passes
// more, and ATen's shuffle itself runs far below copy speed on CPU. Every element goes through the same
// vector code (partial vectors are masked, never a scalar tail), so results do not depend on position:
// - NCHW: an output row interleaves r input rows, one vector of each: rounds of interleave2 for r = 2, 4, 8,
//   masked lane permutes for other r <= 8 on AVX-512; otherwise the rows are staged in acc type and each
//   output vector is one gather through a periodic index table.
// - NHWC: an input pixel holds a [C, r*r] block that is transposed to r*r output pixels of C. r == 2 with
//   C >= one vector: four loads, two rounds of deinterleave2, four stores per channel block. Otherwise a run
//   of input pixels is staged in acc type and each output row is gathered through a periodic index table,
//   so small C (e.g. 3) still fills whole vectors.
// The backward / unshuffle runs the same rearrangements in reverse.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "attention_common.h"
#include "runtime/cpu_dispatch.h"
#include "runtime/output_cache.h"

#include <limits>
#include <numeric>
#include <tuple>

namespace srkernels::cpu {
inline namespace CPU_CAPABILITY {  // one copy per compiled capability (runtime/cpu_dispatch.h)
namespace {

enum class Act { None, Relu, Prelu };

Act parse_act(c10::string_view act) {
  if (act == "none") return Act::None;
  if (act == "relu") return Act::Relu;
  TORCH_CHECK(act == "prelu", "pixel_shuffle: act must be none, relu or prelu, got ", act);
  return Act::Prelu;
}

// NaN stays NaN (as in torch's relu / prelu): clamp_min returns its NaN operand, NaN > 0 picks v * slope.
template <typename A>
inline Vectorized<A> activate(const Vectorized<A>& v, Act act, const Vectorized<A>& slope) {
  const Vectorized<A> zero(A(0));
  if (act == Act::Relu) return at::vec::clamp_min(v, zero);
  if (act == Act::Prelu) return Vectorized<A>::blendv(v * slope, v, v > zero);
  return v;
}

struct Geometry {
  int64_t N, C, H, W, r;  // output channels C; input [N, C*r*r, H, W]; output [N, C, H*r, W*r]
  int64_t Cin() const { return C * r * r; }
};

template <typename A>
using Idx = at::vec::int_same_size_t<A>;  // gather index type (int32 for float, int64 for double)

inline int64_t lcm(int64_t a, int64_t b) { return a / std::gcd(a, b) * b; }

// One acc vector of up to V elements at p (n <= 0: zeros).
template <typename T>
inline typename VecIO<T>::AV load_upto(const T* p, int64_t n) {
  using AV = typename VecIO<T>::AV;
  if (n >= VecIO<T>::W) return VecIO<T>::load(p);
  return n > 0 ? VecIO<T>::load(p, n) : AV(at::opmath_type<T>(0));
}

// The element-wise end of the forward paths: act(pre) (+ residual), rounded once, cnt elements.
template <typename T>
inline void finish(T* o, const T* res, Vectorized<at::opmath_type<T>> v, Act act,
                   const Vectorized<at::opmath_type<T>>& slope, int64_t cnt) {
  v = activate(v, act, slope);
  if (res) v = v + load_n<T>(res, cnt);
  store_n<T>(o, v, cnt);
}

// R vectors <-> their element-wise interleave: interleave maps sources s_0..s_{R-1} to the R vectors holding
// [s_0[0], s_1[0], ..., s_{R-1}[0], s_0[1], ...]; deinterleave is the inverse. R is a compile-time constant so
// everything stays in registers. Powers of two use rounds of interleave2 / deinterleave2 (every ISA and
// dtype); other R use one masked lane permute per (output vector, source) on AVX-512 float.

template <typename A, int R>
constexpr bool kInterleaves = (R & (R - 1)) == 0
#if defined(CPU_CAPABILITY_AVX512)
                              || std::is_same_v<A, float>
#endif
    ;

// N a power of two. Interleave: in[0], in[S], ... (N sources) -> out[0..N): interleave the even and the odd
// sources, then merge pairwise. Inverse: in[0..N) -> sources out[0], out[S], ...: split even / odd elements,
// then recurse on each half.
template <bool kInverse, int N, int S, typename A>
inline void interleave_pow2(const Vectorized<A>* in, Vectorized<A>* out) {
  if constexpr (N == 1) {
    out[0] = in[0];
  } else {
    Vectorized<A> e[N / 2], o[N / 2];
    if constexpr (kInverse) {
      for (int t = 0; t < N / 2; ++t) std::tie(e[t], o[t]) = at::vec::deinterleave2<A>(in[2 * t], in[2 * t + 1]);
      interleave_pow2<true, N / 2, 2 * S, A>(e, out);
      interleave_pow2<true, N / 2, 2 * S, A>(o, out + S);
    } else {
      interleave_pow2<false, N / 2, 2 * S, A>(in, e);
      interleave_pow2<false, N / 2, 2 * S, A>(in + S, o);
      for (int t = 0; t < N / 2; ++t) std::tie(out[2 * t], out[2 * t + 1]) = at::vec::interleave2<A>(e[t], o[t]);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Lane maps for 16-lane float vectors. Interleave: output vector m, lane e holds element 16m + e of the
// interleaved sequence, i.e. lane (16m + e) / R of source (16m + e) % R. Deinterleave: source j, lane e is
// element e*R + j, i.e. lane (e*R + j) % 16 of input vector (e*R + j) / 16.
template <int R>
struct PermTables {
  alignas(64) int32_t fidx[R][16] = {};
  alignas(64) int32_t iidx[R][16] = {};
  uint16_t fmask[R][R] = {};
  uint16_t imask[R][R] = {};
  constexpr PermTables() {
    for (int m = 0; m < R; ++m) {
      for (int e = 0; e < 16; ++e) {
        fidx[m][e] = (16 * m + e) / R;
        fmask[m][(16 * m + e) % R] |= static_cast<uint16_t>(1u << e);
        iidx[m][e] = (e * R + m) % 16;
        imask[m][(e * R + m) / 16] |= static_cast<uint16_t>(1u << e);
      }
    }
  }
};
template <int R>
inline constexpr PermTables<R> kPerm{};
#endif

// Interleave (kInverse = false) or deinterleave (true) R vectors in place. The two directions differ only in
// the pow2 recursion and in which lane tables the permutes read (output vector m takes from each input u
// the lanes of mask[m][u], permuted by idx[m]).
template <typename A, int R, bool kInverse>
inline void interleave_dir(Vectorized<A>* v) {
  Vectorized<A> out[R];
  if constexpr ((R & (R - 1)) == 0) {
    interleave_pow2<kInverse, R, 1, A>(v, out);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const auto& t = kPerm<R>;
    const auto& idx = kInverse ? t.iidx : t.fidx;
    const auto& mask = kInverse ? t.imask : t.fmask;
    for (int m = 0; m < R; ++m) {
      const __m512i vi = _mm512_load_si512(idx[m]);
      __m512 o = _mm512_setzero_ps();
      for (int u = 0; u < R; ++u) o = _mm512_mask_permutexvar_ps(o, mask[m][u], vi, v[u]);
      out[m] = o;
    }
#endif
  }
  for (int m = 0; m < R; ++m) v[m] = out[m];
}

template <typename A, int R>
inline void interleave(Vectorized<A>* v) {
  interleave_dir<A, R, false>(v);
}

template <typename A, int R>
inline void deinterleave(Vectorized<A>* v) {
  interleave_dir<A, R, true>(v);
}

// Calls f(std::integral_constant<int, R>) if r <= 8 interleaves in registers for acc type A (larger r, and
// the other r without AVX-512 float, take the callers' gather paths).
template <typename A, typename F>
inline void with_interleave(int64_t r, const F& f) {
  auto one = [&](auto rc) {
    if constexpr (kInterleaves<A, decltype(rc)::value>) {
      if (r == decltype(rc)::value) f(rc);
    }
  };
  one(std::integral_constant<int, 1>{});
  one(std::integral_constant<int, 2>{});
  one(std::integral_constant<int, 3>{});
  one(std::integral_constant<int, 4>{});
  one(std::integral_constant<int, 5>{});
  one(std::integral_constant<int, 6>{});
  one(std::integral_constant<int, 7>{});
  one(std::integral_constant<int, 8>{});
}

// ---- forward ------------------------------------------------------------------------------------------

// One NCHW output row from its R input rows src[j] (bias b[j]): one vector of each, interleaved. Whole
// vectors first, then one masked step (same arithmetic) for the last W % V columns.
template <int R, typename T>
void shuffle_row(const T* const* src, const at::opmath_type<T>* b, T* o, const T* rr, int64_t W, Act act,
                 const Vectorized<at::opmath_type<T>>& vs) {
  using A = at::opmath_type<T>;
  using AV = Vectorized<A>;
  using IO = VecIO<T>;
  constexpr int64_t V = IO::W;
  AV vb[R];
  for (int j = 0; j < R; ++j) vb[j] = AV(b[j]);
  int64_t w = 0;
  for (; w + V <= W; w += V) {
    AV v[R];
    for (int j = 0; j < R; ++j) v[j] = IO::load(src[j] + w) + vb[j];
    interleave<A, R>(v);
    for (int m = 0; m < R; ++m) {
      const int64_t q = R * w + m * V;
      AV y = activate(v[m], act, vs);
      if (rr) y = y + IO::load(rr + q);
      IO::store(o + q, y);
    }
  }
  if (w < W) {
    const int64_t cnt = W - w;
    AV v[R];
    for (int j = 0; j < R; ++j) v[j] = IO::load(src[j] + w, cnt) + vb[j];
    interleave<A, R>(v);
    for (int m = 0; m < R && m * V < R * cnt; ++m) {
      const int64_t q = R * w + m * V;
      finish<T>(o + q, rr ? rr + q : nullptr, v[m], act, vs, std::min(V, R * cnt - m * V));
    }
  }
}

// The kernels of one call, over its geometry and epilogue (bias and PReLU slope in acc type, nullptr when
// absent). Forward: x -> out (+ res), per layout (and NHWC r == 2). Backward: go -> gx, reading x (nullptr
// for act none) and writing the per-item partials of the bias and slope gradients (bpart, apart: nullptr
// when not wanted).
template <typename T>
struct ShuffleKernels {
  using A = at::opmath_type<T>;
  using AV = Vectorized<A>;
  using I = Idx<A>;
  static constexpr int64_t V = VecIO<T>::W;

  Geometry g;
  const A* bias;
  const A* slope;
  Act act;

  void shuffle_nchw(const T* x, T* out, const T* res) const;
  void shuffle_nhwc_r2(const T* x, T* out, const T* res) const;
  void shuffle_nhwc(const T* x, T* out, const T* res) const;
  void unshuffle_nchw(const T* go, const T* x, T* gx, A* bpart, A* apart) const;
  void unshuffle_nhwc(const T* go, const T* x, T* gx, A* bpart, A* apart) const;
};

// NCHW: out[n, c, h*r + i, w*r + j] = f(x[n, c*r*r + i*r + j, h, w]); one item = (n, c, h), r output rows.
template <typename T>
void ShuffleKernels<T>::shuffle_nchw(const T* x, T* out, const T* res) const {
  const int64_t r = g.r, H = g.H, W = g.W, Wr = W * r, Cin = g.Cin();
  using RowFn = void (*)(const T* const*, const A*, T*, const T*, int64_t, Act, const AV&);
  RowFn row = nullptr;
  with_interleave<A>(r, [&](auto rc) { row = shuffle_row<decltype(rc)::value, T>; });
  // Otherwise (gather): the r input rows are staged (bias and activation applied) in rows of Wp, then each
  // output vector is one gather; the index pattern repeats every L = lcm(V, r) outputs (L / r input columns).
  const int64_t L = lcm(V, r), Wp = W + V;
  std::vector<I> tab;
  if (!row) {
    tab.resize(L);
    for (int64_t t = 0; t < L; ++t) tab[t] = static_cast<I>((t % r) * Wp + t / r);
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, W * r * r));
  at::parallel_for(0, g.N * g.C * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(row ? 0 : r * Wp, A(0));  // zero pad: gathers past W read zeros
    std::vector<const T*> src(r);
    std::vector<A> b(r);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / (g.C * H), c = (idx / H) % g.C, h = idx % H;
      const AV vs(slope ? slope[c] : A(0));
      for (int64_t i = 0; i < r; ++i) {
        const int64_t orow = ((n * g.C + c) * H * r + h * r + i) * Wr;
        T* o = out + orow;
        const T* rr = res ? res + orow : nullptr;
        const int64_t k0 = c * r * r + i * r;
        for (int64_t j = 0; j < r; ++j) {
          src[j] = x + ((n * Cin + k0 + j) * H + h) * W;
          b[j] = bias ? bias[k0 + j] : A(0);
        }
        if (row) {
          row(src.data(), b.data(), o, rr, W, act, vs);
          continue;
        }
        for (int64_t j = 0; j < r; ++j) {
          A* dst = buf.data() + j * Wp;
          for (int64_t w = 0; w < W; w += V) {
            const int64_t cnt = std::min(V, W - w);
            astore_n<A>(dst + w, activate(load_n<T>(src[j] + w, cnt) + AV(b[j]), act, vs), cnt);
          }
        }
        for (int64_t q = 0; q < Wr; q += V) {
          const int64_t cnt = std::min(V, Wr - q);
          const auto vi = Vectorized<I>::loadu(tab.data() + q % L) + Vectorized<I>(static_cast<I>(q / L * (L / r)));
          AV v = at::vec::gather<sizeof(A)>(buf.data(), vi);
          if (rr) v = v + load_n<T>(rr + q, cnt);
          store_n<T>(o + q, v, cnt);
        }
      }
    }
  });
}

// NHWC, r == 2 and C >= V: per input pixel and block of up to V channels, the 4*cnt contiguous inputs
// (channel-major, 4 sub-pixels each) are split into the 4 sub-pixel vectors by two rounds of deinterleave2.
template <typename T>
void ShuffleKernels<T>::shuffle_nhwc_r2(const T* x, T* out, const T* res) const {
  const int64_t H = g.H, W = g.W, C = g.C, Cin = 4 * C, Wr = 2 * W;
  const AV zero(A(0));
  at::parallel_for(0, g.N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / H, h = idx % H;
      const int64_t orow0 = (n * H * 2 + h * 2) * Wr * C;  // output row 2h; row 2h + 1 is Wr * C further
      for (int64_t w = 0; w < W; ++w) {
        const T* xp = x + (idx * W + w) * Cin;
        for (int64_t c = 0; c < C; c += V) {
          const int64_t cnt = std::min(V, C - c), n4 = 4 * cnt;
          AV v[4];
          for (int64_t m = 0; m < 4; ++m) {
            const int64_t o = 4 * c + m * V, nm = n4 - m * V;
            v[m] = load_upto<T>(xp + o, nm);
            if (bias && nm > 0) v[m] = v[m] + aload_n<A>(bias + o, std::min(V, nm));
          }
          deinterleave<A, 4>(v);  // [c0 s0..s3, c1 s0..s3, ...] -> sub-pixel s = 2i + j: v[s] = [c0 .. c15]
          const AV vs = slope ? aload_n<A>(slope + c, cnt) : zero;
          for (int64_t s = 0; s < 4; ++s) {  // sub-pixel s = 2i + j: output row 2h + i, column 2w + j
            const int64_t p = orow0 + (s >> 1) * Wr * C + (2 * w + (s & 1)) * C + c;
            finish<T>(out + p, res ? res + p : nullptr, v[s], act, vs, cnt);
          }
        }
      }
    }
  });
}

// NHWC, any r and C: a run of input pixels is staged in acc type (bias added); output row h*r + i of the run
// is then written in whole vectors, each one gather. The source pattern of output element q of the run,
// x[w*Cin + c*r*r + i*r + j] with (w, j, c) from q, repeats every L = lcm(V, r*C) outputs (pp pixels).
template <typename T>
void ShuffleKernels<T>::shuffle_nhwc(const T* x, T* out, const T* res) const {
  using IV = Vectorized<I>;
  const int64_t r = g.r, R = r * r, H = g.H, W = g.W, C = g.C, Cin = g.Cin(), rC = r * C;
  const int64_t L = lcm(V, rC), pp = L / rC;
  // Pixels per run: a multiple of pp; at most the whole periods of a row, so that only a short tail run
  // needs staging when x can be gathered from directly.
  int64_t P = pp * std::max<int64_t>(1, 4096 / (pp * Cin));
  if (W >= pp) P = std::min(P, W / pp * pp);
  const int64_t nb = div_up(W, P);
  std::vector<I> tab(L);
  std::vector<A> stab(L, A(0));  // slope of output element t's channel
  for (int64_t t = 0; t < L; ++t) {
    const int64_t w = t / rC, j = (t % rC) / C, c = t % C;
    tab[t] = static_cast<I>(w * Cin + c * R + j);
    if (slope) stab[t] = slope[c];
  }
  // Staging runs over the run's elements flat (small Cin still fills vectors); bias repeats every Lb.
  const int64_t Lb = lcm(V, Cin);
  std::vector<A> btab(bias ? Lb : 0);
  for (int64_t t = 0; t < static_cast<int64_t>(btab.size()); ++t) btab[t] = bias[t % Cin];
  const bool direct = std::is_same_v<T, A> && bias == nullptr;  // gather straight from x
  at::parallel_for(0, g.N * H * nb, std::max<int64_t>(1, 32768 / (P * Cin)), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(P * Cin, A(0));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t nh = item / nb, w0 = (item % nb) * P, np = std::min(P, W - w0);
      const int64_t n = nh / H, h = nh % H;
      const T* xs = x + (nh * W + w0) * Cin;
      const A* src;
      if (direct && np % pp == 0) {  // whole periods: every gathered lane lies inside the run
        src = reinterpret_cast<const A*>(xs);
      } else {  // stage (and add the bias); a partial last period reads stale but in-bounds values past np
        const int64_t ne = np * Cin;
        for (int64_t t = 0; t < ne; t += V) {
          const int64_t cnt = std::min(V, ne - t);
          AV v = load_n<T>(xs + t, cnt);
          if (bias) v = v + AV::loadu(btab.data() + t % Lb);
          astore_n<A>(buf.data() + t, v, cnt);
        }
        src = buf.data();
      }
      const int64_t nq = np * rC;
      for (int64_t i = 0; i < r; ++i) {
        const int64_t opos = ((n * H * r + h * r + i) * W * r + w0 * r) * C;
        T* o = out + opos;
        const T* rr = res ? res + opos : nullptr;
        for (int64_t q = 0; q < nq; q += V) {
          const int64_t cnt = std::min(V, nq - q), t = q % L;
          const IV vi = IV::loadu(tab.data() + t) + IV(static_cast<I>(q / L * pp * Cin + i * r));
          const AV v = at::vec::gather<sizeof(A)>(src, vi);
          finish<T>(o + q, rr ? rr + q : nullptr, v, act, AV::loadu(stab.data() + t), cnt);
        }
      }
    }
  });
}

// Validates and writes the forward into `out` (which must have x's converted layout and the output shape).
void forward_into(at::Tensor x, int64_t r, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& act_weight, Act act, const std::optional<at::Tensor>& residual,
                  const at::Tensor& out, Layout layout) {
  const Geometry g{x.size(0), x.size(1) / (r * r), x.size(2), x.size(3), r};
  const at::Tensor res = match_layout(residual, out, layout, "pixel_shuffle", "residual");
  if (g.N == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pixel_shuffle_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<A> b, s;
    if (bias) b = to_acc<scalar_t>(*bias);
    if (act == Act::Prelu) s = to_acc<scalar_t>(*act_weight);
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    const ShuffleKernels<scalar_t> k{g, bias ? b.data() : nullptr, act == Act::Prelu ? s.data() : nullptr, act};
    auto fn = layout == Layout::NCHW ? &ShuffleKernels<scalar_t>::shuffle_nchw
              : (r == 2 && g.C >= VecIO<scalar_t>::W) ? &ShuffleKernels<scalar_t>::shuffle_nhwc_r2
                                                      : &ShuffleKernels<scalar_t>::shuffle_nhwc;
    (k.*fn)(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rp);
  });
}

void check_args(const at::Tensor& x, int64_t r, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& act_weight, Act act) {
  TORCH_CHECK(x.dim() == 4, "pixel_shuffle: x must be 4-D, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), "pixel_shuffle: CPU kernel called with a ", x.device(), " tensor");
  TORCH_CHECK(r >= 1, "pixel_shuffle: r must be >= 1, got ", r);
  TORCH_CHECK(x.size(1) % (r * r) == 0, "pixel_shuffle: x has ", x.size(1), " channels, not a multiple of r*r");
  if (bias) check_param(*bias, x, {x.size(1)}, "pixel_shuffle", "bias");
  TORCH_CHECK(act != Act::Prelu || act_weight, "pixel_shuffle: act=prelu needs act_weight");
  if (act == Act::Prelu) check_param(*act_weight, x, {x.size(1) / (r * r)}, "pixel_shuffle", "act_weight");
}

// The forward, and pixel_shuffle_out when out is defined (OutVariant): out written, nothing returned.
at::Tensor pixel_shuffle_cpu(const at::Tensor& out, const at::Tensor& x_in, int64_t r,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_weight,
                             c10::string_view act_s, const std::optional<at::Tensor>& residual) {
  const Act act = parse_act(act_s);
  check_args(x_in, r, bias, act_weight, act);
  at::Tensor x = x_in;
  const Layout layout = prepare_input(x);
  const std::vector<int64_t> shape{x.size(0), x.size(1) / (r * r), x.size(2) * r, x.size(3) * r};
  if (!out.defined()) {
    at::Tensor y = empty_output(shape, x.options(), memory_format(layout));
    forward_into(x, r, bias, act_weight, act, residual, y, layout);
    return y;
  }
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape) && out.scalar_type() == x.scalar_type(),
              "pixel_shuffle_out: out must have shape ", at::IntArrayRef(shape), " and dtype ", x.scalar_type());
  const auto overlap = at::get_overlap_status(out, x_in);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial,
              "pixel_shuffle_out: out must not overlap x");
  forward_out(out, layout, [&] { return empty_output(shape, x.options(), memory_format(layout)); },
              [&](const at::Tensor& dst) { forward_into(x, r, bias, act_weight, act, residual, dst, layout); });
  return {};
}
using PixelShuffle = OutVariant<&pixel_shuffle_cpu>;

// ---- backward / unshuffle -----------------------------------------------------------------------------
// gx[n, k, h, w] = act'(x + bias) * go[n, c, h*r + i, w*r + j]; per-(n, k) (NCHW) or per-(n, h) (NHWC)
// partial sums of gx (bias grad) and of go * pre where pre <= 0 (PReLU slope grad), merged in index order.
// Partials are kept lane-wise in vectors (fixed order for a given shape, whatever the thread count).

// gx for cnt elements of a run of input channels from gy (already rearranged), and their partials. xp, bk,
// sk: x, bias and PReLU slope at the same elements. A NaN pre-activation follows ATen's backward: relu tests
// its output (NaN <= 0 is false: the gradient passes), prelu its input (NaN > 0 is false: slope branch).
template <typename T>
struct GradEpilogue {
  using A = at::opmath_type<T>;
  using AV = Vectorized<A>;
  Act act;
  bool want_b, want_a;
  inline AV operator()(const AV& gy, const T* xp, const AV& bk, const AV& sk, int64_t cnt, AV* bacc,
                       AV* aacc) const {
    const AV zero(A(0));
    AV gx = gy;
    if (act == Act::Relu) {
      gx = AV::blendv(gy, zero, load_n<T>(xp, cnt) + bk <= zero);
    } else if (act == Act::Prelu) {
      const AV pre = load_n<T>(xp, cnt) + bk;
      const AV pos = pre > zero;
      gx = AV::blendv(gy * sk, gy, pos);
      if (want_a) {
        AV t = AV::blendv(gy * pre, zero, pos);
        if (cnt < VecIO<T>::W) t = AV::set(zero, t, cnt);  // lanes past the run are not elements
        *aacc = *aacc + t;
      }
    }
    if (want_b) *bacc = *bacc + (cnt < VecIO<T>::W ? AV::set(zero, gx, cnt) : gx);
    return gx;
  }
};

// One NCHW grad_out row -> row h of its R input planes (gxr[j], xr[j], bias b[j]): R vectors of the row, one
// deinterleave, one vector of each plane. bacc / aacc: the planes' lane-wise partials.
template <int R, typename T>
void unshuffle_row(const T* gorow, const T* const* xr, T* const* gxr, const at::opmath_type<T>* b, int64_t W,
                   const Vectorized<at::opmath_type<T>>& sk, const GradEpilogue<T>& epi,
                   Vectorized<at::opmath_type<T>>* bacc, Vectorized<at::opmath_type<T>>* aacc) {
  using A = at::opmath_type<T>;
  using AV = Vectorized<A>;
  constexpr int64_t V = VecIO<T>::W;
  AV ba[R], aa[R];
  for (int j = 0; j < R; ++j) {
    ba[j] = bacc[j];
    aa[j] = aacc[j];
  }
  for (int64_t w = 0; w < W; w += V) {
    const int64_t cnt = std::min(V, W - w);
    AV v[R];
    for (int m = 0; m < R; ++m) v[m] = load_upto<T>(gorow + R * w + m * V, R * cnt - m * V);
    deinterleave<A, R>(v);
    for (int j = 0; j < R; ++j)
      store_n<T>(gxr[j] + w, epi(v[j], xr ? xr[j] + w : nullptr, AV(b[j]), sk, cnt, &ba[j], &aa[j]), cnt);
  }
  for (int j = 0; j < R; ++j) {
    bacc[j] = ba[j];
    aacc[j] = aa[j];
  }
}

// NCHW: one item = (n, c, i): output row h*r + i of channel c feeds input planes k = c*r*r + i*r + j, row h.
template <typename T>
void ShuffleKernels<T>::unshuffle_nchw(const T* go, const T* x, T* gx, A* bpart, A* apart) const {
  const int64_t r = g.r, H = g.H, W = g.W, Wr = W * r, Cin = g.Cin();
  const GradEpilogue<T> epi{act, bpart != nullptr, apart != nullptr};
  using RowFn = void (*)(const T*, const T* const*, T* const*, const A*, int64_t, const AV&, const GradEpilogue<T>&,
                         AV*, AV*);
  RowFn row = nullptr;
  with_interleave<A>(r, [&](auto rc) { row = unshuffle_row<decltype(rc)::value, T>; });
  // Otherwise (gather): the grad_out row is staged in acc type (zero pad of V*r), plane j gathers at stride r.
  std::vector<I> stride_r(V);
  for (int64_t t = 0; t < V; ++t) stride_r[t] = static_cast<I>(t * r);
  at::parallel_for(0, g.N * g.C * r, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(row ? 0 : Wr + V * r, A(0));
    std::vector<AV> bacc(r), aacc(r);
    std::vector<const T*> xr(r);
    std::vector<T*> gxr(r);
    std::vector<A> b(r);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (g.C * r), c = (item / r) % g.C, i = item % r, k0 = c * r * r + i * r;
      const AV sk(slope ? slope[c] : A(0));
      std::fill(bacc.begin(), bacc.end(), AV(A(0)));
      std::fill(aacc.begin(), aacc.end(), AV(A(0)));
      for (int64_t j = 0; j < r; ++j) b[j] = bias ? bias[k0 + j] : A(0);
      for (int64_t h = 0; h < H; ++h) {
        const T* gorow = go + ((n * g.C + c) * H * r + h * r + i) * Wr;
        for (int64_t j = 0; j < r; ++j) {
          const int64_t off = ((n * Cin + k0 + j) * H + h) * W;
          xr[j] = x ? x + off : nullptr;
          gxr[j] = gx + off;
        }
        if (row) {
          row(gorow, x ? xr.data() : nullptr, gxr.data(), b.data(), W, sk, epi, bacc.data(), aacc.data());
          continue;
        }
        for (int64_t q = 0; q < Wr; q += V) {
          const int64_t cnt = std::min(V, Wr - q);
          astore_n<A>(buf.data() + q, load_n<T>(gorow + q, cnt), cnt);
        }
        for (int64_t j = 0; j < r; ++j) {
          for (int64_t w = 0; w < W; w += V) {
            const int64_t cnt = std::min(V, W - w);
            const auto vi = Vectorized<I>::loadu(stride_r.data()) + Vectorized<I>(static_cast<I>(w * r + j));
            const AV gy = at::vec::gather<sizeof(A)>(buf.data(), vi);
            store_n<T>(gxr[j] + w, epi(gy, x ? xr[j] + w : nullptr, AV(b[j]), sk, cnt, &bacc[j], &aacc[j]), cnt);
          }
        }
      }
      for (int64_t j = 0; j < r; ++j) {
        if (bpart) bpart[n * Cin + k0 + j] = hsum<A>(bacc[j]);
        if (apart) apart[n * Cin + k0 + j] = hsum<A>(aacc[j]);
      }
    }
  });
}

// NHWC: one item = (n, h); per input pixel the r*r output pixels' channel vectors are interleaved back into
// the pixel's [C, r*r] block. r == 2 and C >= V: two rounds of interleave2; otherwise a gather through a
// per-pixel offset table (a scalar gather for reduced types, which have no vector gather).
template <typename T>
void ShuffleKernels<T>::unshuffle_nhwc(const T* go, const T* x, T* gx, A* bpart, A* apart) const {
  const int64_t r = g.r, R = r * r, H = g.H, W = g.W, C = g.C, Cin = g.Cin(), Wr = W * r;
  const GradEpilogue<T> epi{act, bpart != nullptr, apart != nullptr};
  const bool fast2 = r == 2 && C >= V;
  const int64_t Cp = div_up(Cin, V) * V;
  std::vector<I> offs(Cp, I(0));  // go offset of input channel k from the pixel's first output pixel
  std::vector<A> bk(Cp, A(0)), sk(Cp, A(0));
  for (int64_t k = 0; k < Cin; ++k) {
    const int64_t c = k / R, i = (k % R) / r, j = k % r;
    TORCH_CHECK(i * Wr * C + j * C + c <= std::numeric_limits<I>::max(), "pixel_shuffle_backward: row too long");
    offs[k] = static_cast<I>(i * Wr * C + j * C + c);
    if (bias) bk[k] = bias[k];
    if (slope) sk[k] = slope[c];
  }
  at::parallel_for(0, g.N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<AV> bacc(div_up(Cin, V)), aacc(div_up(Cin, V));
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / H, h = idx % H;
      std::fill(bacc.begin(), bacc.end(), AV(A(0)));
      std::fill(aacc.begin(), aacc.end(), AV(A(0)));
      for (int64_t w = 0; w < W; ++w) {
        const int64_t off = (idx * W + w) * Cin;
        const T* gop = go + ((n * H * r + h * r) * Wr + w * r) * C;  // output pixel (h*r, w*r)
        auto emit = [&](const AV& gy, int64_t k, int64_t cnt) {
          const int64_t b = k / V;
          store_n<T>(gx + off + k,
                     epi(gy, x ? x + off + k : nullptr, AV::loadu(bk.data() + k), AV::loadu(sk.data() + k), cnt,
                         &bacc[b], &aacc[b]),
                     cnt);
        };
        if (fast2) {
          for (int64_t c = 0; c < C; c += V) {
            const int64_t cnt = std::min(V, C - c), n4 = 4 * cnt;
            AV v[4] = {load_n<T>(gop + c, cnt), load_n<T>(gop + C + c, cnt), load_n<T>(gop + Wr * C + c, cnt),
                       load_n<T>(gop + Wr * C + C + c, cnt)};  // sub-pixels s = 2i + j
            interleave<A, 4>(v);  // -> [c s0..s3] per channel, the pixel's layout
            for (int64_t m = 0; m < 4 && m * V < n4; ++m) emit(v[m], 4 * c + m * V, std::min(V, n4 - m * V));
          }
        } else {
          for (int64_t k = 0; k < Cin; k += V) {
            const int64_t cnt = std::min(V, Cin - k);
            AV gy;
            if constexpr (std::is_same_v<T, A>) {
              gy = at::vec::gather<sizeof(A)>(gop, Vectorized<I>::loadu(offs.data() + k));  // pad offsets are 0
            } else {
              A tmp[V];
              for (int64_t t = 0; t < cnt; ++t) tmp[t] = static_cast<A>(gop[offs[k + t]]);
              gy = AV::loadu(tmp, cnt);
            }
            emit(gy, k, cnt);
          }
        }
      }
      A* bp = bpart ? bpart + idx * Cin : nullptr;
      A* ap = apart ? apart + idx * Cin : nullptr;
      for (int64_t k = 0; k < Cin; k += V) {
        const int64_t cnt = std::min(V, Cin - k);
        if (bp) astore_n<A>(bp + k, bacc[k / V], cnt);
        if (ap) astore_n<A>(ap + k, aacc[k / V], cnt);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_backward_cpu(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& x_opt, int64_t r,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_weight, c10::string_view act_s) {
  const Act act = parse_act(act_s);
  TORCH_CHECK(grad_out_in.dim() == 4 && grad_out_in.size(2) % r == 0 && grad_out_in.size(3) % r == 0,
              "pixel_shuffle_backward: grad_out must be 4-D with H, W divisible by r, got ", grad_out_in.sizes());
  TORCH_CHECK(act == Act::None || x_opt, "pixel_shuffle_backward: x is needed for act ", act_s);
  const Geometry g{grad_out_in.size(0), grad_out_in.size(1), grad_out_in.size(2) / r, grad_out_in.size(3) / r, r};
  at::Tensor x, go = grad_out_in;
  Layout layout;
  if (x_opt) {
    x = *x_opt;
    check_args(x, r, bias, act_weight, act);
    layout = prepare_input(x);
    TORCH_CHECK(x.size(0) == g.N && x.size(1) == g.Cin() && x.size(2) == g.H && x.size(3) == g.W,
                "pixel_shuffle_backward: x ", x.sizes(), " does not match grad_out ", grad_out_in.sizes());
  } else {
    layout = prepare_input(go);
  }
  go = go.contiguous(memory_format(layout));
  const auto opts = go.options();
  at::Tensor gx = empty_output({g.N, g.Cin(), g.H, g.W}, opts, memory_format(layout));
  at::Tensor gb = bias ? at::zeros({g.Cin()}, opts) : at::empty({0}, opts);
  at::Tensor ga = act == Act::Prelu ? at::zeros({g.C}, opts) : at::empty({0}, opts);
  if (g.N == 0) return {gx, gb, ga};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, go.scalar_type(), "pixel_shuffle_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<A> b, s;
    if (bias) b = to_acc<scalar_t>(*bias);
    if (act == Act::Prelu) s = to_acc<scalar_t>(*act_weight);
    const int64_t parts = layout == Layout::NCHW ? g.N : g.N * g.H;  // partial rows, each Cin wide
    std::vector<A> bpart(bias ? parts * g.Cin() : 0), apart(act == Act::Prelu ? parts * g.Cin() : 0);
    const ShuffleKernels<scalar_t> k{g, bias ? b.data() : nullptr, act == Act::Prelu ? s.data() : nullptr, act};
    auto fn = layout == Layout::NCHW ? &ShuffleKernels<scalar_t>::unshuffle_nchw
                                     : &ShuffleKernels<scalar_t>::unshuffle_nhwc;
    (k.*fn)(go.const_data_ptr<scalar_t>(), x.defined() ? x.const_data_ptr<scalar_t>() : nullptr,
            gx.mutable_data_ptr<scalar_t>(), bias ? bpart.data() : nullptr, act == Act::Prelu ? apart.data() : nullptr);
    if (bias) {
      scalar_t* out = gb.mutable_data_ptr<scalar_t>();
      for (int64_t k = 0; k < g.Cin(); ++k) {
        A acc(0);
        for (int64_t p = 0; p < parts; ++p) acc += bpart[p * g.Cin() + k];
        out[k] = static_cast<scalar_t>(acc);
      }
    }
    if (act == Act::Prelu) {
      scalar_t* out = ga.mutable_data_ptr<scalar_t>();
      const int64_t rr2 = r * r;
      for (int64_t c = 0; c < g.C; ++c) {
        A acc(0);
        for (int64_t p = 0; p < parts; ++p)
          for (int64_t s0 = 0; s0 < rr2; ++s0) acc += apart[p * g.Cin() + c * rr2 + s0];
        out[c] = static_cast<scalar_t>(acc);
      }
    }
  });
  return {gx, gb, ga};
}

at::Tensor pixel_unshuffle_cpu(const at::Tensor& x, int64_t r) {
  TORCH_CHECK(r >= 1, "pixel_unshuffle: r must be >= 1, got ", r);
  return std::get<0>(pixel_shuffle_backward_cpu(x, std::nullopt, r, std::nullopt, std::nullopt, "none"));
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace srkernels::cpu

SRK_CPU_OP_WITH_OUT(pixel_shuffle, PixelShuffle)
SRK_CPU_OP(pixel_shuffle_backward, pixel_shuffle_backward_cpu)
SRK_CPU_OP(pixel_unshuffle, pixel_unshuffle_cpu)
