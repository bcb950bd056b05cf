// The BLAS that libtorch itself links (MKL on x86-64 wheels), through its Fortran entry points,
// so kernels can run GEMM-shaped inner steps on raw pointers without building tensors.
#pragma once

#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
// MKL's per-thread thread count; a weak reference, null with any other BLAS.
int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));
}

namespace fastdl::cpu {

enum class TransposeType { NoTranspose, Transpose };

// Column-major C = alpha * op(A) op(B) + beta * C (the BLAS convention; a row-major matrix is
// the column-major view of its transpose).
inline void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  const char ca = ta == TransposeType::Transpose ? 'T' : 'N';
  const char cb = tb == TransposeType::Transpose ? 'T' : 'N';
  const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  sgemm_(&ca, &cb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}
inline void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, double alpha,
                 const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
                 int64_t ldc) {
  const char ca = ta == TransposeType::Transpose ? 'T' : 'N';
  const char cb = tb == TransposeType::Transpose ? 'T' : 'N';
  const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  dgemm_(&ca, &cb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C: the same call with the operands swapped,
// because C^T = op(B)^T op(A)^T is exactly what column-major BLAS sees in row-major memory.
template <typename T>
inline void gemm_row_major(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k,
                           T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                           int64_t ldc) {
  gemm(tb, ta, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// Scope in which this thread's BLAS calls run on one thread. Inside a parallel region each worker
// multiplies its own small blocks; MKL then still prefers its packing kernels, which may thread,
// unless told it has one thread, when it takes the copy-free ones (the Winograd forward of a
// 64-channel layer ran 1.2x faster).
class SequentialBlas {
 public:
  SequentialBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_;  // 0: the thread followed the global setting
};

}  // namespace fastdl::cpu
