// conv_fused on CUDA: an implicit-GEMM convolution with the fused prologue and epilogue of DESIGN.md
// section 2 (the same contract as the CPU kernel and the Triton kernel).
//
// This first version is SIMT: 64x64 output tiles, 16-deep reduction slices staged in shared memory, each
// of 256 threads accumulating a 4x4 patch with fp32 FMAs. It is the correctness baseline the GPU tests
// check; tensor cores (mma.sync / WMMA, TF32 for fp32 when allowed) and a cp.async multi-stage pipeline
// are the next step, and `auto` prefers the Triton backend on CUDA until benchmarks say otherwise.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../conv_fused_common.h"
#include "../dispatch.h"

namespace fused_resnet {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;
static_assert(kBM == kStatsTileRows, "one statistics partial per row tile");

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

struct Params {
  const void* x;
  const void* w;
  void* out;
  const void* res;
  const void* scx;
  const void* scw;
  void* sco;
  const float* bias;     // conv bias, float32 (or null)
  const float* bn_mean;  // folded BN (or null): (z - mean) * gamma * rsqrt(var + eps) + beta
  const float* bn_var;
  const float* bn_gamma;
  const float* bn_beta;
  float bn_eps;
  const float* in_mean;  // prologue (or null)
  const float* in_scale;
  const float* in_shift;
  const float* sc_bias;
  float* pmean;
  float* pm2;
  float* pcount;
  int64_t N, C, H, W, K, P, Q, M, SC_C, SC_H, SC_W;
  int kh, kw, stride, pad, sc_stride;
  bool relu, sc_separate;
  Strides xs, ws, os, rs, ss, sws;
};

template <typename in_t>
__device__ __forceinline__ float load_f(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const in_t*>(p)[i]);
}

// Accumulates acc += A(rows of this tile, taps x channels) * B(taps x channels, columns of this tile) for
// an input `x` of `channels` channels, `kh x kw` taps at `stride`/`pad`, optionally through the prologue.
template <typename in_t>
__device__ void reduce_tile(float (&acc)[4][4], float (*As)[kBM], float (*Bs)[kBN], const void* x, Strides xs,
                            const void* w, Strides ws, int64_t channels, int64_t H, int64_t W, int kh, int kw,
                            int stride, int pad, int64_t row0, int64_t col0, const Params& p, bool prologue) {
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  for (int r = 0; r < kh; ++r) {
    for (int s = 0; s < kw; ++s) {
      for (int64_t c0 = 0; c0 < channels; c0 += kBK) {
        // A tile: 64 rows x 16 channels, 4 elements per thread (padding zeros come after the prologue).
        for (int e = tid; e < kBM * kBK; e += kThreads) {
          const int row = e / kBK, kk = e % kBK;
          const int64_t m = row0 + row, c = c0 + kk;
          float v = 0.f;
          if (m < p.M && c < channels) {
            const int64_t n = m / (p.P * p.Q), pq = m % (p.P * p.Q);
            const int64_t h = (pq / p.Q) * stride - pad + r, wi = (pq % p.Q) * stride - pad + s;
            if (h >= 0 && h < H && wi >= 0 && wi < W) {
              v = load_f<in_t>(x, n * xs.n + c * xs.c + h * xs.h + wi * xs.w);
              if (prologue) {  // rounded to the input dtype, as the matrix units would be fed
                v = (v - p.in_mean[c]) * p.in_scale[c] + p.in_shift[c];
                v = static_cast<float>(static_cast<in_t>(v < 0.f ? 0.f : v));
              }
            }
          }
          As[kk][row] = v;
        }
        // B tile: 16 channels x 64 output channels of tap (r, s).
        for (int e = tid; e < kBK * kBN; e += kThreads) {
          const int kk = e / kBN, col = e % kBN;
          const int64_t c = c0 + kk, k = col0 + col;
          Bs[kk][col] = (c < channels && k < p.K) ? load_f<in_t>(w, k * ws.n + c * ws.c + r * ws.h + s * ws.w) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kBK; ++kk) {
          float a[4], b[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i], b[i] = Bs[kk][tx * 4 + i];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
      }
    }
  }
}

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) conv_bn_act_kernel(Params p) {
  __shared__ float As[kBK][kBM];
  __shared__ float Bs[kBK][kBN];
  __shared__ float red[16][kBN];  // per-column partial sums across the 16 row groups
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM, col0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  float acc[4][4] = {};
  reduce_tile<in_t>(acc, As, Bs, p.x, p.xs, p.w, p.ws, p.C, p.H, p.W, p.kh, p.kw, p.stride, p.pad, row0, col0, p,
                    p.in_scale != nullptr);

  // Epilogue constants of this thread's 4 columns.
  float add[4], center[4], scale[4], beta[4];
  for (int j = 0; j < 4; ++j) {
    const int64_t k = col0 + tx * 4 + j;
    const bool ok = k < p.K;
    add[j] = ok && p.bias ? p.bias[k] : 0.f;
    center[j] = 0.f, scale[j] = 1.f, beta[j] = 0.f;
    if (ok && p.bn_mean) {
      center[j] = p.bn_mean[k], scale[j] = p.bn_gamma[k] * rsqrtf(p.bn_var[k] + p.bn_eps), beta[j] = p.bn_beta[k];
    }
  }

  if (p.pmean) {
    // Per-tile statistics of the pre-residual value; without BN, of the convolution before its bias (a
    // shift M2 ignores and the mean takes back), so a large bias costs no digits.
    const bool bn = p.bn_mean != nullptr;
    auto src = [&](int i, int j) { return bn ? (acc[i][j] + add[j] - center[j]) * scale[j] + beta[j] : acc[i][j]; };
    const float rows = static_cast<float>(min(static_cast<int64_t>(kBM), p.M - row0));
    float part[4];
    for (int j = 0; j < 4; ++j) {
      part[j] = 0.f;
      for (int i = 0; i < 4; ++i) part[j] += row0 + ty * 4 + i < p.M ? src(i, j) : 0.f;
      red[ty][tx * 4 + j] = part[j];
    }
    __syncthreads();
    float mean[4];
    for (int j = 0; j < 4; ++j) {
      float s = 0.f;
      for (int y = 0; y < 16; ++y) s += red[y][tx * 4 + j];  // fixed order: deterministic
      mean[j] = s / rows;
    }
    __syncthreads();
    for (int j = 0; j < 4; ++j) {
      part[j] = 0.f;
      for (int i = 0; i < 4; ++i) {
        const float d = src(i, j) - mean[j];
        part[j] += row0 + ty * 4 + i < p.M ? d * d : 0.f;
      }
      red[ty][tx * 4 + j] = part[j];
    }
    __syncthreads();
    if (ty == 0) {
      for (int j = 0; j < 4; ++j) {
        const int64_t k = col0 + tx * 4 + j;
        if (k >= p.K) continue;
        float m2 = 0.f;
        for (int y = 0; y < 16; ++y) m2 += red[y][tx * 4 + j];
        p.pmean[blockIdx.x * p.K + k] = bn ? mean[j] : mean[j] + add[j];
        p.pm2[blockIdx.x * p.K + k] = m2;
      }
      if (blockIdx.y == 0 && tx == 0) p.pcount[blockIdx.x] = rows;
    }
  }

  float sc[4][4] = {};
  if (p.scw) {
    __syncthreads();
    reduce_tile<in_t>(sc, As, Bs, p.scx, p.ss, p.scw, p.sws, p.SC_C, p.SC_H, p.SC_W, 1, 1, p.sc_stride, 0, row0,
                      col0, p, false);
  }
  for (int i = 0; i < 4; ++i) {
    const int64_t m = row0 + ty * 4 + i;
    if (m >= p.M) continue;
    const int64_t n = m / (p.P * p.Q), pq = m % (p.P * p.Q), ph = pq / p.Q, qw = pq % p.Q;
    for (int j = 0; j < 4; ++j) {
      const int64_t k = col0 + tx * 4 + j;
      if (k >= p.K) continue;
      const int64_t o = n * p.os.n + k * p.os.c + ph * p.os.h + qw * p.os.w;
      float v = (acc[i][j] + add[j] - center[j]) * scale[j] + beta[j];
      if (p.scw) {
        const float s = sc[i][j] + p.sc_bias[k];
        if (p.sc_separate) static_cast<out_t*>(p.sco)[o] = static_cast<out_t>(s);
        else v += s;
      }
      if (p.res) v += load_f<out_t>(p.res, n * p.rs.n + k * p.rs.c + ph * p.rs.h + qw * p.rs.w);
      if (p.relu) v = v < 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu
      static_cast<out_t*>(p.out)[o] = static_cast<out_t>(v);
    }
  }
}

const float* f32_or_null(const c10::optional<at::Tensor>& v, at::Tensor& keep) {
  if (!v.has_value()) return nullptr;
  keep = v->to(at::kFloat).contiguous();
  return keep.const_data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_fused_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t stride,
    int64_t padding, const c10::optional<at::Tensor>& bn_mean, const c10::optional<at::Tensor>& bn_var,
    const c10::optional<at::Tensor>& bn_gamma, const c10::optional<at::Tensor>& bn_beta, double bn_eps,
    const c10::optional<at::Tensor>& in_mean, const c10::optional<at::Tensor>& in_scale,
    const c10::optional<at::Tensor>& in_shift, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& sc_x, const c10::optional<at::Tensor>& sc_weight,
    const c10::optional<at::Tensor>& sc_bias, int64_t sc_stride, bool sc_separate, bool relu, bool stats,
    at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(x.device());
  const ConvProblem pb = check_conv_fused(x, weight, bias, stride, padding, bn_mean, bn_var, bn_gamma, bn_beta,
                                          in_mean, in_scale, in_shift, residual, sc_x, sc_weight, sc_bias, sc_stride,
                                          out_dtype, c10::DeviceType::CUDA);
  const bool has_sc = sc_weight.has_value();
  const ConvOutputs outs = allocate_conv_outputs(x, pb, out_dtype, has_sc && sc_separate, stats);
  const at::Tensor &out = outs.out, &sc_out = outs.sc_out, &pmean = outs.pmean, &pm2 = outs.pm2,
                   &pcount = outs.pcount;
  const int64_t tiles = (pb.M + kBM - 1) / kBM;
  if (pb.M == 0) return {out, sc_out, pmean, pm2, pcount};

  at::Tensor keep[11];
  Params p{};
  p.x = x.const_data_ptr(), p.w = weight.const_data_ptr(), p.out = out.mutable_data_ptr();
  p.res = residual.has_value() ? residual->const_data_ptr() : nullptr;
  p.scx = has_sc ? sc_x->const_data_ptr() : nullptr;
  p.scw = has_sc ? sc_weight->const_data_ptr() : nullptr;
  p.sco = has_sc && sc_separate ? sc_out.mutable_data_ptr() : nullptr;
  p.bias = f32_or_null(bias, keep[0]);
  p.bn_mean = f32_or_null(bn_mean, keep[1]), p.bn_var = f32_or_null(bn_var, keep[2]);
  p.bn_gamma = f32_or_null(bn_gamma, keep[3]), p.bn_beta = f32_or_null(bn_beta, keep[4]);
  p.bn_eps = static_cast<float>(bn_eps);
  p.in_mean = f32_or_null(in_mean, keep[5]), p.in_scale = f32_or_null(in_scale, keep[6]);
  p.in_shift = f32_or_null(in_shift, keep[7]), p.sc_bias = f32_or_null(sc_bias, keep[8]);
  p.pmean = stats ? pmean.mutable_data_ptr<float>() : nullptr;
  p.pm2 = stats ? pm2.mutable_data_ptr<float>() : nullptr;
  p.pcount = stats ? pcount.mutable_data_ptr<float>() : nullptr;
  p.N = pb.N, p.C = pb.C, p.H = pb.H, p.W = pb.W, p.K = pb.K, p.P = pb.P, p.Q = pb.Q, p.M = pb.M, p.SC_C = pb.SC_C;
  p.SC_H = has_sc ? sc_x->size(2) : 1, p.SC_W = has_sc ? sc_x->size(3) : 1;
  p.kh = static_cast<int>(pb.KH), p.kw = static_cast<int>(pb.KW), p.stride = static_cast<int>(stride);
  p.pad = static_cast<int>(padding), p.sc_stride = static_cast<int>(sc_stride);
  p.relu = relu, p.sc_separate = sc_separate;
  p.xs = strides_of(x), p.ws = strides_of(weight), p.os = strides_of(out);
  p.rs = residual.has_value() ? strides_of(*residual) : Strides{0, 0, 0, 0};
  p.ss = has_sc ? strides_of(*sc_x) : Strides{0, 0, 0, 0};
  p.sws = has_sc ? strides_of(*sc_weight) : Strides{0, 0, 0, 0};
  TORCH_CHECK(!has_sc || !sc_separate || sc_out.strides() == out.strides(), "conv_fused: internal: shortcut layout");

  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>((pb.K + kBN - 1) / kBN));
  auto stream = c10::cuda::getCurrentCUDAStream();
  FR_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "conv_fused_cuda", [&] {
    using in_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(out_dtype, "conv_fused_cuda_out", [&] {
      conv_bn_act_kernel<in_t, scalar_t><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, sc_out, pmean, pm2, pcount};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) { m.impl("conv_fused", &conv_fused_cuda); }

}  // namespace fused_resnet
