// Batch-norm statistics arithmetic shared by the CPU and CUDA finalize kernels: Chan et al.'s merge of
// (count, mean, M2) partials, relative to a shift (the first tile's mean) so a channel mean far from zero
// costs no digits.
#pragma once

#include <cmath>

#include "conv_geometry.h"

namespace fused_resnet {

struct Moments {
  float n = 0.f, mean = 0.f, m2 = 0.f;  // mean is relative to the merge's shift
};

FR_HOST_DEVICE Moments merge(Moments a, Moments b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n;
  const float delta = b.mean - a.mean;
  return {n, a.mean + delta * (b.n / n), a.m2 + b.m2 + delta * delta * (a.n * b.n / n)};
}

// The per-channel result of a finalize: what normalises (scale, shift = beta, mean, invstd) and what the
// running statistics take (mean, unbiased variance).
struct BnFold {
  float scale, shift, mean, invstd, unbiased_var;
};

FR_HOST_DEVICE BnFold fold(Moments m, float shift_mean, float gamma, float beta, float eps) {
  const float mean = m.mean + shift_mean;
  const float invstd = 1.0f / sqrtf(m.m2 / m.n + eps);
  return {gamma * invstd, beta, mean, invstd, m.m2 / (m.n - 1.0f)};
}

}  // namespace fused_resnet
