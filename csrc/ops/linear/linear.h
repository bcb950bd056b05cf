// What every backend of linear checks (the Python twin is check_inputs in
// python/fastdl/ops/linear.py): dtypes and devices first, then the shapes, each message naming
// the argument and the sizes seen.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common/checks.h"

namespace fastdl::linear {

struct Dims {
  int64_t rows;      // input rows: the product of input's leading dimensions
  int64_t features;  // K: input.size(-1) == weight.size(1)
  int64_t outputs;   // N: weight.size(0)
};

inline Dims check_inputs(const char* op, const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  check_floating_dtype(op, "input", input, /*allow_reduced_precision=*/true);
  check_same_dtype(op, "input", input, "weight", weight);
  check_same_device(op, "input", input, "weight", weight);
  if (bias.has_value()) {
    check_same_dtype(op, "input", input, "bias", *bias);
    check_same_device(op, "input", input, "bias", *bias);
  }
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension, got a 0-D tensor");
  check_rank(op, "weight", weight, 2, "[out_features, in_features]");
  TORCH_CHECK(input.size(-1) == weight.size(1), op, ": input has ", input.size(-1),
              " features (last dimension of ", sizes_str(input), ") but weight ", sizes_str(weight),
              " expects ", weight.size(1));
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)), op,
              ": expected bias of shape [", weight.size(0), "] (out_features), got ",
              sizes_str(*bias));
  // Counted from the leading sizes, not numel / K: with K = 0 the rows still exist (and their
  // outputs are the bias), and their count may then exceed what numel could bound.
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < input.dim(); ++d) {
    rows = checked_mul_add(op, "the number of input rows", rows, input.size(d), 0);
  }
  return {rows, weight.size(1), weight.size(0)};
}

}  // namespace fastdl::linear
