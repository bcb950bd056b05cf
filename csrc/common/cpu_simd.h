// Runtime CPU dispatch without -march=native: GCC/Clang compile a function marked
// FASTDL_SIMD_CLONES once per listed target and pick the best clone for the running CPU when
// the library is loaded (an ifunc resolver), so one portable wheel still uses AVX2/AVX-512.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Each string is one clone: "avx2,fma" would make two (one without FMA, one without AVX2), so
// the AVX2 clone names the x86-64-v3 level (AVX2, FMA, BMI2, F16C).
#define FASTDL_SIMD_CLONES \
  __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define FASTDL_SIMD_CLONES
#endif

namespace fastdl::cpu {

// acc[c] += w0 * a0[c] + w1 * a1[c] + w2 * a2[c] + w3 * a3[c]: the four bilinear taps of one
// sample point applied to a channel vector in a single pass over acc.
void axpy4(int64_t n, float w0, const float* a0, float w1, const float* a1, float w2,
           const float* a2, float w3, const float* a3, float* acc);
void axpy4(int64_t n, double w0, const double* a0, double w1, const double* a1, double w2,
           const double* a2, double w3, const double* a3, double* acc);

// y[c] += w * x[c]
void axpy(int64_t n, float w, const float* x, float* y);
void axpy(int64_t n, double w, const double* x, double* y);

// ---- softmax rows. float32 uses fastdl's exp2 polynomial (cpu_vec.h), float64 the exact library
// functions (the reference and gradcheck path, not a fast one). A NaN in a row makes the max NaN.

// max_i x[i] (-inf for n = 0)
float row_max(int64_t n, const float* x);
double row_max(int64_t n, const double* x);

// x[i] = 2^(x[i] - m); returns the sum of the new values. Needs x[i] - m <= 0.5.
float exp2_shift_sum(int64_t n, float* x, float m);
double exp2_shift_sum(int64_t n, double* x, double m);

// x[i] = e^(x[i] - m); returns the sum of the new values. Needs x[i] - m <= 0.
float exp_shift_sum(int64_t n, float* x, float m);
double exp_shift_sum(int64_t n, double* x, double m);

// x[i] *= a
void scale(int64_t n, float* x, float a);
void scale(int64_t n, double* x, double a);

// ds[i] = p[i] * (ds[i] - delta): the softmax backward of a row
void softmax_grad(int64_t n, const float* p, float* ds, float delta);
void softmax_grad(int64_t n, const double* p, double* ds, double delta);

float dot(int64_t n, const float* a, const float* b);
double dot(int64_t n, const double* a, const double* b);

}  // namespace fastdl::cpu
