// conv_fused's argument checks and output allocation, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "checks.h"

namespace fused_resnet {

// Rows of the implicit GEMM that share one (count, mean, M2) statistics partial.
constexpr int64_t kStatsTileRows = 64;

struct ConvProblem {
  int64_t N, C, H, W, K, KH, KW, P, Q, M, SC_C;
};

inline ConvProblem check_conv_fused(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t stride,
    int64_t padding, const c10::optional<at::Tensor>& bn_mean, const c10::optional<at::Tensor>& bn_var,
    const c10::optional<at::Tensor>& bn_gamma, const c10::optional<at::Tensor>& bn_beta,
    const c10::optional<at::Tensor>& in_mean, const c10::optional<at::Tensor>& in_scale,
    const c10::optional<at::Tensor>& in_shift, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& sc_x, const c10::optional<at::Tensor>& sc_weight,
    const c10::optional<at::Tensor>& sc_bias, int64_t sc_stride, at::ScalarType out_dtype, c10::DeviceType device) {
  const char* op = "conv_fused";
  check_activation(x, op, "x", x);
  TORCH_CHECK(x.device().type() == device, op, ": x must be on ", device, ", got ", x.device());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == weight.size(3),
              op, ": weight must be (K, ", x.size(1), ", k, k) for x's ", x.size(1), " channels, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(stride >= 1 && padding >= 0, op, ": stride must be >= 1 and padding >= 0, got ", stride, ", ", padding);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              op, ": out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  ConvProblem pb{};
  pb.N = x.size(0), pb.C = x.size(1), pb.H = x.size(2), pb.W = x.size(3);
  pb.K = weight.size(0), pb.KH = weight.size(2), pb.KW = weight.size(3);
  pb.P = conv_out_size(pb.H, pb.KH, stride, padding), pb.Q = conv_out_size(pb.W, pb.KW, stride, padding);
  TORCH_CHECK(pb.P > 0 && pb.Q > 0, op, ": the input ", x.sizes(), " is smaller than the kernel");
  pb.M = pb.N * pb.P * pb.Q;
  check_channel_vector(bias, pb.K, op, "bias", x, false);
  TORCH_CHECK(bn_mean.has_value() == bn_var.has_value() && bn_mean.has_value() == bn_gamma.has_value() &&
                  bn_mean.has_value() == bn_beta.has_value(),
              op, ": bn_mean, bn_var, bn_gamma and bn_beta go together");
  for (auto* v : {&bn_mean, &bn_var, &bn_gamma, &bn_beta}) check_channel_vector(*v, pb.K, op, "a bn vector", x, false);
  TORCH_CHECK(in_mean.has_value() == in_scale.has_value() && in_mean.has_value() == in_shift.has_value(),
              op, ": in_mean, in_scale and in_shift go together");
  check_channel_vector(in_mean, pb.C, op, "in_mean", x);
  check_channel_vector(in_scale, pb.C, op, "in_scale", x);
  check_channel_vector(in_shift, pb.C, op, "in_shift", x);
  if (residual.has_value()) {
    check_activation(*residual, op, "residual", x);
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({pb.N, pb.K, pb.P, pb.Q}), op, ": residual must have the output's "
                "shape (", pb.N, ", ", pb.K, ", ", pb.P, ", ", pb.Q, "), got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == out_dtype, op, ": residual must have dtype out_dtype (", out_dtype,
                "), got ", residual->scalar_type());
  }
  pb.SC_C = 0;
  if (sc_weight.has_value()) {
    TORCH_CHECK(sc_x.has_value(), op, ": sc_weight needs sc_x");
    check_activation(*sc_x, op, "sc_x", x);
    TORCH_CHECK(sc_x->scalar_type() == x.scalar_type(), op, ": sc_x must have x's dtype");
    pb.SC_C = sc_x->size(1);
    TORCH_CHECK(sc_weight->dim() == 4 && sc_weight->size(0) == pb.K && sc_weight->size(1) == pb.SC_C &&
                    sc_weight->size(2) == 1 && sc_weight->size(3) == 1,
                op, ": sc_weight must be (", pb.K, ", ", pb.SC_C, ", 1, 1), got ", sc_weight->sizes());
    TORCH_CHECK(sc_weight->scalar_type() == x.scalar_type(), op, ": sc_weight must have x's dtype");
    TORCH_CHECK(conv_out_size(sc_x->size(2), 1, sc_stride, 0) == pb.P &&
                    conv_out_size(sc_x->size(3), 1, sc_stride, 0) == pb.Q && sc_x->size(0) == pb.N,
                op, ": sc_x ", sc_x->sizes(), " at stride ", sc_stride, " does not give the output's ", pb.P, "x", pb.Q);
    check_channel_vector(sc_bias, pb.K, op, "sc_bias", x, false);
  }
  return pb;
}

// conv_fused's outputs, allocated in the layout eager's convolution gives for x; unused ones are empty.
// im2col: checks and the (N * P * Q, C * kernel * kernel) output.
struct Im2colProblem {
  int64_t N, C, H, W, P, Q;
};

inline Im2colProblem check_im2col(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t padding,
                                  c10::DeviceType device) {
  const char* op = "im2col";
  check_activation(x, op, "x", x);
  TORCH_CHECK(x.device().type() == device, op, ": x must be on ", device, ", got ", x.device());
  TORCH_CHECK(kernel >= 1 && stride >= 1 && padding >= 0, op, ": need kernel >= 1, stride >= 1, padding >= 0, got ",
              kernel, ", ", stride, ", ", padding);
  const int64_t P = conv_out_size(x.size(2), kernel, stride, padding), Q = conv_out_size(x.size(3), kernel, stride, padding);
  TORCH_CHECK(P > 0 && Q > 0, op, ": a ", kernel, "x", kernel, " kernel does not fit the ", x.size(2), "x", x.size(3),
              " input with padding ", padding);
  return {x.size(0), x.size(1), x.size(2), x.size(3), P, Q};
}

inline Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

struct ConvOutputs {
  at::Tensor out, sc_out, pmean, pm2, pcount, sc_pmean, sc_pm2;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {out, sc_out, pmean, pm2, pcount, sc_pmean, sc_pm2};
  }
};

// `reuse_out` / `reuse_sc`, when defined, are private temporaries of the kernel (already of the output's
// shape, dtype and layout) that the epilogue overwrites element by element: returned instead of new memory.
// `sc_stats` (the shortcut's statistics, which needs `shortcut_out`) brings the main statistics' tiles and
// counts with it.
inline ConvOutputs allocate_conv_outputs(const at::Tensor& x, const ConvProblem& pb, at::ScalarType out_dtype,
                                         bool shortcut_out, bool stats, bool sc_stats, const at::Tensor& reuse_out = {},
                                         const at::Tensor& reuse_sc = {}) {
  const auto f32 = x.options().dtype(at::kFloat);
  ConvOutputs o;
  o.out = reuse_out.defined()
              ? reuse_out
              : at::empty({pb.N, pb.K, pb.P, pb.Q}, x.options().dtype(out_dtype).memory_format(conv_output_format(x)));
  o.sc_out = !shortcut_out ? at::empty({0}, f32) : reuse_sc.defined() ? reuse_sc : at::empty_like(o.out);
  const int64_t tiles = (pb.M + kStatsTileRows - 1) / kStatsTileRows;
  stats = stats || sc_stats;
  o.pmean = stats ? at::empty({tiles, pb.K}, f32) : at::empty({0}, f32);
  o.pm2 = stats ? at::empty({tiles, pb.K}, f32) : at::empty({0}, f32);
  o.pcount = stats ? at::empty({tiles}, f32) : at::empty({0}, f32);
  o.sc_pmean = sc_stats ? at::empty({tiles, pb.K}, f32) : at::empty({0}, f32);
  o.sc_pm2 = sc_stats ? at::empty({tiles, pb.K}, f32) : at::empty({0}, f32);
  return o;
}

}  // namespace fused_resnet
