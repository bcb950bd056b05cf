// Validation of the Tensor[K, 5] box lists taken by roi_align and roi_pool.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "common/checks.h"

namespace fastdl {

// rois rows are (batch_index, x1, y1, x2, y2). Besides shapes, devices and dtypes this checks
// the values: every coordinate finite and every batch index an integer in [0, N). The value
// check is one fused reduction; on CUDA it costs one device-to-host sync of three numbers.
inline void check_rois(const char* op, const at::Tensor& input, const at::Tensor& rois) {
  check_rank(op, "input", input, 4, "[N, C, H, W]");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": expected rois of shape [K, 5] with rows (batch_index, x1, y1, x2, y2), got ",
              sizes_str(rois));
  check_same_device(op, "input", input, "rois", rois);
  check_same_dtype(op, "input", input, "rois", rois);
  if (rois.size(0) == 0) return;
  const auto index = rois.select(1, 0);
  const auto summary =
      at::stack({at::isfinite(rois).all().to(rois.scalar_type()), index.min(), index.max(),
                 (index != index.floor()).any().to(rois.scalar_type())})
          .to(at::kCPU, at::kDouble);
  const double* s = summary.data_ptr<double>();
  TORCH_CHECK(s[0] == 1.0, op, ": rois contain NaN or infinite values");
  TORCH_CHECK(s[3] == 0.0, op, ": rois[:, 0] (batch index) must hold whole numbers");
  TORCH_CHECK(s[1] >= 0 && s[2] < static_cast<double>(input.size(0)), op,
              ": rois[:, 0] (batch index) must lie in [0, ", input.size(0), ") for input of shape ",
              sizes_str(input), ", but ranges over [", s[1], ", ", s[2], "]");
}

inline void check_pooled_size(const char* op, int64_t pooled_h, int64_t pooled_w) {
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, op, ": output_size must be positive, got (",
              pooled_h, ", ", pooled_w, ")");
}

inline void check_spatial_scale(const char* op, double spatial_scale) {
  TORCH_CHECK(spatial_scale > 0 && std::isfinite(spatial_scale), op,
              ": spatial_scale must be positive and finite, got ", spatial_scale);
}

}  // namespace fastdl
