// Shared pieces of the CPU attention kernels (channel_attention, balanced_attention): layout handling,
// acc-type vector load/store for every dtype, deterministic reductions, and the per-sample MLP
// (forward, backward, ordered batch reduction of its weight gradients). Contracts: docs/ops.md.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "runtime/output_cache.h"
#include "cpu/vec_io.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace srkernels::cpu {
inline namespace CPU_CAPABILITY {  // one copy per compiled capability (runtime/cpu_dispatch.h)

using at::vec::Vectorized;

// The names an op's errors are reported under: the op, its backward and its _out variant (the dispatcher's
// names, srkernels/ops/_registry.py).
struct OpNames {
  const char* fwd;
  const char* bw;
  const char* out;
};
#define SRK_OP_NAMES(op) (::srkernels::cpu::OpNames{#op, #op "_backward", #op "_out"})

// ---------------------------------------------------------------------------------------------------------
// Layout

enum class Layout { NCHW, NHWC };

inline c10::MemoryFormat memory_format(Layout l) {
  return l == Layout::NCHW ? c10::MemoryFormat::Contiguous : c10::MemoryFormat::ChannelsLast;
}

// Native paths exist for NCHW-contiguous and channels_last; anything else is converted first.
inline Layout prepare_input(at::Tensor& x) {
  if (x.is_contiguous()) return Layout::NCHW;
  if (x.is_contiguous(c10::MemoryFormat::ChannelsLast)) return Layout::NHWC;
  x = x.contiguous(x.suggest_memory_format());
  return x.is_contiguous() ? Layout::NCHW : Layout::NHWC;
}

// Brings a tensor that pairs elementwise with x (residual, grad_out) into x's memory layout.
inline at::Tensor match_layout(const at::Tensor& t, const at::Tensor& x, Layout l, const char* op,
                               const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of x ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  const auto fmt = memory_format(l);
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

// match_layout for an optional operand (the residual); undefined when absent.
inline at::Tensor match_layout(const c10::optional<at::Tensor>& t, const at::Tensor& x, Layout l, const char* op,
                               const char* name) {
  return t.has_value() ? match_layout(*t, x, l, op, name) : at::Tensor();
}

// The end of every <op>_out variant: fwd(dst) computes the result in x's native layout `layout`. dst is the
// caller's `out` when it already has that layout; otherwise a native temporary from make_tmp(), copied into
// `out` afterwards (one more pass), so the kernels only ever write their native layout.
template <typename MakeTmp, typename Fwd>
inline void forward_out(const at::Tensor& out, Layout layout, const MakeTmp& make_tmp, const Fwd& fwd) {
  if (out.is_contiguous(memory_format(layout))) {
    fwd(out);
  } else {
    const at::Tensor tmp = make_tmp();
    fwd(tmp);
    out.copy_(tmp);
  }
}

inline void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU kernel called with a ", x.device(), " tensor");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) == 0 || x.size(2) * x.size(3) > 0, op, ": H*W must be > 0 (the pooled mean of an ",
              "empty plane is undefined), got H=", x.size(2), " W=", x.size(3));
}

// The caller's buffer of an <op>_out variant: x's shape, dtype and device, and no memory shared with x (the
// kernel reads x after writing parts of out). out may be residual itself.
inline void check_out(const at::Tensor& out, const at::Tensor& x, const char* op) {
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": out must have the shape of x ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out must have dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  TORCH_CHECK(out.device() == x.device(), op, ": out must be on ", x.device(), ", got ", out.device());
  const auto overlap = at::get_overlap_status(out, x);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
              ": out must not overlap x");
}

// An attention forward after its argument checks, for the op (out undefined) and its _out variant: x_in in its
// native layout, the residual in that layout, then run(x, layout, r, dst, keep) writes the output into dst:
// a new tensor, returned (keep: the op also returns the saved statistics), or the caller's out (forward_out).
template <typename Run>
inline at::Tensor attention_forward(const at::Tensor& out, const at::Tensor& x_in,
                                    const c10::optional<at::Tensor>& residual, const char* op, const Run& run) {
  if (out.defined()) check_out(out, x_in, op);
  at::Tensor x = x_in;
  const Layout layout = prepare_input(x);
  const at::Tensor r = match_layout(residual, x, layout, op, "residual");
  if (out.defined()) {
    forward_out(out, layout, [&] { return empty_output_like(x); },
                [&](const at::Tensor& dst) { run(x, layout, r, dst, false); });
    return at::Tensor();
  }
  at::Tensor y = empty_output_like(x);
  run(x, layout, r, y, true);
  return y;
}

inline void check_param(const at::Tensor& w, const at::Tensor& x, at::IntArrayRef sizes, const char* op,
                        const char* name) {
  TORCH_CHECK(w.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ", x.scalar_type(),
              " (same as x), got ", w.scalar_type());
  TORCH_CHECK(w.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", w.device());
}

// PReLU slopes: [Cr] (one per hidden unit) or a single shared slope [1].
inline void check_slope(const at::Tensor& w, const at::Tensor& x, int64_t Cr, const char* op, const char* name) {
  TORCH_CHECK(w.dim() == 1 && (w.size(0) == Cr || w.size(0) == 1), op, ": ", name, " must have shape [", Cr,
              "] (or [1] for one shared slope), got ", w.sizes());
  check_param(w, x, w.sizes(), op, name);
}

// Runs body(n) for every sample. Per-sample cache blocking (sample n pooled, gated and scaled while it is
// L2-resident) wants whole samples per thread: the largest multiple of the thread count is spread over the
// threads, one contiguous run each; the remaining samples (all of them when N < threads) run one after
// another with the work inside each sample split across threads (body's own at::parallel_for calls; they
// run inline when nested). Both ways run the same per-item code in the same order, so results do not
// depend on the thread count.
template <typename F>
inline void for_each_sample(int64_t N, const F& body) {
  const int64_t T = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t whole = T > 1 ? (N / T) * T : 0;
  if (whole > 0) {
    at::parallel_for(0, whole, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) body(n);
    });
  }
  for (int64_t n = whole; n < N; ++n) body(n);
}

// The forward's sample loop: body(n, xn, rn, on) for every sample n (for_each_sample) with its runs of x,
// the residual r (nullptr when r is undefined) and out, all three [N, C, H, W] in x's layout.
template <typename T, typename F>
inline void for_each_sample_io(const at::Tensor& x, const at::Tensor& r, const at::Tensor& out, const F& body) {
  const int64_t S = x.size(1) * x.size(2) * x.size(3);
  const T* px = x.const_data_ptr<T>();
  const T* pr = r.defined() ? r.const_data_ptr<T>() : nullptr;
  T* po = out.data_ptr<T>();
  for_each_sample(x.size(0), [&](int64_t n) {
    const int64_t off = n * S;
    body(n, px + off, pr != nullptr ? pr + off : nullptr, po + off);
  });
}

template <typename A>
inline Vectorized<A> aload_n(const A* p, int64_t cnt) {
  return cnt == Vectorized<A>::size() ? Vectorized<A>::loadu(p) : Vectorized<A>::loadu(p, cnt);
}
template <typename A>
inline void astore_n(A* p, const Vectorized<A>& v, int64_t cnt) {
  if (cnt == Vectorized<A>::size()) {
    v.store(p);
  } else {
    v.store(p, cnt);
  }
}

// Fixed-order horizontal reductions (a fixed shuffle tree): deterministic.
template <typename A>
inline A hsum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return a + b; }, v);
}
template <typename A>
inline A hmax(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>(
      [](Vectorized<A>& a, Vectorized<A>& b) { return at::vec::maximum(a, b); }, v);
}
template <typename A>
inline A hmin(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>(
      [](Vectorized<A>& a, Vectorized<A>& b) { return at::vec::minimum(a, b); }, v);
}

// NaN-propagating scalar max (torch.max semantics).
template <typename A>
inline A max_nan(A a, A b) {
  return (a != a || a > b) ? a : b;
}

// max(v, 0) that keeps NaN (std::max(A(0), NaN) is 0): a NaN variance must stay NaN (docs/ops.md, NaN and Inf).
template <typename A>
inline A clamp0_keep_nan(A v) {
  return v < A(0) ? A(0) : v;
}

// "x attains the channel max" for the argmax of torch.max: equality, and NaN matches a NaN max.
template <typename A>
inline Vectorized<A> attains(const Vectorized<A>& x, const Vectorized<A>& m) {
  return (x == m) | ((x != x) & (m != m));
}

template <typename A>
inline A sigmoid(A z) {
  return A(1) / (A(1) + std::exp(-z));
}

// Fixed-order accumulation drivers over [0, n) in vector steps: step(i, cnt, acc) folds elements [i, i + cnt)
// into the vector accumulator acc, cnt == W except for one partial step at the end. Which accumulator takes
// which step decides the rounding, so every row reduction of one shape goes through the same driver.
// Two accumulators: pairs of whole vectors alternate s0 / s1, a last whole vector goes to s0, the tail to s1.
template <typename A, typename Step>
inline A reduce2(int64_t n, const Step& step) {
  using AV = Vectorized<A>;
  constexpr int64_t W = AV::size();
  AV s0(A(0)), s1(A(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    step(i, W, s0);
    step(i + W, W, s1);
  }
  for (; i + W <= n; i += W) step(i, W, s0);
  if (i < n) step(i, n - i, s1);
  return hsum<A>(s0 + s1);
}

// Four accumulators (long streaming rows): groups of four whole vectors go to s0..s3, then whole vectors to
// s0, the tail to s1; combined as (s0 + s1) + (s2 + s3).
template <typename A, typename Step>
inline A reduce4(int64_t n, const Step& step) {
  using AV = Vectorized<A>;
  constexpr int64_t W = AV::size();
  AV s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    step(i, W, s0);
    step(i + W, W, s1);
    step(i + 2 * W, W, s2);
    step(i + 3 * W, W, s3);
  }
  for (; i + W <= n; i += W) step(i, W, s0);
  if (i < n) step(i, n - i, s1);
  return hsum<A>((s0 + s1) + (s2 + s3));
}

template <typename A>
inline A dot(const A* a, const A* b, int64_t n) {
  return reduce2<A>(n, [&](int64_t i, int64_t cnt, Vectorized<A>& s) {
    s = at::vec::fmadd(aload_n<A>(a + i, cnt), aload_n<A>(b + i, cnt), s);
  });
}

// y[0:n] += alpha * x[0:n]
template <typename A>
inline void axpy(A alpha, const A* x, A* y, int64_t n) {
  using AV = Vectorized<A>;
  constexpr int64_t W = AV::size();
  const AV va(alpha);
  int64_t i = 0;
  for (; i + W <= n; i += W) at::vec::fmadd(va, AV::loadu(x + i), AV::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// Copies a small (weight) tensor into an acc-type vector, element order of its contiguous form.
template <typename T>
inline std::vector<at::opmath_type<T>> to_acc(const at::Tensor& t) {
  using A = at::opmath_type<T>;
  const at::Tensor c = t.contiguous();
  const T* p = c.const_data_ptr<T>();
  std::vector<A> v(c.numel());
  for (int64_t i = 0; i < c.numel(); ++i) v[i] = static_cast<A>(p[i]);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// Streaming kernels shared by both ops. Each uses a fixed accumulation order for a given length.

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// NHWC: a work item of both ops is a run of whole pixels, about kChunkNHWC elements (~64 KB of fp32, re-read
// from L2); large, so that the [items, C] partial buffers stay small for big images.
constexpr int64_t kChunkNHWC = 16384;
inline int64_t nhwc_chunk_pixels(int64_t C) { return std::max<int64_t>(1, kChunkNHWC / std::max<int64_t>(C, 1)); }

template <typename T>
inline at::opmath_type<T> sum_row(const T* p, int64_t n) {
  return reduce4<at::opmath_type<T>>(n, [&](int64_t i, int64_t cnt, typename VecIO<T>::AV& s) {
    s += load_n<T>(p + i, cnt);
  });
}

template <typename T>
inline at::opmath_type<T> dot_row(const T* a, const T* b, int64_t n) {
  return reduce4<at::opmath_type<T>>(n, [&](int64_t i, int64_t cnt, typename VecIO<T>::AV& s) {
    s = at::vec::fmadd(load_n<T>(a + i, cnt), load_n<T>(b + i, cnt), s);
  });
}

// f(c, cnt) over [0, C) in acc-vector steps; only the last step may be partial.
template <typename T, typename F>
inline void over_channels(int64_t C, const F& f) {
  constexpr int64_t W = VecIO<T>::W;
  int64_t c = 0;
  for (; c + W <= C; c += W) f(c, W);
  if (c < C) f(c, C - c);
}

// ---------------------------------------------------------------------------------------------------------
// The squeeze-excite MLP g = sigmoid(W2 act(W1 s + b1) + b2), C -> Cr -> C, in acc type.

template <typename A>
struct Mlp {
  int64_t C = 0, Cr = 0;
  std::vector<A> w1;     // [Cr, C]
  std::vector<A> w2t;    // [Cr, C]: W2 transposed so both products are unit-stride over C
  std::vector<A> b1;     // [Cr] or empty
  std::vector<A> b2;     // [C] or empty
  std::vector<A> slope;  // [Cr] PReLU slopes, or empty for ReLU

  template <typename T>
  static Mlp make(const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                  const c10::optional<at::Tensor>& b2, const c10::optional<at::Tensor>& slope) {
    Mlp m;
    m.Cr = w1.size(0);
    m.C = w1.size(1);
    m.w1 = to_acc<T>(w1);
    const std::vector<A> w2v = to_acc<T>(w2);
    m.w2t.resize(m.C * m.Cr);
    for (int64_t c = 0; c < m.C; ++c)
      for (int64_t j = 0; j < m.Cr; ++j) m.w2t[j * m.C + c] = w2v[c * m.Cr + j];
    if (b1.has_value()) m.b1 = to_acc<T>(*b1);
    if (b2.has_value()) m.b2 = to_acc<T>(*b2);
    if (slope.has_value()) {
      m.slope = to_acc<T>(*slope);
      if (m.slope.size() == 1) m.slope.assign(m.Cr, m.slope[0]);  // a single shared PReLU slope
    }
    return m;
  }

  // s [C] -> h [Cr] (pre-activation), a [Cr], g [C].
  void forward(const A* s, A* h, A* a, A* g) const {
    for (int64_t j = 0; j < Cr; ++j) {
      const A hj = dot<A>(w1.data() + j * C, s, C) + (b1.empty() ? A(0) : b1[j]);
      h[j] = hj;
      // NaN passes through, as in torch's relu/prelu.
      a[j] = hj > A(0) ? hj : (slope.empty() ? (hj != hj ? hj : A(0)) : slope[j] * hj);
    }
    if (b2.empty()) {
      std::fill(g, g + C, A(0));
    } else {
      std::copy(b2.begin(), b2.end(), g);
    }
    for (int64_t j = 0; j < Cr; ++j) axpy<A>(a[j], w2t.data() + j * C, g, C);
    for (int64_t c = 0; c < C; ++c) g[c] = sigmoid<A>(g[c]);
  }

  // Given g (from forward) and h, and dg = dL/dg [C]: writes dz [C] (into dg's storage is not allowed),
  // dh [Cr], dslope [Cr] (the per-sample PReLU slope gradient) and ds [C].
  void backward(const A* h, const A* g, const A* dg, A* dz, A* dh, A* dslope, A* ds) const {
    for (int64_t c = 0; c < C; ++c) dz[c] = dg[c] * g[c] * (A(1) - g[c]);
    for (int64_t j = 0; j < Cr; ++j) {
      const A da = dot<A>(w2t.data() + j * C, dz, C);
      // ATen's conventions at NaN: relu' is threshold_backward(grad, relu(h), 0) = (h <= 0 ? 0 : grad), so a
      // NaN h passes the gradient; prelu' takes the slope branch (h > 0 is false).
      const bool pos = h[j] > A(0);
      dh[j] = slope.empty() ? (h[j] <= A(0) ? A(0) : da) : (pos ? da : slope[j] * da);
      dslope[j] = pos ? A(0) : da * h[j];
    }
    std::fill(ds, ds + C, A(0));
    for (int64_t j = 0; j < Cr; ++j) axpy<A>(dh[j], w1.data() + j * C, ds, C);
  }
};

// Per-sample MLP backward results, kept for the ordered reduction over the batch.
template <typename A>
struct MlpGradRows {
  int64_t N, C, Cr;
  std::vector<A> s, a, dz, dh, dslope;  // [N,C], [N,Cr], [N,C], [N,Cr], [N,Cr]
  MlpGradRows(int64_t N_, int64_t C_, int64_t Cr_)
      : N(N_), C(C_), Cr(Cr_), s(N_ * C_), a(N_ * Cr_), dz(N_ * C_), dh(N_ * Cr_), dslope(N_ * Cr_) {}
};

// Sums the per-sample rows over n = 0..N-1 in order (independent of threads) and writes the weight grads
// in the weights' dtype. Undefined output tensors are skipped.
template <typename T, typename A>
inline void reduce_mlp_grads(const MlpGradRows<A>& r, at::Tensor& gw1, at::Tensor* gb1, at::Tensor& gw2,
                             at::Tensor* gb2, at::Tensor* gslope) {
  const int64_t N = r.N, C = r.C, Cr = r.Cr;
  std::vector<A> w1(Cr * C, A(0)), w2t(Cr * C, A(0)), b1(Cr, A(0)), b2(C, A(0)), sl(Cr, A(0));
  for (int64_t n = 0; n < N; ++n) {
    const A* s = r.s.data() + n * C;
    const A* dz = r.dz.data() + n * C;
    for (int64_t j = 0; j < Cr; ++j) {
      const A dh = r.dh[n * Cr + j];
      axpy<A>(dh, s, w1.data() + j * C, C);
      axpy<A>(r.a[n * Cr + j], dz, w2t.data() + j * C, C);
      b1[j] += dh;
      sl[j] += r.dslope[n * Cr + j];
    }
    for (int64_t c = 0; c < C; ++c) b2[c] += dz[c];
  }
  T* pw1 = gw1.data_ptr<T>();
  for (int64_t i = 0; i < Cr * C; ++i) pw1[i] = static_cast<T>(w1[i]);
  T* pw2 = gw2.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < Cr; ++j) pw2[c * Cr + j] = static_cast<T>(w2t[j * C + c]);
  if (gb1 != nullptr) {
    T* p = gb1->data_ptr<T>();
    for (int64_t j = 0; j < Cr; ++j) p[j] = static_cast<T>(b1[j]);
  }
  if (gb2 != nullptr) {
    T* p = gb2->data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<T>(b2[c]);
  }
  if (gslope != nullptr) {
    T* p = gslope->data_ptr<T>();
    if (gslope->numel() == Cr) {
      for (int64_t j = 0; j < Cr; ++j) p[j] = static_cast<T>(sl[j]);
    } else {  // one shared slope
      A t = A(0);
      for (int64_t j = 0; j < Cr; ++j) t += sl[j];
      p[0] = static_cast<T>(t);
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace srkernels::cpu
