// The LSTM layer on the CPU: the time loop of lstm.h with GEMMs through MKL and a fused
// pointwise step per time step. The pointwise step reads the four gate pre-activations of a row
// once and writes the activations, c_t and h_t in the same pass (no temporaries), vectorised over
// hidden units (simd_dispatch: AVX-512, AVX2, baseline) and parallel over rows.
//
// float32 uses fastdl's own exp (range reduction to 2^n * 2^f and a degree-7 polynomial for 2^f);
// sigmoid and tanh built on it are within 2e-7 (absolute) of the exact functions. float64 calls
// the exact library functions (it is the checking path, not the fast one).

// Vector values stay inside this file's always-inlined helpers and simd_dispatch builds
// (cpu_vec.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/cpu_simd.h"
#include "common/cpu_vec.h"
#include "ops/lstm/lstm.h"

namespace fastdl::lstm {
namespace {

using cpu::vec::f32x16;
using cpu::vec::i32x16;
using cpu::vec::load;
using cpu::vec::store;

struct VectorMath {
  // e^x: x = n ln2 + f ln2 with n integer, |f| <= 1/2; 2^f by cpu_vec.h's polynomial, 2^n in the
  // exponent bits. Arguments are clamped to [-87, 88], where e^x neither overflows nor becomes
  // subnormal; both signs are needed here, which cpu_vec.h's exp2_vec (x <= 0.5) does not cover.
  static FASTDL_VEC_INLINE f32x16 exp(f32x16 x) {
    const f32x16 lo = f32x16{} - 87.0f, hi = f32x16{} + 88.0f;
    // two selects, not a nested one: GCC splits a nested vector select into per-lane compares
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    const f32x16 t = x * 1.44269504f;
    // round to nearest: adding 1.5 * 2^23 leaves no fraction bits
    const f32x16 n = (t + 12582912.0f) - 12582912.0f;
    const f32x16 f = t - n;
    const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
    return cpu::vec::exp2_fraction(f) * reinterpret_cast<const f32x16&>(bits);
  }
  static FASTDL_VEC_INLINE f32x16 sigmoid(f32x16 x) { return 1.0f / (1.0f + exp(-x)); }
  // 1 - 2 / (e^{2x} + 1): exact at both ends (e^{2x} clamps to e^{-87} or e^{88}).
  static FASTDL_VEC_INLINE f32x16 tanh(f32x16 x) { return 1.0f - 2.0f / (exp(x + x) + 1.0f); }
};

struct ExactMath {
  static double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
  static double tanh(double x) { return std::tanh(x); }
};

// One row of `hidden` units: `gates` points at the row's four gate blocks [i | f | g | o].
// V is a float vector (16 lanes per iteration) or a double (one per iteration).
template <typename V, typename Math, typename T>
FASTDL_VEC_INLINE void forward_row(int64_t hidden, T* gates, const T* bias, T* c, T* c_saved,
                                   T* h) {
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  for (int64_t j = 0; j < hidden; j += lanes) {
    const int64_t m = std::min(lanes, hidden - j);
    auto ld = [&](const T* p) {
      if constexpr (lanes == 1)
        return *p;
      else
        return load(p, m);
    };
    auto st = [&](T* p, V v) {
      if constexpr (lanes == 1)
        *p = v;
      else
        store(p, v, m);
    };
    T* gj = gates + j;
    const T* bj = bias + j;
    V i = ld(gj) + ld(bj), f = ld(gj + hidden) + ld(bj + hidden);
    V g = ld(gj + 2 * hidden) + ld(bj + 2 * hidden), o = ld(gj + 3 * hidden) + ld(bj + 3 * hidden);
    V cj = ld(c + j);
    const V hj = cell_forward<Math>(i, f, g, o, cj);
    st(gj, i), st(gj + hidden, f), st(gj + 2 * hidden, g), st(gj + 3 * hidden, o);
    st(c + j, cj), st(h + j, hj);
    if (c_saved) st(c_saved + j, cj);
  }
}

template <typename V, typename Math, typename T>
FASTDL_VEC_INLINE void backward_row(int64_t hidden, const T* gates, const T* c, const T* c_prev,
                                    const T* dh, T* dc, T* dgates, T* h) {
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  for (int64_t j = 0; j < hidden; j += lanes) {
    const int64_t m = std::min(lanes, hidden - j);
    auto ld = [&](const T* p) {
      if constexpr (lanes == 1)
        return *p;
      else
        return load(p, m);
    };
    auto st = [&](T* p, V v) {
      if constexpr (lanes == 1)
        *p = v;
      else
        store(p, v, m);
    };
    const T* gj = gates + j;
    V dcj = ld(dc + j), di, df, dg, do_;
    const V hj =
        cell_backward<Math>(ld(gj), ld(gj + hidden), ld(gj + 2 * hidden), ld(gj + 3 * hidden),
                            ld(c + j), ld(c_prev + j), ld(dh + j), dcj, di, df, dg, do_);
    T* dgj = dgates + j;
    st(dgj, di), st(dgj + hidden, df), st(dgj + 2 * hidden, dg), st(dgj + 3 * hidden, do_);
    st(dc + j, dcj);
    if (h) st(h + j, hj);
  }
}

void forward_rows(int64_t rows, int64_t hidden, float* gates, const float* bias, float* c,
                  float* c_saved, float* h) {
  cpu::simd_dispatch([=] {
    for (int64_t r = 0; r < rows; ++r) {
      forward_row<f32x16, VectorMath>(hidden, gates + 4 * hidden * r, bias, c + hidden * r,
                                      c_saved ? c_saved + hidden * r : nullptr, h + hidden * r);
    }
  });
}
void forward_rows(int64_t rows, int64_t hidden, double* gates, const double* bias, double* c,
                  double* c_saved, double* h) {
  for (int64_t r = 0; r < rows; ++r) {
    forward_row<double, ExactMath>(hidden, gates + 4 * hidden * r, bias, c + hidden * r,
                                   c_saved ? c_saved + hidden * r : nullptr, h + hidden * r);
  }
}

void backward_rows(int64_t rows, int64_t hidden, const float* gates, const float* c,
                   const float* c_prev, const float* dh, float* dc, float* dgates, float* h) {
  cpu::simd_dispatch([=] {
    for (int64_t r = 0; r < rows; ++r) {
      backward_row<f32x16, VectorMath>(hidden, gates + 4 * hidden * r, c + hidden * r,
                                       c_prev + hidden * r, dh + hidden * r, dc + hidden * r,
                                       dgates + 4 * hidden * r, h ? h + hidden * r : nullptr);
    }
  });
}
void backward_rows(int64_t rows, int64_t hidden, const double* gates, const double* c,
                   const double* c_prev, const double* dh, double* dc, double* dgates, double* h) {
  for (int64_t r = 0; r < rows; ++r) {
    backward_row<double, ExactMath>(hidden, gates + 4 * hidden * r, c + hidden * r,
                                    c_prev + hidden * r, dh + hidden * r, dc + hidden * r,
                                    dgates + 4 * hidden * r, h ? h + hidden * r : nullptr);
  }
}

// Rows per task: enough work (about 16k units) to pay for waking a thread.
int64_t row_grain(int64_t hidden) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(hidden, 1));
}

struct CpuPointwise {
  static void forward(const at::Tensor& gates, const at::Tensor& bias, const at::Tensor& c,
                      const at::Tensor& c_saved, const at::Tensor& hidden) {
    const int64_t H = c.size(1);
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_forward_cpu", [&] {
      scalar_t* g = gates.data_ptr<scalar_t>();
      const scalar_t* b = bias.const_data_ptr<scalar_t>();
      scalar_t* cc = c.data_ptr<scalar_t>();
      scalar_t* cs = c_saved.defined() ? c_saved.data_ptr<scalar_t>() : nullptr;
      scalar_t* h = hidden.data_ptr<scalar_t>();
      at::parallel_for(0, c.size(0), row_grain(H), [&](int64_t r0, int64_t r1) {
        forward_rows(r1 - r0, H, g + 4 * H * r0, b, cc + H * r0, cs ? cs + H * r0 : nullptr,
                     h + H * r0);
      });
    });
  }

  static void backward(const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c_prev,
                       const at::Tensor& dhidden, const at::Tensor& dc, const at::Tensor& dgates,
                       const at::Tensor& hidden) {
    const int64_t H = c.size(1);
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_backward_cpu", [&] {
      const scalar_t* g = gates.const_data_ptr<scalar_t>();
      const scalar_t* cc = c.const_data_ptr<scalar_t>();
      const scalar_t* cp = c_prev.const_data_ptr<scalar_t>();
      const scalar_t* dh = dhidden.const_data_ptr<scalar_t>();
      scalar_t* dcc = dc.data_ptr<scalar_t>();
      scalar_t* dg = dgates.data_ptr<scalar_t>();
      scalar_t* h = hidden.defined() ? hidden.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, c.size(0), row_grain(H), [&](int64_t r0, int64_t r1) {
        backward_rows(r1 - r0, H, g + 4 * H * r0, cc + H * r0, cp + H * r0, dh + H * r0,
                      dcc + H * r0, dg + 4 * H * r0, h ? h + H * r0 : nullptr);
      });
    });
  }
};

// ---- the recurrence: MKL's packed-matrix API where libtorch links MKL -------------------------
//
// Every step multiplies by the same w_hh, so it is packed into MKL's internal GEMM layout once
// per layer call instead of inside each of the T per-step GEMMs: about 1.4x faster per step at
// B=64, H=512 (packing costs about one product, so short sequences and the cell skip it). The
// entry points are weak references: with a BLAS other than MKL they are null and the ATen path
// is used. A packed B does not depend on the number of rows of A, so one packing serves the
// shrinking batches of packed sequences.
extern "C" {
// CBLAS enums are plain C enums (int); MKL_INT is int in the LP64 interface libtorch links.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}
constexpr int64_t kMinStepsToPack = 8;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kMatrixB = 162;

// op(w) packed as the B matrix of products with up to `m` rows; w is row-major with leading
// dimension ld, op(w) is k x n.
at::Tensor pack(const float* w, int64_t ld, bool transpose, int64_t m, int64_t n, int64_t k,
                const at::TensorOptions& options) {
  const size_t bytes = cblas_sgemm_pack_get_size(kMatrixB, static_cast<int>(m), static_cast<int>(n),
                                                 static_cast<int>(k));
  auto packed = at::empty({static_cast<int64_t>(bytes / sizeof(float)) + 1}, options);
  cblas_sgemm_pack(kRowMajor, kMatrixB, transpose ? kTrans : kNoTrans, static_cast<int>(m),
                   static_cast<int>(n), static_cast<int>(k), 1.0f, w, static_cast<int>(ld),
                   packed.data_ptr<float>());
  return packed;
}

// c [rows, n] (leading dimension ldc) = a [rows, k] (lda) * B + beta * c, B packed by pack().
void packed_product(int64_t rows, int64_t n, int64_t k, const float* a, int64_t lda,
                    const at::Tensor& packed, float beta, float* c, int64_t ldc) {
  if (rows == 0) return;
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(rows), static_cast<int>(n),
                      static_cast<int>(k), a, static_cast<int>(lda), packed.const_data_ptr<float>(),
                      0, beta, c, static_cast<int>(ldc));
}

class MklRecurrence {
 public:
  MklRecurrence(const at::Tensor& w_hh, int64_t batch, int64_t steps)
      : aten_(w_hh, batch, steps), w_hh_(w_hh.contiguous()), batch_(std::max<int64_t>(batch, 1)) {
    use_mkl_ = steps >= kMinStepsToPack && w_hh.scalar_type() == at::kFloat &&
               cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
               cblas_sgemm_compute != nullptr;
  }

  void forward_step(at::Tensor& gates, const at::Tensor& h, const at::Tensor& bias,
                    const at::Tensor& c, const at::Tensor& c_saved, const at::Tensor& hidden) {
    if (!use_mkl_) return aten_.forward_step(gates, h, bias, c, c_saved, hidden);
    // gates [n, 4H] += h [n, P] * w_hh^T: B = w_hh^T is k=P by n=4H
    const int64_t rows = w_hh_.size(0), cols = w_hh_.size(1);
    if (!forward_.defined()) {
      forward_ = pack(w_hh_.const_data_ptr<float>(), cols, /*transpose=*/true, batch_, rows, cols,
                      w_hh_.options());
    }
    packed_product(h.size(0), rows, cols, h.const_data_ptr<float>(), h.stride(0), forward_, 1.0f,
                   gates.data_ptr<float>(), gates.stride(0));
    CpuPointwise::forward(gates, bias, c, c_saved, hidden);
  }

  void backward_product(at::Tensor& dh, const at::Tensor& dgates) {
    if (!use_mkl_) return aten_.backward_product(dh, dgates);
    // dh [n, P] = dgates [n, 4H] * w_hh: B = w_hh is k=4H by n=P
    const int64_t rows = w_hh_.size(0), cols = w_hh_.size(1);
    if (!backward_.defined()) {
      backward_ = pack(w_hh_.const_data_ptr<float>(), cols, /*transpose=*/false, batch_, cols, rows,
                       w_hh_.options());
    }
    packed_product(dgates.size(0), cols, rows, dgates.const_data_ptr<float>(), dgates.stride(0),
                   backward_, 0.0f, dh.data_ptr<float>(), dh.stride(0));
  }

 private:
  AtenRecurrence<CpuPointwise> aten_;
  at::Tensor w_hh_, forward_, backward_;
  int64_t batch_;
  bool use_mkl_ = false;
};

struct CpuBackend : CpuPointwise {
  using Recurrence = MklRecurrence;
};

void check_cpu_dtype(const at::Tensor& input) {
  check_floating_dtype("lstm_layer", "input", input, /*allow_reduced_precision=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, bool save_activations) {
  check_cpu_dtype(input);
  return layer_forward<CpuBackend>(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                   reverse, save_activations);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                        const at::Tensor& grad_c_n, const at::Tensor& input,
                        const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                        const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const std::optional<at::Tensor>& w_hr, const at::Tensor& output,
                        const at::Tensor& gates, const at::Tensor& cells, bool reverse) {
  check_cpu_dtype(input);
  return layer_backward<CpuBackend>(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0,
                                    w_ih, w_hh, w_hr, output, gates, cells, reverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("lstm_layer", &lstm_layer_cpu);
  m.impl("_lstm_layer_backward", &lstm_layer_backward_cpu);
}

}  // namespace fastdl::lstm
