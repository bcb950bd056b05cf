// The register-blocked tiles and transforms of conv2d's float32 CPU kernels: one template over
// the instruction-set traits of common/cpu_isa.h, compiled for AVX-512 and for AVX2 + FMA.
//
// Direct tile: input is a zero-padded NHWC image, so a tile never tests bounds. Weights are
// packed once per call into blocks of kChannelBlock = 2 vectors of output channels laid out
// [kh][kw][C][block], in exactly the order the tile reads them. A tile computes kPixels output
// pixels (consecutive in the image, possibly across rows, so 7x7 maps still fill tiles) times the
// block: every input value is one broadcast feeding two FMAs. Bias is the accumulators' initial
// value and the activation is applied before the single store.
//
// Row tile, for few input or output channels and an NCHW output: each accumulator holds one
// vector of consecutive output pixels of one row and one channel, so every tap is one vector load
// of inputs feeding four FMAs (one per output channel, the weight broadcast), and the results are
// stored straight into the output's planes: no layout change at either end. With few input
// channels the direct tile's runs are only C * kw floats long and its NHWC results need a
// transpose into NCHW; this one's reduction is over all C * kh * kw taps at once. A stride becomes
// contiguous loads by splitting each padded input row into its stride_w column phases first.
//
// Tile shapes, from the register file (accumulators + the loads of one step + one broadcast):
//   AVX-512 (32 zmm): direct 14 pixels x 32 channels (28 + 2); row 4 channels x 6 vectors
//                     (24 + 4 broadcast weights); weight-gradient row tile 6 taps x 4 channels.
//   AVX2 (16 ymm):    direct 6 pixels x 16 channels (12 + 2 + 1); row 4 channels x 2 vectors
//                     (8 + 4 + 1); weight-gradient row tile 2 taps x 4 channels (8 + 4 + 1).
// A row_tiles call sweeps kRowSweep vectors (96 pixels with either set) in register tiles, so
// its setup is paid once per 96 pixels.
//
// Winograd F(2x2, 3x3) for 3x3 stride-1 layers: a 2x2 output tile needs a 4x4 input tile d;
// with U = G g G^T (per output/input channel pair) and V = B^T d B (per tile and input channel),
// the 16 products M[e] = sum_c V[e][c] U[e][c][k] are 16 independent GEMMs, and the tile is
// Y = A^T M A. That is 16 multiplies per 4 outputs instead of 36: 2.25x fewer FMAs than a direct
// convolution. F(2x2, 3x3)'s transforms only add, subtract and halve, so float32 results stay as
// accurate as the direct form's (larger tiles such as F(4x4, 3x3) lose digits). The transforms
// below run vectors along the channels of NHWC data.
//
// Callers take the functions from select(), which gives the best set the active CPU capability
// allows, or none (then the BLAS paths).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cpu_capability.h"
#include "common/cpu_isa.h"
#include "ops/conv2d/conv2d.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors stay inside the entry points (cpu_isa.h)
#endif

namespace fastdl::conv2d::tiles {

// Bounds over both sets, for the callers' stack buffers.
constexpr int kMaxPixels = 14;            // direct tile pixels
constexpr int64_t kMaxChannelBlock = 32;  // output channels per packed direct-tile weight block
constexpr int kMaxRowSweep = 12;          // row vectors per row_tiles call
constexpr int kRowChannels = 4;           // output channels per row tile (both sets)
constexpr int kWinogradPoints = 16;       // the 4x4 transform domain

struct Window {
  const float* const* origins;  // per pixel: its window's first value in the padded NHWC input
  int64_t row_stride;           // floats between kernel rows (dilation_h * padded_width * C)
  int64_t tap_stride;           // floats between kernel columns (dilation_w * C)
  int64_t kernel_h, taps_per_row, run;  // run: contiguous floats read per tap
};

struct RowWindow {
  const int64_t* offsets;  // per tap (c, r, s): its inputs' distance from a vector's first tap
  int64_t taps;            // C * kh * kw
  int64_t plane;           // floats between output channels
};

struct Kernels {
  int lanes;              // floats per vector
  int pixels;             // direct tile pixels
  int64_t channel_block;  // output channels per direct tile (and packed weight block)
  int row_sweep;          // row vectors per row_tiles call
  int weight_taps;        // taps per row_weight_tile call

  // outs[p][j] = act(bias[j] + sum over taps and channels) for p < pixels, j < channel_block.
  void (*direct_tile)(int pixels, const Window& w, const float* weight, const float* bias,
                      Activation act, float* const* outs);
  // out = act(bias + sum over taps of weight * input) for `channels` (<= 4) output channels and
  // `vectors` (<= row_sweep) row vectors: vector j reads `lanes` inputs at inputs[j] + offsets[tap]
  // and writes its first valid[j] lanes at outputs[j] + k * plane. Weights are packed [tap][4].
  void (*row_tiles)(int vectors, const RowWindow& w, const float* const* inputs,
                    float* const* outputs, const int* valid, const float* weight, const float* bias,
                    int channels, Activation act);
  // The weight gradient's row tile, for `taps` <= weight_taps taps and 4 output channels: for
  // each row vector v < vectors, grad(k) = the first valid[v] values at grads[v] + k *
  // channel_stride (zero past them, and for k >= channels) and input(t) = the `lanes` at
  // inputs[v] + offsets[t], and sums[k * sum_stride + t * lanes + lane] += sum over v of
  // grad(k) * input(t). The accumulators stay in registers over all the vectors; the caller adds
  // up the lanes.
  void (*row_weight_tile)(int taps, int64_t vectors, const float* const* inputs,
                          const float* const* grads, const int* valid, const int64_t* offsets,
                          int64_t channel_stride, int channels, float* sums, int64_t sum_stride);
  // dst[c * dst_ld + r] = src[r * src_ld + c] for r < rows, c < cols.
  void (*transpose)(const float* src, int64_t rows, int64_t cols, int64_t src_ld, float* dst,
                    int64_t dst_ld);
  // dst[i] = src[i * step] for i < n, reading within src[0 .. (n - 1) * step]: one column phase
  // of an input row for the row tiles.
  void (*gather_columns)(const float* src, int64_t step, int64_t n, float* dst);
  // out[i] = act(out[i] + residual[i]) for i < count: the residual epilogue, run on a stretch of
  // output a kernel has just stored (conv + bias), while it is still in cache.
  void (*add_residual)(float* out, const float* residual, int64_t count, Activation act);
  // U[e][c][k] for k in [k0, k0 + count), every c, from weights [K][C][3][3], as vectors along
  // k, so every store is a whole line of U. With `stream` (U aligned to 64 bytes and K a
  // multiple of 16) the lines bypass the cache: a U too large to stay there until the products
  // read it then skips the read-for-ownership of every line.
  void (*winograd_weight_block)(const float* weight, int64_t C, int64_t K, int64_t k0,
                                int64_t count, float* u, bool stream);
  // v[i][j] = (B^T d B)[i][j] for d[i][j] = rows[i][j * pixel + c], every c < channels, with
  // B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]. Writes v[e] to out + e * point_stride.
  void (*winograd_input_tile)(const float* const rows[4], int64_t pixel, int64_t channels,
                              float* out, int64_t point_stride);
  // y = act(A^T M A + bias) for the 16 points m[e] = in[e * point_stride + k], every k <
  // channels, A^T = [1 1 1 0; 0 1 -1 -1]; y[i][j] goes to out[i][j] + k.
  void (*winograd_output_tile)(const float* in, int64_t point_stride, int64_t channels,
                               const float* bias, Activation act, float* const out[2][2]);
};

#if FASTDL_X86_ISA

using cpu::isa::with_count;

template <class I>
struct Tiles {
  using V = typename I::V;
  static constexpr int L = I::kLanes;
  static constexpr int kPixels = L == 16 ? 14 : 6;
  static constexpr int64_t kChannelBlock = 2 * L;
  static constexpr int kRowVectors = L == 16 ? 6 : 2;  // vectors per register row tile
  static constexpr int kRowSweep = 96 / L;
  static constexpr int kWeightTaps = L == 16 ? 6 : 2;
  static_assert(kPixels <= kMaxPixels && kChannelBlock <= kMaxChannelBlock &&
                kRowSweep <= kMaxRowSweep);

  // The first n lanes at p (all of them for n >= L): whole vectors unmasked, as an AVX2 masked
  // access costs several plain ones.
  static V load_first(const float* p, int64_t n) {
    return n >= L ? I::load(p) : I::load(p, I::lanes(n));
  }
  static void store_first(float* p, V v, int64_t n) {
    if (n >= L) {
      I::store(p, v);
    } else {
      I::store(p, v, I::lanes(n));
    }
  }

  static V activate(Activation act, V x) {
    constexpr float kLog2e = 1.4426950408889634f;
    switch (act) {
      case Activation::None:
        return x;
      // x86 max and min return their second operand when one is NaN: x goes second so NaN passes.
      case Activation::ReLU:
        return I::max(I::zero(), x);
      case Activation::ReLU6:
        return I::min(I::set1(6.0f), I::max(I::zero(), x));
      case Activation::SiLU: {  // x / (1 + 2^(-x log2 e)); exp2 saturates to inf, giving -0
        const V e = I::exp2(I::mul(x, I::set1(-kLog2e)));
        return I::div(x, I::add(e, I::set1(1.0f)));
      }
      case Activation::GELU: {
        // 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7):
        // erf(z) = 1 - t (a1 + t (a2 + ...)) e^(-z^2), t = 1 / (1 + p |z|), made odd by the sign.
        // |z| is capped at 8, where erf is 1 in float, so that e^(-z^2) stays a normal number
        // (min passes NaN).
        const V z = I::mul(x, I::set1(0.7071067811865476f));
        const V az = I::min(I::set1(8.0f), I::abs(z));
        const V t = I::div(I::set1(1.0f), I::fma(az, I::set1(0.3275911f), I::set1(1.0f)));
        V poly = I::set1(1.061405429f);
        poly = I::fma(poly, t, I::set1(-1.453152027f));
        poly = I::fma(poly, t, I::set1(1.421413741f));
        poly = I::fma(poly, t, I::set1(-0.284496736f));
        poly = I::fma(poly, t, I::set1(0.254829592f));
        const V gauss = I::exp2(I::mul(I::mul(az, az), I::set1(-kLog2e)));
        const V erf = I::copy_sign(I::fnma(I::mul(poly, t), gauss, I::set1(1.0f)), z);
        return I::mul(I::mul(x, I::set1(0.5f)), I::add(erf, I::set1(1.0f)));
      }
    }
    return x;
  }

  template <int P>
  static void direct_tile(const Window& w, const float* weight, const float* bias, Activation act,
                          float* const* outs) {
    V acc0[P], acc1[P];
    const V b0 = I::load(bias), b1 = I::load(bias + L);
#pragma GCC unroll 14
    for (int p = 0; p < P; ++p) {
      acc0[p] = b0;
      acc1[p] = b1;
    }
    for (int64_t r = 0; r < w.kernel_h; ++r) {
      for (int64_t s = 0; s < w.taps_per_row; ++s) {
        const int64_t shift = r * w.row_stride + s * w.tap_stride;
        for (int64_t c = 0; c < w.run; ++c, weight += kChannelBlock) {
          const V w0 = I::load(weight), w1 = I::load(weight + L);
#pragma GCC unroll 14
          for (int p = 0; p < P; ++p) {
            const V xv = I::set1(w.origins[p][shift + c]);
            acc0[p] = I::fma(xv, w0, acc0[p]);
            acc1[p] = I::fma(xv, w1, acc1[p]);
          }
        }
      }
    }
#pragma GCC unroll 14
    for (int p = 0; p < P; ++p) {
      I::store(outs[p], activate(act, acc0[p]));
      I::store(outs[p] + L, activate(act, acc1[p]));
    }
  }

  static void direct_tiles(int pixels, const Window& w, const float* weight, const float* bias,
                           Activation act, float* const* outs) {
    with_count<kPixels>(
        pixels, [&](auto p) { direct_tile<decltype(p)::value>(w, weight, bias, act, outs); });
  }

  // acc[k] += x * scale[k] for the row tiles' four output channels: one vector of pixels' inputs
  // against four broadcast weights (forward) or four channels' gradients (weight gradient).
  static void multiply_add_channels(V x, const V (&scale)[kRowChannels], V (&acc)[kRowChannels]) {
#pragma GCC unroll 4
    for (int k = 0; k < kRowChannels; ++k) acc[k] = I::fma(x, scale[k], acc[k]);
  }

  template <int J>
  static void row_tile(const RowWindow& w, const float* const* inputs, float* const* outputs,
                       const int* valid, const float* weight, const float* bias, int channels,
                       Activation act) {
    V acc[J][kRowChannels];
#pragma GCC unroll 6
    for (int j = 0; j < J; ++j)
#pragma GCC unroll 4
      for (int k = 0; k < kRowChannels; ++k) acc[j][k] = I::set1(bias[k]);
    for (int64_t t = 0; t < w.taps; ++t, weight += kRowChannels) {
      const int64_t offset = w.offsets[t];
      const V scale[kRowChannels] = {I::set1(weight[0]), I::set1(weight[1]), I::set1(weight[2]),
                                     I::set1(weight[3])};
#pragma GCC unroll 6
      for (int j = 0; j < J; ++j) multiply_add_channels(I::load(inputs[j] + offset), scale, acc[j]);
    }
#pragma GCC unroll 4
    for (int k = 0; k < kRowChannels; ++k) {
      if (k >= channels) break;
#pragma GCC unroll 6
      for (int j = 0; j < J; ++j) store_first(outputs[j] + k * w.plane, acc[j][k], valid[j]);
    }
    // The activation runs on the stored sums, in a loop of its own: unrolled into the stores
    // above, the code of every activation crowded the accumulators out of registers in the
    // multiply-add loop of any activated call.
    if (act == Activation::None) return;
#pragma GCC unroll 1
    for (int k = 0; k < channels; ++k) {
#pragma GCC unroll 1
      for (int j = 0; j < J; ++j) {
        float* out = outputs[j] + k * w.plane;
        store_first(out, activate(act, load_first(out, valid[j])), valid[j]);
      }
    }
  }

  static void row_tiles(int vectors, const RowWindow& w, const float* const* inputs,
                        float* const* outputs, const int* valid, const float* weight,
                        const float* bias, int channels, Activation act) {
    for (int j = 0; j < vectors; j += kRowVectors) {
      with_count<kRowVectors>(std::min(kRowVectors, vectors - j), [&](auto n) {
        row_tile<decltype(n)::value>(w, inputs + j, outputs + j, valid + j, weight, bias, channels,
                                     act);
      });
    }
  }

  template <int T>
  static void row_weight_tile(int64_t vectors, const float* const* inputs,
                              const float* const* grads, const int* valid, const int64_t* offsets,
                              int64_t channel_stride, int channels, float* sums,
                              int64_t sum_stride) {
    V acc[T][kRowChannels];
#pragma GCC unroll 6
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
      for (int k = 0; k < kRowChannels; ++k) acc[t][k] = I::zero();
    for (int64_t v = 0; v < vectors; ++v) {
      V grad[kRowChannels];
#pragma GCC unroll 4
      for (int k = 0; k < kRowChannels; ++k)
        grad[k] = k < channels ? load_first(grads[v] + k * channel_stride, valid[v]) : I::zero();
#pragma GCC unroll 6
      for (int t = 0; t < T; ++t)
        multiply_add_channels(I::load(inputs[v] + offsets[t]), grad, acc[t]);
    }
#pragma GCC unroll 4
    for (int k = 0; k < kRowChannels; ++k) {
#pragma GCC unroll 6
      for (int t = 0; t < T; ++t) {
        float* sum = sums + k * sum_stride + t * L;
        I::store(sum, I::add(I::load(sum), acc[t][k]));
      }
    }
  }

  static void row_weight_tiles(int taps, int64_t vectors, const float* const* inputs,
                               const float* const* grads, const int* valid, const int64_t* offsets,
                               int64_t channel_stride, int channels, float* sums,
                               int64_t sum_stride) {
    with_count<kWeightTaps>(taps, [&](auto t) {
      row_weight_tile<decltype(t)::value>(vectors, inputs, grads, valid, offsets, channel_stride,
                                          channels, sums, sum_stride);
    });
  }

  // L x L blocks at a time in registers, partial at the edges, so every load and store is a
  // contiguous vector instead of a scalar at a plane's distance.
  static void transpose(const float* src, int64_t rows, int64_t cols, int64_t src_ld, float* dst,
                        int64_t dst_ld) {
    for (int64_t r0 = 0; r0 < rows; r0 += L) {
      const int64_t nr = std::min<int64_t>(L, rows - r0);
      for (int64_t c0 = 0; c0 < cols; c0 += L) {
        const int64_t nc = std::min<int64_t>(L, cols - c0);
        V block[L];
#pragma GCC unroll 16
        for (int i = 0; i < L; ++i)
          block[i] = i < nr ? load_first(src + (r0 + i) * src_ld + c0, nc) : I::zero();
        I::transpose(block);
        for (int c = 0; c < nc; ++c) store_first(dst + (c0 + c) * dst_ld + r0, block[c], nr);
      }
    }
  }

  // Step 2 (the strided first layers) takes the even lanes of 2 L inputs at a time.
  static void gather_columns(const float* src, int64_t step, int64_t n, float* dst) {
    if (step == 1) {
      std::copy_n(src, n, dst);
      return;
    }
    int64_t i = 0;
    if (step == 2) {
      for (; i + L <= n; i += L) I::store(dst + i, I::even_lanes(src + 2 * i));
    }
    for (; i < n; ++i) dst[i] = src[i * step];
  }

  static void add_residual(float* out, const float* residual, int64_t count, Activation act) {
    for (int64_t i = 0; i < count; i += L) {
      const int64_t n = count - i;
      store_first(out + i,
                  activate(act, I::add(load_first(out + i, n), load_first(residual + i, n))), n);
    }
  }

  // (G v)[0..3] for a filter row or column v = (a, b, c), G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1].
  static void apply_g(V a, V b, V c, V out[4]) {
    const V half = I::set1(0.5f);
    out[0] = a;
    out[1] = I::mul(half, I::add(I::add(a, b), c));
    out[2] = I::mul(half, I::add(I::sub(a, b), c));
    out[3] = c;
  }

  // Lane l of U = G f G^T for `count` <= 16 3x3 filters f = filters + l * filter_stride, written
  // to out + e * point_stride + l for each point e: 16 floats, one cache line of each point, in
  // L-lane vectors. With `stream` whole lines go straight to memory, their vectors stored back
  // to back: AVX2's half lines streamed apart would leave write-combining buffers partly filled,
  // and those are flushed as slow partial writes.
  static void winograd_weight_tile(const float* filters, int64_t filter_stride, int64_t count,
                                   float* out, int64_t point_stride, bool stream) {
    constexpr int kLine = 16;
    alignas(64) float points[kWinogradPoints][kLine];
    for (int h = 0; h < count; h += L) {
      const int64_t n = std::min<int64_t>(count - h, L);
      alignas(64) float taps[9][L];  // taps[j][l]: vectors over filters
      transpose(filters + h * filter_stride, n, 9, filter_stride, &taps[0][0], L);
      V columns[3][4], point[4];
      for (int j = 0; j < 3; ++j)
        apply_g(I::load(taps[j]), I::load(taps[3 + j]), I::load(taps[6 + j]), columns[j]);
      for (int i = 0; i < 4; ++i) {
        apply_g(columns[0][i], columns[1][i], columns[2][i], point);
        for (int j = 0; j < 4; ++j) I::store(points[4 * i + j] + h, point[j]);
      }
    }
    for (int e = 0; e < kWinogradPoints; ++e) {
      float* o = out + e * point_stride;
      for (int h = 0; h < count; h += L) {
        if (stream && count == kLine) {
          I::stream(o + h, I::load(points[e] + h));
        } else {
          store_first(o + h, I::load(points[e] + h), count - h);
        }
      }
    }
  }

  static void winograd_weight_block(const float* weight, int64_t C, int64_t K, int64_t k0,
                                    int64_t count, float* u, bool stream) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = k0; k < k0 + count; k += 16) {
        winograd_weight_tile(weight + (k * C + c) * 9, C * 9, std::min<int64_t>(16, k0 + count - k),
                             u + c * K + k, C * K, stream);
      }
    }
    if (stream) _mm_sfence();  // the streamed lines are visible before the products read U
  }

  static void winograd_input_tile(const float* const rows[4], int64_t pixel, int64_t channels,
                                  float* out, int64_t point_stride) {
    for (int64_t c = 0; c < channels; c += L) {
      const int64_t n = channels - c;
      V t[4][4];
      for (int j = 0; j < 4; ++j) {
        const V d0 = load_first(rows[0] + j * pixel + c, n);
        const V d1 = load_first(rows[1] + j * pixel + c, n);
        const V d2 = load_first(rows[2] + j * pixel + c, n);
        const V d3 = load_first(rows[3] + j * pixel + c, n);
        t[0][j] = I::sub(d0, d2);
        t[1][j] = I::add(d1, d2);
        t[2][j] = I::sub(d2, d1);
        t[3][j] = I::sub(d1, d3);
      }
      for (int i = 0; i < 4; ++i) {
        float* o = out + (4 * i) * point_stride + c;
        store_first(o, I::sub(t[i][0], t[i][2]), n);
        store_first(o + point_stride, I::add(t[i][1], t[i][2]), n);
        store_first(o + 2 * point_stride, I::sub(t[i][2], t[i][1]), n);
        store_first(o + 3 * point_stride, I::sub(t[i][1], t[i][3]), n);
      }
    }
  }

  static void winograd_output_tile(const float* in, int64_t point_stride, int64_t channels,
                                   const float* bias, Activation act, float* const out[2][2]) {
    for (int64_t k = 0; k < channels; k += L) {
      const int64_t n = channels - k;
      V t[2][4];
      for (int j = 0; j < 4; ++j) {
        const V m0 = load_first(in + j * point_stride + k, n);
        const V m1 = load_first(in + (4 + j) * point_stride + k, n);
        const V m2 = load_first(in + (8 + j) * point_stride + k, n);
        const V m3 = load_first(in + (12 + j) * point_stride + k, n);
        t[0][j] = I::add(I::add(m0, m1), m2);
        t[1][j] = I::sub(I::sub(m1, m2), m3);
      }
      const V b = load_first(bias + k, n);
      for (int i = 0; i < 2; ++i) {
        const V y0 = I::add(I::add(I::add(t[i][0], t[i][1]), t[i][2]), b);
        const V y1 = I::add(I::sub(I::sub(t[i][1], t[i][2]), t[i][3]), b);
        store_first(out[i][0] + k, activate(act, y0), n);
        store_first(out[i][1] + k, activate(act, y1), n);
      }
    }
  }
};

// The entry points of each set (cpu_isa.h: flatten compiles the whole template body for it):
// Entry<&T::f>::call is T::f compiled for the set.
#define FASTDL_CONV2D_TILE_ENTRIES(Isa, target)                               \
  struct Isa##Entries {                                                       \
    template <auto F>                                                         \
    struct Entry;                                                             \
    template <class... Args, void (*F)(Args...)>                              \
    struct Entry<F> {                                                         \
      FASTDL_ISA_ENTRY(target) static void call(Args... args) { F(args...); } \
    };                                                                        \
    using T = Tiles<cpu::isa::Isa>;                                           \
    static constexpr Kernels kernels{T::L,                                    \
                                     T::kPixels,                              \
                                     T::kChannelBlock,                        \
                                     T::kRowSweep,                            \
                                     T::kWeightTaps,                          \
                                     &Entry<&T::direct_tiles>::call,          \
                                     &Entry<&T::row_tiles>::call,             \
                                     &Entry<&T::row_weight_tiles>::call,      \
                                     &Entry<&T::transpose>::call,             \
                                     &Entry<&T::gather_columns>::call,        \
                                     &Entry<&T::add_residual>::call,          \
                                     &Entry<&T::winograd_weight_block>::call, \
                                     &Entry<&T::winograd_input_tile>::call,   \
                                     &Entry<&T::winograd_output_tile>::call}; \
  };
FASTDL_CONV2D_TILE_ENTRIES(Avx512, "avx512f")
FASTDL_CONV2D_TILE_ENTRIES(Avx2, "arch=x86-64-v3")
#undef FASTDL_CONV2D_TILE_ENTRIES

#endif

// The tiles of the best instruction set the active capability allows (read it once per call of
// the op, so that one call never mixes two), or nullptr where none is compiled in or allowed.
inline const Kernels* select() {
#if FASTDL_X86_ISA
  return cpu::isa::best_entry<const Kernels*>(&Avx512Entries::kernels, &Avx2Entries::kernels);
#else
  return nullptr;
#endif
}

// dst[c * dst_ld + r] = src[r * src_ld + c] for r < rows, c < cols: the NCHW <-> NHWC layout
// change at either end of the kernels, which the portable paths need too (by the tiles of
// `kernels` where there are some).
inline void transpose(const Kernels* kernels, const float* src, int64_t rows, int64_t cols,
                      int64_t src_ld, float* dst, int64_t dst_ld) {
  if (kernels) {
    kernels->transpose(src, rows, cols, src_ld, dst, dst_ld);
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * dst_ld + r] = src[r * src_ld + c];
}

}  // namespace fastdl::conv2d::tiles

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
