// srkernels._C's own Python surface: what was compiled. The ops themselves are reached through
// torch.ops.srkernels.* (TORCH_LIBRARY), not through pybind11.
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "srkernels compiled kernels (ops are registered as torch.ops.srkernels.*)";
  m.def("build_info", [] {
    py::dict d;
    d["version"] = SRKERNELS_VERSION;
    d["cpu_isa"] = SRKERNELS_CPU_ISA;
    d["cuda"] = bool(SRKERNELS_WITH_CUDA);
    std::string archs = SRKERNELS_CUDA_ARCHS;
    py::list arch_list;
    size_t start = 0;
    while (start < archs.size()) {
      size_t end = archs.find(';', start);
      if (end == std::string::npos) end = archs.size();
      if (end > start) arch_list.append(archs.substr(start, end - start));
      start = end + 1;
    }
    d["cuda_archs"] = arch_list;
    d["compiler"] = __VERSION__;
#ifdef _OPENMP
    d["openmp"] = true;  // at::parallel_for runs multithreaded in the CPU kernels
#else
    d["openmp"] = false;
#endif
    return d;
  });
}
