// Large CPU outputs of the srkernels ops come from a bounded cache of freed blocks.
//
// Why: glibc serves allocations above 32 MiB with a fresh mmap and unmaps them on free, so every large output
// is first-touch page-faulted (about 8 ms for 38 MB here, several times the fused kernel itself). Like the
// CUDA caching allocator, freed blocks are kept (up to a byte limit) and handed to the next output of a
// similar size. Blocks below kMinBytes use PyTorch's default CPU allocator.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

#include <cstdint>

namespace srkernels::cpu {

// An uninitialised tensor of `sizes` in memory format `fmt`, from the cache when it is large.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts, c10::MemoryFormat fmt);

// Same sizes, dtype and strides as `x` (as at::empty_like, for a dense `x`).
at::Tensor empty_output_like(const at::Tensor& x);

struct OutputCacheStats {
  int64_t limit_bytes, cached_bytes, hits, misses;
  bool paused;
};
OutputCacheStats output_cache_stats();
// 0 disables the cache (and frees what it holds); the default comes from SRKERNELS_CPU_CACHE_MB (1024).
void set_output_cache_limit(int64_t bytes);
void empty_output_cache();
// Paused: outputs bypass the cache, which keeps what it holds (for timing the uncached path beside it).
void pause_output_cache(bool paused);

}  // namespace srkernels::cpu
