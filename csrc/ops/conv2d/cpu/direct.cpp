// The direct float32 forward: register-blocked tiles (tiles.h) over a zero-padded NHWC copy of
// the input and weights packed into blocks of output channels, stored straight into the output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "ops/conv2d/cpu/conv2d_cpu.h"

namespace fastdl::conv2d {
namespace {

// packed[kb][r][s][c][j] = weight[kb * block + j][c][r][s], zero for channels past K: the order
// in which a tile reads them (block: the tiles' channel block). Written sequentially in one pass;
// the `block` source rows it reads at a time stay in cache.
at::Tensor pack_weight(const Geometry& g, const at::Tensor& weight, int64_t block) {
  const int64_t C = g.channels, taps = g.kernel_h * g.kernel_w, K = g.out_channels;
  const int64_t blocks = (K + block - 1) / block;
  at::Tensor packed = at::empty({blocks, taps, C, block}, weight.options());
  const float* w = weight.const_data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, blocks * taps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kb = item / taps, tap = item % taps;
      float* out = dst + item * C * block;
      for (int64_t c = 0; c < C; ++c, out += block) {
        for (int64_t j = 0; j < block; ++j) {
          const int64_t k = kb * block + j;
          out[j] = k < K ? w[(k * C + c) * taps + tap] : 0.0f;
        }
      }
    }
  });
  return packed;
}

}  // namespace

void forward_direct(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const OutputPass& pass,
                    at::Tensor& output) {
  const tiles::Kernels& kernels = *pass.kernels;
  const int64_t block = kernels.channel_block, tile_pixels = kernels.pixels;
  const int64_t C = g.channels;
  // A channels-last input without padding already is the NHWC image the tiles read, at its own
  // strides (a strided 1x1 convolution's subsampled view included): no copy.
  const bool in_place = input.stride(1) == 1 && g.pad_h == 0 && g.pad_w == 0;
  const at::Tensor padded =  // logically NCHW either way
      in_place ? input
               : padded_nhwc(&kernels, g, input, g.height + 2 * g.pad_h, g.width + 2 * g.pad_w,
                             /*in_scratch=*/true)
                     .permute({0, 3, 1, 2});
  const int64_t image_step = padded.stride(0), row_step = padded.stride(2),
                pixel_step = padded.stride(3);

  const int64_t blocks = (g.out_channels + block - 1) / block;
  const at::Tensor packed = pack_weight(g, weight.contiguous(), block);
  const at::Tensor bias_padded =
      padded_bias(bias, g.out_channels, blocks * block, weight.options());

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
  const int64_t block_size = g.kernel_h * g.kernel_w * C * block;
  const int64_t sN = output.stride(0), sK = output.stride(1), sH = output.stride(2),
                sW = output.stride(3);
  const bool channels_last = is_channels_last_output(output);
  const int64_t P = g.pixels(), tiles_per_image = (P + tile_pixels - 1) / tile_pixels;
  // A thread takes runs of tiles_per_chunk tiles (up to kChunkPixels pixels) and sweeps every
  // weight block over a run, so a block (kh * kw * C * block floats) is read once per
  // run, not once per tile, and the run's input windows stay in cache across blocks.
  constexpr int64_t kChunkPixels = 32 * tiles::kMaxPixels;
  const int64_t tiles_per_chunk = kChunkPixels / tile_pixels;
  const int64_t tiles_total = g.batch * tiles_per_image;
  // Fewer tiles than threads x chunk (small maps): smaller runs, so every thread has work.
  const int64_t grain =
      std::clamp<int64_t>(tiles_total / at::get_num_threads(), 1, tiles_per_chunk);
  at::parallel_for(0, tiles_total, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float result[tiles::kMaxPixels * tiles::kMaxChannelBlock];
    float* pixel_results[tiles::kMaxPixels];
    for (int p = 0; p < tile_pixels; ++p) pixel_results[p] = result + p * block;
    float* pixel_outputs[tiles::kMaxPixels];
    // Per pixel of the run: its window's origin and its output offset (channels-last), found
    // once per run, not once per block; pixels step along rows, so no division per pixel.
    const float* origins[kChunkPixels];
    int64_t offsets[kChunkPixels];
    tiles::Window win = window;
    for (int64_t chunk = begin; chunk < end; chunk += tiles_per_chunk) {
      const int64_t chunk_end = std::min(end, chunk + tiles_per_chunk);
      for (int64_t t = chunk; t < chunk_end; ++t) {
        const int64_t n = t / tiles_per_image, first = (t % tiles_per_image) * tile_pixels;
        int64_t oh = first / g.out_w, ow = first % g.out_w;
        for (int64_t i = (t - chunk) * tile_pixels, p = first; p < std::min(P, first + tile_pixels);
             ++i, ++p) {
          origins[i] =
              x + n * image_step + oh * g.stride_h * row_step + ow * g.stride_w * pixel_step;
          offsets[i] = n * sN + oh * sH + ow * sW;
          if (++ow == g.out_w) ow = 0, ++oh;
        }
      }
      for (int64_t kb = 0; kb < blocks; ++kb) {
        const int64_t valid = std::min(block, g.out_channels - kb * block);
        for (int64_t t = chunk; t < chunk_end; ++t) {
          const int64_t first = (t % tiles_per_image) * tile_pixels;
          const int pixels = static_cast<int>(std::min<int64_t>(tile_pixels, P - first));
          const int64_t i0 = (t - chunk) * tile_pixels;
          win.origins = origins + i0;
          float* target = out + kb * block * sK;
          if (channels_last) {
            for (int p = 0; p < pixels; ++p) pass.prefetch(target + offsets[i0 + p], valid);
          } else {
            for (int64_t k = 0; k < valid; ++k)
              pass.prefetch(target + offsets[i0] + k * sK, pixels);
          }
          if (channels_last && valid == block) {  // straight into each pixel's channels
            for (int p = 0; p < pixels; ++p) pixel_outputs[p] = target + offsets[i0 + p];
            kernels.direct_tile(pixels, win, w + kb * block_size, b + kb * block, act,
                                pixel_outputs);
            for (int p = 0; p < pixels; ++p) pass.finish(pixel_outputs[p], block);
            continue;
          }
          kernels.direct_tile(pixels, win, w + kb * block_size, b + kb * block, act, pixel_results);
          if (channels_last) {  // a partial block: each pixel's first `valid` channels
            for (int p = 0; p < pixels; ++p) {
              std::memcpy(target + offsets[i0 + p], result + p * block, valid * sizeof(float));
              pass.finish(target + offsets[i0 + p], valid);
            }
          } else {  // NCHW: the tile's pixels are one contiguous run of each channel's plane
            kernels.transpose(result, pixels, valid, block, target + offsets[i0], sK);
            for (int64_t k = 0; k < valid; ++k) pass.finish(target + offsets[i0] + k * sK, pixels);
          }
        }
      }
    }
  });
}

}  // namespace fastdl::conv2d
