// Non-maximum suppression: argument checks and the IoU formula, shared by cpu.cpp and cuda.cu.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "common/checks.h"
#include "common/host_device.h"

namespace fastdl::nms {

// Boxes are (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2. The value checks are one fused
// reduction (one device sync on CUDA), which also returns the largest |coordinate| for
// area_safe.
inline double check_inputs(const char* op, const at::Tensor& boxes, const at::Tensor& scores,
                           double iou_threshold, const at::Tensor* idxs) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, op,
              ": expected boxes of shape [N, 4] (x1, y1, x2, y2), got ", sizes_str(boxes));
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), op,
              ": expected scores of shape [", boxes.size(0), "] to match boxes ", sizes_str(boxes),
              ", got ", sizes_str(scores));
  check_same_device(op, "boxes", boxes, "scores", scores);
  check_same_dtype(op, "boxes", boxes, "scores", scores);
  check_floating_dtype(op, "boxes", boxes, /*allow_reduced_precision=*/boxes.is_cuda());
  TORCH_CHECK(iou_threshold >= 0 && iou_threshold <= 1, op,
              ": iou_threshold must lie in [0, 1], got ", iou_threshold);
  if (idxs != nullptr) {
    TORCH_CHECK(idxs->dim() == 1 && idxs->size(0) == boxes.size(0), op,
                ": expected idxs of shape [", boxes.size(0), "], got ", sizes_str(*idxs));
    check_same_device(op, "boxes", boxes, "idxs", *idxs);
    TORCH_CHECK(!at::isFloatingType(idxs->scalar_type()) && !at::isComplexType(idxs->scalar_type()),
                op, ": idxs must be an integer tensor, got ", idxs->scalar_type());
  }
  if (boxes.size(0) == 0) return 0.0;
  const auto ordered = (boxes.select(1, 2) >= boxes.select(1, 0))
                           .logical_and(boxes.select(1, 3) >= boxes.select(1, 1))
                           .all();
  const auto summary = at::stack({at::isfinite(boxes).all().to(at::kDouble),
                                  at::isfinite(scores).all().to(at::kDouble),
                                  ordered.to(at::kDouble), boxes.abs().max().to(at::kDouble)})
                           .cpu();
  const double* s = summary.const_data_ptr<double>();
  TORCH_CHECK(s[0] == 1.0, op, ": boxes contain NaN or infinite values");
  TORCH_CHECK(s[1] == 1.0, op, ": scores contain NaN or infinite values");
  TORCH_CHECK(s[2] == 1.0, op, ": every box must satisfy x1 <= x2 and y1 <= y2");
  return s[3];
}

// IoU is scale-invariant, but areas of finite boxes can overflow (a 1e30-pixel box in float32
// has an area of inf, and inf / inf suppresses nothing). Boxes whose coordinates exceed
// 2^60 (2^500 in float64) are scaled by a power of two, which is exact, so areas stay finite.
inline at::Tensor area_safe(const at::Tensor& boxes, double max_abs_coordinate) {
  const int limit_exponent = boxes.scalar_type() == at::kDouble ? 500 : 60;
  if (!(max_abs_coordinate > std::ldexp(1.0, limit_exponent))) return boxes;
  const int exponent = std::ilogb(max_abs_coordinate) + 1 - limit_exponent;
  return boxes * std::ldexp(1.0, -exponent);
}

// Intersection over union; two degenerate boxes (empty union) give 0/0 = NaN, which never
// exceeds a threshold, so they do not suppress each other.
template <typename T>
FASTDL_HOST_DEVICE T iou(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2,
                         T area_b) {
  const T w = (ax2 < bx2 ? ax2 : bx2) - (ax1 > bx1 ? ax1 : bx1);
  const T h = (ay2 < by2 ? ay2 : by2) - (ay1 > by1 ? ay1 : by1);
  const T inter = (w > T(0) ? w : T(0)) * (h > T(0) ? h : T(0));
  return inter / (area_a + area_b - inter);
}

}  // namespace fastdl::nms
