// Python bindings of the CUDA emulator (built by tests/cuda_emu/emu.py; docs/cuda_emulation.md).
#include <torch/extension.h>

#include "cuda_emu.h"
// After cuda_emu.h: its keyword macros must not reach pybind/torch headers.
#include "api.h"

// In namespace srkernels::cuda: the emulator's dynamic shared memory buffer for this file lives there (cuda_emu.h).
namespace srkernels::cuda {
namespace {

// Self-test kernels: they show that the harness can fail (tests/cuda_emu/test_harness.py).
// out[t] = in[(t + 1) % n] through shared memory, with or without the barrier between write and read.
__global__ void rotate_kernel(const float* in, float* out, bool barrier) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sh = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x, n = blockDim.x;
  sh[t] = in[blockIdx.x * n + t];
  if (barrier) __syncthreads();
  out[blockIdx.x * n + t] = sh[(t + 1) % n];
}

// A barrier only some threads reach (undefined on a GPU).
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.f;
}

// A full-mask shuffle after half the warp has returned (undefined on a GPU).
__global__ void exited_lane_shuffle_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 1);
}

// Warp tree sum via __shfl_down_sync with a width: one sum per segment of `width` lanes.
__global__ void segment_sum_kernel(const float* in, float* out, int width) {
  float v = in[threadIdx.x];
  for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o, width);
  out[threadIdx.x] = v;
}

}  // namespace
}  // namespace srkernels::cuda

namespace {

void self_test(const std::string& which, const at::Tensor& in, const at::Tensor& out, int64_t blocks,
               int64_t threads, int64_t arg) {
  TORCH_CHECK(in.is_contiguous() && out.is_contiguous() && in.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat, "self_test: float32 contiguous tensors");
  const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(threads));
  float* o = out.data_ptr<float>();
  const float* i = in.data_ptr<float>();
  if (which == "rotate") {
    SRK_LAUNCH(grid, block, threads * sizeof(float), nullptr, srkernels::cuda::rotate_kernel)(i, o, arg != 0);
  } else if (which == "divergent_barrier") {
    SRK_LAUNCH(grid, block, 0, nullptr, srkernels::cuda::divergent_barrier_kernel)(o);
  } else if (which == "exited_lane_shuffle") {
    SRK_LAUNCH(grid, block, 0, nullptr, srkernels::cuda::exited_lane_shuffle_kernel)(o);
  } else if (which == "segment_sum") {
    SRK_LAUNCH(grid, block, 0, nullptr, srkernels::cuda::segment_sum_kernel)(i, o, static_cast<int>(arg));
  } else {
    TORCH_CHECK(false, "self_test: unknown kernel ", which);
  }
}

void set_limits(int64_t max_grid_y, int64_t chunks_per_sample) {
  TORCH_CHECK(max_grid_y >= 1 && max_grid_y <= 65535, "max_grid_y must be in [1, 65535]");
  TORCH_CHECK(chunks_per_sample >= 1, "chunks_per_sample must be >= 1");
  srk_emu_api::set_limits_channel_attention(max_grid_y, static_cast<int>(chunks_per_sample));
  srk_emu_api::set_limits_balanced_attention(max_grid_y, static_cast<int>(chunks_per_sample));
  srk_emu_api::set_limits_pixel_shuffle(max_grid_y, static_cast<int>(chunks_per_sample));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace api = srk_emu_api;
  m.doc() = "csrc/cuda kernels run on CPU tensors by a fiber-based CUDA emulator (docs/cuda_emulation.md)";
  m.def("channel_attention", &api::channel_attention);
  m.def("channel_attention_backward", &api::channel_attention_backward);
  m.def("channel_attention_out", &api::channel_attention_out);
  m.def("balanced_attention", &api::balanced_attention);
  m.def("balanced_attention_backward", &api::balanced_attention_backward);
  m.def("balanced_attention_out", &api::balanced_attention_out);
  m.def("pixel_shuffle", &api::pixel_shuffle);
  m.def("pixel_shuffle_backward", &api::pixel_shuffle_backward);
  m.def("pixel_shuffle_out", &api::pixel_shuffle_out);
  m.def("pixel_unshuffle", &api::pixel_unshuffle);
  m.def("self_test", &self_test);
  m.def("set_limits", &set_limits, "max gridDim.y and chunks per sample the host code plans with",
        py::arg("max_grid_y") = 65535, py::arg("chunks_per_sample") = 1024);
  m.def(
      "set_schedule",
      [](int threads, int blocks) {
        TORCH_CHECK(threads >= 0 && blocks >= 0, "schedules are >= 0");
        srk_emu::schedule() = {threads, blocks};
      },
      py::arg("threads"), py::arg("blocks"));
  m.def("launches", [] {
    py::list out;
    for (const auto& r : srk_emu::launch_log())
      out.append(py::make_tuple(r.kernel, py::make_tuple(r.grid.x, r.grid.y, r.grid.z),
                                py::make_tuple(r.block.x, r.block.y, r.block.z), r.smem));
    return out;
  });
  m.def("clear_launches", [] { srk_emu::launch_log().clear(); });
  m.def("counters", [] { return py::make_tuple(srk_emu::st().blocks_run, srk_emu::st().switches); });
  py::register_exception<srk_emu::KernelFault>(m, "KernelFault", PyExc_RuntimeError);
}
