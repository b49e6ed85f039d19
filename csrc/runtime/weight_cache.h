// Tensors the CPU kernels derive from a weight (dense_block's Winograd weights U = G w G^T,
// csrc/cpu/dense_block.cpp), kept between calls. Compiled once into _C (not per CPU capability), so
// srkernels.empty_cpu_cache() and srkernels.cpu_cache_info() reach it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>

namespace srkernels::cpu {

// `make()` (a tensor computed from `w` alone), cached per weight: keyed on a weak reference to w's storage, its
// data pointer, version counter, sizes and strides, and `tag` (one value per kind of transform and its
// parameters), so an in-place update (optimizer step, load_state_dict) or a new weight at the same address
// misses; writes that bypass the version counter (through .data) are not seen. Every call first drops the
// entries whose weight storage has been freed (a weak-reference check per entry: the cache holds a few hundred
// at most), so deleting a model releases its derived tensors at the next call. Bounded: least recently used
// entries go past kWeightCacheBytes. Inference tensors (no version counter) bypass it: make() per call.
// Thread-safe; make() runs outside the lock.
constexpr int64_t kWeightCacheBytes = int64_t(1) << 30;
at::Tensor cached_weight_transform(const at::Tensor& w, int64_t tag, const std::function<at::Tensor()>& make);

// bytes and entries: what the cache holds now (entries of freed weights included until the next call drops them).
struct WeightCacheStats {
  int64_t limit_bytes, bytes, entries, hits, misses;
};
WeightCacheStats weight_cache_stats();
// Drops every entry (the next call with a live weight transforms it again).
void empty_weight_cache();

}  // namespace srkernels::cpu
