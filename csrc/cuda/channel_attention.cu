// CUDA channel_attention forward/backward (contract: docs/ops.md § channel_attention).
//
// Bytes moved, in passes over the [N, C, H, W] tensor (one pass = N*C*H*W*sizeof(dtype)); the [N, C]
// statistics, partials and weights are < 1/HW of a pass and ignored:
//   forward : pool reads x (1) + scale reads x (1) + reads residual (1, if any) + writes out (1)  = 4 (3)
//   backward: reduction reads grad_out and x (2) + grad_x reads grad_out (1), x (1, "avg+std" only) and
//             writes grad_x (1)                                                                   = 5 (4 for "avg")
// The floor of docs/ops.md (3 forward, 3 backward) needs a sample to stay in cache between the reduction
// and the elementwise pass, which a GPU's L2 cannot promise; the pool pass is the price of that.
//
// Kernels (all deterministic, see attention_common.cuh):
//   forward : pool partials (NCHW: ca_reduce_nchw_kernel; NHWC: reduce_nhwc_kernel) -> merge_partials_kernel
//             (stats) -> mlp_fwd_kernel (g) -> ew_*_kernel<CaScaleOp> (out)
//   backward: dg partials (same reduction kernels on grad_out*x) -> merge_partials_kernel (dg) ->
//             mlp_bwd_kernel (grad_x coefficients, per-sample weight factors) -> weight_grad_kernel ->
//             ew_*_kernel<CaGradOp> (grad_x)
//   _out    : the forward kernels writing the caller's `out` (directly when it has x's native layout,
//             else into a temporary + copy_, one more read and write pass)
#include "attention_common.cuh"
#include "runtime/register.h"

#include <string_view>
#include <tuple>

namespace srkernels::cuda {
namespace {

// NCHW pooling: block (plane = n*C + c, chunk s) reduces chunk_vecs vectors of one contiguous plane.
template <typename scalar_t, int V, int MODE>
__global__ void __launch_bounds__(kBlock) ca_reduce_nchw_kernel(const scalar_t* __restrict__ x,
                                                                 const scalar_t* __restrict__ go,
                                                                 at::opmath_type<scalar_t>* __restrict__ part_a,
                                                                 at::opmath_type<scalar_t>* __restrict__ part_b,
                                                                 int64_t planes, int C, int64_t HW, int64_t S,
                                                                 int64_t chunk_vecs) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(MODE == kSumX || MODE == kWelfordX || MODE == kSumGoX, "channel_attention reduction modes only");
  __shared__ acc_t sh_m[32];
  __shared__ acc_t sh_M[32];
  __shared__ int sh_n[32];
  const int64_t nvec = HW / V;
  const int64_t s = blockIdx.x;
  const int64_t v_begin = s * chunk_vecs, v_end = min64(nvec, v_begin + chunk_vecs);
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const scalar_t* xp = x + plane * HW;
    acc_t la[V], lb[V];
    int cnt = 0;
#pragma unroll
    for (int l = 0; l < V; ++l) la[l] = lb[l] = acc_t(0);
#pragma unroll 4
    for (int64_t v = v_begin + threadIdx.x; v < v_end; v += blockDim.x) {
      const auto xr = vload<V>(xp + v * V);
      acc_t xv[V];
#pragma unroll
      for (int l = 0; l < V; ++l) xv[l] = to_acc<acc_t>(xr.v[l]);
      if constexpr (MODE == kSumX) {
#pragma unroll
        for (int l = 0; l < V; ++l) la[l] += xv[l];
      } else if constexpr (MODE == kWelfordX) {
        welford_push<acc_t, V>(la, lb, cnt, xv);
      } else {
        const auto gr = vload<V>(go + plane * HW + v * V);  // go is null in the other modes
#pragma unroll
        for (int l = 0; l < V; ++l) la[l] += to_acc<acc_t>(gr.v[l]) * xv[l];
      }
    }
    const int64_t n = plane / C;
    const int64_t out = (n * S + s) * C + (plane - n * C);
    if constexpr (MODE == kWelfordX) {
      acc_t m = la[0], M = lb[0];
      int k = cnt;
#pragma unroll
      for (int l = 1; l < V; ++l) welford_merge(m, M, k, la[l], lb[l], cnt);
      block_welford(m, M, k, sh_m, sh_M, sh_n);
      if (threadIdx.x == 0) {
        part_a[out] = m;
        part_b[out] = M;
      }
    } else {
      acc_t t = la[0];
#pragma unroll
      for (int l = 1; l < V; ++l) t += la[l];
      t = block_sum(t, sh_m);
      if (threadIdx.x == 0) part_a[out] = t;
    }
  }
}

// out = x * g[n, c] (+ residual), one rounding.
template <typename scalar_t>
struct CaScaleOp {
  using acc_t = at::opmath_type<scalar_t>;
  ScaleIO<scalar_t> io;
  const acc_t* g;  // [N, C]
  int C;

  __device__ acc_t plane(int64_t, int, int64_t nc) const { return g[nc]; }
  template <int V>
  __device__ Vec<acc_t, V> chan(int64_t n, int c0) const {
    return vload<V>(g + n * C + c0);
  }
  template <int V>
  __device__ void apply(const acc_t (&gv)[V], int64_t off) const {
    const auto xv = vload<V>(io.x + off);
    Vec<scalar_t, V> o;
    if (io.res) {
      const auto rv = vload<V>(io.res + off);
#pragma unroll
      for (int l = 0; l < V; ++l)
        o.v[l] = static_cast<scalar_t>(to_acc<acc_t>(xv.v[l]) * gv[l] + to_acc<acc_t>(rv.v[l]));
    } else {
#pragma unroll
      for (int l = 0; l < V; ++l) o.v[l] = static_cast<scalar_t>(to_acc<acc_t>(xv.v[l]) * gv[l]);
    }
    vstore<V>(io.out + off, o);
  }
  template <int V>
  __device__ void nchw(acc_t gp, int64_t off, int64_t, int) const {
    acc_t gv[V];
#pragma unroll
    for (int l = 0; l < V; ++l) gv[l] = gp;
    apply<V>(gv, off);
  }
  template <int V>
  __device__ void nhwc(const Vec<acc_t, V>& gc, int64_t off, int64_t, int) const {
    apply<V>(gc.v, off);
  }
};

// grad_x = grad_out * g + ds/HW (+ ds/(HW*std) * (x - mean) for "avg+std").
template <typename acc_t, int V>
struct CaCoef {
  acc_t g[V], a[V], b[V], m[V];
};

template <typename scalar_t>
struct CaGradOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go;
  const scalar_t* x;
  scalar_t* gx;
  const acc_t* coef;  // [4, N, C]: g, ds/HW, ds/(HW*std), mean
  int64_t NC;
  int C;
  bool with_std;

  __device__ CaCoef<acc_t, 1> plane(int64_t, int, int64_t nc) const {
    return {{coef[nc]}, {coef[NC + nc]}, {coef[2 * NC + nc]}, {coef[3 * NC + nc]}};
  }
  template <int V>
  __device__ CaCoef<acc_t, V> chan(int64_t n, int c0) const {
    CaCoef<acc_t, V> k;
    const int64_t i = n * C + c0;
    const auto g = vload<V>(coef + i), a = vload<V>(coef + NC + i), b = vload<V>(coef + 2 * NC + i),
               m = vload<V>(coef + 3 * NC + i);
#pragma unroll
    for (int l = 0; l < V; ++l) {
      k.g[l] = g.v[l];
      k.a[l] = a.v[l];
      k.b[l] = b.v[l];
      k.m[l] = m.v[l];
    }
    return k;
  }
  template <int V, int W>
  __device__ void apply(const CaCoef<acc_t, W>& k, int64_t off) const {
    // W == 1: one channel for all V lanes (NCHW); W == V: one channel per lane (NHWC).
    const auto gv = vload<V>(go + off);
    acc_t r[V];
#pragma unroll
    for (int l = 0; l < V; ++l) r[l] = to_acc<acc_t>(gv.v[l]) * k.g[W == 1 ? 0 : l] + k.a[W == 1 ? 0 : l];
    if (with_std) {  // "avg" never reads x
      const auto xv = vload<V>(x + off);
#pragma unroll
      for (int l = 0; l < V; ++l) {
        const int w = W == 1 ? 0 : l;
        r[l] += k.b[w] * (to_acc<acc_t>(xv.v[l]) - k.m[w]);
      }
    }
    Vec<scalar_t, V> o;
#pragma unroll
    for (int l = 0; l < V; ++l) o.v[l] = static_cast<scalar_t>(r[l]);
    vstore<V>(gx + off, o);
  }
  template <int V>
  __device__ void nchw(const CaCoef<acc_t, 1>& k, int64_t off, int64_t, int) const {
    apply<V, 1>(k, off);
  }
  template <int V>
  __device__ void nhwc(const CaCoef<acc_t, V>& k, int64_t off, int64_t, int) const {
    apply<V, V>(k, off);
  }
};

// Pool partials of x (MODE kSumX / kWelfordX) or grad_out*x (kSumGoX) in the native layout.
// Returns {S, chunk_len}: chunk s covers min(chunk_len, HW - s*chunk_len) elements of each (n, c).
template <typename scalar_t, int V, int MODE>
std::pair<int64_t, int64_t> pool_partials(const scalar_t* x, const scalar_t* go, bool nhwc, int64_t N, int C,
                                          int64_t HW, at::Tensor& pa, at::Tensor& pb, const at::TensorOptions& acc_opts,
                                          cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool two = MODE == kWelfordX;
  if (!nhwc) {
    const int64_t nvec = HW / V;
    // About kChunksPerSample blocks per sample, at least kMinIters vectors per thread.
    const int64_t s_want = std::max<int64_t>(1, (kChunksPerSample + C - 1) / C);
    const int64_t iters = std::max<int64_t>(kMinIters, (nvec + s_want * kBlock - 1) / (s_want * kBlock));
    const int64_t chunk_vecs = iters * kBlock;
    const int64_t S = (nvec + chunk_vecs - 1) / chunk_vecs;
    TORCH_CHECK(S <= kMaxGridX, "channel_attention: tensor too large");
    pa = at::empty({N, S, C}, acc_opts);
    pb = two ? at::empty({N, S, C}, acc_opts) : pa;
    const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(std::min<int64_t>(N * C, kMaxGridY)));
    SRK_LAUNCH(grid, kBlock, 0, stream, ca_reduce_nchw_kernel<scalar_t, V, MODE>)(
        x, go, pa.data_ptr<acc_t>(), pb.data_ptr<acc_t>(), N * C, C, HW, S, chunk_vecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {S, chunk_vecs * V};
  }
  const NhwcGeom g = nhwc_geom(C, HW, V, kMinIters, kChunksPerSample);
  pa = at::empty({N, g.S, C}, acc_opts);
  pb = two ? at::empty({N, g.S, C}, acc_opts) : pa;
  launch_reduce_nhwc<scalar_t, V, MODE>(x, go, nullptr, nullptr, nullptr, pa.data_ptr<acc_t>(),
                                        pb.data_ptr<acc_t>(), nullptr, nullptr, g, N, C, HW, stream);
  return {g.S, g.ppc};
}

struct CaArgs {
  at::Tensor w1, b1, w2, b2, act;  // b1, b2, act undefined when absent
  int64_t C = 0, Cr = 0;
  bool with_std = false;
};

CaArgs ca_args(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
               const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& act_weight,
               std::string_view pool, const char* op) {
  CaArgs a;
  TORCH_CHECK(pool == "avg" || pool == "avg+std", op, ": pool must be \"avg\" or \"avg+std\", got \"",
              std::string(pool), "\"");
  a.with_std = pool == "avg+std";
  a.C = x.size(1);
  TORCH_CHECK(w1.dim() == 2, op, ": w1 must be 2-D [Cr, C], got ", w1.sizes());
  a.Cr = w1.size(0);
  TORCH_CHECK(a.Cr <= INT_MAX / 2, op, ": w1 too large");
  a.w1 = small_weight(w1, x, {a.Cr, a.C}, "w1");
  a.w2 = small_weight(w2, x, {a.C, a.Cr}, "w2");
  if (b1.has_value() && b1->defined()) a.b1 = small_weight(*b1, x, {a.Cr}, "b1");
  if (b2.has_value() && b2->defined()) a.b2 = small_weight(*b2, x, {a.C}, "b2");
  if (act_weight.has_value() && act_weight->defined()) a.act = small_weight(*act_weight, x, {a.Cr}, "act_weight");
  return a;
}

template <typename scalar_t>
MlpWeights<scalar_t> ca_mlp(const CaArgs& a) {
  return mlp_weights<scalar_t>(a.w1, a.b1, a.w2, a.b2, a.act);
}

// The forward on x in its native layout, writing `out` (same layout as x; may be the residual itself: the
// scale pass reads residual before writing out at the same element, in the same thread). Returns stats.
at::Tensor ca_forward(const at::Tensor& x, bool nhwc, const CaArgs& A, const at::Tensor& res, const at::Tensor& out,
                      const char* op) {
  const int64_t N = x.size(0), C = A.C, HW = x.size(2) * x.size(3);
  const int P = A.with_std ? 2 : 1;
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor stats = at::empty({N, P, C}, acc_opts);
  dispatch_vectorized(x, nhwc, {out, res}, op,
                      [&]<typename scalar_t, typename acc_t, int V>(cudaStream_t stream) {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::Tensor pa, pb;
    const auto [S, chunk_len] =
        A.with_std ? pool_partials<scalar_t, V, kWelfordX>(xp, nullptr, nhwc, N, C, HW, pa, pb, acc_opts, stream)
                   : pool_partials<scalar_t, V, kSumX>(xp, nullptr, nhwc, N, C, HW, pa, pb, acc_opts, stream);
    acc_t* st = stats.data_ptr<acc_t>();
    launch_merge<acc_t>(pa.data_ptr<acc_t>(), pb.data_ptr<acc_t>(), N, C, S, chunk_len, HW, A.with_std,
                        static_cast<acc_t>(HW), st, st + C, P * C, stream);

    at::Tensor g = at::empty({N, C}, acc_opts);
    launch_mlp_fwd<scalar_t>(ca_mlp<scalar_t>(A), st, P, N, acc_opts, g.data_ptr<acc_t>(), stream);

    CaScaleOp<scalar_t> sop{ScaleIO<scalar_t>::of(x, res, out), g.data_ptr<acc_t>(), static_cast<int>(C)};
    launch_ew<V>(sop, nhwc, N, static_cast<int>(C), HW, stream);
  });
  return stats;
}

// The forward, and channel_attention_out when out is defined (OutVariant): out written, nothing returned.
std::tuple<at::Tensor, at::Tensor> channel_attention_cuda(const at::Tensor& out, const at::Tensor& x_in,
                                                          const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                                          const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                                          const std::optional<at::Tensor>& residual,
                                                          const std::optional<at::Tensor>& act_weight,
                                                          c10::string_view pool) {
  const char* op = out.defined() ? "srkernels::channel_attention_out" : "srkernels::channel_attention";
  check_x(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const CaArgs A = ca_args(x_in, w1, b1, w2, b2, act_weight, pool, op);
  at::Tensor stats;
  at::Tensor y = attention_forward(out, x_in, residual, op, [&](const ForwardOperands& in, const at::Tensor& dst) {
    stats = ca_forward(in.x, in.nhwc(), A, in.res, dst, op);
  });
  return {y, stats};
}
using ChannelAttention = OutVariant<&channel_attention_cuda>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& stats_in, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& act_weight, c10::string_view pool) {
  constexpr const char* op = "srkernels::channel_attention_backward";
  check_x(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const CaArgs A = ca_args(x_in, w1, b1, w2, b2, act_weight, pool, op);
  const BackwardOperands in = backward_operands(x_in, grad_out_in);
  const at::Tensor& x = in.x;
  const bool nhwc = in.nhwc();
  const int64_t N = x.size(0), C = A.C, Cr = A.Cr, HW = x.size(2) * x.size(3);
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  const int P = A.with_std ? 2 : 1;
  check_saved(stats_in, "stats", {N, P, C}, x, op);
  const at::Tensor stats = stats_in.contiguous();

  at::Tensor gw1 = weight_grad_buffer(A.w1, N), gw2 = weight_grad_buffer(A.w2, N);
  at::Tensor gb1 = A.b1.defined() ? weight_grad_buffer(A.b1, N) : at::empty({0}, x.options());
  at::Tensor gb2 = A.b2.defined() ? weight_grad_buffer(A.b2, N) : at::empty({0}, x.options());
  at::Tensor gact = A.act.defined() ? weight_grad_buffer(A.act, N) : at::empty({0}, x.options());
  dispatch_vectorized(x, nhwc, {in.go, in.grad_x}, op,
                      [&]<typename scalar_t, typename acc_t, int V>(cudaStream_t stream) {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gop = in.go.data_ptr<scalar_t>();
    at::Tensor pa, pb;
    const auto [S, chunk_len] = pool_partials<scalar_t, V, kSumGoX>(xp, gop, nhwc, N, C, HW, pa, pb, acc_opts, stream);
    at::Tensor dg = at::empty({N, C}, acc_opts);
    launch_merge<acc_t>(pa.data_ptr<acc_t>(), nullptr, N, C, S, chunk_len, HW, false, acc_t(1),
                        dg.data_ptr<acc_t>(), nullptr, C, stream);

    MlpBwdScratch T(N, C, Cr, acc_opts);
    launch_mlp_bwd<scalar_t>(ca_mlp<scalar_t>(A), stats.data_ptr<acc_t>(), P, dg.data_ptr<acc_t>(), N, HW, T,
                             gw1.data_ptr<scalar_t>(), A.b1.defined() ? gb1.data_ptr<scalar_t>() : nullptr,
                             gw2.data_ptr<scalar_t>(), A.b2.defined() ? gb2.data_ptr<scalar_t>() : nullptr,
                             A.act.defined() ? gact.data_ptr<scalar_t>() : nullptr, nullptr, 0, 0, nullptr, stream);

    CaGradOp<scalar_t> gop_{gop, xp, in.grad_x.data_ptr<scalar_t>(), T.coef.data_ptr<acc_t>(), N * C,
                            static_cast<int>(C), A.with_std};
    launch_ew<V>(gop_, nhwc, N, static_cast<int>(C), HW, stream);
  });
  return {in.grad_x, gw1, gb1, gw2, gb2, gact};
}

}  // namespace
}  // namespace srkernels::cuda

SRK_CUDA_OP_WITH_OUT(channel_attention, ChannelAttention)
SRK_CUDA_OP(channel_attention_backward, channel_attention_backward_cuda)
