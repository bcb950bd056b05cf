// attention's CPU backward.
//
// One work item is (batch, key/value head), so that dK, dV (shared by the query heads of a
// group) and dQ are each owned by one thread and summed in a fixed order: deterministic.
// For every key block it recomputes P from the saved log-sum-exp and accumulates
// dV += P^T dO, dS = P * (dO V^T - delta), dK += dS^T Q * scale, dQ += dS K * scale,
// where delta = rowsum(dO * O) - grad_lse. Its products go through the BLAS.
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "common/cpu_simd.h"
#include "ops/attention/cpu/attention_cpu.h"
#include "ops/attention/cpu/tiles.h"

namespace fastdl::attention {

template <typename T>
void backward_kernel(const Shape& sh, const Options& o, const T* q, Strides sq, const T* k,
                     Strides sk, const T* v, Strides sv, const MaskView<T>& mask, const T* dout,
                     Strides sdo, const T* out, Strides so, const T* lse, const T* grad_lse, T* dq,
                     T* dk, T* dv) {
  const int64_t D = sh.D, G = sh.G;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const tiles::Kernels* const fast = tiles::select();  // the tiles' exp2 rows (float32 only)
  at::parallel_for(0, sh.B * sh.Hkv, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    std::vector<T> p(kBlockQ * kBlockK), ds(kBlockQ * kBlockK), dk_acc(kBlockK * D),
        dv_acc(kBlockK * D), delta(G * sh.Nq), lse2(G * sh.Nq);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / sh.Hkv, hk = item % sh.Hkv;
      // delta = rowsum(dO * O) - grad_lse and the base-2 lse of every query row of the group
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g, bh = b * sh.H + h;
        for (int64_t i = 0; i < sh.Nq; ++i) {
          const T* dor = dout + b * sdo.b + h * sdo.h + i * sdo.n;
          const T* orow = out + b * so.b + h * so.h + i * so.n;
          T d = cpu::dot(D, dor, orow);
          if (grad_lse) d -= grad_lse[bh * sh.Nq + i];
          delta[g * sh.Nq + i] = d;
          lse2[g * sh.Nq + i] = static_cast<T>(lse[bh * sh.Nq + i] * kLog2e);
        }
      }
      const T* kp = k + b * sk.b + hk * sk.h;
      const T* vp = v + b * sv.b + hk * sv.h;
      for (int64_t j0 = 0; j0 < sh.Nk; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, sh.Nk - j0);
        std::fill(dk_acc.begin(), dk_acc.begin() + cols * D, T(0));
        std::fill(dv_acc.begin(), dv_acc.begin() + cols * D, T(0));
        // causal: query i sees key j0 when i + Nk - Nq >= j0
        const int64_t first_q = o.causal ? std::max<int64_t>(0, j0 - (sh.Nk - sh.Nq)) : 0;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g, bh = b * sh.H + h;
          for (int64_t i0 = (first_q / kBlockQ) * kBlockQ; i0 < sh.Nq; i0 += kBlockQ) {
            const int64_t rows = std::min(kBlockQ, sh.Nq - i0);
            const T* qp = q + b * sq.b + h * sq.h + i0 * sq.n;
            const T* dop = dout + b * sdo.b + h * sdo.h + i0 * sdo.n;
            block_scores(p.data(), qp, sq.n, kp + j0 * sk.n, sk.n, rows, cols, D, sh, o, mask, b, h,
                         i0, j0);
            for (int64_t r = 0; r < rows; ++r) {
              T* pr = p.data() + r * cols;
              const T l2 = lse2[g * sh.Nq + i0 + r];
              if (l2 == neg_inf) {
                std::fill(pr, pr + cols, T(0));
              } else {
                if constexpr (std::is_same_v<T, float>) {
                  if (fast) {
                    fast->exp2_shift_sum(cols, pr, l2);
                    continue;
                  }
                }
                cpu::exp2_shift_sum(cols, pr, l2);
              }
            }
            // dP = dO V^T
            gemm(TransposeType::Transpose, TransposeType::NoTranspose, cols, rows, D, T(1),
                 vp + j0 * sv.n, sv.n, dop, sdo.n, T(0), ds.data(), cols);
            if (o.dropout.enabled) {
              // dV sees the dropped probabilities; dP is masked the same way
              for (int64_t r = 0; r < rows; ++r) {
                const auto counter = static_cast<uint64_t>((bh * sh.Nq + i0 + r) * sh.Nk + j0);
                o.dropout.apply(cols, ds.data() + r * cols, counter);
              }
              std::vector<T> pd(p.begin(), p.begin() + rows * cols);
              for (int64_t r = 0; r < rows; ++r) {
                const auto counter = static_cast<uint64_t>((bh * sh.Nq + i0 + r) * sh.Nk + j0);
                o.dropout.apply(cols, pd.data() + r * cols, counter);
              }
              gemm(TransposeType::NoTranspose, TransposeType::Transpose, D, cols, rows, T(1), dop,
                   sdo.n, pd.data(), cols, T(1), dv_acc.data(), D);
            } else {
              // dV += P^T dO
              gemm(TransposeType::NoTranspose, TransposeType::Transpose, D, cols, rows, T(1), dop,
                   sdo.n, p.data(), cols, T(1), dv_acc.data(), D);
            }
            for (int64_t r = 0; r < rows; ++r) {
              cpu::softmax_grad(cols, p.data() + r * cols, ds.data() + r * cols,
                                delta[g * sh.Nq + i0 + r]);
            }
            const T sc = static_cast<T>(o.scale);
            // dK += scale * dS^T Q
            gemm(TransposeType::NoTranspose, TransposeType::Transpose, D, cols, rows, sc, qp, sq.n,
                 ds.data(), cols, T(1), dk_acc.data(), D);
            // dQ += scale * dS K
            gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, D, rows, cols, sc,
                 kp + j0 * sk.n, sk.n, ds.data(), cols, T(1), dq + (bh * sh.Nq + i0) * D, D);
          }
        }
        T* dkp = dk + ((b * sh.Hkv + hk) * sh.Nk + j0) * D;
        T* dvp = dv + ((b * sh.Hkv + hk) * sh.Nk + j0) * D;
        std::copy(dk_acc.begin(), dk_acc.begin() + cols * D, dkp);
        std::copy(dv_acc.begin(), dv_acc.begin() + cols * D, dvp);
      }
    }
  });
}

template void backward_kernel<float>(const Shape&, const Options&, const float*, Strides,
                                     const float*, Strides, const float*, Strides,
                                     const MaskView<float>&, const float*, Strides, const float*,
                                     Strides, const float*, const float*, float*, float*, float*);
template void backward_kernel<double>(const Shape&, const Options&, const double*, Strides,
                                      const double*, Strides, const double*, Strides,
                                      const MaskView<double>&, const double*, Strides,
                                      const double*, Strides, const double*, const double*, double*,
                                      double*, double*);

}  // namespace fastdl::attention
