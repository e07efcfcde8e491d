// A per-channel parameter vector (a bias, batch norm's gamma, beta or running statistics) as the CPU and
// CUDA kernels read it: in its own dtype, converted to float32 on load. A float16 or bfloat16 model's
// parameters then cost no conversion operator per call (on a GPU: no conversion kernel per parameter).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "checks.h"
#include "conv_geometry.h"

namespace fused_resnet {

struct ParamVec {
  const void* p = nullptr;  // null: absent
  int dtype = 0;            // 0 float32, 1 float16, 2 bfloat16

  FR_HOST_DEVICE float load(int64_t i) const {
    switch (dtype) {
      case 1:
        return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
      case 2:
        return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
      default:
        return static_cast<const float*>(p)[i];
    }
  }

  // Elements k0 .. k0 + N - 1 into `out`: `fill` past `n` and when absent. One dtype branch for the N
  // loads (a branch per load costs a kernel registers).
  template <int N>
  FR_HOST_DEVICE void load_n(int64_t k0, int64_t n, float (&out)[N], float fill) const {
    if (p == nullptr) {
      for (int j = 0; j < N; ++j) out[j] = fill;
      return;
    }
    auto read = [&](auto typed) {
      for (int j = 0; j < N; ++j) out[j] = k0 + j < n ? static_cast<float>(typed[k0 + j]) : fill;
    };
    if (dtype == 1)
      read(static_cast<const c10::Half*>(p));
    else if (dtype == 2)
      read(static_cast<const c10::BFloat16*>(p));
    else
      read(static_cast<const float*>(p));
  }
};

// `v` (or nothing) as a ParamVec: the tensor itself when contiguous in one of the three dtypes, else a
// contiguous float32 copy, held by `keep` for the call.
inline ParamVec param_vec(const c10::optional<at::Tensor>& v, at::Tensor& keep) {
  if (!v.has_value()) return {};
  const at::ScalarType t = v->scalar_type();
  const int code = t == at::kFloat ? 0 : t == at::kHalf ? 1 : t == at::kBFloat16 ? 2 : -1;
  if (code >= 0 && v->is_contiguous()) return {v->const_data_ptr(), code};
  keep = as_f32(*v);
  return {keep.const_data_ptr(), 0};
}

}  // namespace fused_resnet
