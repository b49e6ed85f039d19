// CPU forward/backward of srkernels::channel_attention (RCAN CALayer / IMDN contrast attention):
//   out = x * sigmoid(W2 act(W1 pool(x) + b1) + b2) (+ residual), pool = mean or mean + std over H, W.
// Contract: docs/ops.md. Work is blocked per sample: pool sample n, run its MLP, then scale it while it is
// still in L2, so x comes from DRAM once. Every reduction is split into fixed-size chunks whose partials are
// combined in index order, so results are bitwise independent of the thread count.
#include "attention_common.h"
#include "runtime/cpu_dispatch.h"
#include "runtime/output_cache.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <tuple>

namespace srkernels::cpu {
inline namespace CPU_CAPABILITY {  // one copy per compiled capability (runtime/cpu_dispatch.h)
namespace {

constexpr OpNames kOp = SRK_OP_NAMES(channel_attention);

// NCHW: a chunk is a run of one channel plane; 16 KB of fp32, so the deviation pass re-reads it from L1.
// NHWC: a chunk is a run of whole pixels (nhwc_chunk_pixels).
constexpr int64_t kChunkNCHW = 4096;

inline bool parse_pool(c10::string_view pool, const char* op) {
  if (pool == "avg") return false;
  if (pool == "avg+std") return true;
  TORCH_CHECK(false, op, ": pool must be \"avg\" or \"avg+std\", got \"", std::string(pool), "\"");
}

// Chunking of one sample. NCHW: item i = (channel i / nk, chunk i % nk) of kChunkNCHW elements.
// NHWC: item k = pixels [k*P, (k+1)*P). Depends only on the shape.
struct Chunking {
  Layout layout;
  int64_t C, HW, nk, P;
  int64_t cs, ks;  // per-item partials ([C, nk] NCHW, [nk, C] NHWC): stride between channels, between chunks
  Chunking(Layout l, int64_t C_, int64_t HW_) : layout(l), C(C_), HW(HW_) {
    P = l == Layout::NCHW ? kChunkNCHW : nhwc_chunk_pixels(C);
    nk = div_up(HW, P);
    cs = l == Layout::NCHW ? nk : 1;
    ks = l == Layout::NCHW ? 1 : C;
  }
  int64_t items() const { return layout == Layout::NCHW ? C * nk : nk; }
  int64_t len(int64_t k) const { return std::min(P, HW - k * P); }  // pixels in chunk k

  // One pass over a sample, items split across threads: NCHW row(i, c, k, o) for item i = (channel c, chunk
  // k), NHWC pixels(k, o) for chunk k; o = the chunk's element offset in the sample. Every pass (pool, scale,
  // dg, grad_x) goes through here, so all of them see the same items.
  template <typename RowF, typename PixF>
  void parallel(const RowF& row, const PixF& pixels) const {
    if (layout == Layout::NCHW) {
      at::parallel_for(0, items(), 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t c = i / nk, k = i % nk;
          row(i, c, k, c * HW + k * P);
        }
      });
    } else {
      at::parallel_for(0, nk, 1, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) pixels(k, k * P * C);
      });
    }
  }
};

// ------------------------------------------------------------------ NCHW row kernels (one channel run)

// Second pass over a cache-resident run: m2 = sum (x - mean)^2 about the run's own rounded mean, minus the
// corrected two-pass term (sum d)^2 / n that removes the error of that mean (Chan, Golub & LeVeque);
// dsum = sum (x - mean), so mean + dsum / n is the run's mean to within rounding of small numbers.
template <typename T>
inline void sqdev_row(const T* p, int64_t n, at::opmath_type<T> mean, at::opmath_type<T>& m2,
                      at::opmath_type<T>& dsum) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using AV = typename IO::AV;
  constexpr int64_t W = IO::W;
  const AV m(mean);
  AV q0(A(0)), q1(A(0)), d0(A(0)), d1(A(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const AV a = IO::load(p + i) - m, b = IO::load(p + i + W) - m;
    q0 = at::vec::fmadd(a, a, q0);
    q1 = at::vec::fmadd(b, b, q1);
    d0 += a;
    d1 += b;
  }
  for (; i + W <= n; i += W) {
    const AV a = IO::load(p + i) - m;
    q0 = at::vec::fmadd(a, a, q0);
    d0 += a;
  }
  if (i < n) {
    // Masked-off lanes load 0; zero them after subtracting the mean.
    const AV a = AV::set(AV(A(0)), IO::load(p + i, n - i) - m, n - i);
    q1 = at::vec::fmadd(a, a, q1);
    d1 += a;
  }
  dsum = hsum<A>(d0 + d1);
  m2 = clamp0_keep_nan<A>(hsum<A>(q0 + q1) - dsum * dsum / A(n));
}

// out = x * g (+ r), rounded once.
template <typename T>
inline void scale_row(const T* x, const T* r, T* out, int64_t n, at::opmath_type<T> g) {
  using IO = VecIO<T>;
  using AV = typename IO::AV;
  constexpr int64_t W = IO::W;
  const AV vg(g);
  int64_t i = 0;
  if (r != nullptr) {
    for (; i + W <= n; i += W) IO::store(out + i, at::vec::fmadd(IO::load(x + i), vg, IO::load(r + i)));
    if (i < n) IO::store(out + i, at::vec::fmadd(IO::load(x + i, n - i), vg, IO::load(r + i, n - i)), n - i);
  } else {
    for (; i + W <= n; i += W) IO::store(out + i, IO::load(x + i) * vg);
    if (i < n) IO::store(out + i, IO::load(x + i, n - i) * vg, n - i);
  }
}

// gx = go * g + alpha (+ (x - mean) * beta when kStd)
template <bool kStd, typename T>
inline void grad_row(const T* go, const T* x, T* gx, int64_t n, at::opmath_type<T> g,
                     at::opmath_type<T> alpha, at::opmath_type<T> beta, at::opmath_type<T> mean) {
  using IO = VecIO<T>;
  using AV = typename IO::AV;
  constexpr int64_t W = IO::W;
  const AV vg(g), va(alpha), vb(beta), vm(mean);
  auto f = [&](const AV& vgo, const AV& vx) {
    if constexpr (kStd) {
      return at::vec::fmadd(vgo, vg, at::vec::fmadd(vx - vm, vb, va));
    } else {
      (void)vx;
      return at::vec::fmadd(vgo, vg, va);
    }
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) IO::store(gx + i, f(IO::load(go + i), kStd ? IO::load(x + i) : AV()));
  if (i < n) IO::store(gx + i, f(IO::load(go + i, n - i), kStd ? IO::load(x + i, n - i) : AV()), n - i);
}

// ------------------------------------------------------------------ NHWC pixel kernels (C contiguous)

// acc[c] = sum over the chunk's pixels of x[p, c]; chunk of np pixels starting at x.
template <typename T>
inline void sum_pixels(const T* x, int64_t np, int64_t C, at::opmath_type<T>* acc) {
  using A = at::opmath_type<T>;
  std::fill(acc, acc + C, A(0));
  for (int64_t p = 0; p < np; ++p) {
    const T* xp = x + p * C;
    over_channels<T>(C, [&](int64_t c, int64_t cnt) {
      astore_n<A>(acc + c, aload_n<A>(acc + c, cnt) + load_n<T>(xp + c, cnt), cnt);
    });
  }
}

// Per channel, as sqdev_row: m2[c] (corrected) and dsum[c] over the chunk's pixels.
template <typename T>
inline void sqdev_pixels(const T* x, int64_t np, int64_t C, const at::opmath_type<T>* mean,
                         at::opmath_type<T>* m2, at::opmath_type<T>* dsum) {
  using A = at::opmath_type<T>;
  std::fill(m2, m2 + C, A(0));
  std::fill(dsum, dsum + C, A(0));
  for (int64_t p = 0; p < np; ++p) {
    const T* xp = x + p * C;
    over_channels<T>(C, [&](int64_t c, int64_t cnt) {
      const auto d = load_n<T>(xp + c, cnt) - aload_n<A>(mean + c, cnt);
      astore_n<A>(m2 + c, at::vec::fmadd(d, d, aload_n<A>(m2 + c, cnt)), cnt);
      astore_n<A>(dsum + c, aload_n<A>(dsum + c, cnt) + d, cnt);
    });
  }
  for (int64_t c = 0; c < C; ++c) m2[c] = clamp0_keep_nan<A>(m2[c] - dsum[c] * dsum[c] / A(np));
}

template <typename T>
inline void dot_pixels(const T* a, const T* b, int64_t np, int64_t C, at::opmath_type<T>* acc) {
  using A = at::opmath_type<T>;
  std::fill(acc, acc + C, A(0));
  for (int64_t p = 0; p < np; ++p) {
    const T* ap = a + p * C;
    const T* bp = b + p * C;
    over_channels<T>(C, [&](int64_t c, int64_t cnt) {
      astore_n<A>(acc + c, at::vec::fmadd(load_n<T>(ap + c, cnt), load_n<T>(bp + c, cnt), aload_n<A>(acc + c, cnt)),
                  cnt);
    });
  }
}

template <typename T>
inline void scale_pixels(const T* x, const T* r, T* out, int64_t np, int64_t C, const at::opmath_type<T>* g) {
  using A = at::opmath_type<T>;
  for (int64_t p = 0; p < np; ++p) {
    const int64_t o = p * C;
    if (r != nullptr) {
      over_channels<T>(C, [&](int64_t c, int64_t cnt) {
        const auto v = at::vec::fmadd(load_n<T>(x + o + c, cnt), aload_n<A>(g + c, cnt), load_n<T>(r + o + c, cnt));
        store_n<T>(out + o + c, v, cnt);
      });
    } else {
      over_channels<T>(C, [&](int64_t c, int64_t cnt) {
        store_n<T>(out + o + c, load_n<T>(x + o + c, cnt) * aload_n<A>(g + c, cnt), cnt);
      });
    }
  }
}

template <bool kStd, typename T>
inline void grad_pixels(const T* go, const T* x, T* gx, int64_t np, int64_t C, const at::opmath_type<T>* g,
                        const at::opmath_type<T>* alpha, const at::opmath_type<T>* beta,
                        const at::opmath_type<T>* mean) {
  using A = at::opmath_type<T>;
  for (int64_t p = 0; p < np; ++p) {
    const int64_t o = p * C;
    over_channels<T>(C, [&](int64_t c, int64_t cnt) {
      auto v = aload_n<A>(alpha + c, cnt);
      if constexpr (kStd) {
        v = at::vec::fmadd(load_n<T>(x + o + c, cnt) - aload_n<A>(mean + c, cnt), aload_n<A>(beta + c, cnt), v);
      }
      store_n<T>(gx + o + c, at::vec::fmadd(load_n<T>(go + o + c, cnt), aload_n<A>(g + c, cnt), v), cnt);
    });
  }
}

// ------------------------------------------------------------------ per-sample pooling

// Per-channel mean (and population std) of one sample, from fixed chunks combined in index order.
// "avg": mean = (sum of chunk sums) / HW.
// "avg+std": each chunk is read twice while cache-resident (sqdev_row) giving its rounded mean mc_k, the
// small correction e_k = dsum_k / n_k and its M2_k. The merge works on deviations from a pivot
// (mc_0), which are small numbers computed exactly (mc_k - mc_0 is exact for nearby floats), so neither the
// mean nor M2 = sum_k [M2_k + n_k d_k^2] (minus the corrected two-pass term) suffers cancellation even when
// |mean| >> std. Never E[x^2] - E[x]^2.
template <typename T>
void pool_sample(const T* xn, const Chunking& ch, bool with_std, at::opmath_type<T>* mean,
                 at::opmath_type<T>* stdv) {
  using A = at::opmath_type<T>;
  const int64_t C = ch.C, HW = ch.HW, nk = ch.nk;
  // NCHW: [C, nk]; NHWC: [nk, C]. psum holds chunk sums ("avg") or chunk means ("avg+std").
  std::vector<A> psum(nk * C), pe(with_std ? nk * C : 0), pm2(with_std ? nk * C : 0);
  ch.parallel(
      [&](int64_t i, int64_t, int64_t k, int64_t o) {
        const int64_t len = ch.len(k);
        const T* p = xn + o;
        const A s = sum_row<T>(p, len);
        if (with_std) {
          const A mc = s / A(len);
          A dsum;
          sqdev_row<T>(p, len, mc, pm2[i], dsum);
          psum[i] = mc;
          pe[i] = dsum / A(len);
        } else {
          psum[i] = s;
        }
      },
      [&](int64_t k, int64_t o) {
        const int64_t len = ch.len(k);
        const T* p = xn + o;
        A* s = psum.data() + k * C;
        sum_pixels<T>(p, len, C, s);
        if (with_std) {
          A* pek = pe.data() + k * C;
          for (int64_t c = 0; c < C; ++c) s[c] = s[c] / A(len);
          sqdev_pixels<T>(p, len, C, s, pm2.data() + k * C, pek);
          for (int64_t c = 0; c < C; ++c) pek[c] = pek[c] / A(len);
        }
      });
  const int64_t cs = ch.cs, ks = ch.ks;
  for (int64_t c = 0; c < C; ++c) {
    if (!with_std) {
      A s = A(0);
      for (int64_t k = 0; k < nk; ++k) s += psum[c * cs + k * ks];
      mean[c] = s / A(HW);
      continue;
    }
    const A pivot = psum[c * cs];
    A sd = A(0);
    for (int64_t k = 0; k < nk; ++k) {
      const int64_t i = c * cs + k * ks;
      sd += A(ch.len(k)) * ((psum[i] - pivot) + pe[i]);
    }
    const A delta = sd / A(HW);  // mean - pivot
    A m2 = A(0), corr = A(0);
    for (int64_t k = 0; k < nk; ++k) {
      const int64_t i = c * cs + k * ks;
      const A len = A(ch.len(k));
      const A d = ((psum[i] - pivot) + pe[i]) - delta;  // chunk mean - mean
      m2 += pm2[i] + len * d * d;
      corr += len * d;
    }
    mean[c] = pivot + delta;
    // A NaN or +-Inf in the channel makes m2 NaN (x - mean is NaN or Inf - Inf): std is NaN, as torch.std
    // (docs/ops.md, NaN and Inf); the clamps on the way keep NaN.
    stdv[c] = std::sqrt(clamp0_keep_nan<A>(m2 - corr * corr / A(HW)) / A(HW));
  }
}

// ------------------------------------------------------------------ forward

// Checks of the MLP weights against x, shared by the forward, its _out variant and the backward; returns Cr.
int64_t check_weights(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                      const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                      const c10::optional<at::Tensor>& act_weight, const char* op) {
  const int64_t C = x.size(1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, op, ": w1 must be [Cr, C=", C, "], got ", w1.sizes());
  const int64_t Cr = w1.size(0);
  check_param(w1, x, {Cr, C}, op, "w1");
  check_param(w2, x, {C, Cr}, op, "w2");
  if (b1.has_value()) check_param(*b1, x, {Cr}, op, "b1");
  if (b2.has_value()) check_param(*b2, x, {C}, op, "b2");
  if (act_weight.has_value()) check_slope(*act_weight, x, Cr, op, "act_weight");
  return Cr;
}

// The forward of both entry points: x (native layout), r (undefined or in x's layout) -> out (x's shape and
// layout, may be r itself), stats ([N, P, C] acc, or undefined: then kept per sample and dropped).
// out may alias r: every element is read from r by the same vector step that writes it to out, and samples /
// chunks never overlap, so the in-place residual add reads each residual value before it is overwritten.
void forward_into(const at::Tensor& x, Layout layout, const at::Tensor& r, const at::Tensor& out,
                  const at::Tensor& stats, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                  const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                  const c10::optional<at::Tensor>& act_weight, bool with_std) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), Cr = w1.size(0);
  const int64_t P = with_std ? 2 : 1;
  if (N == 0 || C == 0) return;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "channel_attention_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const Mlp<A> mlp = Mlp<A>::template make<T>(w1, b1, w2, b2, act_weight);
    const Chunking ch(layout, C, HW);
    A* pst = stats.defined() ? stats.data_ptr<A>() : nullptr;

    for_each_sample_io<T>(x, r, out, [&](int64_t n, const T* xn, const T* rn, T* on) {
      std::vector<A> local(pst != nullptr ? 0 : P * C);
      A* mean = pst != nullptr ? pst + n * P * C : local.data();
      A* stdv = with_std ? mean + C : nullptr;
      pool_sample<T>(xn, ch, with_std, mean, stdv);

      std::vector<A> s(C), h(Cr), a(Cr), g(C);
      for (int64_t c = 0; c < C; ++c) s[c] = with_std ? mean[c] + stdv[c] : mean[c];
      mlp.forward(s.data(), h.data(), a.data(), g.data());

      // Scale while the sample is cache-resident (same chunking as the pool pass).
      ch.parallel(
          [&](int64_t, int64_t c, int64_t k, int64_t o) {
            scale_row<T>(xn + o, rn != nullptr ? rn + o : nullptr, on + o, ch.len(k), g[c]);
          },
          [&](int64_t k, int64_t o) {
            scale_pixels<T>(xn + o, rn != nullptr ? rn + o : nullptr, on + o, ch.len(k), C, g.data());
          });
    });
  });
}

// The forward, and channel_attention_out when out is defined (OutVariant): out written, nothing returned.
std::tuple<at::Tensor, at::Tensor> channel_attention_cpu(const at::Tensor& out, const at::Tensor& x_in,
                                                         const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                                                         const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                                                         const c10::optional<at::Tensor>& residual,
                                                         const c10::optional<at::Tensor>& act_weight,
                                                         c10::string_view pool) {
  const char* op = out.defined() ? kOp.out : kOp.fwd;
  check_x(x_in, op);
  check_weights(x_in, w1, b1, w2, b2, act_weight, op);
  const bool with_std = parse_pool(pool, op);
  at::Tensor stats;
  at::Tensor y = attention_forward(out, x_in, residual, op, [&](const at::Tensor& x, Layout layout, const at::Tensor& r,
                                                                const at::Tensor& dst, bool keep) {
    if (keep) {
      stats = at::empty({x.size(0), with_std ? 2 : 1, x.size(1)}, x.options().dtype(at::toOpMathType(x.scalar_type())));
    }
    forward_into(x, layout, r, dst, stats, w1, b1, w2, b2, act_weight, with_std);
  });
  return {y, stats};
}
using ChannelAttention = OutVariant<&channel_attention_cpu>;

// ------------------------------------------------------------------ backward

template <bool kStd, typename T>
void ca_backward_sample(const T* gon, const T* xn, T* gxn, const Chunking& ch, const at::opmath_type<T>* mean,
                        const at::opmath_type<T>* stdv, const Mlp<at::opmath_type<T>>& mlp,
                        MlpGradRows<at::opmath_type<T>>& rows, int64_t n) {
  using A = at::opmath_type<T>;
  const int64_t C = ch.C, HW = ch.HW, nk = ch.nk, Cr = mlp.Cr;
  A* s = rows.s.data() + n * C;
  A* a = rows.a.data() + n * Cr;
  std::vector<A> h(Cr), g(C), dg(C), ds(C), alpha(C), beta(kStd ? C : 0);
  for (int64_t c = 0; c < C; ++c) s[c] = kStd ? mean[c] + stdv[c] : mean[c];
  mlp.forward(s, h.data(), a, g.data());

  // dg[c] = sum_p grad_out * x: chunk partials combined in index order.
  std::vector<A> part(nk * C);
  ch.parallel(
      [&](int64_t i, int64_t, int64_t k, int64_t o) { part[i] = dot_row<T>(gon + o, xn + o, ch.len(k)); },
      [&](int64_t k, int64_t o) { dot_pixels<T>(gon + o, xn + o, ch.len(k), C, part.data() + k * C); });
  for (int64_t c = 0; c < C; ++c) {
    A acc = A(0);
    for (int64_t k = 0; k < nk; ++k) acc += part[c * ch.cs + k * ch.ks];
    dg[c] = acc;
  }

  mlp.backward(h.data(), g.data(), dg.data(), rows.dz.data() + n * C, rows.dh.data() + n * Cr,
               rows.dslope.data() + n * Cr, ds.data());

  // d mean / dx = 1/HW; d std / dx = (x - mean) / (HW std), taken as 0 where std == 0.
  const A inv_hw = A(1) / A(HW);
  for (int64_t c = 0; c < C; ++c) {
    alpha[c] = ds[c] * inv_hw;
    if constexpr (kStd) beta[c] = stdv[c] == A(0) ? A(0) : ds[c] / (A(HW) * stdv[c]);  // NaN std -> NaN
  }

  ch.parallel(
      [&](int64_t, int64_t c, int64_t k, int64_t o) {
        grad_row<kStd, T>(gon + o, xn + o, gxn + o, ch.len(k), g[c], alpha[c], kStd ? beta[c] : A(0), mean[c]);
      },
      [&](int64_t k, int64_t o) {
        grad_pixels<kStd, T>(gon + o, xn + o, gxn + o, ch.len(k), C, g.data(), alpha.data(), beta.data(), mean);
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& stats_in, const at::Tensor& w1,
    const c10::optional<at::Tensor>& b1, const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
    const c10::optional<at::Tensor>& act_weight, c10::string_view pool) {
  check_x(x_in, kOp.bw);
  const bool with_std = parse_pool(pool, kOp.bw);
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  const int64_t Cr = check_weights(x_in, w1, b1, w2, b2, act_weight, kOp.bw);
  const int64_t P = with_std ? 2 : 1;
  const auto acc_type = at::toOpMathType(x_in.scalar_type());
  TORCH_CHECK(stats_in.sizes() == at::IntArrayRef({N, P, C}), kOp.bw, ": stats must be [N, ", P, ", C] = [", N,
              ", ", P, ", ", C, "] for pool \"", std::string(pool), "\", got ", stats_in.sizes());
  TORCH_CHECK(stats_in.scalar_type() == acc_type, kOp.bw, ": stats must have dtype ", acc_type, ", got ",
              stats_in.scalar_type());

  at::Tensor x = x_in;
  const Layout layout = prepare_input(x);
  const at::Tensor go = match_layout(grad_out_in, x, layout, kOp.bw, "grad_out");
  const at::Tensor stats = stats_in.contiguous();

  at::Tensor gx = empty_output_like(x);
  at::Tensor gw1 = at::empty({Cr, C}, w1.options());
  at::Tensor gw2 = at::empty({C, Cr}, w2.options());
  at::Tensor gb1 = b1.has_value() ? at::empty({Cr}, w1.options()) : at::empty({0}, w1.options());
  at::Tensor gb2 = b2.has_value() ? at::empty({C}, w1.options()) : at::empty({0}, w1.options());
  at::Tensor gaw = act_weight.has_value() ? at::empty(act_weight->sizes(), w1.options()) : at::empty({0}, w1.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "channel_attention_backward_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const Mlp<A> mlp = Mlp<A>::template make<T>(w1, b1, w2, b2, act_weight);
    MlpGradRows<A> rows(N, C, Cr);
    if (N > 0 && C > 0) {
      const Chunking ch(layout, C, HW);
      const T* pgo = go.const_data_ptr<T>();
      const T* px = x.const_data_ptr<T>();
      T* pgx = gx.data_ptr<T>();
      const A* pst = stats.const_data_ptr<A>();
      for_each_sample(N, [&](int64_t n) {
        const int64_t off = n * C * HW;
        const A* mean = pst + n * P * C;
        if (with_std) {
          ca_backward_sample<true, T>(pgo + off, px + off, pgx + off, ch, mean, mean + C, mlp, rows, n);
        } else {
          ca_backward_sample<false, T>(pgo + off, px + off, pgx + off, ch, mean, nullptr, mlp, rows, n);
        }
      });
    }
    // With N == 0 (or C == 0) the rows are empty and every weight grad comes out as zeros.
    reduce_mlp_grads<T, A>(rows, gw1, b1.has_value() ? &gb1 : nullptr, gw2, b2.has_value() ? &gb2 : nullptr,
                           act_weight.has_value() ? &gaw : nullptr);
  });
  return {gx, gw1, gb1, gw2, gb2, gaw};
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace srkernels::cpu

SRK_CPU_OP_WITH_OUT(channel_attention, ChannelAttention)
SRK_CPU_OP(channel_attention_backward, channel_attention_backward_cpu)
