// RoI max-pooling on CUDA: one thread per output element; the backward scatters with atomicAdd,
// or gathers per input element in a fixed order when deterministic algorithms are requested.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/cuda/Atomic.cuh>

#include "common/cuda_launch.cuh"
#include "common/rois.h"
#include "ops/roi_pool/roi_pool.h"

namespace fastdl::roi_pool {
namespace {

using cuda::blocks_for;
using cuda::grid_stride;
using cuda::kThreads;

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(int64_t total, const scalar_t* __restrict__ input,
                               const scalar_t* __restrict__ rois, scalar_t* __restrict__ output,
                               int64_t* __restrict__ argmax, int64_t channels, int64_t height,
                               int64_t width, int64_t pooled_h, int64_t pooled_w,
                               acc_t spatial_scale) {
  for (const int64_t index : grid_stride(total)) {
    const int64_t px = index % pooled_w;
    const int64_t py = (index / pooled_w) % pooled_h;
    const int64_t c = (index / (pooled_w * pooled_h)) % channels;
    const int64_t k = index / (pooled_w * pooled_h * channels);
    acc_t roi[5];
    for (int i = 0; i < 5; ++i) roi[i] = static_cast<acc_t>(rois[k * 5 + i]);
    const auto g = roi_geometry(roi, spatial_scale, pooled_h, pooled_w);
    const auto w = bin_window(g, py, px, height, width);
    const scalar_t* plane = input + (g.batch_index * channels + c) * height * width;
    acc_t best = w.empty() ? acc_t(0) : -INFINITY;
    int64_t where = -1;
    for (int64_t y = w.y0; y < w.y1; ++y) {
      for (int64_t x = w.x0; x < w.x1; ++x) {
        const acc_t v = static_cast<acc_t>(plane[y * width + x]);
        if (beats(v, best)) {
          best = v;
          where = y * width + x;
        }
      }
    }
    output[index] = static_cast<scalar_t>(best);
    argmax[index] = where;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_atomic_kernel(int64_t total, const scalar_t* __restrict__ grad,
                                       const int64_t* __restrict__ argmax,
                                       const scalar_t* __restrict__ rois,
                                       acc_t* __restrict__ grad_input, int64_t channels,
                                       int64_t plane, int64_t bins) {
  for (const int64_t index : grid_stride(total)) {
    const int64_t where = argmax[index];
    if (where < 0) continue;
    const int64_t c = (index / bins) % channels;
    const int64_t k = index / (bins * channels);
    const int64_t n = static_cast<int64_t>(static_cast<acc_t>(rois[k * 5]));
    gpuAtomicAdd(grad_input + (n * channels + c) * plane + where, static_cast<acc_t>(grad[index]));
  }
}

// Deterministic: one thread per input element, summing over boxes and bins in order.
template <typename scalar_t, typename acc_t>
__global__ void backward_gather_kernel(int64_t total, const scalar_t* __restrict__ grad,
                                       const int64_t* __restrict__ argmax,
                                       const scalar_t* __restrict__ rois, int64_t num_rois,
                                       acc_t* __restrict__ grad_input, int64_t channels,
                                       int64_t plane, int64_t bins) {
  for (const int64_t index : grid_stride(total)) {
    const int64_t pixel = index % plane;
    const int64_t c = (index / plane) % channels;
    const int64_t n = index / (plane * channels);
    acc_t sum = 0;
    for (int64_t k = 0; k < num_rois; ++k) {
      if (static_cast<int64_t>(static_cast<acc_t>(rois[k * 5])) != n) continue;
      const int64_t offset = (k * channels + c) * bins;
      for (int64_t bin = 0; bin < bins; ++bin) {
        if (argmax[offset + bin] == pixel) sum += static_cast<acc_t>(grad[offset + bin]);
      }
    }
    grad_input[index] = sum;
  }
}

std::tuple<at::Tensor, at::Tensor> roi_pool_cuda(const at::Tensor& input, const at::Tensor& rois,
                                                 double spatial_scale, int64_t pooled_h,
                                                 int64_t pooled_w) {
  check_rois("roi_pool", input, rois);
  check_floating_dtype("roi_pool", "input", input, /*allow_reduced_precision=*/true);
  check_pooled_size("roi_pool", pooled_h, pooled_w);
  check_spatial_scale("roi_pool", spatial_scale);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t num_rois = rois.size(0), channels = input.size(1);
  auto output = at::empty({num_rois, channels, pooled_h, pooled_w}, input.options());
  auto argmax =
      at::empty({num_rois, channels, pooled_h, pooled_w}, input.options().dtype(at::kLong));
  const int64_t total = output.numel();
  if (total == 0) return {output, argmax};
  const auto input_c = input.contiguous();
  const auto rois_c = rois.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        forward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            total, input_c.const_data_ptr<scalar_t>(), rois_c.const_data_ptr<scalar_t>(),
            output.data_ptr<scalar_t>(), argmax.data_ptr<int64_t>(), channels, input.size(2),
            input.size(3), pooled_h, pooled_w, static_cast<acc_t>(spatial_scale));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {output, argmax};
}

at::Tensor roi_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                  const at::Tensor& argmax, double spatial_scale, int64_t pooled_h,
                                  int64_t pooled_w, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width) {
  check_backward_args(grad, rois, argmax, pooled_h, pooled_w, batch_size, channels, height, width);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto acc_dtype = at::toOpMathType(grad.scalar_type());
  auto grad_input =
      at::zeros({batch_size, channels, height, width}, grad.options().dtype(acc_dtype));
  if (grad.numel() == 0 || grad_input.numel() == 0) return grad_input.to(grad.scalar_type());
  TORCH_CHECK(argmax.max().item<int64_t>() < height * width,
              "roi_pool_backward: argmax holds an index beyond the ", height, "x", width, " map");
  const auto grad_c = grad.contiguous();
  const auto argmax_c = argmax.contiguous();
  const auto rois_c = rois.contiguous();
  const int64_t bins = pooled_h * pooled_w, plane = height * width;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (deterministic) {
          const int64_t total = grad_input.numel();
          backward_gather_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
              total, grad_c.const_data_ptr<scalar_t>(), argmax_c.const_data_ptr<int64_t>(),
              rois_c.const_data_ptr<scalar_t>(), rois.size(0), grad_input.data_ptr<acc_t>(),
              channels, plane, bins);
        } else {
          const int64_t total = grad.numel();
          backward_atomic_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
              total, grad_c.const_data_ptr<scalar_t>(), argmax_c.const_data_ptr<int64_t>(),
              rois_c.const_data_ptr<scalar_t>(), grad_input.data_ptr<acc_t>(), channels, plane,
              bins);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_input.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("roi_pool", &roi_pool_cuda);
  m.impl("_roi_pool_backward", &roi_pool_backward_cuda);
}

}  // namespace fastdl::roi_pool
