// Argument checks and layout detection for bn_act, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "conv_geometry.h"

namespace fused_resnet {

inline bool is_nhwc_dense(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// Validates bn_act's arguments and returns the layout the kernel will use (that of `z`, made dense).
inline Layout check_bn_act(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale,
                           const at::Tensor& shift, const c10::optional<at::Tensor>& residual,
                           const c10::optional<at::Tensor>& res_mean, const c10::optional<at::Tensor>& res_scale,
                           const c10::optional<at::Tensor>& res_shift, at::ScalarType out_dtype,
                           c10::DeviceType device) {
  TORCH_CHECK(z.dim() == 4, "bn_act: z must be 4-D (N, C, H, W), got ", z.dim(), "-D");
  TORCH_CHECK(z.device().type() == device, "bn_act: z must be on ", device, ", got ", z.device());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()) && z.scalar_type() != at::kDouble,
              "bn_act: z must be float32, float16 or bfloat16, got ", z.scalar_type());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "bn_act: out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  const int64_t c = z.size(1);
  auto check_vector = [&](const at::Tensor& v, const char* name) {
    TORCH_CHECK(v.dim() == 1 && v.size(0) == c, "bn_act: ", name, " must have shape (", c, "), got ", v.sizes());
    TORCH_CHECK(v.scalar_type() == at::kFloat, "bn_act: ", name, " must be float32, got ", v.scalar_type());
    TORCH_CHECK(v.device() == z.device(), "bn_act: ", name, " must be on ", z.device(), ", got ", v.device());
  };
  check_vector(mean, "mean"), check_vector(scale, "scale"), check_vector(shift, "shift");
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == z.sizes(), "bn_act: residual must have z's shape ", z.sizes(), ", got ",
                residual->sizes());
    TORCH_CHECK(residual->device() == z.device(), "bn_act: residual must be on ", z.device(), ", got ",
                residual->device());
  }
  TORCH_CHECK(res_mean.has_value() == res_scale.has_value() && res_mean.has_value() == res_shift.has_value(),
              "bn_act: res_mean, res_scale and res_shift go together");
  if (res_mean.has_value()) {
    TORCH_CHECK(residual.has_value(), "bn_act: res_mean, res_scale and res_shift need a residual");
    check_vector(*res_mean, "res_mean"), check_vector(*res_scale, "res_scale"), check_vector(*res_shift, "res_shift");
    TORCH_CHECK(residual->scalar_type() == z.scalar_type(), "bn_act: a residual with its own batch norm must have "
                "z's dtype (", z.scalar_type(), "), got ", residual->scalar_type());
  } else if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == out_dtype, "bn_act: residual must have dtype out_dtype (", out_dtype,
                "), got ", residual->scalar_type());
  }
  return is_nhwc_dense(z) ? Layout::NHWC : Layout::NCHW;
}

inline at::MemoryFormat memory_format_of(Layout layout) {
  return layout == Layout::NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// bn_act's operands made dense in z's layout, and its output allocated: what both kernels start from.
// A residual with its own batch norm (res_scale defined) has z's dtype; a plain one has out_dtype.
struct BnActOperands {
  Layout layout;
  at::Tensor z, mean, scale, shift, residual, res_mean, res_scale, res_shift, out;
};

inline BnActOperands prepare_bn_act(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale,
                                    const at::Tensor& shift, const c10::optional<at::Tensor>& residual,
                                    const c10::optional<at::Tensor>& res_mean,
                                    const c10::optional<at::Tensor>& res_scale,
                                    const c10::optional<at::Tensor>& res_shift, at::ScalarType out_dtype,
                                    c10::DeviceType device) {
  const Layout layout = check_bn_act(z, mean, scale, shift, residual, res_mean, res_scale, res_shift, out_dtype,
                                     device);
  const auto fmt = memory_format_of(layout);
  BnActOperands ops{layout, z.contiguous(fmt), mean.contiguous(), scale.contiguous(), shift.contiguous(),
                    {},     {},                {},                {},                 {}};
  if (residual.has_value()) ops.residual = residual->contiguous(fmt);
  if (res_mean.has_value())
    ops.res_mean = res_mean->contiguous(), ops.res_scale = res_scale->contiguous(), ops.res_shift = res_shift->contiguous();
  ops.out = at::empty(z.sizes(), z.options().dtype(out_dtype).memory_format(fmt));
  return ops;
}

}  // namespace fused_resnet
