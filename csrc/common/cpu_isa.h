// The x86 vector instruction sets fastdl's hand-written CPU tiles are written for, as traits
// structs of one interface (Avx512: 16-lane zmm, Avx2: 8-lane ymm with FMA), so that one template
// body serves both: templates take the traits as a parameter and call only its members.
//
// GCC lets an intrinsic be inlined only into a function compiled for its instruction set, and a
// template cannot choose its own target attribute. So the members carry the target of their set
// and are plain inline functions (not always_inline, which GCC would reject inside the
// target-less template), and each kernel's entry point is compiled for the set with
// FASTDL_ISA_ENTRY, whose `flatten` inlines the whole template body, members included, into it.
// Every entry point must be reached behind cpu::has() (cpu_capability.h).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTDL_X86_ISA 1
#include <immintrin.h>

#include <cstdint>

#include "common/cpu_vec.h"

// Vector values pass between the members and the template bodies, which are all inlined into
// the entry points (see above): GCC's note that such signatures change ABI with AVX does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define FASTDL_ISA_ENTRY(target_string) __attribute__((target(target_string), flatten))

namespace fastdl::cpu::isa {

#define FASTDL_AVX512_FN __attribute__((target("avx512f"))) static inline
#define FASTDL_AVX2_FN __attribute__((target("arch=x86-64-v3"))) static inline

// 2^f for |f| <= 1/2: the degree-6 part of cpu_vec.h's polynomial (relative error below 1.3e-7),
// highest coefficient first, evaluated by each set's FMA.
constexpr const float* kExp2Poly = vec::kExp2Coefficients + 1;
constexpr int kExp2Terms = 7;

struct Avx512 {
  using V = __m512;
  using Mask = __mmask16;  // one bit per lane
  static constexpr int kLanes = 16;

  FASTDL_AVX512_FN V zero() { return _mm512_setzero_ps(); }
  FASTDL_AVX512_FN V set1(float a) { return _mm512_set1_ps(a); }
  FASTDL_AVX512_FN V load(const float* p) { return _mm512_loadu_ps(p); }
  FASTDL_AVX512_FN void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  FASTDL_AVX512_FN V add(V a, V b) { return _mm512_add_ps(a, b); }
  FASTDL_AVX512_FN V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  FASTDL_AVX512_FN V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  FASTDL_AVX512_FN V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }

  // The first n lanes (none for n <= 0, all for n >= kLanes).
  FASTDL_AVX512_FN Mask lanes(int64_t n) {
    return n >= kLanes ? Mask(0xFFFF) : n <= 0 ? Mask(0) : Mask((1u << n) - 1u);
  }
  // Lanes outside m read as 0 (and are not touched in memory) resp. are not written.
  FASTDL_AVX512_FN V load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  FASTDL_AVX512_FN void store(float* p, V v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
  // Lanes in m: max(a, b), which is b where either is NaN (x86 max); other lanes: a.
  FASTDL_AVX512_FN V max(V a, V b, Mask m) { return _mm512_mask_max_ps(a, m, a, b); }
  // Lanes in m where t > lo or t is NaN (the unordered compare).
  FASTDL_AVX512_FN Mask above_or_nan(V t, float lo, Mask m) {
    return _mm512_mask_cmp_ps_mask(m, t, _mm512_set1_ps(lo), _CMP_NLE_UQ);
  }
  FASTDL_AVX512_FN V zero_outside(Mask m, V v) { return _mm512_maskz_mov_ps(m, v); }
  FASTDL_AVX512_FN float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
  FASTDL_AVX512_FN float reduce_add(V v) { return _mm512_reduce_add_ps(v); }

  // 2^t = 2^round(t) * 2^f, |f| <= 1/2, scaled by scalef, which saturates cleanly (very negative
  // t gives 0, very large t inf) and keeps NaN. t is first clamped to [-160, 160], past both ends
  // of the float range, because an infinite t would make f = inf - inf = NaN (max and min pass a
  // NaN t through: they return their second operand when one is NaN).
  FASTDL_AVX512_FN V exp2(V t) {
    t = _mm512_min_ps(_mm512_set1_ps(160.0f), _mm512_max_ps(_mm512_set1_ps(-160.0f), t));
    const V r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(t, r);
    V p = _mm512_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 8
    for (int i = 1; i < kExp2Terms; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
    return _mm512_scalef_ps(p, r);
  }
};

struct Avx2 {
  using V = __m256;
  using Mask = __m256;  // all bits set in the selected lanes (no mask registers before AVX-512)
  static constexpr int kLanes = 8;

  FASTDL_AVX2_FN V zero() { return _mm256_setzero_ps(); }
  FASTDL_AVX2_FN V set1(float a) { return _mm256_set1_ps(a); }
  FASTDL_AVX2_FN V load(const float* p) { return _mm256_loadu_ps(p); }
  FASTDL_AVX2_FN void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  FASTDL_AVX2_FN V add(V a, V b) { return _mm256_add_ps(a, b); }
  FASTDL_AVX2_FN V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  FASTDL_AVX2_FN V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  FASTDL_AVX2_FN V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }

  FASTDL_AVX2_FN Mask lanes(int64_t n) {
    const int32_t k = n >= kLanes ? kLanes : n <= 0 ? 0 : static_cast<int32_t>(n);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k), lane));
  }
  // vmaskmov: masked-off lanes read as 0 without touching memory, and are not written.
  FASTDL_AVX2_FN V load(const float* p, Mask m) { return _mm256_maskload_ps(p, _mm256_castps_si256(m)); }
  FASTDL_AVX2_FN void store(float* p, V v, Mask m) { _mm256_maskstore_ps(p, _mm256_castps_si256(m), v); }
  FASTDL_AVX2_FN V max(V a, V b, Mask m) { return _mm256_blendv_ps(a, _mm256_max_ps(a, b), m); }
  FASTDL_AVX2_FN Mask above_or_nan(V t, float lo, Mask m) {
    return _mm256_and_ps(_mm256_cmp_ps(t, _mm256_set1_ps(lo), _CMP_NLE_UQ), m);
  }
  FASTDL_AVX2_FN V zero_outside(Mask m, V v) { return _mm256_and_ps(m, v); }
  FASTDL_AVX2_FN float reduce_max(V v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  FASTDL_AVX2_FN float reduce_add(V v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }

  // As Avx512::exp2, with 2^round(t) built in the exponent field: t is first clamped to
  // [-127, 128] (NaN passes: max/min return their second operand when one is NaN), so that
  // exponent field 0 gives 0 for t < -126.5 and field 255 gives inf for t >= 127.5.
  FASTDL_AVX2_FN V exp2(V t) {
    t = _mm256_min_ps(_mm256_set1_ps(128.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), t));
    const V r = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm256_sub_ps(t, r);
    V p = _mm256_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 8
    for (int i = 1; i < kExp2Terms; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(r), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  }
};

#undef FASTDL_AVX512_FN
#undef FASTDL_AVX2_FN

}  // namespace fastdl::cpu::isa

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#else
#define FASTDL_X86_ISA 0
#endif
