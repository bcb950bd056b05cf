// attention on the CPU: argument checks, the conversion of the inputs to the compute dtype and
// layout the kernels read, and the registration. The kernels: forward.cpp and backward.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common/checks.h"
#include "ops/attention/cpu/attention_cpu.h"

namespace fastdl::attention {

Shape check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& mask, double scale, double dropout_p) {
  check_rank(op, "q", q, 4, "[B, H, Nq, D]");
  check_rank(op, "k", k, 4, "[B, Hkv, Nk, D]");
  check_rank(op, "v", v, 4, "[B, Hkv, Nk, D]");
  Shape s{q.size(0), q.size(1), k.size(1), 1, q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(s.D >= 8 && s.D <= 256 && s.D % 8 == 0, op, ": unsupported head dim D=", s.D,
              " (q shape ", sizes_str(q), "); supported: multiples of 8 from 8 to 256");
  TORCH_CHECK(k.size(3) == s.D && v.size(3) == s.D, op, ": head dims differ: q has D=", s.D,
              ", k has D=", k.size(3), ", v has D=", v.size(3));
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, op, ": batch sizes differ: q has B=", s.B,
              ", k has B=", k.size(0), ", v has B=", v.size(0));
  TORCH_CHECK(v.size(1) == s.Hkv && v.size(2) == s.Nk, op,
              ": k and v must have the same [Hkv, Nk], got k ", sizes_str(k), " and v ",
              sizes_str(v));
  TORCH_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, op, ": the number of query heads H=", s.H,
              " must be a multiple of the key/value heads Hkv=", s.Hkv);
  s.G = s.H / s.Hkv;
  check_same_dtype(op, "q", q, "k", k);
  check_same_dtype(op, "q", q, "v", v);
  check_same_device(op, "q", q, "k", k);
  check_same_device(op, "q", q, "v", v);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, op,
              ": q has unsupported dtype ", dtype,
              " on cpu; supported: float32, float64, bfloat16 (float16 only on CUDA)");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                ": attn_mask must be boolean or floating, got dtype ", m.scalar_type());
    check_same_device(op, "attn_mask", m, "q", q);
    const int64_t target[4] = {s.B, s.H, s.Nq, s.Nk};
    bool ok = m.dim() <= 4;
    for (int64_t i = 0; ok && i < m.dim(); ++i) {
      const int64_t size = m.size(m.dim() - 1 - i);
      ok = size == 1 || size == target[3 - i];
    }
    TORCH_CHECK(ok, op, ": attn_mask of shape ", sizes_str(m),
                " is not broadcastable to [B, H, Nq, Nk] = [", s.B, ", ", s.H, ", ", s.Nq, ", ",
                s.Nk, "]");
  }
  return s;
}

at::Tensor prepare(const at::Tensor& t, at::ScalarType dtype) {
  auto r = t.to(dtype);
  if (r.stride(3) != 1 || (r.size(2) > 1 && r.stride(2) < r.size(3))) r = r.contiguous();
  return r;
}

at::Tensor additive_mask(const std::optional<at::Tensor>& mask, const Shape& s,
                         at::ScalarType dtype) {
  if (!mask.has_value()) return at::Tensor();
  const auto& m = *mask;
  at::Tensor add;
  if (m.scalar_type() == at::kBool) {
    add = at::zeros(m.sizes(), m.options().dtype(dtype))
              .masked_fill_(m.logical_not(), -std::numeric_limits<double>::infinity());
  } else {
    const auto values = m.to(dtype);
    const double limit = dtype == at::kDouble ? std::numeric_limits<double>::max()
                                              : std::numeric_limits<float>::max();
    const auto scaled = values * kLog2e;
    add = at::where(at::isfinite(values), scaled.clamp(-limit, limit), scaled);
  }
  return add.expand({s.B, s.H, s.Nq, s.Nk});
}

namespace {

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& attn_mask,
                                                 bool causal, double scale, double dropout_p,
                                                 int64_t seed) {
  const auto sh = check_inputs("attention", q, k, v, attn_mask, scale, dropout_p);
  const auto ct = compute_type(q.scalar_type());
  auto out = at::zeros({sh.B, sh.H, sh.Nq, sh.D}, q.options().dtype(ct));
  auto lse = at::full({sh.B, sh.H, sh.Nq}, -std::numeric_limits<double>::infinity(),
                      q.options().dtype(ct));
  if (out.numel() > 0 && sh.Nk > 0) {
    const auto qc = prepare(q, ct), kc = prepare(k, ct), vc = prepare(v, ct);
    const auto mask = additive_mask(attn_mask, sh, ct);
    const bool bool_mask = attn_mask && attn_mask->scalar_type() == at::kBool;
    const Options o{causal, scale, Dropout(dropout_p, seed)};
    AT_DISPATCH_FLOATING_TYPES(ct, "attention_cpu", [&] {
      forward_kernel<scalar_t>(
          sh, o, qc.const_data_ptr<scalar_t>(), Strides(qc), kc.const_data_ptr<scalar_t>(),
          Strides(kc), vc.const_data_ptr<scalar_t>(), Strides(vc),
          MaskView<scalar_t>(mask, bool_mask), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
    });
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, bool causal, double scale, double dropout_p,
    int64_t seed) {
  const char* op = "attention_backward";
  const auto sh = check_inputs(op, q, k, v, attn_mask, scale, dropout_p);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": expected grad_out and out of shape ", sizes_str(q), ", got ", sizes_str(grad_out),
              " and ", sizes_str(out));
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == sh.B && lse.size(1) == sh.H && lse.size(2) == sh.Nq,
              op, ": expected lse of shape [", sh.B, ", ", sh.H, ", ", sh.Nq, "], got ",
              sizes_str(lse));
  const auto ct = compute_type(q.scalar_type());
  auto dq = at::zeros({sh.B, sh.H, sh.Nq, sh.D}, q.options().dtype(ct));
  auto dk = at::zeros({sh.B, sh.Hkv, sh.Nk, sh.D}, q.options().dtype(ct));
  auto dv = at::zeros({sh.B, sh.Hkv, sh.Nk, sh.D}, q.options().dtype(ct));
  if (dq.numel() > 0 && sh.Nk > 0) {
    const auto qc = prepare(q, ct), kc = prepare(k, ct), vc = prepare(v, ct);
    const auto doc = prepare(grad_out, ct), oc = prepare(out, ct);
    const auto lse_c = lse.to(ct).contiguous();
    at::Tensor glse;
    if (grad_lse.has_value() && grad_lse->defined()) glse = grad_lse->to(ct).contiguous();
    const auto mask = additive_mask(attn_mask, sh, ct);
    const bool bool_mask = attn_mask && attn_mask->scalar_type() == at::kBool;
    const Options o{causal, scale, Dropout(dropout_p, seed)};
    AT_DISPATCH_FLOATING_TYPES(ct, "attention_backward_cpu", [&] {
      backward_kernel<scalar_t>(
          sh, o, qc.const_data_ptr<scalar_t>(), Strides(qc), kc.const_data_ptr<scalar_t>(),
          Strides(kc), vc.const_data_ptr<scalar_t>(), Strides(vc),
          MaskView<scalar_t>(mask, bool_mask), doc.const_data_ptr<scalar_t>(), Strides(doc),
          oc.const_data_ptr<scalar_t>(), Strides(oc), lse_c.const_data_ptr<scalar_t>(),
          glse.defined() ? glse.const_data_ptr<scalar_t>() : nullptr, dq.data_ptr<scalar_t>(),
          dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
    });
  }
  const auto dtype = q.scalar_type();
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("_attention_backward", &attention_backward_cpu);
}

}  // namespace fastdl::attention
