// bn_act on the CPU: out = act(z * scale[c] + shift[c] (+ residual)).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../bn_act_common.h"
#include "../dispatch.h"
#include "loops.h"

namespace fused_resnet {
namespace {

// One unit-stride span: channel constants per element (PER: the channels of one NHWC row) or one set for
// the span (the positions of one NCHW channel). Branch-free, so it vectorises.
template <bool PER, bool RES, bool RELU, typename in_t, typename out_t>
void bn_act_span(const in_t* __restrict z, const out_t* __restrict res, out_t* __restrict out,
                 const float* __restrict mean, const float* __restrict scale, const float* __restrict shift,
                 int64_t len) {
  const float m0 = mean[0], a0 = scale[0], b0 = shift[0];
  for (int64_t i = 0; i < len; ++i) {
    float v = PER ? (cpu::ld(z, i) - mean[i]) * scale[i] + shift[i] : (cpu::ld(z, i) - m0) * a0 + b0;
    if (RES) v += cpu::ld(res, i);
    out[i] = static_cast<out_t>(RELU ? cpu::relu_keep_nan(v) : v);
  }
}

template <bool RES, bool RELU, typename in_t, typename out_t>
void bn_act_cpu_impl(const in_t* z, const float* mean, const float* scale, const float* shift, const out_t* res,
                     out_t* out, int64_t numel, int64_t channels, int64_t hw, Layout layout) {
  // Runs of C contiguous channels (NHWC) or of HW positions of one channel (NCHW): conv_geometry.h.
  const Runs runs = runs_of(numel / (channels * hw), channels, hw, layout);
  const int64_t inner = runs.inner;
  at::parallel_for(0, runs.outer, std::max<int64_t>(1, 16384 / inner), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int64_t base = o * inner, c = run_channel(o, channels, layout);
      const out_t* r = RES ? res + base : nullptr;
      if (c < 0) {
        bn_act_span<true, RES, RELU>(z + base, r, out + base, mean, scale, shift, inner);
      } else {
        bn_act_span<false, RES, RELU>(z + base, r, out + base, mean + c, scale + c, shift + c, inner);
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
  if (z.numel() == 0) return out;
  FR_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "bn_act_cpu", [&] {
    using in_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(out_dtype, "bn_act_cpu_out", [&] {
      const in_t* zp = z.const_data_ptr<in_t>();
      const float *mp = mean.const_data_ptr<float>(), *ap = scale.const_data_ptr<float>(),
                  *bp = shift.const_data_ptr<float>();
      const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const int64_t n = z.numel();
      if (rp && relu) bn_act_cpu_impl<true, true>(zp, mp, ap, bp, rp, op, n, channels, hw, layout);
      else if (rp) bn_act_cpu_impl<true, false>(zp, mp, ap, bp, rp, op, n, channels, hw, layout);
      else if (relu) bn_act_cpu_impl<false, true>(zp, mp, ap, bp, rp, op, n, channels, hw, layout);
      else bn_act_cpu_impl<false, false>(zp, mp, ap, bp, rp, op, n, channels, hw, layout);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) { m.impl("bn_act", &bn_act_cpu); }

}  // namespace fused_resnet
