// srkernels._C's own Python surface: what was compiled. The ops themselves are reached through
// torch.ops.srkernels.* (TORCH_LIBRARY), not through pybind11.
#include <ATen/native/CPUBlas.h>
#include <pybind11/pybind11.h>

#include "runtime/cpu_dispatch.h"
#include "runtime/output_cache.h"
#include "runtime/weight_cache.h"

#include <pybind11/stl.h>

#include <sstream>
#include <string>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "srkernels compiled kernels (ops are registered as torch.ops.srkernels.*)";
  m.def("build_info", [] {
    py::dict d;
    d["version"] = SRKERNELS_VERSION;
    d["cpu_capabilities"] = srkernels::cpu::compiled_capabilities();
    d["cuda"] = bool(SRKERNELS_WITH_CUDA);
    py::list arch_list;
    std::istringstream archs(SRKERNELS_CUDA_ARCHS);  // space-separated, from CMakeLists.txt
    for (std::string a; archs >> a;) arch_list.append(a);
    d["cuda_archs"] = arch_list;
    d["compiler"] = __VERSION__;
    // The torch this extension was compiled against (CMakeLists.txt; also in srkernels/_build_config.py,
    // which srkernels/_backend.py checks before loading this module).
    d["torch_built"] = SRKERNELS_TORCH_VERSION;
    d["cxx11_abi"] = bool(SRKERNELS_CXX11_ABI);
#ifdef _OPENMP
    d["openmp"] = true;  // at::parallel_for runs multithreaded in the CPU kernels
#else
    d["openmp"] = false;
#endif
    return d;
  });
  // The capability the CPU kernels run; raises ValueError for a bad SRKERNELS_CPU_CAPABILITY.
  m.def("cpu_capability", [] { return std::string(srkernels::cpu::capability_name(srkernels::cpu::selected_capability())); });
  m.def("supported_cpu_capabilities", &srkernels::cpu::supported_capabilities);
  // Whether ATen's CPU BLAS packs bf16 GEMM operands, which it does on AMX only: then oneDNN's bf16 convs run
  // on AMX tiles and the float32-arithmetic Winograd is not used for bf16 (srkernels/ops/winograd_conv3x3.py).
  m.def("amx_bf16", [] { return at::native::cpublas::could_pack(at::kBFloat16); });
  // The cache of large CPU outputs (csrc/runtime/output_cache.h); Python wrappers in srkernels/__init__.py.
  m.def("cpu_cache_stats", [] {
    auto s = srkernels::cpu::output_cache_stats();
    py::dict d;
    d["limit_bytes"] = s.limit_bytes;
    d["cached_bytes"] = s.cached_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["paused"] = s.paused;
    return d;
  });
  m.def("set_cpu_cache_limit", &srkernels::cpu::set_output_cache_limit, py::arg("bytes"));
  // Both caches: the output cache's freed blocks and the derived weights (csrc/runtime/weight_cache.h).
  m.def("empty_cpu_cache", [] {
    srkernels::cpu::empty_output_cache();
    srkernels::cpu::empty_weight_cache();
  });
  // The derived-weight cache (dense_block's Winograd weights, csrc/runtime/weight_cache.h).
  m.def("weight_cache_stats", [] {
    auto s = srkernels::cpu::weight_cache_stats();
    py::dict d;
    d["limit_bytes"] = s.limit_bytes;
    d["bytes"] = s.bytes;
    d["entries"] = s.entries;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  });
  m.def("pause_cpu_cache", &srkernels::cpu::pause_output_cache, py::arg("paused"));
}
