// attention's CPU forward: a tiled, flash-style kernel.
//
// One work item is (batch, head, block of BQ queries). It walks the key blocks once,
// keeping a running row max and row sum (online softmax, base 2 with log2(e) folded into the
// scale) and a BQ x D output accumulator, so no score buffer larger than BQ x BK exists.
// float32 with D a multiple of 16 on an AVX-512 or AVX2 + FMA CPU (the common case) computes the
// two block products per step (S = Q K^T and O += P V) with the register-blocked tiles of
// tiles.h, compiled for both sets from one template: K is first repacked once per call into
// strips of 32 keys stored transposed (the same size as K), the S tiles also produce the row
// maxima of blocks that need no masking, and the exp2 pass is the tiles' own. Every other case
// (float64, other D, CPUs with neither set or FASTDL_CPU_CAPABILITY=default) runs the block
// products through the BLAS libtorch links and the softmax part in loops compiled per
// instruction set (cpu_simd.h). With causal=True key blocks entirely above the diagonal are
// never visited, tiles above it inside a diagonal block are skipped, and only blocks that
// straddle it are masked element by element.
//
// Both GEMM-shaped products run at close to the core's FMA throughput (as fast as MKL's sgemm on
// these shapes), so the time left is the softmax part: one exp2 per score and little else.
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common/cpu_simd.h"
#include "common/cpu_vec.h"
#include "ops/attention/cpu/attention_cpu.h"
#include "ops/attention/cpu/tiles.h"

namespace fastdl::attention {
namespace {

// K of every (batch, key/value head) in the strip layout of tiles::qk_block: strip t holds keys
// 32 t .. 32 t + 31 as D rows of 32 floats, keys past Nk are zero. Same size as K (rounded up);
// a tensor so that torch's memory profiler accounts for it.
at::Tensor pack_k_strips(const Shape& sh, const float* k, Strides sk) {
  const int64_t strips = (sh.Nk + tiles::kStrip - 1) / tiles::kStrip;
  const int64_t per_head = strips * tiles::kStrip * sh.D;
  auto packed_t = at::empty({sh.B * sh.Hkv * per_head}, at::TensorOptions().dtype(at::kFloat));
  float* packed = packed_t.data_ptr<float>();
  at::parallel_for(0, sh.B * sh.Hkv * strips, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bk = item / strips, t = item % strips;
      const float* src = k + (bk / sh.Hkv) * sk.b + (bk % sh.Hkv) * sk.h;
      float* dst = packed + bk * per_head + t * tiles::kStrip * sh.D;
      for (int64_t c = 0; c < tiles::kStrip; ++c) {
        const int64_t j = t * tiles::kStrip + c;
        if (j < sh.Nk) {
          const float* row = src + j * sk.n;
          for (int64_t d = 0; d < sh.D; ++d) dst[d * tiles::kStrip + c] = row[d];
        } else {
          for (int64_t d = 0; d < sh.D; ++d) dst[d * tiles::kStrip + c] = 0.0f;
        }
      }
    }
  });
  return packed_t;
}

}  // namespace

template <typename T>
void forward_kernel(const Shape& sh, const Options& o, const T* q, Strides sq, const T* k,
                    Strides sk, const T* v, Strides sv, const MaskView<T>& mask, T* out, T* lse) {
  const int64_t D = sh.D;
  const int64_t q_blocks = (sh.Nq + kBlockQ - 1) / kBlockQ;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  // float32 with D a multiple of 16 and at least kMinTiledQueries queries on a CPU with tiles:
  // register-blocked tiles on packed K; otherwise the BLAS path.
  const tiles::Kernels* const fast = tiles::select();  // also the exp2 rows (float32 only)
  bool tiled = false;
  at::Tensor k_strips;
  const float* kt_all = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    tiled = D % 16 == 0 && fast && sh.Nq >= kMinTiledQueries;
    if (tiled) {
      k_strips = pack_k_strips(sh, k, sk);
      kt_all = k_strips.const_data_ptr<float>();
    }
  }
  const int64_t strips_per_head = (sh.Nk + tiles::kStrip - 1) / tiles::kStrip;
  at::parallel_for(0, sh.B * sh.H * q_blocks, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    std::vector<T> s2(kBlockQ * kBlockK), acc(kBlockQ * D), m(kBlockQ), l(kBlockQ);
    std::vector<float> bmax(tiled ? kBlockQ : 0), vmax(tiled ? tiles::kMaxLanes * kBlockQ : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / q_blocks, i0 = (item % q_blocks) * kBlockQ;
      const int64_t b = bh / sh.H, h = bh % sh.H, hk = h / sh.G;
      const int64_t rows = std::min(kBlockQ, sh.Nq - i0);
      const T* qp = q + b * sq.b + h * sq.h + i0 * sq.n;
      const T* kp = k + b * sk.b + hk * sk.h;
      const T* vp = v + b * sv.b + hk * sv.h;
      std::fill(acc.begin(), acc.begin() + rows * D, T(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), T(0));
      const int64_t kend = key_end(sh, o.causal, i0, rows);
      for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, kend - j0);
        // row stride of the score block: kBlockK on the tiled path (whole strips are computed)
        const int64_t lds = tiled ? kBlockK : cols;
        bool fused_max = false;
        // first causally hidden key of query row 0, relative to j0 (row r: diag + r)
        const int64_t diag = o.causal ? i0 + sh.Nk - sh.Nq + 1 - j0 : cols + kBlockQ;
        if constexpr (std::is_same_v<T, float>) {
          if (tiled) {
            const float* kt =
                kt_all + (b * sh.Hkv + hk) * strips_per_head * tiles::kStrip * D + j0 * D;
            // the row maxima come with the scores unless masking changes the block afterwards
            const bool masked = mask.data || (o.causal && j0 + cols > i0 + sh.Nk - sh.Nq + 1);
            fused_max = !masked;
            fast->qk_block({rows, cols, D, static_cast<float>(o.scale * kLog2e), qp, sq.n, kt,
                            s2.data(), lds, fused_max ? bmax.data() : nullptr, vmax.data(), diag});
            mask_block(s2.data(), lds, rows, cols, sh, o, mask, b, h, i0, j0);
          }
        }
        if (!tiled) {
          block_scores(s2.data(), qp, sq.n, kp + j0 * sk.n, sk.n, rows, cols, D, sh, o, mask, b, h,
                       i0, j0);
        }
        for (int64_t r = 0; r < rows; ++r) {
          T* s = s2.data() + r * lds;
          const T m_new = nan_max(m[r], fused_max ? bmax[r] : cpu::row_max(cols, s));
          if (m_new == neg_inf) {  // nothing visible yet in this row
            std::fill(s, s + cols, T(0));
            continue;
          }
          T alpha, sum;
          if constexpr (std::is_same_v<T, float>) {
            alpha = m[r] == neg_inf ? 0.0f : cpu::vec::exp2_poly(m[r] - m_new);
            sum = fast ? fast->exp2_shift_sum(cols, s, m_new) : cpu::exp2_shift_sum(cols, s, m_new);
          } else {
            alpha = m[r] == neg_inf ? T(0) : std::exp2(m[r] - m_new);
            sum = cpu::exp2_shift_sum(cols, s, m_new);
          }
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != T(1)) cpu::scale(D, acc.data() + r * D, alpha);
          if (o.dropout.enabled) {
            o.dropout.apply(cols, s, static_cast<uint64_t>((bh * sh.Nq + i0 + r) * sh.Nk + j0));
          }
        }
        if constexpr (std::is_same_v<T, float>) {
          if (tiled)
            fast->pv_block(
                {rows, cols, D, s2.data(), lds, vp + j0 * sv.n, sv.n, acc.data(), D, diag});
        }
        if (!tiled) {
          gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, D, rows, cols, T(1),
               vp + j0 * sv.n, sv.n, s2.data(), cols, T(1), acc.data(), D);
        }
      }
      T* op = out + (bh * sh.Nq + i0) * D;
      T* lp = lse + bh * sh.Nq + i0;
      for (int64_t r = 0; r < rows; ++r) {
        if (l[r] > T(0) || l[r] != l[r]) {  // a NaN sum (NaN scores or +inf mask) gives NaN
          const T inv = T(1) / l[r];
          for (int64_t d = 0; d < D; ++d) op[r * D + d] = acc[r * D + d] * inv;
          lp[r] = static_cast<T>((m[r] + std::log2(l[r])) * kLn2);
        } else {
          std::fill(op + r * D, op + (r + 1) * D, T(0));
          lp[r] = neg_inf;
        }
      }
    }
  });
}

template void forward_kernel<float>(const Shape&, const Options&, const float*, Strides,
                                    const float*, Strides, const float*, Strides,
                                    const MaskView<float>&, float*, float*);
template void forward_kernel<double>(const Shape&, const Options&, const double*, Strides,
                                     const double*, Strides, const double*, Strides,
                                     const MaskView<double>&, double*, double*);

}  // namespace fastdl::attention
