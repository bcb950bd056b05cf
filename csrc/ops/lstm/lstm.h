// One LSTM layer in one direction, shared by cpu.cpp and cuda.cu: the argument checks, the cell
// equations, and the time loop. The loop runs the GEMMs through ATen (MKL on CPU, cuBLAS on CUDA);
// each backend supplies the fused pointwise steps and may replace how a step multiplies by w_hh
// (a `Backend` struct, see below).
//
// Sequences are stored packed, time-major, as PackedSequence does: step t owns the rows
// [offset[t], offset[t] + size[t]) of a [N, width] matrix, and sizes never grow with t, so the
// sequences still running at step t are rows 0 .. size[t]-1 of the state. A padded [T, B, I]
// input is the special case size[t] = B. Step t only computes its own rows, so the work shrinks
// with the batch. The reverse direction visits the steps from T-1 down to 0: rows join the
// state (starting from h0, c0) as they begin, and the state rows a step does not touch keep the
// final values of the sequences that have ended, which is why h_n and c_n are just the state.
//
// Gate order i, f, g, o (as torch.nn.LSTM). What the forward saves for the backward (when asked):
//   gates [N, 4H]: the activations sigmoid(i), sigmoid(f), tanh(g), sigmoid(o) of every step;
//   cells [N, H]:  the new cell state c_t of every step.
// The backward rebuilds c_{t-1} and h_{t-1} from these, the output and the initial state.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/host_device.h"

namespace fastdl::lstm {

// ---- the cell equations, for one scalar or one vector of lanes ---------------------------------
//
// `Math` supplies sigmoid and tanh for the value type V (exact ones for float64, fast ones for
// float32 vectors on the CPU, CUDA intrinsics on the GPU).

// In: pre-activations i, f, g, o and c_{t-1} in c. Out: activations, c_t in c, o * tanh(c_t).
template <typename Math, typename V>
FASTDL_HOST_DEVICE V cell_forward(V& i, V& f, V& g, V& o, V& c) {
  i = Math::sigmoid(i);
  f = Math::sigmoid(f);
  g = Math::tanh(g);
  o = Math::sigmoid(o);
  c = f * c + i * g;
  return o * Math::tanh(c);
}

// In: activations i, f, g, o, c_t, c_{t-1}, the gradient dh of o * tanh(c_t) and dc of c_t.
// Out: the pre-activation gradients in di, df, dg, do_ (same order), dc_{t-1} in dc; returns
// o * tanh(c_t), which the projection's weight gradient needs.
template <typename Math, typename V>
FASTDL_HOST_DEVICE V cell_backward(V i, V f, V g, V o, V c, V c_prev, V dh, V& dc, V& di, V& df,
                                   V& dg, V& do_) {
  const V one = V{} + 1;
  const V tanh_c = Math::tanh(c);
  const V dc_total = dc + dh * o * (one - tanh_c * tanh_c);
  do_ = dh * tanh_c * o * (one - o);
  di = dc_total * g * i * (one - i);
  df = dc_total * c_prev * f * (one - f);
  dg = dc_total * i * (one - g * g);
  dc = dc_total * f;
  return o * tanh_c;
}

// ---- shapes ------------------------------------------------------------------------------------

struct Layout {
  int64_t steps, batch, rows;            // T, B (rows of the state), N (rows of the sequence)
  int64_t input_size, hidden, out_size;  // I, H, P (= H without a projection)
  std::vector<int64_t> offset, size;     // per step: first row and number of rows
  std::vector<int64_t> io_shape(int64_t width, const at::Tensor& input) const {
    auto shape = input.sizes().vec();
    shape.back() = width;
    return shape;
  }
};

inline Layout check_layer(const char* op, const at::Tensor& input,
                          const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                          const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                          const std::optional<at::Tensor>& w_hr) {
  Layout l;
  check_rank(op, "w_ih", w_ih, 2, "[4H, I]");
  check_rank(op, "w_hh", w_hh, 2, "[4H, P]");
  check_rank(op, "h0", h0, 2, "[B, P]");
  check_rank(op, "c0", c0, 2, "[B, H]");
  TORCH_CHECK(w_ih.size(0) % 4 == 0 && w_ih.size(0) > 0, op,
              ": w_ih must have 4 * hidden_size rows (gates i, f, g, o), got shape ",
              sizes_str(w_ih));
  l.hidden = w_ih.size(0) / 4;
  l.input_size = w_ih.size(1);
  l.out_size = l.hidden;
  if (w_hr.has_value()) {
    check_rank(op, "w_hr", *w_hr, 2, "[P, H]");
    TORCH_CHECK(w_hr->size(1) == l.hidden, op, ": w_hr must be [P, H] with H=", l.hidden,
                ", got shape ", sizes_str(*w_hr));
    l.out_size = w_hr->size(0);
  }
  TORCH_CHECK(w_hh.size(0) == 4 * l.hidden && w_hh.size(1) == l.out_size, op,
              ": expected w_hh of shape [", 4 * l.hidden, ", ", l.out_size, "], got ",
              sizes_str(w_hh));
  if (batch_sizes.has_value()) {
    check_rank(op, "input", input, 2, "[N, I] (packed rows)");
    const auto& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(), op,
                ": batch_sizes must be a 1-D int64 CPU tensor (as in PackedSequence), got ",
                bs.scalar_type(), " of shape ", sizes_str(bs), " on ", bs.device());
    const auto sizes = bs.contiguous();
    l.size.assign(sizes.const_data_ptr<int64_t>(), sizes.const_data_ptr<int64_t>() + sizes.numel());
    l.steps = static_cast<int64_t>(l.size.size());
    l.batch = l.steps > 0 ? l.size[0] : 0;
  } else {
    check_rank(op, "input", input, 3, "[T, B, I]");
    l.steps = input.size(0);
    l.batch = input.size(1);
    l.size.assign(l.steps, l.batch);
  }
  int64_t rows = 0;
  for (int64_t t = 0; t < l.steps; ++t) {
    // a padded batch of 0 sequences is valid (as in torch); packed steps must hold some
    TORCH_CHECK(
        !batch_sizes.has_value() || (l.size[t] > 0 && l.size[t] <= l.size[t > 0 ? t - 1 : 0]), op,
        ": batch_sizes must be positive and non-increasing, got ", l.size[t], " at step ", t,
        t > 0 ? " after " + std::to_string(l.size[t - 1]) : std::string());
    l.offset.push_back(rows);
    rows += l.size[t];
  }
  l.rows = rows;
  TORCH_CHECK(!batch_sizes.has_value() || input.size(0) == rows, op, ": batch_sizes sum to ", rows,
              " rows but input has ", input.size(0), " (shape ", sizes_str(input), ")");
  TORCH_CHECK(input.size(-1) == l.input_size, op, ": input has ", input.size(-1),
              " features (shape ", sizes_str(input),
              ") but w_ih expects input_size=", l.input_size);
  TORCH_CHECK(h0.size(0) == l.batch && h0.size(1) == l.out_size, op, ": expected h0 of shape [",
              l.batch, ", ", l.out_size, "], got ", sizes_str(h0));
  TORCH_CHECK(c0.size(0) == l.batch && c0.size(1) == l.hidden, op, ": expected c0 of shape [",
              l.batch, ", ", l.hidden, "], got ", sizes_str(c0));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"h0", &h0},
                                {"c0", &c0},
                                {"w_ih", &w_ih},
                                {"w_hh", &w_hh}}) {
    check_same_device(op, "input", input, name, *t);
    check_same_dtype(op, "input", input, name, *t);
  }
  if (w_hr.has_value()) {
    check_same_device(op, "input", input, "w_hr", *w_hr);
    check_same_dtype(op, "input", input, "w_hr", *w_hr);
  }
  return l;
}

inline void check_bias(const char* op, const char* name, const std::optional<at::Tensor>& b,
                       const at::Tensor& input, int64_t hidden) {
  if (!b.has_value()) return;
  TORCH_CHECK(b->dim() == 1 && b->size(0) == 4 * hidden, op, ": expected ", name, " of shape [",
              4 * hidden, "], got ", sizes_str(*b));
  check_same_device(op, "input", input, name, *b);
  check_same_dtype(op, "input", input, name, *b);
}

// ---- the time loop -----------------------------------------------------------------------------
//
// struct Backend {
//   // gates [n, 4H]: the two products in, activations of (products + bias [4H]) out;
//   // c [n, H]: c_{t-1} in, c_t out, also written to c_saved [n, H] when it is defined;
//   // hidden [n, H]: o * tanh(c_t).
//   static void forward(const at::Tensor& gates, const at::Tensor& bias, const at::Tensor& c,
//                       const at::Tensor& c_saved, const at::Tensor& hidden);
//   // dhidden [n, H]: gradient of o * tanh(c_t); dc [n, H]: dc_t in, dc_{t-1} out; dgates
//   // [n, 4H] out; hidden [n, H]: o * tanh(c_t) out, only when defined (with a projection).
//   static void backward(const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c_prev,
//                        const at::Tensor& dhidden, const at::Tensor& dc, const at::Tensor& dgates,
//                        const at::Tensor& hidden);
//   // What multiplies by w_hh: AtenRecurrence<Backend>, or a class with the same members.
//   using Recurrence = ...;
// };
// Every tensor handed to them is a contiguous block of rows.

// The per-step work that involves w_hh [4H, P]: the forward step (gates += h w_hh^T, then the
// pointwise pass) and the backward product dh = dgates w_hh, through ATen. `batch` bounds the
// rows of a step, `steps` is how many steps there will be.
template <typename Pointwise>
class AtenRecurrence {
 public:
  AtenRecurrence(const at::Tensor& w_hh, int64_t /*batch*/, int64_t /*steps*/) : w_hh_(w_hh) {}

  void forward_step(at::Tensor& gates, const at::Tensor& h, const at::Tensor& bias,
                    const at::Tensor& c, const at::Tensor& c_saved, const at::Tensor& hidden) {
    gates.addmm_(h, w_hh_.t());
    Pointwise::forward(gates, bias, c, c_saved, hidden);
  }

  void backward_product(at::Tensor& dh, const at::Tensor& dgates) { at::mm_out(dh, dgates, w_hh_); }

 private:
  at::Tensor w_hh_;
};

inline int64_t step_at(const Layout& l, int64_t k, bool reverse) {
  return reverse ? l.steps - 1 - k : k;
}

// Copies the rows that step t starts from into dst [size[t], width]: rows still running come
// from the previous step's block of `saved`, rows that begin at step t from `initial`.
inline void gather_previous(const Layout& l, int64_t t, bool reverse, const at::Tensor& saved,
                            const at::Tensor& initial, const at::Tensor& dst) {
  const int64_t prev = reverse ? t + 1 : t - 1;
  const int64_t n = l.size[t];
  const int64_t carried = (prev >= 0 && prev < l.steps) ? std::min(n, l.size[prev]) : 0;
  if (carried > 0) dst.narrow(0, 0, carried).copy_(saved.narrow(0, l.offset[prev], carried));
  if (carried < n) {
    dst.narrow(0, carried, n - carried).copy_(initial.narrow(0, carried, n - carried));
  }
}

// Without save_activations (inference) the gates and cells outputs are empty ([0, 4H], [0, H]):
// the input projection then runs a chunk of about kChunkRows rows at a time into one reused
// buffer that stays in cache, instead of filling an [N, 4H] buffer that the loop reads back.
constexpr int64_t kChunkRows = 512;

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, bool save_activations) {
  const char* op = "lstm_layer";
  const Layout l = check_layer(op, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr);
  check_bias(op, "b_ih", b_ih, input, l.hidden);
  check_bias(op, "b_hh", b_hh, input, l.hidden);
  const auto options = input.options();
  const auto x = input.reshape({l.rows, l.input_size});
  const auto w_ih_t = w_ih.t();
  // The biases are added by the pointwise step.
  auto bias = at::zeros({4 * l.hidden}, options);
  if (b_ih.has_value()) bias.add_(*b_ih);
  if (b_hh.has_value()) bias.add_(*b_hh);
  const int64_t saved_rows = save_activations ? l.rows : 0;
  auto gates = at::empty({saved_rows, 4 * l.hidden}, options);
  auto cells = at::empty({saved_rows, l.hidden}, options);
  const int64_t chunk_rows =
      save_activations ? l.rows : std::min(l.rows, std::max(kChunkRows, l.batch));
  auto projection = save_activations ? gates : at::empty({chunk_rows, 4 * l.hidden}, options);
  auto output = at::empty({l.rows, l.out_size}, options);
  auto h = h0.contiguous().clone();
  auto c = c0.contiguous().clone();
  typename Backend::Recurrence recurrence(w_hh, l.batch, l.steps);
  const auto w_hr_t = w_hr.has_value() ? w_hr->t() : at::Tensor();
  auto hidden = w_hr.has_value() ? at::empty({l.batch, l.hidden}, options) : at::Tensor();
  int64_t chunk_end = 0, chunk_first_row = 0;  // visiting index past the chunk, its first row
  for (int64_t k = 0; k < l.steps; ++k) {
    const int64_t t = step_at(l, k, reverse), n = l.size[t];
    if (k == chunk_end) {  // the input projection of the next steps that fit (at least one)
      int64_t rows = 0;
      for (; chunk_end < l.steps; ++chunk_end) {
        const int64_t size = l.size[step_at(l, chunk_end, reverse)];
        if (rows > 0 && rows + size > chunk_rows) break;
        rows += size;
      }
      // consecutive steps own consecutive rows, in either visiting order
      chunk_first_row = std::min(l.offset[t], l.offset[step_at(l, chunk_end - 1, reverse)]);
      auto block = projection.narrow(0, 0, rows);
      at::mm_out(block, x.narrow(0, chunk_first_row, rows), w_ih_t);
    }
    auto g = projection.narrow(0, l.offset[t] - chunk_first_row, n);
    auto out = output.narrow(0, l.offset[t], n);
    auto r = w_hr.has_value() ? hidden.narrow(0, 0, n) : out;
    recurrence.forward_step(g, h.narrow(0, 0, n), bias, c.narrow(0, 0, n),
                            save_activations ? cells.narrow(0, l.offset[t], n) : at::Tensor(), r);
    if (w_hr.has_value()) at::mm_out(out, r, w_hr_t);
    h.narrow(0, 0, n).copy_(out);
  }
  return {output.view(l.io_shape(l.out_size, input)), h, c, gates, cells};
}

// Reverse-time loop: per step only the pointwise backward and dh_{t-1} = dgates W_hh (plus the
// projection's dr = dh W_hr); the weight gradients are one GEMM each over all steps at the end.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
               const at::Tensor& grad_c_n, const at::Tensor& input,
               const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
               const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
               const std::optional<at::Tensor>& w_hr, const at::Tensor& output,
               const at::Tensor& gates, const at::Tensor& cells, bool reverse) {
  const char* op = "lstm_layer_backward";
  const Layout l = check_layer(op, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr);
  const std::vector<int64_t> gates_shape{l.rows, 4 * l.hidden}, cells_shape{l.rows, l.hidden};
  const bool consistent = grad_output.sizes() == output.sizes() && gates.sizes() == gates_shape &&
                          cells.sizes() == cells_shape && grad_h_n.sizes() == h0.sizes() &&
                          grad_c_n.sizes() == c0.sizes();
  TORCH_CHECK(consistent, op,
              ": the gradients and saved tensors do not match the layer: grad_output ",
              sizes_str(grad_output), ", output ", sizes_str(output), ", gates ", sizes_str(gates),
              ", cells ", sizes_str(cells), ", grad_h_n ", sizes_str(grad_h_n), ", grad_c_n ",
              sizes_str(grad_c_n));
  const bool projected = w_hr.has_value();
  const auto options = input.options();
  const auto x = input.reshape({l.rows, l.input_size});
  const auto out = output.reshape({l.rows, l.out_size});
  const auto grad_out = grad_output.reshape({l.rows, l.out_size});
  const auto gates_c = gates.contiguous(), cells_c = cells.contiguous();
  auto dgates = at::empty({l.rows, 4 * l.hidden}, options);
  auto h_prev = at::empty({l.rows, l.out_size}, options);  // h_{t-1} of every row
  auto dh = grad_h_n.contiguous().clone();
  auto dc = grad_c_n.contiguous().clone();
  auto c_prev = at::empty({l.batch, l.hidden}, options);
  // With a projection: dh of every step and o * tanh(c) of every step, for dW_hr; dr per step.
  auto dh_total = at::empty({projected ? l.rows : l.batch, l.out_size}, options);
  auto hidden = projected ? at::empty({l.rows, l.hidden}, options) : at::Tensor();
  auto dr = projected ? at::empty({l.batch, l.hidden}, options) : at::Tensor();
  typename Backend::Recurrence recurrence(w_hh, l.batch, l.steps);
  for (int64_t k = 0; k < l.steps; ++k) {
    const int64_t t = step_at(l, l.steps - 1 - k, reverse), n = l.size[t], row = l.offset[t];
    gather_previous(l, t, reverse, cells_c, c0, c_prev.narrow(0, 0, n));
    gather_previous(l, t, reverse, out, h0, h_prev.narrow(0, row, n));
    auto dh_t = dh_total.narrow(0, projected ? row : 0, n);
    at::add_out(dh_t, grad_out.narrow(0, row, n), dh.narrow(0, 0, n));
    auto dr_t = projected ? dr.narrow(0, 0, n) : dh_t;
    if (projected) at::mm_out(dr_t, dh_t, *w_hr);
    auto dg = dgates.narrow(0, row, n);
    const auto hidden_t = projected ? hidden.narrow(0, row, n) : at::Tensor();
    Backend::backward(gates_c.narrow(0, row, n), cells_c.narrow(0, row, n), c_prev.narrow(0, 0, n),
                      dr_t, dc.narrow(0, 0, n), dg, hidden_t);
    auto dh_prev = dh.narrow(0, 0, n);
    recurrence.backward_product(dh_prev, dg);
  }
  const auto dgates_t = dgates.t();
  auto grad_input = at::mm(dgates, w_ih).view(l.io_shape(l.input_size, input));
  auto grad_w_ih = at::mm(dgates_t, x);
  auto grad_w_hh = at::mm(dgates_t, h_prev);
  auto grad_bias = dgates.sum(0);
  auto grad_w_hr = projected ? at::mm(dh_total.t(), hidden) : at::empty({0}, options);
  return {grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace fastdl::lstm
