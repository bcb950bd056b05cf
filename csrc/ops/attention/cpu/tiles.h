// Register-blocked block products of the CPU attention forward (float32), one template over the
// instruction-set traits of common/cpu_isa.h, compiled for AVX-512 and for AVX2 + FMA.
//
// S = alpha * Q K^T reads K from a packed copy: strips of kStrip keys, each stored as D rows of
// kStrip floats (K transposed within the strip), so one strip is contiguous and an S tile of
// MR queries x 2 vectors of keys keeps its 2 MR accumulators in registers for the whole D loop.
// O += P V keeps MR rows x NV vectors of output columns in registers over the keys.
//
// Tile shapes, from the register file (accumulators + the loads of one step + one broadcast):
//   AVX-512 (32 zmm): S 8 x 32 keys, a whole strip (16 + 2 + 1); O 6 x 64 columns (24 + 4 + 1).
//   AVX2 (16 ymm):    S 6 x 16 keys, each strip in two halves (12 + 2 + 1); O 6 x 16 columns
//                     (12 + 2 + 1). A 32-key S tile would need 4 K loads beside 4 MR
//                     accumulators, which leaves at most 2 rows: twice the broadcasts per FMA.
// The packed layout is the same for both sets. Callers take the functions from select(), which
// gives the best set the active CPU capability allows, or none (then the BLAS path).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cpu_capability.h"
#include "common/cpu_isa.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors stay inside the entry points (cpu_isa.h)
#endif

namespace fastdl::attention::tiles {

constexpr int64_t kStrip = 32;     // keys per packed strip
constexpr int64_t kMaxLanes = 16;  // floats per row of qk_block's vmax scratch (widest set)

// S (row stride lds) = alpha * q (rows x D) K^T for `cols` keys from the strip at kt; lds >= cols
// rounded up to kStrip. With row_max set, row_max[r] = max of the first cols scores of row r
// (vmax: scratch of kMaxLanes * rows floats). Row r only needs columns below diag + r (causal):
// tiles entirely at or beyond that are skipped and left unwritten.
struct QkArgs {
  int64_t rows, cols, D;
  float alpha;
  const float* q;
  int64_t ldq;
  const float* kt;
  float* s;
  int64_t lds;
  float* row_max;
  float* vmax;
  int64_t diag;
};

// o (rows x D, row stride ldo) += p (rows x n, row stride ldp) v (n x D, row stride ldv), D a
// multiple of 16; p[r][c] = 0 for c >= diag + r (causal), where the tiles stop early.
struct PvArgs {
  int64_t rows, n, D;
  const float* p;
  int64_t ldp;
  const float* v;
  int64_t ldv;
  float* o;
  int64_t ldo;
  int64_t diag;
};

struct Kernels {
  void (*qk_block)(const QkArgs&);
  void (*pv_block)(const PvArgs&);
  // x[i] = 2^(x[i] - m) for i < n, returns their sum; inputs at or below m - 125 (and -inf) give
  // 0 (exp2's cut-off), NaN gives NaN.
  float (*exp2_shift_sum)(int64_t n, float* x, float m);
};

#if FASTDL_X86_ISA

using cpu::isa::with_count;

template <class I>
struct Tiles {
  using V = typename I::V;
  using Mask = typename I::Mask;
  static constexpr int L = I::kLanes;
  static constexpr int kQkRows = L == 16 ? 8 : 6;
  static constexpr int64_t kQkCols = 2 * L;  // keys per S tile
  static constexpr int kPvRows = 6;
  static constexpr int kPvVectors = L == 16 ? 4 : 2;

  // s[r * lds + c] = alpha * sum_d q[r * ldq + d] * kt[d * kStrip + c] for r < MR, c < 2 L
  // (kt: the tile's first key within its strip). With vmax set, also
  // vmax[L r + e] = max(vmax[L r + e], s[r][e], s[r][L + e]) over the lanes in v0 resp. v1.
  template <int MR>
  static void qk_tile(int64_t D, float alpha, const float* q, int64_t ldq, const float* kt,
                      float* s, int64_t lds, float* vmax, Mask v0, Mask v1) {
    V a0[MR], a1[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) a0[r] = a1[r] = I::zero();
    for (int64_t d = 0; d < D; ++d) {
      const V k0 = I::load(kt + d * kStrip);
      const V k1 = I::load(kt + d * kStrip + L);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const V x = I::set1(q[r * ldq + d]);
        a0[r] = I::fma(x, k0, a0[r]);
        a1[r] = I::fma(x, k1, a1[r]);
      }
    }
    const V al = I::set1(alpha);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      a0[r] = I::mul(a0[r], al);
      a1[r] = I::mul(a1[r], al);
      I::store(s + r * lds, a0[r]);
      I::store(s + r * lds + L, a1[r]);
    }
    if (vmax) {  // lane-wise running maxima of the valid columns
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        V mv = I::load(vmax + L * r);
        mv = I::max(mv, a0[r], v0);
        mv = I::max(mv, a1[r], v1);
        I::store(vmax + L * r, mv);
      }
    }
  }

  static void qk_block(const QkArgs& a) {
    float* vm = nullptr;
    if (a.row_max) {
      vm = a.vmax;
      for (int64_t r = 0; r < a.rows; ++r) I::store(vm + L * r, I::set1(-__builtin_inff()));
    }
    for (int64_t c0 = 0; c0 < a.cols; c0 += kQkCols) {  // tile columns c0 .. c0 + 2 L - 1
      const float* kt = a.kt + (c0 / kStrip) * kStrip * a.D + c0 % kStrip;
      float* sc = a.s + c0;
      const Mask v0 = I::lanes(a.cols - c0), v1 = I::lanes(a.cols - c0 - L);
      int64_t r = 0;
      for (; r + kQkRows <= a.rows; r += kQkRows) {
        if (c0 >= a.diag + r + kQkRows - 1) continue;  // the whole tile is causally hidden
        qk_tile<kQkRows>(a.D, a.alpha, a.q + r * a.ldq, a.ldq, kt, sc + r * a.lds, a.lds,
                         vm ? vm + L * r : nullptr, v0, v1);
      }
      if (c0 >= a.diag + a.rows - 1) continue;
      with_count<kQkRows - 1>(a.rows - r, [&](auto mr) {
        qk_tile<decltype(mr)::value>(a.D, a.alpha, a.q + r * a.ldq, a.ldq, kt, sc + r * a.lds,
                                     a.lds, vm ? vm + L * r : nullptr, v0, v1);
      });
    }
    if (a.row_max) {
      for (int64_t r = 0; r < a.rows; ++r) a.row_max[r] = I::reduce_max(I::load(vm + L * r));
    }
  }

  // o[r * ldo + L c + e] += sum_j p[r * ldp + j] * v[j * ldv + L c + e], r < MR, c < NV.
  template <int MR, int NV>
  static void pv_tile(int64_t n, const float* p, int64_t ldp, const float* v, int64_t ldv, float* o,
                      int64_t ldo) {
    V acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = I::load(o + r * ldo + L * c);
    }
    for (int64_t j = 0; j < n; ++j) {
      V vj[NV];
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) vj[c] = I::load(v + j * ldv + L * c);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const V x = I::set1(p[r * ldp + j]);
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) acc[r][c] = I::fma(x, vj[c], acc[r][c]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) I::store(o + r * ldo + L * c, acc[r][c]);
    }
  }

  // Row r of p is zero from column diag + r on (causal): each tile stops at its last row's end.
  template <int NV>
  static void pv_rows(const PvArgs& a, const float* v, float* o) {
    int64_t r = 0;
    for (; r + kPvRows <= a.rows; r += kPvRows) {
      const int64_t nt = std::clamp<int64_t>(a.diag + r + kPvRows - 1, 0, a.n);
      pv_tile<kPvRows, NV>(nt, a.p + r * a.ldp, a.ldp, v, a.ldv, o + r * a.ldo, a.ldo);
    }
    const int64_t nt = std::clamp<int64_t>(a.diag + a.rows - 1, 0, a.n);
    with_count<kPvRows - 1>(a.rows - r, [&](auto mr) {
      pv_tile<decltype(mr)::value, NV>(nt, a.p + r * a.ldp, a.ldp, v, a.ldv, o + r * a.ldo, a.ldo);
    });
  }

  static void pv_block(const PvArgs& a) {
    for (int64_t d0 = 0; d0 < a.D; d0 += kPvVectors * L) {
      with_count<kPvVectors>(std::min<int64_t>(kPvVectors, (a.D - d0) / L),
                             [&](auto nv) { pv_rows<decltype(nv)::value>(a, a.v + d0, a.o + d0); });
    }
  }

  // Whole vectors unmasked, the tail masked: an AVX2 masked store costs several plain ones.
  static float exp2_shift_sum(int64_t n, float* x, float m) {
    const V vm = I::set1(m);
    V sum = I::zero();
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      const V e = I::exp2(I::sub(I::load(x + i), vm));  // 0 for arguments <= -125
      I::store(x + i, e);
      sum = I::add(sum, e);
    }
    if (i < n) {
      const Mask in = I::lanes(n - i);
      const V e = I::zero_outside(in, I::exp2(I::sub(I::load(x + i, in), vm)));
      I::store(x + i, e, in);
      sum = I::add(sum, e);
    }
    return I::reduce_add(sum);
  }
};

// The entry points of each set (cpu_isa.h: flatten compiles the whole template body for it).
#define FASTDL_ATTENTION_TILE_ENTRIES(Isa, target)                                       \
  struct Isa##Entries {                                                                  \
    FASTDL_ISA_ENTRY(target) static void qk_block(const QkArgs& a) {                     \
      Tiles<cpu::isa::Isa>::qk_block(a);                                                 \
    }                                                                                    \
    FASTDL_ISA_ENTRY(target) static void pv_block(const PvArgs& a) {                     \
      Tiles<cpu::isa::Isa>::pv_block(a);                                                 \
    }                                                                                    \
    FASTDL_ISA_ENTRY(target) static float exp2_shift_sum(int64_t n, float* x, float m) { \
      return Tiles<cpu::isa::Isa>::exp2_shift_sum(n, x, m);                              \
    }                                                                                    \
    static constexpr Kernels kernels{&qk_block, &pv_block, &exp2_shift_sum};             \
  };
FASTDL_ATTENTION_TILE_ENTRIES(Avx512, "avx512f")
FASTDL_ATTENTION_TILE_ENTRIES(Avx2, "arch=x86-64-v3")
#undef FASTDL_ATTENTION_TILE_ENTRIES

#endif

// The tiles of the best instruction set the active capability allows (read it once per call of
// the op, so that one call never mixes two), or nullptr where none is compiled in or allowed.
inline const Kernels* select() {
#if FASTDL_X86_ISA
  return cpu::isa::best_entry<const Kernels*>(&Avx512Entries::kernels, &Avx2Entries::kernels);
#else
  return nullptr;
#endif
}

}  // namespace fastdl::attention::tiles

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
