// What the files of conv2d's CPU kernels share: the checked geometry of a call, the output pass
// that fuses the residual and the activation, the scratch slots, and each algorithm's entry
// point (conv2d.cpp chooses among them).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "ops/conv2d/conv2d.h"
#include "ops/conv2d/cpu/tiles.h"

namespace fastdl::conv2d {

// Scratch slots of the forward kernels (common/cpu_scratch.h).
enum ScratchSlot : int { kPaddedInput, kWinogradWeights, kTransformed, kProducts, kStaged };

struct Geometry {
  int64_t batch, channels, height, width;            // input
  int64_t out_channels, kernel_h, kernel_w, groups;  // weight
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t out_h, out_w;

  int64_t group_channels() const { return channels / groups; }
  int64_t group_out_channels() const { return out_channels / groups; }
  int64_t pixels() const { return out_h * out_w; }
  int64_t window() const { return kernel_h * kernel_w * group_channels(); }  // im2col row length
  bool is_pointwise() const {  // 1x1, stride 1, no padding, one group: im2col is the identity
    return kernel_h == 1 && kernel_w == 1 && stride_h == 1 && stride_w == 1 && pad_h == 0 &&
           pad_w == 0 && groups == 1;
  }
};

Geometry check_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

inline bool is_reduced_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// conv2d_cpu allocates its output either channels-last or as contiguous NCHW, where a plane's
// pixels are one run; the fast kernels write those two layouts only. True for channels-last.
inline bool is_channels_last_output(const at::Tensor& output) {
  const bool channels_last = output.stride(1) == 1;
  TORCH_INTERNAL_ASSERT(
      channels_last || (output.stride(2) == output.size(3) && output.stride(3) == 1),
      "conv2d: unexpected output strides ", output.strides());
  return channels_last;
}

// What the float32 kernels do as they store. Without a residual they apply the activation to
// each result; with one they store conv + bias, and finish() adds the residual (laid out at the
// output's strides) and activates each stretch right after it is stored, still in cache, so the
// output is written to memory once.
struct OutputPass {
  Activation act;
  const float* residual = nullptr;  // the residual's element that lies at `output`'s first
  const float* output = nullptr;
  const tiles::Kernels* kernels = nullptr;  // the tiles of the call (where it has some)

  Activation in_kernel() const { return residual ? Activation::None : act; }
  // Only the tile paths use a pass, so `kernels` is set wherever this runs.
  void finish(float* out, int64_t count) const {
    if (residual) kernels->add_residual(out, residual + (out - output), count, act);
  }
  // Starts loading the residual under `out` while a tile computes: the direct tiles' stretches are
  // short and a row apart in channels-last, which the hardware prefetchers do not foresee.
  void prefetch(const float* out, int64_t count) const {
    if (!residual) return;
    for (int64_t i = 0; i < count; i += 16) __builtin_prefetch(residual + (out - output) + i);
  }
};

// The input as a zero-padded NHWC buffer [N, Hp, Wp, C] with the image at (pad_h, pad_w),
// transposed by the tiles of `kernels` where there are some.
at::Tensor padded_nhwc(const tiles::Kernels* kernels, const Geometry& g, const at::Tensor& input,
                       int64_t Hp, int64_t Wp, bool in_scratch = false);
// The bias (zeros without one) padded with zeros to `length`, a whole number of channel blocks.
at::Tensor padded_bias(const std::optional<at::Tensor>& bias, int64_t channels, int64_t length,
                       const at::TensorOptions& options);

// Splits [0, items) across the threads; body(begin, end, sums) adds into its thread's own zeroed
// copy of a float tensor of `shape`, and the copies are added in thread order, so the result
// does not depend on scheduling (no atomics, no shared accumulator).
template <typename Body>
inline at::Tensor sum_over_threads(int64_t items, at::IntArrayRef shape,
                                   const at::TensorOptions& options, const Body& body) {
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> sizes{threads};
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  const at::Tensor partial = at::zeros(sizes, options);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t slot = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(slot < threads, "conv2d_backward: thread ", slot, " of ", threads);
    body(begin, end, partial.data_ptr<float>() + slot * partial.stride(0));
  });
  return partial.sum(0);
}

// ---- the algorithms (their files say how each works) ------------------------------------------
// The tile paths (float32, groups == 1) run the tiles of pass.kernels, resp. `kernels`.

// direct.cpp: the register-blocked direct convolution.
void forward_direct(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const OutputPass& pass,
                    at::Tensor& output);

// rows.cpp: the row tiles, for few input or output channels and an NCHW output. They beat the
// direct tiles up to 8 input channels (a network's first layers; from 16 on they are slower) or
// 8 output channels, where a direct tile's channel block is mostly padding (the first layer's
// grad_input, a segmentation or regression head).
constexpr int64_t kRowTileMaxChannels = 8;
bool use_row_tiles(const Geometry& g, const at::Tensor& output);
void forward_rows(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const OutputPass& pass,
                  at::Tensor& output);
at::Tensor grad_weight_rows(const tiles::Kernels& kernels, const Geometry& g,
                            const at::Tensor& grad_output, const at::Tensor& input);

// winograd.cpp: Winograd F(2x2, 3x3) for 3x3 stride-1 layers with enough channels.
bool use_winograd(const Geometry& g);
void check_winograd_weight(const Geometry& g, const at::Tensor& weight, const at::Tensor& u);
void forward_winograd(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& prepacked,
                      const std::optional<at::Tensor>& bias, const OutputPass& pass,
                      at::Tensor& output);

// gemm.cpp: the GEMM lowering (any floating dtype, any groups), forward and backward; the
// backward fills grad_input_nhwc ([N, H, W, C]) and grad_weight_rows ([K, kh * kw * C/groups])
// where they are defined.
void forward_gemm(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                  Activation act, at::Tensor& output);
void backward_gemm(const Geometry& g, const at::Tensor& grad_output, const at::Tensor& input,
                   const at::Tensor& weight, at::Tensor& grad_input_nhwc,
                   at::Tensor& grad_weight_rows);

// The op's two CPU kernels (conv2d.cpp, backward.cpp); the backward runs the forward for
// grad_input.
at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      std::optional<c10::string_view> activation,
                      const std::optional<at::Tensor>& winograd_weight,
                      const std::optional<at::Tensor>& residual_arg);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask);

}  // namespace fastdl::conv2d
