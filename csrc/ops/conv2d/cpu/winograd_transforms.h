// Winograd F(2x2, 3x3) transforms for the float32 CPU forward of 3x3 stride-1 convolutions
// (AVX-512; vectors run along channels of NHWC data).
//
// A 2x2 output tile needs a 4x4 input tile d; with U = G g G^T (per output/input channel pair)
// and V = B^T d B (per tile and input channel), the 16 products M[e] = sum_c V[e][c] U[e][c][k]
// are 16 independent GEMMs, and the tile is Y = A^T M A. That is 16 multiplies per 4 outputs
// instead of 36: 2.25x fewer FMAs than a direct convolution. F(2x2, 3x3)'s transforms only add,
// subtract and halve, so float32 results stay as accurate as the direct form's (larger tiles
// such as F(4x4, 3x3) lose digits).
#pragma once

#include <cstdint>

#include "ops/conv2d/conv2d.h"
#include "ops/conv2d/cpu/tiles.h"

namespace fastdl::conv2d::winograd {

constexpr int kPoints = 16;  // the 4x4 transform domain

#if FASTDL_CONV2D_TILES

#define FASTDL_WINO_FN __attribute__((target("avx512f"))) inline

inline __mmask16 lanes(int64_t remaining) {
  return remaining >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << remaining) - 1u);
}

// (G v)[0..3] for a filter row or column v = (a, b, c), G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1].
FASTDL_WINO_FN void apply_g(__m512 a, __m512 b, __m512 c, __m512 out[4]) {
  const __m512 half = _mm512_set1_ps(0.5f);
  out[0] = a;
  out[1] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(a, b), c));
  out[2] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(a, b), c));
  out[3] = c;
}

// Lane l of U = G f G^T for `count` <= 16 3x3 filters f = filters + l * filter_stride, written
// to out + e * point_stride + l for each point e; `stream`: whole 64-byte-aligned lines go
// straight to memory (non-temporal stores).
FASTDL_WINO_FN void weight_tile(const float* filters, int64_t filter_stride, int64_t count,
                                float* out, int64_t point_stride, bool stream) {
  alignas(64) float taps[9][16];
  tiles::transpose(filters, count, 9, filter_stride, &taps[0][0], 16);  // taps[j][l]: vectors over filters
  __m512 columns[3][4], point[4];
  for (int j = 0; j < 3; ++j)
    apply_g(_mm512_load_ps(taps[j]), _mm512_load_ps(taps[3 + j]), _mm512_load_ps(taps[6 + j]), columns[j]);
  const __mmask16 m = lanes(count);
  for (int i = 0; i < 4; ++i) {
    apply_g(columns[0][i], columns[1][i], columns[2][i], point);
    for (int j = 0; j < 4; ++j) {
      float* o = out + (4 * i + j) * point_stride;
      if (stream && count == 16) {
        _mm512_stream_ps(o, point[j]);
      } else {
        _mm512_mask_storeu_ps(o, m, point[j]);
      }
    }
  }
}

// U[e][c][k] for k in [k0, k0 + count), every c, from weights [K][C][3][3], as vectors along k,
// so every store is a whole line of U. With `stream` (U is 64-byte aligned and K a multiple of
// 16) the lines bypass the cache: a U too large to stay there until the products read it then
// skips the read-for-ownership of every line, a quarter of the transform's time at 512 channels.
FASTDL_WINO_FN void weight_block(const float* weight, int64_t C, int64_t K, int64_t k0,
                                 int64_t count, float* u, bool stream) {
  for (int64_t c = 0; c < C; ++c)
    weight_tile(weight + (k0 * C + c) * 9, C * 9, count, u + c * K + k0, C * K, stream);
  if (stream) _mm_sfence();  // the streamed lines are visible before the products read U
}

// v[i][j] = (B^T d B)[i][j] for d[i][j] = rows[i][j * pixel + c], c in [c0, c0 + 16).
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]. Writes v[e] to out + e * point_stride.
FASTDL_WINO_FN void input_tile(const float* const rows[4], int64_t pixel, int64_t channels,
                               float* out, int64_t point_stride) {
  for (int64_t c = 0; c < channels; c += 16) {
    const __mmask16 m = lanes(channels - c);
    __m512 t[4][4];
    for (int j = 0; j < 4; ++j) {
      const __m512 d0 = _mm512_maskz_loadu_ps(m, rows[0] + j * pixel + c);
      const __m512 d1 = _mm512_maskz_loadu_ps(m, rows[1] + j * pixel + c);
      const __m512 d2 = _mm512_maskz_loadu_ps(m, rows[2] + j * pixel + c);
      const __m512 d3 = _mm512_maskz_loadu_ps(m, rows[3] + j * pixel + c);
      t[0][j] = _mm512_sub_ps(d0, d2);
      t[1][j] = _mm512_add_ps(d1, d2);
      t[2][j] = _mm512_sub_ps(d2, d1);
      t[3][j] = _mm512_sub_ps(d1, d3);
    }
    for (int i = 0; i < 4; ++i) {
      float* o = out + (4 * i) * point_stride + c;
      _mm512_mask_storeu_ps(o, m, _mm512_sub_ps(t[i][0], t[i][2]));
      _mm512_mask_storeu_ps(o + point_stride, m, _mm512_add_ps(t[i][1], t[i][2]));
      _mm512_mask_storeu_ps(o + 2 * point_stride, m, _mm512_sub_ps(t[i][2], t[i][1]));
      _mm512_mask_storeu_ps(o + 3 * point_stride, m, _mm512_sub_ps(t[i][1], t[i][3]));
    }
  }
}

// y = act(A^T M A + bias) for the 16 points m[e] = in[e * point_stride + k], k in [k0, k0 + 16),
// A^T = [1 1 1 0; 0 1 -1 -1]; y[i][j] goes to out[i][j] + k.
FASTDL_WINO_FN void output_tile(const float* in, int64_t point_stride, int64_t channels,
                                const float* bias, Activation act, float* const out[2][2]) {
  for (int64_t k = 0; k < channels; k += 16) {
    const __mmask16 msk = lanes(channels - k);
    __m512 t[2][4];
    for (int j = 0; j < 4; ++j) {
      const __m512 m0 = _mm512_maskz_loadu_ps(msk, in + j * point_stride + k);
      const __m512 m1 = _mm512_maskz_loadu_ps(msk, in + (4 + j) * point_stride + k);
      const __m512 m2 = _mm512_maskz_loadu_ps(msk, in + (8 + j) * point_stride + k);
      const __m512 m3 = _mm512_maskz_loadu_ps(msk, in + (12 + j) * point_stride + k);
      t[0][j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
      t[1][j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
    }
    const __m512 b = _mm512_maskz_loadu_ps(msk, bias + k);
    for (int i = 0; i < 2; ++i) {
      const __m512 y0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(t[i][0], t[i][1]), t[i][2]), b);
      const __m512 y1 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(t[i][1], t[i][2]), t[i][3]), b);
      _mm512_mask_storeu_ps(out[i][0] + k, msk, tiles::activate(act, y0));
      _mm512_mask_storeu_ps(out[i][1] + k, msk, tiles::activate(act, y1));
    }
  }
}

#undef FASTDL_WINO_FN

#else

// Never called: tiles::available() is false where the transforms are not compiled.
inline void weight_block(const float*, int64_t, int64_t, int64_t, int64_t, float*, bool) { tiles::not_compiled(); }
inline void input_tile(const float* const*, int64_t, int64_t, float*, int64_t) { tiles::not_compiled(); }
inline void output_tile(const float*, int64_t, int64_t, const float*, Activation, float* const (*)[2]) {
  tiles::not_compiled();
}

#endif

}  // namespace fastdl::conv2d::winograd
