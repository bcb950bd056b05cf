// ROI-align on CUDA. Forward: one thread per output element. Backward: one thread per
// gradient-of-output element scattering with atomicAdd, or, when PyTorch's deterministic mode
// is on, one thread per input element gathering from every box in a fixed order.
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
#include "ops/roi_align/roi_align.h"

namespace fastdl::roi_align {
namespace {

using cuda::blocks_for;
using cuda::grid_stride;
using cuda::kThreads;

// Bilinear taps and the sampling geometry are computed in opmath (float32 for half/bfloat16).
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(int64_t total, const scalar_t* __restrict__ input,
                               const scalar_t* __restrict__ rois, scalar_t* __restrict__ output,
                               int64_t channels, int64_t height, int64_t width, int64_t pooled_h,
                               int64_t pooled_w, acc_t spatial_scale, int64_t sampling_ratio,
                               bool aligned) {
  for (const int64_t index : grid_stride(total)) {
    const int64_t px = index % pooled_w;
    const int64_t py = (index / pooled_w) % pooled_h;
    const int64_t c = (index / (pooled_w * pooled_h)) % channels;
    const int64_t k = index / (pooled_w * pooled_h * channels);
    acc_t roi[5];
    for (int i = 0; i < 5; ++i) roi[i] = static_cast<acc_t>(rois[k * 5 + i]);
    const auto g = roi_geometry(roi, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
    const scalar_t* plane = input + (g.batch_index * channels + c) * height * width;
    acc_t sum = 0;
    const auto rows = sample_rows(g, py, height), cols = sample_cols(g, px, width);
    for (int64_t iy = rows.begin; iy < rows.end; ++iy) {
      const acc_t y = sample_y(g, py, iy);
      for (int64_t ix = cols.begin; ix < cols.end; ++ix) {
        const auto t = bilinear_taps(y, sample_x(g, px, ix), height, width);
        if (!t.valid) continue;
        sum += t.w00 * static_cast<acc_t>(plane[t.y0 * width + t.x0]) +
               t.w01 * static_cast<acc_t>(plane[t.y0 * width + t.x1]) +
               t.w10 * static_cast<acc_t>(plane[t.y1 * width + t.x0]) +
               t.w11 * static_cast<acc_t>(plane[t.y1 * width + t.x1]);
      }
    }
    output[index] = static_cast<scalar_t>(sum * g.inv_count);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_atomic_kernel(int64_t total, const scalar_t* __restrict__ grad,
                                       const scalar_t* __restrict__ rois,
                                       acc_t* __restrict__ grad_input, int64_t channels,
                                       int64_t height, int64_t width, int64_t pooled_h,
                                       int64_t pooled_w, acc_t spatial_scale,
                                       int64_t sampling_ratio, bool aligned) {
  for (const int64_t index : grid_stride(total)) {
    const int64_t px = index % pooled_w;
    const int64_t py = (index / pooled_w) % pooled_h;
    const int64_t c = (index / (pooled_w * pooled_h)) % channels;
    const int64_t k = index / (pooled_w * pooled_h * channels);
    acc_t roi[5];
    for (int i = 0; i < 5; ++i) roi[i] = static_cast<acc_t>(rois[k * 5 + i]);
    const auto g = roi_geometry(roi, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
    acc_t* plane = grad_input + (g.batch_index * channels + c) * height * width;
    const acc_t gv = static_cast<acc_t>(grad[index]) * g.inv_count;
    const auto rows = sample_rows(g, py, height), cols = sample_cols(g, px, width);
    for (int64_t iy = rows.begin; iy < rows.end; ++iy) {
      const acc_t y = sample_y(g, py, iy);
      for (int64_t ix = cols.begin; ix < cols.end; ++ix) {
        const auto t = bilinear_taps(y, sample_x(g, px, ix), height, width);
        if (!t.valid) continue;
        gpuAtomicAdd(plane + t.y0 * width + t.x0, gv * t.w00);
        gpuAtomicAdd(plane + t.y0 * width + t.x1, gv * t.w01);
        gpuAtomicAdd(plane + t.y1 * width + t.x0, gv * t.w10);
        gpuAtomicAdd(plane + t.y1 * width + t.x1, gv * t.w11);
      }
    }
  }
}

// Deterministic backward: each thread owns one input element (n, c, y, x) and visits the boxes
// of image n in order, adding the weight of every tap that lands on its pixel.
template <typename scalar_t, typename acc_t>
__global__ void backward_gather_kernel(int64_t total, const scalar_t* __restrict__ grad,
                                       const scalar_t* __restrict__ rois, int64_t num_rois,
                                       acc_t* __restrict__ grad_input, int64_t channels,
                                       int64_t height, int64_t width, int64_t pooled_h,
                                       int64_t pooled_w, acc_t spatial_scale,
                                       int64_t sampling_ratio, bool aligned) {
  for (const int64_t index : grid_stride(total)) {
    const int64_t x = index % width;
    const int64_t y = (index / width) % height;
    const int64_t c = (index / (width * height)) % channels;
    const int64_t n = index / (width * height * channels);
    acc_t sum = 0;
    for (int64_t k = 0; k < num_rois; ++k) {
      acc_t roi[5];
      for (int i = 0; i < 5; ++i) roi[i] = static_cast<acc_t>(rois[k * 5 + i]);
      const auto g = roi_geometry(roi, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
      if (g.batch_index != n) continue;
      // a box's taps stay within one pixel of its extent: skip boxes that cannot reach (y, x)
      const acc_t y_lo = g.start_y - 1, y_hi = g.start_y + g.bin_h * pooled_h + 1;
      const acc_t x_lo = g.start_x - 1, x_hi = g.start_x + g.bin_w * pooled_w + 1;
      if (y + 1 < y_lo || y - 1 > y_hi || x + 1 < x_lo || x - 1 > x_hi) continue;
      const scalar_t* box_grad = grad + (k * channels + c) * pooled_h * pooled_w;
      for (int64_t py = 0; py < pooled_h; ++py) {
        const auto rows = sample_rows(g, py, height);
        for (int64_t iy = rows.begin; iy < rows.end; ++iy) {
          const acc_t sy = sample_y(g, py, iy);
          for (int64_t px = 0; px < pooled_w; ++px) {
            const acc_t gv = static_cast<acc_t>(box_grad[py * pooled_w + px]) * g.inv_count;
            const auto cols = sample_cols(g, px, width);
            for (int64_t ix = cols.begin; ix < cols.end; ++ix) {
              const auto t = bilinear_taps(sy, sample_x(g, px, ix), height, width);
              if (!t.valid) continue;
              acc_t w = 0;
              if (t.y0 == y && t.x0 == x) w += t.w00;
              if (t.y0 == y && t.x1 == x) w += t.w01;
              if (t.y1 == y && t.x0 == x) w += t.w10;
              if (t.y1 == y && t.x1 == x) w += t.w11;
              sum += w * gv;
            }
          }
        }
      }
    }
    grad_input[index] = sum;
  }
}

at::Tensor roi_align_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                          int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
                          bool aligned) {
  check_rois("roi_align", input, rois);
  check_floating_dtype("roi_align", "input", input, /*allow_reduced_precision=*/true);
  check_params(pooled_h, pooled_w, spatial_scale, sampling_ratio);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t num_rois = rois.size(0), channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  auto output = at::empty({num_rois, channels, pooled_h, pooled_w}, input.options());
  const int64_t total = output.numel();
  // A map without pixels: every sample point lies outside it and contributes zero.
  if (total > 0 && (height == 0 || width == 0)) output.zero_();
  if (total > 0 && height > 0 && width > 0) {
    const auto input_c = input.contiguous();
    const auto rois_c = rois.contiguous();
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          forward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
              total, input_c.const_data_ptr<scalar_t>(), rois_c.const_data_ptr<scalar_t>(),
              output.data_ptr<scalar_t>(), channels, height, width, pooled_h, pooled_w,
              static_cast<acc_t>(spatial_scale), sampling_ratio, aligned);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return output.contiguous(input.suggest_memory_format());
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                   double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                   int64_t batch_size, int64_t channels, int64_t height,
                                   int64_t width, int64_t sampling_ratio, bool aligned) {
  check_backward_args(grad, rois, spatial_scale, pooled_h, pooled_w, batch_size, channels, height,
                      width, sampling_ratio);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto acc_dtype = at::toOpMathType(grad.scalar_type());
  auto grad_input =
      at::zeros({batch_size, channels, height, width}, grad.options().dtype(acc_dtype));
  if (grad.numel() == 0 || grad_input.numel() == 0) return grad_input.to(grad.scalar_type());
  const auto grad_c = grad.contiguous();
  const auto rois_c = rois.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (deterministic) {
          const int64_t total = grad_input.numel();
          backward_gather_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
              total, grad_c.const_data_ptr<scalar_t>(), rois_c.const_data_ptr<scalar_t>(),
              rois.size(0), grad_input.data_ptr<acc_t>(), channels, height, width, pooled_h,
              pooled_w, static_cast<acc_t>(spatial_scale), sampling_ratio, aligned);
        } else {
          const int64_t total = grad.numel();
          backward_atomic_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
              total, grad_c.const_data_ptr<scalar_t>(), rois_c.const_data_ptr<scalar_t>(),
              grad_input.data_ptr<acc_t>(), channels, height, width, pooled_h, pooled_w,
              static_cast<acc_t>(spatial_scale), sampling_ratio, aligned);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_input.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("roi_align", &roi_align_cuda);
  m.impl("_roi_align_backward", &roi_align_backward_cuda);
}

}  // namespace fastdl::roi_align
