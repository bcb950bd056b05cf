// ROI-align on the CPU.
//
// Both passes work in channels-last (NHWC) layout: all channels of one sample point then sit
// next to each other, so a sample's four bilinear taps become four contiguous, vectorised
// axpy's over C, and the tap weights are computed once per sample instead of once per channel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_simd.h"
#include "common/rois.h"
#include "ops/roi_align/roi_align.h"

namespace fastdl::roi_align {
namespace {

template <typename T>
void forward_nhwc(const T* input, const T* rois, T* output, bool output_channels_last,
                  int64_t num_rois, int64_t channels, int64_t height, int64_t width,
                  int64_t pooled_h, int64_t pooled_w, T spatial_scale, int64_t sampling_ratio,
                  bool aligned) {
  const int64_t bins = pooled_h * pooled_w;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(channels, 1));
  at::parallel_for(0, num_rois * bins, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(channels);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / bins, bin = item % bins;
      const int64_t py = bin / pooled_w, px = bin % pooled_w;
      const auto g =
          roi_geometry(rois + 5 * k, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
      const T* image = input + g.batch_index * height * width * channels;
      std::fill(acc.begin(), acc.end(), T(0));
      const auto rows = sample_rows(g, py, height), cols = sample_cols(g, px, width);
      for (int64_t iy = rows.begin; iy < rows.end; ++iy) {
        const T y = sample_y(g, py, iy);
        for (int64_t ix = cols.begin; ix < cols.end; ++ix) {
          const auto t = bilinear_taps(y, sample_x(g, px, ix), height, width);
          if (!t.valid) continue;
          cpu::axpy4(channels, t.w00, image + (t.y0 * width + t.x0) * channels, t.w01,
                     image + (t.y0 * width + t.x1) * channels, t.w10,
                     image + (t.y1 * width + t.x0) * channels, t.w11,
                     image + (t.y1 * width + t.x1) * channels, acc.data());
        }
      }
      if (output_channels_last) {
        T* out = output + item * channels;
        for (int64_t c = 0; c < channels; ++c) out[c] = acc[c] * g.inv_count;
      } else {
        T* out = output + k * channels * bins + bin;
        for (int64_t c = 0; c < channels; ++c) out[c * bins] = acc[c] * g.inv_count;
      }
    }
  });
}

// The adjoint of forward_nhwc. Threads split the channels, never the boxes: every gradient
// element is owned by one thread and summed in a fixed order, so the result is deterministic.
template <typename T>
void backward_nhwc(const T* grad_output, const T* rois, T* grad_input, int64_t num_rois,
                   int64_t channels, int64_t height, int64_t width, int64_t pooled_h,
                   int64_t pooled_w, T spatial_scale, int64_t sampling_ratio, bool aligned) {
  const int64_t bins = pooled_h * pooled_w;
  constexpr int64_t kChannelBlock = 16;
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    const int64_t c0 = block_begin * kChannelBlock;
    const int64_t n = std::min(channels, block_end * kChannelBlock) - c0;
    for (int64_t k = 0; k < num_rois; ++k) {
      const auto g =
          roi_geometry(rois + 5 * k, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
      T* image = grad_input + g.batch_index * height * width * channels + c0;
      for (int64_t bin = 0; bin < bins; ++bin) {
        const int64_t py = bin / pooled_w, px = bin % pooled_w;
        const T* grad = grad_output + (k * bins + bin) * channels + c0;
        const auto rows = sample_rows(g, py, height), cols = sample_cols(g, px, width);
        for (int64_t iy = rows.begin; iy < rows.end; ++iy) {
          const T y = sample_y(g, py, iy);
          for (int64_t ix = cols.begin; ix < cols.end; ++ix) {
            const auto t = bilinear_taps(y, sample_x(g, px, ix), height, width);
            if (!t.valid) continue;
            cpu::axpy(n, t.w00 * g.inv_count, grad, image + (t.y0 * width + t.x0) * channels);
            cpu::axpy(n, t.w01 * g.inv_count, grad, image + (t.y0 * width + t.x1) * channels);
            cpu::axpy(n, t.w10 * g.inv_count, grad, image + (t.y1 * width + t.x0) * channels);
            cpu::axpy(n, t.w11 * g.inv_count, grad, image + (t.y1 * width + t.x1) * channels);
          }
        }
      }
    }
  });
}

at::Tensor roi_align_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                         int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  check_rois("roi_align", input, rois);
  check_floating_dtype("roi_align", "input", input, /*allow_reduced_precision=*/false);
  check_params(pooled_h, pooled_w, spatial_scale, sampling_ratio);
  const int64_t num_rois = rois.size(0), channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  const auto format = input.suggest_memory_format();
  auto output =
      at::empty({num_rois, channels, pooled_h, pooled_w}, input.options().memory_format(format));
  if (output.numel() == 0) return output;
  // A map without pixels: every sample point lies outside it and contributes zero.
  if (height == 0 || width == 0) return output.zero_();
  const auto input_nhwc = input.contiguous(at::MemoryFormat::ChannelsLast);
  const auto rois_c = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "roi_align_cpu", [&] {
    forward_nhwc<scalar_t>(input_nhwc.const_data_ptr<scalar_t>(), rois_c.const_data_ptr<scalar_t>(),
                           output.data_ptr<scalar_t>(), format == at::MemoryFormat::ChannelsLast,
                           num_rois, channels, height, width, pooled_h, pooled_w,
                           static_cast<scalar_t>(spatial_scale), sampling_ratio, aligned);
  });
  return output;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                  int64_t batch_size, int64_t channels, int64_t height,
                                  int64_t width, int64_t sampling_ratio, bool aligned) {
  check_backward_args(grad, rois, spatial_scale, pooled_h, pooled_w, batch_size, channels, height,
                      width, sampling_ratio);
  auto grad_input_nhwc = at::zeros({batch_size, height, width, channels}, grad.options());
  if (grad.numel() > 0 && grad_input_nhwc.numel() > 0) {
    const auto grad_nhwc = grad.permute({0, 2, 3, 1}).contiguous();
    const auto rois_c = rois.contiguous();
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "roi_align_backward_cpu", [&] {
      backward_nhwc<scalar_t>(
          grad_nhwc.const_data_ptr<scalar_t>(), rois_c.const_data_ptr<scalar_t>(),
          grad_input_nhwc.data_ptr<scalar_t>(), rois.size(0), channels, height, width, pooled_h,
          pooled_w, static_cast<scalar_t>(spatial_scale), sampling_ratio, aligned);
    });
  }
  return grad_input_nhwc.permute({0, 3, 1, 2}).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("roi_align", &roi_align_cpu);
  m.impl("_roi_align_backward", &roi_align_backward_cpu);
}

}  // namespace fastdl::roi_align
