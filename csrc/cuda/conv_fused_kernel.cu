// conv_fused on CUDA: an implicit-GEMM convolution with the fused prologue and epilogue of DESIGN.md
// section 2 (the same contract as the CPU kernel and the Triton kernel).
//
// One kernel, two main loops for the GEMM, one epilogue:
// - tensor cores (WMMA, fp32 accumulation): float16 and bfloat16, and float32 as TF32 when
//   torch.backends.cudnn.allow_tf32 is on. 64x64 output tiles, eight warps of 16x32, 128-byte reduction
//   slices (64 16-bit channels, 32 float32) in a four-stage shared-memory ring (72 KB, dynamic shared
//   memory: two CTAs per SM on sm_80 and sm_90), three slices in flight while one is multiplied. When x and
//   the weights are channels-dense (channels_last, C a multiple of one 16-byte vector, 16-byte aligned)
//   slices arrive by cp.async with zero-fill for the padding, so loads overlap the MMAs; otherwise each
//   thread gathers its chunks with strided loads into the same ring. The prologue (BN + ReLU of the
//   input) is applied in shared memory by the thread that loaded the chunk, after it lands and before the
//   MMAs read it, and only to pixels inside the image: the zero padding stays zero, as it follows the
//   transform.
// - SIMT fp32 FMA (64x64 tiles, 4x4 per thread): float32 with TF32 off, or on a GPU before sm_80.
// The accumulators land in shared memory and each thread takes the same 4x4 patch either way, so the
// epilogue (folded BN or bias, per-tile statistics, 1x1 shortcut as a second GEMM, residual, ReLU) is shared.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../activation.h"
#include "../conv_fused_common.h"
#include "../dispatch.h"
#include "../param_vec.h"

namespace fused_resnet {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;
static_assert(kBM == kStatsTileRows, "one statistics partial per row tile");


struct Params {
  const void* x;
  const void* w;
  void* out;
  const void* res;
  const void* scx;
  const void* scw;
  void* sco;
  ParamVec bias;     // conv bias (or null)
  ParamVec bn_mean;  // folded BN (or null): (z - mean) * gamma * rsqrt(var + eps) + beta
  ParamVec bn_var;
  ParamVec bn_gamma;
  ParamVec bn_beta;
  float bn_eps;
  const float* in_mean;  // prologue (or null)
  const float* in_scale;
  const float* in_shift;
  ParamVec sc_bias;  // (or null)
  float* pmean;
  float* pm2;
  float* pcount;
  float* sc_pmean;  // the separate shortcut's statistics (or null)
  float* sc_pm2;
  int64_t N, C, H, W, K, P, Q, M, SC_C, SC_H, SC_W;
  int kh, kw, stride, pad, sc_stride;
  bool relu, sc_separate;
  bool vec4;  // out, residual and shortcut out take four channels as one aligned vector (vec4_ok())
  Strides4 xs, ws, os, rs, ss, sws;
};

// One GEMM of the block: the activation operand (im2col of x, optionally through the prologue) and the
// weight operand of a conv or of the 1x1 shortcut.
struct GemmSrc {
  const void* x;
  Strides4 xs;
  const void* w;
  Strides4 ws;
  int64_t channels, H, W;
  int kh, kw, stride, pad;
  bool prologue;
};

template <typename in_t>
__device__ __forceinline__ float load_f(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const in_t*>(p)[i]);
}

// Four consecutive channels of one position as one 8- or 16-byte access (channels-dense and aligned:
// vec4_ok()). 16-bit values are packed by their bits (element j in bits 16 (j % 2) of word j / 2: little
// endian). The stores are written out: nvcc splits an 8-byte store of packed 16-bit values in two.
template <typename T>
__device__ __forceinline__ void store4(void* base, int64_t at, const float (&v)[4]) {
  T* dst = static_cast<T*>(base) + at;
  if constexpr (sizeof(T) == 2) {
    auto bits = [](float f) { return static_cast<uint32_t>(static_cast<T>(f).x); };
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(dst), "r"(bits(v[0]) | bits(v[1]) << 16),
                 "r"(bits(v[2]) | bits(v[3]) << 16)
                 : "memory");
  } else {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3])
                 : "memory");
  }
}

template <typename T>
__device__ __forceinline__ void add4(const void* base, int64_t at, float (&v)[4]) {
  const T* src = static_cast<const T*>(base) + at;
  if constexpr (sizeof(T) == 2) {
    const uint2 r = *reinterpret_cast<const uint2*>(src);
    auto value = [](uint32_t b) {
      T t;
      t.x = static_cast<uint16_t>(b);
      return static_cast<float>(t);
    };
    v[0] += value(r.x), v[1] += value(r.x >> 16), v[2] += value(r.y), v[3] += value(r.y >> 16);
  } else {
    const float4 r = *reinterpret_cast<const float4*>(src);
    v[0] += r.x, v[1] += r.y, v[2] += r.z, v[3] += r.w;
  }
}

// The prologue's arithmetic (batch norm with batch statistics, then ReLU), one element.
__device__ __forceinline__ float bn_relu(float v, float mean, float scale, float shift) {
  return relu_keep_nan((v - mean) * scale + shift);
}

__device__ __forceinline__ float prologue_f(float v, const Params& p, int64_t c) {
  return bn_relu(v, p.in_mean[c], p.in_scale[c], p.in_shift[c]);
}

// A GEMM row's origin (conv_geometry.h) with its offset in x: decomposed once per tile, so the main loops
// step through taps and channel slices by addition (no division, 32-bit counters).
struct Row {
  RowOrigin o;
  int64_t x;     // offset of the pixel under tap (0, 0); read only where a tap lands inside the image
  bool valid;    // m < M
};

__device__ __forceinline__ Row gemm_row(int64_t m, const Params& p, const GemmSrc& g) {
  const bool valid = m < p.M;
  const RowOrigin o = row_origin(valid ? m : 0, p.P, p.Q, g.stride, g.pad);
  return {o, o.n * g.xs.n + o.h0 * g.xs.h + o.w0 * g.xs.w, valid};
}

// The tensor-core loop's form of a Row (two per thread: registers count): the origin narrowed to 32 bits
// (image coordinates are far below 2^31), and a row past M given an origin no tap reaches, so tc_inside
// alone zero-fills it. tc_inside is tap_inside on those 32-bit coordinates.
struct TcRow {
  int64_t x;
  int h0, w0;
};

__device__ __forceinline__ TcRow tc_row(int64_t m, const Params& p, const GemmSrc& g) {
  const Row r = gemm_row(m, p, g);
  return {r.x, r.valid ? static_cast<int>(r.o.h0) : INT_MIN / 2, static_cast<int>(r.o.w0)};
}

__device__ __forceinline__ bool tc_inside(const TcRow& row, int r, int s, int H, int W) {
  return static_cast<unsigned>(row.h0 + r) < static_cast<unsigned>(H) &&
         static_cast<unsigned>(row.w0 + s) < static_cast<unsigned>(W);
}

// ------------------------------------------------------------------------------------------- SIMT loop
// Accumulates acc += A(rows of this tile, taps x channels) * B(taps x channels, columns of this tile).
template <typename in_t>
__device__ void simt_reduce_tile(float (&acc)[4][4], float (*As)[kBM], float (*Bs)[kBN], const GemmSrc& g,
                                 int64_t row0, int64_t col0, const Params& p) {
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  // A tile: 64 rows x 16 channels; this thread loads channel kk of rows ra + 16 j, j = 0..3.
  const int kk_a = tid % kBK, ra = tid / kBK;
  static_assert(kThreads / kBK * 4 == kBM, "four A rows per thread");
  Row rows[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) rows[j] = gemm_row(row0 + ra + 16 * j, p, g);
  const int channels = static_cast<int>(g.channels);
  SliceCursor cur;
  const int slices = g.kh * g.kw * ((channels + kBK - 1) / kBK);
  for (int t = 0; t < slices; ++t, cur.next(g.kw, channels, kBK)) {
    const int c = cur.c0 + kk_a;
    const int64_t tap = cur.r * g.xs.h + cur.s * g.xs.w + static_cast<int64_t>(c) * g.xs.c;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float v = 0.f;  // padding zeros come after the prologue
      if (rows[j].valid && c < channels && tap_inside(rows[j].o, cur.r, cur.s, g.H, g.W)) {
        v = load_f<in_t>(g.x, rows[j].x + tap);
        // rounded to the input dtype, as the matrix units would be fed
        if (g.prologue) v = static_cast<float>(static_cast<in_t>(prologue_f(v, p, c)));
      }
      As[kk_a][ra + 16 * j] = v;
    }
    // B tile: 16 channels x 64 output channels of tap (r, s).
    for (int e = tid; e < kBK * kBN; e += kThreads) {
      const int kk = e / kBN, col = e % kBN;  // compile-time divisors
      const int cb = cur.c0 + kk;
      const int64_t k = col0 + col;
      Bs[kk][col] = (cb < channels && k < p.K)
                        ? load_f<in_t>(g.w, k * g.ws.n + static_cast<int64_t>(cb) * g.ws.c + cur.r * g.ws.h +
                                                cur.s * g.ws.w)
                        : 0.f;
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

// ------------------------------------------------------------------------------------- tensor-core loop
namespace wmma = nvcuda::wmma;

// Per input dtype: the element the matrix units read, the WMMA precision tag, the reduction slice (64
// bytes of channels) and the MMA depth.
template <typename in_t>
struct Tc;
template <>
struct Tc<float> {
  using elem = float;
  using prec = wmma::precision::tf32;
  static constexpr int kBK = 32, kWK = 8;
};
template <>
struct Tc<c10::Half> {
  using elem = __half;
  using prec = __half;
  static constexpr int kBK = 64, kWK = 16;
};
template <>
struct Tc<c10::BFloat16> {
  using elem = __nv_bfloat16;
  using prec = __nv_bfloat16;
  static constexpr int kBK = 64, kWK = 16;
};

constexpr int kStages = 4;
constexpr int kVecBytes = 16;                      // one cp.async / one chunk
constexpr int kSliceBytes = 128;                   // one row of a reduction slice
constexpr int kRowBytes = kSliceBytes + kVecBytes;  // padded: WMMA wants 32-byte aligned fragments and
                                                    // the pad staggers banks
constexpr int kStageBytes = (kBM + kBN) * kRowBytes;
constexpr int kChunksPerRow = kSliceBytes / kVecBytes;
constexpr int kRowStep = kThreads / kChunksPerRow;      // a thread's chunks: rows r, r + kRowStep, ...
constexpr int kChunks = kBM * kChunksPerRow / kThreads;  // per thread per operand per slice
constexpr int kCsLd = kBN + 4;  // float accumulator tile, row-major
static_assert(kBM == kBN && kBM % kRowStep == 0 && kChunks * kRowStep == kBM,
              "a thread's A rows and B columns share one mapping");
static_assert(kBM == 64 && kBN == 64 && kThreads == 256, "warp tiling below: 4 x 2 warps of 16 x 32");

// Dynamic shared memory per CTA, by main loop: the ring (its memory then takes the float accumulator tile),
// or the SIMT loop's two float tiles. Over 48 KB: the launch raises the kernel's limit first (launch()).
constexpr int kTcSmemBytes = std::max(kStages * kStageBytes, kBM * kCsLd * 4);
constexpr int kSimtSmemBytes = kBK * (kBM + kBN) * 4;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// acc += the tile's GEMM over g, on tensor cores; the 64x64 float result lands in shared memory and each
// thread takes its 4x4 patch (the SIMT loop's ownership), so the epilogue is the same for both loops.
template <typename in_t, bool ASYNC>
__device__ void tc_reduce_tile(float (&out)[4][4], unsigned char* smem, const GemmSrc& g, int64_t row0,
                               int64_t col0, const Params& p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using T = Tc<in_t>;
  using elem = typename T::elem;
  constexpr int V = kVecBytes / sizeof(in_t), BK = T::kBK, LD = kRowBytes / sizeof(in_t);
  static_assert(BK * sizeof(in_t) == kSliceBytes && BK == kChunksPerRow * V, "a slice row is 128 bytes");
  const int tid = threadIdx.x, warp = tid / 32, wm = warp % 4, wn = warp / 4;
  // This thread's chunks of every slice: A rows and B columns arow + h * kRowStep (h < kChunks), channels
  // [kc, kc + V) of each.
  const int arow = tid / kChunksPerRow, kc = (tid % kChunksPerRow) * V;
  TcRow rows[kChunks];  // the only divisions: the loop below steps by addition
#pragma unroll
  for (int h = 0; h < kChunks; ++h) rows[h] = tc_row(row0 + arow + h * kRowStep, p, g);
  const int channels = static_cast<int>(g.channels), H = static_cast<int>(g.H), W = static_cast<int>(g.W);
  const int slices = g.kh * g.kw * ((channels + BK - 1) / BK);

  auto a_of = [&](int stage) { return reinterpret_cast<in_t*>(smem + stage * kStageBytes); };
  auto b_of = [&](int stage) { return reinterpret_cast<in_t*>(smem + stage * kStageBytes + kBM * kRowBytes); };
  const in_t* x = static_cast<const in_t*>(g.x);
  const in_t* w = static_cast<const in_t*>(g.w);

  SliceCursor load_at, transform_at;  // the next slice to load; the next to run the prologue on
  auto load = [&](int stage) {
    const int c = load_at.c0 + kc;
    const bool in_c = c < channels;
    const int64_t x_tap = load_at.r * g.xs.h + load_at.s * g.xs.w + static_cast<int64_t>(c) * g.xs.c;
    const int64_t w_tap = static_cast<int64_t>(c) * g.ws.c + load_at.r * g.ws.h + load_at.s * g.ws.w;
    auto chunk = [&](int h) {
      const int r = arow + h * kRowStep;
      const int64_t k = col0 + r;
      TcRow row = rows[0];  // rows[h] without indexing by a variable (that would put rows in local memory)
#pragma unroll
      for (int j = 1; j < kChunks; ++j)
        if (j == h) row = rows[j];
      const bool pix = tc_inside(row, load_at.r, load_at.s, H, W);
      const int64_t xo = row.x + x_tap, wo = k * g.ws.n + w_tap;
      in_t* a = a_of(stage) + r * LD + kc;
      in_t* b = b_of(stage) + r * LD + kc;
      if constexpr (ASYNC) {  // whole vectors: channels % V == 0 was checked on the host
        const bool a_ok = pix && in_c, b_ok = k < p.K && in_c;
        cp_async16(a, a_ok ? x + xo : x, a_ok ? kVecBytes : 0);
        cp_async16(b, b_ok ? w + wo : w, b_ok ? kVecBytes : 0);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const bool in_e = c + e < channels;
          a[e] = pix && in_e ? x[xo + e * g.xs.c] : in_t(0.f);
          b[e] = k < p.K && in_e ? w[wo + e * g.ws.c] : in_t(0.f);
        }
      }
    };
    if constexpr (ASYNC) {
#pragma unroll
      for (int h = 0; h < kChunks; ++h) chunk(h);
    } else {  // 2 V strided loads per chunk: one chunk at a time keeps them in registers (no spills)
#pragma unroll 1
      for (int h = 0; h < kChunks; ++h) chunk(h);
    }
    load_at.next(g.kw, channels, BK);
  };
  // The prologue on this thread's own A chunks of the next slice, once they have landed: the V channels'
  // parameters read once for all chunks, each chunk read and written back as one 16-byte vector (a chunk
  // is 16-byte aligned in the ring). Channels past C stay zero (their parameters are never read).
  auto transform = [&](int stage) {
    const int c = transform_at.c0 + kc;
    float mean[V], scale[V], shift[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const bool in_e = c + e < channels;
      mean[e] = in_e ? p.in_mean[c + e] : 0.f;
      scale[e] = in_e ? p.in_scale[c + e] : 0.f;
      shift[e] = in_e ? p.in_shift[c + e] : 0.f;
    }
#pragma unroll
    for (int h = 0; h < kChunks; ++h) {
      if (!tc_inside(rows[h], transform_at.r, transform_at.s, H, W)) continue;
      uint4* chunk = reinterpret_cast<uint4*>(a_of(stage) + (arow + h * kRowStep) * LD + kc);
      union {
        uint4 raw;
        in_t v[V];
      } u{*chunk};
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (c + e < channels)
          u.v[e] = static_cast<in_t>(bn_relu(static_cast<float>(u.v[e]), mean[e], scale[e], shift[e]));
      *chunk = u.raw;
    }
    transform_at.next(g.kw, channels, BK);
  };

  wmma::fragment<wmma::accumulator, 16, 16, T::kWK, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
  auto compute = [&](int stage) {
    const elem* A = reinterpret_cast<const elem*>(a_of(stage)) + (wm * 16) * LD;
    const elem* B = reinterpret_cast<const elem*>(b_of(stage)) + (wn * 32) * LD;
#pragma unroll
    for (int kk = 0; kk < BK; kk += T::kWK) {
      wmma::fragment<wmma::matrix_a, 16, 16, T::kWK, typename T::prec, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, A + kk, LD);
      if constexpr (sizeof(in_t) == 4)
        for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // B is stored column by column (an output channel's slice is one padded row): col_major.
        wmma::fragment<wmma::matrix_b, 16, 16, T::kWK, typename T::prec, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, B + (j * 16) * LD + kk, LD);
        if constexpr (sizeof(in_t) == 4)
          for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = wmma::__float_to_tf32(fb.x[i]);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  };

  // The ring: slice t lives in stage t % kStages; kStages - 1 slices are in flight while one is multiplied.
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < slices) load(st);
    cp_async_commit();
  }
  int stage = 0, load_stage = kStages - 1;
  for (int t = 0; t < slices; ++t) {
    cp_async_wait<kStages - 2>();  // this thread's copies of slice t are done ...
    if (g.prologue) transform(stage);
    __syncthreads();  // ... and everyone's; and stage (t - 1) % kStages is free again
    compute(stage);
    if (t + kStages - 1 < slices) load(load_stage);
    cp_async_commit();
    stage = stage + 1 == kStages ? 0 : stage + 1;
    load_stage = load_stage + 1 == kStages ? 0 : load_stage + 1;
  }
  cp_async_wait<0>();
  __syncthreads();
  float* cs = reinterpret_cast<float*>(smem);  // the ring is done: its memory takes the accumulators
  wmma::store_matrix_sync(cs + (wm * 16) * kCsLd + wn * 32, acc[0], kCsLd, wmma::mem_row_major);
  wmma::store_matrix_sync(cs + (wm * 16) * kCsLd + wn * 32 + 16, acc[1], kCsLd, wmma::mem_row_major);
  __syncthreads();
  const int tx = tid % 16, ty = tid / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) out[i][j] = cs[(ty * 4 + i) * kCsLd + tx * 4 + j];
  __syncthreads();  // before the next GEMM's loads reuse the memory
#else
  __trap();  // the host launches tensor-core kernels on sm_80 and newer only
#endif
}

enum class Loop { kSimt, kTensorCore, kTensorCoreAsync };

template <typename in_t, typename out_t, Loop LOOP>
__global__ void __launch_bounds__(kThreads) conv_bn_act_kernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem[];  // kTcSmemBytes or kSimtSmemBytes: launch()
  __shared__ float red[16][kBN];  // per-column partial sums across the 16 row groups
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM, col0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  auto gemm = [&](float (&acc)[4][4], const GemmSrc& g) {
    if constexpr (LOOP == Loop::kSimt) {
      simt_reduce_tile<in_t>(acc, reinterpret_cast<float(*)[kBM]>(smem),
                             reinterpret_cast<float(*)[kBN]>(smem + kBK * kBM * sizeof(float)), g, row0, col0, p);
    } else {
      tc_reduce_tile<in_t, LOOP == Loop::kTensorCoreAsync>(acc, smem, g, row0, col0, p);
    }
  };

  float acc[4][4] = {};
  gemm(acc, GemmSrc{p.x, p.xs, p.w, p.ws, p.C, p.H, p.W, p.kh, p.kw, p.stride, p.pad, p.in_scale != nullptr});

  // Epilogue constants of this thread's 4 columns (columns past K: 0, 1, 0, 0, never stored).
  float add[4], center[4], scale[4], beta[4];
  p.bias.load_n(col0 + tx * 4, p.K, add, 0.f);
  p.bn_mean.load_n(col0 + tx * 4, p.K, center, 0.f);
  p.bn_beta.load_n(col0 + tx * 4, p.K, beta, 0.f);
  if (p.bn_mean.p) {
    float var[4];
    p.bn_var.load_n(col0 + tx * 4, p.K, var, 0.f);
    p.bn_gamma.load_n(col0 + tx * 4, p.K, scale, 0.f);
    for (int j = 0; j < 4; ++j) scale[j] = col0 + tx * 4 + j < p.K ? scale[j] * rsqrtf(var[j] + p.bn_eps) : 1.f;
  } else {
    for (int j = 0; j < 4; ++j) scale[j] = 1.f;
  }

  // Per-tile (mean, M2) of v(i, j) over this tile's valid rows: two passes, each summed through shared
  // memory in a fixed order (deterministic); `back` is added to the means (a bias left out of the sums,
  // which M2 ignores: a large bias costs no digits). Called by every thread or by none.
  const float rows = static_cast<float>(min(static_cast<int64_t>(kBM), p.M - row0));
  auto tile_stats = [&](auto v, float* pmean, float* pm2, const float (&back)[4]) {
    float part[4], mean[4];
    for (int j = 0; j < 4; ++j) {
      part[j] = 0.f;
      for (int i = 0; i < 4; ++i) part[j] += row0 + ty * 4 + i < p.M ? v(i, j) : 0.f;
      red[ty][tx * 4 + j] = part[j];
    }
    __syncthreads();
    for (int j = 0; j < 4; ++j) {
      float s = 0.f;
      for (int y = 0; y < 16; ++y) s += red[y][tx * 4 + j];
      mean[j] = s / rows;
    }
    __syncthreads();
    for (int j = 0; j < 4; ++j) {
      part[j] = 0.f;
      for (int i = 0; i < 4; ++i) {
        const float d = v(i, j) - mean[j];
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
        pmean[blockIdx.x * p.K + k] = mean[j] + back[j];
        pm2[blockIdx.x * p.K + k] = m2;
      }
    }
    __syncthreads();  // `red` is free again
  };

  if (p.pmean) {
    // Of the pre-residual value: the BN-folded output, or the convolution before its bias.
    const bool bn = p.bn_mean.p != nullptr;
    float back[4];
    for (int j = 0; j < 4; ++j) back[j] = bn ? 0.f : add[j];
    tile_stats([&](int i, int j) { return bn ? (acc[i][j] + add[j] - center[j]) * scale[j] + beta[j] : acc[i][j]; },
               p.pmean, p.pm2, back);
    if (blockIdx.y == 0 && threadIdx.x == 0) p.pcount[blockIdx.x] = rows;
  }

  float sc[4][4] = {};
  float sc_add[4] = {};
  if (p.scw) {
    __syncthreads();
    gemm(sc, GemmSrc{p.scx, p.ss, p.scw, p.sws, p.SC_C, p.SC_H, p.SC_W, 1, 1, p.sc_stride, 0, false});
    p.sc_bias.load_n(col0 + tx * 4, p.K, sc_add, 0.f);
    if (p.sc_pmean)  // the shortcut's own batch norm: its statistics, before its bias as above
      tile_stats([&](int i, int j) { return sc[i][j]; }, p.sc_pmean, p.sc_pm2, sc_add);
  }
  // This thread's four rows as (n, p, q): the first decomposed (stride 1, no padding: the position itself),
  // the others stepped to (no division per row).
  RowOrigin pos = row_origin(row0 + ty * 4, p.P, p.Q, 1, 0);
  const int64_t k0 = col0 + tx * 4;
  for (int i = 0; i < 4; ++i, next_row(pos, p.P, p.Q, 1, 0)) {
    const int64_t m = row0 + ty * 4 + i;
    if (m >= p.M) continue;
    const int64_t n = pos.n, ph = pos.h0, qw = pos.w0;
    if (p.vec4) {  // the same arithmetic, four channels per access (K % 4 == 0: all four or none are < K)
      if (k0 >= p.K) continue;
      const int64_t o = n * p.os.n + k0 + ph * p.os.h + qw * p.os.w;
      float v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = (acc[i][j] + add[j] - center[j]) * scale[j] + beta[j];
      if (p.scw) {
        float sv[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) sv[j] = sc[i][j] + sc_add[j];
        if (p.sc_separate) {
          store4<out_t>(p.sco, o, sv);
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) v[j] += sv[j];
        }
      }
      if (p.res) add4<out_t>(p.res, n * p.rs.n + k0 + ph * p.rs.h + qw * p.rs.w, v);
      if (p.relu)
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = relu_keep_nan(v[j]);
      store4<out_t>(p.out, o, v);
      continue;
    }
    for (int j = 0; j < 4; ++j) {
      const int64_t k = col0 + tx * 4 + j;
      if (k >= p.K) continue;
      const int64_t o = n * p.os.n + k * p.os.c + ph * p.os.h + qw * p.os.w;
      float v = (acc[i][j] + add[j] - center[j]) * scale[j] + beta[j];
      if (p.scw) {
        const float s = sc[i][j] + sc_add[j];
        if (p.sc_separate) static_cast<out_t*>(p.sco)[o] = static_cast<out_t>(s);
        else v += s;
      }
      if (p.res) v += load_f<out_t>(p.res, n * p.rs.n + k * p.rs.c + ph * p.rs.h + qw * p.rs.w);
      if (p.relu) v = relu_keep_nan(v);
      static_cast<out_t*>(p.out)[o] = static_cast<out_t>(v);
    }
  }
}

constexpr int smem_bytes(Loop loop) { return loop == Loop::kSimt ? kSimtSmemBytes : kTcSmemBytes; }

// One launch with the loop's dynamic shared memory; the first on each device raises the kernel's limit when
// that is over the default 48 KB (a per-function attribute: raising it twice is harmless, so no lock). The
// SIMT loop serves float32 only (TF32 off, or a GPU before sm_80): 16-bit inputs always have tensor cores on
// the architectures this extension is built for, so their SIMT variants are not instantiated.
template <typename in_t, typename out_t, Loop LOOP>
void launch(dim3 grid, cudaStream_t stream, const Params& p, int device) {
  if constexpr (LOOP == Loop::kSimt && !std::is_same_v<in_t, float>) {
    TORCH_CHECK(false, "conv_fused: float16/bfloat16 need a GPU with compute capability 8.0 or newer");
  } else {
    constexpr int smem = smem_bytes(LOOP);
    if constexpr (smem > 48 * 1024) {
      static std::atomic<uint64_t> raised{0};  // a bit per device index below 64; beyond, every launch
      const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
      if (bit == 0 || !(raised.load(std::memory_order_relaxed) & bit)) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(conv_bn_act_kernel<in_t, out_t, LOOP>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        raised.fetch_or(bit, std::memory_order_relaxed);
      }
    }
    conv_bn_act_kernel<in_t, out_t, LOOP><<<grid, kThreads, smem, stream>>>(p);
  }
}

// Channels-dense operands (NHWC activations, KRSC weights) whose channel vectors are whole 16-byte,
// 16-byte-aligned units: what cp.async copies.
bool vector_dense(const at::Tensor& t) {
  const int64_t v = kVecBytes / t.element_size();
  const auto addr = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  auto whole = [&](int d) { return t.size(d) == 1 || t.stride(d) % v == 0; };  // a size-1 dim is never stepped
  return t.stride(1) == 1 && t.size(1) % v == 0 && whole(0) && whole(2) && whole(3) && addr % kVecBytes == 0;
}

// Whether the epilogue may take four channels per access: channels-dense (channel stride 1, every other
// stride a multiple of 4) and 4-element aligned, for the output, the residual and the separate shortcut.
bool vec4_ok(const at::Tensor& out, const c10::optional<at::Tensor>& residual, const at::Tensor* sc_out) {
  auto dense4 = [](const at::Tensor& t) {
    const auto addr = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return t.size(1) % 4 == 0 && t.stride(1) == 1 && t.stride(0) % 4 == 0 && t.stride(2) % 4 == 0 &&
           t.stride(3) % 4 == 0 && addr % (4 * t.element_size()) == 0;
  };
  return dense4(out) && (!residual.has_value() || dense4(*residual)) && (sc_out == nullptr || dense4(*sc_out));
}

Loop choose_loop(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& sc_x,
                 const c10::optional<at::Tensor>& sc_weight) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  const bool tf32 = at::globalContext().allowTF32CuDNN();  // what cuDNN's convolutions follow too
  if (major < 8 || (x.scalar_type() == at::kFloat && !tf32)) return Loop::kSimt;
  const bool dense = vector_dense(x) && vector_dense(weight) &&
                     (!sc_x.has_value() || (vector_dense(*sc_x) && vector_dense(*sc_weight)));
  return dense ? Loop::kTensorCoreAsync : Loop::kTensorCore;
}

const float* f32_or_null(const c10::optional<at::Tensor>& v, at::Tensor& keep) {
  if (!v.has_value()) return nullptr;
  keep = as_f32(*v);
  return keep.const_data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_fused_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t stride,
    int64_t padding, const c10::optional<at::Tensor>& bn_mean, const c10::optional<at::Tensor>& bn_var,
    const c10::optional<at::Tensor>& bn_gamma, const c10::optional<at::Tensor>& bn_beta, double bn_eps,
    const c10::optional<at::Tensor>& in_mean, const c10::optional<at::Tensor>& in_scale,
    const c10::optional<at::Tensor>& in_shift, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& sc_x, const c10::optional<at::Tensor>& sc_weight,
    const c10::optional<at::Tensor>& sc_bias, int64_t sc_stride, bool sc_separate, bool relu, bool stats,
    at::ScalarType out_dtype, bool sc_stats) {
  const c10::cuda::CUDAGuard guard(x.device());
  const ConvProblem pb = check_conv_fused(x, weight, bias, stride, padding, bn_mean, bn_var, bn_gamma, bn_beta,
                                          in_mean, in_scale, in_shift, residual, sc_x, sc_weight, sc_bias, sc_stride,
                                          out_dtype, c10::DeviceType::CUDA);
  const bool has_sc = sc_weight.has_value();
  sc_stats = sc_stats && has_sc && sc_separate;
  const ConvOutputs outs = allocate_conv_outputs(x, pb, out_dtype, has_sc && sc_separate, stats, sc_stats);
  stats = stats || sc_stats;
  const at::Tensor &out = outs.out, &sc_out = outs.sc_out, &pmean = outs.pmean, &pm2 = outs.pm2,
                   &pcount = outs.pcount;
  const int64_t tiles = (pb.M + kBM - 1) / kBM;
  if (pb.M == 0) return outs.tuple();

  at::Tensor keep[11];
  Params p{};
  p.x = x.const_data_ptr(), p.w = weight.const_data_ptr(), p.out = out.mutable_data_ptr();
  p.res = residual.has_value() ? residual->const_data_ptr() : nullptr;
  p.scx = has_sc ? sc_x->const_data_ptr() : nullptr;
  p.scw = has_sc ? sc_weight->const_data_ptr() : nullptr;
  p.sco = has_sc && sc_separate ? sc_out.mutable_data_ptr() : nullptr;
  p.bias = param_vec(bias, keep[0]);
  p.bn_mean = param_vec(bn_mean, keep[1]), p.bn_var = param_vec(bn_var, keep[2]);
  p.bn_gamma = param_vec(bn_gamma, keep[3]), p.bn_beta = param_vec(bn_beta, keep[4]);
  p.bn_eps = static_cast<float>(bn_eps);
  p.in_mean = f32_or_null(in_mean, keep[5]), p.in_scale = f32_or_null(in_scale, keep[6]);
  p.in_shift = f32_or_null(in_shift, keep[7]), p.sc_bias = param_vec(sc_bias, keep[8]);
  p.pmean = stats ? pmean.mutable_data_ptr<float>() : nullptr;
  p.pm2 = stats ? pm2.mutable_data_ptr<float>() : nullptr;
  p.pcount = stats ? pcount.mutable_data_ptr<float>() : nullptr;
  p.sc_pmean = sc_stats ? outs.sc_pmean.mutable_data_ptr<float>() : nullptr;
  p.sc_pm2 = sc_stats ? outs.sc_pm2.mutable_data_ptr<float>() : nullptr;
  p.N = pb.N, p.C = pb.C, p.H = pb.H, p.W = pb.W, p.K = pb.K, p.P = pb.P, p.Q = pb.Q, p.M = pb.M, p.SC_C = pb.SC_C;
  p.SC_H = has_sc ? sc_x->size(2) : 1, p.SC_W = has_sc ? sc_x->size(3) : 1;
  p.kh = static_cast<int>(pb.KH), p.kw = static_cast<int>(pb.KW), p.stride = static_cast<int>(stride);
  p.pad = static_cast<int>(padding), p.sc_stride = static_cast<int>(sc_stride);
  p.relu = relu, p.sc_separate = sc_separate;
  p.vec4 = vec4_ok(out, residual, has_sc && sc_separate ? &sc_out : nullptr);
  p.xs = strides4(x), p.ws = strides4(weight), p.os = strides4(out);
  p.rs = residual.has_value() ? strides4(*residual) : Strides4{0, 0, 0, 0};
  p.ss = has_sc ? strides4(*sc_x) : Strides4{0, 0, 0, 0};
  p.sws = has_sc ? strides4(*sc_weight) : Strides4{0, 0, 0, 0};
  TORCH_CHECK(!has_sc || !sc_separate || sc_out.strides() == out.strides(), "conv_fused: internal: shortcut layout");

  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>((pb.K + kBN - 1) / kBN));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Loop loop = choose_loop(x, weight, sc_x, sc_weight);
  FR_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "conv_fused_cuda", [&] {
    using in_t = scalar_t;
    FR_DISPATCH_FLOAT_HALF_BF16(out_dtype, "conv_fused_cuda_out", [&] {
      const int device = x.get_device();
      switch (loop) {
        case Loop::kTensorCoreAsync:
          launch<in_t, scalar_t, Loop::kTensorCoreAsync>(grid, stream, p, device);
          break;
        case Loop::kTensorCore:
          launch<in_t, scalar_t, Loop::kTensorCore>(grid, stream, p, device);
          break;
        case Loop::kSimt:
          launch<in_t, scalar_t, Loop::kSimt>(grid, stream, p, device);
          break;
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return outs.tuple();
}

template <typename T>
__global__ void im2col_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t cols,
                              int64_t kernel, int64_t P, int64_t Q, int64_t H, int64_t W, int64_t stride,
                              int64_t pad, Strides4 xs) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * cols;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = im2col_source(i / cols, i % cols, kernel, P, Q, H, W, stride, pad, xs);
    out[i] = o < 0 ? T(0.0f) : x[o];
  }
}

at::Tensor im2col_cuda(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t padding) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Im2colProblem pb = check_im2col(x, kernel, stride, padding, c10::DeviceType::CUDA);
  const int64_t rows = pb.N * pb.P * pb.Q, cols = pb.C * kernel * kernel;
  at::Tensor out = at::empty({rows, cols}, x.options());
  if (out.numel() == 0) return out;
  const int64_t blocks = std::min<int64_t>((out.numel() + 255) / 256, 65535);
  FR_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "im2col_cuda", [&] {
    im2col_kernel<scalar_t><<<static_cast<unsigned>(blocks), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, cols, kernel, pb.P, pb.Q, pb.H, pb.W,
        stride, padding, strides4(x));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<int64_t> cuda_conv_config() {
  return {kThreads, kTcSmemBytes, kSimtSmemBytes, kBM, kBN, kSliceBytes, kStages};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("conv_fused", &conv_fused_cuda);
  m.impl("im2col", &im2col_cuda);
}
TORCH_LIBRARY_IMPL(fused_resnet, CompositeImplicitAutograd, m) { m.impl("cuda_conv_config", &cuda_conv_config); }

}  // namespace fused_resnet
