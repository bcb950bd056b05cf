// The backward on the CPU: grad_input of a stride-1 float32 layer as the forward of a flipped
// kernel, the weight gradient by the row tiles (few input channels) or one GEMM per tap over
// shifted input rows (stride 1), and the GEMM lowering for the rest.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/strides.h>

#include <vector>

#include "common/checks.h"
#include "common/cpu_blas.h"
#include "ops/conv2d/cpu/conv2d_cpu.h"

namespace fastdl::conv2d {
namespace {

using cpu::TransposeType;

// `t` (dense in `format`) with exactly the strides a fresh tensor of that format has. contiguous()
// keeps whatever strides size-1 dimensions had (a 1x1 weight's gradient came out [C, 1, C, C]);
// the fake kernel promises fresh strides, and DDP's gradient buckets compare them with the
// parameter's.
at::Tensor with_canonical_strides(const at::Tensor& t, at::MemoryFormat format) {
  if (t.dim() != 4) return t;  // an output_mask-ed empty result
  const at::Tensor dense = t.contiguous(format);
  c10::DimVector strides = c10::contiguous_strides(t.sizes());
  if (format == at::MemoryFormat::ChannelsLast) {
    const std::vector<int64_t> channels_last = c10::get_channels_last_strides_2d(t.sizes());
    strides.assign(channels_last.begin(), channels_last.end());
  }
  return dense.strides() == at::IntArrayRef(strides) ? dense : dense.as_strided(t.sizes(), strides);
}

// At stride 1 each tap's weight gradient is one GEMM over shifted rows of the padded input, so
// no im2col buffer is built: with grad_output laid out on the padded width (zero columns past
// Wo), output pixel p = oh * Wp + ow reads padded-input pixel p + r * dil_h * Wp + s * dil_w,
// and tap (r, s)'s input matrix is one contiguous slice of the image.
at::Tensor grad_weight_shifted(const tiles::Kernels* kernels, const Geometry& g,
                               const at::Tensor& grad_output, const at::Tensor& input) {
  const int64_t C = g.channels, K = g.out_channels;
  const int64_t Hp = g.height + 2 * g.pad_h, Wp = g.width + 2 * g.pad_w;
  // One extra zero row: the zero columns of the last output row read up to
  // (kw - 1) * dil_w pixels past the padded image.
  const at::Tensor x = padded_nhwc(kernels, g, input, Hp + 1, Wp);
  at::Tensor dy = at::zeros({g.batch, g.out_h, Wp, K}, grad_output.options());
  dy.narrow(2, 0, g.out_w).copy_(grad_output.permute({0, 2, 3, 1}));
  const int64_t rows = g.out_h * Wp;
  // taps += every tap's product for images [begin, end)
  const auto accumulate = [&](int64_t begin, int64_t end, float* taps) {
    for (int64_t n = begin; n < end; ++n) {
      const float* dy_n = dy.const_data_ptr<float>() + n * rows * K;
      const float* x_n = x.const_data_ptr<float>() + n * (Hp + 1) * Wp * C;
      for (int64_t r = 0; r < g.kernel_h; ++r) {
        for (int64_t s = 0; s < g.kernel_w; ++s) {
          const float* shifted = x_n + (r * g.dil_h * Wp + s * g.dil_w) * C;
          cpu::gemm_row_major(TransposeType::Transpose, TransposeType::NoTranspose, K, C, rows,
                              1.0f, dy_n, K, shifted, C, 1.0f, taps + (r * g.kernel_w + s) * K * C,
                              C);
        }
      }
    }
  };
  if (g.batch < at::get_num_threads()) {  // the BLAS threads each product
    at::Tensor taps = at::zeros({g.kernel_h, g.kernel_w, K, C}, input.options());
    accumulate(0, g.batch, taps.data_ptr<float>());
    return taps.permute({2, 3, 0, 1}).contiguous();
  }
  // The threads split the images, each summing every tap into its own copy on one BLAS thread
  // (MKL threads a K x C product over thousands of rows poorly).
  return sum_over_threads(g.batch, {g.kernel_h, g.kernel_w, K, C}, input.options(),
                          [&](int64_t begin, int64_t end, float* taps) {
                            const cpu::SequentialBlas sequential_blas;
                            accumulate(begin, end, taps);
                          })
      .permute({2, 3, 0, 1})
      .contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const char* op = "conv2d_backward";
  const Geometry g = check_args(op, input, weight, std::nullopt, stride, padding, dilation, groups);
  check_same_dtype(op, "grad_output", grad_output, "input", input);
  check_same_device(op, "grad_output", grad_output, "input", input);
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(out_shape), op, ": grad_output has shape ",
              sizes_str(grad_output), " but the convolution's output has shape ",
              c10::IntArrayRef(out_shape));
  if (is_reduced_precision(input)) {
    auto [gi, gw, gb] =
        conv2d_backward_cpu(grad_output.to(at::kFloat), input.to(at::kFloat), weight.to(at::kFloat),
                            stride, padding, dilation, groups, output_mask);
    const auto dtype = input.scalar_type();
    return {gi.to(dtype), gw.to(dtype), gb.to(dtype)};
  }
  const auto opts = input.options();
  if (g.group_channels() == 0) {
    // No input channels: the input and weight gradients are empty, and no kernel below may run
    // on their empty (possibly null) buffers.
    return {output_mask[0] ? at::zeros_like(input) : at::empty({0}, opts),
            output_mask[1] ? at::zeros_like(weight) : at::empty({0}, opts),
            output_mask[2] ? grad_output.sum({0, 2, 3}) : at::empty({0}, opts)};
  }
  const tiles::Kernels* kernels = tiles::select();
  at::Tensor grad_input;
  const int64_t full_pad_h = g.dil_h * (g.kernel_h - 1), full_pad_w = g.dil_w * (g.kernel_w - 1);
  if (output_mask[0] && g.batch > 0 && input.scalar_type() == at::kFloat && g.groups == 1 &&
      g.stride_h == 1 && g.stride_w == 1 && g.pad_h <= full_pad_h && g.pad_w <= full_pad_w &&
      kernels) {
    // At stride 1, grad_input is itself a convolution: grad_output, padded to "full", with the
    // kernel flipped and its channel axes swapped. The direct kernel then does it without
    // im2col/col2im.
    grad_input = conv2d_cpu(grad_output, weight.flip({2, 3}).transpose(0, 1), std::nullopt, {1, 1},
                            {full_pad_h - g.pad_h, full_pad_w - g.pad_w}, {g.dil_h, g.dil_w}, 1,
                            std::nullopt, std::nullopt, std::nullopt);
    output_mask[0] = false;
  }
  at::Tensor grad_weight;
  const bool float_single_group = g.batch > 0 && input.scalar_type() == at::kFloat && g.groups == 1;
  if (output_mask[1] && float_single_group && g.channels <= kRowTileMaxChannels && kernels) {
    grad_weight = grad_weight_rows(*kernels, g, grad_output, input);
    output_mask[1] = false;
  }
  // Small maps keep the batched-image GEMMs below: per-image GEMMs over a few rows would be
  // bound by re-reading the K x C accumulators.
  if (output_mask[1] && float_single_group && g.stride_h == 1 && g.stride_w == 1 &&
      g.out_h * (g.width + 2 * g.pad_w) >= 512) {
    grad_weight = grad_weight_shifted(kernels, g, grad_output, input);
    output_mask[1] = false;
  }
  at::Tensor grad_input_nhwc, grad_weight_rows;
  if (output_mask[0]) grad_input_nhwc = at::zeros({g.batch, g.height, g.width, g.channels}, opts);
  if (output_mask[1]) grad_weight_rows = at::zeros({g.out_channels, g.window()}, opts);
  if (g.batch > 0 && (output_mask[0] || output_mask[1])) {
    backward_gemm(g, grad_output, input, weight, grad_input_nhwc, grad_weight_rows);
  }
  if (!grad_input.defined()) {
    grad_input = output_mask[0] ? grad_input_nhwc.permute({0, 3, 1, 2}) : at::empty({0}, opts);
  }
  if (!grad_weight.defined()) {
    grad_weight =
        output_mask[1]
            ? grad_weight_rows.view({g.out_channels, g.kernel_h, g.kernel_w, g.group_channels()})
                  .permute({0, 3, 1, 2})
            : at::empty({0}, opts);
  }
  at::Tensor grad_bias = output_mask[2] ? grad_output.sum({0, 2, 3}) : at::empty({0}, opts);
  // Each gradient is made dense in its layout here, once, whichever path computed it.
  return {with_canonical_strides(grad_input, input.suggest_memory_format()),
          with_canonical_strides(grad_weight, at::MemoryFormat::Contiguous), grad_bias};
}

}  // namespace fastdl::conv2d
