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

// A dense (N, C, H, W) activation as `outer` runs of `inner` contiguous elements: positions x channels
// (NHWC) or (n, c) planes x positions (NCHW). Element (o, i) sits at o * inner + i and belongs to channel
// i (NHWC) or o % C (NCHW): kernels take the channel once per run, never divide per element. int64
// throughout: activations can exceed 2^31 elements.
struct Runs {
  int64_t outer, inner;
};

FR_HOST_DEVICE Runs runs_of(int64_t N, int64_t C, int64_t HW, Layout layout) {
  return layout == Layout::NHWC ? Runs{N * HW, C} : Runs{N * C, HW};
}

// The channel shared by run `o` (NCHW), or -1 when it varies along the run (NHWC: the channel is i).
FR_HOST_DEVICE int64_t run_channel(int64_t o, int64_t C, Layout layout) {
  return layout == Layout::NHWC ? -1 : o % C;
}

// Output extent of a convolution along one spatial dimension.
FR_HOST_DEVICE int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding) {
  return (in + 2 * padding - kernel) / stride + 1;
}

// Implicit-GEMM addressing: output row m = (n, p, q) of a P x Q output reads, through tap (r, s) of a
// convolution with `stride` and `pad`, input pixel (n, h0 + r, w0 + s), where (h0, w0) is the pixel under
// tap (0, 0) -- the row's origin. A kernel decomposes each of its rows once (the only divisions) and then
// steps through taps and channel slices by addition.
struct RowOrigin {
  int64_t n, h0, w0;
};

FR_HOST_DEVICE RowOrigin row_origin(int64_t m, int64_t P, int64_t Q, int64_t stride, int64_t pad) {
  const int64_t n = m / (P * Q), pq = m - n * (P * Q);
  const int64_t p = pq / Q, q = pq - p * Q;
  return {n, p * stride - pad, q * stride - pad};
}

// Row m + 1's origin from row m's, by additions only: what row_origin(m + 1, P, Q, stride, pad) gives. With
// stride 1 and no padding, the next output position (n, p, q) itself.
FR_HOST_DEVICE void next_row(RowOrigin& o, int64_t P, int64_t Q, int64_t stride, int64_t pad) {
  o.w0 += stride;
  if (o.w0 == Q * stride - pad) {
    o.w0 = -pad;
    o.h0 += stride;
    if (o.h0 == P * stride - pad) {
      o.h0 = -pad;
      ++o.n;
    }
  }
}

// Whether tap (r, s) of a row lands inside the H x W image (outside is the zero padding).
FR_HOST_DEVICE bool tap_inside(RowOrigin o, int64_t r, int64_t s, int64_t H, int64_t W) {
  return o.h0 + r >= 0 && o.h0 + r < H && o.w0 + s >= 0 && o.w0 + s < W;
}

struct InputTap {
  int64_t n, h, w;
  bool inside;
};

FR_HOST_DEVICE InputTap input_tap(int64_t m, int64_t P, int64_t Q, int64_t H, int64_t W, int64_t stride, int64_t pad,
                                  int64_t r, int64_t s) {
  const RowOrigin o = row_origin(m, P, Q, stride, pad);
  return {o.n, o.h0 + r, o.w0 + s, tap_inside(o, r, s, H, W)};
}

// The reduction of an implicit GEMM in slices of `bk` channels, tap by tap: (r, s, c0) of the current
// slice, advanced by additions only (the order a flattened loop over taps x channel chunks visits).
struct SliceCursor {
  int r = 0, s = 0, c0 = 0;

  FR_HOST_DEVICE void next(int kw, int channels, int bk) {
    c0 += bk;
    if (c0 >= channels) {
      c0 = 0;
      if (++s == kw) s = 0, ++r;
    }
  }
};

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

