// The register-blocked direct convolution tile of the float32 CPU forward (AVX-512).
//
// Input is a zero-padded NHWC image, so a tile never tests bounds. Weights are packed once per
// call into blocks of 32 output channels laid out [kh][kw][C][32], in exactly the order the tile
// reads them. A tile computes P <= 14 output pixels (consecutive in the image, possibly across
// rows, so 7x7 maps still fill tiles) times 32 output channels: 28 zmm accumulators plus the two weight vectors of the current input channel fill
// the 32 registers, and every input value is one broadcast feeding two FMAs. Bias is the
// accumulators' initial value and the activation is applied before the single store.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/cpu_capability.h"
#include "ops/conv2d/conv2d.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include "common/cpu_isa.h"
#define FASTDL_CONV2D_TILES 1
#else
#define FASTDL_CONV2D_TILES 0
#endif

namespace fastdl::conv2d::tiles {

constexpr int64_t kChannelBlock = 32;  // output channels per packed weight block (two vectors)
constexpr int kMaxPixels = 14;         // 2 x 14 accumulators + 2 weight vectors = 30 registers

struct Window {
  const float* const* origins;  // per pixel: its window's first value in the padded NHWC input
  int64_t row_stride;    // floats between kernel rows (dilation_h * padded_width * C)
  int64_t tap_stride;    // floats between kernel columns (dilation_w * C)
  int64_t kernel_h, taps_per_row, run;  // run: contiguous floats read per tap
};

// The row tile, for few input or output channels and an NCHW output: each accumulator holds 16
// consecutive output pixels of one row and one channel, so every tap is one vector load of
// inputs feeding four FMAs (one per output channel, the weight broadcast), and the results are
// stored straight into the output's planes: no layout change at either end. With few input
// channels the direct tile's runs are only C * kw floats long and its NHWC results need a
// transpose into NCHW; this one's reduction is over all C * kh * kw taps at once. A stride becomes
// contiguous loads by splitting each padded input row into its stride_w column phases first.
constexpr int kRowChannels = 4;  // output channels per row tile
constexpr int kRowVectors = 6;   // 16-pixel vectors per row tile: 4 x 6 accumulators + 4 weights

struct RowWindow {
  const int64_t* offsets;  // per tap (c, r, s): its inputs' distance from a vector's first tap
  int64_t taps;            // C * kh * kw
  int64_t plane;           // floats between output channels
};

// Whether the tiles may run: compiled in (x86-64 with GCC or Clang) and AVX-512 in use. Every
// call of a function below except transpose() sits behind this check.
inline bool available() { return FASTDL_CONV2D_TILES && cpu::has(cpu::Capability::AVX512); }

#if FASTDL_CONV2D_TILES

#define FASTDL_TILE_FN __attribute__((target("avx512f"), always_inline)) inline

FASTDL_TILE_FN __m512 activate(Activation act, __m512 x) {
  switch (act) {
    case Activation::None: return x;
    // x86 max and min return their second operand when one is NaN: x goes second so NaN passes.
    case Activation::ReLU: return _mm512_max_ps(_mm512_setzero_ps(), x);
    case Activation::ReLU6:
      return _mm512_min_ps(_mm512_set1_ps(6.0f), _mm512_max_ps(_mm512_setzero_ps(), x));
    case Activation::SiLU: {  // x / (1 + 2^(-x log2 e)); exp2 saturates to inf, giving -0
      const __m512 e = cpu::isa::Avx512::exp2(_mm512_mul_ps(x, _mm512_set1_ps(-1.4426950408889634f)));
      return _mm512_div_ps(x, _mm512_add_ps(e, _mm512_set1_ps(1.0f)));
    }
    case Activation::GELU: {
      // 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7):
      // erf(z) = 1 - t (a1 + t (a2 + ...)) e^(-z^2), t = 1 / (1 + p |z|), made odd by the sign.
      const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.7071067811865476f));
      const __m512 az = _mm512_abs_ps(z);
      const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                     _mm512_fmadd_ps(az, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
      __m512 poly = _mm512_set1_ps(1.061405429f);
      poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
      poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
      poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
      poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
      const __m512 gauss =
          cpu::isa::Avx512::exp2(_mm512_mul_ps(_mm512_mul_ps(az, az), _mm512_set1_ps(-1.4426950408889634f)));
      const __m512 erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(poly, t), gauss, _mm512_set1_ps(1.0f));
      const __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
      const __m512 erf = _mm512_mask_sub_ps(erf_abs, negative, _mm512_setzero_ps(), erf_abs);
      return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(erf, _mm512_set1_ps(1.0f)));
    }
  }
  return x;
}

// outs[p][j] = act(bias[j] + sum over taps and channels) for p < P, j < 32.
template <int P>
FASTDL_TILE_FN void direct_tile(const Window& w, const float* weight, const float* bias,
                                Activation act, float* const* outs) {
  __m512 acc0[P], acc1[P];
  const __m512 b0 = _mm512_loadu_ps(bias), b1 = _mm512_loadu_ps(bias + 16);
#pragma GCC unroll 14
  for (int p = 0; p < P; ++p) {
    acc0[p] = b0;
    acc1[p] = b1;
  }
  for (int64_t r = 0; r < w.kernel_h; ++r) {
    for (int64_t s = 0; s < w.taps_per_row; ++s) {
      const int64_t shift = r * w.row_stride + s * w.tap_stride;
      for (int64_t c = 0; c < w.run; ++c, weight += kChannelBlock) {
        const __m512 w0 = _mm512_loadu_ps(weight), w1 = _mm512_loadu_ps(weight + 16);
#pragma GCC unroll 14
        for (int p = 0; p < P; ++p) {
          const __m512 xv = _mm512_set1_ps(w.origins[p][shift + c]);
          acc0[p] = _mm512_fmadd_ps(xv, w0, acc0[p]);
          acc1[p] = _mm512_fmadd_ps(xv, w1, acc1[p]);
        }
      }
    }
  }
#pragma GCC unroll 14
  for (int p = 0; p < P; ++p) {
    _mm512_storeu_ps(outs[p], activate(act, acc0[p]));
    _mm512_storeu_ps(outs[p] + 16, activate(act, acc1[p]));
  }
}

// direct_tile<pixels> for a run-time pixel count in 1..kMaxPixels.
template <int P = kMaxPixels>
__attribute__((target("avx512f"))) void run_tile(int pixels, const Window& w, const float* weight,
                                                 const float* bias, Activation act,
                                                 float* const* outs) {
  if (pixels == P) {
    direct_tile<P>(w, weight, bias, act, outs);
  } else if constexpr (P > 1) {
    run_tile<P - 1>(pixels, w, weight, bias, act, outs);
  }
}

// acc[k] += x * scale[k] for the row tiles' four output channels: one vector of 16 pixels' inputs
// against four broadcast weights (forward) or four channels' gradients (weight gradient).
FASTDL_TILE_FN void multiply_add_channels(__m512 x, const __m512 (&scale)[kRowChannels],
                                          __m512 (&acc)[kRowChannels]) {
#pragma GCC unroll 4
  for (int k = 0; k < kRowChannels; ++k) acc[k] = _mm512_fmadd_ps(x, scale[k], acc[k]);
}

// out = act(bias + sum over taps of weight * input) for `channels` (<= 4) output channels and
// J vectors: vector j reads 16 inputs at inputs[j] + offsets[tap] and writes the lanes of
// masks[j] at outputs[j] + k * plane. Weights are packed [tap][4].
template <int J>
FASTDL_TILE_FN void row_tile(const RowWindow& w, const float* const* inputs, float* const* outputs,
                             const uint16_t* masks, const float* weight, const float* bias,
                             int channels, Activation act) {
  __m512 acc[J][kRowChannels];
#pragma GCC unroll 6
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 4
    for (int k = 0; k < kRowChannels; ++k) acc[j][k] = _mm512_set1_ps(bias[k]);
  for (int64_t t = 0; t < w.taps; ++t, weight += kRowChannels) {
    const int64_t offset = w.offsets[t];
    const __m512 scale[kRowChannels] = {_mm512_set1_ps(weight[0]), _mm512_set1_ps(weight[1]),
                                        _mm512_set1_ps(weight[2]), _mm512_set1_ps(weight[3])};
#pragma GCC unroll 6
    for (int j = 0; j < J; ++j) multiply_add_channels(_mm512_loadu_ps(inputs[j] + offset), scale, acc[j]);
  }
#pragma GCC unroll 4
  for (int k = 0; k < kRowChannels; ++k) {
    if (k >= channels) break;
#pragma GCC unroll 6
    for (int j = 0; j < J; ++j)
      _mm512_mask_storeu_ps(outputs[j] + k * w.plane, masks[j], activate(act, acc[j][k]));
  }
}

// row_tile<vectors> for a run-time vector count in 1..kRowVectors.
template <int J = kRowVectors>
__attribute__((target("avx512f"))) void run_row_tile(int vectors, const RowWindow& w,
                                                     const float* const* inputs, float* const* outputs,
                                                     const uint16_t* masks, const float* weight,
                                                     const float* bias, int channels, Activation act) {
  if (vectors == J) {
    row_tile<J>(w, inputs, outputs, masks, weight, bias, channels, act);
  } else if constexpr (J > 1) {
    run_row_tile<J - 1>(vectors, w, inputs, outputs, masks, weight, bias, channels, act);
  }
}

// transpose() with AVX-512: 16 x 16 blocks at a time in registers (three rounds of in-lane
// shuffles: 32-bit pairs, 64-bit pairs, then 128-bit lanes), masked at the edges, so every load
// and store is a contiguous vector instead of a scalar at a plane's distance.
__attribute__((target("avx512f"))) inline void transpose_avx512(const float* src, int64_t rows,
                                                                int64_t cols, int64_t src_ld,
                                                                float* dst, int64_t dst_ld) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, rows - r0);
    const __mmask16 row_mask = static_cast<__mmask16>((1u << nr) - 1u);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, cols - c0);
      const __mmask16 col_mask = static_cast<__mmask16>((1u << nc) - 1u);
      __m512 r[16], t[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < nr ? _mm512_maskz_loadu_ps(col_mask, src + (r0 + i) * src_ld + c0) : _mm512_setzero_ps();
      for (int i = 0; i < 16; i += 2) {  // lane l of t[i], t[i+1]: rows i, i+1 of columns 4l..4l+3
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 16; i += 4) {  // lane l of r[i + j]: rows i..i+3 of column 4l + j
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
      }
      for (int j = 0; j < 4; ++j) {  // column 4l + j gathers lane l of r[j], r[4 + j], r[8 + j], r[12 + j]
        const __m512 low01 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44);
        const __m512 high01 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
        const __m512 low23 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
        const __m512 high23 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
        t[j] = _mm512_shuffle_f32x4(low01, low23, 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(low01, low23, 0xDD);
        t[8 + j] = _mm512_shuffle_f32x4(high01, high23, 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(high01, high23, 0xDD);
      }
      for (int c = 0; c < nc; ++c) _mm512_mask_storeu_ps(dst + (c0 + c) * dst_ld + r0, row_mask, t[c]);
    }
  }
}

// The row tile of the weight gradient, for T <= 6 taps and 4 output channels: for each row vector
// v < vectors, grad(k) = the 16 values at grads[v] + k * channel_stride under masks[v] (zero past
// the row's end, and for k >= channels) and input(t) = the 16 at inputs[v] + offsets[t], and
// sums[k * sum_stride + t * 16 + lane] += sum over v of grad(k) * input(t). The 24 accumulators
// stay in registers over the whole run of vectors; the caller adds up the lanes.
template <int T>
FASTDL_TILE_FN void row_weight_tile(int64_t vectors, const float* const* inputs,
                                    const float* const* grads, const uint16_t* masks,
                                    const int64_t* offsets, int64_t channel_stride, int channels,
                                    float* sums, int64_t sum_stride) {
  __m512 acc[T][kRowChannels];
#pragma GCC unroll 6
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int k = 0; k < kRowChannels; ++k) acc[t][k] = _mm512_setzero_ps();
  const __mmask16 present[kRowChannels] = {
      static_cast<__mmask16>(channels > 0 ? 0xFFFF : 0), static_cast<__mmask16>(channels > 1 ? 0xFFFF : 0),
      static_cast<__mmask16>(channels > 2 ? 0xFFFF : 0), static_cast<__mmask16>(channels > 3 ? 0xFFFF : 0)};
  for (int64_t v = 0; v < vectors; ++v) {
    const float* dy = grads[v];
    const __mmask16 m = masks[v];
    const __m512 grad[kRowChannels] = {
        _mm512_maskz_loadu_ps(m & present[0], dy), _mm512_maskz_loadu_ps(m & present[1], dy + channel_stride),
        _mm512_maskz_loadu_ps(m & present[2], dy + 2 * channel_stride),
        _mm512_maskz_loadu_ps(m & present[3], dy + 3 * channel_stride)};
#pragma GCC unroll 6
    for (int t = 0; t < T; ++t) multiply_add_channels(_mm512_loadu_ps(inputs[v] + offsets[t]), grad, acc[t]);
  }
#pragma GCC unroll 4
  for (int k = 0; k < kRowChannels; ++k) {
#pragma GCC unroll 6
    for (int t = 0; t < T; ++t) {
      float* sum = sums + k * sum_stride + t * 16;
      _mm512_storeu_ps(sum, _mm512_add_ps(_mm512_loadu_ps(sum), acc[t][k]));
    }
  }
}

// row_weight_tile<taps> for a run-time tap count in 1..kRowVectors.
template <int T = kRowVectors>
__attribute__((target("avx512f"))) void run_row_weight_tile(int taps, int64_t vectors,
                                                            const float* const* inputs,
                                                            const float* const* grads,
                                                            const uint16_t* masks,
                                                            const int64_t* offsets,
                                                            int64_t channel_stride, int channels,
                                                            float* sums, int64_t sum_stride) {
  if (taps == T) {
    row_weight_tile<T>(vectors, inputs, grads, masks, offsets, channel_stride, channels, sums, sum_stride);
  } else if constexpr (T > 1) {
    run_row_weight_tile<T - 1>(taps, vectors, inputs, grads, masks, offsets, channel_stride,
                               channels, sums, sum_stride);
  }
}

// dst[i] = src[i * step] for i < n: one column phase of an input row for the row tiles. Step 2
// (the strided first layers) picks the even lanes of two loads with one permute; reads stay
// within src[0 .. (n - 1) * step].
__attribute__((target("avx512f"))) inline void gather_columns(const float* src, int64_t step,
                                                              int64_t n, float* dst) {
  int64_t i = 0;
  if (step == 1) {
    std::copy_n(src, n, dst);
    return;
  }
  if (step == 2) {
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (; i + 16 <= n; i += 16) {
      const __m512 low = _mm512_loadu_ps(src + 2 * i);
      const __m512 high = _mm512_maskz_loadu_ps(0x7FFF, src + 2 * i + 16);  // its last lane is odd
      _mm512_storeu_ps(dst + i, _mm512_permutex2var_ps(low, evens, high));
    }
  }
  for (; i < n; ++i) dst[i] = src[i * step];
}

// out[i] = act(out[i] + residual[i]) for i < count, the tail masked: the residual epilogue, run on
// a stretch of output a kernel has just stored (conv + bias), while it is still in cache.
__attribute__((target("avx512f"))) inline void add_residual_avx512(float* out, const float* residual,
                                                                   int64_t count, Activation act) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16)
    _mm512_storeu_ps(out + i, activate(act, _mm512_add_ps(_mm512_loadu_ps(out + i), _mm512_loadu_ps(residual + i))));
  if (i < count) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (count - i)) - 1u);
    const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(tail, out + i), _mm512_maskz_loadu_ps(tail, residual + i));
    _mm512_mask_storeu_ps(out + i, tail, activate(act, sum));
  }
}

#undef FASTDL_TILE_FN

#else

// Never called: available() is false where the tiles are not compiled.
[[noreturn]] inline void not_compiled() { TORCH_INTERNAL_ASSERT(false, "conv2d: the CPU tiles are not compiled in"); }
inline void run_tile(int, const Window&, const float*, const float*, Activation, float* const*) { not_compiled(); }
inline void run_row_tile(int, const RowWindow&, const float* const*, float* const*, const uint16_t*,
                         const float*, const float*, int, Activation) {
  not_compiled();
}
inline void transpose_avx512(const float*, int64_t, int64_t, int64_t, float*, int64_t) { not_compiled(); }
inline void add_residual_avx512(float*, const float*, int64_t, Activation) { not_compiled(); }
inline void gather_columns(const float*, int64_t, int64_t, float*) { not_compiled(); }
inline void run_row_weight_tile(int, int64_t, const float* const*, const float* const*,
                                const uint16_t*, const int64_t*, int64_t, int, float*, int64_t) {
  not_compiled();
}

#endif

// dst[c * dst_ld + r] = src[r * src_ld + c] for r < rows, c < cols: the NCHW <-> NHWC layout
// change at either end of the kernels, which the portable paths need too.
inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t src_ld, float* dst,
                      int64_t dst_ld) {
  if (available()) {
    transpose_avx512(src, rows, cols, src_ld, dst, dst_ld);
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * dst_ld + r] = src[r * src_ld + c];
}

}  // namespace fastdl::conv2d::tiles
