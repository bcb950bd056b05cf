// Lets small helpers (sampling geometry, box arithmetic, the LSTM cell) be shared verbatim by the
// C++ CPU kernels and the CUDA kernels. On the host they are always inlined: some are instantiated
// with 16-lane vectors (cpu_vec.h) inside per-instruction-set clones, and an out-of-line copy
// would be compiled for the baseline ISA and could not take those vectors safely.
#pragma once

#if defined(__CUDACC__)
#define FASTDL_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define FASTDL_HOST_DEVICE __attribute__((always_inline)) inline
#else
#define FASTDL_HOST_DEVICE inline
#endif
