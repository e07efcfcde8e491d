// Dtype dispatch over the three dtypes the kernels support (no float64: it would only add instantiations).
#pragma once

#include <ATen/Dispatch.h>

#define FR_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)          \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)       \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
