// RoI max-pooling geometry (Fast R-CNN), shared by cpu.cpp and cuda.cu: box corners are rounded
// to whole feature-map pixels and each output bin takes the max over its window of pixels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>

#include "common/checks.h"
#include "common/host_device.h"

namespace fastdl::roi_pool {

template <typename T>
struct RoiGeometry {
  int64_t batch_index;
  int64_t start_y, start_x;  // rounded top-left corner
  T bin_h, bin_w;            // bin size in pixels (not rounded)
};

// Rounded corners are clamped to +-2^60 before the cast: a finite box of 1e19 or 1e30 pixels
// must not leave int64 (undefined), and sums of two such corners stay in range. Bins are still
// placed exactly as without the clamp wherever they meet the map.
constexpr double kMaxCorner = static_cast<double>(int64_t(1) << 60);

template <typename T>
FASTDL_HOST_DEVICE int64_t rounded_corner(T coordinate) {
  const double v = static_cast<double>(round(coordinate));
  return static_cast<int64_t>(v < -kMaxCorner ? -kMaxCorner : (v > kMaxCorner ? kMaxCorner : v));
}

template <typename T>
FASTDL_HOST_DEVICE RoiGeometry<T> roi_geometry(const T* roi, T spatial_scale, int64_t pooled_h,
                                               int64_t pooled_w) {
  RoiGeometry<T> g;
  g.batch_index = static_cast<int64_t>(roi[0]);
  g.start_x = rounded_corner(roi[1] * spatial_scale);
  g.start_y = rounded_corner(roi[2] * spatial_scale);
  const int64_t end_x = rounded_corner(roi[3] * spatial_scale);
  const int64_t end_y = rounded_corner(roi[4] * spatial_scale);
  // inclusive corners, and a malformed box still covers one pixel
  const int64_t roi_w = end_x - g.start_x + 1 > 1 ? end_x - g.start_x + 1 : 1;
  const int64_t roi_h = end_y - g.start_y + 1 > 1 ? end_y - g.start_y + 1 : 1;
  g.bin_h = static_cast<T>(roi_h) / static_cast<T>(pooled_h);
  g.bin_w = static_cast<T>(roi_w) / static_cast<T>(pooled_w);
  return g;
}

// The pixel window [y0, y1) x [x0, x1) of bin (py, px), clipped to the map. Windows of adjacent
// bins may overlap by a pixel (floor of the start, ceil of the end).
struct Window {
  int64_t y0, y1, x0, x1;
  FASTDL_HOST_DEVICE bool empty() const { return y1 <= y0 || x1 <= x0; }
};

FASTDL_HOST_DEVICE int64_t clip(int64_t v, int64_t hi) { return v < 0 ? 0 : (v > hi ? hi : v); }

// Running max that lets NaN win and keep winning (NaN in, NaN out, as torch.max): `better`
// is true for a first NaN, and for a value above the best so far.
template <typename T>
FASTDL_HOST_DEVICE bool beats(T value, T best) {
  return value > best || (value != value && best == best);
}

template <typename T>
FASTDL_HOST_DEVICE Window bin_window(const RoiGeometry<T>& g, int64_t py, int64_t px,
                                     int64_t height, int64_t width) {
  Window w;
  w.y0 = clip(static_cast<int64_t>(floor(static_cast<T>(py) * g.bin_h)) + g.start_y, height);
  w.y1 = clip(static_cast<int64_t>(ceil(static_cast<T>(py + 1) * g.bin_h)) + g.start_y, height);
  w.x0 = clip(static_cast<int64_t>(floor(static_cast<T>(px) * g.bin_w)) + g.start_x, width);
  w.x1 = clip(static_cast<int64_t>(ceil(static_cast<T>(px + 1) * g.bin_w)) + g.start_x, width);
  return w;
}

inline void check_backward_args(const at::Tensor& grad, const at::Tensor& rois,
                                const at::Tensor& argmax, int64_t pooled_h, int64_t pooled_w,
                                int64_t batch_size, int64_t channels, int64_t height,
                                int64_t width) {
  check_backward_rois("roi_pool_backward", rois, batch_size, channels, height, width);
  TORCH_CHECK(argmax.scalar_type() == at::kLong, "roi_pool_backward: argmax must be int64, got ",
              argmax.scalar_type());
  TORCH_CHECK(grad.sizes() == argmax.sizes(), "roi_pool_backward: grad ", sizes_str(grad),
              " and argmax ", sizes_str(argmax), " must have the same shape");
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels,
              "roi_pool_backward: expected grad of shape [", rois.size(0), ", ", channels, ", ",
              pooled_h, ", ", pooled_w, "], got ", sizes_str(grad));
}

}  // namespace fastdl::roi_pool
