// The Winograd F(2x2, 3x3) float32 forward: the transforms of tiles.h around 16 BLAS products
// per block of tiles.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "common/checks.h"
#include "common/cpu_blas.h"
#include "common/cpu_scratch.h"
#include "ops/conv2d/cpu/conv2d_cpu.h"

namespace fastdl::conv2d {

using cpu::TransposeType;

bool use_winograd(const Geometry& g) {
  // The transforms cost memory traffic that pays off with enough channels on both sides and
  // enough tiles.
  const int64_t tiles = g.batch * ((g.out_h + 1) / 2) * ((g.out_w + 1) / 2);
  return g.kernel_h == 3 && g.kernel_w == 3 && g.stride_h == 1 && g.stride_w == 1 && g.dil_h == 1 &&
         g.dil_w == 1 && g.groups == 1 && g.channels >= 32 && g.out_channels >= 32 && tiles >= 64;
}

// A caller-supplied U (prepacked for inference) must be float32 [16, C, K] on the weight's
// device, for a 3x3 convolution with one group; it is used only where the kernel picks Winograd.
void check_winograd_weight(const Geometry& g, const at::Tensor& weight, const at::Tensor& u) {
  TORCH_CHECK(g.kernel_h == 3 && g.kernel_w == 3 && g.groups == 1,
              "conv2d: winograd_weight is only for 3x3 convolutions with groups=1, got weight of "
              "shape ",
              sizes_str(weight), " and groups=", g.groups);
  TORCH_CHECK(u.dim() == 3 && u.size(0) == tiles::kWinogradPoints && u.size(1) == g.channels &&
                  u.size(2) == g.out_channels,
              "conv2d: expected winograd_weight to be a Tensor[16, ", g.channels, ", ",
              g.out_channels, "] (conv2d_winograd_weight of the weight), got shape ", sizes_str(u));
  TORCH_CHECK(u.scalar_type() == at::kFloat, "conv2d: winograd_weight must be float32, got ",
              u.scalar_type());
  check_same_device("conv2d", "weight", weight, "winograd_weight", u);
}

// U[e][c][k] = (G f G^T)[e] for the 3x3 filter f = weight[k][c], 16 output channels per task.
at::Tensor transform_weight(const tiles::Kernels& kernels, const Geometry& g,
                            const at::Tensor& weight) {
  const int64_t C = g.channels, K = g.out_channels;
  at::Tensor u_tensor =
      cpu::workspace(kWinogradWeights, {tiles::kWinogradPoints, C, K}, weight.options());
  float* u = u_tensor.data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  // Stream U past the cache when it outgrows it (8 MB: 512 x 256 channels and up).
  const bool stream =
      K % 16 == 0 && tiles::kWinogradPoints * C * K * sizeof(float) >= (size_t(8) << 20);
  constexpr int64_t kBlock = 16;
  at::parallel_for(0, (K + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k0 = begin * kBlock; k0 < std::min(K, end * kBlock); k0 += kBlock)
      kernels.winograd_weight_block(w, C, K, k0, std::min(kBlock, K - k0), u, stream);
  });
  return u_tensor;
}

void forward_winograd(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& prepacked,
                      const std::optional<at::Tensor>& bias, const OutputPass& pass,
                      at::Tensor& output) {
  const tiles::Kernels& kernels = *pass.kernels;
  const int64_t C = g.channels, K = g.out_channels;
  const int64_t tiles_h = (g.out_h + 1) / 2, tiles_w = (g.out_w + 1) / 2;
  // Odd output sizes: the last tile row/column reads zeros past the padded image.
  const int64_t Hp = std::max(g.height + 2 * g.pad_h, 2 * tiles_h + 2);
  const int64_t Wp = std::max(g.width + 2 * g.pad_w, 2 * tiles_w + 2);
  const at::Tensor padded = padded_nhwc(&kernels, g, input, Hp, Wp, /*in_scratch=*/true);
  const at::Tensor u =
      prepacked ? prepacked->contiguous() : transform_weight(kernels, g, weight.contiguous());
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
      kernels.winograd_input_tile(rows, C, C, v + (row_offset + tw) * C, tiles * C);
    }
  };
  const auto multiply = [&](const float* v, float* m, int64_t tiles, int64_t first_point,
                            int64_t end_point) {
    for (int64_t e = first_point; e < end_point; ++e) {
      cpu::gemm_row_major(TransposeType::NoTranspose, TransposeType::NoTranspose, tiles, K, C, 1.0f,
                          v + e * tiles * C, C, up + e * C * K, K, 0.0f, m + e * tiles * K, K);
    }
  };
  // Output tiles are assembled NHWC in `staged` (2 rows), then copied or transposed into place.
  const auto write_row = [&](int64_t row, const float* m, int64_t row_offset, int64_t tiles,
                             float* staged) {
    for (int64_t tw = 0; tw < tiles_w; ++tw) {
      float* const targets[2][2] = {
          {staged + 2 * tw * K, staged + (2 * tw + 1) * K},
          {staged + staged_row + 2 * tw * K, staged + staged_row + (2 * tw + 1) * K}};
      kernels.winograd_output_tile(m + (row_offset + tw) * K, tiles * K, K, b, pass.in_kernel(),
                                   targets);
    }
    const int64_t n = row / tiles_h, oh = 2 * (row % tiles_h);
    for (int64_t i = 0; i < std::min<int64_t>(2, g.out_h - oh); ++i) {
      float* target = out + n * sN + (oh + i) * sH;
      if (channels_last) {
        std::memcpy(target, staged + i * staged_row, g.out_w * K * sizeof(float));
        pass.finish(target, g.out_w * K);
      } else {
        kernels.transpose(staged + i * staged_row, g.out_w, K, K, target, sK);
        for (int64_t k = 0; k < K; ++k) pass.finish(target + k * sK, g.out_w);
      }
    }
  };

  if (C * K > tiles_total * (C + K)) {
    // Few tiles, wide layer (512 channels at 7x7): U outweighs V and M. Each step runs over all
    // tiles, and the threads split the products by point, so each reads only its share of U.
    const at::Tensor v_tensor =
        cpu::workspace(kTransformed, {tiles::kWinogradPoints * tiles_total * C}, output.options());
    const at::Tensor m_tensor =
        cpu::workspace(kProducts, {tiles::kWinogradPoints * tiles_total * K}, output.options());
    float* v = v_tensor.data_ptr<float>();
    float* m = m_tensor.data_ptr<float>();
    at::parallel_for(0, tile_rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) transform_row(row, v, row * tiles_w, tiles_total);
    });
    at::parallel_for(0, tiles::kWinogradPoints, 1, [&](int64_t begin, int64_t end) {
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
  const int64_t rows_per_chunk =
      std::max<int64_t>(1, std::min<int64_t>(256, 32768 / std::max(C, K)) / tiles_w);
  const int64_t grain = std::clamp<int64_t>(tile_rows / at::get_num_threads(), 1, rows_per_chunk);
  at::parallel_for(0, tile_rows, grain, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    const int64_t max_tiles = rows_per_chunk * tiles_w;
    const at::Tensor v_tensor =
        cpu::workspace(kTransformed, {tiles::kWinogradPoints * max_tiles * C}, output.options());
    const at::Tensor m_tensor =
        cpu::workspace(kProducts, {tiles::kWinogradPoints * max_tiles * K}, output.options());
    const at::Tensor staged_tensor = cpu::workspace(kStaged, {2 * staged_row}, output.options());
    float* v = v_tensor.data_ptr<float>();
    float* m = m_tensor.data_ptr<float>();
    float* staged = staged_tensor.data_ptr<float>();
    for (int64_t first_row = begin; first_row < end; first_row += rows_per_chunk) {
      const int64_t rows = std::min(rows_per_chunk, end - first_row), tiles = rows * tiles_w;
      for (int64_t r = 0; r < rows; ++r) transform_row(first_row + r, v, r * tiles_w, tiles);
      multiply(v, m, tiles, 0, tiles::kWinogradPoints);
      for (int64_t r = 0; r < rows; ++r) write_row(first_row + r, m, r * tiles_w, tiles, staged);
    }
  });
}

}  // namespace fastdl::conv2d
