// Validation of the Tensor[K, 5] box lists taken by roi_align and roi_pool.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "common/checks.h"

namespace fastdl {

// rois rows are (batch_index, x1, y1, x2, y2): a [K, 5] tensor whose coordinates are finite and
// whose batch indices are whole numbers in [0, batch_size), or a kernel would read or write
// outside its image. The value check is one fused reduction; on CUDA it costs one
// device-to-host sync of four numbers. `images` says where batch_size comes from, for messages.
inline void check_roi_rows(const char* op, const at::Tensor& rois, int64_t batch_size,
                           const std::string& images) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": expected rois of shape [K, 5] with rows (batch_index, x1, y1, x2, y2), got ",
              sizes_str(rois));
  if (rois.size(0) == 0) return;
  const auto index = rois.select(1, 0);
  const auto summary =
      at::stack({at::isfinite(rois).all().to(rois.scalar_type()), index.min(), index.max(),
                 (index != index.floor()).any().to(rois.scalar_type())})
          .to(at::kCPU, at::kDouble);
  const double* s = summary.data_ptr<double>();
  TORCH_CHECK(s[0] == 1.0, op, ": rois contain NaN or infinite values");
  TORCH_CHECK(s[3] == 0.0, op, ": rois[:, 0] (batch index) must hold whole numbers");
  TORCH_CHECK(s[1] >= 0 && s[2] < static_cast<double>(batch_size), op,
              ": rois[:, 0] (batch index) must lie in [0, ", batch_size, ") for ", images,
              ", but ranges over [", s[1], ", ", s[2], "]");
}

// The forward ops' rois against their input.
inline void check_rois(const char* op, const at::Tensor& input, const at::Tensor& rois) {
  check_rank(op, "input", input, 4, "[N, C, H, W]");
  check_same_device(op, "input", input, "rois", rois);
  check_same_dtype(op, "input", input, "rois", rois);
  check_roi_rows(op, rois, input.size(0), "input of shape " + sizes_str(input));
}

// The backward ops' rois and the input size they are given: these internal ops are reachable
// through torch.ops.fastdl too, so they check as strictly as the forward.
inline void check_backward_rois(const char* op, const at::Tensor& rois, int64_t batch_size,
                                int64_t channels, int64_t height, int64_t width) {
  TORCH_CHECK(batch_size >= 0 && channels >= 0 && height >= 0 && width >= 0, op,
              ": the input size must be non-negative, got [", batch_size, ", ", channels, ", ",
              height, ", ", width, "]");
  check_roi_rows(op, rois, batch_size, "batch_size " + std::to_string(batch_size));
}

inline void check_pooled_size(const char* op, int64_t pooled_h, int64_t pooled_w) {
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, op, ": output_size must be positive, got (", pooled_h,
              ", ", pooled_w, ")");
}

inline void check_spatial_scale(const char* op, double spatial_scale) {
  TORCH_CHECK(spatial_scale > 0 && std::isfinite(spatial_scale), op,
              ": spatial_scale must be positive and finite, got ", spatial_scale);
}

}  // namespace fastdl
