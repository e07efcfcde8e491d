// ReLU and its backward, shared by the CPU and CUDA kernels (host and device inline functions) so both
// treat NaN exactly as PyTorch does: torch.relu keeps a NaN (fmaxf(v, 0) would turn it into 0), and
// aten's threshold_backward zeroes the gradient only where the forward value is <= 0 (a NaN value passes
// its gradient through). Written as selects, so the CPU loops stay branch-free and vectorise.
#pragma once

#include "conv_geometry.h"

namespace fused_resnet {

FR_HOST_DEVICE float relu_keep_nan(float v) { return v < 0.0f ? 0.0f : v; }

FR_HOST_DEVICE float relu_grad(float g, float forward_value) { return forward_value <= 0.0f ? 0.0f : g; }

}  // namespace fused_resnet
