// Which compiled capability the CPU kernels run (csrc/runtime/cpu_dispatch.h). Compiled without ISA flags.
#include "runtime/cpu_dispatch.h"

#include <ATen/Version.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <sstream>
#include <stdexcept>

#ifndef SRKERNELS_CPU_CAPABILITIES
#define SRKERNELS_CPU_CAPABILITIES "default"
#endif

namespace srkernels::cpu {
namespace {

constexpr const char* kNames[kNumCapabilities] = {"default", "avx2", "avx512"};

bool compiled(Capability c) {
  const auto names = compiled_capabilities();
  return std::find(names.begin(), names.end(), kNames[c]) != names.end();
}

// What this CPU and OS can run. GCC/Clang's __builtin_cpu_supports reads CPUID and checks that the OS saves
// the AVX / AVX-512 register state (XGETBV).
bool hardware_supports(Capability c) {
  if (c == kDefault) return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (c == kAVX2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// ATen's capability, in our terms: at::get_cpu_capability() (exported; it follows ATEN_CPU_CAPABILITY) names
// it "DEFAULT", "AVX2", "AVX512" on x86-64 (other names elsewhere, where only default is compiled).
Capability aten_capability() {
  const std::string c = at::get_cpu_capability();
  if (c == "AVX512") return kAVX512;
  if (c == "AVX2") return kAVX2;
  return kDefault;
}

Capability choose() {
  const char* env = std::getenv("SRKERNELS_CPU_CAPABILITY");
  if (env != nullptr && env[0] != '\0') {
    std::string want(env);
    std::transform(want.begin(), want.end(), want.begin(), [](unsigned char ch) { return std::tolower(ch); });
    for (int i = 0; i < kNumCapabilities; ++i) {
      const auto c = static_cast<Capability>(i);
      if (want != kNames[i]) continue;
      std::ostringstream err;
      if (!compiled(c)) {
        err << "SRKERNELS_CPU_CAPABILITY=" << env << ": this build of srkernels has no " << kNames[i]
            << " kernels (compiled: " << SRKERNELS_CPU_CAPABILITIES << ")";
        throw std::invalid_argument(err.str());
      }
      if (!hardware_supports(c)) {
        err << "SRKERNELS_CPU_CAPABILITY=" << env << ": this CPU does not support " << kNames[i]
            << " (it supports:";
        for (const auto& s : supported_capabilities()) err << " " << s;
        err << ")";
        throw std::invalid_argument(err.str());
      }
      return c;
    }
    throw std::invalid_argument(std::string("SRKERNELS_CPU_CAPABILITY must be default, avx2 or avx512, got '") +
                                env + "'");
  }
  Capability best = kDefault;
  const Capability cap = aten_capability();
  for (int i = 0; i <= cap; ++i) {
    const auto c = static_cast<Capability>(i);
    if (compiled(c) && hardware_supports(c)) best = c;
  }
  return best;
}

}  // namespace

const char* capability_name(Capability c) { return kNames[c]; }

std::vector<std::string> compiled_capabilities() {
  std::vector<std::string> out;
  std::istringstream in(SRKERNELS_CPU_CAPABILITIES);  // space-separated, from CMakeLists.txt
  for (std::string s; in >> s;) out.push_back(s);
  return out;
}

std::vector<std::string> supported_capabilities() {
  std::vector<std::string> out;
  for (int i = 0; i < kNumCapabilities; ++i) {
    if (hardware_supports(static_cast<Capability>(i))) out.push_back(kNames[i]);
  }
  return out;
}

Capability selected_capability() {
  // choose() is deterministic, so two threads racing here only repeat it; a failed choice (a bad
  // SRKERNELS_CPU_CAPABILITY) is not stored, so it is reported again on every call.
  static std::atomic<int> chosen{-1};
  int c = chosen.load(std::memory_order_acquire);
  if (c < 0) {
    c = choose();
    chosen.store(c, std::memory_order_release);
  }
  return static_cast<Capability>(c);
}

}  // namespace srkernels::cpu
