// conv_fused on the CPU: the prologue pass, ATen's convolution for the GEMMs, then one fused epilogue pass
// (folded BN, statistics, shortcut add, residual, ReLU, store in the output's layout and dtype), addressed
// with the index math the CUDA kernels share (conv_geometry.h).
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../conv_fused_common.h"
#include "../dispatch.h"
#include "../param_vec.h"
#include "loops.h"

namespace fused_resnet {
namespace {

// A per-channel parameter as float32, read through ParamVec as the CUDA kernel reads it (no conversion op).
std::vector<float> floats(const c10::optional<at::Tensor>& v) {
  if (!v.has_value()) return {};
  at::Tensor keep;
  const ParamVec pv = param_vec(v, keep);
  std::vector<float> out(v->numel());
  for (int64_t i = 0; i < v->numel(); ++i) out[i] = pv.load(i);
  return out;
}

// The prologue over a unit-stride span: relu((x - mean) * scale + shift), constants per element (PER: the
// channels of one channels_last row) or one set for the span (the positions of one NCHW channel).
template <bool PER, typename T>
void prologue_span(const T* __restrict src, T* __restrict dst, const float* __restrict mu,
                   const float* __restrict sc, const float* __restrict sh, int64_t len) {
  const float m0 = mu[0], a0 = sc[0], b0 = sh[0];
  for (int64_t i = 0; i < len; ++i)
    dst[i] = static_cast<T>(cpu::relu_keep_nan(PER ? (cpu::ld(src, i) - mu[i]) * sc[i] + sh[i]
                                                   : (cpu::ld(src, i) - m0) * a0 + b0));
}

// The epilogue over a unit-stride span of `len` elements from offset `base`: the channels 0..len-1 of one
// row (CL) or the positions of one channel k (NCHW). Kept branch-free in the loop so it vectorises.
template <typename in_t, typename out_t>
struct Epilogue {
  const in_t* z;
  const in_t* s;     // the shortcut convolution, or null
  const out_t* res;  // the residual, or null
  out_t* out;
  out_t* sc_out;     // the shortcut's own output (then it is not added), or null
  const float *add, *center, *scale, *beta;

  template <bool CL, bool RELU, bool S, bool R>
  // zp and op may be the same memory (the epilogue in place): element i is read before it is written.
  static void run(const in_t* zp, const in_t* __restrict sp, const out_t* __restrict rp, out_t* op, const float* __restrict a, const float* __restrict c,
                  const float* __restrict g, const float* __restrict b, int64_t len) {
    const float a0 = a[0] - c[0], g0 = g[0], b0 = b[0];  // NCHW: one channel for the whole span
    for (int64_t i = 0; i < len; ++i) {
      float v = CL ? (static_cast<float>(zp[i]) + a[i] - c[i]) * g[i] + b[i]
                   : (static_cast<float>(zp[i]) + a0) * g0 + b0;
      if (S) v += static_cast<float>(sp[i]);
      if (R) v += static_cast<float>(rp[i]);
      if (RELU) v = cpu::relu_keep_nan(v);
      op[i] = static_cast<out_t>(v);
    }
  }

  template <bool CL, bool RELU>
  void span(int64_t base, int64_t k0, int64_t len) const {
    // Locals with __restrict: the stores below cannot alias the members, so the loops vectorise (z and
    // out may be one buffer, so they are not restrict).
    const in_t* zp = z + base;
    const in_t* __restrict sp = s ? s + base : nullptr;
    const out_t* __restrict rp = res ? res + base : nullptr;
    out_t* op = out + base;
    out_t* __restrict sop = sc_out ? sc_out + base : nullptr;
    const float* __restrict a = add + k0;
    const float* __restrict c = center + k0;
    const float* __restrict g = scale + k0;
    const float* __restrict b = beta + k0;
    if (sop) {  // the shortcut kept apart: its own output (nothing to copy when it is s itself)
      if (static_cast<const void*>(sop) != static_cast<const void*>(sp))
        for (int64_t i = 0; i < len; ++i) sop[i] = static_cast<out_t>(static_cast<float>(sp[i]));
      sp = nullptr;
    }
    // Branch-free loops, one per (shortcut?, residual?) combination, so each vectorises.
    if (sp && rp) run<CL, RELU, true, true>(zp, sp, rp, op, a, c, g, b, len);
    else if (sp) run<CL, RELU, true, false>(zp, sp, rp, op, a, c, g, b, len);
    else if (rp) run<CL, RELU, false, true>(zp, sp, rp, op, a, c, g, b, len);
    else run<CL, RELU, false, false>(zp, sp, rp, op, a, c, g, b, len);
  }
};

// Per-channel sums over rows [r0, r1) of v = (z + add) * scale + beta: of v itself (CENTER false) or of
// (v - center)^2. Unit-stride, branch-free inner loops in either layout; NCHW sums in lanes.
template <bool CENTER, typename in_t, typename Idx>
void tile_sums(const in_t* z, const Idx& idx, int64_t r0, int64_t r1, int64_t HW, int64_t K, bool channels_last,
               const float* __restrict add, const float* __restrict scale, const float* __restrict beta,
               const float* __restrict center, float* __restrict out) {
  for (int64_t m = r0; m < r1;) {
    const int64_t n = m / HW, hw0 = m % HW, len = std::min(r1 - m, HW - hw0);
    if (channels_last) {
      for (int64_t i = 0; i < len; ++i) {
        const in_t* __restrict row = z + idx(n, hw0 + i, 0);
        for (int64_t k = 0; k < K; ++k) {
          const float v = (cpu::ld(row, k) + add[k]) * scale[k] + beta[k];
          if constexpr (CENTER) {
            const float d = v - center[k];
            out[k] += d * d;
          } else {
            out[k] += v;
          }
        }
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const in_t* __restrict col = z + idx(n, hw0, k);
        const float a = add[k], g = scale[k], b = beta[k], mu = CENTER ? center[k] : 0.0f;
        cpu::LaneSums<1> acc;
        acc.add(len, [&](int64_t i, float* v) {
          const float d = (cpu::ld(col, i) + a) * g + b - mu;
          v[0] = CENTER ? d * d : d;
        });
        out[k] += acc.total(0);
      }
    }
    m += len;
  }
}

// Offset of (n, hw, c) in a plane-dense tensor (its H x W plane dense: NCHW or channels_last).
struct PlaneIdx {
  int64_t sn, sc, shw;
  int64_t operator()(int64_t n, int64_t hw, int64_t c) const { return n * sn + c * sc + hw * shw; }
};

PlaneIdx plane_idx(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.size(3) == 1 ? t.stride(2) : t.stride(3)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_fused_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t stride,
    int64_t padding, const c10::optional<at::Tensor>& bn_mean, const c10::optional<at::Tensor>& bn_var,
    const c10::optional<at::Tensor>& bn_gamma, const c10::optional<at::Tensor>& bn_beta, double bn_eps,
    const c10::optional<at::Tensor>& in_mean, const c10::optional<at::Tensor>& in_scale,
    const c10::optional<at::Tensor>& in_shift, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& sc_x, const c10::optional<at::Tensor>& sc_weight,
    const c10::optional<at::Tensor>& sc_bias, int64_t sc_stride, bool sc_separate, bool relu, bool stats,
    at::ScalarType out_dtype, bool sc_stats) {
  const ConvProblem pb = check_conv_fused(x, weight, bias, stride, padding, bn_mean, bn_var, bn_gamma, bn_beta,
                                          in_mean, in_scale, in_shift, residual, sc_x, sc_weight, sc_bias, sc_stride,
                                          out_dtype, c10::DeviceType::CPU);
  sc_stats = sc_stats && sc_weight.has_value() && sc_separate;
  const auto fmt = conv_output_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t K = pb.K, M = pb.M;

  // The GEMMs: ATen's convolution (oneDNN), measured faster here than an im2col + BLAS implicit GEMM (3x at
  // the seed's 24x24x64 batch 8). The prologue is one pass over x before it; zero padding then follows the
  // transform, as it must. The conv bias rides in the convolution unless BN is folded after it.
  at::Tensor xin = x;
  if (in_scale.has_value()) {
    const auto mu = floats(in_mean), sc = floats(in_scale), sh = floats(in_shift);
    const at::Tensor xd = x.contiguous(fmt);
    xin = at::empty_like(xd);
    const PlaneIdx idx = plane_idx(xd);
    const int64_t C = pb.C, HW = pb.H * pb.W;
    FR_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "conv_fused_cpu_prologue", [&] {
      const scalar_t* src = xd.const_data_ptr<scalar_t>();
      scalar_t* dst = xin.mutable_data_ptr<scalar_t>();
      if (channels_last) {
        at::parallel_for(0, pb.N * HW, 64, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t i = idx(r / HW, r % HW, 0);
            prologue_span<true>(src + i, dst + i, mu.data(), sc.data(), sh.data(), C);
          }
        });
      } else {
        at::parallel_for(0, pb.N * C, 1, [&](int64_t begin, int64_t end) {
          for (int64_t nc = begin; nc < end; ++nc) {
            const int64_t c = nc % C, i = idx(nc / C, 0, c);
            prologue_span<false>(src + i, dst + i, mu.data() + c, sc.data() + c, sh.data() + c, HW);
          }
        });
      }
    });
  }
  const bool has_bn = bn_mean.has_value();
  // The bias is added in the epilogue, after the statistics are taken of the convolution without it (a
  // shift that M2 ignores and the mean takes back): a large conv bias costs no digits.
  at::Tensor z = at::convolution(xin, weight, c10::nullopt, {stride, stride}, {padding, padding}, {1, 1}, false,
                                 {0, 0}, 1).contiguous(fmt);
  const bool has_sc = sc_weight.has_value();
  // aten's convolution takes a bias of its input's dtype; under autocast the module's bias stays float32
  // while the convolution runs in 16 bits: rounded to them, as eager autocast rounds it.
  c10::optional<at::Tensor> sc_b = sc_bias;
  if (has_sc && sc_b.has_value() && sc_b->scalar_type() != sc_x->scalar_type()) sc_b = sc_b->to(sc_x->scalar_type());
  at::Tensor s = has_sc ? at::convolution(*sc_x, *sc_weight, sc_b, {sc_stride, sc_stride}, {0, 0}, {1, 1}, false,
                                          {0, 0}, 1).contiguous(fmt)
                        : at::Tensor();

  // Per-output-channel epilogue constants, float32: y = (z [+ bias] - mean) * scale + beta.
  std::vector<float> add(K, 0.0f), center(K, 0.0f), scale(K, 1.0f), beta(K, 0.0f);
  if (bias.has_value()) add = floats(bias);
  if (has_bn) {
    const auto m = floats(bn_mean), v = floats(bn_var), g = floats(bn_gamma), b = floats(bn_beta);
    for (int64_t k = 0; k < K; ++k) {
      center[k] = m[k], scale[k] = g[k] / std::sqrt(v[k] + static_cast<float>(bn_eps)), beta[k] = b[k];
    }
  }
  // z and s are this call's own temporaries in the output's layout: when the output dtype is theirs, the
  // epilogue overwrites them in place and they are returned (no second activation-sized buffer).
  const bool in_place = out_dtype == x.scalar_type();
  const ConvOutputs outs = allocate_conv_outputs(x, pb, out_dtype, has_sc && sc_separate, stats, sc_stats,
                                                 in_place ? z : at::Tensor(),
                                                 in_place && has_sc && sc_separate ? s : at::Tensor());
  const at::Tensor &out = outs.out, &sc_out = outs.sc_out, &pmean = outs.pmean, &pm2 = outs.pm2,
                   &pcount = outs.pcount;
  stats = stats || sc_stats;
  const int64_t tiles = pmean.numel() ? pmean.size(0) : 0;
  // z, s, out and sc_out share one layout (fmt); the residual is made to.
  const at::Tensor res = residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
  const PlaneIdx idx = plane_idx(out);
  const int64_t PQ = pb.P * pb.Q;

  FR_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "conv_fused_cpu", [&] {
    using in_t = scalar_t;
    const in_t* zp = z.const_data_ptr<in_t>();
    const in_t* sp = has_sc ? s.const_data_ptr<in_t>() : nullptr;
    // What the statistics are taken of: the BN-folded output, or the convolution before its bias.
    std::vector<float> st_add(K, 0.0f), st_scale(K, 1.0f), st_beta(K, 0.0f);
    if (has_bn)
      for (int64_t k = 0; k < K; ++k) st_add[k] = add[k] - center[k], st_scale[k] = scale[k], st_beta[k] = beta[k];
    // Per-tile (count, mean, M2) of v = (src + a) * g + b, two passes over the tile (in cache for the
    // second); `back` is added to the means afterwards (a bias taken out of the sums).
    auto tile_stats = [&](const in_t* src, const float* a, const float* g, const float* b, const float* back,
                          float* means, float* m2s) {
      at::parallel_for(0, tiles, 1, [&](int64_t tb, int64_t te) {
        std::vector<float> mean(K), m2(K);
        for (int64_t t = tb; t < te; ++t) {
          const int64_t r0 = t * kStatsTileRows, r1 = std::min(M, r0 + kStatsTileRows);
          const float n = static_cast<float>(r1 - r0);
          std::fill(mean.begin(), mean.end(), 0.0f);
          std::fill(m2.begin(), m2.end(), 0.0f);
          tile_sums<false, in_t>(src, idx, r0, r1, PQ, K, channels_last, a, g, b, nullptr, mean.data());
          for (int64_t k = 0; k < K; ++k) mean[k] /= n;
          tile_sums<true, in_t>(src, idx, r0, r1, PQ, K, channels_last, a, g, b, mean.data(), m2.data());
          if (back)
            for (int64_t k = 0; k < K; ++k) mean[k] += back[k];
          std::copy(mean.begin(), mean.end(), means + t * K);
          std::copy(m2.begin(), m2.end(), m2s + t * K);
          pcount.mutable_data_ptr<float>()[t] = n;
        }
      });
    };
    if (stats)  // of the BN-folded output, or of the convolution before its bias (taken back after)
      tile_stats(zp, st_add.data(), st_scale.data(), st_beta.data(), has_bn ? nullptr : add.data(),
                 pmean.mutable_data_ptr<float>(), pm2.mutable_data_ptr<float>());
    if (sc_stats) {  // of the shortcut (with its bias: two passes need no shift)
      const std::vector<float> zero(K, 0.0f), one(K, 1.0f);
      tile_stats(sp, zero.data(), one.data(), zero.data(), nullptr, outs.sc_pmean.mutable_data_ptr<float>(),
                 outs.sc_pm2.mutable_data_ptr<float>());
    }
    FR_DISPATCH_FLOAT_HALF_BF16(out_dtype, "conv_fused_cpu_out", [&] {
      using out_t = scalar_t;
      const Epilogue<in_t, out_t> ep{zp, sp, res.defined() ? res.const_data_ptr<out_t>() : nullptr,
                                     out.mutable_data_ptr<out_t>(),
                                     has_sc && sc_separate ? sc_out.mutable_data_ptr<out_t>() : nullptr,
                                     add.data(), center.data(), scale.data(), beta.data()};
      at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end;) {  // runs of rows within one sample
          const int64_t n = m / PQ, hw0 = m % PQ, len = std::min(end - m, PQ - hw0);
          if (channels_last) {
            for (int64_t i = 0; i < len; ++i) {
              const int64_t base = idx(n, hw0 + i, 0);
              relu ? ep.template span<true, true>(base, 0, K) : ep.template span<true, false>(base, 0, K);
            }
          } else {
            for (int64_t k = 0; k < K; ++k) {
              const int64_t base = idx(n, hw0, k);
              relu ? ep.template span<false, true>(base, k, len) : ep.template span<false, false>(base, k, len);
            }
          }
          m += len;
        }
      });
    });
  });
  return outs.tuple();
}

at::Tensor im2col_cpu(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t padding) {
  const Im2colProblem pb = check_im2col(x, kernel, stride, padding, c10::DeviceType::CPU);
  const int64_t rows = pb.N * pb.P * pb.Q, cols = pb.C * kernel * kernel;
  at::Tensor out = at::empty({rows, cols}, x.options());
  const Strides4 xs = strides4(x);
  // Each row walks the reduction as the CUDA kernel's main loop does (its origin, then a SliceCursor over
  // taps x channel slices, here of 3 channels so the last slice of a tap is ragged), and each chunk of rows
  // steps from one origin to the next as the CUDA epilogue does (row_origin once, then next_row), so the
  // tests that compare this op with F.unfold check both.
  constexpr int kSlice = 3;
  const int channels = static_cast<int>(pb.C);
  const int slices = static_cast<int>(kernel * kernel) * ((channels + kSlice - 1) / kSlice);
  FR_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "im2col_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      RowOrigin o = row_origin(begin, pb.P, pb.Q, stride, padding);
      for (int64_t m = begin; m < end; ++m, next_row(o, pb.P, pb.Q, stride, padding)) {
        const int64_t base = o.n * xs.n + o.h0 * xs.h + o.w0 * xs.w;
        SliceCursor cur;
        for (int t = 0; t < slices; ++t, cur.next(static_cast<int>(kernel), channels, kSlice)) {
          const bool inside = tap_inside(o, cur.r, cur.s, pb.H, pb.W);
          for (int c = cur.c0; c < std::min(cur.c0 + kSlice, channels); ++c)
            dst[m * cols + (c * kernel + cur.r) * kernel + cur.s] =
                inside ? src[base + cur.r * xs.h + cur.s * xs.w + c * xs.c] : scalar_t(0.0f);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("conv_fused", &conv_fused_cpu);
  m.impl("im2col", &im2col_cpu);
}

}  // namespace fused_resnet
