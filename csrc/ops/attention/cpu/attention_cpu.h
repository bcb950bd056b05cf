// What the files of attention's CPU kernels share: the checked shape of a call, the dropout
// hash, the mask and causal handling of a score block, and the two kernels' entry points.
//
// attention.cpp checks the arguments, converts the inputs and registers the op; forward.cpp
// holds the flash-style forward (tiled or through the BLAS), backward.cpp the backward, and
// tiles.h the register-blocked tiles of the forward's block products.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "common/cpu_blas.h"

namespace fastdl::attention {

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

// Checks q, k, v, the mask and the scalars (dtypes first, then the shapes), naming the argument
// and the sizes seen; returns the shape of the call.
Shape check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& mask, double scale, double dropout_p);

// Tensors the kernels read: compute dtype, unit stride along D, rows at least D apart.
at::Tensor prepare(const at::Tensor& t, at::ScalarType dtype);

// The mask as additive base-2 values of the compute dtype (-inf where hidden), broadcast to 4-D.
// Finite values saturate at the dtype's range rather than overflowing to -inf when multiplied
// by log2(e): a mask of finfo.min on every key is a value (the reference gives the mean of v),
// not a hidden row. +-inf and NaN pass through as they are (NaN in, NaN out).
at::Tensor additive_mask(const std::optional<at::Tensor>& mask, const Shape& s,
                         at::ScalarType dtype);

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
  gemm(TransposeType::Transpose, TransposeType::NoTranspose, cols, rows, D, alpha, kp, ldk, qp, ldq,
       T(0), s2, cols);
  mask_block(s2, cols, rows, cols, sh, o, mask, b, h, i0, j0);
}

// Number of keys any of the queries i0 .. i0 + rows - 1 may see.
inline int64_t key_end(const Shape& sh, bool causal, int64_t i0, int64_t rows) {
  if (!causal) return sh.Nk;
  return std::clamp<int64_t>(i0 + rows + sh.Nk - sh.Nq, 0, sh.Nk);
}

// out [B, H, Nq, D] and lse [B, H, Nq] (natural log) of one call: forward.cpp.
template <typename T>
void forward_kernel(const Shape& sh, const Options& o, const T* q, Strides sq, const T* k,
                    Strides sk, const T* v, Strides sv, const MaskView<T>& mask, T* out, T* lse);

// dq, dk, dv of one call from the saved out and lse: backward.cpp.
template <typename T>
void backward_kernel(const Shape& sh, const Options& o, const T* q, Strides sq, const T* k,
                     Strides sk, const T* v, Strides sv, const MaskView<T>& mask, const T* dout,
                     Strides sdo, const T* out, Strides so, const T* lse, const T* grad_lse, T* dq,
                     T* dk, T* dv);

}  // namespace fastdl::attention
