// Operator schemas of the fused_resnet extension: one place. Kernels register per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "fast_call.h"

extern "C" {
// Importing fused_resnet._C loads this library, which runs the registrations below; the ops live in
// torch.ops.fused_resnet, the module holds resolve() and call() (fast_call.cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          fused_resnet::fast_call_methods()};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_resnet, m) {
  // out = act((z - mean[c]) * scale[c] + shift[c] (+ residual)), per channel c; float32 arithmetic; out in
  // out_dtype. Centring first keeps the precision a folded z * scale + shift' loses when |mean| >> std.
  // With res_mean/res_scale/res_shift the residual takes its own batch norm first:
  // (residual - res_mean[c]) * res_scale[c] + res_shift[c] (a shortcut convolution followed by BN).
  m.def("bn_act(Tensor z, Tensor mean, Tensor scale, Tensor shift, Tensor? residual, bool relu, "
        "ScalarType out_dtype, Tensor? res_mean=None, Tensor? res_scale=None, Tensor? res_shift=None) -> Tensor");
  // Implicit-GEMM convolution (3x3 or 1x1) with the fused prologue and epilogue of DESIGN.md section 2:
  // x -> relu((x - in_mean) * in_scale + in_shift) as loaded (padding after it); out = conv + bias, BN
  // folded from (bn_mean, bn_var, bn_gamma, bn_beta, bn_eps) when given, per-tile (mean, M2, count)
  // statistics when `stats`, the 1x1 shortcut conv of sc_x (+ sc_bias when given) added (or returned when
  // sc_separate, with its own per-tile statistics when sc_stats), + residual, ReLU. Returns (out, shortcut,
  // part_mean, part_m2, part_count, sc_part_mean, sc_part_m2); unused ones are empty.
  const std::string conv_fused_schema =
      "(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, Tensor? bn_mean, "
      "Tensor? bn_var, Tensor? bn_gamma, Tensor? bn_beta, float bn_eps, Tensor? in_mean, Tensor? in_scale, "
      "Tensor? in_shift, Tensor? residual, Tensor? sc_x, Tensor? sc_weight, Tensor? sc_bias, int sc_stride, "
      "bool sc_separate, bool relu, bool stats, ScalarType out_dtype, bool sc_stats=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";
  m.def(("conv_fused" + conv_fused_schema).c_str());
  // fused_resnet::triton_conv_fused (the Triton backend's operator), its calls replayed from C++ after a key's
  // first (csrc/replay.h): what the Triton backend's eager calls that want the statistics call. Not
  // differentiable.
  m.def(("replayed_triton_conv_fused" + conv_fused_schema).c_str());
  // Its first result (out) alone: what eager inference calls (no tensor made for the six empty results).
  const std::string conv_out_schema = conv_fused_schema.substr(0, conv_fused_schema.rfind("->")) + "-> Tensor";
  m.def(("replayed_triton_conv_out" + conv_out_schema).c_str());
  // The CUDA conv_fused's launch configuration, for reading its kernels without a GPU (kernel_report.py:
  // the library holds their static shared memory only): threads per CTA, dynamic shared memory of the
  // tensor-core loops and of the SIMT loop (bytes), tile rows and columns, reduction slice bytes, ring stages.
  // Defined by builds with the CUDA kernels.
  m.def("cuda_conv_config() -> int[]");
  // The gather conv_fused performs, as a matrix: row n * P * Q + p * Q + q, column (c * kernel + r) * kernel +
  // s (F.unfold's order), zeros in the padding. For tests and for inspecting the addressing.
  m.def("im2col(Tensor x, int kernel, int stride, int padding) -> Tensor");
  // Merge per-tile statistics into (scale, shift, mean, invstd) per channel, y = (z - mean) * scale + shift;
  // updates the running statistics in place (unbiased variance) when they are given, and counts the batch in
  // num_batches_tracked (one int64 element) when it is given: BatchNorm2d's add_(1) without a launch of its own.
  m.def("bn_finalize(Tensor part_mean, Tensor part_m2, Tensor part_count, Tensor gamma, Tensor beta, float eps, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, Tensor(c!)? num_batches_tracked=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // A BN's fixed statistics folded with gamma and beta in one launch -- what a block in training normalises with
  // where a BN is in eval mode (frozen statistics): (scale, shift, mean, invstd) per channel, float32, with
  // invstd = 1 / sqrt(running_var + eps), scale = gamma * invstd, shift = beta, mean = running_mean (bn_finalize's
  // arithmetic for one tile of count 1). Every input in its own dtype.
  m.def("bn_fold(Tensor running_mean, Tensor running_var, Tensor gamma, Tensor beta, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Per-channel sum(gm) and sum(gm * xhat), gm = where(mask_src <= 0, 0, grad) (ReLU's backward, as aten's
  // threshold_backward: a NaN mask_src passes its gradient), xhat = (z - mean) * invstd.
  m.def("bn_backward_reduce(Tensor grad, Tensor mask_src, Tensor z, Tensor mean, Tensor invstd) -> (Tensor, Tensor)");
  // dz = scale * (gm - sum_g / count - xhat * sum_gx / count) (batch statistics) or scale * gm, and gm.
  m.def("bn_backward_apply(Tensor grad, Tensor mask_src, Tensor z, Tensor mean, Tensor invstd, Tensor scale, "
        "Tensor sum_g, Tensor sum_gx, int count, bool batch_stats, bool want_gm) -> (Tensor, Tensor)");
  // The block in training as C++ autograd nodes (csrc/block_train.cpp): primitives composed in C++, those
  // above or, with primitives="triton_", the Triton backend's operators of the same schemas
  // (fused_resnet::triton_conv_fused, ...). tensors: x, x_res, then (weight, bias, gamma, beta) per chain conv
  // and BN, then the shortcut's; config and eps_factors as that file's Plan says. Updates the running
  // statistics of BNs with factor >= 0 and counts the batch in their batch_counts entries (num_batches_tracked)
  // given.
  m.def("block_train(Tensor?[] tensors, Tensor[] kernel_weights, Tensor(a!)?[] running_means, "
        "Tensor(b!)?[] running_vars, Tensor(c!)?[] batch_counts, int[] config, float[] eps_factors, "
        "str primitives=\"\") -> Tensor");
}
