// The LSTM layer on CUDA: the time loop of lstm.h with GEMMs through ATen (cuBLAS) and one fused
// pointwise kernel per step, forward and backward. One thread per (row, hidden unit) reads the
// unit's four gate pre-activations, writes the activations, c_t and o * tanh(c_t); the backward
// kernel produces the four gate gradients and dc_{t-1} in the same way. Storage is the input
// dtype (float32, float64, float16, bfloat16); the arithmetic is float32 (float64 for float64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_launch.cuh"
#include "ops/lstm/lstm.h"

namespace fastdl::lstm {
namespace {

using cuda::blocks_for;
using cuda::grid_stride;
using cuda::kThreads;

struct DeviceMath {
  static __host__ __device__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
  static __host__ __device__ double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }
  static __host__ __device__ float tanh(float x) { return tanhf(x); }
  static __host__ __device__ double tanh(double x) { return ::tanh(x); }
};

template <typename scalar_t>
__global__ void forward_kernel(int64_t total, int64_t hidden, scalar_t* __restrict__ gates,
                               const scalar_t* __restrict__ bias, scalar_t* __restrict__ c,
                               scalar_t* __restrict__ c_saved, scalar_t* __restrict__ h) {
  using acc_t = at::opmath_type<scalar_t>;
  for (const int64_t index : grid_stride(total)) {
    const int64_t unit = index % hidden;
    scalar_t* g = gates + (index / hidden) * 4 * hidden + unit;
    const scalar_t* b = bias + unit;
    auto pre = [&](int64_t gate) {
      return static_cast<acc_t>(g[gate * hidden]) + static_cast<acc_t>(b[gate * hidden]);
    };
    acc_t i = pre(0), f = pre(1), gg = pre(2), o = pre(3);
    acc_t cc = static_cast<acc_t>(c[index]);
    const acc_t hh = cell_forward<DeviceMath>(i, f, gg, o, cc);
    g[0] = static_cast<scalar_t>(i);
    g[hidden] = static_cast<scalar_t>(f);
    g[2 * hidden] = static_cast<scalar_t>(gg);
    g[3 * hidden] = static_cast<scalar_t>(o);
    c[index] = static_cast<scalar_t>(cc);
    if (c_saved != nullptr) c_saved[index] = static_cast<scalar_t>(cc);
    h[index] = static_cast<scalar_t>(hh);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(int64_t total, int64_t hidden, const scalar_t* __restrict__ gates,
                                const scalar_t* __restrict__ c, const scalar_t* __restrict__ c_prev,
                                const scalar_t* __restrict__ dh, scalar_t* __restrict__ dc,
                                scalar_t* __restrict__ dgates, scalar_t* __restrict__ h) {
  using acc_t = at::opmath_type<scalar_t>;
  for (const int64_t index : grid_stride(total)) {
    const int64_t offset = (index / hidden) * 4 * hidden + index % hidden;
    const scalar_t* g = gates + offset;
    acc_t dcc = static_cast<acc_t>(dc[index]), di, df, dg, do_;
    const acc_t hh = cell_backward<DeviceMath>(
        static_cast<acc_t>(g[0]), static_cast<acc_t>(g[hidden]), static_cast<acc_t>(g[2 * hidden]),
        static_cast<acc_t>(g[3 * hidden]), static_cast<acc_t>(c[index]),
        static_cast<acc_t>(c_prev[index]), static_cast<acc_t>(dh[index]), dcc, di, df, dg, do_);
    scalar_t* d = dgates + offset;
    d[0] = static_cast<scalar_t>(di);
    d[hidden] = static_cast<scalar_t>(df);
    d[2 * hidden] = static_cast<scalar_t>(dg);
    d[3 * hidden] = static_cast<scalar_t>(do_);
    dc[index] = static_cast<scalar_t>(dcc);
    if (h != nullptr) h[index] = static_cast<scalar_t>(hh);
  }
}

struct CudaBackend {
  using Recurrence = AtenRecurrence<CudaBackend>;

  static void forward(const at::Tensor& gates, const at::Tensor& bias, const at::Tensor& c,
                      const at::Tensor& c_saved, const at::Tensor& hidden) {
    const int64_t total = c.numel();
    if (total == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    const auto dtype = gates.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lstm_forward_cuda", [&] {
      forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          total, c.size(1), gates.data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
          c.data_ptr<scalar_t>(), c_saved.defined() ? c_saved.data_ptr<scalar_t>() : nullptr,
          hidden.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void backward(const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c_prev,
                       const at::Tensor& dhidden, const at::Tensor& dc, const at::Tensor& dgates,
                       const at::Tensor& hidden) {
    const int64_t total = c.numel();
    if (total == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    const auto dtype = gates.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lstm_backward_cuda", [&] {
      backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          total, c.size(1), gates.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(),
          c_prev.const_data_ptr<scalar_t>(), dhidden.const_data_ptr<scalar_t>(),
          dc.data_ptr<scalar_t>(), dgates.data_ptr<scalar_t>(),
          hidden.defined() ? hidden.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, bool save_activations) {
  check_floating_dtype("lstm_layer", "input", input, /*allow_reduced_precision=*/true);
  const c10::cuda::CUDAGuard guard(input.device());
  return layer_forward<CudaBackend>(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                    reverse, save_activations);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                         const at::Tensor& grad_c_n, const at::Tensor& input,
                         const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                         const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& w_hr, const at::Tensor& output,
                         const at::Tensor& gates, const at::Tensor& cells, bool reverse) {
  check_floating_dtype("lstm_layer_backward", "input", input, /*allow_reduced_precision=*/true);
  const c10::cuda::CUDAGuard guard(input.device());
  return layer_backward<CudaBackend>(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0,
                                     w_ih, w_hh, w_hr, output, gates, cells, reverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("lstm_layer", &lstm_layer_cuda);
  m.impl("_lstm_layer_backward", &lstm_layer_backward_cuda);
}

}  // namespace fastdl::lstm
