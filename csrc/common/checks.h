// Argument checks shared by every backend's kernels. Messages name the op, the argument and
// the sizes that were seen, so a user can tell at once what to fix.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace fastdl {

inline std::string sizes_str(const at::Tensor& t) { return c10::str(t.sizes()); }

// a * b + c for size arithmetic, or an error naming `what` when it leaves int64 (a huge
// padding or dilation must give a message, not a wrapped negative size).
inline int64_t checked_mul_add(const char* op, const char* what, int64_t a, int64_t b, int64_t c) {
  int64_t product = 0, sum = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &product) && !__builtin_add_overflow(product, c, &sum),
              op, ": ", what, " overflows int64 (", a, " * ", b, " + ", c, ")");
  return sum;
}

inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                       const char* layout) {
  TORCH_CHECK(t.dim() == rank, op, ": expected ", name, " to be a ", rank, "-D tensor ", layout,
              ", but got shape ", sizes_str(t));
}

inline void check_same_device(const char* op, const char* name_a, const at::Tensor& a,
                              const char* name_b, const at::Tensor& b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ", name_b,
              " is on ", b.device(), "; move them to the same device");
}

inline void check_same_dtype(const char* op, const char* name_a, const at::Tensor& a,
                             const char* name_b, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " has dtype ", a.scalar_type(),
              " but ", name_b, " has dtype ", b.scalar_type());
}

inline void check_floating_dtype(const char* op, const char* name, const at::Tensor& t,
                                 bool allow_reduced_precision) {
  const auto dtype = t.scalar_type();
  const bool ok = dtype == at::kFloat || dtype == at::kDouble ||
                  (allow_reduced_precision && (dtype == at::kHalf || dtype == at::kBFloat16));
  TORCH_CHECK(ok, op, ": ", name, " has unsupported dtype ", dtype, " on ", t.device().type(),
              "; supported: float32, float64",
              allow_reduced_precision ? ", float16, bfloat16" : "");
}

}  // namespace fastdl
