// CPU forward/backward of srkernels::dense_block (contract: srkernels/ops/dense_block.py; buffer layout and the
// ATen reference path: csrc/dense_block_common.h).
//
// float32 / bfloat16 take the micro-kernel path: every conv is run tile by tile with oneDNN's brgemm ukernel
// (at::native::cpublas::brgemm; bf16 on AMX or AVX512-BF16, see bf16_brgemm_ok) reading its A operand straight from the buffer (a channel range
// of the pixel rows, leading dimension T), one call per conv tap, accumulating in an fp32 tile that the
// epilogue (bias, residual, ReLU, rounding) writes into the layer's slice; float32 3x3 layers run as Winograd
// F(4,3) / F(2,3) instead where winograd_conv3x3 would (layer_forward_winograd, csrc/cpu/winograd.h). Backward: dZ = dY * (Y > 0) in one
// pass (masks recomputed from the stored post-ReLU outputs; dZ^T for the weight gradient in the same pass),
// weight gradients by brgemm in one pass over the layer's input range for all taps, input gradients by brgemm
// into an L1 tile added in place into the fp32 gradient buffer (leading dimension T, so every layer adds into
// its input range). Other dtypes,
// shapes the bf16 ukernel cannot take (odd K) and bf16 without native CPU support use the ATen reference path. Results do not depend on the
// thread count: every output element is produced by one thread in a fixed order and reductions are chunked by
// shape.
#include "dense_block_common.h"
#include "cpu/winograd.h"
#include "runtime/cpu_dispatch.h"
#include "runtime/weight_cache.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

namespace srkernels::cpu {
inline namespace CPU_CAPABILITY {  // one copy per compiled capability (runtime/cpu_dispatch.h)
namespace {

using namespace srkernels::dense;
using at::vec::Vectorized;
using FVec = Vectorized<float>;
namespace blas = at::native::cpublas;

constexpr int64_t kNB = 64;        // output columns per micro-kernel call (4 AVX-512 vectors / AMX tiles)
constexpr int64_t kTileElems = 8192;  // fp32 accumulator tile (32 KB): stays in L1 across the k*k taps

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// fp32 <-> T vector I/O of n <= 16 elements.
template <typename T>
inline FVec vload(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == FVec::size() ? FVec::loadu(p) : FVec::loadu(p, n);
  } else {
    return at::vec::convert<float>(Vectorized<T>::loadu(p, n));
  }
}
template <typename T>
inline void vstore(T* p, const FVec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == FVec::size()) {
      v.store(p);
    } else {
      v.store(p, n);
    }
  } else {
    at::vec::convert<T>(v).store(p, n);
  }
}

// The micro-kernel path's two dtypes (fast_ok guarantees one of them).
template <typename F>
void dispatch_fast(c10::ScalarType t, const F& f) {
  if (t == at::kFloat) {
    f(float{});
  } else {
    f(at::BFloat16{});
  }
}

bool force_generic() {
  const char* e = std::getenv("SRKERNELS_DENSE_GENERIC");  // tests run the ATen path on CPU with it
  return e != nullptr && e[0] != '\0' && e[0] != '0';
}

// Micro-kernel B operands: a [K, N] matrix cut into column blocks of <= kNB, each stored [K, ld] row-major
// (fp32) or in oneDNN's VNNI layout (bf16: pairs of K interleaved), ld = block width rounded up to 16.
template <typename T>
struct PackedB {
  at::Tensor data;
  int64_t K = 0, N = 0, nblocks = 0, Kp = 0, stride = 0;
  bool vnni = false;
  int64_t width(int64_t j) const { return std::min(kNB, N - j * kNB); }
  static int64_t ld(int64_t width) { return div_up(width, 16) * 16; }
  const T* block(int64_t j) const { return data.const_data_ptr<T>() + j * stride; }
};

// bf16 GEMMs run on oneDNN's brgemm ukernel, whose B operand is in the VNNI layout (pairs of K rows
// interleaved): on AMX CPUs cpublas::pack makes it; elsewhere cpublas refuses to pack (could_pack is AMX-only)
// although brgemm itself takes VNNI bf16 from avx512_core up (vdpbf16ps on AVX512-BF16), so pack_vnni makes the
// same layout: out[k / 2][n][k % 2] = in[k][n] (row pitch ld_out pairs), columns [N, ld_out) and a missing last
// odd row zero.
inline void pack_vnni(int64_t K, int64_t N, int64_t ld_in, int64_t ld_out, const at::BFloat16* in,
                      at::BFloat16* out) {
  for (int64_t k = 0; k < K; k += 2) {
    const at::BFloat16* a = in + k * ld_in;
    at::BFloat16* o = out + k * ld_out;
    if (k + 1 < K) {
      const at::BFloat16* b = a + ld_in;
      for (int64_t n = 0; n < N; ++n) {
        o[2 * n].x = a[n].x;
        o[2 * n + 1].x = b[n].x;
      }
    } else {
      for (int64_t n = 0; n < N; ++n) {
        o[2 * n].x = a[n].x;
        o[2 * n + 1].x = 0;
      }
    }
    std::memset(static_cast<void*>(o + 2 * N), 0, (ld_out - N) * 2 * sizeof(at::BFloat16));
  }
}

inline void pack_bf16(int64_t K, int64_t N, int64_t ld_in, int64_t ld_out, const at::BFloat16* in,
                      at::BFloat16* out) {
  if (blas::could_pack(at::kBFloat16)) {
    blas::pack(K, N, ld_in, ld_out, at::kBFloat16, at::kBFloat16, in, out);
  } else {
    pack_vnni(K, N, ld_in, ld_out, in, out);
  }
}

// Whether ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA), which oneDNN reads once, leaves it an ISA
// with native bf16 dot products: unset, ALL, or one from AVX512_CORE_BF16 up. Capped below, oneDNN emulates bf16
// and fails to generate some brgemm kernels ("could not generate a kernel" at AVX512_CORE); unknown names count
// as capped (the ATen path is always correct).
bool onednn_isa_allows_bf16() {
  const char* e = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (e == nullptr || e[0] == '\0') e = std::getenv("DNNL_MAX_CPU_ISA");
  if (e == nullptr || e[0] == '\0') return true;
  std::string v(e);
  for (char& c : v) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (const char* ok : {"ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX",
                         "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                         "AVX10_2_512_AMX_2"}) {
    if (v == ok) return true;
  }
  return false;
}

// Whether bf16 takes the brgemm path: a CPU with native bf16 dot products (AMX, or AVX512-BF16's vdpbf16ps)
// that oneDNN may use, and oneDNN running bf16 brgemm (a build without the ukernel makes cpublas::brgemm throw
// on VNNI bf16): one call of the kernel's usual block shape, once per process, tells. Otherwise the ATen path
// (fp32 GEMMs on converted operands) runs.
bool bf16_brgemm_ok() {
  static const bool ok = [] {
    if (blas::could_pack(at::kBFloat16)) return true;  // AMX
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bf16") || !onednn_isa_allows_bf16()) return false;
#else
    return false;
#endif
    try {
      // ones [32, 64] @ ones [64, 64] (VNNI) = 64 everywhere
      constexpr int64_t M = 32, K = 64, N = kNB;
      const std::vector<at::BFloat16> a(M * K, at::BFloat16(1.f)), b(K * N, at::BFloat16(1.f));
      std::vector<float> c(M * N, 0.f);
      blas::brgemm(M, N, K, K, N, N, false, a.data(), b.data(), c.data(), true);
      blas::brgemm_release(true);
      return std::all_of(c.begin(), c.end(), [](float v) { return v == float(K); });
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return ok && at::globalContext().userEnabledMkldnn();  // cpublas checks the latter per call
}

// src: [K, N] with row stride ld_src (any dtype matching T), contiguous rows.
template <typename T>
PackedB<T> pack_b(const at::Tensor& src) {
  PackedB<T> pb;
  const at::Tensor s = src.contiguous();
  pb.K = s.size(0);
  pb.N = s.size(1);
  pb.vnni = !std::is_same_v<T, float>;
  pb.Kp = pb.vnni ? div_up(pb.K, 2) * 2 : pb.K;
  pb.nblocks = div_up(pb.N, kNB);
  pb.stride = pb.Kp * kNB;
  pb.data = at::zeros({pb.nblocks * pb.stride}, s.options());
  const T* in = s.const_data_ptr<T>();
  T* out = pb.data.template data_ptr<T>();
  for (int64_t j = 0; j < pb.nblocks; ++j) {
    const int64_t w = pb.width(j), ld = PackedB<T>::ld(w);
    if constexpr (!std::is_same_v<T, float>) {
      // pack needs ld_out to be the padded width; rows past K stay zero
      pack_bf16(pb.K, w, pb.N, ld, in + j * kNB, out + j * pb.stride);
    } else {
      for (int64_t kk = 0; kk < pb.K; ++kk) {
        std::memcpy(out + j * pb.stride + kk * ld, in + kk * pb.N + j * kNB, w * sizeof(T));
      }
    }
  }
  return pb;
}

template <typename T>
constexpr bool pk_vnni() {
  return !std::is_same_v<T, float>;
}

constexpr int64_t kTileMin = 256, kTileMax = int64_t(1) << 24;

// SRKERNELS_DENSE_TILE, a tuning knob (fp32 elements per tile), parsed strictly: a decimal integer in
// [kTileMin, kTileMax], surrounding whitespace allowed; anything else is a ValueError naming the variable
// (atoll read "abc" as 0, "1e3" as 1 and clamped both to 256 without a word).
int64_t tile_elems_from_env() {
  const std::optional<std::string> t = wino::env_trimmed("SRKERNELS_DENSE_TILE");
  if (!t) return kTileElems;
  const std::string& v = *t;
  const char* e = std::getenv("SRKERNELS_DENSE_TILE");
  bool ok = !v.empty() && v.size() <= 9;  // kTileMax has 8 digits: no overflow below
  for (const char c : v) ok = ok && c >= '0' && c <= '9';
  const int64_t n = ok ? std::stoll(v) : 0;
  TORCH_CHECK_VALUE(ok && n >= kTileMin && n <= kTileMax, "SRKERNELS_DENSE_TILE must be an integer number of fp32 ",
                    "elements in [", kTileMin, ", ", kTileMax, "], got \"", std::string(e), "\"");
  return n;
}

// Pixels per row tile for an accumulator of `cols` (<= kNB) columns.
int64_t tile_pixels(int64_t cols) {
  static const int64_t elems = tile_elems_from_env();  // a throw leaves it uninitialised: the next call re-checks
  return elems / std::min(kNB, cols);
}

// C[M, N] (fp32, leading dim ldc) += A[M, K] (leading dim lda) @ B block.
template <typename T>
inline void mk(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, float* C,
               int64_t ldc, bool vnni, bool add_C = true) {
  blas::brgemm(M, N, K, lda, ldb, ldc, add_C, A, B, C, vnni);
}

// Work items over the interior pixels: several whole rows, or a segment of one row (wide images), so that the
// fp32 accumulator tile stays small. A span runs from interior pixel (r0, w0) to (r1 - 1, w1 - 1); in buffer rows
// that is M = (r1 - r0 - 1) * Wp + (w1 - w0) consecutive rows (the border pixels between two image rows are
// computed and discarded).
struct Span {
  int64_t n, r0, r1, w0, w1;
  int64_t first(const Geom& g) const { return g.margin + (n * g.Hp + r0 + g.p) * g.Wp + g.p + w0; }
  int64_t rows(const Geom& g) const { return (r1 - r0 - 1) * g.Wp + (w1 - w0); }
};

struct Tiles {
  int64_t rows_per_tile, segs, seg_w, per_sample, count, max_m;
  Tiles(const Geom& g, int64_t max_pixels) {
    rows_per_tile = std::clamp<int64_t>(max_pixels / g.Wp, 1, g.H);
    segs = max_pixels >= g.W ? 1 : div_up(g.W, max_pixels);
    // enough work items to keep every thread busy
    const int64_t threads = at::get_num_threads();
    while (rows_per_tile > 1 && g.N * div_up(g.H, rows_per_tile) < 4 * threads) {
      rows_per_tile = div_up(rows_per_tile, 2);
    }
    seg_w = div_up(g.W, segs);
    segs = div_up(g.W, seg_w);
    per_sample = div_up(g.H, rows_per_tile) * segs;
    count = g.N * per_sample;
    max_m = segs > 1 ? seg_w : (rows_per_tile - 1) * g.Wp + g.W;
  }
  Span at(int64_t t, const Geom& g) const {
    Span s;
    s.n = t / per_sample;
    const int64_t i = t % per_sample, rt = i / segs, sg = i % segs;
    s.r0 = rt * rows_per_tile;
    s.r1 = std::min(s.r0 + rows_per_tile, g.H);
    s.w0 = sg * seg_w;
    s.w1 = std::min(s.w0 + seg_w, g.W);
    return s;
  }
};

// Copy between a feature map t [N, C, H, W] (NCHW-contiguous or channels_last) and columns [c0, c0 + C) of the
// interior rows of a row matrix m (leading dimension ld; row0 = index of the first padded pixel: the margin, or
// 0 for matrices without one). ATen's copy between these strided views runs element by element for NCHW;
// this transposes 16-channel x 64-pixel blocks through L1.
template <bool kToRows, typename S, typename D>
void copy_interior_impl(const S* src, D* dst, bool nhwc, const Geom& g, int64_t C, int64_t ld, int64_t c0,
                        int64_t row0) {
  const int64_t H = g.H, W = g.W;
  at::parallel_for(0, g.N * H, 1, [&](int64_t i0, int64_t i1) {
    alignas(64) float tile[16][16];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / H, h = i % H;
      const int64_t row = row0 + (n * g.Hp + h + g.p) * g.Wp + g.p;  // pixel (h, 0)
      if (nhwc) {  // both sides are pixel rows of contiguous channels
        const int64_t t0 = (n * H + h) * W * C;
        for (int64_t w = 0; w < W; ++w) {
          const S* in = kToRows ? src + t0 + w * C : src + (row + w) * ld + c0;
          D* out = kToRows ? dst + (row + w) * ld + c0 : dst + t0 + w * C;
          for (int64_t c = 0; c < C; ++c) out[c] = static_cast<D>(in[c]);
        }
        continue;
      }
      // NCHW: transpose 16 x 16 blocks through a small tile
      for (int64_t cb = 0; cb < C; cb += 16) {
        const int64_t nc = std::min<int64_t>(16, C - cb);
        for (int64_t wb = 0; wb < W; wb += 16) {
          const int64_t nw = std::min<int64_t>(16, W - wb);
          const int64_t t = ((n * C + cb) * H + h) * W + wb;  // (c = cb, w = wb) in the feature map
          if (kToRows) {
            for (int64_t c = 0; c < nc; ++c)
              for (int64_t w = 0; w < nw; ++w) tile[w][c] = static_cast<float>(src[t + c * H * W + w]);
            for (int64_t w = 0; w < nw; ++w)
              for (int64_t c = 0; c < nc; ++c) dst[(row + wb + w) * ld + c0 + cb + c] = static_cast<D>(tile[w][c]);
          } else {
            for (int64_t w = 0; w < nw; ++w)
              for (int64_t c = 0; c < nc; ++c) tile[c][w] = static_cast<float>(src[(row + wb + w) * ld + c0 + cb + c]);
            for (int64_t c = 0; c < nc; ++c)
              for (int64_t w = 0; w < nw; ++w) dst[t + c * H * W + w] = static_cast<D>(tile[c][w]);
          }
        }
      }
    }
  });
}

template <typename S, typename D>
void copy_interior(const S* src, D* dst, bool to_rows, bool nhwc, const Geom& g, int64_t C, int64_t ld, int64_t c0,
                   int64_t row0) {
  if (to_rows) {
    copy_interior_impl<true>(src, dst, nhwc, g, C, ld, c0, row0);
  } else {
    copy_interior_impl<false>(src, dst, nhwc, g, C, ld, c0, row0);
  }
}

// Zero the margin rows and the border pixels of a buffer-layout matrix [R, T] (the implicit conv padding);
// returns its pixel rows as [N, Hp, Wp, T].
at::Tensor zero_border(const at::Tensor& b, const Geom& g) {
  b.narrow(0, 0, g.margin).zero_();
  b.narrow(0, g.R - g.margin, g.margin).zero_();
  at::Tensor img = b.narrow(0, g.margin, g.npix).view({g.N, g.Hp, g.Wp, b.size(1)});
  if (g.p > 0) {
    img.narrow(1, 0, g.p).zero_();
    img.narrow(1, g.Hp - g.p, g.p).zero_();
    img.narrow(2, 0, g.p).zero_();
    img.narrow(2, g.Wp - g.p, g.p).zero_();
  }
  return img;
}

// Buffer with zero border/margin rows and x in its first Cx columns.
at::Tensor new_buffer_fast(const at::Tensor& x, const Plan& pl, const Geom& g) {
  at::Tensor buf = at::empty({g.R, pl.T}, x.options().memory_format(c10::MemoryFormat::Contiguous));
  zero_border(buf, g);
  dispatch_fast(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    copy_interior<T, T>(x.const_data_ptr<T>(), buf.data_ptr<T>(), true, !x.is_contiguous(), g, pl.Cx, pl.T, 0,
                        g.margin);
  });
  return buf;
}

// Backward scratch (the fp32 gradient buffer, dZ) from a per-thread arena that is kept between calls: these are
// tens of MB, and fresh allocations of that size come from mmap, so every call would pay first-touch page faults
// (measured ~10% of a float32 backward). Nothing returned to the caller lives in it.
struct Arena {
  at::Tensor bytes;
  int64_t used = 0;
  at::Tensor take(at::IntArrayRef sizes, c10::ScalarType dt) {
    int64_t count = 1;
    for (const int64_t s : sizes) count *= s;
    const int64_t n = div_up(count * int64_t(c10::elementSize(dt)), 64) * 64;
    TORCH_INTERNAL_ASSERT(used + n <= bytes.numel());
    at::Tensor t = bytes.narrow(0, used, n).view(dt).narrow(0, 0, count).view(sizes);
    used += n;
    return t;
  }
};

Arena backward_arena(int64_t nbytes) {
  static thread_local at::Tensor store;
  if (!store.defined() || store.numel() < nbytes) store = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte));
  return Arena{store};
}

// ---------------------------------------------------------------------------------------- forward: layer

// One conv layer: buf[:, out] = act(conv(buf[:, in]) + bias (+ buf[:, res])), interior pixels only (the
// border entries of the output columns stay zero from new_buffer_fast).
template <typename T>
void layer_forward_fast(at::Tensor& buf, const Geom& g, const Layer& l, const at::Tensor& w, const at::Tensor& bias) {
  const int64_t k = w.size(2), Tc = buf.size(1);
  std::vector<PackedB<T>> packs;  // per tap: [in_len, G]
  const at::Tensor wt = w.permute({2, 3, 1, 0}).contiguous();
  for (int64_t t = 0; t < k * k; ++t) packs.push_back(pack_b<T>(wt[t / k][t % k]));
  const at::Tensor bf = bias.to(at::kFloat).contiguous();
  const float* pb = bf.const_data_ptr<float>();
  T* B = buf.data_ptr<T>();
  const Tiles tiles(g, tile_pixels(l.G));
  const bool vnni = packs[0].vnni;
  at::parallel_for(0, tiles.count, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(size_t(tiles.max_m * kNB));
    for (int64_t t = t0; t < t1; ++t) {
      const Span sp = tiles.at(t, g);
      const int64_t q0 = sp.first(g), M = sp.rows(g);
      for (int64_t j = 0; j < packs[0].nblocks; ++j) {
        const int64_t nb = packs[0].width(j), ldb = PackedB<T>::ld(nb), c0 = j * kNB;
        for (int64_t m = 0; m < M; ++m) std::memcpy(acc.data() + m * nb, pb + c0, nb * sizeof(float));
        for (int64_t tap = 0; tap < k * k; ++tap) {
          const T* A = B + (q0 + g.tap(tap / k, tap % k)) * Tc + l.in_start;
          mk<T>(M, nb, l.in_len, A, Tc, packs[tap].block(j), ldb, acc.data(), nb, vnni);
        }
        // epilogue: columns [c0, c0 + nb) of the layer -> split destinations
        const int64_t s1 = std::clamp<int64_t>(l.out_split - c0, 0, nb);
        int64_t col = g.p + sp.w0;
        for (int64_t m = 0; m < M; ++m, ++col) {
          if (col == g.Wp) col = 0;
          if (col < g.p || col >= g.p + g.W) continue;
          T* row = B + (q0 + m) * Tc;
          const float* a = acc.data() + m * nb;
          const T* res = l.res_start >= 0 ? row + l.res_start + c0 : nullptr;
          auto seg = [&](int64_t lo, int64_t hi, T* dst) {
            for (int64_t c = lo; c < hi; c += FVec::size()) {
              const int64_t len = std::min<int64_t>(FVec::size(), hi - c);
              FVec v = FVec::loadu(a + c, len);
              if (res != nullptr) v = v + vload<T>(res + c, len);
              if (l.relu) v = at::vec::clamp_min(v, FVec(0.f));
              vstore<T>(dst + c - lo, v, len);
            }
          };
          if (s1 > 0) seg(0, s1, row + l.out_start + c0);
          if (s1 < nb) seg(s1, nb, row + l.out2_start + (c0 + s1 - l.out_split));
        }
      }
    }
    if (vnni) blas::brgemm_release(true);
  });
}

// Winograd weights U = G w G^T ([P][C][Kp], csrc/cpu/winograd.h) kept between calls: the op gets plain conv
// weights, and transforming them costs ~25% of an RDB forward at LR 48 (U is (m+2)^2/9 x the weight's bytes,
// written to L3 every layer; measured with perf). Cached per weight and m by csrc/runtime/weight_cache.h (an
// in-place update misses; entries of freed weights go at the next call; srkernels.empty_cpu_cache() drops all).
at::Tensor winograd_u_compute(const at::Tensor& w, int m, int64_t Kp) {
  const int64_t K = w.size(0), C = w.size(1), P = (m + 2) * (m + 2);
  // [3, 3, C, K]: no copy for float32 cpu_layout weights; a bf16 weight's exact float32 copy
  const at::Tensor wt = w.to(at::kFloat).permute({2, 3, 1, 0}).contiguous();
  at::Tensor u = at::empty({P * C * Kp}, w.options().dtype(at::kFloat));
  if (m == 2) {
    wino::transform_weight<2>(wt.const_data_ptr<float>(), C * K, C, K, Kp, u.mutable_data_ptr<float>());
  } else {
    wino::transform_weight<4>(wt.const_data_ptr<float>(), C * K, C, K, Kp, u.mutable_data_ptr<float>());
  }
  return u;
}

at::Tensor winograd_u(const at::Tensor& w, int m, int64_t Kp) {
  // tag m: the cache's only user is this transform (Kp follows from the weight's shape)
  return cached_weight_transform(w, m, [&] { return winograd_u_compute(w, m, Kp); });
}

// A 3x3 (padding 1) layer by Winograd F(m x m, 3 x 3), m = 2 or 4 (csrc/cpu/winograd.h, the kernel of
// winograd_conv3x3): the input transform reads the layer's input range straight from the buffer rows (the
// border pixels hold zeros: they are the padding), the output transform writes the epilogue (bias, residual,
// ReLU, split destinations) into its slices. Each layer transforms its own input range (keeping the
// Winograd-domain buffer across layers instead would hold (m+2)^2/m^2 x the whole buffer in memory).
// T: the buffer's float32, or bf16 storage (float32 transforms and GEMMs, each output rounded once, as
// winograd_conv3x3's bf16 storage).
template <typename T>
void layer_forward_winograd(at::Tensor& buf, const Geom& g, const Layer& l, const at::Tensor& w,
                            const at::Tensor& bias, int m) {
  const int64_t Tc = buf.size(1), C = l.in_len, K = l.G, Kp = div_up(K, 16) * 16;
  const at::Tensor u = winograd_u(w, m, Kp);
  const at::Tensor bf = bias.to(at::kFloat).contiguous();
  T* origin = buf.data_ptr<T>() + (g.margin + g.p * g.Wp + g.p) * Tc;  // interior pixel (0, 0)
  const int64_t ns = g.Hp * g.Wp * Tc, hs = g.Wp * Tc;
  const wino::Pixels<T> px{origin + l.in_start, ns, hs, Tc, -g.p, g.p};
  T* out = origin + l.out_start;
  const wino::Epilogue<T> ep{out,  l.out_split < K ? origin + l.out2_start : out, l.out_split,
                          l.res_start >= 0 ? origin + l.res_start : nullptr, /*res_first=*/true,
                          l.relu ? wino::Act::Relu : wino::Act::None, bf.const_data_ptr<float>(), ns, hs, Tc};
  const wino::Geo geo{g.N, C, g.H, g.W, K, Kp, div_up(C, wino::VW) * wino::VW, div_up(g.H, m), div_up(g.W, m)};
  const float* pu = u.const_data_ptr<float>();
  if (m == 2) {
    wino::run<2>(px, pu, geo, ep, wino::block_budget(2));
  } else {
    wino::run<4>(px, pu, geo, ep, wino::block_budget(4));
  }
}

// ---------------------------------------------------------------------------------------- forward: fusion

// out = F @ Wt + bias (+ residual) straight into the NCHW or NHWC output, F = the fusion range of the buffer,
// Wt = fuse_w^T (per sample, scaled by the gate, when gated).
template <typename T>
void fusion_forward_fast(const at::Tensor& buf, const Geom& g, const Plan& pl, const at::Tensor& fw,
                         const std::optional<at::Tensor>& fb, const at::Tensor& gv, const at::Tensor& res,
                         at::Tensor& out) {
  const int64_t Cout = fw.size(0), Tc = buf.size(1);
  std::vector<PackedB<T>> packs;  // one, or one per sample
  if (gv.defined()) {
    const at::Tensor wg = gated_weight(fw, gv).to(fw.scalar_type());  // [N, K, Cout]
    for (int64_t n = 0; n < g.N; ++n) packs.push_back(pack_b<T>(wg[n]));
  } else {
    packs.push_back(pack_b<T>(fw.t()));
  }
  const at::Tensor bf =
      fb.has_value() ? fb->to(at::kFloat).contiguous() : at::zeros({Cout}, buf.options().dtype(at::kFloat));
  const float* pb = bf.const_data_ptr<float>();
  const bool nhwc = !out.is_contiguous();  // out is NCHW-contiguous or channels_last (output_like)
  const T* pr = res.defined() ? res.const_data_ptr<T>() : nullptr;  // same layout as out
  T* po = out.data_ptr<T>();
  const T* B = buf.const_data_ptr<T>();
  const Tiles tiles(g, tile_pixels(Cout));
  const int64_t HW = g.H * g.W;
  at::parallel_for(0, tiles.count, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(size_t(tiles.max_m * kNB));
    for (int64_t t = t0; t < t1; ++t) {
      const Span sp = tiles.at(t, g);
      const int64_t n = sp.n, q0 = sp.first(g), M = sp.rows(g);
      const PackedB<T>& pk = packs[gv.defined() ? n : 0];
      for (int64_t j = 0; j < pk.nblocks; ++j) {
        const int64_t nb = pk.width(j), c0 = j * kNB;
        for (int64_t m = 0; m < M; ++m) std::memcpy(acc.data() + m * nb, pb + c0, nb * sizeof(float));
        mk<T>(M, nb, pl.fuse_len, B + q0 * Tc + pl.fuse_start, Tc, pk.block(j), PackedB<T>::ld(nb), acc.data(), nb,
              pk.vnni);
        for (int64_t r = sp.r0; r < sp.r1; ++r) {
          const float* a = acc.data() + ((r - sp.r0) * g.Wp - sp.w0) * nb;  // row r: a + w * nb is pixel w
          if (nhwc) {
            for (int64_t w = sp.w0; w < sp.w1; ++w) {
              const int64_t o = ((n * g.H + r) * g.W + w) * Cout + c0;
              for (int64_t c = 0; c < nb; c += FVec::size()) {
                const int64_t len = std::min<int64_t>(FVec::size(), nb - c);
                FVec v = FVec::loadu(a + w * nb + c, len);
                if (pr != nullptr) v = v + vload<T>(pr + o + c, len);
                vstore<T>(po + o + c, v, len);
              }
            }
          } else {
            for (int64_t c = 0; c < nb; ++c) {
              const int64_t o = (n * Cout + c0 + c) * HW + r * g.W;
              for (int64_t w = sp.w0; w < sp.w1; ++w) {
                const float v = a[w * nb + c] + (pr != nullptr ? static_cast<float>(pr[o + w]) : 0.f);
                po[o + w] = static_cast<T>(v);
              }
            }
          }
        }
      }
    }
    if (pk_vnni<T>()) blas::brgemm_release(true);
  });
}

// ---------------------------------------------------------------------------------------- backward: layer

// Leading dimension of dZ^T ([G, ldz], the weight gradient's A operand): the buffer rows plus one spare zero
// column, since bf16 chunks are padded to an even length.
inline int64_t dz_t_ld(const Geom& g) { return g.R + 2; }

// dZ = dY * (Y > 0) (or dY; NaN Y passes dY, as ATen) on interior pixels, 0 elsewhere, in T (the GEMM operand), both as [R, G] rows
// (input gradient) and transposed, [G, ldz] (weight gradient; each image row is transposed from L1 right after
// it is written: a separate strided ATen copy of dZ^T cost more than the rest of this pass); the bias gradient
// (fp32 partial sums per padded image row, added in row order) and the residual's gradient (added into gbuf)
// in the same pass.
template <typename T>
at::Tensor layer_dz_fast(const at::Tensor& buf, at::Tensor& gbuf, const Geom& g, const Layer& l, at::Tensor& gbias,
                         at::Tensor& dzt, Arena& arena) {
  const int64_t G = l.G, Tc = buf.size(1), nrows = g.N * g.Hp, ldz = dz_t_ld(g);
  const int64_t mark = arena.used;
  at::Tensor dz = arena.take({g.R, G}, buf.scalar_type());
  dzt = arena.take({G, ldz}, buf.scalar_type());
  arena.used = mark;  // one dZ at a time: the next layer reuses the space
  dz.narrow(0, 0, g.margin).zero_();
  dz.narrow(0, g.R - g.margin, g.margin).zero_();
  dzt.narrow(1, 0, g.margin).zero_();
  dzt.narrow(1, g.R - g.margin, ldz - (g.R - g.margin)).zero_();
  T* pzt = dzt.data_ptr<T>();
  at::Tensor part = at::zeros({nrows, G}, buf.options().dtype(at::kFloat));
  const T* pB = buf.const_data_ptr<T>();
  float* pG = gbuf.data_ptr<float>();
  T* pz = dz.data_ptr<T>();
  float* pp = part.data_ptr<float>();
  const int64_t split = l.out_split;
  at::parallel_for(0, nrows, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t pr = i % g.Hp;
      const int64_t q_row = g.margin + i * g.Wp;
      T* zr = pz + q_row * G;
      if (pr < g.p || pr >= g.p + g.H) {
        std::memset(static_cast<void*>(zr), 0, g.Wp * G * sizeof(T));
        for (int64_t c = 0; c < G; ++c) std::memset(static_cast<void*>(pzt + c * ldz + q_row), 0, g.Wp * sizeof(T));
        continue;
      }
      std::memset(static_cast<void*>(zr), 0, g.p * G * sizeof(T));
      std::memset(static_cast<void*>(zr + (g.p + g.W) * G), 0, g.p * G * sizeof(T));
      float* acc = pp + i * G;
      for (int64_t c = 0; c < G; c += FVec::size()) {
        const int64_t len = std::min<int64_t>(FVec::size(), G - c);
        // a vector never straddles the split: split is a multiple of 16 or the loop below handles it per lane
        const bool straddle = c < split && c + len > split;
        FVec sum(0.f);
        for (int64_t w = g.p; w < g.p + g.W; ++w) {
          const int64_t q = q_row + w;
          const T* y = pB + q * Tc;
          float* gy = pG + q * Tc;
          FVec v;
          if (!straddle) {
            const int64_t col = c < split ? l.out_start + c : l.out2_start + c - split;
            v = FVec::loadu(gy + col, len);
            // ATen's relu backward, threshold_backward(dY, Y, 0): 0 where Y <= 0, so a NaN Y passes dY
            if (l.relu) v = FVec::blendv(v, FVec(0.f), vload<T>(y + col, len) <= FVec(0.f));
          } else {
            alignas(64) float tmp[16];
            for (int64_t e = 0; e < len; ++e) {
              const int64_t col = c + e < split ? l.out_start + c + e : l.out2_start + c + e - split;
              const float yv = static_cast<float>(y[col]);
              tmp[e] = (l.relu && yv <= 0.f) ? 0.f : gy[col];
            }
            v = FVec::loadu(tmp, len);
          }
          vstore<T>(pz + q * G + c, v, len);
          sum = sum + v;
          if (l.res_start >= 0) (FVec::loadu(gy + l.res_start + c, len) + v).store(gy + l.res_start + c, len);
        }
        (FVec::loadu(acc + c, len) + sum).store(acc + c, len);
      }
      // dZ^T of this image row, from the L1-resident rows just written (border pixels included: zero)
      constexpr int64_t kB = std::is_same_v<T, float> ? 16 : 32;  // at::vec's AVX-512 transpose block
      for (int64_t m0 = 0; m0 < g.Wp; m0 += kB) {
        for (int64_t n0 = 0; n0 < G; n0 += kB) {
          at::vec::transpose_mxn<T>(zr + m0 * G + n0, G, pzt + n0 * ldz + q_row + m0, ldz,
                                    int(std::min(kB, g.Wp - m0)), int(std::min(kB, G - n0)));
        }
      }
    }
  });
  gbias = part.sum(0);
  return dz;
}

// gbuf[:, in] += conv_transpose(dZ, W). Per work item, the k*k shifted copies of its dZ rows are gathered into
// an L2-resident [M, k*k*G] scratch (dZ is only G wide, so this is cheap next to the GEMM), then one brgemm per
// 64-column block of the input range with K = k*k*G accumulates straight into the fp32 gradient buffer
// (leading dimension T): each layer adds into its input range in place, reverse layer order. The brgemm writes
// an L1 tile which vector code then adds into the buffer: AMX tile loads/stores of the fp32 buffer rows (not in
// cache) stalled (bf16 input gradient 1.35x slower with the buffer as the C operand).
template <typename T>
void layer_grad_input_fast(const at::Tensor& dz, at::Tensor& gbuf, const Geom& g, const Layer& l, const at::Tensor& w) {
  const int64_t k = w.size(2), Tc = gbuf.size(1), G = l.G, K9 = k * k * G;
  const PackedB<T> pk = pack_b<T>(w.permute({2, 3, 0, 1}).reshape({K9, l.in_len}));  // rows (tap, g)
  const T* Z = dz.const_data_ptr<T>();
  float* C = gbuf.data_ptr<float>();
  const Tiles tiles(g, tile_pixels(kNB));
  at::parallel_for(0, tiles.count, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> col(size_t(tiles.max_m * K9));
    std::vector<float> acc(size_t(tiles.max_m * kNB));
    for (int64_t t = t0; t < t1; ++t) {
      const Span sp = tiles.at(t, g);
      const int64_t q0 = sp.first(g), M = sp.rows(g);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t tap = 0; tap < k * k; ++tap) {
          std::memcpy(col.data() + m * K9 + tap * G, Z + (q0 + m - g.tap(tap / k, tap % k)) * G, G * sizeof(T));
        }
      }
      for (int64_t j = 0; j < pk.nblocks; ++j) {
        const int64_t nb = pk.width(j);
        mk<T>(M, nb, K9, col.data(), K9, pk.block(j), PackedB<T>::ld(nb), acc.data(), nb, pk.vnni, false);
        float* dst = C + q0 * Tc + l.in_start + j * kNB;
        for (int64_t m = 0; m < M; ++m) {
          const float* a = acc.data() + m * nb;
          float* d = dst + m * Tc;
          for (int64_t c = 0; c < nb; c += FVec::size()) {
            const int64_t len = std::min<int64_t>(FVec::size(), nb - c);
            (FVec::loadu(d + c, len) + FVec::loadu(a + c, len)).store(d + c, len);
          }
        }
      }
    }
    if (pk.vnni) blas::brgemm_release(true);
  });
}

// Weight gradient: dW_tap[G, in_len] = sum_q dZ[q - off_tap]^T A[q] over the buffer rows q, in ONE pass over
// the layer's input range for all k*k taps (k*k separate GEMMs over all pixels would stream the input range
// from memory k*k times: the first conv of a late SRDenseNet block reads 1024 channels). Per chunk of kWgChunk
// pixels and 64-column block, the block of buffer rows (bf16: packed to VNNI once; fp32: read in place, leading
// dimension T) stays in L1/L2 and is shared by all taps, whose shift moves to the A operand (dZ^T, G rows,
// written by layer_dz_fast); the fp32 accumulators per (tap, column block) stay in cache. Pixels are cut into
// kWgSplit fixed ranges whose partial sums are added in order, so the result does not depend on the thread
// count.
constexpr int64_t kWgSplit = 4;

template <typename T>
at::Tensor layer_grad_weight_fast(const at::Tensor& dzt, const at::Tensor& buf, const Geom& g, const Layer& l,
                                  int64_t k) {
  constexpr bool kVnni = !std::is_same_v<T, float>;
  // bf16: the packed block (kc x 64) stays in L1/L2; fp32: one 64-column block of kc rows in L1/L2
  constexpr int64_t kWgChunk = kVnni ? 512 : 256;
  const int64_t G = l.G, Tc = buf.size(1), taps = k * k, nblocks = div_up(l.in_len, kNB);
  const int64_t ldz = dz_t_ld(g);
  at::Tensor part = at::empty({kWgSplit, taps, G, l.in_len}, dzt.options().dtype(at::kFloat));
  const T* A = dzt.const_data_ptr<T>();
  const T* B = buf.const_data_ptr<T>();
  float* P = part.data_ptr<float>();
  // Only the rows of each sample's H image rows (dZ is zero on the top and bottom border rows), rounded up to an
  // even count (the extra row is a border row) so that every range below has an even length (bf16 VNNI pairs).
  // Without a border (1x1 convs), one band of all pixel rows.
  const int64_t bands = g.p > 0 ? g.N : 1, band = g.p > 0 ? div_up(g.H * g.Wp, 2) * 2 : g.npix;
  const int64_t total = bands * band;
  const int64_t len = div_up(total, 2 * kWgSplit) * 2;  // even split lengths
  at::parallel_for(0, kWgSplit, 1, [&](int64_t s0, int64_t s1) {
    std::vector<T> pk(kVnni ? size_t(kWgChunk * kNB) : 0);
    for (int64_t sp = s0; sp < s1; ++sp) {
      float* c = P + sp * taps * G * l.in_len;
      std::fill(c, c + taps * G * l.in_len, 0.f);
      const int64_t b0 = sp * len, b1 = std::min(total, b0 + len);
      for (int64_t n = b0 / band; n * band < b1; ++n) {
        const int64_t x0 = std::max(b0, n * band), x1 = std::min(b1, (n + 1) * band);
        const int64_t first = g.margin + (g.p > 0 ? (n * g.Hp + g.p) * g.Wp : 0);  // the band's first row
        const int64_t lo = first + (x0 - n * band), hi = lo + (x1 - x0);
        for (int64_t q = lo; q < hi; q += kWgChunk) {
          if constexpr (kVnni) {
            const int64_t kc = div_up(std::min(kWgChunk, hi - q), 2) * 2;  // (even but for p = 0: a margin row)
            for (int64_t j = 0; j < nblocks; ++j) {
              const int64_t nb = std::min(kNB, l.in_len - j * kNB);
              pack_bf16(kc, nb, Tc, PackedB<T>::ld(nb), B + q * Tc + l.in_start + j * kNB, pk.data());
              for (int64_t tap = 0; tap < taps; ++tap) {
                mk<T>(G, nb, kc, A + q - g.tap(tap / k, tap % k), ldz, pk.data(), PackedB<T>::ld(nb),
                      c + tap * G * l.in_len + j * kNB, l.in_len, true);
              }
            }
          } else {
            const int64_t kc = std::min(kWgChunk, hi - q);
            for (int64_t j = 0; j < nblocks; ++j) {
              const int64_t nb = std::min(kNB, l.in_len - j * kNB);
              const T* b = B + q * Tc + l.in_start + j * kNB;
              for (int64_t tap = 0; tap < taps; ++tap) {
                mk<T>(G, nb, kc, A + q - g.tap(tap / k, tap % k), ldz, b, Tc, c + tap * G * l.in_len + j * kNB,
                      l.in_len, false);
              }
            }
          }
        }
      }
    }
    if constexpr (kVnni) blas::brgemm_release(true);
  });
  // [taps, G, in_len] -> [G, in_len, k, k]
  return part.sum(0).view({k, k, G, l.in_len}).permute({2, 3, 0, 1}).to(buf.scalar_type()).contiguous();
}

// Fusion input gradient: gbuf[:, fuse] = dO @ fuse_w (scaled per sample by the gate), written (not added) on the
// interior work spans; the caller zeroes every gbuf entry outside them.
template <typename T>
void fusion_grad_input_fast(const at::Tensor& dOd, at::Tensor& gbuf, const Geom& g, const Plan& pl,
                            const at::Tensor& fw, const at::Tensor& gv) {
  const int64_t Cout = fw.size(0), Tc = gbuf.size(1);
  std::vector<PackedB<T>> packs;
  if (gv.defined()) {
    const at::Tensor wg = (fw.to(at::kFloat).unsqueeze(0) * gv.unsqueeze(1)).to(fw.scalar_type());  // [N, Cout, K]
    for (int64_t n = 0; n < g.N; ++n) packs.push_back(pack_b<T>(wg[n]));
  } else {
    packs.push_back(pack_b<T>(fw));
  }
  const T* A = dOd.const_data_ptr<T>();  // [npix, Cout]: rows without the margin
  float* C = gbuf.data_ptr<float>();
  const Tiles tiles(g, tile_pixels(kNB));
  at::parallel_for(0, tiles.count, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Span sp = tiles.at(t, g);
      const int64_t q0 = sp.first(g), M = sp.rows(g);
      const PackedB<T>& pk = packs[gv.defined() ? sp.n : 0];
      for (int64_t j = 0; j < pk.nblocks; ++j) {
        const int64_t nb = pk.width(j);
        mk<T>(M, nb, Cout, A + (q0 - g.margin) * Cout, Cout, pk.block(j), PackedB<T>::ld(nb),
              C + q0 * Tc + pl.fuse_start + j * kNB, Tc, pk.vnni, /*add_C=*/false);
      }
    }
    if (pk_vnni<T>()) blas::brgemm_release(true);
  });
}

// Zero every gradient-buffer entry the fusion's spans do not write: margins, border pixels, other columns.
void zero_outside_fusion(at::Tensor& gbuf, const Geom& g, const Plan& pl) {
  at::Tensor img = zero_border(gbuf, g);
  if (pl.fuse_start > 0) img.narrow(3, 0, pl.fuse_start).zero_();
  const int64_t end = pl.fuse_start + pl.fuse_len;
  if (end < pl.T) img.narrow(3, end, pl.T - end).zero_();
}

// ---------------------------------------------------------------------------------------- entry points

// The gate's average pool over the fusion range, [N, fuse_len] float32 (fuse_means' result): ATen's mean over the
// padded interior view ran at ~1 GB/s in float32 (1.2 ms for 48 x 48 x 576, hot in cache: ~9% of an RDCAB block).
// Each (sample, 64-channel chunk) is summed by one thread, pixels in order: thread-independent.
template <typename T>
at::Tensor fuse_means_fast(const at::Tensor& buf, const Geom& g, const Plan& pl) {
  constexpr int64_t kCh = 4 * FVec::size(), VW = FVec::size();
  const int64_t Tc = buf.size(1), C = pl.fuse_len, nch = div_up(C, kCh);
  at::Tensor s = at::empty({g.N, C}, buf.options().dtype(at::kFloat));
  const T* base = buf.const_data_ptr<T>() + (g.margin + g.p * g.Wp + g.p) * Tc + pl.fuse_start;  // pixel (0, 0)
  float* out = s.mutable_data_ptr<float>();
  const float inv = 1.f / static_cast<float>(g.H * g.W);
  at::parallel_for(0, g.N * nch, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = i / nch, c0 = (i % nch) * kCh, nv = div_up(std::min(kCh, C - c0), VW);
      FVec acc[4] = {FVec(0.f), FVec(0.f), FVec(0.f), FVec(0.f)};
      for (int64_t h = 0; h < g.H; ++h) {
        const T* row = base + (n * g.Hp * g.Wp + h * g.Wp) * Tc + c0;
        for (int64_t w = 0; w < g.W; ++w) {
          for (int64_t j = 0; j < nv; ++j) {
            acc[j] = acc[j] + load_n(row + w * Tc + j * VW, std::min(VW, C - c0 - j * VW));
          }
        }
      }
      for (int64_t j = 0; j < nv; ++j) {
        store_n(out + n * C + c0 + j * VW, acc[j] * FVec(inv), std::min(VW, C - c0 - j * VW));
      }
    }
  });
  return s;
}

// The Winograd tile of the fp32 3x3 layers, by srkernels/ops/conv2d_pointwise.py's rule for 3x3 convs: a call
// autograd records (the plan's training flag: ops.dense_block sees grad mode, this kernel does not) takes
// SRKERNELS_WINOGRAD_TRAIN (2, the default: F(4,3)'s forward flips ReLU masks and moves gradients further from
// float64, docs/ops.md ## conv2d_pointwise; 4; 0 = brgemm), 0 whenever SRKERNELS_WINOGRAD is 0; other calls
// SRKERNELS_WINOGRAD. Both read per call; a bad value is a ValueError naming the variable.
int winograd_tile(bool training) {
  const int inference = wino::tile_from_env();
  if (!training) return inference;
  const int train = wino::tile_env("SRKERNELS_WINOGRAD_TRAIN", 2);
  return inference == 0 ? 0 : train;
}

bool fast_ok(const at::Tensor& x, const Plan& pl, const std::optional<at::Tensor>& fuse_w) {
  if (force_generic() || x.size(0) == 0) return false;
  if (x.scalar_type() == at::kFloat) return true;
  if (x.scalar_type() != at::kBFloat16 || !bf16_brgemm_ok()) return false;
  // VNNI pairs along K: every contraction length must be even
  auto even = [](int64_t v) { return v % 2 == 0; };
  for (const Layer& l : pl.layers) {
    if (!even(l.in_len) || !even(l.G)) return false;
  }
  // Without a border (1x1 convs) the weight gradient's row range is all N*H*W pixels: it must be even too, or
  // its last VNNI pair would read one row past the buffer.
  if (pl.p == 0 && !even(x.size(0) * x.size(2) * x.size(3))) return false;
  return even(pl.fuse_len) && (!fuse_w.has_value() || even(fuse_w->size(0)));
}

// bf16 inference on a CPU without the bf16 brgemm (no AVX512-BF16 or AMX): the float32 fast path (its 3x3 layers
// by Winograd) on widened tensors, the output and buffer rounded to bf16 once, instead of the generic path's ATen
// bf16 convs. The widened layer weights are cached per weight (weight_cache.h, tag kWidenTag), so their Winograd
// transforms are cached as well. The rest (bias, fusion and gate weights, residual: small) is widened per call.
constexpr int64_t kWidenTag = 100;  // not a Winograd tile (winograd_u's tags are m = 2, 4)

Outputs dense_block_cpu(const at::Tensor& x_in, at::TensorList weights, at::TensorList biases,
                        at::IntArrayRef plan, const std::optional<at::Tensor>& fuse_w,
                        const std::optional<at::Tensor>& fuse_b, const std::optional<at::Tensor>& gw1,
                        const std::optional<at::Tensor>& gb1, const std::optional<at::Tensor>& gw2,
                        const std::optional<at::Tensor>& gb2, const std::optional<at::Tensor>& residual);

Outputs dense_block_bf16_widened(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                 at::IntArrayRef plan, const std::optional<at::Tensor>& fuse_w,
                                 const std::optional<at::Tensor>& fuse_b, const std::optional<at::Tensor>& gw1,
                                 const std::optional<at::Tensor>& gb1, const std::optional<at::Tensor>& gw2,
                                 const std::optional<at::Tensor>& gb2, const std::optional<at::Tensor>& residual) {
  auto f = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value()) return std::nullopt;
    return t->to(at::kFloat);
  };
  std::vector<at::Tensor> wf, bf;
  for (const at::Tensor& w : weights) {
    wf.push_back(cached_weight_transform(w, kWidenTag, [&] { return w.to(at::kFloat); }));
  }
  for (const at::Tensor& b : biases) bf.push_back(b.to(at::kFloat));
  auto [out, buf, stats] = dense_block_cpu(x.to(at::kFloat), wf, bf, plan, f(fuse_w), f(fuse_b), f(gw1), f(gb1),
                                           f(gw2), f(gb2), f(residual));
  return {out.to(at::kBFloat16), buf.to(at::kBFloat16), stats};
}

Outputs dense_block_cpu(const at::Tensor& x_in, at::TensorList weights, at::TensorList biases,
                        at::IntArrayRef plan, const std::optional<at::Tensor>& fuse_w,
                        const std::optional<at::Tensor>& fuse_b, const std::optional<at::Tensor>& gw1,
                        const std::optional<at::Tensor>& gb1, const std::optional<at::Tensor>& gw2,
                        const std::optional<at::Tensor>& gb2, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.device().is_cpu(), kOp, ": x must be a 4-D CPU tensor");
  const Plan pl = parse_plan(plan, weights, kOp);
  TORCH_CHECK(x_in.size(1) == pl.Cx, kOp, ": x has ", x_in.size(1), " channels, the plan ", pl.Cx);
  check_args(x_in, weights, biases, pl, fuse_w, kOp);
  check_forward_args(x_in, pl, fuse_w, fuse_b, gw1, gw2, residual);
  const at::Tensor x = x_in.contiguous(x_in.suggest_memory_format());
  if (!fast_ok(x, pl, fuse_w)) {
    if (x.scalar_type() == at::kBFloat16 && !pl.training && !force_generic() && x.size(0) > 0 &&
        !bf16_brgemm_ok() && wino::kIsaOk) {
      return dense_block_bf16_widened(x, weights, biases, plan, fuse_w, fuse_b, gw1, gb1, gw2, gb2, residual);
    }
    return forward_generic(x, weights, biases, pl, fuse_w, fuse_b, gw1, gb1, gw2, gb2, residual);
  }
  const Geom g(x.size(0), x.size(2), x.size(3), pl.p);
  at::Tensor buf = new_buffer_fast(x, pl, g);
  dispatch_fast(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    // 3x3 layers by Winograd where winograd_conv3x3 would run them: fp32 by winograd_tile and winograd_use; bf16
    // (inference, here with native bf16 and brgemm) by winograd_bf16 (srkernels/ops/conv2d_pointwise.py): F(4,3)
    // on >= 64 channels in and out, not on AMX (oneDNN's tile convs are left to run)
    int wtile = pl.k == 3 ? winograd_tile(pl.training) : 0;
    if constexpr (!std::is_same_v<T, float>) {
      if (pl.training || wtile != 4 || blas::could_pack(at::kBFloat16)) wtile = 0;
    }
    for (const auto i : c10::irange(pl.layers.size())) {
      const Layer& l = pl.layers[i];
      const bool wide = std::is_same_v<T, float> || std::min(l.in_len, l.G) >= 64;
      if (wtile != 0 && wide && wino::use(l.in_len, l.G, g.H, g.W)) {
        layer_forward_winograd<T>(buf, g, l, weights[i], biases[i], wtile);
        continue;
      }
      layer_forward_fast<T>(buf, g, l, weights[i], biases[i]);
    }
  });
  at::Tensor out, stats = at::empty({0}, x.options().dtype(at::kFloat));
  if (!fuse_w.has_value()) {
    out = output_like(x, pl.fuse_len);
    dispatch_fast(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      copy_interior<T, T>(buf.const_data_ptr<T>(), out.data_ptr<T>(), false, !out.is_contiguous(), g, pl.fuse_len, pl.T,
                          pl.fuse_start, g.margin);
    });
  } else {
    at::Tensor gv;
    if (gw1.has_value()) {
      at::Tensor s;
      dispatch_fast(x.scalar_type(), [&](auto tag) { s = fuse_means_fast<decltype(tag)>(buf, g, pl); });
      gv = GateMlp(gw1, gb1, gw2, gb2, at::kFloat).forward(s);
      stats = at::stack({s, gv}, 1);
    }
    out = output_like(x, fuse_w->size(0));
    const at::Tensor res = residual.has_value() ? residual->contiguous(x.suggest_memory_format()) : at::Tensor();
    dispatch_fast(x.scalar_type(), [&](auto tag) {
      fusion_forward_fast<decltype(tag)>(buf, g, pl, *fuse_w, fuse_b, gv, res, out);
    });
  }
  return {out, buf, stats};
}

Grads dense_block_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& buf, const at::Tensor& stats,
                               at::TensorList weights, at::TensorList biases,
                               at::IntArrayRef plan, const std::optional<at::Tensor>& fuse_w,
                               const std::optional<at::Tensor>& gw1, const std::optional<at::Tensor>& gb1,
                               const std::optional<at::Tensor>& gw2, const std::optional<at::Tensor>& gb2) {
  TORCH_CHECK(grad_out_in.dim() == 4 && grad_out_in.device().is_cpu(), kOpBw, ": grad_out must be a 4-D CPU tensor");
  const Plan pl = parse_plan(plan, weights, kOpBw);
  check_args(buf, weights, biases, pl, fuse_w, kOpBw);
  check_backward_args(grad_out_in, buf, pl, fuse_w, gw1, gw2);
  const at::Tensor grad_out = grad_out_in.contiguous(grad_out_in.suggest_memory_format());
  if (!fast_ok(grad_out, pl, fuse_w)) {
    return backward_generic(grad_out, buf, stats, weights, biases, pl, fuse_w, gw1, gb1, gw2, gb2);
  }
  const Geom g(grad_out.size(0), grad_out.size(2), grad_out.size(3), pl.p);
  TORCH_CHECK(buf.dim() == 2 && buf.size(0) == g.R && buf.size(1) == pl.T && buf.is_contiguous(), kOpBw,
              ": buffer must be a contiguous [", g.R, ", ", pl.T, "] matrix, got ", buf.sizes());
  const auto dt = buf.scalar_type();
  int64_t max_g = 0;
  for (const Layer& l : pl.layers) max_g = std::max(max_g, l.G);
  const int64_t esz = c10::elementSize(dt);
  Arena arena = backward_arena(div_up(g.R * pl.T * 4, 64) * 64 + div_up(g.R * max_g * esz, 64) * 64 +
                                      div_up(dz_t_ld(g) * max_g * esz, 64) * 64);
  at::Tensor gbuf = arena.take({g.R, pl.T}, at::kFloat);
  at::Tensor gfw, gfb, ggw1, ggb1, ggw2, ggb2;
  if (fuse_w.has_value()) {
    zero_outside_fusion(gbuf, g, pl);
    const int64_t Cout = fuse_w->size(0);
    at::Tensor dOd = at::zeros({g.npix, Cout}, buf.options());
    dispatch_fast(dt, [&](auto tag) {
      using T = decltype(tag);
      copy_interior<T, T>(grad_out.const_data_ptr<T>(), dOd.data_ptr<T>(), true, !grad_out.is_contiguous(), g, Cout,
                          Cout, 0, 0);
    });
    const at::Tensor dO = dOd.to(at::kFloat);
    auto add_dF = [&](const at::Tensor& gv) {
      dispatch_fast(dt, [&](auto tag) { fusion_grad_input_fast<decltype(tag)>(dOd, gbuf, g, pl, *fuse_w, gv); });
    };
    std::tie(gfw, gfb, ggw1, ggb1, ggw2, ggb2) =
        fusion_backward(dO, dOd, buf, gbuf, stats, g, pl, *fuse_w, gw1, gb1, gw2, gb2, add_dF);
  } else {
    gbuf.zero_();
    dispatch_fast(dt, [&](auto tag) {
      using T = decltype(tag);
      copy_interior<T, float>(grad_out.const_data_ptr<T>(), gbuf.data_ptr<float>(), true, !grad_out.is_contiguous(), g,
                              pl.fuse_len, pl.T, pl.fuse_start, g.margin);
    });
    for (at::Tensor* t : {&gfw, &gfb, &ggw1, &ggb1, &ggw2, &ggb2}) *t = at::empty({0}, buf.options());
  }
  const int64_t L = int64_t(pl.layers.size());
  std::vector<at::Tensor> gws(L), gbs(L);
  dispatch_fast(dt, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = L - 1; i >= 0; --i) {
      const Layer& l = pl.layers[i];
      const at::Tensor& w = weights[i];
      const int64_t k = w.size(2);
      at::Tensor gbias;
      at::Tensor dzt;
      const at::Tensor dz = layer_dz_fast<T>(buf, gbuf, g, l, gbias, dzt, arena);
      gbs[i] = gbias.to(dt);
      gws[i] = layer_grad_weight_fast<T>(dzt, buf, g, l, k);
      layer_grad_input_fast<T>(dz, gbuf, g, l, w);
    }
  });
  at::Tensor gx = output_like(grad_out, pl.Cx);
  dispatch_fast(dt, [&](auto tag) {
    using T = decltype(tag);
    copy_interior<float, T>(gbuf.const_data_ptr<float>(), gx.data_ptr<T>(), false, !gx.is_contiguous(), g, pl.Cx,
                            pl.T, 0, g.margin);
  });
  return {gx, gws, gbs, gfw, gfb, ggw1, ggb1, ggw2, ggb2};
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace srkernels::cpu

SRK_CPU_OP(dense_block, dense_block_cpu)
SRK_CPU_OP(dense_block_backward, dense_block_backward_cpu)
