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

}  // namespace fused_resnet

