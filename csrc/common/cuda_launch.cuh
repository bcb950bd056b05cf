// Launch helpers shared by the CUDA kernels: a fixed block size, a capped grid, and
// grid-stride loops so that any element count works with any grid.
#pragma once

#include <cstdint>

namespace fastdl::cuda {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < (1 << 20) ? (blocks > 0 ? blocks : 1) : (1 << 20));
}

// for (int64_t i : grid_stride(n)) visits this thread's share of [0, n).
struct GridStride {
  int64_t i, n, step;
  struct Iter {
    int64_t i, step;
    __device__ int64_t operator*() const { return i; }
    __device__ Iter& operator++() {
      i += step;
      return *this;
    }
    __device__ bool operator!=(const Iter& end) const { return i < end.i; }
  };
  __device__ Iter begin() const { return {i, step}; }
  __device__ Iter end() const { return {n, step}; }
};

__device__ inline GridStride grid_stride(int64_t n) {
  return {blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x, n,
          static_cast<int64_t>(blockDim.x) * gridDim.x};
}

}  // namespace fastdl::cuda
