// Index math shared by the CPU and CUDA kernels (compiled as host and device inline functions), so the
// CPU tests exercise the exact arithmetic the GPU runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FR_HOST_DEVICE inline
#endif

namespace fused_resnet {

// Memory layouts of a 4-D activation that the kernels accept, dense in either order.
enum class Layout : int { NCHW = 0, NHWC = 1 };

// Channel of the element at linear offset `i` of a dense (N, C, H, W) tensor stored in `layout`.
// `hw` is H * W. int64 throughout: activations can exceed 2^31 elements.
FR_HOST_DEVICE int64_t channel_of(int64_t i, int64_t channels, int64_t hw, Layout layout) {
  return layout == Layout::NHWC ? i % channels : (i / hw) % channels;
}

// Output extent of a convolution along one spatial dimension.
FR_HOST_DEVICE int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding) {
  return (in + 2 * padding - kernel) / stride + 1;
}

// Implicit-GEMM addressing: output row m = (n, p, q) of a P x Q output, read through tap (r, s) of a
// convolution with `stride` and `pad`, lands on input pixel (n, h, w); `inside` is false in the zero padding.
struct InputTap {
  int64_t n, h, w;
  bool inside;
};

FR_HOST_DEVICE InputTap input_tap(int64_t m, int64_t P, int64_t Q, int64_t H, int64_t W, int64_t stride, int64_t pad,
                                  int64_t r, int64_t s) {
  const int64_t n = m / (P * Q), pq = m % (P * Q);
  const int64_t h = (pq / Q) * stride - pad + r, w = (pq % Q) * stride - pad + s;
  return {n, h, w, h >= 0 && h < H && w >= 0 && w < W};
}

// Element strides of a 4-D (N, C, H, W) tensor in any layout.
struct Strides4 {
  int64_t n, c, h, w;
};

// The im2col matrix of a kernel x kernel convolution: row m = (n, p, q) as above, column
// col = (c * kernel + r) * kernel + s (F.unfold's order); the source element's offset in x, or -1 where
// the tap falls in the zero padding.
FR_HOST_DEVICE int64_t im2col_source(int64_t m, int64_t col, int64_t kernel, int64_t P, int64_t Q, int64_t H,
                                     int64_t W, int64_t stride, int64_t pad, Strides4 xs) {
  const int64_t c = col / (kernel * kernel), rs = col % (kernel * kernel);
  const InputTap t = input_tap(m, P, Q, H, W, stride, pad, rs / kernel, rs % kernel);
  return t.inside ? t.n * xs.n + c * xs.c + t.h * xs.h + t.w * xs.w : -1;
}

}  // namespace fused_resnet

