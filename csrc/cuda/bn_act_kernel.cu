// bn_act on CUDA: out = act((z - mean[c]) * scale[c] + shift[c] (+ residual)), over runs of contiguous elements.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../activation.h"
#include "run_launch.cuh"
#include "../bn_act_common.h"
#include "../dispatch.h"

namespace fused_resnet {
namespace {

// Over runs (conv_geometry.h): blockIdx.y / threadIdx.y walk the runs, blockIdx.x / threadIdx.x the
// contiguous elements of a run, so the channel is known per run and no element divides. The residual is
// added as it is (`res`, out_t), or through its own batch norm (`res_bn`, in_t: a shortcut convolution).
template <typename in_t, typename out_t>
__global__ void bn_act_kernel(const in_t* __restrict__ z, const float* __restrict__ mean, const float* __restrict__ scale,
                              const float* __restrict__ shift, const out_t* __restrict__ res,
                              const in_t* __restrict__ res_bn, const float* __restrict__ rmean,
                              const float* __restrict__ rscale, const float* __restrict__ rshift,
                              out_t* __restrict__ out, Runs runs, int64_t channels, Layout layout, bool relu) {
  for (int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; o < runs.outer;
       o += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t run_c = run_channel(o, channels, layout), base = o * runs.inner;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < runs.inner;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t c = run_c < 0 ? i : run_c;
      float v = (static_cast<float>(z[base + i]) - mean[c]) * scale[c] + shift[c];
      if (res) v += static_cast<float>(res[base + i]);
      if (res_bn) v += (static_cast<float>(res_bn[base + i]) - rmean[c]) * rscale[c] + rshift[c];
      out[base + i] = static_cast<out_t>(relu ? relu_keep_nan(v) : v);
    }
  }
}

at::Tensor bn_act_cuda(const at::Tensor& z_in, const at::Tensor& mean_in, const at::Tensor& scale_in,
                       const at::Tensor& shift_in, const c10::optional<at::Tensor>& residual_in, bool relu,
                       at::ScalarType out_dtype, const c10::optional<at::Tensor>& res_mean,
                       const c10::optional<at::Tensor>& res_scale, const c10::optional<at::Tensor>& res_shift) {
  const c10::cuda::CUDAGuard guard(z_in.device());  // allocate and launch on z's device
  const BnActOperands ops = prepare_bn_act(z_in, mean_in, scale_in, shift_in, residual_in, res_mean, res_scale,
                                           res_shift, out_dtype, c10::DeviceType::CUDA);
  const at::Tensor &z = ops.z, &mean = ops.mean, &scale = ops.scale, &shift = ops.shift, &residual = ops.residual;
  const at::Tensor& out = ops.out;
  const Layout layout = ops.layout;
  const bool res_bn = ops.res_scale.defined();
  const int64_t numel = z.numel();
  if (numel == 0) return out;
  const Runs runs = runs_of(z.size(0), z.size(1), z.size(2) * z.size(3), layout);
  const dim3 block = run_block(runs), grid = run_grid(runs, block);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FR_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "bn_act_cuda", [&] {
    using in_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(out_dtype, "bn_act_cuda_out", [&] {
      bn_act_kernel<in_t, scalar_t><<<grid, block, 0, stream>>>(
          z.const_data_ptr<in_t>(), mean.const_data_ptr<float>(), scale.const_data_ptr<float>(),
          shift.const_data_ptr<float>(),
          residual.defined() && !res_bn ? residual.const_data_ptr<scalar_t>() : nullptr,
          res_bn ? residual.const_data_ptr<in_t>() : nullptr,
          res_bn ? ops.res_mean.const_data_ptr<float>() : nullptr,
          res_bn ? ops.res_scale.const_data_ptr<float>() : nullptr,
          res_bn ? ops.res_shift.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<scalar_t>(), runs,
          z.size(1), layout, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) { m.impl("bn_act", &bn_act_cuda); }

}  // namespace fused_resnet
