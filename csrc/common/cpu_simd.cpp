#include "common/cpu_simd.h"

namespace fastdl::cpu {

namespace {
template <typename T>
inline void axpy4_impl(int64_t n, T w0, const T* __restrict a0, T w1, const T* __restrict a1,
                       T w2, const T* __restrict a2, T w3, const T* __restrict a3,
                       T* __restrict acc) {
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += w0 * a0[c] + w1 * a1[c] + w2 * a2[c] + w3 * a3[c];
  }
}

template <typename T>
inline void axpy_impl(int64_t n, T w, const T* __restrict x, T* __restrict y) {
  for (int64_t c = 0; c < n; ++c) y[c] += w * x[c];
}
}  // namespace

FASTDL_SIMD_CLONES void axpy4(int64_t n, float w0, const float* a0, float w1, const float* a1,
                              float w2, const float* a2, float w3, const float* a3, float* acc) {
  axpy4_impl(n, w0, a0, w1, a1, w2, a2, w3, a3, acc);
}
FASTDL_SIMD_CLONES void axpy4(int64_t n, double w0, const double* a0, double w1,
                              const double* a1, double w2, const double* a2, double w3,
                              const double* a3, double* acc) {
  axpy4_impl(n, w0, a0, w1, a1, w2, a2, w3, a3, acc);
}
FASTDL_SIMD_CLONES void axpy(int64_t n, float w, const float* x, float* y) {
  axpy_impl(n, w, x, y);
}
FASTDL_SIMD_CLONES void axpy(int64_t n, double w, const double* x, double* y) {
  axpy_impl(n, w, x, y);
}

}  // namespace fastdl::cpu
