// RoI max-pooling on the CPU. The forward pass reads channels-last so that the running max of a
// window is an elementwise max over contiguous channel vectors; argmax holds the flat index
// y * W + x of the winning pixel (-1 for an empty bin, whose output is 0).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common/rois.h"
#include "ops/roi_pool/roi_pool.h"

namespace fastdl::roi_pool {
namespace {

template <typename T>
void forward_nhwc(const T* input, const T* rois, T* output, int64_t* argmax, int64_t num_rois,
                  int64_t channels, int64_t height, int64_t width, int64_t pooled_h,
                  int64_t pooled_w, T spatial_scale) {
  const int64_t bins = pooled_h * pooled_w;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(channels, 1));
  at::parallel_for(0, num_rois * bins, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> best(channels);
    std::vector<int64_t> where(channels);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / bins, bin = item % bins;
      const auto g = roi_geometry(rois + 5 * k, spatial_scale, pooled_h, pooled_w);
      const auto w = bin_window(g, bin / pooled_w, bin % pooled_w, height, width);
      const T* image = input + g.batch_index * height * width * channels;
      std::fill(best.begin(), best.end(), w.empty() ? T(0) : -std::numeric_limits<T>::infinity());
      std::fill(where.begin(), where.end(), int64_t(-1));
      for (int64_t y = w.y0; y < w.y1; ++y) {
        for (int64_t x = w.x0; x < w.x1; ++x) {
          const T* pixel = image + (y * width + x) * channels;
          const int64_t flat = y * width + x;
          for (int64_t c = 0; c < channels; ++c) {
            const bool better = beats(pixel[c], best[c]);
            best[c] = better ? pixel[c] : best[c];
            where[c] = better ? flat : where[c];
          }
        }
      }
      for (int64_t c = 0; c < channels; ++c) {  // outputs are NCHW
        output[(k * channels + c) * bins + bin] = best[c];
        argmax[(k * channels + c) * bins + bin] = where[c];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> roi_pool_cpu(const at::Tensor& input, const at::Tensor& rois,
                                                double spatial_scale, int64_t pooled_h,
                                                int64_t pooled_w) {
  check_rois("roi_pool", input, rois);
  check_floating_dtype("roi_pool", "input", input, /*allow_reduced_precision=*/false);
  check_pooled_size("roi_pool", pooled_h, pooled_w);
  check_spatial_scale("roi_pool", spatial_scale);
  const int64_t num_rois = rois.size(0), channels = input.size(1);
  auto output = at::empty({num_rois, channels, pooled_h, pooled_w}, input.options());
  auto argmax =
      at::empty({num_rois, channels, pooled_h, pooled_w}, input.options().dtype(at::kLong));
  if (output.numel() == 0) return {output, argmax};
  const auto input_nhwc = input.contiguous(at::MemoryFormat::ChannelsLast);
  const auto rois_c = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "roi_pool_cpu", [&] {
    forward_nhwc<scalar_t>(input_nhwc.const_data_ptr<scalar_t>(), rois_c.const_data_ptr<scalar_t>(),
                           output.data_ptr<scalar_t>(), argmax.data_ptr<int64_t>(), num_rois,
                           channels, input.size(2), input.size(3), pooled_h, pooled_w,
                           static_cast<scalar_t>(spatial_scale));
  });
  return {output, argmax};
}

// Routes each output gradient to its argmax pixel. Threads split channels, so every gradient
// element has one owner and a fixed summation order: deterministic.
at::Tensor roi_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                 const at::Tensor& argmax, double spatial_scale, int64_t pooled_h,
                                 int64_t pooled_w, int64_t batch_size, int64_t channels,
                                 int64_t height, int64_t width) {
  check_backward_args(grad, rois, argmax, pooled_h, pooled_w, batch_size, channels, height, width);
  auto grad_input = at::zeros({batch_size, channels, height, width}, grad.options());
  if (grad.numel() == 0 || grad_input.numel() == 0) return grad_input;
  TORCH_CHECK(argmax.max().item<int64_t>() < height * width,
              "roi_pool_backward: argmax holds an index beyond the ", height, "x", width, " map");
  const auto grad_c = grad.contiguous();
  const auto argmax_c = argmax.contiguous();
  const auto rois_c = rois.contiguous();
  const int64_t bins = pooled_h * pooled_w, plane = height * width;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "roi_pool_backward_cpu", [&] {
    const scalar_t* g = grad_c.const_data_ptr<scalar_t>();
    const int64_t* arg = argmax_c.const_data_ptr<int64_t>();
    const scalar_t* r = rois_c.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.data_ptr<scalar_t>();
    at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t k = 0; k < rois.size(0); ++k) {
        const int64_t n = static_cast<int64_t>(r[5 * k]);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t offset = (k * channels + c) * bins;
          scalar_t* target = gi + (n * channels + c) * plane;
          for (int64_t bin = 0; bin < bins; ++bin) {
            if (arg[offset + bin] >= 0) target[arg[offset + bin]] += g[offset + bin];
          }
        }
      }
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("roi_pool", &roi_pool_cpu);
  m.impl("_roi_pool_backward", &roi_pool_backward_cpu);
}

}  // namespace fastdl::roi_pool
