#include "runtime/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

namespace srkernels::cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;    // smaller blocks: glibc reuses them without page faults
constexpr size_t kGranule = size_t(2) << 20;     // sizes rounded up to 2 MiB: repeated shapes hit exactly

struct Block {
  void* ptr;
  size_t bytes;
};

class Cache {
 public:
  Cache() {
    const char* env = std::getenv("SRKERNELS_CPU_CACHE_MB");
    limit_ = env ? size_t(std::max(0L, std::atol(env))) << 20 : size_t(1024) << 20;
    // A fork while another thread holds the lock would leave the child's copy locked forever.
    pthread_atfork(nullptr, nullptr, [] { new (&instance().mu_) std::mutex(); });
  }

  static Cache& instance() {
    static Cache* c = new Cache();  // never destroyed: tensors may be freed after static destructors ran
    return *c;
  }

  // A block of at least n bytes, or nullptr when the cache is disabled (limit 0) or paused: one lock per
  // allocation.
  Block* take(size_t n) {
    size_t bytes = (n + kGranule - 1) / kGranule * kGranule;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (limit_ == 0 || paused_) return nullptr;
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= bytes + bytes / 8) {  // waste at most 1/8 of the block
        Block* b = new Block{it->second, it->first};
        cached_ -= it->first;
        free_.erase(it);
        ++hits_;
        return b;
      }
      ++misses_;
    }
    return new Block{c10::alloc_cpu(bytes), bytes};
  }

  void give_back(Block* b) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (cached_ + b->bytes <= limit_) {
        free_.emplace(b->bytes, b->ptr);
        cached_ += b->bytes;
        delete b;
        return;
      }
    }
    c10::free_cpu(b->ptr);
    delete b;
  }

  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    limit_ = bytes;
    trim_locked();
  }

  // Paused: new outputs come from the default allocator; the held blocks stay (and blocks of live outputs
  // still come back), so resuming finds the cache as it was.
  void set_paused(bool paused) {
    std::lock_guard<std::mutex> g(mu_);
    paused_ = paused;
  }

  void clear() {
    std::lock_guard<std::mutex> g(mu_);
    size_t keep = limit_;
    limit_ = 0;
    trim_locked();
    limit_ = keep;
  }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {int64_t(limit_), int64_t(cached_), hits_, misses_, paused_};
  }

 private:
  void trim_locked() {  // largest blocks first
    while (cached_ > limit_ && !free_.empty()) {
      auto it = std::prev(free_.end());
      c10::free_cpu(it->second);
      cached_ -= it->first;
      free_.erase(it);
    }
  }

  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0, limit_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  bool paused_ = false;
};

void release(void* ctx) { Cache::instance().give_back(static_cast<Block*>(ctx)); }

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    Block* b = n < kMinBytes ? nullptr : Cache::instance().take(n);
    if (b == nullptr) return c10::GetDefaultCPUAllocator()->allocate(n);
    return {b->ptr, b, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingAllocator& allocator() {
  static CachingAllocator* a = new CachingAllocator();
  return *a;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts, c10::MemoryFormat fmt) {
  TORCH_CHECK(opts.device().is_cpu(), "empty_output: CPU only");
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(opts.dtype()), fmt);
}

at::Tensor empty_output_like(const at::Tensor& x) {
  if (!x.is_non_overlapping_and_dense()) return empty_output(x.sizes(), x.options(), x.suggest_memory_format());
  // x's exact strides, as at::empty_like: kernels index out with x's layout, also for ambiguous shapes (C=1)
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), &allocator(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type());
}

OutputCacheStats output_cache_stats() { return Cache::instance().stats(); }
void set_output_cache_limit(int64_t bytes) { Cache::instance().set_limit(size_t(std::max<int64_t>(0, bytes))); }
void empty_output_cache() { Cache::instance().clear(); }
void pause_output_cache(bool paused) { Cache::instance().set_paused(paused); }

}  // namespace srkernels::cpu
