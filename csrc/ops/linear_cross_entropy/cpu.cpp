// A linear layer and cross-entropy on the CPU, a chunk of rows at a time (the algorithm is in
// python/fastdl/ops/linear_cross_entropy.py). Per chunk: the logits by the BLAS that libtorch
// links, then per row (in parallel) the max, e^(l - max) in place with its sum (the vectorised
// row loops of cpu_simd.h), the log-sum-exp and the loss, and for a gradient the row scaled into
// (softmax - onehot) * scale in the same buffer; two more products give the chunk's share of the
// gradients of hidden and weight. 16-bit inputs multiply in their dtype and reduce in float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/cpu_scratch.h"
#include "common/cpu_simd.h"
#include "ops/linear_cross_entropy/linear_cross_entropy.h"

namespace fastdl::linear_cross_entropy {
namespace {

// A chunk's logits stay below 2^23 elements (32 MB in float32), as in the composite.
int64_t chunk_rows(int64_t rows, int64_t classes) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, (int64_t{1} << 23) / classes));
}

at::ScalarType acc_dtype(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows whose target is not ignore_index; fails on the first such target outside [0, V).
at::Tensor valid_rows(const char* op, const at::Tensor& target, int64_t classes,
                      int64_t ignore_index) {
  const at::Tensor valid = target.ne(ignore_index);
  const at::Tensor bad = valid.logical_and(target.lt(0).logical_or(target.ge(classes)));
  if (bad.any().item<bool>()) {
    TORCH_CHECK(false, op, ": target ", target.masked_select(bad)[0].item<int64_t>(),
                " is out of range for ", classes,
                " classes (and is not ignore_index=", ignore_index, ")");
  }
  return valid;
}

struct Gradients {
  at::Tensor hidden, weight, bias;  // hidden in the input dtype; weight, bias accumulated in acc
};

// The loop over chunks shared by the forward pass and the recomputing backward pass.
// `lse` is computed (forward) or given (backward); `losses` is filled when defined;
// with `grads`, each row r of (softmax - onehot) is multiplied by row_scale[r].
template <typename acc_t>
void run_chunks(const at::Tensor& hidden, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, const at::Tensor& target,
                const at::Tensor& valid, bool lse_given, at::Tensor& lse, at::Tensor* losses,
                const at::Tensor& row_scale, Gradients* grads) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const bool same_dtype = hidden.scalar_type() == lse.scalar_type();
  const int64_t step = chunk_rows(n, v);
  at::Tensor buffer = at::empty({std::min(step, n), v}, lse.options());
  const int64_t* tp = target.const_data_ptr<int64_t>();
  const bool* vp = valid.const_data_ptr<bool>();
  acc_t* lp = lse.data_ptr<acc_t>();
  acc_t* lossp = losses != nullptr ? losses->data_ptr<acc_t>() : nullptr;
  const acc_t* sp = grads != nullptr ? row_scale.const_data_ptr<acc_t>() : nullptr;
  const at::Tensor weight_t = weight.t();
  for (int64_t start = 0; start < n; start += step) {
    const int64_t rows = std::min(step, n - start);
    const at::Tensor h = hidden.narrow(0, start, rows);
    at::Tensor logits = buffer.narrow(0, 0, rows);
    if (same_dtype) {
      if (bias.has_value())
        at::addmm_out(logits, *bias, h, weight_t);
      else
        at::mm_out(logits, h, weight_t);
    } else {
      logits.copy_(bias.has_value() ? at::addmm(*bias, h, weight_t) : at::mm(h, weight_t));
    }
    acc_t* base = logits.data_ptr<acc_t>();
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = start + r;
        acc_t* row = base + r * v;
        const acc_t picked = vp[i] ? row[tp[i]] : acc_t(0);
        // row becomes e^(l - shift); the softmax is that over `normaliser`
        acc_t normaliser = 1;
        if (lse_given) {
          cpu::exp_shift_sum(v, row, lp[i]);
        } else {
          const acc_t m = cpu::row_max(v, row);
          normaliser = cpu::exp_shift_sum(v, row, m);
          lp[i] = m + std::log(normaliser);
        }
        if (lossp != nullptr) lossp[i] = vp[i] ? lp[i] - picked : acc_t(0);
        if (grads != nullptr) {
          cpu::scale(v, row, sp[i] / normaliser);
          if (vp[i]) row[tp[i]] -= sp[i];
        }
      }
    });
    if (grads == nullptr) continue;
    const at::Tensor dlogits = same_dtype ? logits : logits.to(hidden.scalar_type());
    at::Tensor grad_h = grads->hidden.narrow(0, start, rows);
    at::mm_out(grad_h, dlogits, weight);
    if (same_dtype)
      grads->weight.addmm_(dlogits.t(), h);
    else
      grads->weight.add_(at::mm(dlogits.t(), h));
    if (grads->bias.defined()) grads->bias.add_(logits.sum(0));
  }
}

// Per row: 0 if ignored, else 1 (sum) or 1 / (rows not ignored) (mean), times the upstream
// gradient.
at::Tensor row_scales(const at::Tensor& valid, Reduction reduction, const at::Tensor& grad_loss,
                      at::ScalarType acc) {
  at::Tensor scale = valid.to(acc);
  if (reduction == Reduction::Mean)
    scale = scale / scale.sum().clamp_min(1);  // all ignored: 0, as torch
  return grad_loss.defined() ? scale * grad_loss.to(acc) : scale;
}

Gradients new_gradients(const at::Tensor& hidden, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, at::ScalarType acc) {
  return {at::empty(hidden.sizes(), hidden.options()),
          cpu::zeros_on_huge_pages(weight.sizes(), weight.options().dtype(acc)),
          bias.has_value() ? at::zeros(bias->sizes(), bias->options().dtype(acc)) : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(const Gradients& g,
                                                      const at::Tensor& hidden) {
  const auto dtype = hidden.scalar_type();
  return {g.hidden, g.weight.to(dtype),
          g.bias.defined() ? g.bias.to(dtype) : at::empty({0}, hidden.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& target_in,
    const std::optional<at::Tensor>& bias_in, int64_t ignore_index, c10::string_view reduction_name,
    bool compute_grad) {
  const char* op = "linear_cross_entropy";
  const Dims d = check_inputs(op, hidden_in, weight_in, target_in, bias_in);
  const Reduction reduction = parse_reduction(op, reduction_name);
  TORCH_CHECK(!(compute_grad && reduction == Reduction::None), op,
              ": compute_grad needs a scalar loss (reduction 'mean' or 'sum')");
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional(bias_in->contiguous()) : std::nullopt;
  const at::Tensor valid = valid_rows(op, target, d.classes, ignore_index);
  const auto acc = acc_dtype(hidden);
  at::Tensor lse = at::empty({d.rows}, hidden.options().dtype(acc));
  at::Tensor losses = at::empty({d.rows}, lse.options());
  Gradients grads;
  at::Tensor scale;
  if (compute_grad) {
    grads = new_gradients(hidden, weight, bias, acc);
    scale = row_scales(valid, reduction, at::Tensor(), acc);
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "linear_cross_entropy_cpu", [&] {
    run_chunks<scalar_t>(hidden, weight, bias, target, valid, false, lse, &losses, scale,
                         compute_grad ? &grads : nullptr);
  });
  at::Tensor loss = reduction == Reduction::None ? losses
                    : reduction == Reduction::Sum
                        ? losses.sum()
                        : losses.sum() / valid.sum();  // 0/0 = NaN, as torch
  if (!compute_grad) {
    const at::Tensor empty = at::empty({0}, hidden.options());
    return {loss.to(hidden.scalar_type()), lse, empty, at::empty({0}, weight.options()),
            empty.clone()};
  }
  auto [gh, gw, gb] = finish(grads, hidden);
  return {loss.to(hidden.scalar_type()), lse, gh, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden_in, const at::Tensor& weight_in,
    const at::Tensor& target_in, const std::optional<at::Tensor>& bias_in, const at::Tensor& lse_in,
    int64_t ignore_index, c10::string_view reduction_name) {
  const char* op = "_linear_cross_entropy_backward";
  const Dims d = check_inputs(op, hidden_in, weight_in, target_in, bias_in);
  const Reduction reduction = parse_reduction(op, reduction_name);
  const bool per_row = reduction == Reduction::None;
  TORCH_CHECK(
      per_row ? (grad_loss.dim() == 1 && grad_loss.size(0) == d.rows) : grad_loss.dim() == 0, op,
      ": grad_loss has shape ", sizes_str(grad_loss), ", expected ",
      per_row ? "[" + std::to_string(d.rows) + "]" : std::string("[]"));
  const auto acc = acc_dtype(hidden_in);
  TORCH_CHECK(lse_in.scalar_type() == acc && lse_in.dim() == 1 && lse_in.size(0) == d.rows, op,
              ": expected lse of shape [", d.rows, "] and dtype ", acc, ", got ", sizes_str(lse_in),
              " ", lse_in.scalar_type());
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional(bias_in->contiguous()) : std::nullopt;
  const at::Tensor valid = valid_rows(op, target, d.classes, ignore_index);
  at::Tensor lse = lse_in.contiguous();
  Gradients grads = new_gradients(hidden, weight, bias, acc);
  const at::Tensor scale = row_scales(valid, reduction, grad_loss, acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "linear_cross_entropy_backward_cpu", [&] {
    run_chunks<scalar_t>(hidden, weight, bias, target, valid, true, lse, nullptr, scale, &grads);
  });
  return finish(grads, hidden);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_cpu);
  m.impl("_linear_cross_entropy_backward", &linear_cross_entropy_backward_cpu);
}

}  // namespace fastdl::linear_cross_entropy
