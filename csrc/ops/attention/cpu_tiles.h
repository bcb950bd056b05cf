// Register-blocked block products of the CPU attention forward (float32, AVX-512).
//
// S = alpha * Q K^T reads K from a packed copy: strips of kStrip keys, each stored as D rows of
// kStrip floats (K transposed within the strip), so one strip is contiguous and a tile of
// 8 queries x 32 keys keeps its 16 accumulators in registers for the whole D loop.
// O += P V keeps up to 6 rows x 64 output columns (24 accumulators) in registers over the keys.
// Both are compiled for AVX-512 only and called where the running CPU has it (checked once);
// elsewhere the caller falls back to the BLAS path.
#pragma once

#include <algorithm>
#include <cstdint>

#include <c10/util/Exception.h>

#include "common/cpu_capability.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include "common/avx512_math.h"
#define FASTDL_ATTENTION_TILES 1
#else
#define FASTDL_ATTENTION_TILES 0
#endif

namespace fastdl::attention::tiles {

constexpr int64_t kStrip = 32;  // keys per packed strip (two 16-lane vectors)

// Whether the tiles may run: compiled in (x86-64 with GCC or Clang) and AVX-512 in use. Every
// call of a function below sits behind this check.
inline bool available() { return FASTDL_ATTENTION_TILES && cpu::has(cpu::Capability::AVX512); }

#if FASTDL_ATTENTION_TILES

#define FASTDL_TILE_FN __attribute__((target("avx512f"), always_inline)) inline

// s[r * lds + c] = alpha * sum_d q[r * ldq + d] * kt[d * kStrip + c] for r < MR, c < 32.
// With vmax set, also vmax[16 r + e] = max(vmax[16 r + e], s[r][e], s[r][16 + e]) over the
// lanes selected by v0 (columns 0..15) and v1 (columns 16..31).
template <int MR>
FASTDL_TILE_FN void qk_tile(int64_t D, float alpha, const float* q, int64_t ldq, const float* kt,
                            float* s, int64_t lds, float* vmax, __mmask16 v0, __mmask16 v1) {
  __m512 a0[MR], a1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 k0 = _mm512_loadu_ps(kt + d * kStrip);
    const __m512 k1 = _mm512_loadu_ps(kt + d * kStrip + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(q[r * ldq + d]);
      a0[r] = _mm512_fmadd_ps(x, k0, a0[r]);
      a1[r] = _mm512_fmadd_ps(x, k1, a1[r]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    a0[r] = _mm512_mul_ps(a0[r], al);
    a1[r] = _mm512_mul_ps(a1[r], al);
    _mm512_storeu_ps(s + r * lds, a0[r]);
    _mm512_storeu_ps(s + r * lds + 16, a1[r]);
  }
  if (vmax) {  // lane-wise running maxima of the valid columns (masks v0, v1)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      __m512 mv = _mm512_loadu_ps(vmax + 16 * r);
      mv = _mm512_mask_max_ps(mv, v0, mv, a0[r]);
      mv = _mm512_mask_max_ps(mv, v1, mv, a1[r]);
      _mm512_storeu_ps(vmax + 16 * r, mv);
    }
  }
}

inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

// Scores of rows x cols (computed for whole strips; row stride lds >= cols rounded up to kStrip);
// kt points at the first strip. With row_max set, row_max[r] = max of the first cols scores of
// row r (vmax: scratch of 16 rows floats). Row r only needs columns below diag + r (causal):
// tiles entirely at or beyond that are skipped and left unwritten.
__attribute__((target("avx512f"))) inline void qk_block(int64_t rows, int64_t cols, int64_t D,
                                                        float alpha, const float* q, int64_t ldq,
                                                        const float* kt, float* s, int64_t lds,
                                                        float* row_max, float* vmax,
                                                        int64_t diag) {
  float* vm = nullptr;
  if (row_max) {
    vm = vmax;
    const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
    for (int64_t r = 0; r < rows; ++r) _mm512_storeu_ps(vm + 16 * r, ninf);
  }
  for (int64_t c0 = 0; c0 < cols; c0 += kStrip) {
    const float* strip = kt + c0 * D;
    float* sc = s + c0;
    const __mmask16 v0 = lanes(cols - c0), v1 = lanes(cols - c0 - 16);
    int64_t r = 0;
    for (; r + 8 <= rows; r += 8) {
      if (c0 >= diag + r + 7) continue;  // the whole tile is causally hidden
      qk_tile<8>(D, alpha, q + r * ldq, ldq, strip, sc + r * lds, lds, vm ? vm + 16 * r : nullptr,
                 v0, v1);
    }
    const float* qr = q + r * ldq;
    float* sr = sc + r * lds;
    float* vr = vm ? vm + 16 * r : nullptr;
    if (c0 >= diag + rows - 1) continue;
    switch (rows - r) {
      case 7: qk_tile<7>(D, alpha, qr, ldq, strip, sr, lds, vr, v0, v1); break;
      case 6: qk_tile<6>(D, alpha, qr, ldq, strip, sr, lds, vr, v0, v1); break;
      case 5: qk_tile<5>(D, alpha, qr, ldq, strip, sr, lds, vr, v0, v1); break;
      case 4: qk_tile<4>(D, alpha, qr, ldq, strip, sr, lds, vr, v0, v1); break;
      case 3: qk_tile<3>(D, alpha, qr, ldq, strip, sr, lds, vr, v0, v1); break;
      case 2: qk_tile<2>(D, alpha, qr, ldq, strip, sr, lds, vr, v0, v1); break;
      case 1: qk_tile<1>(D, alpha, qr, ldq, strip, sr, lds, vr, v0, v1); break;
      default: break;
    }
  }
  if (row_max) {
    for (int64_t r = 0; r < rows; ++r) row_max[r] = _mm512_reduce_max_ps(_mm512_loadu_ps(vm + 16 * r));
  }
}

// o[r * ldo + 16 * c + e] += sum_j p[r * ldp + j] * v[j * ldv + 16 * c + e], r < MR, c < NV.
template <int MR, int NV>
FASTDL_TILE_FN void pv_tile(int64_t n, const float* p, int64_t ldp, const float* v, int64_t ldv,
                            float* o, int64_t ldo) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * ldo + 16 * c);
  }
  for (int64_t j = 0; j < n; ++j) {
    __m512 vj[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) vj[c] = _mm512_loadu_ps(v + j * ldv + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(p[r * ldp + j]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(x, vj[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * ldo + 16 * c, acc[r][c]);
  }
}

// Row r of p is zero from column diag + r on (causal): each tile stops at its last row's end.
template <int NV>
__attribute__((target("avx512f"))) inline void pv_rows(int64_t rows, int64_t n, const float* p,
                                                       int64_t ldp, const float* v, int64_t ldv,
                                                       float* o, int64_t ldo, int64_t diag) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) {
    const int64_t nt = std::clamp<int64_t>(diag + r + 5, 0, n);
    pv_tile<6, NV>(nt, p + r * ldp, ldp, v, ldv, o + r * ldo, ldo);
  }
  const float* pr = p + r * ldp;
  float* orow = o + r * ldo;
  const int64_t nt = std::clamp<int64_t>(diag + rows - 1, 0, n);
  switch (rows - r) {
    case 5: pv_tile<5, NV>(nt, pr, ldp, v, ldv, orow, ldo); break;
    case 4: pv_tile<4, NV>(nt, pr, ldp, v, ldv, orow, ldo); break;
    case 3: pv_tile<3, NV>(nt, pr, ldp, v, ldv, orow, ldo); break;
    case 2: pv_tile<2, NV>(nt, pr, ldp, v, ldv, orow, ldo); break;
    case 1: pv_tile<1, NV>(nt, pr, ldp, v, ldv, orow, ldo); break;
    default: break;
  }
}

// o (rows x D, row stride ldo) += p (rows x n) v (n x D); D a multiple of 16; p[r][c] = 0 for
// c >= diag + r.
__attribute__((target("avx512f"))) inline void pv_block(int64_t rows, int64_t n, int64_t D,
                                                        const float* p, int64_t ldp,
                                                        const float* v, int64_t ldv, float* o,
                                                        int64_t ldo, int64_t diag) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    switch (std::min<int64_t>(4, (D - d0) / 16)) {
      case 4: pv_rows<4>(rows, n, p, ldp, v + d0, ldv, o + d0, ldo, diag); break;
      case 3: pv_rows<3>(rows, n, p, ldp, v + d0, ldv, o + d0, ldo, diag); break;
      case 2: pv_rows<2>(rows, n, p, ldp, v + d0, ldv, o + d0, ldo, diag); break;
      case 1: pv_rows<1>(rows, n, p, ldp, v + d0, ldv, o + d0, ldo, diag); break;
      default: break;
    }
  }
}

// x[i] = 2^(x[i] - m) for i < n, returns their sum; inputs below m - 125 (and -inf) give 0,
// NaN gives NaN (the unordered compare keeps it).
__attribute__((target("avx512f"))) inline float exp2_shift_sum(int64_t n, float* x, float m) {
  const __m512 vm = _mm512_set1_ps(m), lo = _mm512_set1_ps(-125.0f);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    const __m512 t = _mm512_sub_ps(_mm512_maskz_loadu_ps(in, x + i), vm);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(in, t, lo, _CMP_NLE_UQ);
    const __m512 e = _mm512_maskz_mov_ps(keep, cpu::avx512::exp2(t));
    _mm512_mask_storeu_ps(x + i, in, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

#undef FASTDL_TILE_FN

#else

// Never called: available() is false where the tiles are not compiled.
[[noreturn]] inline void not_compiled() { TORCH_INTERNAL_ASSERT(false, "attention: the CPU tiles are not compiled in"); }
inline void qk_block(int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, float*,
                     int64_t, float*, float*, int64_t) {
  not_compiled();
}
inline void pv_block(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                     float*, int64_t, int64_t) {
  not_compiled();
}
inline float exp2_shift_sum(int64_t, float*, float) { not_compiled(); }

#endif

}  // namespace fastdl::attention::tiles
