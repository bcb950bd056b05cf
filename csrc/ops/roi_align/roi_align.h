// ROI-align sampling geometry and argument checks, shared by cpu.cpp and cuda.cu so that both
// backends sample exactly the same points with exactly the same weights.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/checks.h"
#include "common/host_device.h"
#include "common/rois.h"

namespace fastdl::roi_align {

// sampling_ratio above this is refused: the work per bin grows with its square.
constexpr int64_t kMaxSamplingRatio = 256;
// The adaptive grid of a bin is ceil(bin size); beyond this (boxes of 2^40 pixels, where float
// sample positions no longer mean anything) it is clamped so that the count stays exact.
constexpr int64_t kMaxAdaptiveGrid = int64_t(1) << 40;

// Where one ROI's bins and sample points lie on the feature map, in feature-map pixels.
template <typename T>
struct RoiGeometry {
  int64_t batch_index;
  T start_y, start_x;      // top-left corner of the ROI
  T bin_h, bin_w;          // size of one output bin
  int64_t grid_h, grid_w;  // sample points per bin along y and x
  T inv_count;             // 1 / (grid_h * grid_w): the bin value is the mean of its samples
};

template <typename T>
FASTDL_HOST_DEVICE int64_t adaptive_grid(T bin_size) {
  const T n = ceil(bin_size);  // about one sample per feature-map pixel the bin covers
  if (!(n >= T(1))) return 0;  // empty or inverted bins (and NaN) have no samples
  return n < static_cast<T>(kMaxAdaptiveGrid) ? static_cast<int64_t>(n) : kMaxAdaptiveGrid;
}

template <typename T>
FASTDL_HOST_DEVICE RoiGeometry<T> roi_geometry(const T* roi, T spatial_scale, int64_t pooled_h,
                                               int64_t pooled_w, int64_t sampling_ratio,
                                               bool aligned) {
  RoiGeometry<T> g;
  g.batch_index = static_cast<int64_t>(roi[0]);
  // aligned=True moves the box by half a pixel so that pixel centres sit at integer + 0.5,
  // the continuous-coordinate convention; aligned=False keeps the legacy (Detectron) behaviour.
  const T offset = aligned ? T(0.5) : T(0);
  g.start_x = roi[1] * spatial_scale - offset;
  g.start_y = roi[2] * spatial_scale - offset;
  T roi_w = roi[3] * spatial_scale - offset - g.start_x;
  T roi_h = roi[4] * spatial_scale - offset - g.start_y;
  if (!aligned) {  // legacy mode forces at least a 1x1 box
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(g.bin_h);
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(g.bin_w);
  const T count = static_cast<T>(g.grid_h) * static_cast<T>(g.grid_w);
  g.inv_count = count > T(0) ? T(1) / count : T(0);
  return g;
}

// The sample indices [begin, end) of one bin along one axis that can land on the map. Sample i
// sits at bin_start + (i + 0.5) * step and contributes only within [-1, size], so a huge box
// costs what its samples on the map cost, not what its grid holds. The range is widened by two
// samples against rounding; bilinear_taps still rejects every point off the map.
struct SampleRange {
  int64_t begin, end;
};

template <typename T>
FASTDL_HOST_DEVICE SampleRange samples_on_map(T bin_start, T bin_size, int64_t grid, int64_t size) {
  if (grid <= 0) return {0, 0};
  const T step = bin_size / static_cast<T>(grid);
  if (!(step > T(0))) return {0, grid};  // a zero or inverted bin: sampling_ratio bounds grid
  if (!(step - step == T(0) && bin_start - bin_start == T(0))) return {0, 0};  // inf: T overflowed
  const T first = (T(-1) - bin_start) / step - T(0.5);
  const T last = (static_cast<T>(size) - bin_start) / step - T(0.5);
  const T grid_t = static_cast<T>(grid);
  const int64_t begin =
      first <= T(2) ? 0 : (first >= grid_t ? grid : static_cast<int64_t>(first) - 2);
  const int64_t end =
      last >= grid_t - T(3) ? grid : (last < T(-2) ? 0 : static_cast<int64_t>(last) + 3);
  return {begin, end > begin ? end : begin};
}

// Sample points of bin (py, px) that can land on a height x width map, along each axis.
template <typename T>
FASTDL_HOST_DEVICE SampleRange sample_rows(const RoiGeometry<T>& g, int64_t py, int64_t height) {
  return samples_on_map(g.start_y + static_cast<T>(py) * g.bin_h, g.bin_h, g.grid_h, height);
}
template <typename T>
FASTDL_HOST_DEVICE SampleRange sample_cols(const RoiGeometry<T>& g, int64_t px, int64_t width) {
  return samples_on_map(g.start_x + static_cast<T>(px) * g.bin_w, g.bin_w, g.grid_w, width);
}

// The four pixels around a sample point and their bilinear weights. A point more than one
// pixel outside the map contributes nothing; points just outside are clamped to the border.
template <typename T>
struct BilinearTaps {
  bool valid;
  int64_t y0, x0, y1, x1;
  T w00, w01, w10, w11;
};

template <typename T>
FASTDL_HOST_DEVICE BilinearTaps<T> bilinear_taps(T y, T x, int64_t height, int64_t width) {
  BilinearTaps<T> t{};
  // written so that NaN coordinates (an overflowed box) are rejected too
  if (!(y >= T(-1) && y <= static_cast<T>(height) && x >= T(-1) && x <= static_cast<T>(width))) {
    t.valid = false;
    return t;
  }
  t.valid = true;
  y = y > T(0) ? y : T(0);
  x = x > T(0) ? x : T(0);
  t.y0 = static_cast<int64_t>(y);
  t.x0 = static_cast<int64_t>(x);
  if (t.y0 >= height - 1) {
    t.y0 = t.y1 = height - 1;
    y = static_cast<T>(t.y0);
  } else {
    t.y1 = t.y0 + 1;
  }
  if (t.x0 >= width - 1) {
    t.x0 = t.x1 = width - 1;
    x = static_cast<T>(t.x0);
  } else {
    t.x1 = t.x0 + 1;
  }
  const T ly = y - static_cast<T>(t.y0), lx = x - static_cast<T>(t.x0);
  const T hy = T(1) - ly, hx = T(1) - lx;
  t.w00 = hy * hx;
  t.w01 = hy * lx;
  t.w10 = ly * hx;
  t.w11 = ly * lx;
  return t;
}

// Sample point (iy, ix) of bin (py, px), in feature-map coordinates.
template <typename T>
FASTDL_HOST_DEVICE T sample_y(const RoiGeometry<T>& g, int64_t py, int64_t iy) {
  return g.start_y + static_cast<T>(py) * g.bin_h +
         (static_cast<T>(iy) + T(0.5)) * g.bin_h / static_cast<T>(g.grid_h);
}
template <typename T>
FASTDL_HOST_DEVICE T sample_x(const RoiGeometry<T>& g, int64_t px, int64_t ix) {
  return g.start_x + static_cast<T>(px) * g.bin_w +
         (static_cast<T>(ix) + T(0.5)) * g.bin_w / static_cast<T>(g.grid_w);
}

inline void check_params(int64_t pooled_h, int64_t pooled_w, double spatial_scale,
                         int64_t sampling_ratio) {
  check_pooled_size("roi_align", pooled_h, pooled_w);
  check_spatial_scale("roi_align", spatial_scale);
  TORCH_CHECK(sampling_ratio <= kMaxSamplingRatio, "roi_align: sampling_ratio must be at most ",
              kMaxSamplingRatio, " (or <= 0 for the adaptive grid), got ", sampling_ratio);
}

inline void check_backward_args(const at::Tensor& grad, const at::Tensor& rois,
                                double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                int64_t batch_size, int64_t channels, int64_t height, int64_t width,
                                int64_t sampling_ratio) {
  check_params(pooled_h, pooled_w, spatial_scale, sampling_ratio);
  check_same_device("roi_align_backward", "grad", grad, "rois", rois);
  check_same_dtype("roi_align_backward", "grad", grad, "rois", rois);
  check_backward_rois("roi_align_backward", rois, batch_size, channels, height, width);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_h && grad.size(3) == pooled_w,
              "roi_align_backward: expected grad of shape [", rois.size(0), ", ", channels, ", ",
              pooled_h, ", ", pooled_w, "], got ", sizes_str(grad));
}

}  // namespace fastdl::roi_align
