// Vector I/O of a storage type T in its math type (float for bf16 / fp16): one math vector (W lanes) of T per
// load or store, so every dtype runs the same loop; bf16 / fp16 are widened on load and rounded once on store.
// Shared by the attention, pixel-shuffle and Winograd kernels.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace srkernels::cpu {
inline namespace CPU_CAPABILITY {  // one copy per compiled capability (runtime/cpu_dispatch.h)

using at::vec::Vectorized;

template <typename T>
struct VecIO {
  using A = at::opmath_type<T>;
  using AV = Vectorized<A>;
  static constexpr int64_t W = AV::size();
  static constexpr bool kReduced = !std::is_same_v<T, A>;

  static inline AV load(const T* p) {
    if constexpr (kReduced) {
      AV out;
      at::vec::load_to_float<T>(p, out);
      return out;
    } else {
      return AV::loadu(p);
    }
  }
  // 0 < n < W elements; the other lanes are zero.
  static inline AV load(const T* p, int64_t n) {
    if constexpr (kReduced) {
      return at::vec::convert<float>(Vectorized<T>::loadu(p, n));
    } else {
      return AV::loadu(p, n);
    }
  }
  // A whole vector of bf16 / fp16 is half a register of T: stored with a plain store of that half. at::vec's
  // store(p, W) of a partial count is a masked 512-bit store (AVX-512), slow on AMD Zen; with AVX2 a copy through
  // the stack and a memcpy call. Measured on RCAN's residual groups in bf16 (AMD EPYC Zen 5, AVX-512): the
  // attention's scale + skip pass ~70 -> ~25 us per block.
  static inline void store(T* p, const AV& v) {
    if constexpr (kReduced) {
#if defined(CPU_CAPABILITY_AVX512)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(at::vec::convert<T>(v)));
#elif defined(CPU_CAPABILITY_AVX2)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(at::vec::convert<T>(v)));
#else
      at::vec::convert<T>(v).store(p, W);
#endif
    } else {
      v.store(p);
    }
  }
  static inline void store(T* p, const AV& v, int64_t n) {
    if constexpr (kReduced) {
      at::vec::convert<T>(v).store(p, n);
    } else {
      v.store(p, n);
    }
  }
};

// One vector step of cnt <= W elements: whole (cnt == W) or masked (cnt < W; loads give 0 past cnt).
template <typename T>
inline typename VecIO<T>::AV load_n(const T* p, int64_t cnt) {
  return cnt == VecIO<T>::W ? VecIO<T>::load(p) : VecIO<T>::load(p, cnt);
}
template <typename T>
inline void store_n(T* p, const typename VecIO<T>::AV& v, int64_t cnt) {
  if (cnt == VecIO<T>::W) {
    VecIO<T>::store(p, v);
  } else {
    VecIO<T>::store(p, v, cnt);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace srkernels::cpu
