// Runtime CPU dispatch, in the manner of ATen's DispatchStub (ATen/native/DispatchStub.h).
//
// Every kernel file csrc/cpu/<op>.cpp is compiled once per capability (CMakeLists.txt): DEFAULT with no ISA
// flags, AVX2 (+FMA, F16C), AVX512 (F/BW/VL/DQ). Each compile defines CPU_CAPABILITY (the namespace name
// at::vec uses too), so everything in the file lives in the inline namespace srkernels::cpu::CPU_CAPABILITY
// and the copies never collide. SRK_CPU_OP at the end of the file stores each entry point in its op's Stub
// slot; the DEFAULT compile alone also registers the op with the dispatcher, and the registered function
// calls the slot of the capability chosen once per process (selected_capability(), cpu_dispatch.cpp).
//
// Link order matters: inline functions of headers outside our namespaces (std::, c10::) are emitted in every
// compile and the linker keeps the first copy, so CMakeLists.txt links DEFAULT objects before AVX2 before
// AVX512: a lower capability never calls a copy compiled for a higher one.
#pragma once

#include "runtime/register.h"

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace srkernels::cpu {

enum Capability : int { kDefault = 0, kAVX2 = 1, kAVX512 = 2, kNumCapabilities = 3 };

// Chosen on first use: SRKERNELS_CPU_CAPABILITY if set (std::invalid_argument if unknown, not compiled, or
// beyond this CPU), else the highest compiled capability that is not above ATen's own choice
// (at::get_cpu_capability(), which follows ATEN_CPU_CAPABILITY).
Capability selected_capability();
const char* capability_name(Capability c);
std::vector<std::string> compiled_capabilities();
// What the CPU (and OS) supports, whatever was compiled.
std::vector<std::string> supported_capabilities();

// One slot per capability for an entry point of type R(A...).
template <typename Fn>
struct Stub;
template <typename R, typename... A>
struct Stub<R(A...)> {
  R (*impl[kNumCapabilities])(A...);
  template <Stub& self>
  static R call(A... a) {
    return self.impl[selected_capability()](std::forward<A>(a)...);
  }
};

}  // namespace srkernels::cpu

#if defined(CPU_CAPABILITY_AVX512)
#define SRK_CAPABILITY_INDEX 2
#elif defined(CPU_CAPABILITY_AVX2)
#define SRK_CAPABILITY_INDEX 1
#else
#define SRK_CAPABILITY_INDEX 0
#endif
#define SRK_CAPABILITY static_cast<::srkernels::cpu::Capability>(SRK_CAPABILITY_INDEX)

// Stores fn (an entry point in this file's srkernels::cpu::CPU_CAPABILITY namespace) in op's slot for the
// capability being compiled. Use at file scope, after the namespaces are closed.
#define SRK_CPU_KERNEL(op, fn)                                                                   \
  namespace srkernels::cpu::stubs {                                                              \
  inline Stub<std::remove_pointer_t<decltype(&::srkernels::cpu::CPU_CAPABILITY::fn)>> op{};      \
  }                                                                                              \
  namespace srkernels::cpu::CPU_CAPABILITY {                                                     \
  namespace {                                                                                    \
  [[maybe_unused]] const bool op##_in_stub =                                                     \
      (::srkernels::cpu::stubs::op.impl[SRK_CAPABILITY] = &::srkernels::cpu::CPU_CAPABILITY::fn, \
       true);                                                                                    \
  }                                                                                              \
  }

// The function the dispatcher calls for op: forwards to the selected capability's slot.
#define SRK_CPU_STUB(op) \
  (&decltype(::srkernels::cpu::stubs::op)::template call<::srkernels::cpu::stubs::op>)

// fn is op's CPU kernel: stored in op's slot by every compile, registered by the DEFAULT one. Use at file
// scope, after the namespaces are closed; one line per op.
#define SRK_CPU_OP(op, fn) SRK_CPU_KERNEL(op, fn) SRK_CPU_REGISTER(op)
// op and op_out from V = OutVariant<&impl> (runtime/register.h).
#define SRK_CPU_OP_WITH_OUT(op, V) SRK_CPU_OP(op, V::forward) SRK_CPU_OP(op##_out, V::out)
#if SRK_CAPABILITY_INDEX == 0
#define SRK_CPU_REGISTER(op) SRK_IMPL(CPU, op, SRK_CPU_STUB(op))
#else
#define SRK_CPU_REGISTER(op)
#endif
