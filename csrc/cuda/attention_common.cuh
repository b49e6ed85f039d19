// Shared pieces of the channel_attention and balanced_attention CUDA kernels (contracts: docs/ops.md).
//
// Conventions used by every kernel here:
// - acc_t = at::opmath_type<scalar_t>; all arithmetic on loaded values is done in acc_t (so bf16/half code
//   needs no sm_80 intrinsics and compiles for sm_75).
// - Deterministic: reductions are thread-local loops in a fixed order, then fixed-shape warp/block trees;
//   multi-block reductions write partials that a second kernel merges in a fixed order. No float atomics.
// - How a tensor is split into blocks depends only on the per-sample shape (C, H, W) and dtype, never on N
//   or on the device, so a sample gives the same bits whatever batch it is in.
// - Index math is int64 wherever an offset can exceed 2^31 (N*C*H*W, per-sample C*H*W, pixel*C).
// - Buffers that a kernel writes and then re-reads after __syncthreads are plain pointers (no __restrict__,
//   no __ldg), so the compiler never routes those reads through the non-coherent cache.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>

// Hooks for the CPU emulator of these sources (csrc/cuda_emu/cuda_emu.h, docs/cuda_emulation.md), which
// predefines them; under nvcc they mean exactly what the code meant before.
#ifndef SRK_LAUNCH
// SRK_LAUNCH(grid, block, smem, stream, kernel)(args...) == kernel<<<grid, block, smem, stream>>>(args...)
#define SRK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
#ifndef SRK_ON_DEVICE
#define SRK_ON_DEVICE(t) (t).is_cuda()
#endif
#ifndef SRK_CHECK_ALIGNED
#define SRK_CHECK_ALIGNED(p, n) ((void)0)
#endif
#ifndef SRK_HOST_LIMIT
#define SRK_HOST_LIMIT(type, name, value) constexpr type name = value
#endif

namespace srkernels::cuda {
// Anonymous namespace: each .cu gets its own internal-linkage copy of these templates and kernels, so two
// translation units never share (and race to register) one host stub.
namespace {

constexpr int kBlock = 256;              // threads per block of every streaming kernel
SRK_HOST_LIMIT(int64_t, kMaxGridY, 65535);  // hardware limit of gridDim.y (kernels loop over the rest)
constexpr int64_t kMaxGridX = 0x7fffffff;
SRK_HOST_LIMIT(int, kChunksPerSample, 1024);  // reduction blocks per sample we aim for (fills an H100 at N == 1)
constexpr int kMinIters = 4;             // loads per thread per reduction block, at least
constexpr int kEwIters = 4;              // vectors per thread in the elementwise kernels

// ---------------------------------------------------------------------------------------------------------
// Device helpers

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// 128-bit (or narrower) load/store; the host only picks V > 1 when every pointer and offset is aligned.
template <int V, typename T>
__device__ __forceinline__ Vec<T, V> vload(const T* p) {
  SRK_CHECK_ALIGNED(p, sizeof(Vec<T, V>));
  return *reinterpret_cast<const Vec<T, V>*>(p);
}
template <int V, typename T>
__device__ __forceinline__ void vstore(T* p, const Vec<T, V>& v) {
  SRK_CHECK_ALIGNED(p, sizeof(Vec<T, V>));
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T v) {
  return static_cast<acc_t>(v);
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_acc(acc_t z) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return 1.0 / (1.0 + ::exp(-z));
  } else {
    return 1.f / (1.f + ::expf(-z));
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t sqrt_acc(acc_t v) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return ::sqrt(v);
  } else {
    return ::sqrtf(v);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// max that propagates NaN from either side (torch.max does).
template <typename T>
__device__ __forceinline__ T nanmax(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// "x attains the channel max": exact equality (maxmap holds an exactly converted x), NaN matches NaN.
template <typename T>
__device__ __forceinline__ bool attains(T x, T m) {
  return x == m || (x != x && m != m);
}

// Chan et al. merge of (mean, M2, count) b into a. Fixed operand order => deterministic.
template <typename acc_t, typename cnt_t>
__device__ __forceinline__ void welford_merge(acc_t& ma, acc_t& Ma, cnt_t& na, acc_t mb, acc_t Mb, cnt_t nb) {
  if (nb == 0) return;
  if (na == 0) {
    ma = mb;
    Ma = Mb;
    na = nb;
    return;
  }
  const cnt_t n = na + nb;
  const acc_t f = static_cast<acc_t>(nb) / static_cast<acc_t>(n);
  const acc_t d = mb - ma;
  ma += d * f;
  Ma += Mb + d * d * static_cast<acc_t>(na) * f;
  na = n;
}

// Welford update of V lanes sharing one count (one division per vector).
template <typename acc_t, int V>
__device__ __forceinline__ void welford_push(acc_t (&m)[V], acc_t (&M)[V], int& cnt, const acc_t (&v)[V]) {
  ++cnt;
  const acc_t r = acc_t(1) / static_cast<acc_t>(cnt);
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const acc_t d = v[l] - m[l];
    m[l] += d * r;
    M[l] += d * (v[l] - m[l]);
  }
}

// Tree sums with __shfl_down: lane 0 ends with the sum of the 32 lanes in a fixed order.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename acc_t, typename cnt_t>
__device__ __forceinline__ void warp_welford(acc_t& m, acc_t& M, cnt_t& n) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t mb = __shfl_down_sync(0xffffffffu, m, o);
    const acc_t Mb = __shfl_down_sync(0xffffffffu, M, o);
    const cnt_t nb = __shfl_down_sync(0xffffffffu, n, o);
    if (lane + o < 32) welford_merge(m, M, n, mb, Mb, nb);
  }
}

// Block-wide sum (1-D block, blockDim.x a multiple of 32, every thread calls). Result valid in thread 0.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* sh /* >= 32 */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nw ? sh[lane] : T(0);
    v = warp_sum(v);
  }
  __syncthreads();  // sh may be reused right away
  return v;
}

template <typename acc_t>
__device__ __forceinline__ void block_welford(acc_t& m, acc_t& M, int& n, acc_t* shm, acc_t* shM, int* shn) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  warp_welford(m, M, n);
  if (lane == 0) {
    shm[warp] = m;
    shM[warp] = M;
    shn[warp] = n;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < nw ? shm[lane] : acc_t(0);
    M = lane < nw ? shM[lane] : acc_t(0);
    n = lane < nw ? shn[lane] : 0;
    warp_welford(m, M, n);
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------------------
// The tensors of a forward's scale pass, out = x * gate (+ res) elementwise in one layout; the op supplies
// the gate (CaScaleOp, BamScaleOp).
template <typename scalar_t>
struct ScaleIO {
  const scalar_t* x;
  const scalar_t* res;  // nullable
  scalar_t* out;

  static ScaleIO of(const at::Tensor& x, const at::Tensor& res, const at::Tensor& out) {
    return {x.data_ptr<scalar_t>(), res.defined() ? res.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>()};
  }
};

// Elementwise drivers. An Op supplies per-channel constants (plane()/chan()) and the per-vector body
// (nchw()/nhwc()); the drivers own the index math, so no integer division runs per element.

// NCHW: grid.x = chunks of kEwIters*kBlock vectors of one plane, grid.y loops over the N*C planes.
template <int V, typename Op>
__global__ void __launch_bounds__(kBlock) ew_nchw_kernel(Op op, int64_t planes, int C, int64_t HW) {
  const int64_t nvec = HW / V;
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * (kEwIters * kBlock) + threadIdx.x;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t n = plane / C;
    const int c = static_cast<int>(plane - n * C);
    const auto pc = op.plane(n, c, plane);
#pragma unroll
    for (int it = 0; it < kEwIters; ++it) {
      const int64_t v = v0 + static_cast<int64_t>(it) * kBlock;
      if (v < nvec) op.template nchw<V>(pc, plane * HW + v * V, n * HW + v * V, c);
    }
  }
}

// NHWC launch geometry: TC threads (power of two <= 32) span the channel vectors of a pixel, TP = kBlock/TC
// pixels per block row; CT channel tiles when C/V > 32. Groups of TC lanes never straddle a warp.
struct NhwcGeom {
  int V = 1, log2TC = 0, TC = 1, TP = kBlock, CT = 1;
  int64_t ppc = 0;  // pixels per chunk (a multiple of TP)
  int64_t S = 0;    // chunks per sample
  int iters = 0;    // ppc / TP
};

// max_chunks <= 0: no cap (elementwise kernels); otherwise iters grow so that S <= max_chunks.
inline NhwcGeom nhwc_geom(int C, int64_t HW, int V, int min_iters, int64_t max_chunks) {
  NhwcGeom g;
  g.V = V;
  const int64_t ncv = (C + V - 1) / V;
  while (g.TC < ncv && g.TC < 32) {
    g.TC <<= 1;
    ++g.log2TC;
  }
  g.TP = kBlock / g.TC;
  g.CT = static_cast<int>((ncv + g.TC - 1) / g.TC);
  const int64_t want = max_chunks > 0 ? (HW + g.TP * max_chunks - 1) / (g.TP * max_chunks) : 0;
  g.iters = static_cast<int>(std::max<int64_t>(min_iters, want));
  g.ppc = static_cast<int64_t>(g.iters) * g.TP;
  g.S = (HW + g.ppc - 1) / g.ppc;
  return g;
}

// NHWC: grid.x = S chunks x CT channel tiles, grid.y loops over samples.
template <int V, typename Op>
__global__ void __launch_bounds__(kBlock) ew_nhwc_kernel(Op op, int64_t N, int C, int64_t HW, int log2TC, int CT,
                                                          int64_t ppc) {
  const int TC = 1 << log2TC;
  const int tx = threadIdx.x & (TC - 1), ty = threadIdx.x >> log2TC, TP = blockDim.x >> log2TC;
  const int ct = static_cast<int>(blockIdx.x % CT);
  const int64_t chunk = blockIdx.x / CT;
  const int c0 = (ct * TC + tx) * V;
  if (c0 >= C) return;  // no barriers below
  const int64_t p_begin = chunk * ppc, p_end = min64(HW, p_begin + ppc);
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const auto cc = op.template chan<V>(n, c0);
#pragma unroll 4
    for (int64_t p = p_begin + ty; p < p_end; p += TP) {
      const int64_t pix = n * HW + p;
      op.template nhwc<V>(cc, pix * C + c0, pix, c0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// NHWC reduction over pixels (per channel), optionally also over channels (per pixel) for BAM.
// Per sample the tensor is a [HW, C] row-major matrix; a block reduces ppc rows of a TC*V-column tile.

enum RedMode : int {
  kSumX = 0,      // part_a = sum x
  kWelfordX = 1,  // part_a, part_b = Welford mean, M2 of x
  kSumGoX = 2,    // part_a = sum grad_out * x
  kBamFwd = 3,    // part_a = sum x ; pix_a = per-pixel max_c x (per channel tile)
  kBamBwd = 4,    // part_a = sum go*x*sa ; pix_a = per-pixel sum_c go*x*ca ; pix_b = lowest c with x == maxmap
};

template <int MODE>
inline constexpr bool kReadsGo = MODE == kSumGoX || MODE == kBamBwd;  // a variable: usable in device code

template <typename acc_t>
inline size_t reduce_nhwc_smem(int mode, int V) {
  const size_t lanes = static_cast<size_t>(kBlock) * V;
  return mode == kWelfordX ? lanes * 2 * sizeof(acc_t) + kBlock * sizeof(int) : lanes * sizeof(acc_t);
}

template <typename scalar_t, int V, int MODE>
__global__ void __launch_bounds__(kBlock) reduce_nhwc_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ go,
    const at::opmath_type<scalar_t>* __restrict__ ca,    // kBamBwd: [N, C]
    const at::opmath_type<scalar_t>* __restrict__ sa,    // kBamBwd: [N, HW]
    const at::opmath_type<scalar_t>* __restrict__ mref,  // kBamBwd: maxmap [N, HW]
    at::opmath_type<scalar_t>* __restrict__ part_a,      // [N, S, C]
    at::opmath_type<scalar_t>* __restrict__ part_b,      // [N, S, C] (kWelfordX)
    at::opmath_type<scalar_t>* __restrict__ pix_a,       // [N, CT, HW] (kBamFwd, kBamBwd)
    int* __restrict__ pix_b,                             // [N, CT, HW] (kBamBwd)
    int64_t N, int C, int64_t HW, int log2TC, int CT, int64_t S, int64_t ppc, int iters) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sh_a = reinterpret_cast<acc_t*>(smem_raw);  // [blockDim][V]
  acc_t* sh_b = sh_a + blockDim.x * V;                // [blockDim][V]   (Welford M2)
  int* sh_n = reinterpret_cast<int*>(sh_b + blockDim.x * V);  // [blockDim] (Welford counts)

  const int TC = 1 << log2TC;
  const int tid = threadIdx.x, tx = tid & (TC - 1), ty = tid >> log2TC, TP = blockDim.x >> log2TC;
  const int ct = static_cast<int>(blockIdx.x % CT);
  const int64_t s = blockIdx.x / CT;
  const int c0 = (ct * TC + tx) * V;
  const bool cact = c0 < C;
  const int64_t p_begin = s * ppc, p_end = min64(HW, p_begin + ppc);

  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    acc_t la[V], lb[V], cav[V];
    int cnt = 0;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      la[l] = acc_t(0);
      lb[l] = acc_t(0);
      cav[l] = acc_t(0);
    }
    if constexpr (MODE == kBamBwd) {
      if (cact) {
#pragma unroll
        for (int l = 0; l < V; ++l) cav[l] = ca[n * C + c0 + l];
      }
    }
    // Uniform trip count: the per-pixel shuffles below need every lane of the warp.
#pragma unroll 4
    for (int it = 0; it < iters; ++it) {
      const int64_t p = p_begin + static_cast<int64_t>(it) * TP + ty;
      const bool pact = p < p_end;
      const bool act = pact && cact;
      const int64_t pix = n * HW + p;
      acc_t xv[V], gv[V];
#pragma unroll
      for (int l = 0; l < V; ++l) {
        xv[l] = acc_t(0);
        gv[l] = acc_t(0);
      }
      if (act) {
        const auto xr = vload<V>(x + pix * C + c0);
#pragma unroll
        for (int l = 0; l < V; ++l) xv[l] = to_acc<acc_t>(xr.v[l]);
        if constexpr (kReadsGo<MODE>) {
          const auto gr = vload<V>(go + pix * C + c0);
#pragma unroll
          for (int l = 0; l < V; ++l) gv[l] = to_acc<acc_t>(gr.v[l]);
        }
      }
      if constexpr (MODE == kSumX) {
        if (act) {
#pragma unroll
          for (int l = 0; l < V; ++l) la[l] += xv[l];
        }
      } else if constexpr (MODE == kWelfordX) {
        if (act) welford_push<acc_t, V>(la, lb, cnt, xv);
      } else if constexpr (MODE == kSumGoX) {
        if (act) {
#pragma unroll
          for (int l = 0; l < V; ++l) la[l] += gv[l] * xv[l];
        }
      } else if constexpr (MODE == kBamFwd) {
        acc_t mx = neg_inf<acc_t>();
        if (act) {
#pragma unroll
          for (int l = 0; l < V; ++l) {
            la[l] += xv[l];
            mx = nanmax(mx, xv[l]);
          }
        }
        for (int o = TC >> 1; o > 0; o >>= 1) mx = nanmax(mx, __shfl_down_sync(0xffffffffu, mx, o, TC));
        if (tx == 0 && pact) pix_a[(n * CT + ct) * HW + p] = mx;
      } else {  // kBamBwd
        acc_t ds = acc_t(0);
        int am = INT_MAX;
        if (act) {
          const acc_t sav = sa[pix];
          const acc_t mv = mref[pix];
#pragma unroll
          for (int l = 0; l < V; ++l) {
            const acc_t prod = gv[l] * xv[l];
            la[l] += prod * sav;
            ds += prod * cav[l];
            if (am == INT_MAX && attains(xv[l], mv)) am = c0 + l;
          }
        }
        for (int o = TC >> 1; o > 0; o >>= 1) {
          ds += __shfl_down_sync(0xffffffffu, ds, o, TC);
          am = min(am, __shfl_down_sync(0xffffffffu, am, o, TC));
        }
        if (tx == 0 && pact) {
          pix_a[(n * CT + ct) * HW + p] = ds;
          pix_b[(n * CT + ct) * HW + p] = am == INT_MAX ? -1 : am;
        }
      }
    }

    // Column reduction over the TP pixel rows of the block: fixed tree in shared memory.
#pragma unroll
    for (int l = 0; l < V; ++l) {
      sh_a[tid * V + l] = la[l];
      if constexpr (MODE == kWelfordX) sh_b[tid * V + l] = lb[l];
    }
    if constexpr (MODE == kWelfordX) sh_n[tid] = cnt;
    __syncthreads();
    for (int stride = TP >> 1; stride > 0; stride >>= 1) {
      if (ty < stride) {
        const int o = tid + stride * TC;
        if constexpr (MODE == kWelfordX) {
          const int na = sh_n[tid], nb = sh_n[o];
#pragma unroll
          for (int l = 0; l < V; ++l) {
            acc_t m = sh_a[tid * V + l], M = sh_b[tid * V + l];
            int k = na;
            welford_merge(m, M, k, sh_a[o * V + l], sh_b[o * V + l], nb);
            sh_a[tid * V + l] = m;
            sh_b[tid * V + l] = M;
          }
          sh_n[tid] = na + nb;
        } else {
#pragma unroll
          for (int l = 0; l < V; ++l) sh_a[tid * V + l] += sh_a[o * V + l];
        }
      }
      __syncthreads();
    }
    if (ty == 0 && cact) {
      const int64_t base = (n * S + s) * C + c0;
#pragma unroll
      for (int l = 0; l < V; ++l) {
        part_a[base + l] = sh_a[tx * V + l];
        if constexpr (MODE == kWelfordX) part_b[base + l] = sh_b[tx * V + l];
      }
    }
    __syncthreads();  // shared memory is reused for the next sample
  }
}

// ---------------------------------------------------------------------------------------------------------
// Second pass of the pooling reductions: one warp per (n, c) merges the S chunk partials in a fixed order.
// Sum mode: out_a[n*stride + c] = sum / divisor. Welford mode: out_a = mean, out_b = population std, where
// chunk s holds min(chunk_len, HW - s*chunk_len) elements.
template <typename acc_t>
__global__ void __launch_bounds__(kBlock) merge_partials_kernel(const acc_t* __restrict__ pa, const acc_t* __restrict__ pb,
                                                                int64_t N, int C, int64_t S, int64_t chunk_len,
                                                                int64_t HW, bool welford, acc_t divisor,
                                                                acc_t* __restrict__ out_a, acc_t* __restrict__ out_b,
                                                                int64_t out_stride) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (w >= N * C) return;  // whole warps exit together
  const int lane = threadIdx.x & 31;
  const int64_t n = w / C;
  const int c = static_cast<int>(w - n * C);
  if (welford) {
    acc_t m = acc_t(0), M = acc_t(0);
    int64_t cnt = 0;
    for (int64_t s = lane; s < S; s += 32) {
      const int64_t nb = min64(chunk_len, HW - s * chunk_len);
      welford_merge(m, M, cnt, pa[(n * S + s) * C + c], pb[(n * S + s) * C + c], nb);
    }
    warp_welford(m, M, cnt);
    if (lane == 0) {
      out_a[n * out_stride + c] = m;
      // `M < 0 ? 0 : M` keeps NaN: a NaN or +-Inf in the channel makes M NaN, so std is NaN, as torch.std
      // (docs/ops.md, NaN and Inf in "avg+std").
      out_b[n * out_stride + c] = sqrt_acc((M < acc_t(0) ? acc_t(0) : M) / static_cast<acc_t>(HW));
    }
  } else {
    acc_t t = acc_t(0);
    for (int64_t s = lane; s < S; s += 32) t += pa[(n * S + s) * C + c];
    t = warp_sum(t);
    if (lane == 0) out_a[n * out_stride + c] = t / divisor;
  }
}

// ---------------------------------------------------------------------------------------------------------
// The squeeze-excitation MLP. One block per sample; hidden units one warp each (lanes over C, warp tree),
// channels one thread each (serial over Cr). Intermediates go through small global buffers, re-read after
// __syncthreads (visible block-wide), so C and Cr are not limited by shared memory.

template <typename scalar_t>
struct MlpWeights {
  const scalar_t* w1;     // [Cr, C]
  const scalar_t* b1;     // [Cr] or nullptr
  const scalar_t* w2;     // [C, Cr]
  const scalar_t* b2;     // [C] or nullptr
  const scalar_t* slope;  // [Cr] PReLU slopes, nullptr = ReLU
  int C, Cr;
};

template <typename acc_t>
__device__ __forceinline__ acc_t act_fwd(acc_t h, acc_t slope, bool prelu) {
  if (h > acc_t(0)) return h;
  return prelu ? slope * h : (h <= acc_t(0) ? acc_t(0) : h);  // ReLU keeps NaN, as torch does
}

// h[j] = b1[j] + sum_c w1[j,c] * s[c]; a = act(h). s_at(c) gives s[c].
template <typename scalar_t, typename acc_t, typename SFn>
__device__ __forceinline__ void mlp_hidden(const MlpWeights<scalar_t>& W, SFn s_at, acc_t* h, acc_t* a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int j = warp; j < W.Cr; j += nw) {
    acc_t t = acc_t(0);
    for (int c = lane; c < W.C; c += 32) t += to_acc<acc_t>(W.w1[static_cast<int64_t>(j) * W.C + c]) * s_at(c);
    t = warp_sum(t);
    if (lane == 0) {
      const acc_t hv = t + (W.b1 ? to_acc<acc_t>(W.b1[j]) : acc_t(0));
      h[j] = hv;
      a[j] = act_fwd(hv, W.slope ? to_acc<acc_t>(W.slope[j]) : acc_t(0), W.slope != nullptr);
    }
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t mlp_gate(const MlpWeights<scalar_t>& W, const acc_t* a, int c) {
  acc_t z = W.b2 ? to_acc<acc_t>(W.b2[c]) : acc_t(0);
  for (int j = 0; j < W.Cr; ++j) z += to_acc<acc_t>(W.w2[static_cast<int64_t>(c) * W.Cr + j]) * a[j];
  return sigmoid_acc(z);
}

// stats: [N, P, C] (P = 1: mean; P = 2: mean, std) -> g [N, C]; hbuf/abuf [N, Cr] scratch.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) mlp_fwd_kernel(MlpWeights<scalar_t> W, const at::opmath_type<scalar_t>* stats,
                                                         int P, at::opmath_type<scalar_t>* hbuf,
                                                         at::opmath_type<scalar_t>* abuf,
                                                         at::opmath_type<scalar_t>* g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.x;
  const int C = W.C;
  const acc_t* srow = stats + n * P * C;
  acc_t* h = hbuf + n * W.Cr;
  acc_t* a = abuf + n * W.Cr;
  mlp_hidden(W, [&](int c) { return P == 2 ? srow[c] + srow[C + c] : srow[c]; }, h, a);
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) g[n * C + c] = mlp_gate(W, a, c);
}

// Backward of the MLP for one sample. dg [N, C] = dL/dg. Writes the per-sample factors of the weight
// gradients (s, dz, a, dh, prelu term) for weight_grad_kernel, and the grad_x coefficients
// coef[k][n*C + c], k = 0: g, 1: ds/HW, 2: ds/(HW*std) (0 if std == 0 or pool == "avg"), 3: mean.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) mlp_bwd_kernel(
    MlpWeights<scalar_t> W, const at::opmath_type<scalar_t>* stats, int P, const at::opmath_type<scalar_t>* dg,
    int64_t HW, int64_t NC, at::opmath_type<scalar_t>* hbuf, at::opmath_type<scalar_t>* abuf,
    at::opmath_type<scalar_t>* sbuf, at::opmath_type<scalar_t>* dzbuf, at::opmath_type<scalar_t>* dhbuf,
    at::opmath_type<scalar_t>* pabuf, at::opmath_type<scalar_t>* coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.x;
  const int C = W.C, Cr = W.Cr;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const acc_t* srow = stats + n * P * C;
  acc_t* s = sbuf + n * C;
  acc_t* dz = dzbuf + n * C;
  acc_t* h = hbuf + n * Cr;
  acc_t* a = abuf + n * Cr;
  acc_t* dh = dhbuf + n * Cr;
  acc_t* pa = pabuf + n * Cr;
  const acc_t hw = static_cast<acc_t>(HW);

  for (int c = threadIdx.x; c < C; c += blockDim.x) s[c] = P == 2 ? srow[c] + srow[C + c] : srow[c];
  __syncthreads();
  mlp_hidden(W, [&](int c) { return s[c]; }, h, a);
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t gv = mlp_gate(W, a, c);
    dz[c] = dg[n * C + c] * gv * (acc_t(1) - gv);
    coef[n * C + c] = gv;
    coef[3 * NC + n * C + c] = srow[c];
  }
  __syncthreads();
  for (int j = warp; j < Cr; j += nw) {
    acc_t t = acc_t(0);
    for (int c = lane; c < C; c += 32) t += to_acc<acc_t>(W.w2[static_cast<int64_t>(c) * Cr + j]) * dz[c];
    t = warp_sum(t);
    if (lane == 0) {
      const acc_t hv = h[j];
      // ATen conventions: relu' = (h > 0); prelu' = h > 0 ? 1 : slope, slope' += h > 0 ? 0 : h * da.
      if (W.slope) {
        dh[j] = hv > acc_t(0) ? t : to_acc<acc_t>(W.slope[j]) * t;
        pa[j] = hv > acc_t(0) ? acc_t(0) : hv * t;
      } else {
        dh[j] = hv <= acc_t(0) ? acc_t(0) : t;
        pa[j] = acc_t(0);
      }
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t ds = acc_t(0);
    for (int j = 0; j < Cr; ++j) ds += to_acc<acc_t>(W.w1[static_cast<int64_t>(j) * C + c]) * dh[j];
    coef[NC + n * C + c] = ds / hw;
    acc_t b = acc_t(0);
    if (P == 2) {
      const acc_t sd = srow[C + c];
      if (sd != acc_t(0)) b = ds / (hw * sd);  // 0 only where std == 0; a NaN std gives NaN
    }
    coef[2 * NC + n * C + c] = b;
  }
}

// One element of a linear layer's weight gradients, summed over n = 0..N-1 in order: for k < rows * cols,
// gw[j, c] = sum_n dout[n, j] * in[n, c] (k = j * cols + c); for the next `rows` (if gb is wanted),
// gb[j] = sum_n dout[n, j]. Past both it returns false with k moved past this layer's elements.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool linear_grad(int64_t& k, int64_t N, int rows, int cols, const acc_t* dout,
                                            const acc_t* in, scalar_t* gw, scalar_t* gb) {
  const int64_t nw = static_cast<int64_t>(rows) * cols, nb = gb ? rows : 0;
  acc_t t = acc_t(0);
  if (k < nw) {
    const int64_t j = k / cols, c = k - j * cols;
    for (int64_t n = 0; n < N; ++n) t += dout[n * rows + j] * in[n * cols + c];
    gw[k] = static_cast<scalar_t>(t);
    return true;
  }
  k -= nw;
  if (k < nb) {
    for (int64_t n = 0; n < N; ++n) t += dout[n * rows + k];
    gb[k] = static_cast<scalar_t>(t);
    return true;
  }
  k -= nb;
  return false;
}

// Weight gradients: one thread per output element, summing the per-sample factors over n = 0..N-1 in order.
// Optional gw_sa: sum over chunks (in order) of the [KK, nchunks] partials.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) weight_grad_kernel(
    int64_t N, int C, int Cr, const at::opmath_type<scalar_t>* sbuf, const at::opmath_type<scalar_t>* dzbuf,
    const at::opmath_type<scalar_t>* abuf, const at::opmath_type<scalar_t>* dhbuf,
    const at::opmath_type<scalar_t>* pabuf, scalar_t* gw1, scalar_t* gb1, scalar_t* gw2, scalar_t* gb2,
    scalar_t* gslope, const at::opmath_type<scalar_t>* wsa_part, int KK, int64_t nchunks, scalar_t* gwsa) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nslope = gslope ? Cr : 0;
  const int64_t total = 2 * static_cast<int64_t>(C) * Cr + (gb1 ? Cr : 0) + (gb2 ? C : 0) + nslope + (gwsa ? KK : 0);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t k = e;
    if (linear_grad(k, N, Cr, C, dhbuf, sbuf, gw1, gb1)) continue;  // grad_w1[j, c] = sum_n dh[n, j] * s[n, c]
    if (linear_grad(k, N, C, Cr, dzbuf, abuf, gw2, gb2)) continue;  // grad_w2[c, j] = sum_n dz[n, c] * a[n, j]
    acc_t t = acc_t(0);
    if (k < nslope) {  // grad_slope[j] = sum_n (h <= 0 ? h * da : 0)
      for (int64_t n = 0; n < N; ++n) t += pabuf[n * Cr + k];
      gslope[k] = static_cast<scalar_t>(t);
      continue;
    }
    k -= nslope;
    for (int64_t q = 0; q < nchunks; ++q) t += wsa_part[k * nchunks + q];
    gwsa[k] = static_cast<scalar_t>(t);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host helpers

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// x in a layout the kernels handle natively; fmt is that layout.
inline at::Tensor native_layout(const at::Tensor& x, at::MemoryFormat& fmt) {
  fmt = x.suggest_memory_format();
  return x.is_contiguous(fmt) ? x : x.contiguous(fmt);
}

// A tensor the size of x (residual, grad_out) in x's layout and dtype/device checked.
inline at::Tensor same_layout(const at::Tensor& t, const at::Tensor& x, at::MemoryFormat fmt, const char* what) {
  TORCH_CHECK(t.sizes() == x.sizes(), what, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), what, " must have dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), what, " must be on ", x.device(), ", got ", t.device());
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

inline at::Tensor small_weight(const at::Tensor& w, const at::Tensor& x, std::initializer_list<int64_t> shape,
                               const char* what) {
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), what, " must have the dtype of x (", x.scalar_type(), "), got ",
              w.scalar_type());
  TORCH_CHECK(w.device() == x.device(), what, " must be on ", x.device(), ", got ", w.device());
  TORCH_CHECK(w.sizes() == c10::IntArrayRef(shape), what, " must have shape ", c10::IntArrayRef(shape), ", got ",
              w.sizes());
  return w.contiguous();
}

inline void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(SRK_ON_DEVICE(x), op, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": x must be float64, float32, float16 or bfloat16, got ", t);
  if (x.size(0) > 0) {
    TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op, ": x must have C, H, W > 0, got ",
                x.sizes());
    TORCH_CHECK(x.size(1) <= INT_MAX / 2, op, ": too many channels");
  }
}

// The optional residual of a forward, in x's layout fmt (undefined when absent).
inline at::Tensor optional_residual(const std::optional<at::Tensor>& residual, const at::Tensor& x,
                                    at::MemoryFormat fmt) {
  return residual.has_value() && residual->defined() ? same_layout(*residual, x, fmt, "residual") : at::Tensor();
}

// A tensor the forward saved for the backward (stats, mean, maxmap): acc dtype, x's device, `shape`.
inline void check_saved(const at::Tensor& t, const char* name, c10::IntArrayRef shape, const at::Tensor& x,
                        const char* op) {
  const auto acc = acc_dtype(x.scalar_type());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must have dtype ", acc, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// A weight gradient's buffer: zeros for an empty batch (no kernel runs then), else uninitialised.
inline at::Tensor weight_grad_buffer(const at::Tensor& w, int64_t N) {
  return N == 0 ? at::zeros(w.sizes(), w.options()) : at::empty(w.sizes(), w.options());
}

// A residual read while the kernels write dst: the very same elements (Full = same pointer and strides) are
// safe, each element being read before it is written by the same thread; any other overlap is copied first.
inline void unalias_residual(at::Tensor& res, const at::Tensor& dst, at::MemoryFormat fmt) {
  if (!res.defined()) return;
  const auto st = at::get_overlap_status(res, dst);
  if (st == at::MemOverlapStatus::Partial || st == at::MemOverlapStatus::TooHard) res = res.clone(fmt);
}

// Where an `_out` op's kernels write: `out` itself when it has x's native layout and 16-byte alignment, else a
// temporary in that layout (copied into `out` afterwards). Alignment matters because the vector width also
// sets the pooling's summation order: the result must not depend on where the caller's buffer starts. The
// residual is then made safe to read (unalias_residual).
inline at::Tensor out_target(const at::Tensor& out, const at::Tensor& x_in, const at::Tensor& x, at::MemoryFormat fmt,
                             at::Tensor& res, const char* op) {
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": out must have the shape of x ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out must have dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  TORCH_CHECK(out.device() == x.device(), op, ": out must be on ", x.device(), ", got ", out.device());
  at::assert_no_overlap(out, x_in);
  const bool direct = out.is_contiguous(fmt) && aligned16(out.data_ptr());
  at::Tensor dst = direct ? out : at::empty(x.sizes(), x.options(), fmt);
  unalias_residual(res, dst, fmt);
  return dst;
}

// The body of both `_out` ops: fwd(dst) runs the forward into out_target's choice, then the copy if needed.
template <typename Fwd>
inline void forward_out(const at::Tensor& out, const at::Tensor& x_in, const at::Tensor& x, at::MemoryFormat fmt,
                        at::Tensor& res, const char* op, const Fwd& fwd) {
  const at::Tensor dst = out_target(out, x_in, x, fmt, res, op);
  fwd(dst);
  if (!dst.is_same(out)) out.copy_(dst);
}

// t in layout fmt, moved to 16-byte aligned storage (one copy) when its shape allows the 16-byte vector path but
// its data does not start aligned. Applied to every tensor a vectorised kernel reads, so the vector width, and
// with it the reductions' summation order, depends only on (C, H, W, dtype), never on where a caller's buffer
// starts (issue #14, fix 4; tests/cuda_emu/test_emulated_kernels.py::test_alignment_does_not_change_bits).
inline at::Tensor vec_aligned(const at::Tensor& t, at::MemoryFormat fmt) {
  if (!t.defined() || t.numel() == 0 || aligned16(t.data_ptr())) return t;
  const int64_t VM = 16 / static_cast<int64_t>(t.element_size());
  const bool shape_ok = fmt == at::MemoryFormat::ChannelsLast ? t.size(1) % VM == 0 : (t.size(2) * t.size(3)) % VM == 0;
  return shape_ok ? t.clone(fmt) : t;
}

// The operands an attention forward starts from: x_in in its native layout (fmt), 16-byte aligned, and the
// residual (undefined when absent) in that layout, aligned too.
struct ForwardOperands {
  at::MemoryFormat fmt;
  at::Tensor x, res;
  bool nhwc() const { return fmt == at::MemoryFormat::ChannelsLast; }
};

inline ForwardOperands forward_operands(const at::Tensor& x_in, const std::optional<at::Tensor>& residual) {
  ForwardOperands o;
  const at::Tensor x_nat = native_layout(x_in, o.fmt);  // sets fmt
  o.x = vec_aligned(x_nat, o.fmt);
  o.res = vec_aligned(optional_residual(residual, o.x, o.fmt), o.fmt);
  return o;
}

// An attention forward after its argument checks, for the op (out undefined) and its _out variant:
// run(in, dst) runs the kernels on the operands into dst, a new tensor in x's native layout (returned) or the
// place forward_out picks for the caller's out.
template <typename Run>
inline at::Tensor attention_forward(const at::Tensor& out, const at::Tensor& x_in,
                                    const std::optional<at::Tensor>& residual, const char* op, const Run& run) {
  ForwardOperands in = forward_operands(x_in, residual);
  if (out.defined()) {
    forward_out(out, x_in, in.x, in.fmt, in.res, op, [&](const at::Tensor& dst) { run(in, dst); });
    return at::Tensor();
  }
  at::Tensor y = at::empty(in.x.sizes(), in.x.options(), in.fmt);
  run(in, y);
  return y;
}

// The operands an attention backward starts from: x_in in its native layout (fmt), grad_out in that layout,
// both 16-byte aligned, and grad_x allocated in it.
struct BackwardOperands {
  at::MemoryFormat fmt;
  at::Tensor x, go, grad_x;
  bool nhwc() const { return fmt == at::MemoryFormat::ChannelsLast; }
};

inline BackwardOperands backward_operands(const at::Tensor& x_in, const at::Tensor& grad_out) {
  BackwardOperands o;
  const at::Tensor x_nat = native_layout(x_in, o.fmt);  // sets fmt
  o.x = vec_aligned(x_nat, o.fmt);
  o.go = vec_aligned(same_layout(grad_out, o.x, o.fmt, "grad_out"), o.fmt);
  o.grad_x = at::empty(o.x.sizes(), o.x.options(), o.fmt);
  return o;
}

// run(std::integral_constant<int, V>) with V = VM when `vec`, else V = 1: every kernel of a call takes the
// same V (it also fixes the reductions' summation order).
template <int VM, typename F>
inline void with_vec_width(bool vec, const F& run) {
  if (vec) {
    run(std::integral_constant<int, VM>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

// The launch of an attention op on x ([N, C, H, W], native layout) and the other buffers its kernels read or
// write (undefined = absent): run.template operator()<scalar_t, acc_t, V>(stream) for x's dtype scalar_t,
// acc_t = at::opmath_type<scalar_t> and V = 16 / sizeof(scalar_t) (the 16-byte vector path) when the vectorised
// dimension (C in NHWC, H*W in NCHW) is a multiple of it and every buffer is 16-byte aligned, else V = 1
// (with_vec_width). An empty batch launches nothing; a batch must fit the grid.
template <typename F>
inline void dispatch_vectorized(const at::Tensor& x, bool nhwc, std::initializer_list<at::Tensor> bufs,
                                const char* op, const F& run) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (N == 0) return;
  TORCH_CHECK(N <= kMaxGridX, op, ": batch too large");
  bool aligned = aligned16(x.data_ptr());
  for (const at::Tensor& t : bufs) aligned = aligned && (!t.defined() || aligned16(t.data_ptr()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "srkernels_attention_cuda", [&] {
    constexpr int VM = 16 / sizeof(scalar_t);
    with_vec_width<VM>(aligned && (nhwc ? C % VM == 0 : HW % VM == 0), [&](auto vtag) {
      run.template operator()<scalar_t, at::opmath_type<scalar_t>, decltype(vtag)::value>(stream);
    });
  });
}

// Elementwise launch on the native layout: V = max vector width or 1, chosen by the caller.
template <int V, typename Op>
inline void launch_ew(const Op& op, bool nhwc, int64_t N, int C, int64_t HW, cudaStream_t stream) {
  if (!nhwc) {
    const int64_t nvec = HW / V;
    const int64_t gx = (nvec + kEwIters * kBlock - 1) / (kEwIters * kBlock);
    TORCH_CHECK(gx <= kMaxGridX, "srkernels: tensor too large");
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(std::min<int64_t>(N * C, kMaxGridY)));
    SRK_LAUNCH(grid, kBlock, 0, stream, ew_nchw_kernel<V, Op>)(op, N * C, C, HW);
  } else {
    const NhwcGeom g = nhwc_geom(C, HW, V, 8, 0);
    const int64_t gx = g.S * g.CT;
    TORCH_CHECK(gx <= kMaxGridX, "srkernels: tensor too large");
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(std::min<int64_t>(N, kMaxGridY)));
    SRK_LAUNCH(grid, kBlock, 0, stream, ew_nhwc_kernel<V, Op>)(op, N, C, HW, g.log2TC, g.CT, g.ppc);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pooling partials of the NHWC reduction for any mode: returns the geometry used.
template <typename scalar_t, int V, int MODE>
inline NhwcGeom launch_reduce_nhwc(const scalar_t* x, const scalar_t* go, const at::opmath_type<scalar_t>* ca,
                                   const at::opmath_type<scalar_t>* sa, const at::opmath_type<scalar_t>* mref,
                                   at::opmath_type<scalar_t>* part_a, at::opmath_type<scalar_t>* part_b,
                                   at::opmath_type<scalar_t>* pix_a, int* pix_b, const NhwcGeom& g, int64_t N,
                                   int C, int64_t HW, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t gx = g.S * g.CT;
  TORCH_CHECK(gx <= kMaxGridX, "srkernels: tensor too large");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(std::min<int64_t>(N, kMaxGridY)));
  const size_t smem = reduce_nhwc_smem<acc_t>(MODE, V);
  SRK_LAUNCH(grid, kBlock, smem, stream, reduce_nhwc_kernel<scalar_t, V, MODE>)(
      x, go, ca, sa, mref, part_a, part_b, pix_a, pix_b, N, C, HW, g.log2TC, g.CT, g.S, g.ppc, g.iters);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g;
}

template <typename acc_t>
inline void launch_merge(const acc_t* pa, const acc_t* pb, int64_t N, int C, int64_t S, int64_t chunk_len,
                         int64_t HW, bool welford, acc_t divisor, acc_t* out_a, acc_t* out_b, int64_t out_stride,
                         cudaStream_t stream) {
  const int64_t blocks = (N * C * 32 + kBlock - 1) / kBlock;
  TORCH_CHECK(blocks <= kMaxGridX, "srkernels: too many channels");
  SRK_LAUNCH(static_cast<unsigned>(blocks), kBlock, 0, stream, merge_partials_kernel<acc_t>)(
      pa, pb, N, C, S, chunk_len, HW, welford, divisor, out_a, out_b, out_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline int mlp_threads(int C, int Cr) {
  const int want = std::max(C, 32 * std::min(Cr, 8));
  return std::min(kBlock, std::max(64, (want + 31) / 32 * 32));
}

// Scratch for the MLP backward + weight-grad reduction.
struct MlpBwdScratch {
  at::Tensor h, a, s, dz, dh, pa, coef;
  MlpBwdScratch(int64_t N, int64_t C, int64_t Cr, const at::TensorOptions& o)
      : h(at::empty({N, Cr}, o)),
        a(at::empty({N, Cr}, o)),
        s(at::empty({N, C}, o)),
        dz(at::empty({N, C}, o)),
        dh(at::empty({N, Cr}, o)),
        pa(at::empty({N, Cr}, o)),
        coef(at::empty({4, N, C}, o)) {}
};

// MLP weights from the checked tensors; undefined b1, b2, slope = absent (no bias, ReLU).
template <typename scalar_t>
MlpWeights<scalar_t> mlp_weights(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                 const at::Tensor& slope) {
  MlpWeights<scalar_t> W;
  W.w1 = w1.data_ptr<scalar_t>();
  W.b1 = b1.defined() ? b1.data_ptr<scalar_t>() : nullptr;
  W.w2 = w2.data_ptr<scalar_t>();
  W.b2 = b2.defined() ? b2.data_ptr<scalar_t>() : nullptr;
  W.slope = slope.defined() ? slope.data_ptr<scalar_t>() : nullptr;
  W.C = static_cast<int>(w1.size(1));
  W.Cr = static_cast<int>(w1.size(0));
  return W;
}

// g [N, C] = the MLP gate of the pooled stats [N, P, C] (mlp_fwd_kernel, one block per sample).
template <typename scalar_t>
void launch_mlp_fwd(const MlpWeights<scalar_t>& W, const at::opmath_type<scalar_t>* stats, int P, int64_t N,
                    const at::TensorOptions& acc_opts, at::opmath_type<scalar_t>* g, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor hb = at::empty({N, W.Cr}, acc_opts), ab = at::empty({N, W.Cr}, acc_opts);
  SRK_LAUNCH(static_cast<unsigned>(N), mlp_threads(W.C, W.Cr), 0, stream, mlp_fwd_kernel<scalar_t>)(
      W, stats, P, hb.data_ptr<acc_t>(), ab.data_ptr<acc_t>(), g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The MLP backward from dg [N, C] (mlp_bwd_kernel: T.coef gets the grad_x coefficients) and the weight
// gradients summed over the batch in order (weight_grad_kernel). gb1, gb2, gslope, gwsa: nullptr = not
// wanted; gwsa sums the [KK, nchunks] partials wsa_part.
template <typename scalar_t>
void launch_mlp_bwd(const MlpWeights<scalar_t>& W, const at::opmath_type<scalar_t>* stats, int P,
                    const at::opmath_type<scalar_t>* dg, int64_t N, int64_t HW, MlpBwdScratch& T, scalar_t* gw1,
                    scalar_t* gb1, scalar_t* gw2, scalar_t* gb2, scalar_t* gslope,
                    const at::opmath_type<scalar_t>* wsa_part, int KK, int64_t nchunks, scalar_t* gwsa,
                    cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = W.C, Cr = W.Cr;
  SRK_LAUNCH(static_cast<unsigned>(N), mlp_threads(W.C, W.Cr), 0, stream, mlp_bwd_kernel<scalar_t>)(
      W, stats, P, dg, HW, N * C, T.h.data_ptr<acc_t>(), T.a.data_ptr<acc_t>(), T.s.data_ptr<acc_t>(),
      T.dz.data_ptr<acc_t>(), T.dh.data_ptr<acc_t>(), T.pa.data_ptr<acc_t>(), T.coef.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // One thread per output of weight_grad_kernel, at most 4096 blocks (it loops over the rest); each output is
  // one thread's ordered sum, so the grid does not change any value.
  const int64_t total = 2 * C * Cr + (gb1 ? Cr : 0) + (gb2 ? C : 0) + (gslope ? Cr : 0) + (gwsa ? KK : 0);
  const unsigned blocks = static_cast<unsigned>(std::clamp<int64_t>((total + kBlock - 1) / kBlock, 1, 4096));
  SRK_LAUNCH(blocks, kBlock, 0, stream, weight_grad_kernel<scalar_t>)(
      N, W.C, W.Cr, T.s.data_ptr<acc_t>(), T.dz.data_ptr<acc_t>(), T.a.data_ptr<acc_t>(), T.dh.data_ptr<acc_t>(),
      T.pa.data_ptr<acc_t>(), gw1, gb1, gw2, gb2, gslope, wsa_part, KK, nchunks, gwsa);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace srkernels::cuda
