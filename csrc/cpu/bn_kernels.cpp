// Batch-norm statistics and backward on the CPU: bn_finalize, bn_backward_reduce, bn_backward_apply.
// Reductions run per channel in a fixed order: results repeat bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../bn_backward_common.h"
#include "../bn_stats.h"
#include "loops.h"
#include "../dispatch.h"
#include "../param_vec.h"

namespace fused_resnet {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_cpu(
    const at::Tensor& part_mean, const at::Tensor& part_m2, const at::Tensor& part_count, const at::Tensor& gamma,
    const at::Tensor& beta, double eps, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum,
    const c10::optional<at::Tensor>& num_batches_tracked) {
  const auto [T, C] = check_bn_finalize(part_mean, part_m2, part_count, gamma, beta, running_mean, running_var,
                                        num_batches_tracked, c10::DeviceType::CPU);
  const at::Tensor pm = part_mean.contiguous(), pq = part_m2.contiguous(), pc = part_count.contiguous();
  at::Tensor keep_g, keep_b;  // gamma and beta in their own dtype, as the CUDA kernel reads them
  const ParamVec g = param_vec(gamma, keep_g), b = param_vec(beta, keep_b);
  auto opts = part_mean.options();
  at::Tensor scale = at::empty({C}, opts), shift = at::empty({C}, opts), mean = at::empty({C}, opts),
             invstd = at::empty({C}, opts), unbiased = at::empty({C}, opts);
  const float* mp = pm.const_data_ptr<float>();
  const float* qp = pq.const_data_ptr<float>();
  const float* cp = pc.const_data_ptr<float>();
  at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const float base = mp[c];  // the shift: the first tile's mean
      Moments acc;
      for (int64_t t = 0; t < T; ++t) acc = merge(acc, Moments{cp[t], mp[t * C + c] - base, qp[t * C + c]});
      const BnFold f = fold(acc, base, g.load(c), b.load(c),
                            static_cast<float>(eps));
      scale.mutable_data_ptr<float>()[c] = f.scale, shift.mutable_data_ptr<float>()[c] = f.shift;
      mean.mutable_data_ptr<float>()[c] = f.mean, invstd.mutable_data_ptr<float>()[c] = f.invstd;
      unbiased.mutable_data_ptr<float>()[c] = f.unbiased_var;
    }
  });
  if (running_mean.has_value()) {  // in the buffers' own dtype, as BatchNorm2d (one loop, no dispatches)
    const float mo = static_cast<float>(momentum);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean->scalar_type(), "bn_finalize_running", [&] {
      scalar_t* rm = running_mean->mutable_data_ptr<scalar_t>();
      scalar_t* rv = running_var->mutable_data_ptr<scalar_t>();
      const float* mp = mean.const_data_ptr<float>();
      const float* up = unbiased.const_data_ptr<float>();
      for (int64_t c = 0; c < C; ++c) {
        rm[c] = static_cast<scalar_t>(static_cast<float>(rm[c]) * (1.0f - mo) + mp[c] * mo);
        rv[c] = static_cast<scalar_t>(static_cast<float>(rv[c]) * (1.0f - mo) + up[c] * mo);
      }
    });
  }
  if (num_batches_tracked.has_value()) ++*num_batches_tracked->mutable_data_ptr<int64_t>();
  return {scale, shift, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_fold_cpu(const at::Tensor& running_mean,
                                                                       const at::Tensor& running_var,
                                                                       const at::Tensor& gamma,
                                                                       const at::Tensor& beta, double eps) {
  const int64_t C = check_bn_fold(running_mean, running_var, gamma, beta, c10::DeviceType::CPU);
  at::Tensor keep_m, keep_v, keep_g, keep_b;  // each in its own dtype, as the CUDA kernel reads them
  const ParamVec m = param_vec(running_mean, keep_m), v = param_vec(running_var, keep_v),
                 g = param_vec(gamma, keep_g), b = param_vec(beta, keep_b);
  auto opts = running_mean.options().dtype(at::kFloat);
  at::Tensor scale = at::empty({C}, opts), shift = at::empty({C}, opts), mean = at::empty({C}, opts),
             invstd = at::empty({C}, opts);
  float *sp = scale.mutable_data_ptr<float>(), *hp = shift.mutable_data_ptr<float>(),
        *mp = mean.mutable_data_ptr<float>(), *ip = invstd.mutable_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const BnFold f = fold(Moments{1.f, 0.f, v.load(c)}, m.load(c), g.load(c), b.load(c), static_cast<float>(eps));
    sp[c] = f.scale, hp[c] = f.shift, mp[c] = f.mean, ip[c] = f.invstd;
  }
  return {scale, shift, mean, invstd};
}

// gm = relu_grad(grad, mask_src) (activation.h), as aten's threshold_backward. The backward ops make
// grad, mask_src and z dense in z's layout (as the CUDA kernels do), so one offset addresses all of them and the inner loops are
// unit-stride: over positions of one channel (NCHW) or over the channels of one position (channels_last).
struct Dense {
  at::Tensor grad, mask, z;
  bool channels_last;
  int64_t N, C, HW;
};

Dense dense_in_z_layout(const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& z) {
  const auto fmt = conv_output_format(z);
  return {grad.contiguous(fmt), mask.contiguous(fmt), z.contiguous(fmt), fmt == at::MemoryFormat::ChannelsLast,
          z.size(0), z.size(1), z.size(2) * z.size(3)};
}

// channels_last reductions run over fixed chunks of rows (positions) in parallel, then add the chunks'
// partial sums in chunk order: the result does not depend on the thread count.
constexpr int64_t kReduceChunkRows = 256;

template <typename z_t, typename g_t, typename m_t>
void bn_backward_reduce_impl(const Dense& d, const g_t* gp, const m_t* mp, const z_t* zp, const float* mu,
                             const float* is, float* sp, float* sxp) {
  const int64_t N = d.N, C = d.C, HW = d.HW;
  if (d.channels_last) {
    const int64_t rows = N * HW, chunks = (rows + kReduceChunkRows - 1) / kReduceChunkRows;
    std::vector<float> part(static_cast<size_t>(chunks * 2 * C), 0.0f);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        float* __restrict s = part.data() + k * 2 * C;
        float* __restrict sx = s + C;
        for (int64_t r = k * kReduceChunkRows; r < std::min(rows, (k + 1) * kReduceChunkRows); ++r) {
          const g_t* __restrict g = gp + r * C;
          const m_t* __restrict m = mp + r * C;
          const z_t* __restrict z = zp + r * C;
          for (int64_t c = 0; c < C; ++c) {
            const float gv = cpu::relu_grad(cpu::ld(g, c), cpu::ld(m, c));
            s[c] += gv;
            sx[c] += gv * (cpu::ld(z, c) - mu[c]);
          }
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) sp[c] = 0.0f, sxp[c] = 0.0f;
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t c = 0; c < C; ++c) sp[c] += part[k * 2 * C + c], sxp[c] += part[k * 2 * C + C + c];
    for (int64_t c = 0; c < C; ++c) sxp[c] *= is[c];
    return;
  }
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      cpu::LaneSums<2> acc;
      const float mc = mu[c];
      for (int64_t n = 0; n < N; ++n) {
        const int64_t base = (n * C + c) * HW;
        const g_t* __restrict g = gp + base;
        const m_t* __restrict m = mp + base;
        const z_t* __restrict z = zp + base;
        acc.add(HW, [&](int64_t i, float* v) {
          const float gv = cpu::relu_grad(cpu::ld(g, i), cpu::ld(m, i));
          v[0] = gv;
          v[1] = gv * (cpu::ld(z, i) - mc);
        });
      }
      sp[c] = acc.total(0), sxp[c] = acc.total(1) * is[c];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                                          const at::Tensor& z_in, const at::Tensor& mean,
                                                          const at::Tensor& invstd) {
  check_bn_backward("bn_backward_reduce", grad_in, mask_in, z_in, mean, invstd, c10::DeviceType::CPU);
  const Dense d = dense_in_z_layout(grad_in, mask_in, z_in);
  at::Tensor sum = at::empty({d.C}, d.z.options().dtype(at::kFloat)), sumx = at::empty_like(sum);
  const at::Tensor mu = mean.contiguous(), is = invstd.contiguous();
  FR_DISPATCH_FLOAT_HALF_BF16(d.z.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using z_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(d.grad.scalar_type(), "bn_backward_reduce_cpu_grad", [&] {
      using g_t = scalar_t;
      FR_DISPATCH_FLOAT_HALF_BF16(d.mask.scalar_type(), "bn_backward_reduce_cpu_mask", [&] {
        bn_backward_reduce_impl<z_t, g_t, scalar_t>(d, d.grad.const_data_ptr<g_t>(), d.mask.const_data_ptr<scalar_t>(),
                                                    d.z.const_data_ptr<z_t>(), mu.const_data_ptr<float>(),
                                                    is.const_data_ptr<float>(), sum.mutable_data_ptr<float>(),
                                                    sumx.mutable_data_ptr<float>());
      });
    });
  });
  return {sum, sumx};
}

// dz = a * gm + k0 + k1 * z over one unit-stride span (BATCH: batch statistics; without them dz = a * gm,
// and z is not read: a NaN in z must not reach dz through 0 * z). Channel constants per element (PER, the
// channels of one channels_last row) or one set for the span (the positions of one NCHW channel).
template <bool PER, bool BATCH, typename z_t, typename g_t, typename m_t>
void bn_apply_span(const g_t* __restrict g, const m_t* __restrict m, const z_t* __restrict z, z_t* __restrict o,
                   g_t* __restrict q, const float* __restrict a, const float* __restrict k0,
                   const float* __restrict k1, int64_t len) {
  const float as = a[0], k0s = k0[0], k1s = k1[0];
  for (int64_t i = 0; i < len; ++i) {
    const float gv = cpu::relu_grad(cpu::ld(g, i), cpu::ld(m, i));
    float d = PER ? a[i] * gv : as * gv;
    if constexpr (BATCH) d += PER ? k0[i] + k1[i] * cpu::ld(z, i) : k0s + k1s * cpu::ld(z, i);
    o[i] = static_cast<z_t>(d);
  }
  if (q)
    for (int64_t i = 0; i < len; ++i) q[i] = static_cast<g_t>(cpu::relu_grad(cpu::ld(g, i), cpu::ld(m, i)));
}

std::tuple<at::Tensor, at::Tensor> bn_backward_apply_cpu(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                                         const at::Tensor& z_in, const at::Tensor& mean,
                                                         const at::Tensor& invstd, const at::Tensor& scale,
                                                         const at::Tensor& sum_g, const at::Tensor& sum_gx, int64_t count,
                                                         bool batch_stats, bool want_gm) {
  const char* op = "bn_backward_apply";
  check_bn_backward(op, grad_in, mask_in, z_in, mean, invstd, c10::DeviceType::CPU);
  const int64_t C = z_in.size(1);
  check_bn_apply_vectors(op, z_in, scale, sum_g, sum_gx, count);
  const Dense d = dense_in_z_layout(grad_in, mask_in, z_in);
  const auto fmt = d.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor dz = at::empty(d.z.sizes(), d.z.options().memory_format(fmt));
  at::Tensor gm = want_gm ? at::empty(d.z.sizes(), d.grad.options().memory_format(fmt)) : at::empty({0}, d.z.options());
  // dz = a * (gm - mean_g - (z - mu) * is * mean_gx) = a * gm + k0 + k1 * z, per channel.
  const float inv_count = 1.0f / static_cast<float>(count);
  std::vector<float> a(C), k0(C, 0.0f), k1(C, 0.0f);
  for (int64_t c = 0; c < C; ++c) {
    a[c] = scale.const_data_ptr<float>()[c];
    if (batch_stats) {
      k1[c] = -a[c] * invstd.const_data_ptr<float>()[c] * sum_gx.const_data_ptr<float>()[c] * inv_count;
      k0[c] = -a[c] * sum_g.const_data_ptr<float>()[c] * inv_count - k1[c] * mean.const_data_ptr<float>()[c];
    }
  }
  const int64_t N = d.N, HW = d.HW;
  FR_DISPATCH_FLOAT_HALF_BF16(d.z.scalar_type(), "bn_backward_apply_cpu", [&] {
    using z_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(d.grad.scalar_type(), "bn_backward_apply_cpu_grad", [&] {
      using g_t = scalar_t;
      FR_DISPATCH_FLOAT_HALF_BF16(d.mask.scalar_type(), "bn_backward_apply_cpu_mask", [&] {
        using m_t = scalar_t;
        const g_t* gp = d.grad.const_data_ptr<g_t>();
        const m_t* mp = d.mask.const_data_ptr<m_t>();
        const z_t* zp = d.z.const_data_ptr<z_t>();
        z_t* dp = dz.mutable_data_ptr<z_t>();
        g_t* gmp = want_gm ? gm.mutable_data_ptr<g_t>() : nullptr;
        auto run = [&](auto batch) {
          constexpr bool B = decltype(batch)::value;
          if (d.channels_last) {
            at::parallel_for(0, N * HW, 64, [&](int64_t begin, int64_t end) {
              for (int64_t r = begin; r < end; ++r)
                bn_apply_span<true, B>(gp + r * C, mp + r * C, zp + r * C, dp + r * C, gmp ? gmp + r * C : nullptr,
                                       a.data(), k0.data(), k1.data(), C);
            });
          } else {
            at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
              for (int64_t nc = begin; nc < end; ++nc) {
                const int64_t c = nc % C, base = nc * HW;
                bn_apply_span<false, B>(gp + base, mp + base, zp + base, dp + base, gmp ? gmp + base : nullptr,
                                        a.data() + c, k0.data() + c, k1.data() + c, HW);
              }
            });
          }
        };
        if (batch_stats) run(std::true_type{});
        else run(std::false_type{});
      });
    });
  });
  return {dz, gm};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_finalize", &bn_finalize_cpu);
  m.impl("bn_fold", &bn_fold_cpu);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cpu);
  m.impl("bn_backward_apply", &bn_backward_apply_cpu);
}

}  // namespace fused_resnet
