// conv2d on the CPU: nn.Conv2d semantics with the bias, a residual and the activation fused into
// the output pass. This file checks the arguments and chooses the algorithm; each has its file.
//
// Forward, float32 with groups == 1 on a CPU with AVX-512 or AVX2 + FMA (the CNN case): Winograd
// for 3x3 layers with enough channels (winograd.cpp), else a direct convolution (direct.cpp). The
// direct form copies the input once into a zero-padded NHWC buffer (the layout change an NCHW
// input needs anyway) and packs the weights into blocks of two vectors of output channels; the
// register-blocked tiles of tiles.h store straight into the output in its memory format. Few input
// or output channels with an NCHW output use the row tiles instead (rows.cpp), which vectorise over
// output pixels. No im2col buffer exists.
//
// Everything else (float64, grouped and depthwise convolutions, CPUs without AVX2) and the
// backward (backward.cpp) lower the convolution to GEMMs through the BLAS libtorch links, one
// image and group at a time (gemm.cpp): im2col gathers each output pixel's window
// ([pixels, kh * kw * C/groups], NHWC order, so a tap is one contiguous run of channels), and the
// backward's col2im is written as a gather over input rows, so each row of grad_input has one
// owner: deterministic, no atomics. 1x1 stride-1 unpadded convolutions skip both: the NHWC image
// already is the matrix.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "ops/conv2d/cpu/conv2d_cpu.h"

namespace fastdl::conv2d {
namespace {

std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

// The residual is added before the activation; it has the output's shape and the input's dtype,
// and is read at the output's strides (a copy only where its layout differs).
at::Tensor check_residual(const Geometry& g, const at::Tensor& input, const at::Tensor& residual,
                          at::MemoryFormat format) {
  const std::array<int64_t, 4> shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(residual.sizes() == at::IntArrayRef(shape),
              "conv2d: residual must have the output's shape ", at::IntArrayRef(shape), ", got ",
              sizes_str(residual));
  check_same_dtype("conv2d", "input", input, "residual", residual);
  check_same_device("conv2d", "input", input, "residual", residual);
  return residual.contiguous(format);
}

}  // namespace

Geometry check_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_rank(op, "input", input, 4, "[N, C, H, W]");
  check_rank(op, "weight", weight, 4, "[K, C / groups, kh, kw]");
  check_floating_dtype(op, "input", input, /*allow_reduced_precision=*/true);
  check_same_dtype(op, "input", input, "weight", weight);
  check_same_device(op, "input", input, "weight", weight);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have two values each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation must be positive, got ",
              dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ",
              padding);
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  Geometry g{};
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.groups = groups;
  TORCH_CHECK(g.channels % groups == 0, op, ": groups=", groups,
              " must divide the input channels, got input of shape ", sizes_str(input));
  TORCH_CHECK(g.out_channels % groups == 0, op, ": groups=", groups,
              " must divide the output channels, got weight of shape ", sizes_str(weight));
  TORCH_CHECK(weight.size(1) * groups == g.channels, op, ": input has ", g.channels,
              " channels but weight of shape ", sizes_str(weight), " with groups=", groups,
              " expects ", weight.size(1) * groups);
  TORCH_CHECK(g.out_channels > 0 && g.kernel_h > 0 && g.kernel_w > 0, op,
              ": weight must be non-empty, got shape ", sizes_str(weight));
  if (bias) {
    check_rank(op, "bias", *bias, 1, "[K]");
    TORCH_CHECK(bias->size(0) == g.out_channels, op, ": bias has ", bias->size(0),
                " values but weight has ", g.out_channels, " output channels");
    check_same_dtype(op, "input", input, "bias", *bias);
    check_same_device(op, "input", input, "bias", *bias);
  }
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  const int64_t span_h =
      checked_mul_add(op, "the dilated kernel height", g.dil_h, g.kernel_h - 1, 1);
  const int64_t span_w =
      checked_mul_add(op, "the dilated kernel width", g.dil_w, g.kernel_w - 1, 1);
  const int64_t padded_h = checked_mul_add(op, "the padded input height", 2, g.pad_h, g.height);
  const int64_t padded_w = checked_mul_add(op, "the padded input width", 2, g.pad_w, g.width);
  TORCH_CHECK(span_h <= padded_h && span_w <= padded_w, op, ": kernel of size ", span_h, "x",
              span_w, " (dilated) is larger than the padded input ", padded_h, "x", padded_w,
              " (input of shape ", sizes_str(input), ", padding ", padding, ")");
  g.out_h = (padded_h - span_h) / g.stride_h + 1;
  g.out_w = (padded_w - span_w) / g.stride_w + 1;
  return g;
}

at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      std::optional<c10::string_view> activation,
                      const std::optional<at::Tensor>& winograd_weight,
                      const std::optional<at::Tensor>& residual_arg) {
  const Geometry g = check_args("conv2d", input, weight, bias, stride, padding, dilation, groups);
  const Activation act = parse_activation(activation);
  if (winograd_weight) check_winograd_weight(g, weight, *winograd_weight);
  const at::MemoryFormat format = input.suggest_memory_format();
  const std::optional<at::Tensor> residual =
      residual_arg ? std::optional<at::Tensor>(check_residual(g, input, *residual_arg, format))
                   : std::nullopt;
  if (is_reduced_precision(input)) {  // float32 arithmetic, result rounded once
    return conv2d_cpu(input.to(at::kFloat), weight.to(at::kFloat), to_float(bias), stride, padding,
                      dilation, groups, activation, winograd_weight, to_float(residual))
        .to(input.scalar_type());
  }
  if (g.kernel_h == 1 && g.kernel_w == 1 && g.pad_h == 0 && g.pad_w == 0 &&
      (g.stride_h > 1 || g.stride_w > 1)) {
    // A strided 1x1 convolution reads only every stride-th pixel: subsample first (a view), so
    // the kernels copy and read a stride_h * stride_w times smaller input.
    const at::Tensor sampled =
        input.slice(2, 0, g.height, g.stride_h).slice(3, 0, g.width, g.stride_w);
    return conv2d_cpu(sampled, weight, bias, {1, 1}, padding, dilation, groups, activation,
                      std::nullopt, residual);
  }
  at::Tensor output =
      at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(format));
  if (output.numel() == 0) return output;
  if (g.group_channels() == 0) {  // nothing to sum (no input channels): act(bias), as torch gives
    output.zero_();
    if (bias) output.add_(bias->view({1, -1, 1, 1}));
    if (residual) output.add_(*residual);
    AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "conv2d_cpu_no_channels", [&] {
      scalar_t* out = output.data_ptr<scalar_t>();  // freshly allocated, so dense in either layout
      for (int64_t i = 0; i < output.numel(); ++i) out[i] = activate(act, out[i]);
    });
    return output;
  }
  if (input.scalar_type() == at::kFloat) {
    const tiles::Kernels* kernels = tiles::select();
    const OutputPass pass{act, residual ? residual->const_data_ptr<float>() : nullptr,
                          output.const_data_ptr<float>(), kernels};
    if (kernels && use_winograd(g)) {
      forward_winograd(g, input, weight, winograd_weight, bias, pass, output);
      return output;
    }
    if (kernels && use_row_tiles(g, output)) {
      forward_rows(g, input, weight, bias, pass, output);
      return output;
    }
    if (kernels && g.groups == 1) {
      forward_direct(g, input, weight, bias, pass, output);
      return output;
    }
  }
  forward_gemm(g, input, weight, bias, residual, act, output);
  return output;
}

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
  m.impl("_conv2d_backward", &conv2d_backward_cpu);
}

}  // namespace fastdl::conv2d
