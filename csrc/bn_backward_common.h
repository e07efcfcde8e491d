// Checks and layout for the batch-norm backward ops, shared by their CPU and CUDA kernels. Activations
// are addressed as (n, c, hw) with strides (sn, sc, shw): any layout whose (H, W) plane is dense.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace fused_resnet {

struct Plane {
  int64_t n, c, hw;  // strides
};

// The (n, c, hw) strides of `t` made plane-dense (NCHW or channels_last, as t already is).
inline at::Tensor plane_dense(const at::Tensor& t) {
  const bool ok = t.size(3) == 1 || t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3);
  return ok ? t : t.contiguous(conv_output_format(t));
}

inline Plane plane_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.size(3) == 1 ? t.stride(2) : t.stride(3)};
}

inline void check_bn_backward(const char* op, const at::Tensor& grad, const at::Tensor& mask_src, const at::Tensor& z,
                              const at::Tensor& mean, const at::Tensor& invstd, c10::DeviceType device) {
  check_activation(z, op, "z", z);
  TORCH_CHECK(z.device().type() == device, op, ": z must be on ", device, ", got ", z.device());
  for (const at::Tensor* t : {&grad, &mask_src}) {
    const char* name = t == &grad ? "grad" : "mask_src";
    check_activation(*t, op, name, z);
    TORCH_CHECK(t->sizes() == z.sizes(), op, ": ", name, " must have z's shape ", z.sizes(), ", got ", t->sizes());
  }
  check_channel_vector(mean, z.size(1), op, "mean", z);
  check_channel_vector(invstd, z.size(1), op, "invstd", z);
}

}  // namespace fused_resnet
