// CPU forward/backward of srkernels::balanced_attention (BAM = ACAM x MSAM):
//   out = x * sigmoid(W2 prelu(W1 mean(x))) [n,c] * sigmoid(conv_KxK(max_c x)) [n,p] (+ residual).
// Contract: docs/ops.md. Blocked per sample like channel_attention: one read of sample n gives the channel
// sums and the per-pixel channel max, the tiny MLP and KxK correlation run on those, then the sample is
// scaled while it is still in L2. Reductions use fixed pixel chunks combined in index order, so results are
// bitwise independent of the thread count.
#include "attention_common.h"
#include "runtime/cpu_dispatch.h"
#include "runtime/output_cache.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <limits>
#include <tuple>

namespace srkernels::cpu {
inline namespace CPU_CAPABILITY {  // one copy per compiled capability (runtime/cpu_dispatch.h)
namespace {

constexpr OpNames kOp = SRK_OP_NAMES(balanced_attention);

// NCHW: an item is a run of ~kPixNCHW pixels across all channels, so the per-pixel max / dsa / argmax rows
// of the item stay in L1 while the channel planes stream past. NHWC: a run of whole pixels (nhwc_chunk_pixels).
constexpr int64_t kPixNCHW = 2048;

// Pixel chunking of one sample; depends only on the shape. Chunk k = pixels [k*P, min(HW, (k+1)*P)).
struct PixChunks {
  Layout layout;
  int64_t C, HW, P, nk;
  PixChunks(Layout l, int64_t C_, int64_t HW_) : layout(l), C(C_), HW(HW_) {
    if (l == Layout::NCHW) {
      // Equal-sized chunks (rounded to 64 pixels) so a small sample still splits evenly across threads.
      const int64_t n0 = div_up(HW, kPixNCHW);
      P = div_up(div_up(HW, n0), 64) * 64;
    } else {
      P = nhwc_chunk_pixels(C);
    }
    nk = div_up(HW, P);
  }
  int64_t begin(int64_t k) const { return k * P; }
  int64_t len(int64_t k) const { return std::min(P, HW - k * P); }

  // One pass over a sample, chunks split across threads: NCHW row(k, c, p0, len) for the channels c of chunk
  // k in order (the run at c * HW + p0), NHWC pixels(k, p0, len) (the run at p0 * C). Every pass (pool, scale,
  // both backward passes) goes through here, so all of them see the same chunks.
  template <typename RowF, typename PixF>
  void parallel(const RowF& row, const PixF& pixels) const {
    at::parallel_for(0, nk, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        if (layout == Layout::NCHW) {
          for (int64_t c = 0; c < C; ++c) row(k, c, begin(k), len(k));
        } else {
          pixels(k, begin(k), len(k));
        }
      }
    });
  }
};

// Channel c's total of per-chunk partials [nk, C], summed in chunk order (the fixed merge of every pass).
template <typename A>
inline A sum_chunks(const std::vector<A>& part, int64_t nk, int64_t C, int64_t c) {
  A s = A(0);
  for (int64_t k = 0; k < nk; ++k) s += part[k * C + c];
  return s;
}

// ------------------------------------------------------------------ KxK zero-padded correlation (plain loops)

// A [H, W] map stored with K/2 zero rows/columns around it plus one vector of zero slack per row, so the
// correlation loops load full vectors at any tap without bounds checks.
template <typename A>
struct PaddedMap {
  int64_t H, Wd, r, Wp;
  std::vector<A> buf;
  PaddedMap(int64_t H_, int64_t W_, int64_t K)
      : H(H_), Wd(W_), r(K / 2), Wp(W_ + 2 * (K / 2) + Vectorized<A>::size()), buf((H_ + 2 * (K / 2)) * Wp, A(0)) {}
  A* row(int64_t y) { return buf.data() + (y + r) * Wp + r; }  // y in [-r, H + r)
  const A* row(int64_t y) const { return buf.data() + (y + r) * Wp + r; }
  void fill(const A* src) {
    for (int64_t y = 0; y < H; ++y) std::copy(src + y * Wd, src + (y + 1) * Wd, row(y));
  }
};

// dst[y, x] = sum_{i,j} w[i, j] * src[y + i - K/2, x + j - K/2] for rows [y0, y1). Each output vector sums its
// K*K taps in registers in (i, j) order, so every pixel has a fixed summation order.
template <typename A>
void correlate_rows(const PaddedMap<A>& src, const A* w, int64_t K, A* dst, int64_t y0, int64_t y1) {
  using AV = Vectorized<A>;
  constexpr int64_t W = AV::size();
  const int64_t r = K / 2, Wd = src.Wd;
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = 0; x < Wd; x += W) {
      AV acc(A(0));
      for (int64_t i = 0; i < K; ++i) {
        const A* s = src.row(y + i - r) + x - r;
        const A* wi = w + i * K;
        for (int64_t j = 0; j < K; ++j) acc = at::vec::fmadd(AV(wi[j]), AV::loadu(s + j), acc);
      }
      astore_n<A>(dst + y * Wd + x, acc, std::min<int64_t>(W, Wd - x));
    }
  }
}

// g[i*K + j] = sum_{y,x} dt[y, x] * src[y + i - K/2, x + j - K/2] for i in [i0, i1): the weight gradient of
// the correlation. Lane-wise partial sums over (y, x) in order, then a fixed horizontal sum.
template <typename A>
void correlate_weight_grad(const A* dt, const PaddedMap<A>& src, int64_t K, A* g, int64_t i0, int64_t i1) {
  using AV = Vectorized<A>;
  constexpr int64_t W = AV::size();
  const int64_t r = K / 2, H = src.H, Wd = src.Wd;
  std::vector<AV> acc(K);
  for (int64_t i = i0; i < i1; ++i) {
    std::fill(acc.begin(), acc.end(), AV(A(0)));
    for (int64_t y = 0; y < H; ++y) {
      const A* s = src.row(y + i - r) - r;
      for (int64_t x = 0; x < Wd; x += W) {
        const int64_t cnt = std::min<int64_t>(W, Wd - x);
        const AV d = aload_n<A>(dt + y * Wd + x, cnt);
        for (int64_t j = 0; j < K; ++j) {
          const AV v = at::vec::fmadd(d, AV::loadu(s + x + j), acc[j]);
          acc[j] = cnt == W ? v : AV::set(acc[j], v, cnt);  // lanes past the row end are not pixels
        }
      }
    }
    for (int64_t j = 0; j < K; ++j) g[i * K + j] = hsum<A>(acc[j]);
  }
}

// sigmoid over a row; every element goes through the same vector code (partial last vector), so a value's
// result does not depend on its position.
template <typename A>
void sigmoid_row(A* p, int64_t n) {
  using AV = Vectorized<A>;
  constexpr int64_t W = AV::size();
  const AV one(A(1));
  for (int64_t i = 0; i < n; i += W) {
    const int64_t cnt = std::min<int64_t>(W, n - i);
    const AV z = aload_n<A>(p + i, cnt);
    astore_n<A>(p + i, one / (one + z.neg().exp()), cnt);
  }
}

// sa = sigmoid(correlate(maxmap, w_sa)) for one sample; rows split across threads when not nested.
template <typename A>
void spatial_gate(const PaddedMap<A>& mxp, const A* w, int64_t K, A* sa) {
  const int64_t Wd = mxp.Wd;
  at::parallel_for(0, mxp.H, 1, [&](int64_t b, int64_t e) {
    correlate_rows<A>(mxp, w, K, sa, b, e);
    sigmoid_row<A>(sa + b * Wd, (e - b) * Wd);
  });
}

// The two gates of one sample from its statistics (the forward computes them, the backward recomputes them from
// the saved maps): ca = MLP(mean) with hidden pre-activation h and activation a, sa = sigmoid(corr(maxmap,
// w_sa)). Returns the padded maxmap (the backward's w_sa gradient reads it).
template <typename A>
PaddedMap<A> gates(const Mlp<A>& mlp, const A* mean, const A* mx, const std::vector<A>& wsa, int64_t H, int64_t Wd,
                   int64_t K, A* h, A* a, A* ca, A* sa) {
  mlp.forward(mean, h, a, ca);
  PaddedMap<A> mxp(H, Wd, K);
  mxp.fill(mx);
  spatial_gate<A>(mxp, wsa.data(), K, sa);
  return mxp;
}

// ------------------------------------------------------------------ NCHW row kernels (one channel, a pixel run)

// Returns sum(x); mx = x (kFirst) or max(mx, x), NaN-propagating like torch.max.
template <bool kFirst, typename T>
inline at::opmath_type<T> sum_max_row(const T* x, int64_t n, at::opmath_type<T>* mx) {
  using A = at::opmath_type<T>;
  return reduce2<A>(n, [&](int64_t o, int64_t cnt, Vectorized<A>& s) {
    const Vectorized<A> v = load_n<T>(x + o, cnt);
    s += v;
    astore_n<A>(mx + o, kFirst ? v : at::vec::maximum(aload_n<A>(mx + o, cnt), v), cnt);
  });
}

// out = x * ca * sa[p] (+ r)
template <typename T>
inline void scale_row(const T* x, const T* r, T* out, int64_t n, at::opmath_type<T> ca,
                      const at::opmath_type<T>* sa) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  constexpr int64_t W = IO::W;
  const typename IO::AV vca(ca);
  for (int64_t i = 0; i < n; i += W) {
    const int64_t cnt = std::min<int64_t>(W, n - i);
    const auto xs = load_n<T>(x + i, cnt) * vca;
    const auto s = aload_n<A>(sa + i, cnt);
    store_n<T>(out + i, r != nullptr ? at::vec::fmadd(xs, s, load_n<T>(r + i, cnt)) : xs * s, cnt);
  }
}

// Backward pass 1 for channel c: returns sum_p go*x*sa; dsa (+)= go*x*ca; am = lowest c with x == maxmap
// (am < 0: not found yet). am is kept in acc type so the test vectorises.
template <bool kFirst, typename T>
inline at::opmath_type<T> bwd1_row(const T* go, const T* x, int64_t n, const at::opmath_type<T>* sa,
                                   const at::opmath_type<T>* mx, at::opmath_type<T> ca, int64_t c,
                                   at::opmath_type<T>* dsa, at::opmath_type<T>* am) {
  using A = at::opmath_type<T>;
  using AV = Vectorized<A>;
  const AV vca(ca), vc{A(c)}, none(A(-1)), zero(A(0));
  return reduce2<A>(n, [&](int64_t o, int64_t cnt, AV& s) {
    const AV xv = load_n<T>(x + o, cnt);
    const AV t = load_n<T>(go + o, cnt) * xv;
    s = at::vec::fmadd(t, aload_n<A>(sa + o, cnt), s);
    const AV eq = attains<A>(xv, aload_n<A>(mx + o, cnt));  // NaN max: the first NaN, as torch.max
    if constexpr (kFirst) {
      astore_n<A>(dsa + o, t * vca, cnt);
      astore_n<A>(am + o, AV::blendv(none, vc, eq), cnt);
    } else {
      astore_n<A>(dsa + o, at::vec::fmadd(t, vca, aload_n<A>(dsa + o, cnt)), cnt);
      const AV a = aload_n<A>(am + o, cnt);
      astore_n<A>(am + o, AV::blendv(a, vc, eq & (a < zero)), cnt);
    }
  });
}

// Backward pass 2 for channel c: gx = go*ca*sa + k + (am == c ? dmax : 0)
template <typename T>
inline void bwd2_row(const T* go, T* gx, int64_t n, const at::opmath_type<T>* sa, at::opmath_type<T> ca,
                     at::opmath_type<T> k, const at::opmath_type<T>* am, const at::opmath_type<T>* dmax, int64_t c) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using AV = typename IO::AV;
  constexpr int64_t W = IO::W;
  const AV vca(ca), vk(k), vc{A(c)}, zero(A(0));
  for (int64_t i = 0; i < n; i += W) {
    const int64_t cnt = std::min<int64_t>(W, n - i);
    const AV v = at::vec::fmadd(load_n<T>(go + i, cnt) * vca, aload_n<A>(sa + i, cnt), vk);
    const AV dm = AV::blendv(zero, aload_n<A>(dmax + i, cnt), aload_n<A>(am + i, cnt) == vc);
    store_n<T>(gx + i, v + dm, cnt);
  }
}

// ------------------------------------------------------------------ NHWC pixel kernels (C contiguous)

// psum[c] = sum over the chunk's pixels; mx[p] = max over channels.
template <typename T>
inline void pool_pixels(const T* x, int64_t np, int64_t C, at::opmath_type<T>* psum, at::opmath_type<T>* mx) {
  using A = at::opmath_type<T>;
  using AV = Vectorized<A>;
  constexpr int64_t W = AV::size();
  const AV ninf(-std::numeric_limits<A>::infinity());
  std::fill(psum, psum + C, A(0));
  for (int64_t p = 0; p < np; ++p) {
    const T* xp = x + p * C;
    AV m = ninf;
    over_channels<T>(C, [&](int64_t c, int64_t cnt) {
      const AV v = load_n<T>(xp + c, cnt);
      astore_n<A>(psum + c, aload_n<A>(psum + c, cnt) + v, cnt);
      m = at::vec::maximum(m, cnt == W ? v : AV::set(ninf, v, cnt));
    });
    mx[p] = hmax<A>(m);
  }
}

template <typename T>
inline void scale_pixels(const T* x, const T* r, T* out, int64_t np, int64_t C, const at::opmath_type<T>* ca,
                         const at::opmath_type<T>* sa) {
  using A = at::opmath_type<T>;
  using AV = Vectorized<A>;
  for (int64_t p = 0; p < np; ++p) {
    const int64_t o = p * C;
    const AV s(sa[p]);
    over_channels<T>(C, [&](int64_t c, int64_t cnt) {
      const AV xs = load_n<T>(x + o + c, cnt) * aload_n<A>(ca + c, cnt);
      store_n<T>(out + o + c, r != nullptr ? at::vec::fmadd(xs, s, load_n<T>(r + o + c, cnt)) : xs * s, cnt);
    });
  }
}

template <typename T>
inline void bwd1_pixels(const T* go, const T* x, int64_t np, int64_t C, const at::opmath_type<T>* sa,
                        const at::opmath_type<T>* mx, const at::opmath_type<T>* ca, at::opmath_type<T>* pdca,
                        at::opmath_type<T>* dsa, at::opmath_type<T>* am) {
  using A = at::opmath_type<T>;
  using AV = Vectorized<A>;
  constexpr int64_t W = AV::size();
  const A big = std::numeric_limits<A>::infinity();
  const AV vbig(big), iota = AV::arange(A(0), A(1));
  std::fill(pdca, pdca + C, A(0));
  for (int64_t p = 0; p < np; ++p) {
    const int64_t o = p * C;
    const AV vsa(sa[p]), vmx(mx[p]);
    AV d(A(0)), idx = vbig;
    over_channels<T>(C, [&](int64_t c, int64_t cnt) {
      const AV xv = load_n<T>(x + o + c, cnt);
      const AV t = load_n<T>(go + o + c, cnt) * xv;
      astore_n<A>(pdca + c, at::vec::fmadd(t, vsa, aload_n<A>(pdca + c, cnt)), cnt);
      d = at::vec::fmadd(t, aload_n<A>(ca + c, cnt), d);
      AV cand = AV::blendv(vbig, iota + AV(A(c)), attains<A>(xv, vmx));
      if (cnt != W) cand = AV::set(vbig, cand, cnt);  // lanes past C are not channels
      idx = at::vec::minimum(idx, cand);
    });
    dsa[p] = hsum<A>(d);
    const A first = hmin<A>(idx);
    am[p] = first == big ? A(-1) : first;
  }
}

template <typename T>
inline void bwd2_pixels(const T* go, T* gx, int64_t np, int64_t C, const at::opmath_type<T>* sa,
                        const at::opmath_type<T>* ca, const at::opmath_type<T>* k, const at::opmath_type<T>* am,
                        const at::opmath_type<T>* dmax) {
  using A = at::opmath_type<T>;
  using AV = Vectorized<A>;
  const AV iota = AV::arange(A(0), A(1)), zero(A(0));
  for (int64_t p = 0; p < np; ++p) {
    const int64_t o = p * C;
    const AV vsa(sa[p]), vam(am[p]), vdm(dmax[p]);
    over_channels<T>(C, [&](int64_t c, int64_t cnt) {
      const AV v = at::vec::fmadd(load_n<T>(go + o + c, cnt) * aload_n<A>(ca + c, cnt), vsa, aload_n<A>(k + c, cnt));
      store_n<T>(gx + o + c, v + AV::blendv(zero, vdm, iota + AV(A(c)) == vam), cnt);
    });
  }
}

// ------------------------------------------------------------------ checks

struct Dims {
  int64_t N, C, H, W, HW, Cr, K;
};

Dims check_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& prelu_w, const at::Tensor& w2,
                const at::Tensor& w_sa, const char* op) {
  check_x(x, op);
  Dims d{x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) * x.size(3), 0, 0};
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == d.C, op, ": w1 must be [Cr, C=", d.C, "], got ", w1.sizes());
  d.Cr = w1.size(0);
  check_param(w1, x, {d.Cr, d.C}, op, "w1");
  check_param(w2, x, {d.C, d.Cr}, op, "w2");
  check_slope(prelu_w, x, d.Cr, op, "prelu_w");
  TORCH_CHECK(w_sa.dim() == 2 && w_sa.size(0) == w_sa.size(1) && w_sa.size(0) % 2 == 1, op,
              ": w_sa must be a square [K, K] kernel with K odd, got ", w_sa.sizes());
  d.K = w_sa.size(0);
  check_param(w_sa, x, {d.K, d.K}, op, "w_sa");
  return d;
}

// ------------------------------------------------------------------ forward

// The forward of both entry points: x (native layout), r (undefined or in x's layout) -> out (x's shape and
// layout, may be r itself); mean [N, C] and maxmap [N, H, W] (acc) are written when defined, else kept per
// sample and dropped. out may alias r: each element is read from r by the same vector step that writes it
// to out, and samples / pixel chunks never overlap, so every residual value is read before it is overwritten.
void forward_into(const at::Tensor& x, Layout layout, const at::Tensor& r, const at::Tensor& out,
                  const at::Tensor& mean, const at::Tensor& maxmap, const Dims& d, const at::Tensor& w1,
                  const at::Tensor& prelu_w, const at::Tensor& w2, const at::Tensor& w_sa) {
  const int64_t N = d.N, C = d.C, H = d.H, Wd = d.W, HW = d.HW, K = d.K;
  if (N == 0) return;
  TORCH_CHECK(C > 0, kOp.fwd, ": C must be > 0 (the channel max of an empty set is undefined)");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "balanced_attention_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const Mlp<A> mlp = Mlp<A>::template make<T>(w1, c10::nullopt, w2, c10::nullopt, prelu_w);
    const std::vector<A> wsa = to_acc<T>(w_sa);
    const PixChunks ch(layout, C, HW);
    const int64_t nk = ch.nk, Cr = d.Cr;
    A* pmean = mean.defined() ? mean.data_ptr<A>() : nullptr;
    A* pmax = maxmap.defined() ? maxmap.data_ptr<A>() : nullptr;

    for_each_sample_io<T>(x, r, out, [&](int64_t n, const T* xn, const T* rn, T* on) {
      std::vector<A> local_mx(pmax != nullptr ? 0 : HW), local_mn(pmean != nullptr ? 0 : C);
      A* mx = pmax != nullptr ? pmax + n * HW : local_mx.data();
      A* mn = pmean != nullptr ? pmean + n * C : local_mn.data();

      // One read of x: channel sums (per-chunk partials [nk, C]) and the per-pixel channel max.
      std::vector<A> psum(nk * C);
      ch.parallel(
          [&](int64_t k, int64_t c, int64_t p0, int64_t len) {
            const auto pool = c == 0 ? sum_max_row<true, T> : sum_max_row<false, T>;  // channel 0 starts the max
            psum[k * C + c] = pool(xn + c * HW + p0, len, mx + p0);
          },
          [&](int64_t k, int64_t p0, int64_t len) {
            pool_pixels<T>(xn + p0 * C, len, C, psum.data() + k * C, mx + p0);
          });
      for (int64_t c = 0; c < C; ++c) mn[c] = sum_chunks(psum, nk, C, c) / A(HW);

      std::vector<A> h(Cr), a(Cr), ca(C), sa(HW);
      gates<A>(mlp, mn, mx, wsa, H, Wd, K, h.data(), a.data(), ca.data(), sa.data());

      ch.parallel(
          [&](int64_t, int64_t c, int64_t p0, int64_t len) {
            const int64_t o = c * HW + p0;
            scale_row<T>(xn + o, rn != nullptr ? rn + o : nullptr, on + o, len, ca[c], sa.data() + p0);
          },
          [&](int64_t, int64_t p0, int64_t len) {
            const int64_t o = p0 * C;
            scale_pixels<T>(xn + o, rn != nullptr ? rn + o : nullptr, on + o, len, C, ca.data(), sa.data() + p0);
          });
    });
  });
}

// The forward, and balanced_attention_out when out is defined (OutVariant): out written, nothing returned.
std::tuple<at::Tensor, at::Tensor, at::Tensor> balanced_attention_cpu(const at::Tensor& out, const at::Tensor& x_in,
                                                                      const at::Tensor& w1, const at::Tensor& prelu_w,
                                                                      const at::Tensor& w2, const at::Tensor& w_sa,
                                                                      const c10::optional<at::Tensor>& residual) {
  const char* op = out.defined() ? kOp.out : kOp.fwd;
  const Dims d = check_args(x_in, w1, prelu_w, w2, w_sa, op);
  at::Tensor mean, maxmap;
  at::Tensor y = attention_forward(out, x_in, residual, op, [&](const at::Tensor& x, Layout layout, const at::Tensor& r,
                                                                const at::Tensor& dst, bool keep) {
    if (keep) {
      const auto acc_opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
      mean = at::empty({d.N, d.C}, acc_opts);
      maxmap = at::empty({d.N, d.H, d.W}, acc_opts);
    }
    forward_into(x, layout, r, dst, mean, maxmap, d, w1, prelu_w, w2, w_sa);
  });
  return {y, mean, maxmap};
}
using BalancedAttention = OutVariant<&balanced_attention_cpu>;

// ------------------------------------------------------------------ backward

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> balanced_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& maxmap_in,
    const at::Tensor& w1, const at::Tensor& prelu_w, const at::Tensor& w2, const at::Tensor& w_sa) {
  const Dims d = check_args(x_in, w1, prelu_w, w2, w_sa, kOp.bw);
  const int64_t N = d.N, C = d.C, H = d.H, Wd = d.W, HW = d.HW, K = d.K, Cr = d.Cr;
  const auto acc_type = at::toOpMathType(x_in.scalar_type());
  TORCH_CHECK(mean_in.sizes() == at::IntArrayRef({N, C}) && mean_in.scalar_type() == acc_type, kOp.bw,
              ": mean must be [N, C] = [", N, ", ", C, "] of dtype ", acc_type, ", got ", mean_in.sizes(), " ",
              mean_in.scalar_type());
  TORCH_CHECK(maxmap_in.sizes() == at::IntArrayRef({N, H, Wd}) && maxmap_in.scalar_type() == acc_type, kOp.bw,
              ": maxmap must be [N, H, W] = [", N, ", ", H, ", ", Wd, "] of dtype ", acc_type, ", got ",
              maxmap_in.sizes(), " ", maxmap_in.scalar_type());
  at::Tensor x = x_in;
  const Layout layout = prepare_input(x);
  const at::Tensor go = match_layout(grad_out_in, x, layout, kOp.bw, "grad_out");
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor maxmap = maxmap_in.contiguous();

  at::Tensor gx = empty_output_like(x);
  at::Tensor gw1 = at::empty({Cr, C}, w1.options());
  at::Tensor gpw = at::empty(prelu_w.sizes(), w1.options());
  at::Tensor gw2 = at::empty({C, Cr}, w1.options());
  at::Tensor gwsa = at::empty({K, K}, w1.options());
  TORCH_CHECK(N == 0 || C > 0, kOp.bw, ": C must be > 0");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "balanced_attention_backward_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const Mlp<A> mlp = Mlp<A>::template make<T>(w1, c10::nullopt, w2, c10::nullopt, prelu_w);
    const std::vector<A> wsa = to_acc<T>(w_sa);
    std::vector<A> wflip(K * K);  // the transposed conv is a correlation with the flipped kernel
    for (int64_t i = 0; i < K * K; ++i) wflip[i] = wsa[K * K - 1 - i];
    MlpGradRows<A> rows(N, C, Cr);
    std::vector<A> gws_rows(N * K * K);  // per-sample grad_w_sa, summed over n in order below

    if (N > 0) {
      const PixChunks ch(layout, C, HW);
      const int64_t nk = ch.nk;
      const T* pgo = go.const_data_ptr<T>();
      const T* px = x.const_data_ptr<T>();
      T* pgx = gx.data_ptr<T>();
      const A* pmean = mean.const_data_ptr<A>();
      const A* pmax = maxmap.const_data_ptr<A>();

      for_each_sample(N, [&](int64_t n) {
        const int64_t off = n * C * HW;
        const T* gon = pgo + off;
        const T* xn = px + off;
        T* gxn = pgx + off;
        const A* mx = pmax + n * HW;
        A* s = rows.s.data() + n * C;
        std::copy(pmean + n * C, pmean + (n + 1) * C, s);

        std::vector<A> h(Cr), ca(C), sa(HW), dsa(HW), am(HW), dmax(HW), pdca(nk * C), dca(C), dmean(C), kc(C);
        const PaddedMap<A> mxp =
            gates<A>(mlp, s, mx, wsa, H, Wd, K, h.data(), rows.a.data() + n * Cr, ca.data(), sa.data());

        // Pass 1: dca partials, dsa, argmax (lowest channel attaining the max).
        ch.parallel(
            [&](int64_t k, int64_t c, int64_t p0, int64_t len) {
              const int64_t o = c * HW + p0;
              const auto pass1 = c == 0 ? bwd1_row<true, T> : bwd1_row<false, T>;  // channel 0 starts dsa, am
              pdca[k * C + c] = pass1(gon + o, xn + o, len, sa.data() + p0, mx + p0, ca[c], c, dsa.data() + p0,
                                      am.data() + p0);
            },
            [&](int64_t k, int64_t p0, int64_t len) {
              const int64_t o = p0 * C;
              bwd1_pixels<T>(gon + o, xn + o, len, C, sa.data() + p0, mx + p0, ca.data(), pdca.data() + k * C,
                             dsa.data() + p0, am.data() + p0);
            });
        for (int64_t c = 0; c < C; ++c) dca[c] = sum_chunks(pdca, nk, C, c);
        mlp.backward(h.data(), ca.data(), dca.data(), rows.dz.data() + n * C, rows.dh.data() + n * Cr,
                     rows.dslope.data() + n * Cr, dmean.data());

        // Spatial branch: dt = dsa * sa (1 - sa), grad_w_sa = corr(dt, maxmap), dmax = conv_transpose(dt, w_sa).
        A* dt = dsa.data();  // in place
        for (int64_t p = 0; p < HW; ++p) dt[p] = dt[p] * sa[p] * (A(1) - sa[p]);
        PaddedMap<A> dtp(H, Wd, K);
        dtp.fill(dt);
        A* gws = gws_rows.data() + n * K * K;
        at::parallel_for(0, K, 1, [&](int64_t b, int64_t e) {
          correlate_weight_grad<A>(dt, mxp, K, gws, b, e);
        });
        at::parallel_for(0, H, 1, [&](int64_t b, int64_t e) {
          correlate_rows<A>(dtp, wflip.data(), K, dmax.data(), b, e);
        });

        const A inv_hw = A(1) / A(HW);
        for (int64_t c = 0; c < C; ++c) kc[c] = dmean[c] * inv_hw;

        // Pass 2: grad_x.
        ch.parallel(
            [&](int64_t, int64_t c, int64_t p0, int64_t len) {
              const int64_t o = c * HW + p0;
              bwd2_row<T>(gon + o, gxn + o, len, sa.data() + p0, ca[c], kc[c], am.data() + p0, dmax.data() + p0, c);
            },
            [&](int64_t, int64_t p0, int64_t len) {
              const int64_t o = p0 * C;
              bwd2_pixels<T>(gon + o, gxn + o, len, C, sa.data() + p0, ca.data(), kc.data(), am.data() + p0,
                             dmax.data() + p0);
            });
      });
    }

    reduce_mlp_grads<T, A>(rows, gw1, nullptr, gw2, nullptr, &gpw);
    std::vector<A> gws(K * K, A(0));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < K * K; ++i) gws[i] += gws_rows[n * K * K + i];
    T* pg = gwsa.data_ptr<T>();
    for (int64_t i = 0; i < K * K; ++i) pg[i] = static_cast<T>(gws[i]);
  });
  return {gx, gw1, gpw, gw2, gwsa};
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace srkernels::cpu

SRK_CPU_OP_WITH_OUT(balanced_attention, BalancedAttention)
SRK_CPU_OP(balanced_attention_backward, balanced_attention_backward_cpu)
