// bn_act on CUDA: out = act(z * scale[c] + shift[c] (+ residual)), one thread per element, grid-stride.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../activation.h"
#include "../bn_act_common.h"
#include "../dispatch.h"

namespace fused_resnet {
namespace {

template <typename in_t, typename out_t>
__global__ void bn_act_kernel(const in_t* __restrict__ z, const float* __restrict__ mean, const float* __restrict__ scale,
                              const float* __restrict__ shift, const out_t* __restrict__ res,
                              out_t* __restrict__ out, int64_t numel, int64_t channels, int64_t hw,
                              Layout layout, bool relu) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += step) {
    const int64_t c = channel_of(i, channels, hw, layout);
    float v = (static_cast<float>(z[i]) - mean[c]) * scale[c] + shift[c];
    if (res) v += static_cast<float>(res[i]);
    out[i] = static_cast<out_t>(relu ? relu_keep_nan(v) : v);
  }
}

at::Tensor bn_act_cuda(const at::Tensor& z_in, const at::Tensor& mean_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
                       const c10::optional<at::Tensor>& residual_in, bool relu, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(z_in.device());  // allocate and launch on z's device
  const BnActOperands ops = prepare_bn_act(z_in, mean_in, scale_in, shift_in, residual_in, out_dtype,
                                           c10::DeviceType::CUDA);
  const at::Tensor &z = ops.z, &mean = ops.mean, &scale = ops.scale, &shift = ops.shift, &residual = ops.residual;
  const at::Tensor& out = ops.out;
  const Layout layout = ops.layout;
  const int64_t numel = z.numel();
  if (numel == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, 65535LL * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FR_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "bn_act_cuda", [&] {
    using in_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(out_dtype, "bn_act_cuda_out", [&] {
      bn_act_kernel<in_t, scalar_t><<<blocks, threads, 0, stream>>>(
          z.const_data_ptr<in_t>(), mean.const_data_ptr<float>(), scale.const_data_ptr<float>(), shift.const_data_ptr<float>(),
          residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
          numel, z.size(1), z.size(2) * z.size(3), layout, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) { m.impl("bn_act", &bn_act_cuda); }

}  // namespace fused_resnet
