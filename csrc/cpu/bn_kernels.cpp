// Batch-norm statistics and backward on the CPU: bn_finalize, bn_backward_reduce, bn_backward_apply.
// Reductions run per channel in a fixed order: results repeat bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "../bn_backward_common.h"
#include "../bn_stats.h"
#include "../dispatch.h"

namespace fused_resnet {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_cpu(
    const at::Tensor& part_mean, const at::Tensor& part_m2, const at::Tensor& part_count, const at::Tensor& gamma,
    const at::Tensor& beta, double eps, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum) {
  const auto [T, C] = check_bn_finalize(part_mean, part_m2, part_count, gamma, beta, running_mean, running_var,
                                        c10::DeviceType::CPU);
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

// gm = grad * (mask_src > 0) as a product, as the torch primitive computes it (a select would branch).
// The backward ops make grad, mask_src and z dense in z's layout (as the CUDA kernels do), so one offset
// addresses all of them and the inner loops are unit-stride: over positions of one channel (NCHW) or
// over the channels of one position (channels_last).
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

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                                          const at::Tensor& z_in, const at::Tensor& mean,
                                                          const at::Tensor& invstd) {
  check_bn_backward("bn_backward_reduce", grad_in, mask_in, z_in, mean, invstd, c10::DeviceType::CPU);
  const Dense d = dense_in_z_layout(grad_in, mask_in, z_in);
  const int64_t N = d.N, C = d.C, HW = d.HW;
  at::Tensor sum = at::zeros({C}, d.z.options().dtype(at::kFloat)), sumx = at::zeros_like(sum);
  const at::Tensor mu = mean.contiguous(), is = invstd.contiguous();
  FR_DISPATCH_FLOAT_HALF_BF16(d.z.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using z_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(d.grad.scalar_type(), "bn_backward_reduce_cpu_grad", [&] {
      using g_t = scalar_t;
      FR_DISPATCH_FLOAT_HALF_BF16(d.mask.scalar_type(), "bn_backward_reduce_cpu_mask", [&] {
        const g_t* gp = d.grad.const_data_ptr<g_t>();
        const scalar_t* mp = d.mask.const_data_ptr<scalar_t>();
        const z_t* zp = d.z.const_data_ptr<z_t>();
        const float* mup = mu.const_data_ptr<float>();
        float* sp = sum.mutable_data_ptr<float>();
        float* sxp = sumx.mutable_data_ptr<float>();
        if (d.channels_last) {  // rows in a fixed order, channels inner: one thread, deterministic
          std::vector<float> s(C, 0.0f), sx(C, 0.0f);
          for (int64_t r = 0; r < N * HW; ++r) {
            const g_t* __restrict g = gp + r * C;
            const scalar_t* __restrict m = mp + r * C;
            const z_t* __restrict z = zp + r * C;
            for (int64_t c = 0; c < C; ++c) {
              const float gv = static_cast<float>(g[c]) * static_cast<float>(static_cast<float>(m[c]) > 0.0f);
              s[c] += gv;
              sx[c] += gv * (static_cast<float>(z[c]) - mup[c]);
            }
          }
          for (int64_t c = 0; c < C; ++c) sp[c] = s[c], sxp[c] = sx[c] * is.const_data_ptr<float>()[c];
        } else {
          at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
            for (int64_t c = begin; c < end; ++c) {
              float s = 0.0f, sx = 0.0f;
              for (int64_t n = 0; n < N; ++n) {
                const int64_t base = (n * C + c) * HW;
                const g_t* __restrict g = gp + base;
                const scalar_t* __restrict m = mp + base;
                const z_t* __restrict z = zp + base;
                for (int64_t i = 0; i < HW; ++i) {
                  const float gv = static_cast<float>(g[i]) * static_cast<float>(static_cast<float>(m[i]) > 0.0f);
                  s += gv;
                  sx += gv * (static_cast<float>(z[i]) - mup[c]);
                }
              }
              sp[c] = s, sxp[c] = sx * is.const_data_ptr<float>()[c];
            }
          });
        }
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
        const g_t* gp = d.grad.const_data_ptr<g_t>();
        const scalar_t* mp = d.mask.const_data_ptr<scalar_t>();
        const z_t* zp = d.z.const_data_ptr<z_t>();
        z_t* dp = dz.mutable_data_ptr<z_t>();
        g_t* gmp = want_gm ? gm.mutable_data_ptr<g_t>() : nullptr;
        // One unit-stride span of `len` elements from `base`: the channels of one position (PER_ELEMENT
        // channel constants) or the positions of channel c0 (one set of constants).
        auto span = [&](int64_t base, int64_t len, int64_t c0, auto per_element) {
          constexpr bool kPer = decltype(per_element)::value;
          const g_t* __restrict g = gp + base;
          const scalar_t* __restrict m = mp + base;
          const z_t* __restrict z = zp + base;
          z_t* __restrict o = dp + base;
          const float *__restrict av = a.data(), *__restrict k0v = k0.data(), *__restrict k1v = k1.data();
          const float as = a[c0], k0s = k0[c0], k1s = k1[c0];
          for (int64_t i = 0; i < len; ++i) {
            const float gv = static_cast<float>(g[i]) * static_cast<float>(static_cast<float>(m[i]) > 0.0f);
            const float zi = static_cast<float>(z[i]);
            o[i] = static_cast<z_t>(kPer ? av[i] * gv + k0v[i] + k1v[i] * zi : as * gv + k0s + k1s * zi);
          }
          if (gmp) {
            g_t* __restrict q = gmp + base;
            for (int64_t i = 0; i < len; ++i) q[i] = static_cast<g_t>(static_cast<float>(g[i]) * static_cast<float>(static_cast<float>(m[i]) > 0.0f));
          }
        };
        if (d.channels_last) {
          at::parallel_for(0, N * HW, 64, [&](int64_t begin, int64_t end) {
            for (int64_t r = begin; r < end; ++r) span(r * C, C, 0, std::true_type{});
          });
        } else {
          at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
            for (int64_t nc = begin; nc < end; ++nc) span(nc * HW, HW, nc % C, std::false_type{});
          });
        }
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
