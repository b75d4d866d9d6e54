// Portability macros shared by the CPU (g++) and CUDA (nvcc) translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEMENGINE_HOST_DEVICE __host__ __device__
#else
#define MEMENGINE_HOST_DEVICE
#endif

// Forces the shared per-element functors into their callers. On the CPU this also lets a
// functor instantiated for a SIMD wrapper type be compiled with the caller's target ISA
// (the functor itself carries no target attribute).
#if defined(__GNUC__) || defined(__clang__)
#define MEMENGINE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MEMENGINE_ALWAYS_INLINE inline
#endif
