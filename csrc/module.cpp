// The Python module memengine._C. Importing it registers the compiled kernels with the
// dispatcher (TORCH_LIBRARY_IMPL blocks in csrc/cpu and csrc/cuda); the functions below only
// describe the build for `python -m memengine info` and let tests pin the CPU ISA.
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "cpu/simd.h"
#include "cpu/wgrad_accumulate.h"
#include "plan/optimal_plan.h"

#if defined(MEMENGINE_WITH_CUDA)
namespace memengine::cuda {
std::string compiled_architectures();
int compiled_runtime_version();
}  // namespace memengine::cuda
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
#if defined(MEMENGINE_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_architectures"] = memengine::cuda::compiled_architectures();
  info["cuda_runtime_version"] = memengine::cuda::compiled_runtime_version();
#else
  info["cuda"] = false;
  info["cuda_architectures"] = "";
  info["cuda_runtime_version"] = 0;
#endif
#if defined(MEMENGINE_DEBUG)
  info["debug"] = true;
#else
  info["debug"] = false;
#endif
#if defined(_OPENMP)
  info["openmp"] = true;  // at::parallel_for runs the CPU kernels on all threads
#else
  info["openmp"] = false;
#endif
  info["cpu_isa_supported"] = memengine::cpu::isa_name(memengine::cpu::best_supported_isa());
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "memengine compiled kernels (registered with the PyTorch dispatcher on import)";
  m.def("build_info", &build_info, "How this extension was built.");
  m.def(
      "cpu_isa", [] { return std::string(memengine::cpu::isa_name(memengine::cpu::active_isa())); },
      "Instruction set the CPU kernels use now.");
  m.def(
      "set_cpu_isa", [](const std::string& name) { memengine::cpu::set_active_isa(name.c_str()); },
      "Lower (or restore) the CPU instruction set: 'scalar', 'avx2' or 'avx512'. For tests and benchmarks.");
  m.def(
      "wgrad_cpu_path",
      [](const std::string& dtype) {
        const at::ScalarType type = dtype == "float16" ? at::kHalf : dtype == "float32" ? at::kFloat : at::kBFloat16;
        return memengine::cpu::wgrad_path(type);
      },
      pybind11::arg("dtype") = "bfloat16", "GEMM that runs wgrad_accumulate_ for CPU inputs of `dtype` now.");
  m.def(
      "set_wgrad_cpu_path", [](const std::string& name) { memengine::cpu::set_wgrad_path(name); },
      "Choose the CPU GEMM of wgrad_accumulate_: 'auto', 'mkl', 'avx512_bf16' or 'chunked'. For tests and benchmarks.");
  m.def(
      "optimal_plan",
      [](int64_t n, const std::vector<double>& stored, const std::vector<double>& peak, const std::vector<double>& cost,
         double last_output, double budget) -> std::optional<std::vector<std::tuple<int64_t, int64_t, int>>> {
        const auto plan = memengine::plan::optimal_plan(n, stored, peak, cost, last_output, budget);
        if (!plan) return std::nullopt;
        std::vector<std::tuple<int64_t, int64_t, int>> segments;
        for (const auto& s : *plan) segments.emplace_back(s.start, s.end, s.policy);
        return segments;
      },
      "memengine.plan's optimal dynamic program: [(start, end, policy index)] or None.");
}
