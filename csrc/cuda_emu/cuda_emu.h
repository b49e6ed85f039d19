// A CPU emulator for the CUDA sources in csrc/cuda (docs/cuda_emulation.md).
//
// The .cu files are compiled as C++ unchanged: this header supplies the CUDA keywords, the built-in index
// variables, __syncthreads, __shfl_*_sync, shared memory and kernel launches (SRK_LAUNCH), and the shadow/
// directory stands in for <cuda_runtime.h> and c10/cuda. Each block's threads run as fibers (ucontext) on one
// OS thread: a fiber runs until it reaches __syncthreads or a warp shuffle, where it waits for the others, so
// barriers have their real meaning; the order in which runnable fibers (and blocks) are picked is a knob
// (set_schedule), so a missing barrier or a race on shared memory shows up as a difference between schedules.
// Checked on the fly: divergent barriers/shuffles (threads at different call sites), a full-mask shuffle with a
// lane that has exited, deadlock, misaligned vector loads/stores, gridDim/blockDim/dynamic shared memory
// limits of the hardware. Not modelled: timing, the memory model (a fiber's writes are visible at once),
// real warp lock-step, caches, atomics.
#pragma once

// Everything the kernels' headers include, first, so that the keyword macros below never touch ATen/c10.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Device.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// The .cu files register CUDA kernels with the dispatcher; here those bodies are compiled (so they type-check)
// but never run: the emulator's entry points are plain functions (csrc/cuda_emu/emu_*.cpp).
#pragma push_macro("TORCH_LIBRARY_IMPL")
#undef TORCH_LIBRARY_IMPL
#define SRK_EMU_CAT2(a, b) a##b
#define SRK_EMU_CAT(a, b) SRK_EMU_CAT2(a, b)
#define TORCH_LIBRARY_IMPL(ns, k, m) \
  [[maybe_unused]] static void SRK_EMU_CAT(srk_emu_unregistered_, __COUNTER__)(torch::Library & m)

// ---------------------------------------------------------------------------------------------------------
// CUDA types and keywords

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
struct CUstream_emu;
using cudaStream_t = CUstream_emu*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Block-shared: one object per kernel instantiation (and OS thread); blocks run one at a time.
#define __shared__ thread_local

// CUDA's device overloads of min/max (the kernels call them unqualified).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return ::fminf(a, b); }
inline float max(float a, float b) { return ::fmaxf(a, b); }
inline double min(double a, double b) { return ::fmin(a, b); }
inline double max(double a, double b) { return ::fmax(a, b); }

namespace srk_emu {

// Raised (as a C++ exception, RuntimeError in Python) when a kernel breaks a CUDA rule the emulator checks.
struct KernelFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Schedules. Threads within a block: 0 / 1 = round robin ascending / descending, 2 / 3 = greedy: always the
// lowest / highest runnable thread, s >= 4 = a random runnable thread at every switch (seed s).
// Blocks: 0 = in order, 1 = reverse, s >= 2 = shuffled (seed s).
struct Schedule {
  int threads = 0;
  int blocks = 0;
};

struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  size_t smem;
};

enum class Wait : int { None, Block, Warp, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  dim3 tid;
  int lane = 0, warp = 0;
  Wait wait = Wait::Done;
};

struct WarpState {
  int arrived = 0;
  unsigned gen = 0;
  int line = 0, delta = 0, width = 0, kind = 0;
  unsigned mask = 0;
  alignas(16) unsigned char slot[2][32][16];  // double-buffered by generation parity
};

constexpr size_t kStack = 128 << 10;     // per fiber
constexpr size_t kPage = 4096;           // guard page below each stack
constexpr size_t kMaxDynSmem = 48 << 10;  // without cudaFuncSetAttribute (the kernels never set it)
constexpr size_t kMaxThreads = 1024;

struct State {
  Schedule sched;
  std::vector<LaunchRecord> log;
  bool record = true;
  uint64_t switches = 0, blocks_run = 0;

  // per block
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  char* pool = nullptr;
  size_t pool_threads = 0;
  ucontext_t sched_ctx;
  Fiber* cur = nullptr;
  int nthreads = 0, live = 0;
  int bar_arrived = 0, bar_line = 0;
  dim3 block_idx, block_dim, grid_dim;
  const std::function<void()>* body = nullptr;
  std::string fault;  // set by a fiber, raised by the scheduler
  std::mt19937_64 rng;
};

// Each translation unit's dynamic shared memory buffer (see the end of this file).
inline std::vector<unsigned char* (*)()>& smem_getters() {
  static std::vector<unsigned char* (*)()> g;
  return g;
}

inline State& st() {
  static thread_local State s;
  return s;
}

inline Schedule& schedule() { return st().sched; }
inline std::vector<LaunchRecord>& launch_log() { return st().log; }

[[noreturn]] inline void fault(const std::string& msg) {
  throw KernelFault(msg);
}

inline void ensure_pool(size_t n) {
  State& s = st();
  if (s.pool_threads >= n) return;
  if (s.pool) munmap(s.pool, s.pool_threads * (kStack + kPage));
  const size_t bytes = n * (kStack + kPage);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map fiber stacks");
  s.pool = static_cast<char*>(p);
  for (size_t i = 0; i < n; ++i) mprotect(s.pool + i * (kStack + kPage), kPage, PROT_NONE);  // overflow traps
  s.pool_threads = n;
}

// Back to the scheduler (the calling fiber stays in its current wait state).
inline void yield_to_scheduler() {
  State& s = st();
  ++s.switches;
  swapcontext(&s.cur->ctx, &s.sched_ctx);
}

inline void fiber_entry() {
  State& s = st();
  try {
    (*s.body)();
  } catch (const std::exception& e) {
    if (s.fault.empty()) s.fault = e.what();
  } catch (...) {
    if (s.fault.empty()) s.fault = "unknown exception in a kernel thread";
  }
  s.cur->wait = Wait::Done;
  --s.live;
  swapcontext(&s.cur->ctx, &s.sched_ctx);  // never resumed
}

inline int warp_live(const State& s, int w, unsigned* live_mask) {
  int n = 0;
  unsigned m = 0;
  const int lo = w * 32, hi = std::min(s.nthreads, lo + 32);
  for (int t = lo; t < hi; ++t) {
    if (s.fibers[t].wait != Wait::Done) {
      ++n;
      m |= 1u << (t - lo);
    }
  }
  if (live_mask) *live_mask = m;
  return n;
}

// Release whatever barrier is complete. Strict: a __syncthreads must be reached by every thread of the block
// (the CUDA guide leaves a barrier in non-uniform code undefined; recent GPUs let exited threads through, so a
// kernel relying on that would pass there and fail here). A full-mask shuffle needs every lane of the mask.
inline void release(State& s) {
  if (s.bar_arrived > 0 && s.bar_arrived == s.live) {
    if (s.live < s.nthreads) {
      s.fault = "__syncthreads (line " + std::to_string(s.bar_line) + ") not reached by " +
                std::to_string(s.nthreads - s.live) + " threads that exited (non-uniform barrier)";
      return;
    }
    for (auto& f : s.fibers)
      if (f.wait == Wait::Block) f.wait = Wait::None;
    s.bar_arrived = 0;
  }
  for (int w = 0; w < static_cast<int>(s.warps.size()); ++w) {
    WarpState& ws = s.warps[w];
    if (ws.arrived == 0) continue;
    unsigned live_mask = 0;
    const int n = warp_live(s, w, &live_mask);
    if (ws.arrived < n) continue;
    if ((ws.mask & ~live_mask) != 0) {
      s.fault = "__shfl_*_sync (line " + std::to_string(ws.line) + ") with mask lanes that have exited";
      return;
    }
    for (int t = w * 32; t < std::min(s.nthreads, w * 32 + 32); ++t)
      if (s.fibers[t].wait == Wait::Warp) s.fibers[t].wait = Wait::None;
    ws.arrived = 0;
    ++ws.gen;
  }
}

inline int pick(State& s, int last) {
  const int n = s.nthreads;
  const int pol = s.sched.threads;
  if (pol == 0 || pol == 1) {
    // Round robin: the next runnable after `last`, ascending / descending (no thread gets more than one
    // synchronisation step ahead of the others).
    for (int k = 0; k < n; ++k) {
      const int t = pol == 0 ? (last + 1 + k) % n : ((last - 1 - k) % n + n) % n;
      if (s.fibers[t].wait == Wait::None) return t;
    }
    return -1;
  }
  if (pol == 2 || pol == 3) {
    // Greedy: always the lowest / highest runnable thread, so one warp runs as far ahead of the others as the
    // barriers allow (catches a missing barrier before shared memory is reused).
    for (int k = 0; k < n; ++k) {
      const int t = pol == 2 ? k : n - 1 - k;
      if (s.fibers[t].wait == Wait::None) return t;
    }
    return -1;
  }
  int cnt = 0;
  for (int t = 0; t < n; ++t) cnt += s.fibers[t].wait == Wait::None;
  if (cnt == 0) return -1;
  int r = static_cast<int>(s.rng() % static_cast<uint64_t>(cnt));
  for (int t = 0; t < n; ++t) {
    if (s.fibers[t].wait == Wait::None && r-- == 0) return t;
  }
  return -1;
}

inline void run_block(const std::function<void()>& body, dim3 bidx, dim3 bdim, dim3 gdim) {
  State& s = st();
  const int n = static_cast<int>(bdim.x * bdim.y * bdim.z);
  ensure_pool(n);
  s.fibers.assign(n, Fiber{});
  s.warps.assign((n + 31) / 32, WarpState{});
  s.nthreads = n;
  s.live = n;
  s.bar_arrived = 0;
  s.block_idx = bidx;
  s.block_dim = bdim;
  s.grid_dim = gdim;
  s.body = &body;
  s.fault.clear();
  for (auto get : smem_getters()) std::memset(get(), 0xff, kMaxDynSmem);  // NaN / -1: unwritten reads show
  for (int t = 0; t < n; ++t) {
    Fiber& f = s.fibers[t];
    f.tid = dim3(t % bdim.x, (t / bdim.x) % bdim.y, t / (bdim.x * bdim.y));
    f.lane = t & 31;
    f.warp = t >> 5;
    f.wait = Wait::None;
    f.stack = s.pool + t * (kStack + kPage) + kPage;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  int last = s.sched.threads == 1 ? 0 : n - 1;
  while (s.live > 0) {
    const int t = pick(s, last);
    if (t < 0) {
      std::string who;
      int nb = 0, nw = 0;
      for (auto& f : s.fibers) {
        nb += f.wait == Wait::Block;
        nw += f.wait == Wait::Warp;
      }
      fault("deadlock in block (" + std::to_string(bidx.x) + "," + std::to_string(bidx.y) + "): " +
            std::to_string(nb) + " threads at __syncthreads (line " + std::to_string(s.bar_line) + "), " +
            std::to_string(nw) + " at a warp shuffle, " + std::to_string(n - s.live) + " exited");
    }
    last = t;
    s.cur = &s.fibers[t];
    ++s.switches;
    swapcontext(&s.sched_ctx, &s.cur->ctx);
    s.cur = nullptr;
    if (!s.fault.empty()) fault(s.fault);
    release(s);
    if (!s.fault.empty()) fault(s.fault);
  }
  ++s.blocks_run;
}

// Every block of a grid, in the order of the block schedule. Blocks run one after another: a kernel whose
// blocks depend on each other's progress (none here) would hang; ones that race on global memory differ
// between block schedules.
inline void run_grid(const char* name, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  State& s = st();
  if (s.record) s.log.push_back({name, grid, block, smem});
  const uint64_t nthr = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nthr == 0) fault(std::string(name) + ": empty launch");
  if (grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu)
    fault(std::string(name) + ": grid beyond the hardware limit");
  if (nthr > kMaxThreads || block.z > 64) fault(std::string(name) + ": block beyond the hardware limit");
  if (smem > kMaxDynSmem) fault(std::string(name) + ": dynamic shared memory beyond 48 KiB");
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
  if (s.sched.blocks == 1) std::reverse(order.begin(), order.end());
  if (s.sched.blocks >= 2) {
    std::mt19937_64 g(s.sched.blocks);
    std::shuffle(order.begin(), order.end(), g);
  }
  s.rng.seed(static_cast<uint64_t>(s.sched.threads) * 0x9e3779b97f4a7c15ull + s.log.size());
  for (uint64_t b : order) {
    const dim3 bidx(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                    static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y)));
    run_block(body, bidx, block, grid);
  }
}

template <typename... P>
struct Launcher {
  const char* name;
  dim3 grid, block;
  size_t smem;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... args) const {
    // Kernel parameters are copied once, as a launch does, and every thread gets its own copy of them.
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto k = kernel;
    run_grid(name, grid, block, smem, [&] { std::apply(k, params); });
  }
};

template <typename... P>
Launcher<P...> launch(const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...)) {
  return Launcher<P...>{name, grid, block, smem, kernel};
}

// ---------------------------------------------------------------------------------------------------------
// Device built-ins

inline Fiber& self() {
  Fiber* f = st().cur;
  if (!f) throw std::logic_error("cuda_emu: device built-in used outside a kernel");
  return *f;
}

inline void syncthreads(int line) {
  State& s = st();
  Fiber& f = self();
  if (s.bar_arrived == 0) {
    s.bar_line = line;
  } else if (s.bar_line != line) {
    fault("divergent __syncthreads: threads wait at line " + std::to_string(s.bar_line) + " and line " +
          std::to_string(line));
  }
  ++s.bar_arrived;
  f.wait = Wait::Block;
  yield_to_scheduler();
}

// One warp-synchronous exchange: every lane of `mask` publishes v, waits for the others, reads lane src(lane).
template <typename T, typename SrcFn>
T warp_exchange(int line, int kind, unsigned mask, T v, int delta, int width, SrcFn src) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of a large type");
  State& s = st();
  Fiber& f = self();
  WarpState& ws = s.warps[f.warp];
  if (!(mask >> f.lane & 1u)) fault("__shfl_*_sync (line " + std::to_string(line) + ") by a lane not in its mask");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fault("__shfl_*_sync (line " + std::to_string(line) + "): width must be a power of two <= 32");
  if (ws.arrived == 0) {
    ws.line = line;
    ws.kind = kind;
    ws.delta = delta;
    ws.width = width;
    ws.mask = mask;
  } else if (ws.line != line || ws.kind != kind || ws.delta != delta || ws.width != width || ws.mask != mask) {
    fault("divergent warp shuffle: lanes at line " + std::to_string(ws.line) + " and line " + std::to_string(line) +
          " (or different delta/width/mask)");
  }
  const unsigned gen = ws.gen;
  std::memcpy(ws.slot[gen & 1][f.lane], &v, sizeof(T));
  ++ws.arrived;
  f.wait = Wait::Warp;
  yield_to_scheduler();
  const int sl = src(f.lane, width);
  T r;
  std::memcpy(&r, ws.slot[gen & 1][sl], sizeof(T));
  return r;
}

template <typename T>
T shfl_down(int line, unsigned mask, T v, unsigned delta, int width = 32) {
  return warp_exchange(line, 1, mask, v, static_cast<int>(delta), width, [&](int lane, int w) {
    const int seg = lane & ~(w - 1);
    const int j = (lane - seg) + static_cast<int>(delta);
    return j < w ? seg + j : lane;  // beyond the segment: own value
  });
}
template <typename T>
T shfl_up(int line, unsigned mask, T v, unsigned delta, int width = 32) {
  return warp_exchange(line, 2, mask, v, static_cast<int>(delta), width, [&](int lane, int w) {
    const int seg = lane & ~(w - 1);
    const int j = (lane - seg) - static_cast<int>(delta);
    return j >= 0 ? seg + j : lane;
  });
}
template <typename T>
T shfl_xor(int line, unsigned mask, T v, int lm, int width = 32) {
  return warp_exchange(line, 3, mask, v, lm, width, [&](int lane, int w) {
    const int seg = lane & ~(w - 1);
    const int j = lane ^ lm;
    return j >= seg + w ? lane : j;
  });
}
template <typename T>
T shfl_idx(int line, unsigned mask, T v, int srcLane, int width = 32) {
  return warp_exchange(line, 4, mask, v, srcLane, width, [&](int lane, int w) {
    return (lane & ~(w - 1)) + (srcLane & (w - 1));
  });
}

inline void check_aligned(const void* p, size_t n, int line) {
  if (reinterpret_cast<uintptr_t>(p) % n != 0)
    fault("misaligned " + std::to_string(n) + "-byte vector access at line " + std::to_string(line));
}

}  // namespace srk_emu

#define threadIdx (::srk_emu::self().tid)
#define blockIdx (::srk_emu::st().block_idx)
#define blockDim (::srk_emu::st().block_dim)
#define gridDim (::srk_emu::st().grid_dim)
#define __syncthreads() ::srk_emu::syncthreads(__LINE__)
#define __shfl_down_sync(...) ::srk_emu::shfl_down(__LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::srk_emu::shfl_up(__LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::srk_emu::shfl_xor(__LINE__, __VA_ARGS__)
#define __shfl_sync(...) ::srk_emu::shfl_idx(__LINE__, __VA_ARGS__)

// Hooks of csrc/cuda (each defaults to the CUDA meaning there).
#define SRK_LAUNCH(grid, block, smem, stream, ...) \
  ::srk_emu::launch(#__VA_ARGS__, grid, block, smem, stream, &__VA_ARGS__)
#define SRK_ON_DEVICE(t) (t).is_cpu()
#define SRK_CHECK_ALIGNED(p, n) ::srk_emu::check_aligned(p, n, __LINE__)
// Host-side tuning constants become variables, so tests can shrink them (set_limits) to reach grid loops
// and chunk caps on small tensors.
#define SRK_HOST_LIMIT(type, name, value) inline type name = value

// c10/cuda stand-ins.
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStreamEmu {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStreamEmu getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

// Dynamic shared memory: the kernels' `extern __shared__ ... smem_raw[]` names this buffer (one per OS thread,
// poisoned with 0xff at every block start).
namespace srkernels::cuda {
namespace {
thread_local __attribute__((aligned(16))) unsigned char smem_raw[srk_emu::kMaxDynSmem];
[[maybe_unused]] const bool srk_emu_smem_registered =
    (srk_emu::smem_getters().push_back(+[]() -> unsigned char* { return smem_raw; }), true);
}  // namespace
}  // namespace srkernels::cuda
