// Fused attention on the CPU: a tiled, flash-style kernel.
//
// Forward: one work item is (batch, head, block of BQ queries). It walks the key blocks once,
// keeping a running row max and row sum (online softmax, base 2 with log2(e) folded into the
// scale) and a BQ x D output accumulator, so no score buffer larger than BQ x BK exists.
// float32 with D a multiple of 16 on an AVX-512 or AVX2 + FMA CPU (the common case) computes the
// two block products per step (S = Q K^T and O += P V) with the register-blocked tiles of
// cpu_tiles.h, compiled for both sets from one template: K is first repacked once per call into
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
//
// Backward: one work item is (batch, key/value head), so that dK, dV (shared by the query heads
// of a group) and dQ are each owned by one thread and summed in a fixed order: deterministic.
// For every key block it recomputes P from the saved log-sum-exp and accumulates
// dV += P^T dO, dS = P * (dO V^T - delta), dK += dS^T Q * scale, dQ += dS K * scale,
// where delta = rowsum(dO * O) - grad_lse. Its products go through the BLAS.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_blas.h"
#include "common/cpu_simd.h"
#include "common/cpu_vec.h"
#include "ops/attention/cpu_tiles.h"

namespace fastdl::attention {

namespace {

using cpu::gemm;
using cpu::TransposeType;

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;
// Packing K for the tiles costs a pass over K per call; fewer queries than this (decoding with a
// KV cache: Nq = 1) do not repay it and take the BLAS path.
constexpr int64_t kMinTiledQueries = 64;

// ---- dropout: the counter hash of fastdl/ops/attention.py, bit for bit --------------------------

inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  bool enabled = false;
  uint32_t s1 = 0, s2 = 0, threshold = 0;
  double inv_keep = 1.0;

  Dropout(double p, int64_t seed) {
    if (p <= 0.0) return;
    enabled = true;
    const uint64_t s = static_cast<uint64_t>(seed);
    s1 = static_cast<uint32_t>(s * 0x9E3779B1ull + 0x7F4A7C15ull);
    s2 = static_cast<uint32_t>((s >> 32) ^ 0x94D049BBull ^ (s * 0x632BE5ABull));
    threshold = static_cast<uint32_t>(std::min(p * 16777216.0, 16777216.0));
    inv_keep = 1.0 / (1.0 - p);
  }

  bool keep(uint64_t counter) const {
    uint32_t x = fmix32(static_cast<uint32_t>(counter) ^ s1);
    x = fmix32(x ^ static_cast<uint32_t>(counter >> 32) ^ s2);
    return (x >> 8) >= threshold;
  }

  // x[c] *= keep(row_counter + c) / (1 - p)
  template <typename T>
  void apply(int64_t n, T* x, uint64_t row_counter) const {
    const T s = static_cast<T>(inv_keep);
    for (int64_t c = 0; c < n; ++c) x[c] = keep(row_counter + c) ? x[c] * s : T(0);
  }
};

// ---- shapes and argument checks -----------------------------------------------------------------

struct Shape {
  int64_t B, H, Hkv, G, Nq, Nk, D;
};

Shape check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& mask, double scale, double dropout_p) {
  check_rank(op, "q", q, 4, "[B, H, Nq, D]");
  check_rank(op, "k", k, 4, "[B, Hkv, Nk, D]");
  check_rank(op, "v", v, 4, "[B, Hkv, Nk, D]");
  Shape s{q.size(0), q.size(1), k.size(1), 1, q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(s.D >= 8 && s.D <= 256 && s.D % 8 == 0, op, ": unsupported head dim D=", s.D,
              " (q shape ", sizes_str(q), "); supported: multiples of 8 from 8 to 256");
  TORCH_CHECK(k.size(3) == s.D && v.size(3) == s.D, op, ": head dims differ: q has D=", s.D,
              ", k has D=", k.size(3), ", v has D=", v.size(3));
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, op, ": batch sizes differ: q has B=", s.B,
              ", k has B=", k.size(0), ", v has B=", v.size(0));
  TORCH_CHECK(v.size(1) == s.Hkv && v.size(2) == s.Nk, op,
              ": k and v must have the same [Hkv, Nk], got k ", sizes_str(k), " and v ",
              sizes_str(v));
  TORCH_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, op, ": the number of query heads H=", s.H,
              " must be a multiple of the key/value heads Hkv=", s.Hkv);
  s.G = s.H / s.Hkv;
  check_same_dtype(op, "q", q, "k", k);
  check_same_dtype(op, "q", q, "v", v);
  check_same_device(op, "q", q, "k", k);
  check_same_device(op, "q", q, "v", v);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, op,
              ": q has unsupported dtype ", dtype,
              " on cpu; supported: float32, float64, bfloat16 (float16 only on CUDA)");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                ": attn_mask must be boolean or floating, got dtype ", m.scalar_type());
    check_same_device(op, "attn_mask", m, "q", q);
    const int64_t target[4] = {s.B, s.H, s.Nq, s.Nk};
    bool ok = m.dim() <= 4;
    for (int64_t i = 0; ok && i < m.dim(); ++i) {
      const int64_t size = m.size(m.dim() - 1 - i);
      ok = size == 1 || size == target[3 - i];
    }
    TORCH_CHECK(ok, op, ": attn_mask of shape ", sizes_str(m),
                " is not broadcastable to [B, H, Nq, Nk] = [", s.B, ", ", s.H, ", ", s.Nq, ", ",
                s.Nk, "]");
  }
  return s;
}

// Tensors the kernels read: compute dtype, unit stride along D, rows at least D apart.
at::Tensor prepare(const at::Tensor& t, at::ScalarType dtype) {
  auto r = t.to(dtype);
  if (r.stride(3) != 1 || (r.size(2) > 1 && r.stride(2) < r.size(3))) r = r.contiguous();
  return r;
}

// The mask as additive base-2 values of the compute dtype (-inf where hidden), broadcast to 4-D.
// Finite values saturate at the dtype's range rather than overflowing to -inf when multiplied
// by log2(e): a mask of finfo.min on every key is a value (the reference gives the mean of v),
// not a hidden row. +-inf and NaN pass through as they are (NaN in, NaN out).
at::Tensor additive_mask(const std::optional<at::Tensor>& mask, const Shape& s,
                         at::ScalarType dtype) {
  if (!mask.has_value()) return at::Tensor();
  const auto& m = *mask;
  at::Tensor add;
  if (m.scalar_type() == at::kBool) {
    add = at::zeros(m.sizes(), m.options().dtype(dtype))
              .masked_fill_(m.logical_not(), -std::numeric_limits<double>::infinity());
  } else {
    const auto values = m.to(dtype);
    const double limit = dtype == at::kDouble ? std::numeric_limits<double>::max()
                                              : std::numeric_limits<float>::max();
    const auto scaled = values * kLog2e;
    add = at::where(at::isfinite(values), scaled.clamp(-limit, limit), scaled);
  }
  return add.expand({s.B, s.H, s.Nq, s.Nk});
}

// max that keeps a NaN from either side (std::max drops a NaN second argument)
template <typename T>
inline T nan_max(T a, T b) {
  if (a != a) return a;
  if (b != b) return b;
  return b > a ? b : a;
}

struct Strides {
  int64_t b, h, n;
  // rows of a one-row tensor may carry any stride; BLAS wants a leading dim >= D
  explicit Strides(const at::Tensor& t)
      : b(t.stride(0)), h(t.stride(1)), n(std::max(t.stride(2), t.size(3))) {}
  Strides() : b(0), h(0), n(0) {}
};

template <typename T>
struct MaskView {
  const T* data = nullptr;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
  bool boolean = false;  // from a bool mask: -inf hides a key even where its score is NaN
  MaskView(const at::Tensor& m, bool from_bool) : boolean(from_bool) {
    if (!m.defined()) return;
    data = m.const_data_ptr<T>();
    sb = m.stride(0), sh = m.stride(1), sq = m.stride(2), sk = m.stride(3);
  }
  // s[c] += mask[b, h, i, j0 + c]; a bool mask replaces hidden scores with -inf, as
  // masked_fill does in the reference, while a float mask adds (NaN + -inf stays NaN)
  void add_row(T* s, int64_t n, int64_t b, int64_t h, int64_t i, int64_t j0) const {
    const T* row = data + b * sb + h * sh + i * sq + j0 * sk;
    if (boolean) {
      const T neg_inf = -std::numeric_limits<T>::infinity();
      if (sk == 1) {
        for (int64_t c = 0; c < n; ++c) s[c] = row[c] == neg_inf ? neg_inf : s[c];
      } else {
        for (int64_t c = 0; c < n; ++c) s[c] = row[c * sk] == neg_inf ? neg_inf : s[c];
      }
    } else if (sk == 1) {
      for (int64_t c = 0; c < n; ++c) s[c] += row[c];
    } else {
      for (int64_t c = 0; c < n; ++c) s[c] += row[c * sk];
    }
  }
};

struct Options {
  bool causal;
  double scale;
  Dropout dropout;
};

// Mask of one block of scaled (base-2) scores s2[r * lds + c] (query i0 + r, key j0 + c): adds
// the additive mask and sets causally hidden entries to -inf.
template <typename T>
void mask_block(T* s2, int64_t lds, int64_t rows, int64_t cols, const Shape& sh, const Options& o,
                const MaskView<T>& mask, int64_t b, int64_t h, int64_t i0, int64_t j0) {
  if (!mask.data && !o.causal) return;
  const int64_t offset = sh.Nk - sh.Nq;
  for (int64_t r = 0; r < rows; ++r) {
    T* s = s2 + r * lds;
    if (mask.data) mask.add_row(s, cols, b, h, i0 + r, j0);
    if (o.causal) {
      const int64_t first_hidden = std::max<int64_t>(0, i0 + r + offset + 1 - j0);
      for (int64_t c = first_hidden; c < cols; ++c) s[c] = -std::numeric_limits<T>::infinity();
    }
  }
}

// Scaled (base-2) scores of one block with the mask applied: s2[r][c] for query i0 + r and key
// j0 + c (row stride cols); hidden entries are -inf.
template <typename T>
void block_scores(T* s2, const T* qp, int64_t ldq, const T* kp, int64_t ldk, int64_t rows,
                  int64_t cols, int64_t D, const Shape& sh, const Options& o,
                  const MaskView<T>& mask, int64_t b, int64_t h, int64_t i0, int64_t j0) {
  const T alpha = static_cast<T>(o.scale * kLog2e);
  gemm(TransposeType::Transpose, TransposeType::NoTranspose, cols, rows, D, alpha, kp, ldk, qp,
       ldq, T(0), s2, cols);
  mask_block(s2, cols, rows, cols, sh, o, mask, b, h, i0, j0);
}

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

// Number of keys any of the queries i0 .. i0 + rows - 1 may see.
inline int64_t key_end(const Shape& sh, bool causal, int64_t i0, int64_t rows) {
  if (!causal) return sh.Nk;
  return std::clamp<int64_t>(i0 + rows + sh.Nk - sh.Nq, 0, sh.Nk);
}

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
            const bool masked =
                mask.data || (o.causal && j0 + cols > i0 + sh.Nk - sh.Nq + 1);
            fused_max = !masked;
            fast->qk_block({rows, cols, D, static_cast<float>(o.scale * kLog2e), qp, sq.n, kt,
                            s2.data(), lds, fused_max ? bmax.data() : nullptr, vmax.data(), diag});
            mask_block(s2.data(), lds, rows, cols, sh, o, mask, b, h, i0, j0);
          }
        }
        if (!tiled) {
          block_scores(s2.data(), qp, sq.n, kp + j0 * sk.n, sk.n, rows, cols, D, sh, o, mask, b,
                       h, i0, j0);
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
          if (tiled) fast->pv_block({rows, cols, D, s2.data(), lds, vp + j0 * sv.n, sv.n,
                                     acc.data(), D, diag});
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

template <typename T>
void backward_kernel(const Shape& sh, const Options& o, const T* q, Strides sq, const T* k,
                     Strides sk, const T* v, Strides sv, const MaskView<T>& mask, const T* dout,
                     Strides sdo, const T* out, Strides so, const T* lse, const T* grad_lse,
                     T* dq, T* dk, T* dv) {
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
            block_scores(p.data(), qp, sq.n, kp + j0 * sk.n, sk.n, rows, cols, D, sh, o, mask, b,
                         h, i0, j0);
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
            gemm(TransposeType::Transpose, TransposeType::NoTranspose, cols,
                                      rows, D, T(1), vp + j0 * sv.n, sv.n, dop, sdo.n, T(0),
                                      ds.data(), cols);
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
              gemm(TransposeType::NoTranspose, TransposeType::Transpose, D,
                                        cols, rows, T(1), dop, sdo.n, pd.data(), cols, T(1),
                                        dv_acc.data(), D);
            } else {
              // dV += P^T dO
              gemm(TransposeType::NoTranspose, TransposeType::Transpose, D,
                                        cols, rows, T(1), dop, sdo.n, p.data(), cols, T(1),
                                        dv_acc.data(), D);
            }
            for (int64_t r = 0; r < rows; ++r) {
              cpu::softmax_grad(cols, p.data() + r * cols, ds.data() + r * cols,
                                 delta[g * sh.Nq + i0 + r]);
            }
            const T sc = static_cast<T>(o.scale);
            // dK += scale * dS^T Q
            gemm(TransposeType::NoTranspose, TransposeType::Transpose, D,
                                      cols, rows, sc, qp, sq.n, ds.data(), cols, T(1),
                                      dk_acc.data(), D);
            // dQ += scale * dS K
            gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, D,
                                      rows, cols, sc, kp + j0 * sk.n, sk.n, ds.data(), cols, T(1),
                                      dq + (bh * sh.Nq + i0) * D, D);
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

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& attn_mask,
                                                 bool causal, double scale, double dropout_p,
                                                 int64_t seed) {
  const auto sh = check_inputs("attention", q, k, v, attn_mask, scale, dropout_p);
  const auto ct = compute_type(q.scalar_type());
  auto out = at::zeros({sh.B, sh.H, sh.Nq, sh.D}, q.options().dtype(ct));
  auto lse = at::full({sh.B, sh.H, sh.Nq}, -std::numeric_limits<double>::infinity(),
                      q.options().dtype(ct));
  if (out.numel() > 0 && sh.Nk > 0) {
    const auto qc = prepare(q, ct), kc = prepare(k, ct), vc = prepare(v, ct);
    const auto mask = additive_mask(attn_mask, sh, ct);
    const bool bool_mask = attn_mask && attn_mask->scalar_type() == at::kBool;
    const Options o{causal, scale, Dropout(dropout_p, seed)};
    AT_DISPATCH_FLOATING_TYPES(ct, "attention_cpu", [&] {
      forward_kernel<scalar_t>(sh, o, qc.const_data_ptr<scalar_t>(), Strides(qc),
                               kc.const_data_ptr<scalar_t>(), Strides(kc),
                               vc.const_data_ptr<scalar_t>(), Strides(vc), MaskView<scalar_t>(mask, bool_mask),
                               out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
    });
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, bool causal, double scale, double dropout_p,
    int64_t seed) {
  const char* op = "attention_backward";
  const auto sh = check_inputs(op, q, k, v, attn_mask, scale, dropout_p);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": expected grad_out and out of shape ", sizes_str(q), ", got ",
              sizes_str(grad_out), " and ", sizes_str(out));
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == sh.B && lse.size(1) == sh.H &&
                  lse.size(2) == sh.Nq,
              op, ": expected lse of shape [", sh.B, ", ", sh.H, ", ", sh.Nq, "], got ",
              sizes_str(lse));
  const auto ct = compute_type(q.scalar_type());
  auto dq = at::zeros({sh.B, sh.H, sh.Nq, sh.D}, q.options().dtype(ct));
  auto dk = at::zeros({sh.B, sh.Hkv, sh.Nk, sh.D}, q.options().dtype(ct));
  auto dv = at::zeros({sh.B, sh.Hkv, sh.Nk, sh.D}, q.options().dtype(ct));
  if (dq.numel() > 0 && sh.Nk > 0) {
    const auto qc = prepare(q, ct), kc = prepare(k, ct), vc = prepare(v, ct);
    const auto doc = prepare(grad_out, ct), oc = prepare(out, ct);
    const auto lse_c = lse.to(ct).contiguous();
    at::Tensor glse;
    if (grad_lse.has_value() && grad_lse->defined()) glse = grad_lse->to(ct).contiguous();
    const auto mask = additive_mask(attn_mask, sh, ct);
    const bool bool_mask = attn_mask && attn_mask->scalar_type() == at::kBool;
    const Options o{causal, scale, Dropout(dropout_p, seed)};
    AT_DISPATCH_FLOATING_TYPES(ct, "attention_backward_cpu", [&] {
      backward_kernel<scalar_t>(
          sh, o, qc.const_data_ptr<scalar_t>(), Strides(qc), kc.const_data_ptr<scalar_t>(),
          Strides(kc), vc.const_data_ptr<scalar_t>(), Strides(vc), MaskView<scalar_t>(mask, bool_mask),
          doc.const_data_ptr<scalar_t>(), Strides(doc), oc.const_data_ptr<scalar_t>(),
          Strides(oc), lse_c.const_data_ptr<scalar_t>(),
          glse.defined() ? glse.const_data_ptr<scalar_t>() : nullptr, dq.data_ptr<scalar_t>(),
          dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
    });
  }
  const auto dtype = q.scalar_type();
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("_attention_backward", &attention_backward_cpu);
}

}  // namespace fastdl::attention
