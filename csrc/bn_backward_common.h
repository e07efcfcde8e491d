// Checks and layout for the batch-norm backward ops, shared by their CPU and CUDA kernels. Activations
// are addressed as (n, c, hw) with strides (sn, sc, shw): any layout whose (H, W) plane is dense.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

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

inline void check_bn_apply_vectors(const char* op, const at::Tensor& z, const at::Tensor& scale,
                                   const at::Tensor& sum_g, const at::Tensor& sum_gx, int64_t count) {
  check_channel_vector(scale, z.size(1), op, "scale", z);
  check_channel_vector(sum_g, z.size(1), op, "sum_g", z);
  check_channel_vector(sum_gx, z.size(1), op, "sum_gx", z);
  TORCH_CHECK(count > 0, op, ": count must be positive, got ", count);
}

// bn_fold's arguments: four per-channel vectors on one device, any floating dtype each. Returns C.
inline int64_t check_bn_fold(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& gamma,
                             const at::Tensor& beta, c10::DeviceType device) {
  const char* op = "bn_fold";
  TORCH_CHECK(running_mean.dim() == 1, op, ": running_mean must be 1-D (C), got shape ", running_mean.sizes());
  TORCH_CHECK(running_mean.device().type() == device, op, ": the statistics must be on ", device, ", got ",
              running_mean.device());
  const int64_t C = running_mean.size(0);
  check_channel_vector(running_var, C, op, "running_var", running_mean, false);
  check_channel_vector(gamma, C, op, "gamma", running_mean, false);
  check_channel_vector(beta, C, op, "beta", running_mean, false);
  for (const at::Tensor* t : {&running_mean, &running_var, &gamma, &beta})
    TORCH_CHECK(t->is_floating_point(), op, ": the statistics and parameters must be floating point, got ",
                t->scalar_type());
  return C;
}

// bn_finalize's arguments: (tiles, C) float32 partials on one device, per-channel gamma/beta, optional
// running statistics (contiguous, one dtype) and an optional batch count (one int64 element, BatchNorm2d's
// num_batches_tracked). Returns (T, C).
inline std::pair<int64_t, int64_t> check_bn_finalize(const at::Tensor& part_mean, const at::Tensor& part_m2,
                                                     const at::Tensor& part_count, const at::Tensor& gamma,
                                                     const at::Tensor& beta,
                                                     const c10::optional<at::Tensor>& running_mean,
                                                     const c10::optional<at::Tensor>& running_var,
                                                     const c10::optional<at::Tensor>& num_batches_tracked,
                                                     c10::DeviceType device) {
  const char* op = "bn_finalize";
  TORCH_CHECK(part_mean.dim() == 2 && part_m2.sizes() == part_mean.sizes(), op,
              ": part_mean and part_m2 must be (tiles, C) alike, got ", part_mean.sizes(), " and ", part_m2.sizes());
  TORCH_CHECK(part_mean.device().type() == device, op, ": the partials must be on ", device, ", got ",
              part_mean.device());
  const int64_t T = part_mean.size(0), C = part_mean.size(1);
  TORCH_CHECK(T > 0, op, ": no statistics tiles");
  TORCH_CHECK(part_count.dim() == 1 && part_count.size(0) == T, op, ": part_count must be (", T, "), got ",
              part_count.sizes());
  for (const at::Tensor* t : {&part_mean, &part_m2, &part_count})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device() == part_mean.device(), op,
                ": partials must be float32 on ", part_mean.device());
  check_channel_vector(gamma, C, op, "gamma", part_mean, false);
  check_channel_vector(beta, C, op, "beta", part_mean, false);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op, ": running_mean and running_var go together");
  check_channel_vector(running_mean, C, op, "running_mean", part_mean, false);
  check_channel_vector(running_var, C, op, "running_var", part_mean, false);
  if (running_mean.has_value()) {
    TORCH_CHECK(running_mean->is_contiguous() && running_var->is_contiguous() &&
                    running_mean->scalar_type() == running_var->scalar_type(),
                op, ": running_mean and running_var must be contiguous and of one dtype");
  }
  if (num_batches_tracked.has_value()) {
    TORCH_CHECK(num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->numel() == 1 &&
                    num_batches_tracked->device() == part_mean.device(),
                op, ": num_batches_tracked must be one int64 element on ", part_mean.device(), ", got ",
                num_batches_tracked->scalar_type(), " of shape ", num_batches_tracked->sizes(), " on ",
                num_batches_tracked->device());
  }
  return {T, C};
}

}  // namespace fused_resnet
