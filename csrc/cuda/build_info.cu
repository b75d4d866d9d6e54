// What the CUDA part of this build targets, for `python -m memengine info`. Kept free of
// PyTorch headers so that it compiles in seconds.
#include <cuda_runtime_api.h>

#include <string>

namespace memengine::cuda {

#define MEMENGINE_STRINGIFY_(...) #__VA_ARGS__
#define MEMENGINE_STRINGIFY(...) MEMENGINE_STRINGIFY_(__VA_ARGS__)

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in every compilation pass, host included.
std::string compiled_architectures() {
#if defined(__CUDA_ARCH_LIST__)
  return MEMENGINE_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

int compiled_runtime_version() { return CUDART_VERSION; }

}  // namespace memengine::cuda
