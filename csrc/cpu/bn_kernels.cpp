// Batch-norm statistics and backward on the CPU: bn_finalize, bn_backward_reduce, bn_backward_apply.
// Reductions run per channel in a fixed order: results repeat bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../bn_backward_common.h"
#include "../bn_stats.h"
#include "../dispatch.h"

namespace fused_resnet {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_cpu(
    const at::Tensor& part_mean, const at::Tensor& part_m2, const at::Tensor& part_count, const at::Tensor& gamma,
    const at::Tensor& beta, double eps, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum) {
  const char* op = "bn_finalize";
  TORCH_CHECK(part_mean.dim() == 2 && part_m2.sizes() == part_mean.sizes(), op,
              ": part_mean and part_m2 must be (tiles, C) alike, got ", part_mean.sizes(), " and ", part_m2.sizes());
  const int64_t T = part_mean.size(0), C = part_mean.size(1);
  TORCH_CHECK(T > 0, op, ": no statistics tiles");
  TORCH_CHECK(part_count.dim() == 1 && part_count.size(0) == T, op, ": part_count must be (", T, "), got ",
              part_count.sizes());
  for (const at::Tensor* t : {&part_mean, &part_m2, &part_count})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), op, ": partials must be float32 CPU tensors");
  check_channel_vector(gamma, C, op, "gamma", part_mean, false);
  check_channel_vector(beta, C, op, "beta", part_mean, false);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op, ": running_mean and running_var go together");
  check_channel_vector(running_mean, C, op, "running_mean", part_mean, false);
  check_channel_vector(running_var, C, op, "running_var", part_mean, false);
  const at::Tensor pm = part_mean.contiguous(), pq = part_m2.contiguous(), pc = part_count.contiguous();
  const at::Tensor g = gamma.to(at::kFloat).contiguous(), b = beta.to(at::kFloat).contiguous();
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
      const BnFold f = fold(acc, base, g.const_data_ptr<float>()[c], b.const_data_ptr<float>()[c],
                            static_cast<float>(eps));
      scale.mutable_data_ptr<float>()[c] = f.scale, shift.mutable_data_ptr<float>()[c] = f.shift;
      mean.mutable_data_ptr<float>()[c] = f.mean, invstd.mutable_data_ptr<float>()[c] = f.invstd;
      unbiased.mutable_data_ptr<float>()[c] = f.unbiased_var;
    }
  });
  if (running_mean.has_value()) {  // in the buffers' own dtype, as BatchNorm2d
    at::Tensor rm = *running_mean, rv = *running_var;
    rm.copy_(rm.to(at::kFloat).mul(1.0 - momentum).add_(mean, momentum));
    rv.copy_(rv.to(at::kFloat).mul(1.0 - momentum).add_(unbiased, momentum));
  }
  return {scale, shift, mean, invstd};
}

template <typename g_t, typename m_t, typename z_t>
void reduce_channel(const g_t* g, const m_t* msk, const z_t* z, Plane gs, Plane ms, Plane zs, int64_t N, int64_t HW,
                    int64_t c, float mean, float invstd, float* sum, float* sumx) {
  float s = 0.0f, sx = 0.0f;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < HW; ++i) {
      if (static_cast<float>(msk[n * ms.n + c * ms.c + i * ms.hw]) > 0.0f) {
        const float gv = static_cast<float>(g[n * gs.n + c * gs.c + i * gs.hw]);
        s += gv;
        sx += gv * (static_cast<float>(z[n * zs.n + c * zs.c + i * zs.hw]) - mean) * invstd;
      }
    }
  }
  *sum = s, *sumx = sx;
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                                          const at::Tensor& z_in, const at::Tensor& mean,
                                                          const at::Tensor& invstd) {
  check_bn_backward("bn_backward_reduce", grad_in, mask_in, z_in, mean, invstd, c10::DeviceType::CPU);
  const at::Tensor grad = plane_dense(grad_in), mask = plane_dense(mask_in), z = plane_dense(z_in);
  const int64_t N = z.size(0), C = z.size(1), HW = z.size(2) * z.size(3);
  at::Tensor sum = at::empty({C}, z.options().dtype(at::kFloat)), sumx = at::empty_like(sum);
  const at::Tensor mu = mean.contiguous(), is = invstd.contiguous();
  FR_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using z_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(grad.scalar_type(), "bn_backward_reduce_cpu_grad", [&] {
      using g_t = scalar_t;
      FR_DISPATCH_FLOAT_HALF_BF16(mask.scalar_type(), "bn_backward_reduce_cpu_mask", [&] {
        at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c)
            reduce_channel(grad.const_data_ptr<g_t>(), mask.const_data_ptr<scalar_t>(), z.const_data_ptr<z_t>(),
                           plane_of(grad), plane_of(mask), plane_of(z), N, HW, c, mu.const_data_ptr<float>()[c],
                           is.const_data_ptr<float>()[c], sum.mutable_data_ptr<float>() + c,
                           sumx.mutable_data_ptr<float>() + c);
        });
      });
    });
  });
  return {sum, sumx};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_apply_cpu(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                                         const at::Tensor& z_in, const at::Tensor& mean,
                                                         const at::Tensor& invstd, const at::Tensor& scale,
                                                         const at::Tensor& sum_g, const at::Tensor& sum_gx, int64_t count,
                                                         bool batch_stats, bool want_gm) {
  const char* op = "bn_backward_apply";
  check_bn_backward(op, grad_in, mask_in, z_in, mean, invstd, c10::DeviceType::CPU);
  const int64_t N = z_in.size(0), C = z_in.size(1), HW = z_in.size(2) * z_in.size(3);
  check_channel_vector(scale, C, op, "scale", z_in);
  check_channel_vector(sum_g, C, op, "sum_g", z_in);
  check_channel_vector(sum_gx, C, op, "sum_gx", z_in);
  TORCH_CHECK(count > 0, op, ": count must be positive, got ", count);
  const at::Tensor grad = plane_dense(grad_in), mask = plane_dense(mask_in), z = plane_dense(z_in);
  const auto fmt = conv_output_format(z);
  at::Tensor dz = at::empty(z.sizes(), z.options().memory_format(fmt));
  at::Tensor gm = want_gm ? at::empty(z.sizes(), grad.options().memory_format(fmt)) : at::empty({0}, z.options());
  const float inv_count = 1.0f / static_cast<float>(count);
  const float *mu = mean.const_data_ptr<float>(), *is = invstd.const_data_ptr<float>(),
              *a = scale.const_data_ptr<float>(), *sg = sum_g.const_data_ptr<float>(),
              *sgx = sum_gx.const_data_ptr<float>();
  const Plane gs = plane_of(grad), ms = plane_of(mask), zs = plane_of(z), ds = plane_of(dz);
  FR_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "bn_backward_apply_cpu", [&] {
    using z_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(grad.scalar_type(), "bn_backward_apply_cpu_grad", [&] {
      using g_t = scalar_t;
      FR_DISPATCH_FLOAT_HALF_BF16(mask.scalar_type(), "bn_backward_apply_cpu_mask", [&] {
        const g_t* gp = grad.const_data_ptr<g_t>();
        const scalar_t* mp = mask.const_data_ptr<scalar_t>();
        const z_t* zp = z.const_data_ptr<z_t>();
        z_t* dp = dz.mutable_data_ptr<z_t>();
        g_t* gmp = want_gm ? gm.mutable_data_ptr<g_t>() : nullptr;
        at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
          for (int64_t nc = begin; nc < end; ++nc) {
            const int64_t n = nc / C, c = nc % C;
            const float mean_g = sg[c] * inv_count, mean_gx = sgx[c] * inv_count;
            for (int64_t i = 0; i < HW; ++i) {
              const float g = static_cast<float>(mp[n * ms.n + c * ms.c + i * ms.hw]) > 0.0f
                                  ? static_cast<float>(gp[n * gs.n + c * gs.c + i * gs.hw]) : 0.0f;
              float d = a[c] * g;
              if (batch_stats) {
                const float xhat = (static_cast<float>(zp[n * zs.n + c * zs.c + i * zs.hw]) - mu[c]) * is[c];
                d = a[c] * (g - mean_g - xhat * mean_gx);
              }
              dp[n * ds.n + c * ds.c + i * ds.hw] = static_cast<z_t>(d);
              if (gmp) gmp[n * ds.n + c * ds.c + i * ds.hw] = static_cast<g_t>(g);
            }
          }
        });
      });
    });
  });
  return {dz, gm};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_finalize", &bn_finalize_cpu);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cpu);
  m.impl("bn_backward_apply", &bn_backward_apply_cpu);
}

}  // namespace fused_resnet
