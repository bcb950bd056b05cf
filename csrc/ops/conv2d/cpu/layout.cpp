// The buffers the CPU kernels share: the zero-padded NHWC input and the padded bias.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "common/cpu_scratch.h"
#include "ops/conv2d/cpu/conv2d_cpu.h"

namespace fastdl::conv2d {

// The input as a zero-padded NHWC buffer [N, Hp, Wp, C] with the image at (pad_h, pad_w): the
// one layout change an NCHW input needs, after which no kernel tests bounds. Rows are filled in
// parallel, each in one pass (a row of C x Wp floats stays in cache while it is transposed).
at::Tensor padded_nhwc(const tiles::Kernels* kernels, const Geometry& g, const at::Tensor& input,
                       int64_t Hp, int64_t Wp, bool in_scratch) {
  const int64_t C = g.channels;
  at::Tensor padded = in_scratch
                          ? cpu::workspace(kPaddedInput, {g.batch, Hp, Wp, C}, input.options())
                          : at::empty({g.batch, Hp, Wp, C}, input.options());
  const float* src = input.const_data_ptr<float>();
  float* dst = padded.data_ptr<float>();
  const int64_t sN = input.stride(0), sC = input.stride(1), sH = input.stride(2),
                sW = input.stride(3);
  at::parallel_for(0, g.batch * Hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / Hp, h = row % Hp - g.pad_h;
      float* out = dst + row * Wp * C;
      if (h < 0 || h >= g.height) {
        std::fill_n(out, Wp * C, 0.0f);
        continue;
      }
      std::fill_n(out, g.pad_w * C, 0.0f);
      std::fill_n(out + (g.pad_w + g.width) * C, (Wp - g.pad_w - g.width) * C, 0.0f);
      out += g.pad_w * C;
      const float* in = src + n * sN + h * sH;
      if (sC == 1 && sW == C) {  // channels-last: the row is already NHWC
        std::memcpy(out, in, g.width * C * sizeof(float));
      } else if (sC == 1) {  // a pixel's channels are contiguous
        for (int64_t w = 0; w < g.width; ++w)
          std::memcpy(out + w * C, in + w * sW, C * sizeof(float));
      } else if (sW == 1) {  // NCHW: the row is a [C, W] matrix
        tiles::transpose(kernels, in, C, g.width, sC, out, C);
      } else {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t w = 0; w < g.width; ++w) out[w * C + c] = in[c * sC + w * sW];
      }
    }
  });
  return padded;
}

// The bias (zeros without one) padded with zeros to `length`, a whole number of channel blocks.
at::Tensor padded_bias(const std::optional<at::Tensor>& bias, int64_t channels, int64_t length,
                       const at::TensorOptions& options) {
  at::Tensor padded = at::zeros({length}, options);
  if (bias) padded.narrow(0, 0, channels).copy_(*bias);
  return padded;
}

}  // namespace fastdl::conv2d
