// Lets small helpers (sampling geometry, box arithmetic) be shared verbatim by the C++ CPU
// kernels and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define FASTDL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTDL_HOST_DEVICE inline
#endif
