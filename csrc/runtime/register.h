// How the kernel files register their kernels with the dispatcher. The op schemas are defined from Python
// (srkernels/ops/_registry.py); C++ adds kernels only, one line per op at the end of each kernel file:
// SRK_CPU_OP (csrc/runtime/cpu_dispatch.h) or SRK_CUDA_OP, and SRK_CPU_OP_WITH_OUT / SRK_CUDA_OP_WITH_OUT for
// an op and its _out variant. TORCH_LIBRARY_IMPL may appear any number of times for one namespace and
// dispatch key, so every op registers on its own.
#pragma once

#include <torch/library.h>

// fn is op's kernel for dispatch key `key` (CPU, CUDA).
#define SRK_IMPL(key, op, fn) \
  TORCH_LIBRARY_IMPL(srkernels, key, m) { m.impl(#op, fn); }

// fn (in namespace srkernels::cuda) is op's CUDA kernel. Use at file scope, after the namespaces are closed.
#define SRK_CUDA_OP(op, fn) SRK_IMPL(CUDA, op, &::srkernels::cuda::fn)
// op and op_out from V = OutVariant<&impl> (below).
#define SRK_CUDA_OP_WITH_OUT(op, V) SRK_CUDA_OP(op, V::forward) SRK_CUDA_OP(op##_out, V::out)

namespace srkernels {

// The two kernels of an op with an `_out` variant (`<op>_out(<op's arguments>, Tensor(a!) out) -> ()`,
// srkernels/ops/_registry.py) from one implementation impl(out, args...): forward(args...) calls it with out
// undefined (impl allocates and returns the outputs), out(args..., out) with the caller's tensor (impl writes
// the output into it; what it returns is dropped). The schema's C++ signature is written once, in impl.
template <auto Impl>
struct OutVariant;
template <typename R, typename... A, R (*Impl)(const at::Tensor&, A...)>
struct OutVariant<Impl> {
  static R forward(A... args) { return Impl(at::Tensor(), args...); }
  static void out(A... args, const at::Tensor& dst) { Impl(dst, args...); }
};

}  // namespace srkernels
