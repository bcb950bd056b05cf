// Layer normalisation on the CPU, rows in parallel. Forward reads each row (and its residual)
// once to form the sum and its mean, once more for the variance (two passes over a row that is
// in cache: no cancellation from E[x^2] - E[x]^2) and once to write the output. Backward forms
// dx from two passes over the row; the weight and bias gradients are summed per fixed block of
// rows and the blocks added in order, so the result does not depend on the thread count.
//
// float32 rows run on 16-lane vectors compiled per instruction set (simd_dispatch); float64
// runs scalar code; bfloat16 and float16 rows are converted to float32 row buffers and back
// (statistics in float32, as torch's kernel).

// Vector values stay inside this file's always-inlined helpers and simd_dispatch builds
// (cpu_vec.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/cpu_simd.h"
#include "common/cpu_vec.h"
#include "ops/layer_norm/layer_norm.h"

namespace fastdl::layer_norm {
namespace {

// A float row is walked 16 lanes at a time, a double row one element at a time.
template <typename T>
using Vec = std::conditional_t<std::is_same_v<T, float>, cpu::vec::f32x16, double>;

template <typename T>
FASTDL_VEC_INLINE Vec<T> vload(const T* p) {
  if constexpr (std::is_same_v<T, float>)
    return cpu::vec::load(p);
  else
    return *p;
}
template <typename T>
FASTDL_VEC_INLINE void vstore(T* p, Vec<T> v) {
  if constexpr (std::is_same_v<T, float>)
    cpu::vec::store(p, v);
  else
    *p = v;
}
template <typename T>
FASTDL_VEC_INLINE T vsum(Vec<T> v) {
  if constexpr (std::is_same_v<T, float>)
    return cpu::vec::hsum(v);
  else
    return v;
}
template <typename T>
constexpr int64_t kLanes = sizeof(Vec<T>) / sizeof(T);

// One row: y = (s - mean) * rstd * w + b with s = x + r (written to `sum`) or s = x.
template <typename T>
FASTDL_VEC_INLINE void forward_row(int64_t n, const T* x, const T* r, T* sum, const T* w,
                                   const T* b, T* y, T eps, T& mean_out, T& rstd_out) {
  using V = Vec<T>;
  const int64_t full = n - n % kLanes<T>;
  V acc{};
  T tail = 0;
  if (r != nullptr) {
    for (int64_t j = 0; j < full; j += kLanes<T>) {
      const V s = vload(x + j) + vload(r + j);
      vstore(sum + j, s);
      acc += s;
    }
    for (int64_t j = full; j < n; ++j) tail += (sum[j] = x[j] + r[j]);
    x = sum;
  } else {
    for (int64_t j = 0; j < full; j += kLanes<T>) acc += vload(x + j);
    for (int64_t j = full; j < n; ++j) tail += x[j];
  }
  const T mean = (vsum<T>(acc) + tail) / static_cast<T>(n);
  V sq{};
  T sq_tail = 0;
  for (int64_t j = 0; j < full; j += kLanes<T>) {
    const V d = vload(x + j) - mean;
    sq += d * d;
  }
  for (int64_t j = full; j < n; ++j) sq_tail += (x[j] - mean) * (x[j] - mean);
  const T rstd = T(1) / std::sqrt((vsum<T>(sq) + sq_tail) / static_cast<T>(n) + eps);
  for (int64_t j = 0; j < full; j += kLanes<T>) {
    V v = (vload(x + j) - mean) * rstd;
    if (w != nullptr) v *= vload(w + j);
    if (b != nullptr) v += vload(b + j);
    vstore(y + j, v);
  }
  for (int64_t j = full; j < n; ++j) {
    T v = (x[j] - mean) * rstd;
    if (w != nullptr) v *= w[j];
    if (b != nullptr) v += b[j];
    y[j] = v;
  }
  mean_out = mean;
  rstd_out = rstd;
}

// One row of the backward: with xhat = (x - mean) * rstd and g = dy * w,
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); dw += dy * xhat, db += dy.
template <typename T>
FASTDL_VEC_INLINE void backward_row(int64_t n, const T* x, const T* dy, const T* w, T mean, T rstd,
                                    T* dx, T* dw, T* db) {
  using V = Vec<T>;
  const int64_t full = n - n % kLanes<T>;
  V sg{}, sgx{};
  T sg_tail = 0, sgx_tail = 0;
  for (int64_t j = 0; j < full; j += kLanes<T>) {
    const V xhat = (vload(x + j) - mean) * rstd;
    const V d = vload(dy + j);
    const V g = w != nullptr ? d * vload(w + j) : d;
    sg += g;
    sgx += g * xhat;
    if (dw != nullptr) vstore(dw + j, vload(dw + j) + d * xhat);
    if (db != nullptr) vstore(db + j, vload(db + j) + d);
  }
  for (int64_t j = full; j < n; ++j) {
    const T xhat = (x[j] - mean) * rstd;
    const T g = w != nullptr ? dy[j] * w[j] : dy[j];
    sg_tail += g;
    sgx_tail += g * xhat;
    if (dw != nullptr) dw[j] += dy[j] * xhat;
    if (db != nullptr) db[j] += dy[j];
  }
  const T mean_g = (vsum<T>(sg) + sg_tail) / static_cast<T>(n);
  const T mean_gx = (vsum<T>(sgx) + sgx_tail) / static_cast<T>(n);
  for (int64_t j = 0; j < full; j += kLanes<T>) {
    const V xhat = (vload(x + j) - mean) * rstd;
    const V g = w != nullptr ? vload(dy + j) * vload(w + j) : vload(dy + j);
    vstore(dx + j, (g - mean_g - xhat * mean_gx) * rstd);
  }
  for (int64_t j = full; j < n; ++j) {
    const T xhat = (x[j] - mean) * rstd;
    const T g = w != nullptr ? dy[j] * w[j] : dy[j];
    dx[j] = (g - mean_g - xhat * mean_gx) * rstd;
  }
}

void forward_row_f32(int64_t n, const float* x, const float* r, float* sum, const float* w,
                     const float* b, float* y, float eps, float* mean, float* rstd) {
  cpu::simd_dispatch([=] { forward_row<float>(n, x, r, sum, w, b, y, eps, *mean, *rstd); });
}
void backward_row_f32(int64_t n, const float* x, const float* dy, const float* w, float mean,
                      float rstd, float* dx, float* dw, float* db) {
  cpu::simd_dispatch([=] { backward_row<float>(n, x, dy, w, mean, rstd, dx, dw, db); });
}
void forward_row_impl(int64_t n, const float* x, const float* r, float* sum, const float* w,
                      const float* b, float* y, float eps, float* mean, float* rstd) {
  forward_row_f32(n, x, r, sum, w, b, y, eps, mean, rstd);
}
void forward_row_impl(int64_t n, const double* x, const double* r, double* sum, const double* w,
                      const double* b, double* y, double eps, double* mean, double* rstd) {
  forward_row<double>(n, x, r, sum, w, b, y, eps, *mean, *rstd);
}
void backward_row_impl(int64_t n, const float* x, const float* dy, const float* w, float mean,
                       float rstd, float* dx, float* dw, float* db) {
  backward_row_f32(n, x, dy, w, mean, rstd, dx, dw, db);
}
void backward_row_impl(int64_t n, const double* x, const double* dy, const double* w, double mean,
                       double rstd, double* dx, double* dw, double* db) {
  backward_row<double>(n, x, dy, w, mean, rstd, dx, dw, db);
}

// Rows per task: enough work (about 16k elements) to pay for waking a thread.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// scalar_t is what the tensors hold; acc_t (float or double) is what the row kernels compute in.
// For float and double they are the same and rows are used in place; 16-bit rows are converted
// to acc_t buffers first.
template <typename scalar_t, typename acc_t>
void forward(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w, const at::Tensor& b,
             double eps, Rows rows, at::Tensor& y, at::Tensor& sum, at::Tensor& mean,
             at::Tensor& rstd) {
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const at::Tensor w_acc = kConvert && w.defined() ? w.to(c10::CppTypeToScalarType<acc_t>()) : w;
  const at::Tensor b_acc = kConvert && b.defined() ? b.to(c10::CppTypeToScalarType<acc_t>()) : b;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = data_or_null<scalar_t>(r);
  scalar_t* sp = r.defined() ? sum.data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  const acc_t* wp = data_or_null<acc_t>(w_acc);
  const acc_t* bp = data_or_null<acc_t>(b_acc);
  acc_t* mp = mean.data_ptr<acc_t>();
  acc_t* rsp = rstd.data_ptr<acc_t>();
  const int64_t n = rows.size;
  at::parallel_for(0, rows.count, row_grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> in(kConvert ? n : 0), out(kConvert ? n : 0);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t o = i * n;
      if constexpr (kConvert) {
        for (int64_t j = 0; j < n; ++j) {
          // the sum is rounded to the input's dtype first, as `input + residual` would be
          const scalar_t s = rp != nullptr ? static_cast<scalar_t>(static_cast<acc_t>(xp[o + j]) +
                                                                   static_cast<acc_t>(rp[o + j]))
                                           : xp[o + j];
          if (sp != nullptr) sp[o + j] = s;
          in[j] = static_cast<acc_t>(s);
        }
        forward_row_impl(n, in.data(), nullptr, nullptr, wp, bp, out.data(), acc_t(eps), mp + i,
                         rsp + i);
        for (int64_t j = 0; j < n; ++j) yp[o + j] = static_cast<scalar_t>(out[j]);
      } else {
        forward_row_impl(n, xp + o, rp != nullptr ? rp + o : nullptr,
                         sp != nullptr ? sp + o : nullptr, wp, bp, yp + o, acc_t(eps), mp + i,
                         rsp + i);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
              const at::Tensor& mean, const at::Tensor& rstd, Rows rows, bool want_dw, bool want_db,
              at::Tensor& dx, at::Tensor& dw_blocks, at::Tensor& db_blocks) {
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const at::Tensor w_acc = kConvert && w.defined() ? w.to(c10::CppTypeToScalarType<acc_t>()) : w;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const acc_t* wp = data_or_null<acc_t>(w_acc);
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  const acc_t* rsp = rstd.const_data_ptr<acc_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const int64_t n = rows.size;
  const int64_t blocks = dw_blocks.size(0);
  const int64_t per_block = (rows.count + blocks - 1) / blocks;
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> xin(kConvert ? n : 0), dyin(kConvert ? n : 0), dxout(kConvert ? n : 0);
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* dw = want_dw ? dw_blocks.data_ptr<acc_t>() + k * n : nullptr;
      acc_t* db = want_db ? db_blocks.data_ptr<acc_t>() + k * n : nullptr;
      for (int64_t i = k * per_block; i < std::min(rows.count, (k + 1) * per_block); ++i) {
        const int64_t o = i * n;
        if constexpr (kConvert) {
          for (int64_t j = 0; j < n; ++j) {
            xin[j] = static_cast<acc_t>(xp[o + j]);
            dyin[j] = static_cast<acc_t>(dyp[o + j]);
          }
          backward_row_impl(n, xin.data(), dyin.data(), wp, mp[i], rsp[i], dxout.data(), dw, db);
          for (int64_t j = 0; j < n; ++j) dxp[o + j] = static_cast<scalar_t>(dxout[j]);
        } else {
          backward_row_impl(n, xp + o, dyp + o, wp, mp[i], rsp[i], dxp + o, dw, db);
        }
      }
    }
  });
}

at::ScalarType stats_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(
    const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps) {
  const Rows rows =
      check_inputs("layer_norm", input, normalized_shape, weight, bias, residual, eps);
  const at::Tensor x = input.contiguous();
  const at::Tensor r = contiguous_or_undefined(residual);
  const at::Tensor w = contiguous_or_undefined(weight);
  const at::Tensor b = contiguous_or_undefined(bias);
  at::Tensor y = at::empty(input.sizes(), x.options());
  at::Tensor sum =
      residual.has_value() ? at::empty(input.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rows.count}, x.options().dtype(stats_dtype(input)));
  at::Tensor rstd = at::empty({rows.count}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "layer_norm_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        forward<scalar_t, acc_t>(x, r, w, b, eps, rows, y, sum, mean, rstd);
      });
  return {y, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, at::IntArrayRef normalized_shape,
    std::array<bool, 3> output_mask) {
  const char* op = "_layer_norm_backward";
  const Rows rows =
      check_inputs(op, input, normalized_shape, weight, std::nullopt, std::nullopt, 0.0);
  check_same_dtype(op, "input", input, "grad_output", grad_output);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), op, ": grad_output has shape ",
              sizes_str(grad_output), " but input has shape ", sizes_str(input));
  for (const auto& [name, t] : {std::pair{"mean", &mean}, std::pair{"rstd", &rstd}}) {
    TORCH_CHECK(t->scalar_type() == stats_dtype(input) && t->dim() == 1 && t->size(0) == rows.count,
                op, ": expected ", name, " of shape [", rows.count, "] and dtype ",
                stats_dtype(input), ", got ", sizes_str(*t), " ", t->scalar_type());
  }
  const bool want_dw = output_mask[1] && weight.has_value();
  const bool want_db = output_mask[2];
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight);
  at::Tensor dx = at::empty(input.sizes(), x.options());
  // One partial sum per block of rows, added in a fixed order. The number of blocks depends on
  // the shape only (up to 64, and the partial sums below 2^22 elements), so the gradients are the
  // same bits for any thread count.
  const int64_t blocks = std::clamp<int64_t>(std::min<int64_t>(64, (int64_t{1} << 22) / rows.size),
                                             1, std::max<int64_t>(rows.count, 1));
  const auto acc_options = x.options().dtype(stats_dtype(input));
  at::Tensor dw_blocks = at::zeros({blocks, want_dw ? rows.size : 0}, acc_options);
  at::Tensor db_blocks = at::zeros({blocks, want_db ? rows.size : 0}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "layer_norm_backward_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        backward<scalar_t, acc_t>(dy, x, w, mean.contiguous(), rstd.contiguous(), rows, want_dw,
                                  want_db, dx, dw_blocks, db_blocks);
      });
  const auto reduce = [&](bool wanted, const at::Tensor& partial) {
    return wanted ? partial.sum(0).to(input.scalar_type()).view(normalized_shape)
                  : at::empty({0}, x.options());
  };
  return {dx, reduce(want_dw, dw_blocks), reduce(want_db, db_blocks)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("_layer_norm_backward", &layer_norm_backward_cpu);
}

}  // namespace fastdl::layer_norm
