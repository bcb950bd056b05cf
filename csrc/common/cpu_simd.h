// Runtime CPU dispatch without -march=native for loops written once in portable C++ (plain
// loops the compiler vectorises, or cpu_vec.h's vector types): simd_dispatch(body) runs `body`, a
// lambda, compiled for the best instruction set the active capability allows (cpu_capability.h),
// so one portable wheel uses AVX-512 or AVX2 where the CPU has them, and FASTDL_CPU_CAPABILITY
// and the tests' capability switch reach these loops as they reach the hand-written tiles.
//
// Each per-set function below carries the target of its set and `flatten`, which inlines the
// lambda and everything it calls into it: the same source becomes zmm, ymm or xmm code there.
// What the lambda calls must therefore be visible inline (templates, inline functions). The
// lambda is taken by value and should capture by value ([=]): the loop then reads its own copy
// of each captured size and pointer, which no store through a pointer can alias.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"

namespace fastdl::cpu {

namespace simd_detail {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The AVX2 build names the x86-64-v3 level (AVX2, FMA, BMI2, F16C): "avx2" alone would leave FMA
// out.
template <class Body>
__attribute__((target("avx512f"), flatten)) auto run_avx512(Body body) {
  return body();
}
template <class Body>
__attribute__((target("arch=x86-64-v3"), flatten)) auto run_avx2(Body body) {
  return body();
}
#endif
template <class Body>
__attribute__((flatten)) auto run_baseline(Body body) {
  return body();
}
}  // namespace simd_detail

template <class Body>
inline auto simd_dispatch(Body body) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  switch (active()) {
    case Capability::AVX512:
      return simd_detail::run_avx512(body);
    case Capability::AVX2:
      return simd_detail::run_avx2(body);
    case Capability::Default:
      break;
  }
#endif
  return simd_detail::run_baseline(body);
}

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
