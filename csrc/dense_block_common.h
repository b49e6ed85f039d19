// srkernels::dense_block, device-agnostic parts: the plan, the buffer geometry, and a reference
// implementation made of ATen GEMMs on views of the buffer (the CUDA kernel, and the CPU kernel for dtypes
// or shapes its micro-kernel path does not take). Contract: srkernels/ops/dense_block.py.
//
// Buffer: the [R, T] matrix of srkernels/dense_plan.py (one row per padded pixel, one column per channel;
// Geom below computes its rows). A conv tap (dy, dx) of a channel range is the same row-strided matrix
// shifted by dy*Wp + dx rows, so a kxk conv is k*k GEMMs
// on views and the concat never exists. Rows of border pixels are computed and zeroed (they are the padding
// the next layer reads).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>

#include <optional>
#include <tuple>
#include <vector>

// Included by the CPU kernel, compiled once per capability, and by CUDA host code: one copy of every inline
// function here per capability, so that no compile calls a copy built with ISA flags it may lack
// (runtime/cpu_dispatch.h).
#ifdef CPU_CAPABILITY
#define SRK_DENSE_ISA CPU_CAPABILITY
#else
#define SRK_DENSE_ISA host
#endif

namespace srkernels::dense {
inline namespace SRK_DENSE_ISA {

constexpr const char* kOp = "dense_block";
constexpr const char* kOpBw = "dense_block_backward";
// channels, in_channels, kernel_size, fuse_start, fuse_len, training (srkernels/dense_plan.py DensePlan.ints)
constexpr int64_t kHead = 6;
constexpr int64_t kLayer = 8;  // in_start, in_len, out_start, out_channels, out_split, out2_start, res_start, relu

struct Layer {
  int64_t in_start, in_len, out_start, out_split, out2_start, res_start, G;
  bool relu;
};

struct Plan {
  int64_t T, Cx, k, p, fuse_start, fuse_len;
  // The forward of a call autograd records (ops.dense_block sets it): the CPU kernel picks its Winograd tile
  // from SRKERNELS_WINOGRAD_TRAIN then (csrc/cpu/dense_block.cpp winograd_tile); other kernels ignore it.
  bool training;
  std::vector<Layer> layers;
};

// The flat plan of the schema, checked against the weights (Python checks it fully; these are the invariants
// the kernels rely on for memory safety).
inline Plan parse_plan(at::IntArrayRef v, at::TensorList weights, const char* op) {
  TORCH_CHECK(v.size() >= size_t(kHead) && (v.size() - kHead) % kLayer == 0, op, ": malformed plan of ", v.size(),
              " ints");
  Plan pl;
  pl.T = v[0];
  pl.Cx = v[1];
  pl.k = v[2];
  pl.p = pl.k / 2;
  pl.fuse_start = v[3];
  pl.fuse_len = v[4];
  TORCH_CHECK(v[5] == 0 || v[5] == 1, op, ": the plan's training flag must be 0 or 1, got ", v[5]);
  pl.training = v[5] != 0;
  const int64_t L = (int64_t(v.size()) - kHead) / kLayer;
  TORCH_CHECK(L >= 1 && L == int64_t(weights.size()), op, ": the plan has ", L, " layers, got ", weights.size(),
              " weights");
  TORCH_CHECK(pl.k >= 1 && pl.k % 2 == 1, op, ": kernel_size must be odd, got ", pl.k);
  TORCH_CHECK(pl.Cx > 0 && pl.Cx <= pl.T, op, ": bad in_channels ", pl.Cx, " for ", pl.T, " channels");
  auto in_buf = [&](int64_t s, int64_t n) { return s >= 0 && n > 0 && s + n <= pl.T; };
  TORCH_CHECK(in_buf(pl.fuse_start, pl.fuse_len), op, ": fusion range outside the buffer");
  for (const auto i : c10::irange(L)) {
    const int64_t* q = v.data() + kHead + i * kLayer;
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 4 && w.size(0) == q[3] && w.size(1) == q[1] && w.size(2) == pl.k && w.size(3) == pl.k, op,
                ": weights[", i, "] must be [", q[3], ", ", q[1], ", ", pl.k, ", ", pl.k, "], got ", w.sizes());
    Layer l{q[0], q[1], q[2], q[4], q[5], q[6], q[3], q[7] != 0};
    const bool second_ok = l.G == l.out_split || in_buf(l.out2_start, l.G - l.out_split);
    TORCH_CHECK(in_buf(l.in_start, l.in_len) && l.out_split > 0 && l.out_split <= l.G &&
                    in_buf(l.out_start, l.out_split) && second_ok && (l.res_start < 0 || in_buf(l.res_start, l.G)),
                op, ": layer ", i, " reads or writes outside the buffer");
    pl.layers.push_back(l);
  }
  return pl;
}

struct Geom {
  int64_t N, H, W, p, Hp, Wp, margin, npix, R;
  Geom(int64_t N_, int64_t H_, int64_t W_, int64_t p_) : N(N_), H(H_), W(W_), p(p_) {
    Hp = H + 2 * p;
    Wp = W + 2 * p;
    margin = p * Wp + p;
    npix = N * Hp * Wp;
    R = npix + 2 * margin;
  }
  // Row offset of conv tap (ky, kx) relative to the output pixel.
  int64_t tap(int64_t ky, int64_t kx) const { return (ky - p) * Wp + (kx - p); }
};

// Rows [margin + off, margin + off + npix) and columns [c0, c0 + n) of a [R, C] matrix.
inline at::Tensor rows(const at::Tensor& m, const Geom& g, int64_t off, int64_t c0, int64_t n) {
  return m.narrow(0, g.margin + off, g.npix).narrow(1, c0, n);
}

// The interior (real) pixels of columns [c0, c0 + n) as an [N, H, W, n] view.
inline at::Tensor interior(const at::Tensor& m, const Geom& g, int64_t c0, int64_t n) {
  return m.narrow(0, g.margin, g.npix)
      .view({g.N, g.Hp, g.Wp, m.size(1)})
      .narrow(1, g.p, g.H)
      .narrow(2, g.p, g.W)
      .narrow(3, c0, n);
}

// true on border pixel rows, false on interior rows: [npix, 1] bool. Used with masked_fill_ (never a multiply:
// a border row computed from a NaN or Inf neighbour is NaN or Inf, and NaN * 0 is NaN, which the next layer
// would read as padding -- and the previous sample's bottom border is the next one's top).
inline at::Tensor border_mask(const Geom& g, const at::TensorOptions& opts) {
  at::Tensor m = at::ones({g.npix, 1}, opts.dtype(at::kBool));
  m.view({g.N, g.Hp, g.Wp, 1}).narrow(1, g.p, g.H).narrow(2, g.p, g.W).fill_(false);
  return m;
}

// A @ B in C's (acc) dtype, into C (accumulate: C += A @ B). A and B share a dtype, maybe narrower than C's.
inline void gemm_into(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B, bool accumulate) {
  at::Tensor c = C;
  if (A.scalar_type() == C.scalar_type()) {
    if (accumulate) {
      c.addmm_(A, B);
    } else {
      at::mm_out(c, A, B);
    }
  } else if (C.is_cuda()) {
    at::addmm_out(c, C, A, B, C.scalar_type(), accumulate ? 1 : 0, 1);  // cuBLAS, fp32 accumulation
  } else {
    const at::Tensor prod = at::mm(A.to(C.scalar_type()), B.to(C.scalar_type()));
    if (accumulate) {
      c.add_(prod);
    } else {
      c.copy_(prod);
    }
  }
}

// A @ B with acc-dtype output (the GEMMs accumulate in fp32 either way; on CPU the product is rounded to A's
// dtype once, which is also how weight gradients come out).
inline at::Tensor mm_acc(const at::Tensor& A, const at::Tensor& B, c10::ScalarType acc) {
  if (A.scalar_type() == acc) return at::mm(A, B);
  if (A.is_cuda()) return at::mm(A, B, acc);
  return at::mm(A, B).to(acc);
}

inline at::Tensor acc_copy(const std::optional<at::Tensor>& t, c10::ScalarType acc) {
  return t.has_value() ? t->to(acc).reshape({t->size(0), -1}) : at::Tensor();
}

// Channel attention MLP of the fusion gate (RCAN CALayer: "avg" pool, ReLU, sigmoid), in acc dtype.
struct GateMlp {
  at::Tensor w1, b1, w2, b2;  // [Cr, K], [Cr] or undefined, [K, Cr], [K] or undefined
  GateMlp(const std::optional<at::Tensor>& gw1, const std::optional<at::Tensor>& gb1,
          const std::optional<at::Tensor>& gw2, const std::optional<at::Tensor>& gb2, c10::ScalarType acc) {
    w1 = acc_copy(gw1, acc);
    w2 = acc_copy(gw2, acc);
    if (gb1.has_value()) b1 = gb1->to(acc);
    if (gb2.has_value()) b2 = gb2->to(acc);
  }
  at::Tensor hidden(const at::Tensor& s) const {  // W1 s + b1
    return b1.defined() ? at::addmm(b1, s, w1.t()) : at::mm(s, w1.t());
  }
  at::Tensor forward(const at::Tensor& s) const {
    const at::Tensor a = hidden(s).relu_();
    return at::sigmoid(b2.defined() ? at::addmm(b2, a, w2.t()) : at::mm(a, w2.t()));
  }
  // dg -> (ds, gw1, gb1, gw2, gb2), all acc
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& s,
                                                                                 const at::Tensor& g,
                                                                                 const at::Tensor& dg) const {
    const at::Tensor h = hidden(s);
    const at::Tensor a = h.relu();
    const at::Tensor dz = dg * g * (1 - g);
    const at::Tensor gw2 = at::mm(dz.t(), a);
    const at::Tensor gb2 = dz.sum(0);
    // ATen's relu backward, threshold_backward(grad, relu(h), 0): 0 where h <= 0, so a NaN h passes it
    const at::Tensor dh = at::mm(dz, w2).masked_fill_(h <= 0, 0);
    const at::Tensor gw1 = at::mm(dh.t(), s);
    const at::Tensor gb1 = dh.sum(0);
    return {at::mm(dh, w1), gw1, gb1, gw2, gb2};
  }
};

// Shared argument checks of both entry points.
inline void check_args(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                       const Plan& pl, const std::optional<at::Tensor>& fuse_w, const char* op) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected a floating dtype, got ", x.scalar_type());
  TORCH_CHECK(int64_t(biases.size()) == int64_t(weights.size()), op, ": ", weights.size(), " weights but ",
              biases.size(), " biases");
  for (const auto i : c10::irange(weights.size())) {
    TORCH_CHECK(weights[i].scalar_type() == x.scalar_type() && weights[i].device() == x.device(), op,
                ": weights[", i, "] must match the dtype and device of the features");
    const at::Tensor& b = biases[i];
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weights[i].size(0) && b.scalar_type() == x.scalar_type() &&
                    b.device() == x.device(),
                op, ": biases[", i, "] must be [", weights[i].size(0), "] of the features' dtype and device");
  }
  if (fuse_w.has_value()) {
    TORCH_CHECK(fuse_w->dim() == 2 && fuse_w->size(1) == pl.fuse_len && fuse_w->scalar_type() == x.scalar_type(),
                op, ": fuse_weight must be [Cout, ", pl.fuse_len, "] of the features' dtype, got ", fuse_w->sizes());
  }
}

// Forward-only tensors the kernels index directly.
inline void check_forward_args(const at::Tensor& x, const Plan& pl, const std::optional<at::Tensor>& fuse_w,
                               const std::optional<at::Tensor>& fuse_b, const std::optional<at::Tensor>& gw1,
                               const std::optional<at::Tensor>& gw2, const std::optional<at::Tensor>& residual) {
  const bool fused = fuse_w.has_value();
  TORCH_CHECK(fused || (!fuse_b.has_value() && !gw1.has_value() && !residual.has_value()), kOp,
              ": fuse_bias, the gate and the residual need fuse_weight");
  if (!fused) return;
  const int64_t Cout = fuse_w->size(0);
  TORCH_CHECK(!fuse_b.has_value() || (fuse_b->dim() == 1 && fuse_b->size(0) == Cout), kOp, ": fuse_bias must be [",
              Cout, "]");
  TORCH_CHECK(!residual.has_value() || (residual->sizes() == at::IntArrayRef({x.size(0), Cout, x.size(2), x.size(3)}) &&
                                        residual->scalar_type() == x.scalar_type() && residual->device() == x.device()),
              kOp, ": residual must be [", x.size(0), ", ", Cout, ", ", x.size(2), ", ", x.size(3),
              "] of the features' dtype and device");
  TORCH_CHECK(gw1.has_value() == gw2.has_value(), kOp, ": the gate needs both gate_w1 and gate_w2");
  TORCH_CHECK(!gw1.has_value() || (gw1->dim() == 2 && gw1->size(1) == pl.fuse_len && gw2->dim() == 2 &&
                                   gw2->size(0) == pl.fuse_len && gw2->size(1) == gw1->size(0)),
              kOp, ": gate_w1 must be [Cr, ", pl.fuse_len, "] and gate_w2 [", pl.fuse_len, ", Cr]");
}

inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& buf, const Plan& pl,
                                const std::optional<at::Tensor>& fuse_w, const std::optional<at::Tensor>& gw1,
                                const std::optional<at::Tensor>& gw2) {
  TORCH_CHECK(grad_out.scalar_type() == buf.scalar_type() && grad_out.device() == buf.device() &&
                  grad_out.size(1) == (fuse_w.has_value() ? fuse_w->size(0) : pl.fuse_len),
              kOpBw, ": grad_out must have the output's dtype, device and channels");
  TORCH_CHECK(gw1.has_value() == gw2.has_value(), kOpBw, ": the gate needs both gate_w1 and gate_w2");
}

// ------------------------------------------------------------------------------------------------------
// Reference implementation on ATen ops (any device, any floating dtype).

inline at::Tensor new_buffer(const at::Tensor& x, const Plan& pl, const Geom& g) {
  at::Tensor buf = at::zeros({g.R, pl.T}, x.options().memory_format(c10::MemoryFormat::Contiguous));
  interior(buf, g, 0, pl.Cx).copy_(x.permute({0, 2, 3, 1}));
  return buf;
}

inline void layer_forward_generic(const at::Tensor& buf, const Geom& g, const Layer& l, const at::Tensor& w,
                                  const at::Tensor& b, const at::Tensor& border) {
  const auto acc = at::toOpMathType(buf.scalar_type());
  const at::Tensor wt = w.permute({2, 3, 1, 0}).contiguous();  // [k, k, in_len, G]
  at::Tensor z = at::empty({g.npix, l.G}, buf.options().dtype(acc));
  const int64_t k = w.size(2);
  for (const auto ky : c10::irange(k)) {
    for (const auto kx : c10::irange(k)) {
      gemm_into(z, rows(buf, g, g.tap(ky, kx), l.in_start, l.in_len), wt[ky][kx], ky + kx > 0);
    }
  }
  z.add_(b);
  if (l.res_start >= 0) z.add_(rows(buf, g, 0, l.res_start, l.G));
  if (l.relu) z.relu_();
  z.masked_fill_(border, 0);
  rows(buf, g, 0, l.out_start, l.out_split).copy_(z.narrow(1, 0, l.out_split));
  if (l.G > l.out_split) {
    rows(buf, g, 0, l.out2_start, l.G - l.out_split).copy_(z.narrow(1, l.out_split, l.G - l.out_split));
  }
}

// A layer's output columns (the two destination ranges back to back).
inline at::Tensor layer_output(const at::Tensor& m, const Geom& g, const Layer& l) {
  const at::Tensor a = rows(m, g, 0, l.out_start, l.out_split);
  if (l.G == l.out_split) return a;
  return at::cat({a, rows(m, g, 0, l.out2_start, l.G - l.out_split)}, 1);
}

inline at::Tensor output_like(const at::Tensor& like, int64_t C) {
  return at::empty({like.size(0), C, like.size(2), like.size(3)},
                   like.options().memory_format(like.suggest_memory_format()));
}

// Pooled means of the fusion range per sample: [N, K] acc.
inline at::Tensor fuse_means(const at::Tensor& buf, const Geom& g, const Plan& pl) {
  const auto acc = at::toOpMathType(buf.scalar_type());
  return at::mean(interior(buf, g, pl.fuse_start, pl.fuse_len), {1, 2}, false, acc);
}

// The per-sample gated fusion weight: [N, K, Cout] = fuse_w^T scaled by g[n, c] along K.
inline at::Tensor gated_weight(const at::Tensor& fw, const at::Tensor& gv) {
  return fw.to(gv.scalar_type()).t().unsqueeze(0) * gv.unsqueeze(2);
}


// E[n] = dO[n]^T @ F3[n] ([N, Cout, K]): a sum over every pixel of a sample, accumulated *and returned* in acc
// (in fp16 the sum overflows on large maps if rounded to the features' dtype; bf16 rounding of E would be
// amplified by the cancellation in dg = sum_c E * fuse_w). dO is the acc copy of dOd.
inline at::Tensor pixel_sum_acc(const at::Tensor& dO, const at::Tensor& dOd, const at::Tensor& F3,
                                c10::ScalarType acc) {
  if (F3.scalar_type() == acc) return at::bmm(dO.transpose(1, 2), F3);
  if (F3.is_cuda()) return at::bmm(dOd.transpose(1, 2), F3, acc);  // cuBLAS: fp32 accumulation and output
  // CPU has no out-dtype bmm: one sample at a time through an acc copy of its pixels (bounded temporary)
  at::Tensor E = at::empty({F3.size(0), dO.size(2), F3.size(2)}, dO.options());
  for (const auto n : c10::irange(F3.size(0))) {
    at::Tensor En = E[n];
    at::mm_out(En, dO[n].t(), F3[n].to(acc));
  }
  return E;
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// grad_x, grad_weights, grad_biases, grad_fuse_weight, grad_fuse_bias, then the gate's four
using Grads = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor,
                         at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Everything after the layers: pooled gate, fusion (or the plain buffer range), bias, residual.
// Returns (out, stats). `fusion` computes the [npix, Cout] acc fusion product given the optional gate.
template <typename Fusion>
inline std::tuple<at::Tensor, at::Tensor> finish_forward(
    const at::Tensor& x, const at::Tensor& buf, const Geom& g, const Plan& pl, const std::optional<at::Tensor>& fuse_w,
    const std::optional<at::Tensor>& fuse_b, const std::optional<at::Tensor>& gw1, const std::optional<at::Tensor>& gb1,
    const std::optional<at::Tensor>& gw2, const std::optional<at::Tensor>& gb2,
    const std::optional<at::Tensor>& residual, const Fusion& fusion) {
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor stats = at::empty({0}, x.options().dtype(acc));
  if (!fuse_w.has_value()) {
    at::Tensor out = output_like(x, pl.fuse_len);
    out.permute({0, 2, 3, 1}).copy_(interior(buf, g, pl.fuse_start, pl.fuse_len));
    return {out, stats};
  }
  at::Tensor gv;
  if (gw1.has_value()) {
    const at::Tensor s = fuse_means(buf, g, pl);
    gv = GateMlp(gw1, gb1, gw2, gb2, acc).forward(s);
    stats = at::stack({s, gv}, 1);
  }
  const int64_t Cout = fuse_w->size(0);
  at::Tensor o = fusion(gv);  // [npix, Cout] acc, before bias
  if (fuse_b.has_value()) o.add_(*fuse_b);
  at::Tensor o4 = o.view({g.N, g.Hp, g.Wp, Cout}).narrow(1, g.p, g.H).narrow(2, g.p, g.W);
  if (residual.has_value()) o4.add_(residual->permute({0, 2, 3, 1}));
  at::Tensor out = output_like(x, Cout);
  out.permute({0, 2, 3, 1}).copy_(o4);
  return {out, stats};
}

inline Outputs forward_generic(const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, const Plan& pl,
                               const std::optional<at::Tensor>& fuse_w, const std::optional<at::Tensor>& fuse_b,
                               const std::optional<at::Tensor>& gw1, const std::optional<at::Tensor>& gb1,
                               const std::optional<at::Tensor>& gw2, const std::optional<at::Tensor>& gb2,
                               const std::optional<at::Tensor>& residual) {
  const Geom g(x.size(0), x.size(2), x.size(3), pl.p);
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor buf = new_buffer(x, pl, g);
  const at::Tensor border = border_mask(g, x.options());
  for (const auto i : c10::irange(pl.layers.size())) {
    layer_forward_generic(buf, g, pl.layers[i], weights[i], biases[i], border);
  }
  auto fusion = [&](const at::Tensor& gv) {
    const at::Tensor fw = *fuse_w;
    if (gv.defined()) {
      const at::Tensor F3 =
          buf.narrow(0, g.margin, g.npix).view({g.N, g.Hp * g.Wp, pl.T}).narrow(2, pl.fuse_start, pl.fuse_len);
      const at::Tensor Wg = gated_weight(fw, gv);  // [N, K, Cout] acc
      return at::bmm(F3.to(acc), Wg).view({g.npix, fw.size(0)});
    }
    at::Tensor o = at::empty({g.npix, fw.size(0)}, x.options().dtype(acc));
    gemm_into(o, rows(buf, g, 0, pl.fuse_start, pl.fuse_len), fw.t(), false);
    return o;
  };
  auto [out, stats] = finish_forward(x, buf, g, pl, fuse_w, fuse_b, gw1, gb1, gw2, gb2, residual, fusion);
  return {out, buf, stats};
}

// Fusion backward (shared by every path): returns (gfw, gfb, ggw1, ggb1, ggw2, ggb2) and has `add_dF(gv)` put
// dO @ (fuse_w scaled by the gate gv along K; gv undefined when ungated) into the fusion range of the acc
// gradient buffer `gbuf`; the gate's pooled-mean gradient is added afterwards. `dO` is grad_out on the padded
// pixel rows [npix, Cout] in acc dtype, `dOd` the same in the features' dtype.
template <typename AddDF>
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fusion_backward(
    const at::Tensor& dO, const at::Tensor& dOd, const at::Tensor& buf, const at::Tensor& gbuf, const at::Tensor& stats,
    const Geom& g, const Plan& pl, const at::Tensor& fw, const std::optional<at::Tensor>& gw1,
    const std::optional<at::Tensor>& gb1, const std::optional<at::Tensor>& gw2, const std::optional<at::Tensor>& gb2,
    const AddDF& add_dF) {
  const auto acc = gbuf.scalar_type();
  const auto dt = buf.scalar_type();
  const int64_t Cout = fw.size(0), K = pl.fuse_len;
  const at::Tensor gfb = dO.sum(0).to(dt);
  at::Tensor ggw1, ggb1, ggw2, ggb2;
  at::Tensor gfw;
  if (gw1.has_value()) {
    TORCH_CHECK(stats.dim() == 3 && stats.size(0) == g.N && stats.size(1) == 2 && stats.size(2) == K, kOpBw,
                ": stats must be [N, 2, ", K, "], got ", stats.sizes());
    const at::Tensor s = stats.select(1, 0), gv = stats.select(1, 1);
    const at::Tensor F3 = buf.narrow(0, g.margin, g.npix).view({g.N, g.Hp * g.Wp, pl.T}).narrow(2, pl.fuse_start, K);
    const at::Tensor E = pixel_sum_acc(dO.view({g.N, g.Hp * g.Wp, Cout}), dOd.view({g.N, g.Hp * g.Wp, Cout}), F3, acc);
    gfw = (E * gv.unsqueeze(1)).sum(0).to(dt);
    const at::Tensor dg = (E * fw.to(acc).unsqueeze(0)).sum(1);  // [N, K]
    add_dF(gv);
    const GateMlp mlp(gw1, gb1, gw2, gb2, acc);
    auto [ds, a1, a2, a3, a4] = mlp.backward(s, gv, dg);
    interior(gbuf, g, pl.fuse_start, K).add_(ds.view({g.N, 1, 1, K}) / double(g.H * g.W));
    ggw1 = a1.to(dt).view(gw1->sizes());
    ggb1 = gb1.has_value() ? a2.to(dt) : at::empty({0}, fw.options());
    ggw2 = a3.to(dt).view(gw2->sizes());
    ggb2 = gb2.has_value() ? a4.to(dt) : at::empty({0}, fw.options());
  } else {
    gfw = mm_acc(dOd.t(), rows(buf, g, 0, pl.fuse_start, K), acc).to(dt);
    add_dF(at::Tensor());
    // distinct empties: outputs must not alias
    for (at::Tensor* t : {&ggw1, &ggb1, &ggw2, &ggb2}) *t = at::empty({0}, fw.options());
  }
  return {gfw, gfb, ggw1, ggb1, ggw2, ggb2};
}

inline Grads backward_generic(const at::Tensor& grad_out, const at::Tensor& buf, const at::Tensor& stats,
                              at::TensorList weights, at::TensorList biases,
                              const Plan& pl, const std::optional<at::Tensor>& fuse_w,
                              const std::optional<at::Tensor>& gw1, const std::optional<at::Tensor>& gb1,
                              const std::optional<at::Tensor>& gw2, const std::optional<at::Tensor>& gb2) {
  const Geom g(grad_out.size(0), grad_out.size(2), grad_out.size(3), pl.p);
  TORCH_CHECK(buf.dim() == 2 && buf.size(0) == g.R && buf.size(1) == pl.T && buf.is_contiguous(), kOpBw,
              ": buffer must be a contiguous [", g.R, ", ", pl.T, "] matrix, got ", buf.sizes());
  const auto dt = buf.scalar_type();
  const auto acc = at::toOpMathType(dt);
  const auto aopt = buf.options().dtype(acc);
  at::Tensor gbuf = at::zeros({g.R, pl.T}, aopt);
  at::Tensor gfw, gfb, ggw1, ggb1, ggw2, ggb2;
  if (fuse_w.has_value()) {
    const int64_t Cout = fuse_w->size(0);
    at::Tensor dO = at::zeros({g.npix, Cout}, aopt);
    dO.view({g.N, g.Hp, g.Wp, Cout}).narrow(1, g.p, g.H).narrow(2, g.p, g.W).copy_(grad_out.permute({0, 2, 3, 1}));
    const at::Tensor fwa = fuse_w->to(acc);
    auto add_dF = [&](const at::Tensor& gv) {
      if (gv.defined()) {
        gbuf.narrow(0, g.margin, g.npix).view({g.N, g.Hp * g.Wp, pl.T}).narrow(2, pl.fuse_start, pl.fuse_len)
            .baddbmm_(dO.view({g.N, g.Hp * g.Wp, Cout}), fwa.unsqueeze(0) * gv.unsqueeze(1));
      } else {
        gemm_into(rows(gbuf, g, 0, pl.fuse_start, pl.fuse_len), dO, fwa, true);
      }
    };
    std::tie(gfw, gfb, ggw1, ggb1, ggw2, ggb2) =
        fusion_backward(dO, dO.to(dt), buf, gbuf, stats, g, pl, *fuse_w, gw1, gb1, gw2, gb2, add_dF);
  } else {
    interior(gbuf, g, pl.fuse_start, pl.fuse_len).copy_(grad_out.permute({0, 2, 3, 1}));
    for (at::Tensor* t : {&gfw, &gfb, &ggw1, &ggb1, &ggw2, &ggb2}) *t = at::empty({0}, buf.options());
  }
  const at::Tensor border = border_mask(g, aopt);
  const int64_t L = int64_t(pl.layers.size());
  std::vector<at::Tensor> gws(L), gbs(L);
  for (int64_t i = L - 1; i >= 0; --i) {
    const Layer& l = pl.layers[i];
    const at::Tensor& w = weights[i];
    const int64_t k = w.size(2);
    at::Tensor dZ = layer_output(gbuf, g, l).clone();
    if (l.relu) dZ.masked_fill_(layer_output(buf, g, l) <= 0, 0);  // ATen's relu backward: NaN y passes dY
    dZ.masked_fill_(border, 0);
    gbs[i] = dZ.sum(0).to(dt);
    if (l.res_start >= 0) rows(gbuf, g, 0, l.res_start, l.G).add_(dZ);
    const at::Tensor dZt = dZ.to(dt);
    const at::Tensor wa = w.to(acc).permute({2, 3, 0, 1}).contiguous();  // [k, k, G, in_len]
    at::Tensor gw = at::empty({k, k, l.G, l.in_len}, aopt);
    for (const auto ky : c10::irange(k)) {
      for (const auto kx : c10::irange(k)) {
        const int64_t off = g.tap(ky, kx);
        gw[ky][kx].copy_(mm_acc(dZt.t(), rows(buf, g, off, l.in_start, l.in_len), acc));
        gemm_into(rows(gbuf, g, off, l.in_start, l.in_len), dZ, wa[ky][kx], true);
      }
    }
    gws[i] = gw.permute({2, 3, 0, 1}).to(dt).contiguous();
  }
  at::Tensor gx = output_like(grad_out, pl.Cx);
  gx.permute({0, 2, 3, 1}).copy_(interior(gbuf, g, 0, pl.Cx));
  return {gx, gws, gbs, gfw, gfb, ggw1, ggb1, ggw2, ggb2};
}

}  // namespace SRK_DENSE_ISA
}  // namespace srkernels::dense
