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
#include <type_traits>

#include "common/cpu_capability.h"
#include "common/cpu_vec.h"

// Vector values pass between the members and the template bodies, which are all inlined into
// the entry points (see above): GCC's note that such signatures change ABI with AVX does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define FASTDL_ISA_ENTRY(target_string) __attribute__((target(target_string), flatten))

namespace fastdl::cpu::isa {

// f(std::integral_constant<int, n>()) for 1 <= n <= N: a run-time count (of rows, pixels, taps)
// as the template argument a tile is unrolled for.
template <int N, class F>
inline void with_count(int64_t n, F&& f) {
  if constexpr (N > 0) {
    if (n == N) return f(std::integral_constant<int, N>());
    with_count<N - 1>(n, f);
  }
}

// The entry of the best instruction set the active capability allows (read once per call of an
// op, so that one call never mixes two sets), or `portable` where neither is allowed.
template <class Entry>
inline Entry best_entry(Entry avx512, Entry avx2, Entry portable = Entry{}) {
  if (cpu::has(cpu::Capability::AVX512)) return avx512;
  if (cpu::has(cpu::Capability::AVX2)) return avx2;
  return portable;
}

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

  FASTDL_AVX512_FN V div(V a, V b) { return _mm512_div_ps(a, b); }
  FASTDL_AVX512_FN V fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
  // x86 max and min: b where either is NaN.
  FASTDL_AVX512_FN V max(V a, V b) { return _mm512_max_ps(a, b); }
  FASTDL_AVX512_FN V min(V a, V b) { return _mm512_min_ps(a, b); }
  FASTDL_AVX512_FN V abs(V a) { return _mm512_abs_ps(a); }
  // |magnitude| with the sign bit of sign.
  FASTDL_AVX512_FN V copy_sign(V magnitude, V sign) {
    const __m512i bit = _mm512_set1_epi32(INT32_MIN);  // 0xCA: bit ? sign : magnitude, bitwise
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(bit, _mm512_castps_si512(sign),
                                                         _mm512_castps_si512(magnitude), 0xCA));
  }
  // A non-temporal store of a whole 64-byte-aligned line.
  FASTDL_AVX512_FN void stream(float* p, V v) { _mm512_stream_ps(p, v); }

  // src[0], src[2], ..., src[30], reading src[0 .. 30] only.
  FASTDL_AVX512_FN V even_lanes(const float* src) {
    const __m512i evens =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const V high = _mm512_maskz_loadu_ps(0x7FFF, src + 16);  // its last lane would be src[31]
    return _mm512_permutex2var_ps(_mm512_loadu_ps(src), evens, high);
  }

  // Transposes the 16 x 16 block r[row] lane col in registers: three rounds of in-lane shuffles
  // (32-bit pairs, 64-bit pairs), then 128-bit lanes across registers.
  FASTDL_AVX512_FN void transpose(V (&r)[kLanes]) {
    V t[kLanes];
    for (int i = 0; i < 16; i += 2) {  // lane l of t[i], t[i+1]: rows i, i+1 of columns 4l..4l+3
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // lane l of r[i + j]: rows i..i+3 of column 4l + j
      const __m512d t0 = _mm512_castps_pd(t[i]), t1 = _mm512_castps_pd(t[i + 1]),
                    t2 = _mm512_castps_pd(t[i + 2]), t3 = _mm512_castps_pd(t[i + 3]);
      r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
      r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
      r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
      r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int j = 0; j < 4;
         ++j) {  // column 4l + j gathers lane l of r[j], r[4 + j], r[8 + j], r[12 + j]
      const V low01 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44);
      const V high01 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
      const V low23 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
      const V high23 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
      t[j] = _mm512_shuffle_f32x4(low01, low23, 0x88);
      t[4 + j] = _mm512_shuffle_f32x4(low01, low23, 0xDD);
      t[8 + j] = _mm512_shuffle_f32x4(high01, high23, 0x88);
      t[12 + j] = _mm512_shuffle_f32x4(high01, high23, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }

  // The first n lanes (none for n <= 0, all for n >= kLanes).
  FASTDL_AVX512_FN Mask lanes(int64_t n) {
    return n >= kLanes ? Mask(0xFFFF) : n <= 0 ? Mask(0) : Mask((1u << n) - 1u);
  }
  // Lanes outside m read as 0 (and are not touched in memory) resp. are not written.
  FASTDL_AVX512_FN V load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  FASTDL_AVX512_FN void store(float* p, V v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
  // Lanes in m: max(a, b), which is b where either is NaN (x86 max); other lanes: a.
  FASTDL_AVX512_FN V max(V a, V b, Mask m) { return _mm512_mask_max_ps(a, m, a, b); }
  FASTDL_AVX512_FN V zero_outside(Mask m, V v) { return _mm512_maskz_mov_ps(m, v); }
  FASTDL_AVX512_FN float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
  FASTDL_AVX512_FN float reduce_add(V v) { return _mm512_reduce_add_ps(v); }

  // 2^t = 2^round(t) * 2^f, |f| <= 1/2, scaled by scalef, which saturates cleanly (very large t
  // gives inf) and keeps NaN. t is first clamped to 160, past the float range, because an
  // infinite t would make f = inf - inf = NaN (min passes a NaN t through: it returns its second
  // operand when one is NaN). t <= -125 gives exactly 0: those lanes are computed as t = 0 and
  // zeroed after, because a subnormal result (or an underflow to 0) costs a microcode assist of
  // about a hundred cycles per instruction, and a run of them (a GELU of large activations, a
  // softmax over a wide range) slows the whole kernel several times over.
  FASTDL_AVX512_FN V exp2(V t) {
    const Mask tiny = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-125.0f), _CMP_LE_OQ);
    t = _mm512_mask_mov_ps(_mm512_min_ps(_mm512_set1_ps(160.0f), t), tiny, _mm512_setzero_ps());
    const V r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(t, r);
    V p = _mm512_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 8
    for (int i = 1; i < kExp2Terms; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
    return _mm512_maskz_mov_ps(static_cast<Mask>(~tiny), _mm512_scalef_ps(p, r));
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

  FASTDL_AVX2_FN V div(V a, V b) { return _mm256_div_ps(a, b); }
  FASTDL_AVX2_FN V fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  FASTDL_AVX2_FN V max(V a, V b) { return _mm256_max_ps(a, b); }
  FASTDL_AVX2_FN V min(V a, V b) { return _mm256_min_ps(a, b); }
  FASTDL_AVX2_FN V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  FASTDL_AVX2_FN V copy_sign(V magnitude, V sign) {
    const V bit = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_andnot_ps(bit, magnitude), _mm256_and_ps(bit, sign));
  }
  FASTDL_AVX2_FN void stream(float* p, V v) { _mm256_stream_ps(p, v); }  // 32-byte aligned

  // src[0], src[2], ..., src[14], reading src[0 .. 14] only: the odd lanes of src[7 .. 14] are
  // the even elements past the first vector, so no masked load is needed.
  FASTDL_AVX2_FN V even_lanes(const float* src) {
    const V mixed =
        _mm256_shuffle_ps(_mm256_loadu_ps(src), _mm256_loadu_ps(src + 7), _MM_SHUFFLE(3, 1, 2, 0));
    // mixed: 0 2 8 10 | 4 6 12 14, its 64-bit pairs in the order 0 2 1 3
    return _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(mixed), _MM_SHUFFLE(3, 1, 2, 0)));
  }

  // Transposes the 8 x 8 block r[row] lane col in registers: 32-bit pairs, 64-bit pairs within
  // 128-bit lanes, then the lanes across registers.
  FASTDL_AVX2_FN void transpose(V (&r)[kLanes]) {
    V t[kLanes];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  // lane l (of each half) of r[i + j]: rows i..i+3 of column j
      r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      t[j] = _mm256_permute2f128_ps(r[j], r[4 + j], 0x20);
      t[4 + j] = _mm256_permute2f128_ps(r[j], r[4 + j], 0x31);
    }
    for (int i = 0; i < 8; ++i) r[i] = t[i];
  }

  FASTDL_AVX2_FN Mask lanes(int64_t n) {
    const int32_t k = n >= kLanes ? kLanes : n <= 0 ? 0 : static_cast<int32_t>(n);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k), lane));
  }
  // vmaskmov: masked-off lanes read as 0 without touching memory, and are not written.
  FASTDL_AVX2_FN V load(const float* p, Mask m) {
    return _mm256_maskload_ps(p, _mm256_castps_si256(m));
  }
  FASTDL_AVX2_FN void store(float* p, V v, Mask m) {
    _mm256_maskstore_ps(p, _mm256_castps_si256(m), v);
  }
  FASTDL_AVX2_FN V max(V a, V b, Mask m) { return _mm256_blendv_ps(a, _mm256_max_ps(a, b), m); }
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

  // As Avx512::exp2 (t <= -125 gives exactly 0, computed as t = 0 and zeroed after), with
  // 2^round(t) built in the exponent field: t is first clamped to 128 (min passes NaN), so that
  // field 255 gives inf for t >= 127.5.
  FASTDL_AVX2_FN V exp2(V t) {
    const V tiny = _mm256_cmp_ps(t, _mm256_set1_ps(-125.0f), _CMP_LE_OQ);
    t = _mm256_andnot_ps(tiny, _mm256_min_ps(_mm256_set1_ps(128.0f), t));
    const V r = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm256_sub_ps(t, r);
    V p = _mm256_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 8
    for (int i = 1; i < kExp2Terms; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
    const __m256i bits =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(r), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
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
