// Batch-norm statistics and backward on CUDA: bn_finalize, bn_backward_reduce, bn_backward_apply. Every
// reduction is per tile, then summed in a fixed order: no atomics, so results repeat bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../activation.h"
#include "run_launch.cuh"
#include "../bn_backward_common.h"
#include "../bn_stats.h"
#include "../dispatch.h"
#include "../param_vec.h"

namespace fused_resnet {
namespace {

constexpr int kChannelsPerBlock = 32;  // threadIdx.x: one channel each
constexpr int kRowLanes = 8;           // threadIdx.y: rows interleaved within a tile (NHWC reduce)
constexpr int kRowsPerTile = 256;      // rows one block reduces into one partial
constexpr int kMergeLanes = 32;        // threadIdx.y of the partial sums: partial rows interleaved
constexpr int kFinalizeChannels = 8;   // threadIdx.x of the finalize: one channel each
constexpr int kFinalizeLanes = 128;    // threadIdx.y of the finalize: partial rows interleaved

template <typename scalar_t>
__device__ __forceinline__ float ld(const scalar_t* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Block (8 channels x 128 lanes): lane l merges partial rows l, l + 128, ... in order (Chan, relative to
// the first row's mean), then the lanes merge pairwise in a fixed tree: parallel over the rows and still
// the same result on every run. (One thread per channel serially over ~3,000 tiles was the bottleneck;
// then 32 channels x 32 lanes -- 2 blocks at 64 channels, ~50 dependent merges per thread, two
// divisions each -- took 45 us at 56x56x64 batch 32 under ncu on an H100, where Triton's two-level
// merge took 13.)
template <typename stat_t>
__global__ void bn_finalize_kernel(const float* __restrict__ pmean, const float* __restrict__ pm2,
                                   const float* __restrict__ pcount, ParamVec gamma, ParamVec beta,
                                   stat_t* running_mean, stat_t* running_var,
                                   int64_t* num_batches_tracked, float* scale, float* shift, float* mean,
                                   float* invstd, int64_t T, int64_t C, float eps, float momentum) {
  __shared__ float part[3][kFinalizeLanes][kFinalizeChannels];  // a Moments per (lane, channel)
  auto put = [&](int lane, Moments m) {
    part[0][lane][threadIdx.x] = m.n, part[1][lane][threadIdx.x] = m.mean, part[2][lane][threadIdx.x] = m.m2;
  };
  auto get = [&](int lane) {
    return Moments{part[0][lane][threadIdx.x], part[1][lane][threadIdx.x], part[2][lane][threadIdx.x]};
  };
  if (num_batches_tracked != nullptr && blockIdx.x == 0 && threadIdx.x == 0 && threadIdx.y == 0)
    ++*num_batches_tracked;  // BatchNorm2d's num_batches_tracked.add_(1), once per call
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinalizeChannels + threadIdx.x;
  const float base = c < C ? pmean[c] : 0.f;
  Moments acc;
  if (c < C)
    for (int64_t t = threadIdx.y; t < T; t += kFinalizeLanes)
      acc = merge(acc, Moments{pcount[t], pmean[t * C + c] - base, pm2[t * C + c]});
  put(threadIdx.y, acc);
  __syncthreads();
  for (int width = kFinalizeLanes / 2; width > 0; width /= 2) {
    if (threadIdx.y < width) put(threadIdx.y, merge(get(threadIdx.y), get(threadIdx.y + width)));
    __syncthreads();
  }
  if (threadIdx.y != 0 || c >= C) return;
  const BnFold f = fold(get(0), base, gamma.load(c), beta.load(c), eps);
  scale[c] = f.scale, shift[c] = f.shift, mean[c] = f.mean, invstd[c] = f.invstd;
  if (running_mean != nullptr) {  // as BatchNorm2d: unbiased variance, in the buffers' own dtype
    running_mean[c] = static_cast<stat_t>(static_cast<float>(running_mean[c]) * (1.0f - momentum) + f.mean * momentum);
    running_var[c] =
        static_cast<stat_t>(static_cast<float>(running_var[c]) * (1.0f - momentum) + f.unbiased_var * momentum);
  }
}

// One thread per channel: bn_finalize's fold of one tile of count 1 (bn_stats.h), every vector in its own dtype.
__global__ void bn_fold_kernel(ParamVec running_mean, ParamVec running_var, ParamVec gamma, ParamVec beta,
                               float* scale, float* shift, float* mean, float* invstd, int64_t C, float eps) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const BnFold f =
      fold(Moments{1.f, 0.f, running_var.load(c)}, running_mean.load(c), gamma.load(c), beta.load(c), eps);
  scale[c] = f.scale, shift[c] = f.shift, mean[c] = f.mean, invstd[c] = f.invstd;
}

// NHWC, block (tile, channel group): partial sums of gm and gm * xhat over the tile's rows; threadIdx.x
// runs along the contiguous channels.
template <typename g_t, typename m_t, typename z_t>
__global__ void bn_backward_reduce_nhwc_kernel(const g_t* __restrict__ g, const m_t* __restrict__ msk,
                                               const z_t* __restrict__ z, const float* __restrict__ mean,
                                               const float* __restrict__ invstd, float* psum, float* psumx, int64_t M,
                                               int64_t C) {
  __shared__ float sh[2][kRowLanes][kChannelsPerBlock];
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kChannelsPerBlock + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerTile;
  float s = 0.f, sx = 0.f;
  if (c < C) {
    const float mu = mean[c], is = invstd[c];
    for (int64_t r = r0 + threadIdx.y; r < min(M, r0 + kRowsPerTile); r += kRowLanes) {
      const int64_t i = r * C + c;
      const float gm = relu_grad(ld(g, i), ld(msk, i));
      s += gm;
      sx += gm * (ld(z, i) - mu) * is;
    }
  }
  sh[0][threadIdx.y][threadIdx.x] = s;
  sh[1][threadIdx.y][threadIdx.x] = sx;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int y = 1; y < kRowLanes; ++y) s += sh[0][y][threadIdx.x], sx += sh[1][y][threadIdx.x];
    psum[blockIdx.x * C + c] = s;
    psumx[blockIdx.x * C + c] = sx;
  }
}

// NCHW, block (tile, channel): thread i takes row r0 + i of the tile, so a warp reads 32 contiguous
// positions of one channel's plane (threads across channels would read HW apart); a fixed tree in shared
// memory sums the block. Same tiles (kRowsPerTile rows) as the NHWC kernel.
template <typename g_t, typename m_t, typename z_t>
__global__ void __launch_bounds__(kRowsPerTile) bn_backward_reduce_nchw_kernel(
    const g_t* __restrict__ g, const m_t* __restrict__ msk, const z_t* __restrict__ z, const float* __restrict__ mean,
    const float* __restrict__ invstd, float* psum, float* psumx, int64_t M, int64_t C, int64_t HW) {
  __shared__ float sh[2][kRowsPerTile];
  const int64_t c = blockIdx.y;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerTile + threadIdx.x;
  float s = 0.f, sx = 0.f;
  if (r < M) {
    const int64_t n = r / HW, i = (n * C + c) * HW + (r - n * HW);
    const float gm = relu_grad(ld(g, i), ld(msk, i));
    s = gm;
    sx = gm * (ld(z, i) - mean[c]) * invstd[c];
  }
  sh[0][threadIdx.x] = s;
  sh[1][threadIdx.x] = sx;
  __syncthreads();
  for (int width = kRowsPerTile / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) sh[0][threadIdx.x] += sh[0][threadIdx.x + width], sh[1][threadIdx.x] += sh[1][threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) psum[blockIdx.x * C + c] = sh[0][0], psumx[blockIdx.x * C + c] = sh[1][0];
}

// Block (32 channels x 32 lanes): column sums of the T partial rows, lanes strided then a fixed tree.
__global__ void sum_partials_kernel(const float* __restrict__ psum, const float* __restrict__ psumx, float* sum,
                                    float* sumx, int64_t T, int64_t C) {
  __shared__ float sh[2][kMergeLanes][kChannelsPerBlock];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock + threadIdx.x;
  float s = 0.f, sx = 0.f;
  if (c < C)
    for (int64_t t = threadIdx.y; t < T; t += kMergeLanes) s += psum[t * C + c], sx += psumx[t * C + c];
  sh[0][threadIdx.y][threadIdx.x] = s;
  sh[1][threadIdx.y][threadIdx.x] = sx;
  __syncthreads();
  for (int width = kMergeLanes / 2; width > 0; width /= 2) {
    if (threadIdx.y < width) {
      sh[0][threadIdx.y][threadIdx.x] += sh[0][threadIdx.y + width][threadIdx.x];
      sh[1][threadIdx.y][threadIdx.x] += sh[1][threadIdx.y + width][threadIdx.x];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) sum[c] = sh[0][0][threadIdx.x], sumx[c] = sh[1][0][threadIdx.x];
}

// Elementwise over the dense tensors (all in z's layout), by runs (conv_geometry.h): dz and, when asked, gm.
template <typename g_t, typename m_t, typename z_t>
__global__ void bn_backward_apply_kernel(const g_t* __restrict__ g, const m_t* __restrict__ msk,
                                         const z_t* __restrict__ z, const float* __restrict__ mean,
                                         const float* __restrict__ invstd, const float* __restrict__ scale,
                                         const float* __restrict__ sum_g, const float* __restrict__ sum_gx,
                                         z_t* __restrict__ dz, g_t* __restrict__ gm_out, Runs runs, int64_t C,
                                         Layout layout, float inv_count, bool batch_stats) {
  for (int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; o < runs.outer;
       o += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t run_c = run_channel(o, C, layout), base = o * runs.inner;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < runs.inner;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t c = run_c < 0 ? j : run_c, i = base + j;
      const float gm = relu_grad(ld(g, i), ld(msk, i));
      float d = scale[c] * gm;
      if (batch_stats) {
        const float xhat = (ld(z, i) - mean[c]) * invstd[c];
        d = scale[c] * (gm - sum_g[c] * inv_count - xhat * sum_gx[c] * inv_count);
      }
      dz[i] = static_cast<z_t>(d);
      if (gm_out != nullptr) gm_out[i] = static_cast<g_t>(gm);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_cuda(
    const at::Tensor& part_mean, const at::Tensor& part_m2, const at::Tensor& part_count, const at::Tensor& gamma,
    const at::Tensor& beta, double eps, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum,
    const c10::optional<at::Tensor>& num_batches_tracked) {
  const c10::cuda::CUDAGuard guard(part_mean.device());
  const auto [T, C] = check_bn_finalize(part_mean, part_m2, part_count, gamma, beta, running_mean, running_var,
                                        num_batches_tracked, c10::DeviceType::CUDA);
  const at::Tensor pm = part_mean.contiguous(), pq = part_m2.contiguous(), pc = part_count.contiguous();
  at::Tensor keep_g, keep_b;  // gamma and beta in their own dtype (ParamVec): no conversion kernels
  const ParamVec g = param_vec(gamma, keep_g), b = param_vec(beta, keep_b);
  auto opts = part_mean.options();
  at::Tensor scale = at::empty({C}, opts), shift = at::empty({C}, opts), mean = at::empty({C}, opts),
             invstd = at::empty({C}, opts);
  const dim3 block(kFinalizeChannels, kFinalizeLanes);
  const int blocks = static_cast<int>((C + kFinalizeChannels - 1) / kFinalizeChannels);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto stat_type = running_mean.has_value() ? running_mean->scalar_type() : at::kFloat;
  FR_DISPATCH_FLOAT_HALF_BF16(stat_type, "bn_finalize_cuda", [&] {
    bn_finalize_kernel<scalar_t><<<blocks, block, 0, stream>>>(
        pm.const_data_ptr<float>(), pq.const_data_ptr<float>(), pc.const_data_ptr<float>(), g, b,
        running_mean.has_value() ? running_mean->mutable_data_ptr<scalar_t>() : nullptr,
        running_var.has_value() ? running_var->mutable_data_ptr<scalar_t>() : nullptr,
        num_batches_tracked.has_value() ? num_batches_tracked->mutable_data_ptr<int64_t>() : nullptr,
        scale.mutable_data_ptr<float>(), shift.mutable_data_ptr<float>(), mean.mutable_data_ptr<float>(),
        invstd.mutable_data_ptr<float>(), T, C, static_cast<float>(eps), static_cast<float>(momentum));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scale, shift, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_fold_cuda(const at::Tensor& running_mean,
                                                                        const at::Tensor& running_var,
                                                                        const at::Tensor& gamma,
                                                                        const at::Tensor& beta, double eps) {
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const int64_t C = check_bn_fold(running_mean, running_var, gamma, beta, c10::DeviceType::CUDA);
  at::Tensor keep_m, keep_v, keep_g, keep_b;  // each in its own dtype (ParamVec): no conversion kernels
  const ParamVec m = param_vec(running_mean, keep_m), v = param_vec(running_var, keep_v),
                 g = param_vec(gamma, keep_g), b = param_vec(beta, keep_b);
  auto opts = running_mean.options().dtype(at::kFloat);
  at::Tensor scale = at::empty({C}, opts), shift = at::empty({C}, opts), mean = at::empty({C}, opts),
             invstd = at::empty({C}, opts);
  constexpr int kThreads = 128;
  if (C > 0) {
    bn_fold_kernel<<<static_cast<int>((C + kThreads - 1) / kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        m, v, g, b, scale.mutable_data_ptr<float>(), shift.mutable_data_ptr<float>(), mean.mutable_data_ptr<float>(),
        invstd.mutable_data_ptr<float>(), C, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {scale, shift, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cuda(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                                           const at::Tensor& z_in, const at::Tensor& mean,
                                                           const at::Tensor& invstd) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  check_bn_backward("bn_backward_reduce", grad_in, mask_in, z_in, mean, invstd, c10::DeviceType::CUDA);
  const auto fmt = conv_output_format(z_in);  // one layout for all three: one index per element
  const at::Tensor z = z_in.contiguous(fmt), grad = grad_in.contiguous(fmt), mask = mask_in.contiguous(fmt);
  const int64_t N = z.size(0), C = z.size(1), HW = z.size(2) * z.size(3), M = N * HW;
  const int64_t T = (M + kRowsPerTile - 1) / kRowsPerTile;
  auto f32 = z.options().dtype(at::kFloat);
  at::Tensor psum = at::empty({T, C}, f32), psumx = at::empty({T, C}, f32);
  at::Tensor sum = at::empty({C}, f32), sumx = at::empty({C}, f32);
  const at::Tensor mu = mean.contiguous(), is = invstd.contiguous();
  if (M == 0) return {sum.zero_(), sumx.zero_()};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast;
  FR_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "bn_backward_reduce_cuda", [&] {
    using z_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(grad.scalar_type(), "bn_backward_reduce_cuda_grad", [&] {
      using g_t = scalar_t;
      FR_DISPATCH_FLOAT_HALF_BF16(mask.scalar_type(), "bn_backward_reduce_cuda_mask", [&] {
        if (nhwc) {
          const dim3 grid(static_cast<unsigned>(T),
                          static_cast<unsigned>((C + kChannelsPerBlock - 1) / kChannelsPerBlock));
          bn_backward_reduce_nhwc_kernel<g_t, scalar_t, z_t><<<grid, dim3(kChannelsPerBlock, kRowLanes), 0, stream>>>(
              grad.const_data_ptr<g_t>(), mask.const_data_ptr<scalar_t>(), z.const_data_ptr<z_t>(),
              mu.const_data_ptr<float>(), is.const_data_ptr<float>(), psum.mutable_data_ptr<float>(),
              psumx.mutable_data_ptr<float>(), M, C);
        } else {
          const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(C));
          bn_backward_reduce_nchw_kernel<g_t, scalar_t, z_t><<<grid, kRowsPerTile, 0, stream>>>(
              grad.const_data_ptr<g_t>(), mask.const_data_ptr<scalar_t>(), z.const_data_ptr<z_t>(),
              mu.const_data_ptr<float>(), is.const_data_ptr<float>(), psum.mutable_data_ptr<float>(),
              psumx.mutable_data_ptr<float>(), M, C, HW);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  sum_partials_kernel<<<static_cast<unsigned>((C + kChannelsPerBlock - 1) / kChannelsPerBlock),
                        dim3(kChannelsPerBlock, kMergeLanes), 0, stream>>>(
      psum.const_data_ptr<float>(), psumx.const_data_ptr<float>(), sum.mutable_data_ptr<float>(),
      sumx.mutable_data_ptr<float>(), T, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sum, sumx};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_apply_cuda(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                                          const at::Tensor& z_in, const at::Tensor& mean,
                                                          const at::Tensor& invstd, const at::Tensor& scale,
                                                          const at::Tensor& sum_g, const at::Tensor& sum_gx,
                                                          int64_t count, bool batch_stats, bool want_gm) {
  const char* op = "bn_backward_apply";
  const c10::cuda::CUDAGuard guard(z_in.device());
  check_bn_backward(op, grad_in, mask_in, z_in, mean, invstd, c10::DeviceType::CUDA);
  const int64_t C = z_in.size(1);
  check_bn_apply_vectors(op, z_in, scale, sum_g, sum_gx, count);
  const auto fmt = conv_output_format(z_in);
  const Layout layout = fmt == at::MemoryFormat::ChannelsLast ? Layout::NHWC : Layout::NCHW;
  const at::Tensor z = z_in.contiguous(fmt), grad = grad_in.contiguous(fmt), mask = mask_in.contiguous(fmt);
  const at::Tensor mu = mean.contiguous(), is = invstd.contiguous(), a = scale.contiguous(), sg = sum_g.contiguous(),
                   sgx = sum_gx.contiguous();
  at::Tensor dz = at::empty(z.sizes(), z.options().memory_format(fmt));
  at::Tensor gm = want_gm ? at::empty(z.sizes(), grad.options().memory_format(fmt)) : at::empty({0}, z.options());
  const int64_t numel = z.numel(), HW = z.size(2) * z.size(3);
  if (numel == 0) return {dz, gm};
  const Runs runs = runs_of(z.size(0), C, HW, layout);
  const dim3 block = run_block(runs), grid = run_grid(runs, block);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FR_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "bn_backward_apply_cuda", [&] {
    using z_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(grad.scalar_type(), "bn_backward_apply_cuda_grad", [&] {
      using g_t = scalar_t;
      FR_DISPATCH_FLOAT_HALF_BF16(mask.scalar_type(), "bn_backward_apply_cuda_mask", [&] {
        bn_backward_apply_kernel<g_t, scalar_t, z_t><<<grid, block, 0, stream>>>(
            grad.const_data_ptr<g_t>(), mask.const_data_ptr<scalar_t>(), z.const_data_ptr<z_t>(),
            mu.const_data_ptr<float>(), is.const_data_ptr<float>(), a.const_data_ptr<float>(),
            sg.const_data_ptr<float>(), sgx.const_data_ptr<float>(), dz.mutable_data_ptr<z_t>(),
            want_gm ? gm.mutable_data_ptr<g_t>() : nullptr, runs, C, layout, 1.0f / static_cast<float>(count),
            batch_stats);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {dz, gm};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("bn_fold", &bn_fold_cuda);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cuda);
  m.impl("bn_backward_apply", &bn_backward_apply_cuda);
}

}  // namespace fused_resnet
