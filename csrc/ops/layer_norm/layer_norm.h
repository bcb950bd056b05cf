// What every backend of layer_norm checks (the Python twin is check_inputs in
// python/fastdl/ops/layer_norm.py): dtypes first, then the shapes, each message naming the
// argument and the sizes seen.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "common/checks.h"

namespace fastdl::layer_norm {

struct Rows {
  int64_t count;  // rows normalised independently
  int64_t size;   // elements per row: prod(normalized_shape)
};

inline Rows check_inputs(const char* op, const at::Tensor& input, at::IntArrayRef normalized_shape,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, double eps) {
  check_floating_dtype(op, "input", input, /*allow_reduced_precision=*/true);
  const std::pair<const char*, const std::optional<at::Tensor>*> others[] = {
      {"weight", &weight}, {"bias", &bias}, {"residual", &residual}};
  for (const auto& [name, t] : others) {
    if (!t->has_value()) continue;
    check_same_dtype(op, "input", input, name, **t);
    check_same_device(op, "input", input, name, **t);
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  const auto dims = static_cast<int64_t>(normalized_shape.size());
  bool positive = dims > 0;
  for (int64_t s : normalized_shape) positive = positive && s > 0;
  TORCH_CHECK(positive, op, ": normalized_shape must be a non-empty list of positive sizes, got ",
              normalized_shape);
  TORCH_CHECK(input.dim() >= dims && input.sizes().slice(input.dim() - dims) == normalized_shape,
              op, ": normalized_shape ", normalized_shape,
              " does not match the trailing dimensions of input ", sizes_str(input));
  for (const auto& [name, t] : {others[0], others[1]}) {
    TORCH_CHECK(!t->has_value() || (*t)->sizes() == normalized_shape, op, ": expected ", name,
                " of shape ", normalized_shape, " (normalized_shape), got ", sizes_str(**t));
  }
  TORCH_CHECK(!residual.has_value() || residual->sizes() == input.sizes(), op,
              ": residual has shape ", sizes_str(*residual), " but input has shape ",
              sizes_str(input));
  int64_t row_size = 1;
  for (int64_t s : normalized_shape) row_size *= s;  // <= input.numel(), so no overflow
  return {input.numel() / row_size, row_size};
}

}  // namespace fastdl::layer_norm
