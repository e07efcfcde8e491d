// bn_act on the CPU: out = act(z * scale[c] + shift[c] (+ residual)).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../bn_act_common.h"
#include "../dispatch.h"
#include "loops.h"

namespace fused_resnet {
namespace {

// The residual a span adds: none, as it is (in the output dtype), or through its own batch norm (in z's
// dtype: a shortcut convolution's output).
enum Res { kNoRes = 0, kRes = 1, kResBn = 2 };

// Per-channel constants of a span: (mean, scale, shift) of z and of a BN'd residual; per element (PER: the
// channels of one NHWC row) or one set for the span (the positions of one NCHW channel).
struct Consts {
  const float *mean, *scale, *shift, *rmean, *rscale, *rshift;
  Consts at(int64_t c) const {
    return {mean + c, scale + c, shift + c, rmean ? rmean + c : nullptr, rscale ? rscale + c : nullptr,
            rshift ? rshift + c : nullptr};
  }
};

// One unit-stride span. Branch-free, so it vectorises.
template <bool PER, int RES, bool RELU, typename in_t, typename out_t>
void bn_act_span(const in_t* __restrict z, const void* __restrict res, out_t* __restrict out, Consts k,
                 int64_t len) {
  const float* __restrict mean = k.mean;
  const float* __restrict scale = k.scale;
  const float* __restrict shift = k.shift;
  const float* __restrict rmean = k.rmean;
  const float* __restrict rscale = k.rscale;
  const float* __restrict rshift = k.rshift;
  const float m0 = mean[0], a0 = scale[0], b0 = shift[0];
  const float rm0 = RES == kResBn ? rmean[0] : 0.f, ra0 = RES == kResBn ? rscale[0] : 0.f,
              rb0 = RES == kResBn ? rshift[0] : 0.f;
  for (int64_t i = 0; i < len; ++i) {
    float v = PER ? (cpu::ld(z, i) - mean[i]) * scale[i] + shift[i] : (cpu::ld(z, i) - m0) * a0 + b0;
    if constexpr (RES == kRes) v += cpu::ld(static_cast<const out_t*>(res), i);
    if constexpr (RES == kResBn) {
      const float r = cpu::ld(static_cast<const in_t*>(res), i);
      v += PER ? (r - rmean[i]) * rscale[i] + rshift[i] : (r - rm0) * ra0 + rb0;
    }
    out[i] = static_cast<out_t>(RELU ? cpu::relu_keep_nan(v) : v);
  }
}

template <int RES, bool RELU, typename in_t, typename out_t>
void bn_act_cpu_impl(const in_t* z, Consts k, const void* res, out_t* out, int64_t numel, int64_t channels,
                     int64_t hw, Layout layout) {
  // Runs of C contiguous channels (NHWC) or of HW positions of one channel (NCHW): conv_geometry.h.
  const Runs runs = runs_of(numel / (channels * hw), channels, hw, layout);
  const int64_t inner = runs.inner;
  const size_t res_bytes = RES == kResBn ? sizeof(in_t) : sizeof(out_t);
  at::parallel_for(0, runs.outer, std::max<int64_t>(1, 16384 / inner), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int64_t base = o * inner, c = run_channel(o, channels, layout);
      const void* r = RES ? static_cast<const char*>(res) + base * res_bytes : nullptr;
      if (c < 0) bn_act_span<true, RES, RELU>(z + base, r, out + base, k, inner);
      else bn_act_span<false, RES, RELU>(z + base, r, out + base, k.at(c), inner);
    }
  });
}

at::Tensor bn_act_cpu(const at::Tensor& z_in, const at::Tensor& mean_in, const at::Tensor& scale_in,
                      const at::Tensor& shift_in, const c10::optional<at::Tensor>& residual_in, bool relu,
                      at::ScalarType out_dtype, const c10::optional<at::Tensor>& res_mean,
                      const c10::optional<at::Tensor>& res_scale, const c10::optional<at::Tensor>& res_shift) {
  const BnActOperands ops = prepare_bn_act(z_in, mean_in, scale_in, shift_in, residual_in, res_mean, res_scale,
                                           res_shift, out_dtype, c10::DeviceType::CPU);
  const at::Tensor &z = ops.z, &residual = ops.residual, &out = ops.out;
  const int64_t channels = z.size(1), hw = z.size(2) * z.size(3);
  if (z.numel() == 0) return out;
  const bool res_bn = ops.res_scale.defined();
  const Consts k{ops.mean.const_data_ptr<float>(), ops.scale.const_data_ptr<float>(),
                 ops.shift.const_data_ptr<float>(), res_bn ? ops.res_mean.const_data_ptr<float>() : nullptr,
                 res_bn ? ops.res_scale.const_data_ptr<float>() : nullptr,
                 res_bn ? ops.res_shift.const_data_ptr<float>() : nullptr};
  const void* rp = residual.defined() ? residual.const_data_ptr() : nullptr;
  FR_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "bn_act_cpu", [&] {
    using in_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(out_dtype, "bn_act_cpu_out", [&] {
      const in_t* zp = z.const_data_ptr<in_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const int64_t n = z.numel();
      auto run = [&](auto res, auto act) {
        bn_act_cpu_impl<decltype(res)::value, decltype(act)::value>(zp, k, rp, op, n, channels, hw, ops.layout);
      };
      using B = std::true_type;
      using F = std::false_type;
      using R0 = std::integral_constant<int, kNoRes>;
      using R1 = std::integral_constant<int, kRes>;
      using R2 = std::integral_constant<int, kResBn>;
      if (res_bn) relu ? run(R2{}, B{}) : run(R2{}, F{});
      else if (rp) relu ? run(R1{}, B{}) : run(R1{}, F{});
      else relu ? run(R0{}, B{}) : run(R0{}, F{});
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) { m.impl("bn_act", &bn_act_cpu); }

}  // namespace fused_resnet
