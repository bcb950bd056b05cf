// The row tiles' forward and weight gradient, for layers with few input or output channels and
// an NCHW output: vectors run along the output pixels of a row (tiles.h), over an input split
// into its stride_w column phases.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/cpu_scratch.h"
#include "ops/conv2d/cpu/conv2d_cpu.h"

namespace fastdl::conv2d {
namespace {

// The input as the row tiles read it: zero-padded, NCHW, each row split into its stride_w column
// phases. data[n][c][phase][hp][q] is the padded input at row hp, column q * stride_w + phase, so
// tap (r, s) of output pixels (oh, ow .. ow + lanes - 1) is at phase (s * dil_w) % stride_w, row
// oh * stride_h + r * dil_h and columns ow + (s * dil_w) / stride_w onwards: adjacent floats.
struct RowInput {
  at::Tensor data;
  std::vector<int64_t> offsets;  // per tap (c, r, s): its distance from a vector's first tap
  int64_t lanes, image_size, row_len, stride_h, vectors_per_row;

  // Row vectors first .. first + count - 1 (of N * out_h * vectors_per_row): where each reads its
  // first tap's inputs, where its pixels lie in an NCHW tensor `pixels` of strides sN, sH (the
  // output, or grad_output), and how many of its lanes are inside the row.
  template <typename T>
  void locate(const Geometry& g, int64_t first, int64_t count, T* pixels, int64_t sN, int64_t sH,
              const float** inputs, T** at, int* valid) const {
    for (int64_t j = 0; j < count; ++j) {
      const int64_t row = (first + j) / vectors_per_row, ow = (first + j) % vectors_per_row * lanes;
      const int64_t n = row / g.out_h, oh = row % g.out_h;
      inputs[j] = data.const_data_ptr<float>() + n * image_size + oh * stride_h * row_len + ow;
      at[j] = pixels + n * sN + oh * sH + ow;
      valid[j] = static_cast<int>(std::min(lanes, g.out_w - ow));
    }
  }
};

RowInput split_phases(const tiles::Kernels& kernels, const Geometry& g, const at::Tensor& input) {
  const int64_t lanes = kernels.lanes;
  const int64_t C = g.channels, phases = g.stride_w, Hp = g.height + 2 * g.pad_h;
  RowInput split;
  split.lanes = lanes;
  split.vectors_per_row = (g.out_w + lanes - 1) / lanes;
  // The last vector of a row reads (but never stores) lanes past the row's end, so each phase
  // row is long enough for them; the tail is zero, not stale memory that might hold denormals.
  const int64_t max_shift = (g.kernel_w - 1) * g.dil_w / phases;
  const int64_t Wq = std::max((g.width + 2 * g.pad_w + phases - 1) / phases,
                              split.vectors_per_row * lanes + max_shift);
  split.row_len = Wq;
  split.stride_h = g.stride_h;
  split.image_size = C * phases * Hp * Wq;
  split.data = cpu::workspace(kPaddedInput, {g.batch, C, phases, Hp, Wq}, input.options());
  const float* src = input.const_data_ptr<float>();
  float* dst = split.data.data_ptr<float>();
  const int64_t sN = input.stride(0), sC = input.stride(1), sH = input.stride(2),
                sW = input.stride(3);
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
        const int64_t last =
            std::clamp<int64_t>((g.width + g.pad_w - p + phases - 1) / phases, first, Wq);
        std::fill_n(out, first, 0.0f);
        kernels.gather_columns(in + (first * phases + p - g.pad_w) * sW, phases * sW, last - first,
                               out + first);
        std::fill_n(out + last, Wq - last, 0.0f);
      }
    }
  });
  split.offsets.resize(C * g.kernel_h * g.kernel_w);
  for (int64_t c = 0, t = 0; c < C; ++c)
    for (int64_t r = 0; r < g.kernel_h; ++r)
      for (int64_t s = 0; s < g.kernel_w; ++s, ++t)
        split.offsets[t] =
            ((c * phases + s * g.dil_w % phases) * Hp + r * g.dil_h) * Wq + s * g.dil_w / phases;
  return split;
}

}  // namespace

bool use_row_tiles(const Geometry& g, const at::Tensor& output) {
  return g.groups == 1 && std::min(g.channels, g.out_channels) <= kRowTileMaxChannels &&
         !is_channels_last_output(output);
}

void forward_rows(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const OutputPass& pass,
                  at::Tensor& output) {
  using tiles::kRowChannels;
  const tiles::Kernels& kernels = *pass.kernels;
  const int64_t K = g.out_channels, taps = g.channels * g.kernel_h * g.kernel_w;
  const RowInput split = split_phases(kernels, g, input);

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
  const int64_t sweep = kernels.row_sweep, sweeps = (row_vectors + sweep - 1) / sweep;
  // A thread sweeps every channel block over one sweep's vectors, whose inputs (a few kernel
  // rows of every channel) stay in L1 meanwhile; the packed weights are small enough for L2.
  at::parallel_for(0, sweeps, 1, [&](int64_t begin, int64_t end) {
    const float* inputs[tiles::kMaxRowSweep];
    float* outputs[tiles::kMaxRowSweep];
    int valid[tiles::kMaxRowSweep];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * sweep;
      const int count = static_cast<int>(std::min(sweep, row_vectors - first));
      split.locate(g, first, count, out, sN, sH, inputs, outputs, valid);
      for (int64_t kb = 0; kb < blocks; ++kb) {
        const int channels =
            static_cast<int>(std::min<int64_t>(kRowChannels, K - kb * kRowChannels));
        kernels.row_tiles(count, window, inputs, outputs, valid, w + kb * taps * kRowChannels,
                          b + kb * kRowChannels, channels, pass.in_kernel());
        for (int j = 0; j < count; ++j) {
          for (int k = 0; k < channels; ++k) pass.finish(outputs[j] + k * sK, valid[j]);
          outputs[j] += kRowChannels * sK;
        }
      }
    }
  });
}

// The weight gradient of a layer with few input channels by the row tiles: grad_output's NCHW
// rows are cut into vectors as in the forward, and a tile keeps a block of 4 output channels x
// weight_taps taps in registers over a chunk of rows, so grad_output is read once per block of
// taps, not once per tap as by the per-tap GEMMs (which for C = 3 are 64 x 3 products). The
// threads split the chunks, each summing into its own copy; the copies and the lanes are added
// up in a fixed order, so the result does not depend on scheduling.
at::Tensor grad_weight_rows(const tiles::Kernels& kernels, const Geometry& g,
                            const at::Tensor& grad_output, const at::Tensor& input) {
  using tiles::kRowChannels;
  const int64_t taps_per_tile = kernels.weight_taps, lanes = kernels.lanes;
  const int64_t K = g.out_channels, taps = g.channels * g.kernel_h * g.kernel_w;
  const RowInput split = split_phases(kernels, g, input);
  const at::Tensor dy = grad_output.contiguous();
  const int64_t k_blocks = (K + kRowChannels - 1) / kRowChannels;
  const int64_t tap_blocks = (taps + taps_per_tile - 1) / taps_per_tile;
  const int64_t sum_stride = tap_blocks * taps_per_tile * lanes;  // floats between channels
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
    std::vector<int> valid(chunk_vectors);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * chunk_vectors,
                    count = std::min(chunk_vectors, row_vectors - first);
      split.locate(g, first, count, dy_data, sN, sH, inputs.data(), grads.data(), valid.data());
      for (int64_t kb = 0; kb < k_blocks; ++kb) {
        const int channels =
            static_cast<int>(std::min<int64_t>(kRowChannels, K - kb * kRowChannels));
        for (int64_t tb = 0; tb < tap_blocks; ++tb) {
          kernels.row_weight_tile(
              static_cast<int>(std::min(taps_per_tile, taps - tb * taps_per_tile)), count,
              inputs.data(), grads.data(), valid.data(), split.offsets.data() + tb * taps_per_tile,
              sK, channels, sums + kb * kRowChannels * sum_stride + tb * taps_per_tile * lanes,
              sum_stride);
        }
        for (int64_t v = 0; v < count; ++v) grads[v] += kRowChannels * sK;
      }
    }
  };
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  return sum_over_threads(chunks, {k_blocks * kRowChannels, sum_stride}, input.options(),
                          accumulate)
      .view({k_blocks * kRowChannels, tap_blocks * taps_per_tile, lanes})
      .sum(2)
      .narrow(0, 0, K)
      .narrow(1, 0, taps)
      .reshape({K, g.channels, g.kernel_h, g.kernel_w})
      .contiguous();  // the fake kernel (and autograd's callers) expect a contiguous gradient
}

}  // namespace fastdl::conv2d
