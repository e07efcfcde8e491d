// bn_act on the CPU: out = act(z * scale[c] + shift[c] (+ residual)).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../bn_act_common.h"
#include "../dispatch.h"

namespace fused_resnet {
namespace {

template <typename in_t, typename out_t>
void bn_act_cpu_impl(const in_t* z, const float* mean, const float* scale, const float* shift, const out_t* res, out_t* out,
                     int64_t numel, int64_t channels, int64_t hw, Layout layout, bool relu) {
  // Rows of C contiguous channels (NHWC) or planes of HW positions of one channel (NCHW): either way the
  // inner loop has a fixed stride-1 pattern the compiler vectorises.
  const int64_t inner = layout == Layout::NHWC ? channels : hw;
  const int64_t outer = numel / inner;
  at::parallel_for(0, outer, std::max<int64_t>(1, 16384 / inner), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int64_t base = o * inner;
      if (layout == Layout::NHWC) {
        for (int64_t c = 0; c < inner; ++c) {
          float v = (static_cast<float>(z[base + c]) - mean[c]) * scale[c] + shift[c];
          if (res) v += static_cast<float>(res[base + c]);
          out[base + c] = static_cast<out_t>(relu ? std::max(v, 0.0f) : v);
        }
      } else {
        const int64_t c = channel_of(base, channels, hw, layout);
        const float m = mean[c], a = scale[c], b = shift[c];
        for (int64_t i = 0; i < inner; ++i) {
          float v = (static_cast<float>(z[base + i]) - m) * a + b;
          if (res) v += static_cast<float>(res[base + i]);
          out[base + i] = static_cast<out_t>(relu ? std::max(v, 0.0f) : v);
        }
      }
    }
  });
}

at::Tensor bn_act_cpu(const at::Tensor& z_in, const at::Tensor& mean_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
                      const c10::optional<at::Tensor>& residual_in, bool relu, at::ScalarType out_dtype) {
  const BnActOperands ops = prepare_bn_act(z_in, mean_in, scale_in, shift_in, residual_in, out_dtype,
                                           c10::DeviceType::CPU);
  const at::Tensor &z = ops.z, &mean = ops.mean, &scale = ops.scale, &shift = ops.shift, &residual = ops.residual;
  const at::Tensor& out = ops.out;
  const Layout layout = ops.layout;
  const int64_t channels = z.size(1), hw = z.size(2) * z.size(3);
  FR_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "bn_act_cpu", [&] {
    using in_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(out_dtype, "bn_act_cpu_out", [&] {
      bn_act_cpu_impl<in_t, scalar_t>(z.const_data_ptr<in_t>(), mean.const_data_ptr<float>(), scale.const_data_ptr<float>(),
                                      shift.const_data_ptr<float>(),
                                      residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
                                      out.mutable_data_ptr<scalar_t>(), z.numel(), channels, hw, layout, relu);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) { m.impl("bn_act", &bn_act_cpu); }

}  // namespace fused_resnet
