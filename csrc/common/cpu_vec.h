// Sixteen-lane float vectors as GCC vector types, for loops compiled once per instruction set
// (simd_dispatch, cpu_simd.h): one f32x16 is one zmm register in the AVX-512 build, two ymm in
// the AVX2 one and four xmm in the baseline one, so a single source serves every CPU.
//
// Vector values must stay inside always-inlined helpers and the builds of one file (nothing with
// a vector in its signature crosses a file), which is why including files silence -Wpsabi: GCC's
// note that such signatures change with AVX-512 does not apply to them.
#pragma once

#include <cstdint>
#include <cstring>

#define FASTDL_VEC_INLINE __attribute__((always_inline)) inline

namespace fastdl::cpu::vec {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

FASTDL_VEC_INLINE f32x16 splat(float a) { return f32x16{} + a; }
FASTDL_VEC_INLINE f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));  // a single unaligned vector load
  return v;
}
FASTDL_VEC_INLINE void store(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }

// The first `count` (<= 16) lanes; the others read as 0 and are not written.
FASTDL_VEC_INLINE f32x16 load(const float* p, int64_t count) {
  if (count == kLanes) return load(p);
  f32x16 v{};
  for (int64_t k = 0; k < count; ++k) v[k] = p[k];
  return v;
}
FASTDL_VEC_INLINE void store(float* p, f32x16 v, int64_t count) {
  if (count == kLanes) return store(p, v);
  for (int64_t k = 0; k < count; ++k) p[k] = v[k];
}

// 2^f for f in (-0.5, 0.5]: a degree-7 polynomial evaluated by Horner's rule. One template
// serves a float and a f32x16, so the scalar and vector forms agree bit for bit per lane.
constexpr float kExp2Coefficients[] = {1.525273380405984e-05f,  1.5403530393381608e-04f,
                                       1.3333558146428443e-03f, 9.618129107628477e-03f,
                                       5.550410866482158e-02f,  2.402265069591007e-01f,
                                       6.931471805599453e-01f,  1.0f};

template <typename V>
FASTDL_VEC_INLINE V exp2_fraction(V f) {
  V p = V{} + kExp2Coefficients[0];
  for (int i = 1; i < 8; ++i) p = p * f + kExp2Coefficients[i];
  return p;
}

// 2^x for x <= 0.5, |relative error| < 1e-8 over the normal float range; x <= -125 gives 0
// rather than a subnormal (whose arithmetic costs a microcode assist each), and NaN gives NaN
// (the test is written so that NaN passes it: NaN in, NaN out).
inline float exp2_poly(float x) {
  x = x <= -125.0f ? -127.0f : x;
  // truncation == ceil(x - 0.5) for x <= 0.5; NaN takes n = 0 (its cast would be undefined)
  const int32_t n = x == x ? static_cast<int32_t>(x - 0.5f) : 0;
  const float two_n = __builtin_bit_cast(float, static_cast<uint32_t>(n + 127) << 23);
  return exp2_fraction(x - static_cast<float>(n)) * two_n;
}

// exp2_poly on sixteen lanes (same polynomial, same clamping).
FASTDL_VEC_INLINE f32x16 exp2_vec(f32x16 x) {
  x = x <= splat(-125.0f) ? splat(-127.0f)
                          : x;  // NaN passes, and its lanes come out NaN whatever n they convert to
  const i32x16 n = __builtin_convertvector(x - 0.5f, i32x16);  // truncation toward zero
  const i32x16 bits = (n + 127) << 23;  // 2^n built directly in the exponent field
  return exp2_fraction(x - __builtin_convertvector(n, f32x16)) *
         reinterpret_cast<const f32x16&>(bits);
}

FASTDL_VEC_INLINE float hsum(f32x16 v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

}  // namespace fastdl::cpu::vec
