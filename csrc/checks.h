// Argument checks shared by the CPU and CUDA kernels: each names the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "conv_geometry.h"

namespace fused_resnet {

inline void check_activation(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_channel_vector(const c10::optional<at::Tensor>& v, int64_t c, const char* op, const char* name,
                                 const at::Tensor& like, bool float32_only = true) {
  if (!v.has_value()) return;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == c, op, ": ", name, " must have shape (", c, "), got ", v->sizes());
  TORCH_CHECK(v->device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", v->device());
  TORCH_CHECK(!float32_only || v->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              v->scalar_type());
}

// `v` as contiguous float32: itself when it already is (no operator dispatched, nothing copied: this runs
// on every call of every op, and a no-op `to()` still costs a dispatch), else a converted copy.
inline at::Tensor as_f32(const at::Tensor& v) {
  return v.scalar_type() == at::kFloat && v.is_contiguous() ? v : v.to(at::kFloat).contiguous();
}

inline at::MemoryFormat conv_output_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

}  // namespace fused_resnet
