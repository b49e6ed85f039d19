// pixel_shuffle / pixel_unshuffle on CPU: the upsampler's conv epilogue (bias, activation, sub-pixel
// rearrangement, residual add) in one pass over memory. Contract: docs/ops.md "pixel_shuffle".
//
// Bytes moved: forward reads x (+ residual) and writes out once; eager bias + shuffle + add takes 3 passes
// more, and ATen's shuffle itself runs far below copy speed on CPU. NCHW: each output row interleaves r
// input rows (vector interleave for r == 2); NHWC: each output pixel gathers C values at stride r*r from one
// input pixel that stays in L1.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "attention_common.h"

namespace srkernels::cpu {
namespace {

enum class Act { None, Relu, Prelu };

Act parse_act(c10::string_view act) {
  if (act == "none") return Act::None;
  if (act == "relu") return Act::Relu;
  TORCH_CHECK(act == "prelu", "pixel_shuffle: act must be none, relu or prelu, got ", act);
  return Act::Prelu;
}

template <typename A>
inline A activate(A v, Act act, A slope) {
  if (act == Act::Relu) return v > A(0) ? v : A(0);
  if (act == Act::Prelu) return v > A(0) ? v : slope * v;
  return v;
}

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

// ---- forward ------------------------------------------------------------------------------------------

template <typename T>
void shuffle_nchw(const T* x, T* out, const T* res, const Geometry& g, const at::opmath_type<T>* bias,
                  const at::opmath_type<T>* slope, Act act) {
  using A = at::opmath_type<T>;
  using IO = VecIO<T>;
  using AV = Vectorized<A>;
  constexpr int64_t V = IO::W;
  const int64_t r = g.r, H = g.H, W = g.W, Wr = W * r, Cin = g.Cin();
  at::parallel_for(0, g.N * g.C * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, W * r * r)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / (g.C * H), c = (idx / H) % g.C, h = idx % H;
      const A s = slope ? slope[c] : A(0);
      for (int64_t i = 0; i < r; ++i) {
        const int64_t orow = ((n * g.C + c) * H * r + h * r + i) * Wr;
        T* o = out + orow;
        const T* rr = res ? res + orow : nullptr;
        const int64_t k0 = c * r * r + i * r;
        auto src = [&](int64_t j) { return x + ((n * Cin + k0 + j) * H + h) * W; };
        auto b = [&](int64_t j) { return bias ? bias[k0 + j] : A(0); };
        int64_t w = 0;
        if (r == 2) {  // two input rows -> one output row: vector interleave
          const T* s0 = src(0);
          const T* s1 = src(1);
          const AV b0(b(0)), b1(b(1)), vs(s);
          for (; w + V <= W; w += V) {
            AV a0 = activate(IO::load(s0 + w) + b0, act, vs);
            AV a1 = activate(IO::load(s1 + w) + b1, act, vs);
            auto [lo, hi] = at::vec::interleave2<A>(a0, a1);
            if (rr) {
              lo = lo + IO::load(rr + 2 * w);
              hi = hi + IO::load(rr + 2 * w + V);
            }
            IO::store(o + 2 * w, lo);
            IO::store(o + 2 * w + V, hi);
          }
        } else if (r == 1) {
          const T* s0 = src(0);
          const AV b0(b(0)), vs(s);
          for (; w + V <= W; w += V) {
            AV a = activate(IO::load(s0 + w) + b0, act, vs);
            if (rr) a = a + IO::load(rr + w);
            IO::store(o + w, a);
          }
        }
        for (int64_t j = 0; j < r; ++j) {  // general r, and the tails of r <= 2
          const T* sj = src(j);
          const A bj = b(j);
          for (int64_t ww = w; ww < W; ++ww) {
            A v = activate(static_cast<A>(sj[ww]) + bj, act, s);
            if (rr) v += static_cast<A>(rr[ww * r + j]);
            o[ww * r + j] = static_cast<T>(v);
          }
        }
      }
    }
  });
}

template <typename T>
void shuffle_nhwc(const T* x, T* out, const T* res, const Geometry& g, const at::opmath_type<T>* bias,
                  const at::opmath_type<T>* slope, Act act) {
  using A = at::opmath_type<T>;
  const int64_t r = g.r, rr2 = r * r, H = g.H, W = g.W, C = g.C, Cin = g.Cin();
  at::parallel_for(0, g.N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / H, h = idx % H;
      for (int64_t i = 0; i < r; ++i) {
        const int64_t orow = ((n * H * r + h * r + i) * W * r) * C;
        for (int64_t w = 0; w < W; ++w) {
          const T* xp = x + ((n * H + h) * W + w) * Cin;
          for (int64_t j = 0; j < r; ++j) {
            const int64_t s0 = i * r + j, opix = orow + (w * r + j) * C;
            T* o = out + opix;
            const T* rp = res ? res + opix : nullptr;
            for (int64_t c = 0; c < C; ++c) {  // gather at stride r*r from an L1-resident input pixel
              const int64_t k = c * rr2 + s0;
              A v = activate(static_cast<A>(xp[k]) + (bias ? bias[k] : A(0)), act, slope ? slope[c] : A(0));
              if (rp) v += static_cast<A>(rp[c]);
              o[c] = static_cast<T>(v);
            }
          }
        }
      }
    }
  });
}

// Validates and writes the forward into `out` (which must have x's converted layout and the output shape).
void forward_into(at::Tensor x, int64_t r, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& act_weight, Act act, const std::optional<at::Tensor>& residual,
                  at::Tensor& out, Layout layout) {
  const Geometry g{x.size(0), x.size(1) / (r * r), x.size(2), x.size(3), r};
  const at::Tensor res = residual ? match_layout(*residual, out, layout, "pixel_shuffle", "residual") : at::Tensor();
  if (g.N == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pixel_shuffle_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<A> b, s;
    if (bias) b = to_acc<scalar_t>(*bias);
    if (act == Act::Prelu) s = to_acc<scalar_t>(*act_weight);
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    auto fn = layout == Layout::NCHW ? shuffle_nchw<scalar_t> : shuffle_nhwc<scalar_t>;
    fn(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rp, g, bias ? b.data() : nullptr,
       act == Act::Prelu ? s.data() : nullptr, act);
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

at::Tensor pixel_shuffle_cpu(const at::Tensor& x_in, int64_t r, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& act_weight, c10::string_view act_s,
                             const std::optional<at::Tensor>& residual) {
  const Act act = parse_act(act_s);
  check_args(x_in, r, bias, act_weight, act);
  at::Tensor x = x_in;
  const Layout layout = prepare_input(x);
  at::Tensor out = at::empty({x.size(0), x.size(1) / (r * r), x.size(2) * r, x.size(3) * r},
                             x.options().memory_format(memory_format(layout)));
  forward_into(x, r, bias, act_weight, act, residual, out, layout);
  return out;
}

void pixel_shuffle_out_cpu(const at::Tensor& x_in, int64_t r, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& act_weight, c10::string_view act_s,
                           const std::optional<at::Tensor>& residual, at::Tensor out) {
  const Act act = parse_act(act_s);
  check_args(x_in, r, bias, act_weight, act);
  at::Tensor x = x_in;
  const Layout layout = prepare_input(x);
  const std::vector<int64_t> shape{x.size(0), x.size(1) / (r * r), x.size(2) * r, x.size(3) * r};
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape) && out.scalar_type() == x.scalar_type(),
              "pixel_shuffle_out: out must have shape ", at::IntArrayRef(shape), " and dtype ", x.scalar_type());
  if (out.is_contiguous(memory_format(layout))) {
    forward_into(x, r, bias, act_weight, act, residual, out, layout);
  } else {  // a caller buffer in another layout: compute natively, then one copy
    at::Tensor tmp = at::empty(shape, x.options().memory_format(memory_format(layout)));
    forward_into(x, r, bias, act_weight, act, residual, tmp, layout);
    out.copy_(tmp);
  }
}

// ---- backward / unshuffle -----------------------------------------------------------------------------
// gx[n, k, h, w] = act'(x + bias) * go[n, c, h*r + i, w*r + j]; per-(n, k) (NCHW) or per-(n, h) (NHWC)
// partial sums of gx (bias grad) and of go * pre where pre <= 0 (PReLU slope grad), merged in index order.

template <typename T>
void unshuffle_nchw(const T* go, const T* x, T* gx, const Geometry& g, const at::opmath_type<T>* bias,
                    const at::opmath_type<T>* slope, Act act, at::opmath_type<T>* bpart,
                    at::opmath_type<T>* apart) {
  using A = at::opmath_type<T>;
  const int64_t r = g.r, H = g.H, W = g.W, Wr = W * r, Cin = g.Cin();
  at::parallel_for(0, g.N * Cin, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / Cin, k = p % Cin, c = k / (r * r), i = (k % (r * r)) / r, j = k % r;
      const A bk = bias ? bias[k] : A(0), s = slope ? slope[c] : A(0);
      A bsum(0), asum(0);
      for (int64_t h = 0; h < H; ++h) {
        const T* gorow = go + ((n * g.C + c) * H * r + h * r + i) * Wr + j;
        const int64_t off = ((n * Cin + k) * H + h) * W;
        T* gxrow = gx + off;
        A rb(0), ra(0);
        for (int64_t w = 0; w < W; ++w) {
          A v = static_cast<A>(gorow[w * r]);
          if (act != Act::None) {
            const A pre = static_cast<A>(x[off + w]) + bk;
            if (pre <= A(0)) {
              ra += v * pre;
              v = act == Act::Relu ? A(0) : v * s;
            }
          }
          gxrow[w] = static_cast<T>(v);
          rb += v;
        }
        bsum += rb;
        asum += ra;
      }
      if (bpart) bpart[p] = bsum;
      if (apart) apart[p] = asum;
    }
  });
}

template <typename T>
void unshuffle_nhwc(const T* go, const T* x, T* gx, const Geometry& g, const at::opmath_type<T>* bias,
                    const at::opmath_type<T>* slope, Act act, at::opmath_type<T>* bpart,
                    at::opmath_type<T>* apart) {
  using A = at::opmath_type<T>;
  const int64_t r = g.r, rr2 = r * r, H = g.H, W = g.W, C = g.C, Cin = g.Cin();
  at::parallel_for(0, g.N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / H, h = idx % H;
      A* bp = bpart ? bpart + idx * Cin : nullptr;
      A* ap = apart ? apart + idx * Cin : nullptr;
      if (bp) std::fill(bp, bp + Cin, A(0));
      if (ap) std::fill(ap, ap + Cin, A(0));
      for (int64_t w = 0; w < W; ++w) {
        const int64_t off = ((n * H + h) * W + w) * Cin;
        T* gp = gx + off;
        for (int64_t i = 0; i < r; ++i) {
          for (int64_t j = 0; j < r; ++j) {
            const T* gop = go + ((n * H * r + h * r + i) * W * r + w * r + j) * C;
            const int64_t s0 = i * r + j;
            for (int64_t c = 0; c < C; ++c) {
              const int64_t k = c * rr2 + s0;
              A v = static_cast<A>(gop[c]);
              if (act != Act::None) {
                const A pre = static_cast<A>(x[off + k]) + (bias ? bias[k] : A(0));
                if (pre <= A(0)) {
                  if (ap) ap[k] += v * pre;
                  v = act == Act::Relu ? A(0) : v * slope[c];
                }
              }
              gp[k] = static_cast<T>(v);
              if (bp) bp[k] += v;
            }
          }
        }
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
  at::Tensor gx = at::empty({g.N, g.Cin(), g.H, g.W}, opts.memory_format(memory_format(layout)));
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
    auto fn = layout == Layout::NCHW ? unshuffle_nchw<scalar_t> : unshuffle_nhwc<scalar_t>;
    fn(go.const_data_ptr<scalar_t>(), x.defined() ? x.const_data_ptr<scalar_t>() : nullptr,
       gx.mutable_data_ptr<scalar_t>(), g, bias ? b.data() : nullptr, act == Act::Prelu ? s.data() : nullptr, act,
       bias ? bpart.data() : nullptr, act == Act::Prelu ? apart.data() : nullptr);
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
}  // namespace srkernels::cpu

TORCH_LIBRARY_IMPL(srkernels, CPU, m) {
  m.impl("pixel_shuffle", &srkernels::cpu::pixel_shuffle_cpu);
  m.impl("pixel_shuffle_backward", &srkernels::cpu::pixel_shuffle_backward_cpu);
  m.impl("pixel_shuffle_out", &srkernels::cpu::pixel_shuffle_out_cpu);
  m.impl("pixel_unshuffle", &srkernels::cpu::pixel_unshuffle_cpu);
}
