// What the conv2d kernels share: the activation fused into the output pass.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string_view>

namespace fastdl::conv2d {

enum class Activation { None, ReLU, ReLU6, SiLU, GELU };

inline Activation parse_activation(std::optional<std::string_view> name) {
  if (!name) return Activation::None;
  if (*name == "relu") return Activation::ReLU;
  if (*name == "relu6") return Activation::ReLU6;
  if (*name == "silu") return Activation::SiLU;
  if (*name == "gelu") return Activation::GELU;
  TORCH_CHECK(false, "conv2d: unknown activation '", *name,
              "'; expected None, 'relu', 'relu6', 'silu' or 'gelu'");
}

// The scalar form, exact in float64 (the reference path) and used for odd tails.
template <typename T>
inline T activate(Activation act, T x) {
  switch (act) {
    case Activation::None:
      return x;
    // NaN passes both, as it does torch's: every comparison with it is false.
    case Activation::ReLU:
      return x < T(0) ? T(0) : x;
    case Activation::ReLU6:
      return x < T(0) ? T(0) : (x > T(6) ? T(6) : x);
    case Activation::SiLU:
      return x / (T(1) + std::exp(-x));
    case Activation::GELU:
      return T(0.5) * x * (T(1) + std::erf(x * T(0.7071067811865476)));
  }
  return x;
}

}  // namespace fastdl::conv2d
