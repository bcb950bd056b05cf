// linear on the CPU: y = x W^T + b with F.linear's semantics.
//
// Few rows (a decoding step: one token per sequence of a batch) make the product a stream over
// the weights, which BLAS libraries tuned for large products can handle badly (packing the
// weights, or walking them once per row). Here float32 inputs of 1..kMaxRows rows on an AVX-512
// or AVX2 + FMA CPU read each weight row once for up to 8 input rows: a tile keeps R weight rows
// x P input rows of dot products in registers, each a vector of partial sums over K reduced once
// at the end, and the threads split the weight rows. Everything else (more rows, float64, other
// CPUs or FASTDL_CPU_CAPABILITY=default) calls the BLAS libtorch links through at::linear.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/cpu_capability.h"
#include "common/cpu_isa.h"
#include "ops/linear/linear.h"

#if FASTDL_X86_ISA && defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector values stay inside the inlined tile bodies
#endif

namespace fastdl::linear {
namespace {

// Rows up to which the weight-streaming tiles run: beyond, the weights are read too often and a
// blocked GEMM wins.
constexpr int64_t kMaxRows = 16;
constexpr int kRowsPerPass = 8;  // input rows sharing one read of the weights

struct Args {
  const float* x;       // [rows, K], row stride ldx
  const float* weight;  // [N, K] contiguous
  const float* bias;    // [N] or nullptr
  float* y;             // [rows, N] contiguous
  int64_t rows, K, N, ldx;
};

#if FASTDL_X86_ISA

template <class I>
struct Tiles {
  using V = typename I::V;
  static constexpr int L = I::kLanes;
  // Accumulators the register file holds beside one step's weight and input vectors.
  static constexpr int kAccumulators = L == 16 ? 24 : 12;

  // y[p][n + r] = bias[n + r] + sum_k x[p][k] w[n + r][k] for p < P, r < R.
  template <int P, int R>
  static void tile(const Args& a, const float* x, float* y, int64_t n) {
    V acc[R][P];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) acc[r][p] = I::zero();
    }
    const float* w = a.weight + n * a.K;
    auto step = [&](int64_t k, auto load) {
      V wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = load(w + r * a.K + k);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        const V xv = load(x + p * a.ldx + k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][p] = I::fma(wv[r], xv, acc[r][p]);
      }
    };
    int64_t k = 0;
    for (; k + L <= a.K; k += L) step(k, [](const float* q) { return I::load(q); });
    if (k < a.K) {
      const auto tail = I::lanes(a.K - k);
      step(k, [tail](const float* q) { return I::load(q, tail); });
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float b = a.bias ? a.bias[n + r] : 0.0f;
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) y[p * a.N + n + r] = I::reduce_add(acc[r][p]) + b;
    }
  }

  // Output columns [n0, n1) of P input rows starting at x.
  template <int P>
  static void pass(const Args& a, const float* x, float* y, int64_t n0, int64_t n1) {
    constexpr int R = std::clamp(kAccumulators / P, 1, 4);
    int64_t n = n0;
    for (; n + R <= n1; n += R) tile<P, R>(a, x, y, n);
    for (; n < n1; ++n) tile<P, 1>(a, x, y, n);
  }

  static void columns(const Args& a, int64_t n0, int64_t n1) {
    for (int64_t p0 = 0; p0 < a.rows; p0 += kRowsPerPass) {
      const float* x = a.x + p0 * a.ldx;
      float* y = a.y + p0 * a.N;
      cpu::isa::with_count<kRowsPerPass>(std::min<int64_t>(kRowsPerPass, a.rows - p0), [&](auto p) {
        pass<decltype(p)::value>(a, x, y, n0, n1);
      });
    }
  }
};

using ColumnsFn = void (*)(const Args&, int64_t, int64_t);

struct Avx512Entry {
  FASTDL_ISA_ENTRY("avx512f") static void columns(const Args& a, int64_t n0, int64_t n1) {
    Tiles<cpu::isa::Avx512>::columns(a, n0, n1);
  }
};
struct Avx2Entry {
  FASTDL_ISA_ENTRY("arch=x86-64-v3") static void columns(const Args& a, int64_t n0, int64_t n1) {
    Tiles<cpu::isa::Avx2>::columns(a, n0, n1);
  }
};

// The tiles of the best set the active capability allows, or nullptr.
ColumnsFn select_tiles() {
  return cpu::isa::best_entry<ColumnsFn>(&Avx512Entry::columns, &Avx2Entry::columns);
}

#else

using ColumnsFn = void (*)(const Args&, int64_t, int64_t);
ColumnsFn select_tiles() { return nullptr; }

#endif

at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias) {
  const Dims d = check_inputs("linear", input, weight, bias);
  checked_mul_add("linear", "the output size", d.rows, d.outputs, 0);
  const ColumnsFn tiles = select_tiles();
  const bool streamed = tiles != nullptr && input.scalar_type() == at::kFloat && d.rows >= 1 &&
                        d.rows <= kMaxRows && d.features > 0 && weight.is_contiguous() &&
                        (!bias.has_value() || bias->is_contiguous());
  if (!streamed) return at::linear(input, weight, bias);

  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = d.outputs;
  at::Tensor output = at::empty(shape, input.options());
  const at::Tensor x = input.reshape({d.rows, d.features});
  const at::Tensor rows = x.stride(1) == 1 ? x : x.contiguous();
  const Args a{rows.const_data_ptr<float>(),
               weight.const_data_ptr<float>(),
               bias.has_value() ? bias->const_data_ptr<float>() : nullptr,
               output.data_ptr<float>(),
               d.rows,
               d.features,
               d.outputs,
               rows.stride(0)};
  // about 64k weights per task: enough to pay for waking a thread
  const int64_t grain = std::max<int64_t>(16, 65536 / d.features);
  at::parallel_for(0, d.outputs, grain, [&](int64_t n0, int64_t n1) { tiles(a, n0, n1); });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace fastdl::linear
