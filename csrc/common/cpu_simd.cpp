// Vector values stay inside this file's always-inlined helpers and simd_dispatch builds
// (cpu_vec.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "common/cpu_simd.h"

#include <cmath>
#include <limits>

#include "common/cpu_vec.h"

namespace fastdl::cpu {

namespace {
template <typename T>
inline void axpy4_impl(int64_t n, T w0, const T* __restrict a0, T w1, const T* __restrict a1, T w2,
                       const T* __restrict a2, T w3, const T* __restrict a3, T* __restrict acc) {
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += w0 * a0[c] + w1 * a1[c] + w2 * a2[c] + w3 * a3[c];
  }
}

template <typename T>
inline void axpy_impl(int64_t n, T w, const T* __restrict x, T* __restrict y) {
  for (int64_t c = 0; c < n; ++c) y[c] += w * x[c];
}
}  // namespace

void axpy4(int64_t n, float w0, const float* a0, float w1, const float* a1, float w2,
           const float* a2, float w3, const float* a3, float* acc) {
  simd_dispatch([=] { axpy4_impl(n, w0, a0, w1, a1, w2, a2, w3, a3, acc); });
}
void axpy4(int64_t n, double w0, const double* a0, double w1, const double* a1, double w2,
           const double* a2, double w3, const double* a3, double* acc) {
  simd_dispatch([=] { axpy4_impl(n, w0, a0, w1, a1, w2, a2, w3, a3, acc); });
}
void axpy(int64_t n, float w, const float* x, float* y) {
  simd_dispatch([=] { axpy_impl(n, w, x, y); });
}
void axpy(int64_t n, double w, const double* x, double* y) {
  simd_dispatch([=] { axpy_impl(n, w, x, y); });
}

// ---- softmax rows -----------------------------------------------------------------------------

using vec::f32x16;
using vec::kLanes;

float row_max(int64_t n, const float* x) {
  return simd_dispatch([=] {
    // A plain max plus a NaN flag (a NaN anywhere must make the max NaN): GCC vectorises this
    // reduction in every build, where a NaN-keeping vector select is split into per-lane compares.
    float m = -std::numeric_limits<float>::infinity();
    bool has_nan = false;
#pragma omp simd reduction(max : m) reduction(| : has_nan)
    for (int64_t i = 0; i < n; ++i) {
      m = x[i] > m ? x[i] : m;
      has_nan |= x[i] != x[i];
    }
    return has_nan ? std::numeric_limits<float>::quiet_NaN() : m;
  });
}

float exp2_shift_sum(int64_t n, float* x, float m) {
  return simd_dispatch([=] {
    f32x16 sv = vec::splat(0.0f);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      const f32x16 e = vec::exp2_vec(vec::load(x + i) - m);
      vec::store(x + i, e);
      sv += e;
    }
    float s = vec::hsum(sv);
    for (; i < n; ++i) {
      x[i] = vec::exp2_poly(x[i] - m);
      s += x[i];
    }
    return s;
  });
}

float exp_shift_sum(int64_t n, float* x, float m) {
  return simd_dispatch([=] {
    constexpr float kLog2e = 1.44269504f;
    // two accumulators: half the rounding error of one on long rows (a vocabulary), and more ILP
    f32x16 s0 = vec::splat(0.0f), s1 = vec::splat(0.0f);
    int64_t i = 0;
    for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
      const f32x16 e0 = vec::exp2_vec((vec::load(x + i) - m) * kLog2e);
      const f32x16 e1 = vec::exp2_vec((vec::load(x + i + kLanes) - m) * kLog2e);
      vec::store(x + i, e0);
      vec::store(x + i + kLanes, e1);
      s0 += e0;
      s1 += e1;
    }
    float s = vec::hsum(s0 + s1);
    for (; i < n; ++i) {
      x[i] = vec::exp2_poly((x[i] - m) * kLog2e);
      s += x[i];
    }
    return s;
  });
}

void scale(int64_t n, float* x, float a) {
  simd_dispatch([=] {
    for (int64_t i = 0; i < n; ++i) x[i] *= a;
  });
}

void softmax_grad(int64_t n, const float* p, float* ds, float delta) {
  simd_dispatch([=] {
    for (int64_t i = 0; i < n; ++i) ds[i] = p[i] * (ds[i] - delta);
  });
}

float dot(int64_t n, const float* a, const float* b) {
  return simd_dispatch([=] {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  });
}

double row_max(int64_t n, const double* x) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = (x[i] > m || x[i] != x[i]) ? x[i] : m;
  return m;
}
namespace {
// x[i] = f(x[i] - m); returns the sum of the new values.
template <typename F>
double apply_shifted_sum(int64_t n, double* x, double m, F f) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = f(x[i] - m);
    s += x[i];
  }
  return s;
}
}  // namespace

double exp2_shift_sum(int64_t n, double* x, double m) {
  return apply_shifted_sum(n, x, m, [](double t) { return std::exp2(t); });
}
double exp_shift_sum(int64_t n, double* x, double m) {
  return apply_shifted_sum(n, x, m, [](double t) { return std::exp(t); });
}
void scale(int64_t n, double* x, double a) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}
void softmax_grad(int64_t n, const double* p, double* ds, double delta) {
  for (int64_t i = 0; i < n; ++i) ds[i] = p[i] * (ds[i] - delta);
}
double dot(int64_t n, const double* a, const double* b) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace fastdl::cpu
