// The GEMM lowering through the BLAS libtorch links: any floating dtype, any groups, forward
// and backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "common/cpu_blas.h"
#include "common/cpu_simd.h"
#include "ops/conv2d/cpu/conv2d_cpu.h"

namespace fastdl::conv2d {
namespace {

using cpu::TransposeType;

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
            if (w >= 0 && w < g.width)
              cpu::axpy(Cg, T(1), src, dx + (h * g.width + w) * g.channels + group * Cg);
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
void forward_gemm_typed(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual, Activation act,
                        at::Tensor& output) {
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

template <typename T>
void backward_gemm_typed(const Geometry& g, const at::Tensor& grad_output, const at::Tensor& input,
                         const at::Tensor& weight, at::Tensor& grad_input_nhwc,
                         at::Tensor& grad_weight_rows) {
  const int64_t K = g.out_channels, Kg = g.group_out_channels(), window = g.window(),
                P = g.pixels();
  const bool want_input = grad_input_nhwc.defined(), want_weight = grad_weight_rows.defined();
  const at::Tensor dy = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x =
      want_weight ? input.contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  const at::Tensor w = want_input ? weight.permute({0, 2, 3, 1}).contiguous() : at::Tensor();
  // Several images per GEMM (their rows are consecutive in NHWC), so small feature maps still
  // give the BLAS a long reduction; the im2col buffer stays around 16 MB.
  const int64_t images =
      std::clamp<int64_t>((int64_t{4} << 20) / std::max<int64_t>(P * window, 1), 1, g.batch);
  at::Tensor col =
      g.is_pointwise() ? at::Tensor() : at::empty({images * P, window}, input.options());
  for (int64_t n0 = 0; n0 < g.batch; n0 += images) {
    const int64_t count = std::min(images, g.batch - n0), rows = count * P;
    for (int64_t group = 0; group < g.groups; ++group) {
      const T* dy_g = image<T>(dy, n0) + group * Kg;  // [rows, Kg] with row stride K
      if (want_weight) {                              // dW_g[Kg, window] += dy_g^T col
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
        cpu::gemm_row_major(TransposeType::NoTranspose, TransposeType::NoTranspose, rows, window,
                            Kg, T(1), dy_g, K, w.const_data_ptr<T>() + group * Kg * window, window,
                            T(0), dcol, window);
        if (!g.is_pointwise()) {
          for (int64_t i = 0; i < count; ++i)
            col2im_add(g, dcol + i * P * window, group, dx + i * grad_input_nhwc.stride(0));
        }
      }
    }
  }
}

}  // namespace

void forward_gemm(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                  Activation act, at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_cpu", [&] {
    forward_gemm_typed<scalar_t>(g, input, weight, bias, residual, act, output);
  });
}

void backward_gemm(const Geometry& g, const at::Tensor& grad_output, const at::Tensor& input,
                   const at::Tensor& weight, at::Tensor& grad_input_nhwc,
                   at::Tensor& grad_weight_rows) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_backward_cpu", [&] {
    backward_gemm_typed<scalar_t>(g, grad_output, input, weight, grad_input_nhwc, grad_weight_rows);
  });
}

}  // namespace fastdl::conv2d
