// conv2d on the CPU: nn.Conv2d semantics with the bias, a residual and the activation fused into
// the output pass.
//
// Forward, float32 with groups == 1 on an AVX-512 CPU (the CNN case): Winograd for 3x3 layers
// with enough channels, else a direct convolution. The direct form copies the input once into a
// zero-padded NHWC buffer (the layout change an NCHW input needs anyway) and packs the weights
// into blocks of 32 output channels; the register-blocked tiles of cpu_tiles.h store straight into
// the output in its memory format. Few input or output channels with an NCHW output use the row
// tiles instead, which vectorise over output pixels. No im2col buffer exists.
//
// Everything else (float64, grouped and depthwise convolutions, CPUs without AVX-512) and the
// backward lower the convolution to GEMMs through the BLAS libtorch links, one image and group
// at a time: im2col gathers each output pixel's window ([pixels, kh * kw * C/groups], NHWC
// order, so a tap is one contiguous run of channels), and the backward's col2im is written as a
// gather over input rows, so each row of grad_input has one owner: deterministic, no atomics.
// 1x1 stride-1 unpadded convolutions skip both: the NHWC image already is the matrix.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/strides.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/cpu_blas.h"
#include "common/cpu_scratch.h"
#include "common/cpu_simd.h"
#include "ops/conv2d/conv2d.h"
#include "ops/conv2d/cpu_tiles.h"
#include "ops/conv2d/cpu_winograd.h"

namespace fastdl::conv2d {
namespace {

using cpu::TransposeType;

// Scratch slots of the forward kernels (common/cpu_scratch.h).
enum ScratchSlot : int { kPaddedInput, kWinogradWeights, kTransformed, kProducts, kStaged };

struct Geometry {
  int64_t batch, channels, height, width;           // input
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
  const int64_t span_h = checked_mul_add(op, "the dilated kernel height", g.dil_h, g.kernel_h - 1, 1);
  const int64_t span_w = checked_mul_add(op, "the dilated kernel width", g.dil_w, g.kernel_w - 1, 1);
  const int64_t padded_h = checked_mul_add(op, "the padded input height", 2, g.pad_h, g.height);
  const int64_t padded_w = checked_mul_add(op, "the padded input width", 2, g.pad_w, g.width);
  TORCH_CHECK(span_h <= padded_h && span_w <= padded_w, op, ": kernel of size ", span_h, "x",
              span_w, " (dilated) is larger than the padded input ", padded_h, "x", padded_w,
              " (input of shape ", sizes_str(input), ", padding ", padding, ")");
  g.out_h = (padded_h - span_h) / g.stride_h + 1;
  g.out_w = (padded_w - span_w) / g.stride_w + 1;
  return g;
}

bool is_reduced_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

// ---- direct float32 forward (AVX-512 tiles) ---------------------------------------------------

// conv2d_cpu allocates its output either channels-last or as contiguous NCHW, where a plane's
// pixels are one run; the fast kernels write those two layouts only. True for channels-last.
bool is_channels_last_output(const at::Tensor& output) {
  const bool channels_last = output.stride(1) == 1;
  TORCH_INTERNAL_ASSERT(channels_last || (output.stride(2) == output.size(3) && output.stride(3) == 1),
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

  Activation in_kernel() const { return residual ? Activation::None : act; }
  // Only the tile paths (behind tiles::available()) use a pass, so no capability check here.
  void finish(float* out, int64_t count) const {
    if (residual) tiles::add_residual_avx512(out, residual + (out - output), count, act);
  }
  // Starts loading the residual under `out` while a tile computes: the direct tiles' stretches are
  // short and a row apart in channels-last, which the hardware prefetchers do not foresee.
  void prefetch(const float* out, int64_t count) const {
    if (!residual) return;
    for (int64_t i = 0; i < count; i += 16) __builtin_prefetch(residual + (out - output) + i);
  }
};

// The input as a zero-padded NHWC buffer [N, Hp, Wp, C] with the image at (pad_h, pad_w): the
// one layout change an NCHW input needs, after which no kernel tests bounds. Rows are filled in
// parallel, each in one pass (a row of C x Wp floats stays in cache while it is transposed).
at::Tensor padded_nhwc(const Geometry& g, const at::Tensor& input, int64_t Hp, int64_t Wp,
                       bool in_scratch = false) {
  const int64_t C = g.channels;
  at::Tensor padded = in_scratch ? cpu::workspace(kPaddedInput, {g.batch, Hp, Wp, C}, input.options())
                                 : at::empty({g.batch, Hp, Wp, C}, input.options());
  const float* src = input.const_data_ptr<float>();
  float* dst = padded.data_ptr<float>();
  const int64_t sN = input.stride(0), sC = input.stride(1), sH = input.stride(2), sW = input.stride(3);
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
        for (int64_t w = 0; w < g.width; ++w) std::memcpy(out + w * C, in + w * sW, C * sizeof(float));
      } else if (sW == 1) {  // NCHW: the row is a [C, W] matrix
        tiles::transpose(in, C, g.width, sC, out, C);
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

// packed[kb][r][s][c][j] = weight[kb * 32 + j][c][r][s], zero for channels past K: the order in
// which a tile reads them. Written sequentially in one pass; the 32 source rows it reads at a
// time stay in cache.
at::Tensor pack_weight(const Geometry& g, const at::Tensor& weight) {
  using tiles::kChannelBlock;
  const int64_t C = g.channels, taps = g.kernel_h * g.kernel_w, K = g.out_channels;
  const int64_t blocks = (K + kChannelBlock - 1) / kChannelBlock;
  at::Tensor packed = at::empty({blocks, taps, C, kChannelBlock}, weight.options());
  const float* w = weight.const_data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, blocks * taps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kb = item / taps, tap = item % taps;
      float* out = dst + item * C * kChannelBlock;
      for (int64_t c = 0; c < C; ++c, out += kChannelBlock) {
        for (int64_t j = 0; j < kChannelBlock; ++j) {
          const int64_t k = kb * kChannelBlock + j;
          out[j] = k < K ? w[(k * C + c) * taps + tap] : 0.0f;
        }
      }
    }
  });
  return packed;
}

void forward_direct(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const OutputPass& pass, at::Tensor& output) {
  using tiles::kChannelBlock;
  const int64_t C = g.channels;
  // A channels-last input without padding already is the NHWC image the tiles read, at its own
  // strides (a strided 1x1 convolution's subsampled view included): no copy.
  const bool in_place = input.stride(1) == 1 && g.pad_h == 0 && g.pad_w == 0;
  const at::Tensor padded =  // logically NCHW either way
      in_place ? input
               : padded_nhwc(g, input, g.height + 2 * g.pad_h, g.width + 2 * g.pad_w, /*in_scratch=*/true)
                     .permute({0, 3, 1, 2});
  const int64_t image_step = padded.stride(0), row_step = padded.stride(2), pixel_step = padded.stride(3);

  const int64_t blocks = (g.out_channels + kChannelBlock - 1) / kChannelBlock;
  const at::Tensor packed = pack_weight(g, weight.contiguous());
  const at::Tensor bias_padded = padded_bias(bias, g.out_channels, blocks * kChannelBlock, weight.options());

  tiles::Window window{};
  window.row_stride = g.dil_h * row_step;
  window.kernel_h = g.kernel_h;
  // Undilated kernel columns of contiguous pixels and their channels are one run of the row.
  const bool one_run = g.dil_w == 1 && pixel_step == C;
  window.taps_per_row = one_run ? 1 : g.kernel_w;
  window.tap_stride = g.dil_w * pixel_step;
  window.run = one_run ? g.kernel_w * C : C;

  const float* x = padded.const_data_ptr<float>();
  const float* w = packed.const_data_ptr<float>();
  const float* b = bias_padded.const_data_ptr<float>();
  float* out = output.data_ptr<float>();
  const Activation act = pass.in_kernel();
  const int64_t block_size = g.kernel_h * g.kernel_w * C * kChannelBlock;
  const int64_t sN = output.stride(0), sK = output.stride(1), sH = output.stride(2),
                sW = output.stride(3);
  const bool channels_last = is_channels_last_output(output);
  const int64_t P = g.pixels(), tiles_per_image = (P + tiles::kMaxPixels - 1) / tiles::kMaxPixels;
  // A thread takes runs of kTilesPerChunk tiles and sweeps every weight block over a run, so a
  // block (kh * kw * C * 32 floats) is read once per run, not once per tile, and the run's input
  // windows stay in cache across blocks.
  constexpr int64_t kTilesPerChunk = 32;
  const int64_t tiles_total = g.batch * tiles_per_image;
  // Fewer tiles than threads x chunk (small maps): smaller runs, so every thread has work.
  const int64_t grain = std::clamp<int64_t>(tiles_total / at::get_num_threads(), 1, kTilesPerChunk);
  at::parallel_for(0, tiles_total, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float result[tiles::kMaxPixels * kChannelBlock];
    float* pixel_results[tiles::kMaxPixels];
    for (int p = 0; p < tiles::kMaxPixels; ++p) pixel_results[p] = result + p * kChannelBlock;
    float* pixel_outputs[tiles::kMaxPixels];
    // Per pixel of the run: its window's origin and its output offset (channels-last), found
    // once per run, not once per block; pixels step along rows, so no division per pixel.
    const float* origins[kTilesPerChunk * tiles::kMaxPixels];
    int64_t offsets[kTilesPerChunk * tiles::kMaxPixels];
    tiles::Window win = window;
    for (int64_t chunk = begin; chunk < end; chunk += kTilesPerChunk) {
      const int64_t chunk_end = std::min(end, chunk + kTilesPerChunk);
      for (int64_t t = chunk; t < chunk_end; ++t) {
        const int64_t n = t / tiles_per_image, first = (t % tiles_per_image) * tiles::kMaxPixels;
        int64_t oh = first / g.out_w, ow = first % g.out_w;
        for (int64_t i = (t - chunk) * tiles::kMaxPixels, p = first; p < std::min(P, first + tiles::kMaxPixels); ++i, ++p) {
          origins[i] = x + n * image_step + oh * g.stride_h * row_step + ow * g.stride_w * pixel_step;
          offsets[i] = n * sN + oh * sH + ow * sW;
          if (++ow == g.out_w) ow = 0, ++oh;
        }
      }
      for (int64_t kb = 0; kb < blocks; ++kb) {
        const int64_t valid = std::min(kChannelBlock, g.out_channels - kb * kChannelBlock);
        for (int64_t t = chunk; t < chunk_end; ++t) {
          const int64_t first = (t % tiles_per_image) * tiles::kMaxPixels;
          const int pixels = static_cast<int>(std::min<int64_t>(tiles::kMaxPixels, P - first));
          const int64_t i0 = (t - chunk) * tiles::kMaxPixels;
          win.origins = origins + i0;
          float* target = out + kb * kChannelBlock * sK;
          if (channels_last) {
            for (int p = 0; p < pixels; ++p) pass.prefetch(target + offsets[i0 + p], valid);
          } else {
            for (int64_t k = 0; k < valid; ++k) pass.prefetch(target + offsets[i0] + k * sK, pixels);
          }
          if (channels_last && valid == kChannelBlock) {  // straight into each pixel's channels
            for (int p = 0; p < pixels; ++p) pixel_outputs[p] = target + offsets[i0 + p];
            tiles::run_tile(pixels, win, w + kb * block_size, b + kb * kChannelBlock, act, pixel_outputs);
            for (int p = 0; p < pixels; ++p) pass.finish(pixel_outputs[p], kChannelBlock);
            continue;
          }
          tiles::run_tile(pixels, win, w + kb * block_size, b + kb * kChannelBlock, act, pixel_results);
          if (channels_last) {  // a partial block: each pixel's first `valid` channels
            for (int p = 0; p < pixels; ++p) {
              std::memcpy(target + offsets[i0 + p], result + p * kChannelBlock, valid * sizeof(float));
              pass.finish(target + offsets[i0 + p], valid);
            }
          } else {  // NCHW: the tile's pixels are one contiguous run of each channel's plane
            tiles::transpose(result, pixels, valid, kChannelBlock, target + offsets[i0], sK);
            for (int64_t k = 0; k < valid; ++k) pass.finish(target + offsets[i0] + k * sK, pixels);
          }
        }
      }
    }
  });
}

// ---- row tiles: few input or output channels, NCHW output (AVX-512) --------------------------

// Channels up to which the row tiles beat the direct tiles for an NCHW output, measured:
// - input channels: 1.2-1.6x faster at 1 to 4, even at 8, slower from 16 (a network's first
//   layers);
// - output channels: 2-4x faster at 1 to 8, where a direct tile's 32-channel block is mostly
//   padding (the first layer's grad_input, a segmentation or regression head).
constexpr int64_t kRowTileMaxChannels = 8;

bool use_row_tiles(const Geometry& g, const at::Tensor& output) {
  return g.groups == 1 && std::min(g.channels, g.out_channels) <= kRowTileMaxChannels &&
         !is_channels_last_output(output) &&
         tiles::available();
}

// The input as the row tiles read it: zero-padded, NCHW, each row split into its stride_w column
// phases. data[n][c][phase][hp][q] is the padded input at row hp, column q * stride_w + phase, so
// tap (r, s) of output pixels (oh, ow .. ow + 15) is at phase (s * dil_w) % stride_w, row
// oh * stride_h + r * dil_h and columns ow + (s * dil_w) / stride_w onwards: 16 adjacent floats.
struct RowInput {
  static constexpr int64_t kLanes = 16;
  at::Tensor data;
  std::vector<int64_t> offsets;  // per tap (c, r, s): its distance from a vector's first tap
  int64_t image_size, row_len, stride_h, vectors_per_row;

  // Row vectors first .. first + count - 1 (of N * out_h * vectors_per_row): where each reads its
  // first tap's inputs, where its 16 pixels lie in an NCHW tensor `pixels` of strides sN, sH (the
  // output, or grad_output), and its mask of the lanes inside the row.
  template <typename T>
  void locate(const Geometry& g, int64_t first, int64_t count, T* pixels, int64_t sN, int64_t sH,
              const float** inputs, T** at, uint16_t* masks) const {
    for (int64_t j = 0; j < count; ++j) {
      const int64_t row = (first + j) / vectors_per_row, ow = (first + j) % vectors_per_row * kLanes;
      const int64_t n = row / g.out_h, oh = row % g.out_h;
      inputs[j] = data.const_data_ptr<float>() + n * image_size + oh * stride_h * row_len + ow;
      at[j] = pixels + n * sN + oh * sH + ow;
      masks[j] = static_cast<uint16_t>((1u << std::min<int64_t>(kLanes, g.out_w - ow)) - 1u);
    }
  }
};

RowInput split_phases(const Geometry& g, const at::Tensor& input) {
  constexpr int64_t kLanes = RowInput::kLanes;
  const int64_t C = g.channels, phases = g.stride_w, Hp = g.height + 2 * g.pad_h;
  RowInput split;
  split.vectors_per_row = (g.out_w + kLanes - 1) / kLanes;
  // The last vector of a row reads (but never stores) lanes past the row's end, so each phase
  // row is long enough for them; the tail is zero, not stale memory that might hold denormals.
  const int64_t max_shift = (g.kernel_w - 1) * g.dil_w / phases;
  const int64_t Wq = std::max((g.width + 2 * g.pad_w + phases - 1) / phases,
                              split.vectors_per_row * kLanes + max_shift);
  split.row_len = Wq;
  split.stride_h = g.stride_h;
  split.image_size = C * phases * Hp * Wq;
  split.data = cpu::workspace(kPaddedInput, {g.batch, C, phases, Hp, Wq}, input.options());
  const float* src = input.const_data_ptr<float>();
  float* dst = split.data.data_ptr<float>();
  const int64_t sN = input.stride(0), sC = input.stride(1), sH = input.stride(2), sW = input.stride(3);
  at::parallel_for(0, g.batch * C * Hp, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / Hp, hp = row % Hp, h = hp - g.pad_h;
      const float* in = src + (plane / C) * sN + (plane % C) * sC + h * sH;
      for (int64_t p = 0; p < phases; ++p) {
        float* out = dst + ((plane * phases + p) * Hp + hp) * Wq;
        if (h < 0 || h >= g.height) {
          std::fill_n(out, Wq, 0.0f);
          continue;
        }
        // Columns q with 0 <= q * stride_w + p - pad_w < W come from the image.
        const int64_t first = std::clamp<int64_t>((g.pad_w - p + phases - 1) / phases, 0, Wq);
        const int64_t last = std::clamp<int64_t>((g.width + g.pad_w - p + phases - 1) / phases, first, Wq);
        std::fill_n(out, first, 0.0f);
        tiles::gather_columns(in + (first * phases + p - g.pad_w) * sW, phases * sW, last - first,
                              out + first);
        std::fill_n(out + last, Wq - last, 0.0f);
      }
    }
  });
  split.offsets.resize(C * g.kernel_h * g.kernel_w);
  for (int64_t c = 0, t = 0; c < C; ++c)
    for (int64_t r = 0; r < g.kernel_h; ++r)
      for (int64_t s = 0; s < g.kernel_w; ++s, ++t)
        split.offsets[t] = ((c * phases + s * g.dil_w % phases) * Hp + r * g.dil_h) * Wq + s * g.dil_w / phases;
  return split;
}

void forward_rows(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const OutputPass& pass, at::Tensor& output) {
  using tiles::kRowChannels;
  using tiles::kRowVectors;
  const int64_t K = g.out_channels, taps = g.channels * g.kernel_h * g.kernel_w;
  const RowInput split = split_phases(g, input);

  // packed[kb][tap][j] = weight[kb * 4 + j][tap], zero past K.
  const int64_t blocks = (K + kRowChannels - 1) / kRowChannels;
  at::Tensor packed = at::zeros({blocks * kRowChannels, taps}, weight.options());
  packed.narrow(0, 0, K).copy_(weight.reshape({K, taps}));
  packed = packed.view({blocks, kRowChannels, taps}).transpose(1, 2).contiguous();
  const at::Tensor bias_padded = padded_bias(bias, K, blocks * kRowChannels, weight.options());

  const float* w = packed.const_data_ptr<float>();
  const float* b = bias_padded.const_data_ptr<float>();
  float* out = output.data_ptr<float>();
  const int64_t sN = output.stride(0), sK = output.stride(1), sH = output.stride(2);
  const tiles::RowWindow window{split.offsets.data(), taps, sK};
  const int64_t row_vectors = g.batch * g.out_h * split.vectors_per_row;
  const int64_t tile_count = (row_vectors + kRowVectors - 1) / kRowVectors;
  // A thread sweeps every channel block over one tile's vectors, whose inputs (a few kernel
  // rows of every channel) stay in L1 meanwhile; the packed weights are small enough for L2.
  at::parallel_for(0, tile_count, 1, [&](int64_t begin, int64_t end) {
    const float* inputs[kRowVectors];
    float* outputs[kRowVectors];
    uint16_t masks[kRowVectors];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * kRowVectors;
      const int count = static_cast<int>(std::min<int64_t>(kRowVectors, row_vectors - first));
      split.locate(g, first, count, out, sN, sH, inputs, outputs, masks);
      for (int64_t kb = 0; kb < blocks; ++kb) {
        const int channels = static_cast<int>(std::min<int64_t>(kRowChannels, K - kb * kRowChannels));
        tiles::run_row_tile(count, window, inputs, outputs, masks, w + kb * taps * kRowChannels,
                            b + kb * kRowChannels, channels, pass.in_kernel());
        for (int j = 0; j < count; ++j) {
          for (int k = 0; k < channels; ++k) pass.finish(outputs[j] + k * sK, std::popcount(masks[j]));
          outputs[j] += kRowChannels * sK;
        }
      }
    }
  });
}

// ---- Winograd F(2x2, 3x3) float32 forward (AVX-512 transforms, BLAS products) -----------------

bool use_winograd(const Geometry& g) {
  // The transforms cost memory traffic that pays off with enough channels on both sides and
  // enough tiles.
  const int64_t tiles = g.batch * ((g.out_h + 1) / 2) * ((g.out_w + 1) / 2);
  return g.kernel_h == 3 && g.kernel_w == 3 && g.stride_h == 1 && g.stride_w == 1 &&
         g.dil_h == 1 && g.dil_w == 1 && g.groups == 1 && g.channels >= 32 &&
         g.out_channels >= 32 && tiles >= 64 &&
         tiles::available();
}

// A caller-supplied U (prepacked for inference) must be float32 [16, C, K] on the weight's
// device, for a 3x3 convolution with one group; it is used only where the kernel picks Winograd.
void check_winograd_weight(const Geometry& g, const at::Tensor& weight, const at::Tensor& u) {
  TORCH_CHECK(g.kernel_h == 3 && g.kernel_w == 3 && g.groups == 1,
              "conv2d: winograd_weight is only for 3x3 convolutions with groups=1, got weight of "
              "shape ", sizes_str(weight), " and groups=", g.groups);
  TORCH_CHECK(u.dim() == 3 && u.size(0) == winograd::kPoints && u.size(1) == g.channels &&
                  u.size(2) == g.out_channels,
              "conv2d: expected winograd_weight to be a Tensor[16, ", g.channels, ", ",
              g.out_channels, "] (conv2d_winograd_weight of the weight), got shape ", sizes_str(u));
  TORCH_CHECK(u.scalar_type() == at::kFloat, "conv2d: winograd_weight must be float32, got ",
              u.scalar_type());
  check_same_device("conv2d", "weight", weight, "winograd_weight", u);
}

// U[e][c][k] = (G f G^T)[e] for the 3x3 filter f = weight[k][c], 16 output channels per task.
at::Tensor transform_weight(const Geometry& g, const at::Tensor& weight) {
  const int64_t C = g.channels, K = g.out_channels;
  at::Tensor u_tensor = cpu::workspace(kWinogradWeights, {winograd::kPoints, C, K}, weight.options());
  float* u = u_tensor.data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  // Stream U past the cache when it outgrows it (8 MB: 512 x 256 channels and up).
  const bool stream = K % 16 == 0 && winograd::kPoints * C * K * sizeof(float) >= (size_t(8) << 20);
  constexpr int64_t kBlock = 16;
  at::parallel_for(0, (K + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k0 = begin * kBlock; k0 < std::min(K, end * kBlock); k0 += kBlock)
      winograd::weight_block(w, C, K, k0, std::min(kBlock, K - k0), u, stream);
  });
  return u_tensor;
}

void forward_winograd(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& prepacked, const std::optional<at::Tensor>& bias,
                      const OutputPass& pass, at::Tensor& output) {
  const int64_t C = g.channels, K = g.out_channels;
  const int64_t tiles_h = (g.out_h + 1) / 2, tiles_w = (g.out_w + 1) / 2;
  // Odd output sizes: the last tile row/column reads zeros past the padded image.
  const int64_t Hp = std::max(g.height + 2 * g.pad_h, 2 * tiles_h + 2);
  const int64_t Wp = std::max(g.width + 2 * g.pad_w, 2 * tiles_w + 2);
  const at::Tensor padded = padded_nhwc(g, input, Hp, Wp, /*in_scratch=*/true);
  const at::Tensor u = prepacked ? prepacked->contiguous() : transform_weight(g, weight.contiguous());
  const float* up = u.const_data_ptr<float>();
  const at::Tensor bias_values = bias ? bias->contiguous() : at::zeros({K}, weight.options());
  const float* x = padded.const_data_ptr<float>();
  const float* b = bias_values.const_data_ptr<float>();
  float* out = output.data_ptr<float>();
  const int64_t sN = output.stride(0), sK = output.stride(1), sH = output.stride(2);
  const bool channels_last = is_channels_last_output(output);
  const int64_t tile_rows = g.batch * tiles_h, tiles_total = tile_rows * tiles_w;
  const int64_t staged_row = 2 * tiles_w * K;  // one output row (and the odd column past it), NHWC

  // The three steps, each over whole rows of tiles (a row of tiles: two output rows of one
  // image). The transformed inputs V and products M of the tiles in a buffer are [16][tiles][C]
  // and [16][tiles][K]; row_offset is the row's first tile in it.
  const auto transform_row = [&](int64_t row, float* v, int64_t row_offset, int64_t tiles) {
    const int64_t n = row / tiles_h, oh = 2 * (row % tiles_h);
    for (int64_t tw = 0; tw < tiles_w; ++tw) {
      const float* rows[4];
      for (int i = 0; i < 4; ++i) rows[i] = x + ((n * Hp + oh + i) * Wp + 2 * tw) * C;
      winograd::input_tile(rows, C, C, v + (row_offset + tw) * C, tiles * C);
    }
  };
  const auto multiply = [&](const float* v, float* m, int64_t tiles, int64_t first_point, int64_t end_point) {
    for (int64_t e = first_point; e < end_point; ++e) {
      cpu::gemm_row_major(TransposeType::NoTranspose, TransposeType::NoTranspose, tiles, K, C, 1.0f,
                          v + e * tiles * C, C, up + e * C * K, K, 0.0f, m + e * tiles * K, K);
    }
  };
  // Output tiles are assembled NHWC in `staged` (2 rows), then copied or transposed into place.
  const auto write_row = [&](int64_t row, const float* m, int64_t row_offset, int64_t tiles, float* staged) {
    for (int64_t tw = 0; tw < tiles_w; ++tw) {
      float* const targets[2][2] = {{staged + 2 * tw * K, staged + (2 * tw + 1) * K},
                                    {staged + staged_row + 2 * tw * K, staged + staged_row + (2 * tw + 1) * K}};
      winograd::output_tile(m + (row_offset + tw) * K, tiles * K, K, b, pass.in_kernel(), targets);
    }
    const int64_t n = row / tiles_h, oh = 2 * (row % tiles_h);
    for (int64_t i = 0; i < std::min<int64_t>(2, g.out_h - oh); ++i) {
      float* target = out + n * sN + (oh + i) * sH;
      if (channels_last) {
        std::memcpy(target, staged + i * staged_row, g.out_w * K * sizeof(float));
        pass.finish(target, g.out_w * K);
      } else {
        tiles::transpose(staged + i * staged_row, g.out_w, K, K, target, sK);
        for (int64_t k = 0; k < K; ++k) pass.finish(target + k * sK, g.out_w);
      }
    }
  };

  if (C * K > tiles_total * (C + K)) {
    // Few tiles, wide layer (512 channels at 7x7): U outweighs V and M. Each step runs over all
    // tiles, and the threads split the products by point, so each reads only its share of U.
    const at::Tensor v_tensor = cpu::workspace(kTransformed, {winograd::kPoints * tiles_total * C}, output.options());
    const at::Tensor m_tensor = cpu::workspace(kProducts, {winograd::kPoints * tiles_total * K}, output.options());
    float* v = v_tensor.data_ptr<float>();
    float* m = m_tensor.data_ptr<float>();
    at::parallel_for(0, tile_rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) transform_row(row, v, row * tiles_w, tiles_total);
    });
    at::parallel_for(0, winograd::kPoints, 1, [&](int64_t begin, int64_t end) {
      const cpu::SequentialBlas sequential_blas;
      multiply(v, m, tiles_total, begin, end);
    });
    at::parallel_for(0, tile_rows, 1, [&](int64_t begin, int64_t end) {
      const at::Tensor staged = cpu::workspace(kStaged, {2 * staged_row}, output.options());
      for (int64_t row = begin; row < end; ++row)
        write_row(row, m, row * tiles_w, tiles_total, staged.data_ptr<float>());
    });
    return;
  }
  // Otherwise a thread takes a chunk of rows through all three steps while the chunk's V and M
  // (up to 2 MB) are still in cache; U is re-read for every chunk, so wider layers take more
  // tiles per chunk.
  const int64_t rows_per_chunk = std::max<int64_t>(1, std::min<int64_t>(256, 32768 / std::max(C, K)) / tiles_w);
  const int64_t grain = std::clamp<int64_t>(tile_rows / at::get_num_threads(), 1, rows_per_chunk);
  at::parallel_for(0, tile_rows, grain, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    const int64_t max_tiles = rows_per_chunk * tiles_w;
    const at::Tensor v_tensor = cpu::workspace(kTransformed, {winograd::kPoints * max_tiles * C}, output.options());
    const at::Tensor m_tensor = cpu::workspace(kProducts, {winograd::kPoints * max_tiles * K}, output.options());
    const at::Tensor staged_tensor = cpu::workspace(kStaged, {2 * staged_row}, output.options());
    float* v = v_tensor.data_ptr<float>();
    float* m = m_tensor.data_ptr<float>();
    float* staged = staged_tensor.data_ptr<float>();
    for (int64_t first_row = begin; first_row < end; first_row += rows_per_chunk) {
      const int64_t rows = std::min(rows_per_chunk, end - first_row), tiles = rows * tiles_w;
      for (int64_t r = 0; r < rows; ++r) transform_row(first_row + r, v, r * tiles_w, tiles);
      multiply(v, m, tiles, 0, winograd::kPoints);
      for (int64_t r = 0; r < rows; ++r) write_row(first_row + r, m, r * tiles_w, tiles, staged);
    }
  });
}

// ---- GEMM lowering (any dtype, any groups) ----------------------------------------------------

// col[p, (r * kw + s) * Cg + c] = x[h, w, group * Cg + c] for output pixel p's tap (r, s), or 0
// in the padding. x is one NHWC image.
template <typename T>
void im2col(const Geometry& g, const T* x, int64_t group, T* col) {
  const int64_t Cg = g.group_channels(), window = g.window();
  // One group, no dilation along W: a kernel row inside the image is one run of kw * C values.
  const bool whole_rows = g.groups == 1 && g.dil_w == 1;
  at::parallel_for(0, g.out_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t oh = begin; oh < end; ++oh) {
      T* dst = col + oh * g.out_w * window;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        for (int64_t r = 0; r < g.kernel_h; ++r) {
          const int64_t h = oh * g.stride_h - g.pad_h + r * g.dil_h;
          const int64_t w0 = ow * g.stride_w - g.pad_w;
          if (whole_rows && h >= 0 && h < g.height && w0 >= 0 && w0 + g.kernel_w <= g.width) {
            // the kernel row's taps are one contiguous run of the NHWC row
            std::memcpy(dst, x + (h * g.width + w0) * g.channels, g.kernel_w * Cg * sizeof(T));
            dst += g.kernel_w * Cg;
            continue;
          }
          for (int64_t s = 0; s < g.kernel_w; ++s, dst += Cg) {
            const int64_t w = w0 + s * g.dil_w;
            if (h >= 0 && h < g.height && w >= 0 && w < g.width) {
              std::memcpy(dst, x + (h * g.width + w) * g.channels + group * Cg, Cg * sizeof(T));
            } else {
              std::fill_n(dst, Cg, T(0));
            }
          }
        }
      }
    }
  });
}

// The adjoint of im2col, accumulated into the NHWC image gradient dx: each input row h gathers
// the taps of every output row that read it, so rows are owned by one thread each.
template <typename T>
void col2im_add(const Geometry& g, const T* col, int64_t group, T* dx) {
  const int64_t Cg = g.group_channels(), window = g.window();
  at::parallel_for(0, g.height, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t r = 0; r < g.kernel_h; ++r) {
        const int64_t t = h + g.pad_h - r * g.dil_h;  // = oh * stride_h for the output row oh
        if (t < 0 || t % g.stride_h != 0 || t / g.stride_h >= g.out_h) continue;
        const int64_t oh = t / g.stride_h;
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const T* src = col + (oh * g.out_w + ow) * window + r * g.kernel_w * Cg;
          for (int64_t s = 0; s < g.kernel_w; ++s, src += Cg) {
            const int64_t w = ow * g.stride_w - g.pad_w + s * g.dil_w;
            if (w >= 0 && w < g.width) cpu::axpy(Cg, T(1), src, dx + (h * g.width + w) * g.channels + group * Cg);
          }
        }
      }
    }
  });
}

// The NHWC matrix view of one image: [pixels, channels].
template <typename T>
const T* image(const at::Tensor& nhwc, int64_t n) {
  return nhwc.const_data_ptr<T>() + n * nhwc.stride(0);
}

template <typename T>
void forward_gemm(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                  Activation act, at::Tensor& output) {
  const int64_t Kg = g.group_out_channels(), window = g.window(), P = g.pixels();
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = weight.permute({0, 2, 3, 1}).contiguous();  // [K, kh, kw, Cg]
  at::Tensor col = g.is_pointwise() ? at::Tensor() : at::empty({P, window}, input.options());
  at::Tensor result = at::empty({P, Kg}, input.options());
  const T* bias_data = bias ? bias->contiguous().const_data_ptr<T>() : nullptr;
  T* out = output.data_ptr<T>();
  const T* added = residual ? residual->const_data_ptr<T>() : nullptr;  // at the output's strides
  const int64_t sN = output.stride(0), sK = output.stride(1), sH = output.stride(2),
                sW = output.stride(3);
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t group = 0; group < g.groups; ++group) {
      const T* a = image<T>(x, n);
      if (!g.is_pointwise()) {
        im2col(g, a, group, col.data_ptr<T>());
        a = col.const_data_ptr<T>();
      }
      T* res = result.data_ptr<T>();
      cpu::gemm_row_major(TransposeType::NoTranspose, TransposeType::Transpose, P, Kg, window, T(1),
                          a, window, w.const_data_ptr<T>() + group * Kg * window, window, T(0), res,
                          Kg);
      at::parallel_for(0, P, 64, [&](int64_t begin, int64_t end) {
        for (int64_t k = 0; k < Kg; ++k) {
          const int64_t channel = group * Kg + k;
          const T b = bias_data ? bias_data[channel] : T(0);
          const int64_t plane = n * sN + channel * sK;
          for (int64_t p = begin; p < end; ++p) {
            const int64_t at = plane + (p / g.out_w) * sH + (p % g.out_w) * sW;
            out[at] = activate(act, res[p * Kg + k] + b + (added ? added[at] : T(0)));
          }
        }
      });
    }
  }
}

// The residual is added before the activation; it has the output's shape and the input's dtype,
// and is read at the output's strides (a copy only where its layout differs).
at::Tensor check_residual(const Geometry& g, const at::Tensor& input, const at::Tensor& residual,
                          at::MemoryFormat format) {
  const std::array<int64_t, 4> shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(residual.sizes() == at::IntArrayRef(shape), "conv2d: residual must have the output's shape ",
              at::IntArrayRef(shape), ", got ", sizes_str(residual));
  check_same_dtype("conv2d", "input", input, "residual", residual);
  check_same_device("conv2d", "input", input, "residual", residual);
  return residual.contiguous(format);
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
      residual_arg ? std::optional<at::Tensor>(check_residual(g, input, *residual_arg, format)) : std::nullopt;
  if (is_reduced_precision(input)) {  // float32 arithmetic, result rounded once
    return conv2d_cpu(input.to(at::kFloat), weight.to(at::kFloat), to_float(bias), stride, padding,
                      dilation, groups, activation, winograd_weight, to_float(residual))
        .to(input.scalar_type());
  }
  if (g.kernel_h == 1 && g.kernel_w == 1 && g.pad_h == 0 && g.pad_w == 0 &&
      (g.stride_h > 1 || g.stride_w > 1)) {
    // A strided 1x1 convolution reads only every stride-th pixel: subsample first (a view), so
    // the kernels copy and read a stride_h * stride_w times smaller input.
    const at::Tensor sampled = input.slice(2, 0, g.height, g.stride_h).slice(3, 0, g.width, g.stride_w);
    return conv2d_cpu(sampled, weight, bias, {1, 1}, padding, dilation, groups, activation,
                      std::nullopt, residual);
  }
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(format));
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
    const OutputPass pass{act, residual ? residual->const_data_ptr<float>() : nullptr, output.const_data_ptr<float>()};
    if (use_winograd(g)) {
      forward_winograd(g, input, weight, winograd_weight, bias, pass, output);
      return output;
    }
    if (use_row_tiles(g, output)) {
      forward_rows(g, input, weight, bias, pass, output);
      return output;
    }
    if (g.groups == 1 && tiles::available()) {
      forward_direct(g, input, weight, bias, pass, output);
      return output;
    }
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_cpu", [&] {
    forward_gemm<scalar_t>(g, input, weight, bias, residual, act, output);
  });
  return output;
}

// ---- backward ---------------------------------------------------------------------------------

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

template <typename T>
void backward_gemm(const Geometry& g, const at::Tensor& grad_output, const at::Tensor& input,
                   const at::Tensor& weight, at::Tensor& grad_input_nhwc,
                   at::Tensor& grad_weight_rows) {
  const int64_t K = g.out_channels, Kg = g.group_out_channels(), window = g.window(),
                P = g.pixels();
  const bool want_input = grad_input_nhwc.defined(), want_weight = grad_weight_rows.defined();
  const at::Tensor dy = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = want_weight ? input.contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  const at::Tensor w = want_input ? weight.permute({0, 2, 3, 1}).contiguous() : at::Tensor();
  // Several images per GEMM (their rows are consecutive in NHWC), so small feature maps still
  // give the BLAS a long reduction; the im2col buffer stays around 16 MB.
  const int64_t images = std::clamp<int64_t>((int64_t{4} << 20) / std::max<int64_t>(P * window, 1), 1, g.batch);
  at::Tensor col = g.is_pointwise() ? at::Tensor() : at::empty({images * P, window}, input.options());
  for (int64_t n0 = 0; n0 < g.batch; n0 += images) {
    const int64_t count = std::min(images, g.batch - n0), rows = count * P;
    for (int64_t group = 0; group < g.groups; ++group) {
      const T* dy_g = image<T>(dy, n0) + group * Kg;  // [rows, Kg] with row stride K
      if (want_weight) {  // dW_g[Kg, window] += dy_g^T col
        const T* a = image<T>(x, n0);
        if (!g.is_pointwise()) {
          for (int64_t i = 0; i < count; ++i)
            im2col(g, image<T>(x, n0 + i), group, col.data_ptr<T>() + i * P * window);
          a = col.const_data_ptr<T>();
        }
        cpu::gemm_row_major(TransposeType::Transpose, TransposeType::NoTranspose, Kg, window, rows,
                            T(1), dy_g, K, a, window, T(1),
                            grad_weight_rows.data_ptr<T>() + group * Kg * window, window);
      }
      if (want_input) {  // dcol[rows, window] = dy_g W_g, then scattered back to the images
        T* dx = grad_input_nhwc.data_ptr<T>() + n0 * grad_input_nhwc.stride(0);
        T* dcol = g.is_pointwise() ? dx : col.data_ptr<T>();
        cpu::gemm_row_major(TransposeType::NoTranspose, TransposeType::NoTranspose, rows, window, Kg,
                            T(1), dy_g, K, w.const_data_ptr<T>() + group * Kg * window, window,
                            T(0), dcol, window);
        if (!g.is_pointwise()) {
          for (int64_t i = 0; i < count; ++i)
            col2im_add(g, dcol + i * P * window, group, dx + i * grad_input_nhwc.stride(0));
        }
      }
    }
  }
}

// Splits [0, items) across the threads; body(begin, end, sums) adds into its thread's own zeroed
// copy of a float tensor of `shape`, and the copies are added in thread order, so the result
// does not depend on scheduling (no atomics, no shared accumulator).
template <typename Body>
at::Tensor sum_over_threads(int64_t items, at::IntArrayRef shape, const at::TensorOptions& options,
                            const Body& body) {
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

// The weight gradient of a layer with few input channels by the row tiles: grad_output's NCHW
// rows are cut into 16-pixel vectors as in the forward, and a tile keeps a block of 4 output
// channels x 6 taps in registers over a chunk of rows, so grad_output is read once per block of
// taps, not once per tap as by the per-tap GEMMs (which for C = 3 are 64 x 3 products). The
// threads split the chunks, each summing into its own copy; the copies and the lanes are added
// up in a fixed order, so the result does not depend on scheduling.
at::Tensor grad_weight_rows(const Geometry& g, const at::Tensor& grad_output, const at::Tensor& input) {
  using tiles::kRowChannels;
  constexpr int64_t kTapsPerTile = tiles::kRowVectors, kLanes = RowInput::kLanes;
  const int64_t K = g.out_channels, taps = g.channels * g.kernel_h * g.kernel_w;
  const RowInput split = split_phases(g, input);
  const at::Tensor dy = grad_output.contiguous();
  const int64_t k_blocks = (K + kRowChannels - 1) / kRowChannels;
  const int64_t tap_blocks = (taps + kTapsPerTile - 1) / kTapsPerTile;
  const int64_t sum_stride = tap_blocks * kTapsPerTile * kLanes;  // floats between channels
  // A chunk is a run of output rows (of one image or several), whose grad_output (all K
  // channels, about 512 KB) stays in L2 while every block of channels and taps sweeps it.
  const int64_t rows = g.batch * g.out_h;
  const int64_t rows_per_chunk = std::clamp<int64_t>(131072 / (K * g.out_w), 1, rows);
  const int64_t chunk_vectors = rows_per_chunk * split.vectors_per_row;
  const int64_t row_vectors = rows * split.vectors_per_row;
  const float* dy_data = dy.const_data_ptr<float>();
  const int64_t sN = dy.stride(0), sK = dy.stride(1), sH = dy.stride(2);
  const auto accumulate = [&](int64_t begin, int64_t end, float* sums) {
    std::vector<const float*> inputs(chunk_vectors), grads(chunk_vectors);
    std::vector<uint16_t> masks(chunk_vectors);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * chunk_vectors, count = std::min(chunk_vectors, row_vectors - first);
      split.locate(g, first, count, dy_data, sN, sH, inputs.data(), grads.data(), masks.data());
      for (int64_t kb = 0; kb < k_blocks; ++kb) {
        const int channels = static_cast<int>(std::min<int64_t>(kRowChannels, K - kb * kRowChannels));
        for (int64_t tb = 0; tb < tap_blocks; ++tb) {
          tiles::run_row_weight_tile(static_cast<int>(std::min<int64_t>(kTapsPerTile, taps - tb * kTapsPerTile)),
                                     count, inputs.data(), grads.data(), masks.data(),
                                     split.offsets.data() + tb * kTapsPerTile, sK, channels,
                                     sums + kb * kRowChannels * sum_stride + tb * kTapsPerTile * kLanes,
                                     sum_stride);
        }
        for (int64_t v = 0; v < count; ++v) grads[v] += kRowChannels * sK;
      }
    }
  };
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  return sum_over_threads(chunks, {k_blocks * kRowChannels, sum_stride}, input.options(), accumulate)
      .view({k_blocks * kRowChannels, tap_blocks * kTapsPerTile, kLanes})
      .sum(2)
      .narrow(0, 0, K)
      .narrow(1, 0, taps)
      .reshape({K, g.channels, g.kernel_h, g.kernel_w})
      .contiguous();  // the fake kernel (and autograd's callers) expect a contiguous gradient
}

// At stride 1 each tap's weight gradient is one GEMM over shifted rows of the padded input, so
// no im2col buffer is built: with grad_output laid out on the padded width (zero columns past
// Wo), output pixel p = oh * Wp + ow reads padded-input pixel p + r * dil_h * Wp + s * dil_w,
// and tap (r, s)'s input matrix is one contiguous slice of the image.
at::Tensor grad_weight_shifted(const Geometry& g, const at::Tensor& grad_output,
                               const at::Tensor& input) {
  const int64_t C = g.channels, K = g.out_channels;
  const int64_t Hp = g.height + 2 * g.pad_h, Wp = g.width + 2 * g.pad_w;
  // One extra zero row: the zero columns of the last output row read up to
  // (kw - 1) * dil_w pixels past the padded image.
  const at::Tensor x = padded_nhwc(g, input, Hp + 1, Wp);
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
          cpu::gemm_row_major(TransposeType::Transpose, TransposeType::NoTranspose, K, C, rows, 1.0f,
                              dy_n, K, shifted, C, 1.0f, taps + (r * g.kernel_w + s) * K * C, C);
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
  // (MKL threads a K x C product over thousands of rows poorly: 1.5x from two threads).
  return sum_over_threads(g.batch, {g.kernel_h, g.kernel_w, K, C}, input.options(),
                          [&](int64_t begin, int64_t end, float* taps) {
                            const cpu::SequentialBlas sequential_blas;
                            accumulate(begin, end, taps);
                          })
      .permute({2, 3, 0, 1})
      .contiguous();
}

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
    auto [gi, gw, gb] = conv2d_backward_cpu(grad_output.to(at::kFloat), input.to(at::kFloat),
                                            weight.to(at::kFloat), stride, padding, dilation,
                                            groups, output_mask);
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
  at::Tensor grad_input;
  const int64_t full_pad_h = g.dil_h * (g.kernel_h - 1), full_pad_w = g.dil_w * (g.kernel_w - 1);
  if (output_mask[0] && g.batch > 0 && input.scalar_type() == at::kFloat && g.groups == 1 &&
      g.stride_h == 1 && g.stride_w == 1 && g.pad_h <= full_pad_h && g.pad_w <= full_pad_w &&
      tiles::available()) {
    // At stride 1, grad_input is itself a convolution: grad_output, padded to "full", with the
    // kernel flipped and its channel axes swapped. The direct kernel then does it without
    // im2col/col2im.
    grad_input = conv2d_cpu(grad_output, weight.flip({2, 3}).transpose(0, 1), std::nullopt, {1, 1},
                            {full_pad_h - g.pad_h, full_pad_w - g.pad_w},
                            {g.dil_h, g.dil_w}, 1, std::nullopt, std::nullopt, std::nullopt);
    output_mask[0] = false;
  }
  at::Tensor grad_weight;
  const bool float_single_group = g.batch > 0 && input.scalar_type() == at::kFloat && g.groups == 1;
  if (output_mask[1] && float_single_group && g.channels <= kRowTileMaxChannels && tiles::available()) {
    grad_weight = grad_weight_rows(g, grad_output, input);
    output_mask[1] = false;
  }
  // Small maps keep the batched-image GEMMs below: per-image GEMMs over a few rows would be
  // bound by re-reading the K x C accumulators.
  if (output_mask[1] && float_single_group && g.stride_h == 1 && g.stride_w == 1 &&
      g.out_h * (g.width + 2 * g.pad_w) >= 512) {
    grad_weight = grad_weight_shifted(g, grad_output, input);
    output_mask[1] = false;
  }
  at::Tensor grad_input_nhwc, grad_weight_rows;
  if (output_mask[0]) grad_input_nhwc = at::zeros({g.batch, g.height, g.width, g.channels}, opts);
  if (output_mask[1]) grad_weight_rows = at::zeros({g.out_channels, g.window()}, opts);
  if (g.batch > 0 && (output_mask[0] || output_mask[1])) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_backward_cpu", [&] {
      backward_gemm<scalar_t>(g, grad_output, input, weight, grad_input_nhwc, grad_weight_rows);
    });
  }
  if (!grad_input.defined()) {
    grad_input = output_mask[0] ? grad_input_nhwc.permute({0, 3, 1, 2}) : at::empty({0}, opts);
  }
  if (!grad_weight.defined()) {
    grad_weight = output_mask[1]
                      ? grad_weight_rows.view({g.out_channels, g.kernel_h, g.kernel_w, g.group_channels()})
                            .permute({0, 3, 1, 2})
                      : at::empty({0}, opts);
  }
  at::Tensor grad_bias = output_mask[2] ? grad_output.sum({0, 2, 3}) : at::empty({0}, opts);
  // Each gradient is made dense in its layout here, once, whichever path computed it.
  return {with_canonical_strides(grad_input, input.suggest_memory_format()),
          with_canonical_strides(grad_weight, at::MemoryFormat::Contiguous), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
  m.impl("_conv2d_backward", &conv2d_backward_cpu);
}

}  // namespace fastdl::conv2d
