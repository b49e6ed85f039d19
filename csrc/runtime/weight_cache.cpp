#include "runtime/weight_cache.h"

#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <pthread.h>

#include <algorithm>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace srkernels::cpu {
namespace {

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* ptr;
  uint32_t version;
  std::vector<int64_t> sizes, strides;
  int64_t tag;
  at::Tensor value;
  uint64_t used;
};

struct Cache {
  std::mutex mu;
  std::vector<Entry> entries;
  uint64_t clock = 0;
  int64_t bytes = 0, hits = 0, misses = 0;

  Cache() {
    // A fork while another thread holds the lock would leave the child's copy locked forever.
    pthread_atfork(nullptr, nullptr, [] { new (&instance().mu) std::mutex(); });
  }
  static Cache& instance() {
    static Cache* c = new Cache();  // never destroyed: kernels may run during static destruction
    return *c;
  }

  // Entries whose weight storage is gone (the weak reference expired): erased, their tensors released.
  // The caller holds mu. The released tensors are returned so that they are freed after the lock is dropped.
  std::vector<at::Tensor> drop_expired_locked() {
    std::vector<at::Tensor> gone;
    if (std::none_of(entries.begin(), entries.end(), [](const Entry& e) { return e.storage.expired(); })) return gone;
    auto dead = std::stable_partition(entries.begin(), entries.end(),
                                      [](const Entry& e) { return !e.storage.expired(); });
    for (auto it = dead; it != entries.end(); ++it) {
      bytes -= int64_t(it->value.nbytes());
      gone.push_back(std::move(it->value));
    }
    entries.erase(dead, entries.end());
    return gone;
  }
};

}  // namespace

at::Tensor cached_weight_transform(const at::Tensor& w, int64_t tag, const std::function<at::Tensor()>& make) {
  Cache& c = Cache::instance();
  std::vector<at::Tensor> gone;
  const bool cacheable = !w.is_inference();
  const uint32_t version = cacheable ? w.unsafeGetTensorImpl()->version_counter().current_version() : 0;
  c10::StorageImpl* st = w.storage().unsafeGetStorageImpl();
  auto same = [&](const Entry& e) {
    return e.ptr == w.const_data_ptr() && e.tag == tag && w.sizes().equals(e.sizes) && w.strides().equals(e.strides);
  };
  {
    const std::lock_guard<std::mutex> lock(c.mu);
    gone = c.drop_expired_locked();
    if (cacheable) {
      for (Entry& e : c.entries) {
        if (same(e) && e.version == version && e.storage.lock().get() == st) {
          e.used = ++c.clock;
          ++c.hits;
          return e.value;
        }
      }
      ++c.misses;
    }
  }
  gone.clear();
  at::Tensor value = make();
  if (!cacheable) return value;
  const std::lock_guard<std::mutex> lock(c.mu);
  // a stale entry of the same weight (an older version, or a freed weight whose address was reused) goes
  auto stale = std::remove_if(c.entries.begin(), c.entries.end(), [&](const Entry& e) { return same(e); });
  for (auto it = stale; it != c.entries.end(); ++it) {
    c.bytes -= int64_t(it->value.nbytes());
    gone.push_back(std::move(it->value));
  }
  c.entries.erase(stale, c.entries.end());
  c.entries.push_back(Entry{c10::weak_intrusive_ptr<c10::StorageImpl>(w.storage().getWeakStorageImpl()),
                            w.const_data_ptr(), version, w.sizes().vec(), w.strides().vec(), tag, value, ++c.clock});
  c.bytes += int64_t(value.nbytes());
  while (c.bytes > kWeightCacheBytes && c.entries.size() > 1) {
    auto old = std::min_element(c.entries.begin(), c.entries.end(),
                                [](const Entry& a, const Entry& b) { return a.used < b.used; });
    c.bytes -= int64_t(old->value.nbytes());
    gone.push_back(std::move(old->value));
    c.entries.erase(old);
  }
  return value;
}

WeightCacheStats weight_cache_stats() {
  Cache& c = Cache::instance();
  const std::lock_guard<std::mutex> lock(c.mu);
  return {kWeightCacheBytes, c.bytes, int64_t(c.entries.size()), c.hits, c.misses};
}

void empty_weight_cache() {
  Cache& c = Cache::instance();
  std::vector<Entry> gone;
  {
    const std::lock_guard<std::mutex> lock(c.mu);
    gone.swap(c.entries);
    c.bytes = 0;
  }
}

}  // namespace srkernels::cpu
