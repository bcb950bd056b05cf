// What every backend of linear_cross_entropy checks (the Python twin is check_inputs in
// python/fastdl/ops/linear_cross_entropy.py): dtypes first, then shapes, then target values.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "common/checks.h"

namespace fastdl::linear_cross_entropy {

enum class Reduction { Mean, Sum, None };

struct Dims {
  int64_t rows, features, classes;  // N, E, V
};

inline Reduction parse_reduction(const char* op, std::string_view reduction) {
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  TORCH_CHECK(reduction == "none", op, ": reduction must be one of ('mean', 'sum', 'none'), got '",
              reduction, "'");
  return Reduction::None;
}

inline Dims check_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& target, const std::optional<at::Tensor>& bias) {
  check_floating_dtype(op, "hidden", hidden, /*allow_reduced_precision=*/true);
  TORCH_CHECK(target.scalar_type() == at::kLong, op,
              ": target must be int64 class indices, got dtype ", target.scalar_type());
  check_same_dtype(op, "hidden", hidden, "weight", weight);
  if (bias.has_value()) check_same_dtype(op, "hidden", hidden, "bias", *bias);
  check_same_device(op, "hidden", hidden, "weight", weight);
  check_same_device(op, "hidden", hidden, "target", target);
  if (bias.has_value()) check_same_device(op, "hidden", hidden, "bias", *bias);
  check_rank(op, "hidden", hidden, 2, "[N, E]");
  check_rank(op, "weight", weight, 2, "[V, E]");
  const Dims d{hidden.size(0), hidden.size(1), weight.size(0)};
  TORCH_CHECK(weight.size(1) == d.features, op, ": hidden ", sizes_str(hidden),
              " has E=", d.features, " features but weight ", sizes_str(weight), " has ",
              weight.size(1));
  TORCH_CHECK(d.classes > 0, op, ": weight has no classes (shape ", sizes_str(weight), ")");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == d.rows, op, ": expected target of shape [",
              d.rows, "] (one class per row of hidden), got ", sizes_str(target));
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == d.classes), op,
              ": expected bias of shape [", d.classes, "], got ", sizes_str(*bias));
  return d;
}

}  // namespace fastdl::linear_cross_entropy
