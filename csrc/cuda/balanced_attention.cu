// CUDA balanced_attention (BAM = ACAM x MSAM) forward/backward (contract: docs/ops.md § balanced_attention).
//
// Bytes moved, in passes over the [N, C, H, W] tensor; the [N, C] and [N, H, W] maps (1/HW and 1/C of a
// pass, read/written a few times each) are extra and small for C = 64:
//   forward : pool reads x (1; channel sums and channel max from the same read) + scale reads x (1),
//             reads residual (1, if any), writes out (1)                                       = 4 (3)
//   backward: reduction reads grad_out and x (2; dca, dsa and argmax from the same read) +
//             grad_x reads grad_out (1) and writes grad_x (1; x is not needed there)           = 4
//
// Kernels (deterministic, see attention_common.cuh):
//   forward : pool (NCHW: bam_reduce_nchw_kernel; NHWC: reduce_nhwc_kernel<kBamFwd> [+ max_merge_kernel])
//             -> merge_partials_kernel (mean) -> mlp_fwd_kernel (ca) -> kxk_map_kernel<false> (sa)
//             -> ew_*_kernel<BamScaleOp> (out)
//   backward: mlp_fwd_kernel (ca) + kxk_map_kernel<false> (sa) recomputed from the saved maps -> reduction
//             (bam_reduce_nchw_kernel<BWD> / reduce_nhwc_kernel<kBamBwd>) -> merge_partials_kernel (dca)
//             + pixel_finalize_kernel (dt, argmax) -> kxk_map_kernel<true> (dmax), wsa_partial_kernel
//             -> mlp_bwd_kernel -> weight_grad_kernel -> ew_*_kernel<BamGradOp> (grad_x)
//   _out    : the forward kernels writing the caller's `out` (directly when it has x's native layout,
//             else into a temporary + copy_, one more read and write pass)
#include "attention_common.cuh"
#include "runtime/register.h"

#include <tuple>

namespace srkernels::cuda {
namespace {

constexpr int kPPT = 8;               // pixels per lane in bam_reduce_nchw_kernel
constexpr int kTileNchw = 32 * kPPT;  // pixels per block there
constexpr int kSaPix = 2048;          // pixels per block of wsa_partial_kernel
constexpr int kJG = 8;                // taps per thread (one row segment) in wsa_partial_kernel

// NCHW pool/reduction for BAM. Block = (sample n, tile of kTileNchw pixels); warp w handles channels
// w, w+nw, ...; lane owns kPPT pixels of the tile (K vectors of V). Channel sums: one warp tree per channel,
// no cross-warp step. Per-pixel results (max / dsa / argmax over the warp's channels) are combined across
// warps in shared memory in a fixed order.
//   forward (BWD = false): part = sum_p x ; pix_a = max_c x
//   backward (BWD = true): part = sum_p go*x*sa ; pix_a = sum_c go*x*ca ; pix_b = lowest c with x == maxmap
template <typename scalar_t, int V, bool BWD>
__global__ void __launch_bounds__(kBlock) bam_reduce_nchw_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ go, const at::opmath_type<scalar_t>* __restrict__ ca,
    const at::opmath_type<scalar_t>* __restrict__ sa, const at::opmath_type<scalar_t>* __restrict__ mref,
    at::opmath_type<scalar_t>* __restrict__ part, at::opmath_type<scalar_t>* __restrict__ pix_a,
    int* __restrict__ pix_b, int64_t N, int C, int64_t HW, int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int K = kPPT / V;
  static_assert(K * V == kPPT, "V must divide kPPT");
  __shared__ acc_t sh_a[kBlock / 32][kTileNchw];
  __shared__ int sh_b[BWD ? kBlock / 32 : 1][BWD ? kTileNchw : 1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  const int64_t s = blockIdx.x;
  const int64_t nvec = HW / V;

  int64_t vidx[K];
  bool vact[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    vidx[k] = s * (kTileNchw / V) + k * 32 + lane;
    vact[k] = vidx[k] < nvec;
  }

  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    acc_t pa[K][V], sav[K][V], mv[K][V];
    int pb[K][V];
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        pa[k][l] = BWD ? acc_t(0) : neg_inf<acc_t>();
        pb[k][l] = INT_MAX;
        sav[k][l] = mv[k][l] = acc_t(0);
      }
      if (BWD && vact[k]) {
        const auto sv = vload<V>(sa + n * HW + vidx[k] * V);
#pragma unroll
        for (int l = 0; l < V; ++l) {
          sav[k][l] = sv.v[l];
          mv[k][l] = mref[n * HW + vidx[k] * V + l];
        }
      }
    }
#pragma unroll 4
    for (int c = warp; c < C; c += nw) {
      const int64_t plane = n * C + c;
      const scalar_t* xp = x + plane * HW;
      const acc_t cav = BWD ? ca[plane] : acc_t(0);
      acc_t t = acc_t(0);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (!vact[k]) continue;
        const auto xr = vload<V>(xp + vidx[k] * V);
        if constexpr (!BWD) {
#pragma unroll
          for (int l = 0; l < V; ++l) {
            const acc_t xf = to_acc<acc_t>(xr.v[l]);
            t += xf;
            pa[k][l] = nanmax(pa[k][l], xf);
          }
        } else {
          const auto gr = vload<V>(go + plane * HW + vidx[k] * V);  // go is null in the forward
#pragma unroll
          for (int l = 0; l < V; ++l) {
            const acc_t xf = to_acc<acc_t>(xr.v[l]);
            const acc_t prod = to_acc<acc_t>(gr.v[l]) * xf;
            t += prod * sav[k][l];
            pa[k][l] += prod * cav;
            if (pb[k][l] == INT_MAX && attains(xf, mv[k][l])) pb[k][l] = c;  // c ascends: lowest wins
          }
        }
      }
      t = warp_sum(t);
      if (lane == 0) part[(n * S + s) * C + c] = t;
    }

#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        sh_a[warp][(k * 32 + lane) * V + l] = pa[k][l];
        if constexpr (BWD) sh_b[warp][(k * 32 + lane) * V + l] = pb[k][l];
      }
    }
    __syncthreads();
    for (int i = tid; i < kTileNchw; i += blockDim.x) {
      const int64_t p = s * kTileNchw + i;
      if (p >= HW) continue;
      acc_t a = sh_a[0][i];
      if constexpr (!BWD) {
        for (int w = 1; w < nw; ++w) a = nanmax(a, sh_a[w][i]);
        pix_a[n * HW + p] = a;
      } else {
        int b = sh_b[0][i];
        for (int w = 1; w < nw; ++w) {
          a += sh_a[w][i];
          b = min(b, sh_b[w][i]);  // warps own disjoint channel sets: the min is the lowest overall
        }
        pix_a[n * HW + p] = a;
        pix_b[n * HW + p] = b == INT_MAX ? -1 : b;
      }
    }
    __syncthreads();
  }
}

// NHWC with more than one channel tile: maxmap = max over the tiles' partial maxima. parts [N, CT, HW].
template <typename acc_t>
__global__ void __launch_bounds__(kBlock) max_merge_kernel(const acc_t* __restrict__ parts, int CT, int64_t N,
                                                            int64_t HW, acc_t* __restrict__ maxmap) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < N * HW;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = q / HW, p = q - n * HW;
    acc_t m = parts[n * CT * HW + p];
    for (int ct = 1; ct < CT; ++ct) m = nanmax(m, parts[(n * CT + ct) * HW + p]);
    maxmap[q] = m;
  }
}

// The K x K map kernels of MSAM (zero padding r = K/2, taps summed in row-major (i, j) order):
//   kTransposed = false: sa = sigmoid(correlation of maxmap with w): out[y, x] = sigmoid(sum w[i,j] m[y+i-r, x+j-r])
//   kTransposed = true : dmax = conv_transpose2d(dt, w, pad r):       out[y, x] = sum w[i,j] m[y-i+r, x-j+r]
// Forward and backward of one correlation: the same loop with the tap offsets mirrored.
template <typename scalar_t, bool kTransposed>
__global__ void __launch_bounds__(kBlock) kxk_map_kernel(const at::opmath_type<scalar_t>* __restrict__ m,
                                                          const scalar_t* __restrict__ w, int K, int64_t N, int64_t H,
                                                          int64_t W, at::opmath_type<scalar_t>* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
  const int r = K / 2;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < N * HW;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = q / HW, p = q - n * HW, y = p / W, xx = p - y * W;
    const acc_t* mp = m + n * HW;
    acc_t t = acc_t(0);
    for (int i = 0; i < K; ++i) {
      const int64_t yy = kTransposed ? y - i + r : y + i - r;
      if (yy < 0 || yy >= H) continue;
      for (int j = 0; j < K; ++j) {
        const int64_t x2 = kTransposed ? xx - j + r : xx + j - r;
        if (x2 < 0 || x2 >= W) continue;
        t += to_acc<acc_t>(w[i * K + j]) * mp[yy * W + x2];
      }
    }
    out[q] = kTransposed ? t : sigmoid_acc(t);
  }
}

// Merge the per-channel-tile pixel partials of the backward reduction: dsa summed over tiles in order, argmax
// = the first tile's hit (tiles ascend in c). dt = dsa * sa * (1 - sa).
template <typename acc_t>
__global__ void __launch_bounds__(kBlock) pixel_finalize_kernel(const acc_t* __restrict__ pd, const int* __restrict__ pam,
                                                                 const acc_t* __restrict__ sa, int CT, int64_t N,
                                                                 int64_t HW, acc_t* __restrict__ dt,
                                                                 int* __restrict__ argmax) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < N * HW;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = q / HW, p = q - n * HW;
    acc_t d = acc_t(0);
    int am = -1;
    for (int ct = 0; ct < CT; ++ct) {
      const int64_t i = (n * CT + ct) * HW + p;
      d += pd[i];
      if (am < 0) am = pam[i];
    }
    const acc_t sv = sa[q];
    dt[q] = d * sv * (acc_t(1) - sv);
    argmax[q] = am;
  }
}

// grad_w_sa partials: block (chunk of kSaPix flat pixels, tap row i, tap column group jg) accumulates
// sum_q dt[q] * maxmap_padded[q + (i, j) - r] for up to kJG columns j, then a block tree per tap.
// part[(i*K + j) * nchunks + chunk]; weight_grad_kernel sums over chunks in order.
template <typename acc_t>
__global__ void __launch_bounds__(kBlock) wsa_partial_kernel(const acc_t* __restrict__ dt, const acc_t* __restrict__ m,
                                                              int K, int64_t N, int64_t H, int64_t W, int64_t nchunks,
                                                              acc_t* __restrict__ part) {
  __shared__ acc_t sh[32];
  const int64_t HW = H * W;
  const int JG = (K + kJG - 1) / kJG;
  const int i = blockIdx.y / JG, j0 = (blockIdx.y % JG) * kJG;
  const int r = K / 2;
  const int64_t chunk = blockIdx.x;
  const int64_t q0 = chunk * kSaPix, q1 = min64(N * HW, q0 + kSaPix);
  acc_t a[kJG];
#pragma unroll
  for (int jj = 0; jj < kJG; ++jj) a[jj] = acc_t(0);
  for (int64_t q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
    const int64_t n = q / HW, p = q - n * HW, y = p / W, xx = p - y * W;
    const int64_t yy = y + i - r;
    if (yy < 0 || yy >= H) continue;
    const acc_t d = dt[q];
    const acc_t* row = m + n * HW + yy * W;
#pragma unroll
    for (int jj = 0; jj < kJG; ++jj) {
      const int64_t x2 = xx + j0 + jj - r;
      if (j0 + jj < K && x2 >= 0 && x2 < W) a[jj] += d * row[x2];
    }
  }
#pragma unroll
  for (int jj = 0; jj < kJG; ++jj) {
    const acc_t t = block_sum(a[jj], sh);
    if (threadIdx.x == 0 && j0 + jj < K) part[(static_cast<int64_t>(i) * K + j0 + jj) * nchunks + chunk] = t;
  }
}

// out = x * ca[n, c] * sa[n, p] (+ residual), one rounding.
template <typename scalar_t>
struct BamScaleOp {
  using acc_t = at::opmath_type<scalar_t>;
  ScaleIO<scalar_t> io;
  const acc_t* ca;  // [N, C]
  const acc_t* sa;  // [N, HW]
  int C;

  template <int V>
  __device__ void apply(const acc_t (&cav)[V], const acc_t (&sav)[V], int64_t off) const {
    const auto xv = vload<V>(io.x + off);
    acc_t r[V];
#pragma unroll
    for (int l = 0; l < V; ++l) r[l] = to_acc<acc_t>(xv.v[l]) * cav[l] * sav[l];
    if (io.res) {
      const auto rv = vload<V>(io.res + off);
#pragma unroll
      for (int l = 0; l < V; ++l) r[l] += to_acc<acc_t>(rv.v[l]);
    }
    Vec<scalar_t, V> o;
#pragma unroll
    for (int l = 0; l < V; ++l) o.v[l] = static_cast<scalar_t>(r[l]);
    vstore<V>(io.out + off, o);
  }
  __device__ acc_t plane(int64_t, int, int64_t nc) const { return ca[nc]; }
  template <int V>
  __device__ void nchw(acc_t cp, int64_t off, int64_t pix, int) const {
    const auto sv = vload<V>(sa + pix);  // HW % V == 0 on the vector path: aligned
    acc_t cav[V];
#pragma unroll
    for (int l = 0; l < V; ++l) cav[l] = cp;
    apply<V>(cav, sv.v, off);
  }
  template <int V>
  __device__ Vec<acc_t, V> chan(int64_t n, int c0) const {
    return vload<V>(ca + n * C + c0);
  }
  template <int V>
  __device__ void nhwc(const Vec<acc_t, V>& cc, int64_t off, int64_t pix, int) const {
    acc_t sav[V];
    const acc_t sp = sa[pix];
#pragma unroll
    for (int l = 0; l < V; ++l) sav[l] = sp;
    apply<V>(cc.v, sav, off);
  }
};

// grad_x = grad_out * ca * sa + dmean/HW + (c == argmax) * dmax.
template <typename acc_t, int V>
struct BamCoef {
  acc_t ca[V], dm[V];
};

template <typename scalar_t>
struct BamGradOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go;
  scalar_t* gx;
  const acc_t* coef;  // [4, N, C] from mlp_bwd_kernel: 0 = ca, 1 = dmean/HW
  const acc_t* sa;    // [N, HW]
  const int* am;      // [N, HW], -1 = none
  const acc_t* dmax;  // [N, HW]
  int64_t NC;
  int C;

  struct PlaneC {
    acc_t ca, dm;
    int c;
  };
  __device__ PlaneC plane(int64_t, int c, int64_t nc) const { return {coef[nc], coef[NC + nc], c}; }
  template <int V>
  __device__ void nchw(const PlaneC& k, int64_t off, int64_t pix, int) const {
    const auto gv = vload<V>(go + off);
    const auto sv = vload<V>(sa + pix);
    const auto av = vload<V>(am + pix);
    const auto dv = vload<V>(dmax + pix);
    Vec<scalar_t, V> o;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      acc_t r = to_acc<acc_t>(gv.v[l]) * k.ca * sv.v[l] + k.dm;
      if (av.v[l] == k.c) r += dv.v[l];
      o.v[l] = static_cast<scalar_t>(r);
    }
    vstore<V>(gx + off, o);
  }
  template <int V>
  __device__ BamCoef<acc_t, V> chan(int64_t n, int c0) const {
    BamCoef<acc_t, V> k;
    const auto a = vload<V>(coef + n * C + c0), d = vload<V>(coef + NC + n * C + c0);
#pragma unroll
    for (int l = 0; l < V; ++l) {
      k.ca[l] = a.v[l];
      k.dm[l] = d.v[l];
    }
    return k;
  }
  template <int V>
  __device__ void nhwc(const BamCoef<acc_t, V>& k, int64_t off, int64_t pix, int c0) const {
    const auto gv = vload<V>(go + off);
    const acc_t sp = sa[pix];
    const int ap = am[pix];
    const acc_t dp = dmax[pix];
    Vec<scalar_t, V> o;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      acc_t r = to_acc<acc_t>(gv.v[l]) * k.ca[l] * sp + k.dm[l];
      if (ap == c0 + l) r += dp;
      o.v[l] = static_cast<scalar_t>(r);
    }
    vstore<V>(gx + off, o);
  }
};

inline unsigned flat_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kBlock - 1) / kBlock, 1 << 20)));
}

struct BamArgs {
  at::Tensor w1, slope, w2, wsa;
  int64_t C = 0, Cr = 0;
  int K = 0;
};

BamArgs bam_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& prelu_w, const at::Tensor& w2,
                 const at::Tensor& w_sa, const char* op) {
  BamArgs a;
  a.C = x.size(1);
  TORCH_CHECK(w1.dim() == 2, op, ": w1 must be 2-D [Cr, C], got ", w1.sizes());
  a.Cr = w1.size(0);
  TORCH_CHECK(a.Cr <= INT_MAX / 2, op, ": w1 too large");
  TORCH_CHECK(w_sa.dim() == 2 && w_sa.size(0) == w_sa.size(1), op, ": w_sa must be 2-D [K, K], got ",
              w_sa.sizes());
  TORCH_CHECK(w_sa.size(0) % 2 == 1 && w_sa.size(0) <= 255, op, ": w_sa size K must be odd and <= 255, got ",
              w_sa.size(0));
  a.K = static_cast<int>(w_sa.size(0));
  a.w1 = small_weight(w1, x, {a.Cr, a.C}, "w1");
  a.slope = small_weight(prelu_w, x, {a.Cr}, "prelu_w");
  a.w2 = small_weight(w2, x, {a.C, a.Cr}, "w2");
  a.wsa = small_weight(w_sa, x, {a.K, a.K}, "w_sa");
  return a;
}

template <typename scalar_t>
MlpWeights<scalar_t> bam_mlp(const BamArgs& a) {
  return mlp_weights<scalar_t>(a.w1, at::Tensor(), a.w2, at::Tensor(), a.slope);  // no biases, PReLU
}

// ca [N, C] from mean and sa [N, HW] from maxmap.
template <typename scalar_t>
void attention_maps(const BamArgs& A, const at::Tensor& mean, const at::Tensor& maxmap, int64_t N, int64_t H,
                    int64_t W, at::Tensor& ca, at::Tensor& sa, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_opts = mean.options();
  ca = at::empty({N, A.C}, acc_opts);
  sa = at::empty({N, H * W}, acc_opts);
  launch_mlp_fwd<scalar_t>(bam_mlp<scalar_t>(A), mean.data_ptr<acc_t>(), 1, N, acc_opts, ca.data_ptr<acc_t>(), stream);
  SRK_LAUNCH(flat_blocks(N * H * W), kBlock, 0, stream, kxk_map_kernel<scalar_t, false>)(
      maxmap.data_ptr<acc_t>(), A.wsa.data_ptr<scalar_t>(), A.K, N, H, W, sa.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline int nchw_bam_threads(int64_t C) {
  return 32 * static_cast<int>(std::min<int64_t>(kBlock / 32, C));
}

// The NCHW pool (BWD = false) or backward reduction (BWD = true), bam_reduce_nchw_kernel over S tiles of
// kTileNchw pixels per sample: allocates the channel partials pa [N, S, C]; returns S.
template <typename scalar_t, int V, bool BWD>
int64_t launch_bam_reduce_nchw(const scalar_t* x, const scalar_t* go, const at::opmath_type<scalar_t>* ca,
                               const at::opmath_type<scalar_t>* sa, const at::opmath_type<scalar_t>* mref,
                               at::Tensor& pa, at::opmath_type<scalar_t>* pix_a, int* pix_b, int64_t N, int64_t C,
                               int64_t HW, const at::TensorOptions& acc_opts, const char* op, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = (HW + kTileNchw - 1) / kTileNchw;
  TORCH_CHECK(S <= kMaxGridX, op, ": tensor too large");
  pa = at::empty({N, S, C}, acc_opts);
  const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(std::min<int64_t>(N, kMaxGridY)));
  SRK_LAUNCH(grid, nchw_bam_threads(C), 0, stream, bam_reduce_nchw_kernel<scalar_t, V, BWD>)(
      x, go, ca, sa, mref, pa.data_ptr<acc_t>(), pix_a, pix_b, N, static_cast<int>(C), HW, S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return S;
}

// The forward on x in its native layout, writing `out` (same layout as x; may be the residual itself: the
// scale pass reads residual before writing out at the same element, in the same thread). Returns mean, maxmap.
std::pair<at::Tensor, at::Tensor> bam_forward(const at::Tensor& x, bool nhwc, const BamArgs& A, const at::Tensor& res,
                                              const at::Tensor& out, const char* op) {
  const int64_t N = x.size(0), C = A.C, H = x.size(2), W = x.size(3), HW = H * W;
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({N, C}, acc_opts);
  at::Tensor maxmap = at::empty({N, H, W}, acc_opts);
  dispatch_vectorized(x, nhwc, {out, res}, op,
                      [&]<typename scalar_t, typename acc_t, int V>(cudaStream_t stream) {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    acc_t* mm = maxmap.data_ptr<acc_t>();
    at::Tensor pa;
    int64_t S;
    if (!nhwc) {
      S = launch_bam_reduce_nchw<scalar_t, V, false>(xp, nullptr, nullptr, nullptr, nullptr, pa, mm, nullptr, N, C,
                                                     HW, acc_opts, op, stream);
    } else {
      const NhwcGeom g = nhwc_geom(static_cast<int>(C), HW, V, kMinIters, kChunksPerSample);
      S = g.S;
      pa = at::empty({N, S, C}, acc_opts);
      at::Tensor pmax = g.CT == 1 ? maxmap : at::empty({N, g.CT, HW}, acc_opts);
      launch_reduce_nhwc<scalar_t, V, kBamFwd>(xp, nullptr, nullptr, nullptr, nullptr, pa.data_ptr<acc_t>(), nullptr,
                                               pmax.data_ptr<acc_t>(), nullptr, g, N, static_cast<int>(C), HW,
                                               stream);
      if (g.CT > 1) {
        SRK_LAUNCH(flat_blocks(N * HW), kBlock, 0, stream, max_merge_kernel<acc_t>)(pmax.data_ptr<acc_t>(), g.CT, N,
                                                                                    HW, mm);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    launch_merge<acc_t>(pa.data_ptr<acc_t>(), nullptr, N, static_cast<int>(C), S, 0, HW, false,
                        static_cast<acc_t>(HW), mean.data_ptr<acc_t>(), nullptr, C, stream);

    at::Tensor ca, sa;
    attention_maps<scalar_t>(A, mean, maxmap, N, H, W, ca, sa, stream);

    BamScaleOp<scalar_t> sop{ScaleIO<scalar_t>::of(x, res, out), ca.data_ptr<acc_t>(), sa.data_ptr<acc_t>(),
                             static_cast<int>(C)};
    launch_ew<V>(sop, nhwc, N, static_cast<int>(C), HW, stream);
  });
  return {mean, maxmap};
}

// The forward, and balanced_attention_out when out is defined (OutVariant): out written, nothing returned.
std::tuple<at::Tensor, at::Tensor, at::Tensor> balanced_attention_cuda(const at::Tensor& out, const at::Tensor& x_in,
                                                                       const at::Tensor& w1, const at::Tensor& prelu_w,
                                                                       const at::Tensor& w2, const at::Tensor& w_sa,
                                                                       const std::optional<at::Tensor>& residual) {
  const char* op = out.defined() ? "srkernels::balanced_attention_out" : "srkernels::balanced_attention";
  check_x(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const BamArgs A = bam_args(x_in, w1, prelu_w, w2, w_sa, op);
  at::Tensor mean, maxmap;
  at::Tensor y = attention_forward(out, x_in, residual, op, [&](const ForwardOperands& in, const at::Tensor& dst) {
    std::tie(mean, maxmap) = bam_forward(in.x, in.nhwc(), A, in.res, dst, op);
  });
  return {y, mean, maxmap};
}
using BalancedAttention = OutVariant<&balanced_attention_cuda>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> balanced_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& maxmap_in,
    const at::Tensor& w1, const at::Tensor& prelu_w, const at::Tensor& w2, const at::Tensor& w_sa) {
  constexpr const char* op = "srkernels::balanced_attention_backward";
  check_x(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const BamArgs A = bam_args(x_in, w1, prelu_w, w2, w_sa, op);
  const BackwardOperands in = backward_operands(x_in, grad_out_in);
  const at::Tensor& x = in.x;
  const bool nhwc = in.nhwc();
  const int64_t N = x.size(0), C = A.C, Cr = A.Cr, H = x.size(2), W = x.size(3), HW = H * W;
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  check_saved(mean_in, "mean", {N, C}, x, op);
  check_saved(maxmap_in, "maxmap", {N, H, W}, x, op);
  const at::Tensor mean = mean_in.contiguous(), maxmap = maxmap_in.contiguous();

  at::Tensor gw1 = weight_grad_buffer(A.w1, N), gslope = weight_grad_buffer(A.slope, N),
             gw2 = weight_grad_buffer(A.w2, N), gwsa = weight_grad_buffer(A.wsa, N);
  dispatch_vectorized(x, nhwc, {in.go, in.grad_x}, op,
                      [&]<typename scalar_t, typename acc_t, int V>(cudaStream_t stream) {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gop = in.go.data_ptr<scalar_t>();
    at::Tensor ca, sa;
    attention_maps<scalar_t>(A, mean, maxmap, N, H, W, ca, sa, stream);

    // One read of grad_out and x: dca partials, per-pixel dsa and argmax (per channel tile).
    at::Tensor pa, pdsa, pam;
    int64_t S;
    int CT = 1;
    if (!nhwc) {
      pdsa = at::empty({N, 1, HW}, acc_opts);
      pam = at::empty({N, 1, HW}, acc_opts.dtype(at::kInt));
      S = launch_bam_reduce_nchw<scalar_t, V, true>(xp, gop, ca.data_ptr<acc_t>(), sa.data_ptr<acc_t>(),
                                                    maxmap.data_ptr<acc_t>(), pa, pdsa.data_ptr<acc_t>(),
                                                    pam.data_ptr<int>(), N, C, HW, acc_opts, op, stream);
    } else {
      const NhwcGeom g = nhwc_geom(static_cast<int>(C), HW, V, kMinIters, kChunksPerSample);
      S = g.S;
      CT = g.CT;
      pa = at::empty({N, S, C}, acc_opts);
      pdsa = at::empty({N, CT, HW}, acc_opts);
      pam = at::empty({N, CT, HW}, acc_opts.dtype(at::kInt));
      launch_reduce_nhwc<scalar_t, V, kBamBwd>(xp, gop, ca.data_ptr<acc_t>(), sa.data_ptr<acc_t>(),
                                               maxmap.data_ptr<acc_t>(), pa.data_ptr<acc_t>(), nullptr,
                                               pdsa.data_ptr<acc_t>(), pam.data_ptr<int>(), g, N,
                                               static_cast<int>(C), HW, stream);
    }
    at::Tensor dca = at::empty({N, C}, acc_opts);
    launch_merge<acc_t>(pa.data_ptr<acc_t>(), nullptr, N, static_cast<int>(C), S, 0, HW, false, acc_t(1),
                        dca.data_ptr<acc_t>(), nullptr, C, stream);

    // Spatial branch: dt, argmax, dmax, grad_w_sa partials.
    at::Tensor dt = at::empty({N, HW}, acc_opts), am = at::empty({N, HW}, acc_opts.dtype(at::kInt));
    SRK_LAUNCH(flat_blocks(N * HW), kBlock, 0, stream, pixel_finalize_kernel<acc_t>)(
        pdsa.data_ptr<acc_t>(), pam.data_ptr<int>(), sa.data_ptr<acc_t>(), CT, N, HW, dt.data_ptr<acc_t>(),
        am.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor dmax = at::empty({N, HW}, acc_opts);
    SRK_LAUNCH(flat_blocks(N * HW), kBlock, 0, stream, kxk_map_kernel<scalar_t, true>)(
        dt.data_ptr<acc_t>(), A.wsa.data_ptr<scalar_t>(), A.K, N, H, W, dmax.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t nch = (N * HW + kSaPix - 1) / kSaPix;
    TORCH_CHECK(nch <= kMaxGridX, op, ": tensor too large");
    const int KK = A.K * A.K;
    at::Tensor wsa_part = at::empty({KK, nch}, acc_opts);
    const dim3 wgrid(static_cast<unsigned>(nch), static_cast<unsigned>(A.K * ((A.K + kJG - 1) / kJG)));
    SRK_LAUNCH(wgrid, kBlock, 0, stream, wsa_partial_kernel<acc_t>)(
        dt.data_ptr<acc_t>(), maxmap.data_ptr<acc_t>(), A.K, N, H, W, nch, wsa_part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // Channel branch: MLP backward from dca (pool "avg", PReLU, no biases).
    MlpBwdScratch T(N, C, Cr, acc_opts);
    launch_mlp_bwd<scalar_t>(bam_mlp<scalar_t>(A), mean.data_ptr<acc_t>(), 1, dca.data_ptr<acc_t>(), N, HW, T,
                             gw1.data_ptr<scalar_t>(), nullptr, gw2.data_ptr<scalar_t>(), nullptr,
                             gslope.data_ptr<scalar_t>(), wsa_part.data_ptr<acc_t>(), KK, nch,
                             gwsa.data_ptr<scalar_t>(), stream);

    BamGradOp<scalar_t> gop_{gop,
                             in.grad_x.data_ptr<scalar_t>(),
                             T.coef.data_ptr<acc_t>(),
                             sa.data_ptr<acc_t>(),
                             am.data_ptr<int>(),
                             dmax.data_ptr<acc_t>(),
                             N * C,
                             static_cast<int>(C)};
    launch_ew<V>(gop_, nhwc, N, static_cast<int>(C), HW, stream);
  });
  return {in.grad_x, gw1, gslope, gw2, gwsa};
}

}  // namespace
}  // namespace srkernels::cuda

SRK_CUDA_OP_WITH_OUT(balanced_attention, BalancedAttention)
SRK_CUDA_OP(balanced_attention_backward, balanced_attention_backward_cuda)
