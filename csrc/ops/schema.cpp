// Every fastdl operator's schema, in one place. Kernels register per backend next to their
// code (csrc/ops/<op>/cpu.cpp, cuda.cu); the plain-PyTorch composites, fake kernels and
// autograd formulas sit beside the Python wrappers in python/fastdl/ops/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(fastdl, m) {
  // ---- detection ------------------------------------------------------------------------
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width) -> (Tensor, Tensor)");
  m.def(
      "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
      "SymInt height, SymInt width) -> Tensor");
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  // ---- convolution ----------------------------------------------------------------------
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, str? activation, Tensor? winograd_weight=None, "
      "Tensor? residual=None) -> Tensor");
  m.def(
      "_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, "
      "Tensor)");
  // ---- attention ------------------------------------------------------------------------
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool causal, float scale, "
      "float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def(
      "_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, "
      "Tensor out, Tensor lse, Tensor? grad_lse, bool causal, float scale, float dropout_p, "
      "int seed) -> (Tensor, Tensor, Tensor)");
  // ---- transformer blocks ---------------------------------------------------------------
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  // residual_out is input + residual (empty without a residual); mean and rstd are per row.
  m.def(
      "layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, "
      "Tensor? residual, float eps) -> (Tensor output, Tensor residual_out, Tensor mean, "
      "Tensor rstd)");
  m.def(
      "_layer_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor rstd, SymInt[] normalized_shape, bool[3] output_mask) -> (Tensor grad_input, "
      "Tensor grad_weight, Tensor grad_bias)");
  // With compute_grad (scalar reductions only) the gradients of a unit loss come out of the
  // forward pass; otherwise they are empty and _linear_cross_entropy_backward recomputes.
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, "
      "int ignore_index, str reduction, bool compute_grad) -> (Tensor loss, Tensor lse, "
      "Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "_linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, "
      "Tensor target, Tensor? bias, Tensor lse, int ignore_index, str reduction) -> "
      "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // ---- recurrent ------------------------------------------------------------------------
  m.def(
      "lstm_layer(Tensor input, Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse, "
      "bool save_activations) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, "
      "Tensor cells)");
  m.def(
      "_lstm_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
      "Tensor output, Tensor gates, Tensor cells, bool reverse) -> (Tensor grad_input, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, "
      "Tensor grad_w_hr)");
}
