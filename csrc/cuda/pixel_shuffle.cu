// CUDA pixel_shuffle (conv epilogue: bias, activation, shuffle, residual), its backward, pixel_shuffle_out and
// pixel_unshuffle (contract: docs/ops.md § pixel_shuffle).
//
// Bytes moved, in passes (one pass = N*C*Ho*Wo = N*Cin*H*W elements of the dtype); bias, slopes and the
// [N, S, Cin] reduction partials are < 1/1000 of a pass and ignored:
//   forward  : read x (1) + read residual (1, if any) + write out (1)                          = 2 (3)
//   backward : read grad_out (1) + read x (1, relu/prelu only) + write grad_x (1)               = 2 (3)
//              grad_bias / grad_act_weight come from the same pass (block partials + ordered merge)
//   unshuffle: read x (1) + write (1)                                                           = 2
//   _out     : as forward when `out` has x's layout, else + one copy pass (read + write)
// All of these are the floor of docs/ops.md. Every kernel walks its *output* in the native layout (stores
// coalesced, 128-bit when the output's row / channel run and pointers allow) and gathers its input with
// scalar loads. A warp's gathered loads fall in a few contiguous runs (NCHW forward: r runs of one input row
// each; NHWC backward: C-contiguous runs of grad_out pixels), so DRAM sees each input sector once. Two
// gathers use only part of each sector per block and lean on L2 for the rest (r times the L2->SM traffic
// for that input): NHWC forward (the r output rows of one input row are in different blocks) and NCHW
// backward (the r planes that interleave in one grad_out row are in different blocks).
//
// Kernels:
//   forward  : ew_nchw_kernel / ew_nhwc_kernel (attention_common.cuh) with PsFwdOp over the output
//   backward : ps_bwd_nchw_kernel (block = chunk of one x plane) / ps_bwd_nhwc_kernel (block = pixel chunk x
//              channel tile) writing grad_x and, when needed, per-block partials of grad_bias and of the
//              prelu slope gradient -> ps_grad_merge_kernel (sums the partials in a fixed order)
//   unshuffle: the backward kernels with act "none" and no reductions (grad_x = unshuffle(grad_out))
// Deterministic: no float atomics; how a tensor is split into blocks depends only on (C, H, W, r, dtype).
#include "attention_common.cuh"
#include "runtime/register.h"

#include <ATen/MemoryOverlap.h>

#include <array>
#include <string>
#include <string_view>
#include <tuple>

namespace srkernels::cuda {
namespace {

enum PsAct : int { kActNone = 0, kActRelu = 1, kActPrelu = 2 };

// a / b for 0 <= a, 0 < b <= INT_MAX: the 32-bit divider when a fits (the common case), as a 64-bit division
// costs several times more and these run once per vector.
__device__ __forceinline__ int64_t div_fast(int64_t a, int b) {
  return (static_cast<uint64_t>(a) >> 32) == 0
             ? static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b))
             : a / b;
}

// act(v) in acc. ReLU keeps NaN (as torch does).
template <typename acc_t>
__device__ __forceinline__ acc_t ps_act(acc_t v, int act, acc_t slope) {
  if (act == kActNone || v > acc_t(0)) return v;
  if (act == kActPrelu) return slope * v;
  return v <= acc_t(0) ? acc_t(0) : v;
}

// d act / d pre times gy, with ATen's conventions (relu: 0 where pre <= 0; prelu: slope where !(pre > 0),
// slope gradient pre * gy there); ps accumulates the slope gradient.
template <typename acc_t>
__device__ __forceinline__ acc_t ps_grad(acc_t gy, acc_t pre, int act, acc_t slope, acc_t& ps) {
  if (act == kActNone) return gy;
  if (act == kActRelu) return pre <= acc_t(0) ? acc_t(0) : gy;
  if (pre > acc_t(0)) return gy;
  ps += pre * gy;
  return slope * gy;
}

struct PsDims {
  int64_t N = 0, HW = 0, HoWo = 0;
  int C = 0, Cin = 0, r = 1, rr = 1, H = 0, W = 0, Ho = 0, Wo = 0;
};

// ---------------------------------------------------------------------------------------------------------
// Forward: out[n, c, h*r + i, w*r + j] = act(x[n, k, h, w] + bias[k]) + residual[...], k = c*r*r + i*r + j.
// One vector of V output elements per call (NCHW: along an output row, may wrap to the next row; NHWC: V
// consecutive output channels of one pixel). The residual vector is read before out is written at the same
// offset by the same thread, so out may be the residual itself.
template <typename scalar_t>
struct PsFwdOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;      // [N, Cin, H, W], same layout as out
  const scalar_t* bias;   // [Cin] or nullptr
  const scalar_t* slope;  // [C] (prelu) or nullptr
  const scalar_t* res;    // like out, or nullptr
  scalar_t* out;          // [N, C, Ho, Wo]
  PsDims d;
  int act;

  struct PlaneC {
    const scalar_t* xs;  // x plane of conv channel c*r*r
    const scalar_t* bs;  // bias + c*r*r, or nullptr
    acc_t slope;
    int64_t pix0;  // n * Ho*Wo
  };
  __device__ PlaneC plane(int64_t n, int c, int64_t) const {
    const int64_t k0 = static_cast<int64_t>(c) * d.rr;
    return {x + (n * d.Cin + k0) * d.HW, bias ? bias + k0 : nullptr, slope ? to_acc<acc_t>(slope[c]) : acc_t(0),
            n * d.HoWo};
  }
  template <int V>
  __device__ void nchw(const PlaneC& pc, int64_t off, int64_t pix, int) const {
    const int64_t P = pix - pc.pix0;  // position in the output plane
    int oy = static_cast<int>(div_fast(P, d.Wo));
    int ox = static_cast<int>(P - static_cast<int64_t>(oy) * d.Wo);
    int h = oy / d.r, i = oy - h * d.r, w = ox / d.r, j = ox - w * d.r;
    Vec<scalar_t, V> rv;
    if (res) rv = vload<V>(res + off);
    Vec<scalar_t, V> o;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const int k = i * d.r + j;
      acc_t v = to_acc<acc_t>(pc.xs[k * d.HW + static_cast<int64_t>(h) * d.W + w]);
      if (pc.bs) v += to_acc<acc_t>(pc.bs[k]);
      v = ps_act(v, act, pc.slope);
      if (res) v += to_acc<acc_t>(rv.v[l]);
      o.v[l] = static_cast<scalar_t>(v);
      // next output element: ox + 1, wrapping to the next output row
      if (++j == d.r) {
        j = 0;
        ++w;
      }
      if (++ox == d.Wo) {
        ox = w = j = 0;
        if (++i == d.r) {
          i = 0;
          ++h;
        }
      }
    }
    vstore<V>(out + off, o);
  }

  template <int V>
  struct ChanC {
    const scalar_t* xs;  // x of sample n, at conv channel c0*r*r
    const scalar_t* bs;  // bias + c0*r*r, or nullptr
    acc_t slope[V];
    int64_t pix0;
  };
  template <int V>
  __device__ ChanC<V> chan(int64_t n, int c0) const {
    ChanC<V> cc;
    cc.xs = x + n * d.HW * d.Cin + static_cast<int64_t>(c0) * d.rr;
    cc.bs = bias ? bias + static_cast<int64_t>(c0) * d.rr : nullptr;
#pragma unroll
    for (int l = 0; l < V; ++l) cc.slope[l] = slope ? to_acc<acc_t>(slope[c0 + l]) : acc_t(0);
    cc.pix0 = n * d.HoWo;
    return cc;
  }
  template <int V>
  __device__ void nhwc(const ChanC<V>& cc, int64_t off, int64_t pix, int) const {
    const int64_t P = pix - cc.pix0;  // output pixel within the sample
    const int oy = static_cast<int>(div_fast(P, d.Wo));
    const int ox = static_cast<int>(P - static_cast<int64_t>(oy) * d.Wo);
    const int h = oy / d.r, i = oy - h * d.r, w = ox / d.r, j = ox - w * d.r;
    const int k = i * d.r + j;
    const scalar_t* xp = cc.xs + (static_cast<int64_t>(h) * d.W + w) * d.Cin + k;  // lane l: xp[l * r*r]
    Vec<scalar_t, V> rv;
    if (res) rv = vload<V>(res + off);
    Vec<scalar_t, V> o;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      acc_t v = to_acc<acc_t>(xp[l * d.rr]);
      if (cc.bs) v += to_acc<acc_t>(cc.bs[l * d.rr + k]);
      v = ps_act(v, act, cc.slope[l]);
      if (res) v += to_acc<acc_t>(rv.v[l]);
      o.v[l] = static_cast<scalar_t>(v);
    }
    vstore<V>(out + off, o);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Backward, walking grad_x ([N, Cin, H, W]); gy = grad_out[n, c, h*r + i, w*r + j] is gathered.
// part_b / part_s ([N, S, Cin], acc, nullptr = not wanted): per block sums of grad_x (-> grad_bias[k]) and of
// the prelu slope term (-> grad_act_weight[k / (r*r)]).
template <typename scalar_t>
struct PsBwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go;     // [N, C, Ho, Wo], same layout as gx
  const scalar_t* x;      // [N, Cin, H, W] or nullptr (act "none")
  const scalar_t* bias;   // [Cin] or nullptr
  const scalar_t* slope;  // [C] (prelu) or nullptr
  scalar_t* gx;           // [N, Cin, H, W]
  acc_t* part_b;
  acc_t* part_s;
  PsDims d;
  int act;
};

// NCHW: block (chunk s, plane n*Cin + k) covers chunk_vecs vectors of one x plane. Within the plane
// (i, j) are fixed, so grad_out is read along rows h*r + i at stride r.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kBlock) ps_bwd_nchw_kernel(PsBwdArgs<scalar_t> a, int64_t S, int64_t chunk_vecs) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sh[32];
  const PsDims& d = a.d;
  const int64_t planes = d.N * d.Cin;
  const int64_t nvec = d.HW / V;
  const int64_t s = blockIdx.x;
  const int64_t v_begin = s * chunk_vecs, v_end = min64(nvec, v_begin + chunk_vecs);
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t n = plane / d.Cin;
    const int k = static_cast<int>(plane - n * d.Cin);
    const int c = k / d.rr, q = k - c * d.rr, i = q / d.r, j = q - i * d.r;
    const scalar_t* gb = a.go + ((n * d.C + c) * d.Ho + i) * static_cast<int64_t>(d.Wo) + j;  // + h*r*Wo + w*r
    const acc_t bk = a.bias ? to_acc<acc_t>(a.bias[k]) : acc_t(0);
    const acc_t sl = a.slope ? to_acc<acc_t>(a.slope[c]) : acc_t(0);
    const int64_t base = plane * d.HW;
    acc_t sb = acc_t(0), ss = acc_t(0);
    for (int64_t v = v_begin + threadIdx.x; v < v_end; v += blockDim.x) {
      const int64_t P = v * V;
      int h = static_cast<int>(div_fast(P, d.W));
      int w = static_cast<int>(P - static_cast<int64_t>(h) * d.W);
      Vec<scalar_t, V> xv;
      if (a.x) xv = vload<V>(a.x + base + P);
      Vec<scalar_t, V> o;
#pragma unroll
      for (int l = 0; l < V; ++l) {
        const acc_t gy = to_acc<acc_t>(gb[static_cast<int64_t>(h) * d.r * d.Wo + static_cast<int64_t>(w) * d.r]);
        const acc_t pre = a.x ? to_acc<acc_t>(xv.v[l]) + bk : acc_t(0);
        const acc_t g = ps_grad(gy, pre, a.act, sl, ss);
        sb += g;
        o.v[l] = static_cast<scalar_t>(g);
        if (++w == d.W) {
          w = 0;
          ++h;
        }
      }
      vstore<V>(a.gx + base + P, o);
    }
    const int64_t pidx = (n * S + s) * d.Cin + k;
    if (a.part_b) {  // uniform: every thread reaches the barriers in block_sum
      const acc_t t = block_sum(sb, sh);
      if (threadIdx.x == 0) a.part_b[pidx] = t;
    }
    if (a.part_s) {
      const acc_t t = block_sum(ss, sh);
      if (threadIdx.x == 0) a.part_s[pidx] = t;
    }
  }
}

// NHWC: block (pixel chunk s x channel tile ct, sample n) as NhwcGeom: TC lanes over V-vectors of the Cin
// channels of a pixel, TP pixels. Lane l's conv channel k = k0 + l maps to a fixed (c, i, j), so its grad_out
// element sits at a fixed offset from the output pixel (h*r, w*r); a warp reads whole C-runs of r*r pixels.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kBlock) ps_bwd_nhwc_kernel(PsBwdArgs<scalar_t> a, int log2TC, int CT, int64_t S,
                                                              int64_t ppc) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sh_b = reinterpret_cast<acc_t*>(smem_raw);  // [blockDim][V]
  acc_t* sh_s = sh_b + blockDim.x * V;                // [blockDim][V]
  const PsDims& d = a.d;
  const int TC = 1 << log2TC;
  const int tid = threadIdx.x, tx = tid & (TC - 1), ty = tid >> log2TC, TP = blockDim.x >> log2TC;
  const int ct = static_cast<int>(blockIdx.x % CT);
  const int64_t s = blockIdx.x / CT;
  const int k0 = (ct * TC + tx) * V;
  const bool cact = k0 < d.Cin;  // no early exit: every thread takes part in the column tree
  const int64_t p_begin = s * ppc, p_end = min64(d.HW, p_begin + ppc);

  int64_t goff[V];
  acc_t bk[V], sl[V];
#pragma unroll
  for (int l = 0; l < V; ++l) {
    goff[l] = 0;
    bk[l] = sl[l] = acc_t(0);
    if (cact) {
      const int k = k0 + l, c = k / d.rr, q = k - c * d.rr, i = q / d.r, j = q - i * d.r;
      goff[l] = (static_cast<int64_t>(i) * d.Wo + j) * d.C + c;
      if (a.bias) bk[l] = to_acc<acc_t>(a.bias[k]);
      if (a.slope) sl[l] = to_acc<acc_t>(a.slope[c]);
    }
  }
  const bool reduce = a.part_b || a.part_s;

  for (int64_t n = blockIdx.y; n < d.N; n += gridDim.y) {
    acc_t lb[V], ls[V];
#pragma unroll
    for (int l = 0; l < V; ++l) lb[l] = ls[l] = acc_t(0);
    if (cact) {
      for (int64_t p = p_begin + ty; p < p_end; p += TP) {
        const int h = static_cast<int>(div_fast(p, d.W));
        const int w = static_cast<int>(p - static_cast<int64_t>(h) * d.W);
        const scalar_t* gb =
            a.go + ((n * d.Ho + static_cast<int64_t>(h) * d.r) * d.Wo + static_cast<int64_t>(w) * d.r) * d.C;
        const int64_t off = (n * d.HW + p) * d.Cin + k0;
        Vec<scalar_t, V> xv;
        if (a.x) xv = vload<V>(a.x + off);
        Vec<scalar_t, V> o;
#pragma unroll
        for (int l = 0; l < V; ++l) {
          const acc_t gy = to_acc<acc_t>(gb[goff[l]]);
          const acc_t pre = a.x ? to_acc<acc_t>(xv.v[l]) + bk[l] : acc_t(0);
          const acc_t g = ps_grad(gy, pre, a.act, sl[l], ls[l]);
          lb[l] += g;
          o.v[l] = static_cast<scalar_t>(g);
        }
        vstore<V>(a.gx + off, o);
      }
    }
    if (!reduce) continue;  // uniform

    // Column sums over the TP pixel rows of the block: fixed tree in shared memory.
#pragma unroll
    for (int l = 0; l < V; ++l) {
      sh_b[tid * V + l] = lb[l];
      sh_s[tid * V + l] = ls[l];
    }
    __syncthreads();
    for (int stride = TP >> 1; stride > 0; stride >>= 1) {
      if (ty < stride) {
        const int o = tid + stride * TC;
#pragma unroll
        for (int l = 0; l < V; ++l) {
          sh_b[tid * V + l] += sh_b[o * V + l];
          sh_s[tid * V + l] += sh_s[o * V + l];
        }
      }
      __syncthreads();
    }
    if (ty == 0 && cact) {
      const int64_t base = (n * S + s) * d.Cin + k0;
#pragma unroll
      for (int l = 0; l < V; ++l) {
        if (a.part_b) a.part_b[base + l] = sh_b[tx * V + l];
        if (a.part_s) a.part_s[base + l] = sh_s[tx * V + l];
      }
    }
    __syncthreads();  // shared memory is reused for the next sample
  }
}

// grad_bias[k] = sum_{t < T} part_b[t, k]; grad_act_weight[c] = sum_{t < T, q < r*r} part_s[t, c*r*r + q]
// (t = n*S + s). One warp per output value, lanes over the terms in index order, then a warp tree.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) ps_grad_merge_kernel(const at::opmath_type<scalar_t>* __restrict__ part_b,
                                                                const at::opmath_type<scalar_t>* __restrict__ part_s,
                                                                int64_t T, int Cin, int C, int rr,
                                                                scalar_t* __restrict__ gbias,
                                                                scalar_t* __restrict__ gslope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nb = gbias ? Cin : 0, ns = gslope ? C : 0;
  const int64_t wid = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (wid >= nb + ns) return;  // whole warps exit together
  const int lane = threadIdx.x & 31;
  acc_t t = acc_t(0);
  if (wid < nb) {
    for (int64_t u = lane; u < T; u += 32) t += part_b[u * Cin + wid];
  } else {
    const int64_t c = wid - nb;
    for (int64_t u = lane; u < T * rr; u += 32) {
      const int64_t tt = u / rr;
      t += part_s[tt * Cin + c * rr + (u - tt * rr)];
    }
  }
  t = warp_sum(t);
  if (lane == 0) {
    if (wid < nb) {
      gbias[wid] = static_cast<scalar_t>(t);
    } else {
      gslope[wid - nb] = static_cast<scalar_t>(t);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side

int parse_act(std::string_view act, const char* op) {
  if (act == "none") return kActNone;
  if (act == "relu") return kActRelu;
  if (act == "prelu") return kActPrelu;
  TORCH_CHECK(false, op, ": act must be \"none\", \"relu\" or \"prelu\", got \"", std::string(act), "\"");
  return kActNone;
}

// Shapes from the small side [N, Cin, H, W] and r.
PsDims ps_dims(int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t r, const char* op) {
  TORCH_CHECK(r >= 1, op, ": r must be >= 1, got ", r);
  TORCH_CHECK(r <= 65535 && Cin % (r * r) == 0, op, ": x has ", Cin, " channels, not a multiple of r*r = ", r * r);
  TORCH_CHECK(Cin <= INT_MAX / 2 && H * r <= INT_MAX && W * r <= INT_MAX, op, ": tensor too large");
  PsDims d;
  d.N = N;
  d.r = static_cast<int>(r);
  d.rr = static_cast<int>(r * r);
  d.Cin = static_cast<int>(Cin);
  d.C = static_cast<int>(Cin / (r * r));
  d.H = static_cast<int>(H);
  d.W = static_cast<int>(W);
  d.Ho = static_cast<int>(H * r);
  d.Wo = static_cast<int>(W * r);
  d.HW = H * W;
  d.HoWo = d.HW * r * r;
  return d;
}

// t (sized like the other side of the shuffle) in layout fmt, dtype and device checked.
at::Tensor in_layout(const at::Tensor& t, const at::Tensor& ref, c10::IntArrayRef shape, at::MemoryFormat fmt,
                     const char* op, const char* what) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", what, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", what, " must have dtype ", ref.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", what, " must be on ", ref.device(), ", got ", t.device());
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

struct PsFwdArgs {
  at::Tensor x, bias, slope, res;  // x native; bias, slope, res undefined when absent
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  PsDims d;
  int act = kActNone;
};

PsFwdArgs ps_fwd_args(const at::Tensor& x_in, int64_t r, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& act_weight, c10::string_view act,
                      const std::optional<at::Tensor>& residual, const char* op) {
  PsFwdArgs A;
  A.act = parse_act(act, op);
  A.x = native_layout(x_in, A.fmt);
  A.d = ps_dims(x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3), r, op);
  const PsDims& d = A.d;
  if (bias.has_value() && bias->defined()) A.bias = small_weight(*bias, A.x, {d.Cin}, "bias");
  const bool has_w = act_weight.has_value() && act_weight->defined();
  TORCH_CHECK(has_w == (A.act == kActPrelu), op, ": act_weight must be given exactly when act is \"prelu\"");
  if (has_w) A.slope = small_weight(*act_weight, A.x, {d.C}, "act_weight");
  if (residual.has_value() && residual->defined())
    A.res = in_layout(*residual, A.x, {d.N, d.C, d.Ho, d.Wo}, A.fmt, op, "residual");
  return A;
}

// The forward into `out` ([N, C, Ho, Wo] in A.fmt; may be A.res itself).
void ps_forward(const PsFwdArgs& A, const at::Tensor& out) {
  const PsDims& d = A.d;
  if (d.N == 0) return;
  TORCH_CHECK(d.N <= kMaxGridX, "srkernels::pixel_shuffle: batch too large");
  const bool nhwc = A.fmt == at::MemoryFormat::ChannelsLast;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.x.scalar_type(), "pixel_shuffle_cuda", [&] {
    constexpr int VM = 16 / sizeof(scalar_t);
    // x is gathered with scalar loads: only out and residual decide the vector width.
    const bool vec = (nhwc ? d.C % VM == 0 : d.HoWo % VM == 0) && aligned16(out.data_ptr()) &&
                     (!A.res.defined() || aligned16(A.res.data_ptr()));
    PsFwdOp<scalar_t> op{A.x.data_ptr<scalar_t>(),
                         A.bias.defined() ? A.bias.data_ptr<scalar_t>() : nullptr,
                         A.slope.defined() ? A.slope.data_ptr<scalar_t>() : nullptr,
                         A.res.defined() ? A.res.data_ptr<scalar_t>() : nullptr,
                         out.data_ptr<scalar_t>(),
                         d,
                         A.act};
    if (vec) {
      launch_ew<VM>(op, nhwc, d.N, d.C, d.HoWo, stream);
    } else {
      launch_ew<1>(op, nhwc, d.N, d.C, d.HoWo, stream);
    }
  });
}

// The backward (and unshuffle) core: go and x (if defined) in layout fmt, gx allocated in fmt; gbias / gslope
// defined = wanted.
void ps_backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& bias, const at::Tensor& slope, int act,
                 const PsDims& d, bool nhwc, const at::Tensor& gx, const at::Tensor& gbias, const at::Tensor& gslope,
                 const char* op) {
  if (d.N == 0) return;
  TORCH_CHECK(d.N <= kMaxGridX, op, ": batch too large");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_opts = go.options().dtype(acc_dtype(go.scalar_type()));
  const bool want_b = gbias.defined(), want_s = gslope.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "pixel_shuffle_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int VM = 16 / sizeof(scalar_t);
    // grad_out is gathered with scalar loads: x and grad_x decide the vector width.
    const bool vec = (nhwc ? d.Cin % VM == 0 : d.HW % VM == 0) && aligned16(gx.data_ptr()) &&
                     (!x.defined() || aligned16(x.data_ptr()));
    PsBwdArgs<scalar_t> a{go.data_ptr<scalar_t>(),
                          x.defined() ? x.data_ptr<scalar_t>() : nullptr,
                          bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                          slope.defined() ? slope.data_ptr<scalar_t>() : nullptr,
                          gx.data_ptr<scalar_t>(),
                          nullptr,
                          nullptr,
                          d,
                          act};
    at::Tensor pb, ps;
    int64_t S = 0;
    with_vec_width<VM>(vec, [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      if (!nhwc) {
        // As the attention pooling: about kChunksPerSample blocks per sample, >= kMinIters vectors per thread.
        const int64_t nvec = d.HW / V;
        const int64_t s_want = std::max<int64_t>(1, (kChunksPerSample + d.Cin - 1) / d.Cin);
        const int64_t iters = std::max<int64_t>(kMinIters, (nvec + s_want * kBlock - 1) / (s_want * kBlock));
        const int64_t chunk_vecs = iters * kBlock;
        S = (nvec + chunk_vecs - 1) / chunk_vecs;
        TORCH_CHECK(S <= kMaxGridX, op, ": tensor too large");
        if (want_b) pb = at::empty({d.N, S, d.Cin}, acc_opts);
        if (want_s) ps = at::empty({d.N, S, d.Cin}, acc_opts);
        a.part_b = want_b ? pb.data_ptr<acc_t>() : nullptr;
        a.part_s = want_s ? ps.data_ptr<acc_t>() : nullptr;
        const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(std::min<int64_t>(d.N * d.Cin, kMaxGridY)));
        SRK_LAUNCH(grid, kBlock, 0, stream, ps_bwd_nchw_kernel<scalar_t, V>)(a, S, chunk_vecs);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const bool reduce = want_b || want_s;
        // Reductions: chunks capped as the attention pooling; plain rearrangement: as the elementwise kernels.
        const NhwcGeom g = nhwc_geom(d.Cin, d.HW, V, reduce ? kMinIters : 8, reduce ? kChunksPerSample : 0);
        S = g.S;
        if (want_b) pb = at::empty({d.N, S, d.Cin}, acc_opts);
        if (want_s) ps = at::empty({d.N, S, d.Cin}, acc_opts);
        a.part_b = want_b ? pb.data_ptr<acc_t>() : nullptr;
        a.part_s = want_s ? ps.data_ptr<acc_t>() : nullptr;
        const int64_t gxn = g.S * g.CT;
        TORCH_CHECK(gxn <= kMaxGridX, op, ": tensor too large");
        const dim3 grid(static_cast<unsigned>(gxn), static_cast<unsigned>(std::min<int64_t>(d.N, kMaxGridY)));
        const size_t smem = reduce ? 2 * static_cast<size_t>(kBlock) * V * sizeof(acc_t) : 0;
        SRK_LAUNCH(grid, kBlock, smem, stream, ps_bwd_nhwc_kernel<scalar_t, V>)(a, g.log2TC, g.CT, g.S, g.ppc);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    if (want_b || want_s) {
      const int64_t warps = (want_b ? d.Cin : 0) + (want_s ? d.C : 0);
      const int64_t blocks = (warps * 32 + kBlock - 1) / kBlock;
      SRK_LAUNCH(static_cast<unsigned>(blocks), kBlock, 0, stream, ps_grad_merge_kernel<scalar_t>)(
          want_b ? pb.data_ptr<acc_t>() : nullptr, want_s ? ps.data_ptr<acc_t>() : nullptr, d.N * S, d.Cin, d.C,
          d.rr, want_b ? gbias.data_ptr<scalar_t>() : nullptr, want_s ? gslope.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// The forward, and pixel_shuffle_out when out is defined (OutVariant): out written, nothing returned.
at::Tensor pixel_shuffle_cuda(const at::Tensor& out, const at::Tensor& x_in, int64_t r,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& act_weight,
                              c10::string_view act, const std::optional<at::Tensor>& residual) {
  const char* op = out.defined() ? "srkernels::pixel_shuffle_out" : "srkernels::pixel_shuffle";
  check_x(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  PsFwdArgs A = ps_fwd_args(x_in, r, bias, act_weight, act, residual, op);
  const PsDims& d = A.d;
  const std::array<int64_t, 4> shape{d.N, d.C, d.Ho, d.Wo};
  if (!out.defined()) {
    at::Tensor y = at::empty(shape, A.x.options(), A.fmt);
    ps_forward(A, y);
    return y;
  }
  TORCH_CHECK(out.sizes() == c10::IntArrayRef(shape), op, ": out must have shape ", c10::IntArrayRef(shape),
              ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == A.x.scalar_type(), op, ": out must have dtype ", A.x.scalar_type(), ", got ",
              out.scalar_type());
  TORCH_CHECK(out.device() == A.x.device(), op, ": out must be on ", A.x.device(), ", got ", out.device());
  at::assert_no_overlap(out, x_in);
  // Write out directly when it has x's layout (no reduction here: alignment does not matter), else a temporary
  // copied into it afterwards.
  const at::Tensor dst = out.is_contiguous(A.fmt) ? out : at::empty(shape, A.x.options(), A.fmt);
  unalias_residual(A.res, dst, A.fmt);
  ps_forward(A, dst);
  if (!dst.is_same(out)) out.copy_(dst);
  return {};
}
using PixelShuffle = OutVariant<&pixel_shuffle_cuda>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_backward_cuda(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& x_opt, int64_t r,
    const std::optional<at::Tensor>& bias_opt, const std::optional<at::Tensor>& act_weight, c10::string_view act_s) {
  constexpr const char* op = "srkernels::pixel_shuffle_backward";
  check_x(grad_out_in, op);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const int act = parse_act(act_s, op);
  const bool has_x = x_opt.has_value() && x_opt->defined();
  TORCH_CHECK(has_x || act == kActNone, op, ": x is needed for act \"relu\" and \"prelu\"");
  TORCH_CHECK(r >= 1, op, ": r must be >= 1, got ", r);
  const int64_t N = grad_out_in.size(0), C = grad_out_in.size(1), Ho = grad_out_in.size(2), Wo = grad_out_in.size(3);
  TORCH_CHECK(Ho % r == 0 && Wo % r == 0, op, ": grad_out spatial size ", grad_out_in.sizes(),
              " is not divisible by r = ", r);
  TORCH_CHECK(C <= INT_MAX / 2 / r / r, op, ": too many channels");
  const PsDims d = ps_dims(N, C * r * r, Ho / r, Wo / r, r, op);

  // grad_x has x's layout (grad_out's when x is absent); grad_out is brought to it.
  at::MemoryFormat fmt;
  at::Tensor x, go;
  if (has_x) {
    check_x(*x_opt, op);
    x = native_layout(*x_opt, fmt);  // sets fmt
    x = vec_aligned(x, fmt);  // its alignment must not pick the summation order
    TORCH_CHECK(x.sizes() == c10::IntArrayRef({d.N, d.Cin, d.H, d.W}), op, ": x must have shape [", d.N, ", ", d.Cin,
                ", ", d.H, ", ", d.W, "] for this grad_out and r, got ", x.sizes());
    go = in_layout(grad_out_in, x, grad_out_in.sizes(), fmt, op, "grad_out");
  } else {
    go = native_layout(grad_out_in, fmt);
  }
  at::Tensor bias, slope;
  if (bias_opt.has_value() && bias_opt->defined()) bias = small_weight(*bias_opt, go, {d.Cin}, "bias");
  const bool has_w = act_weight.has_value() && act_weight->defined();
  TORCH_CHECK(has_w == (act == kActPrelu), op, ": act_weight must be given exactly when act is \"prelu\"");
  if (has_w) slope = small_weight(*act_weight, go, {d.C}, "act_weight");

  at::Tensor gx = at::empty({d.N, d.Cin, d.H, d.W}, go.options(), fmt);
  at::Tensor gbias = bias.defined() ? weight_grad_buffer(bias, d.N) : at::Tensor();
  at::Tensor gslope = slope.defined() ? weight_grad_buffer(slope, d.N) : at::Tensor();
  // act "none" never reads x (it only set the layout).
  ps_backward(go, act == kActNone ? at::Tensor() : x, bias, slope, act, d, fmt == at::MemoryFormat::ChannelsLast,
              gx, gbias, gslope, op);
  const auto empty = [&] { return at::empty({0}, go.options()); };
  return {gx, gbias.defined() ? gbias : empty(), gslope.defined() ? gslope : empty()};
}

at::Tensor pixel_unshuffle_cuda(const at::Tensor& x_in, int64_t r) {
  constexpr const char* op = "srkernels::pixel_unshuffle";
  check_x(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  TORCH_CHECK(r >= 1, op, ": r must be >= 1, got ", r);
  const int64_t N = x_in.size(0), C = x_in.size(1), Ho = x_in.size(2), Wo = x_in.size(3);
  TORCH_CHECK(Ho % r == 0 && Wo % r == 0, op, ": x spatial size ", x_in.sizes(), " is not divisible by r = ", r);
  TORCH_CHECK(C <= INT_MAX / 2 / r / r, op, ": too many channels");
  const PsDims d = ps_dims(N, C * r * r, Ho / r, Wo / r, r, op);
  at::MemoryFormat fmt;
  const at::Tensor x = native_layout(x_in, fmt);
  at::Tensor y = at::empty({d.N, d.Cin, d.H, d.W}, x.options(), fmt);
  // unshuffle(x) is the gradient of a plain shuffle at grad_out = x.
  ps_backward(x, at::Tensor(), at::Tensor(), at::Tensor(), kActNone, d, fmt == at::MemoryFormat::ChannelsLast, y,
              at::Tensor(), at::Tensor(), op);
  return y;
}

}  // namespace
}  // namespace srkernels::cuda

SRK_CUDA_OP_WITH_OUT(pixel_shuffle, PixelShuffle)
SRK_CUDA_OP(pixel_shuffle_backward, pixel_shuffle_backward_cuda)
SRK_CUDA_OP(pixel_unshuffle, pixel_unshuffle_cuda)
