// Launch shapes for the kernels that walk an activation as runs (conv_geometry.h: runs_of): x along a
// run's contiguous elements, y across runs. Long runs (NCHW planes) take wide blocks; short runs (the
// channels of one NHWC position) take several runs per block, so a warp still reads 32 contiguous
// elements where the run is that long.
#pragma once

#include <algorithm>

#include "../conv_geometry.h"

namespace fused_resnet {

inline dim3 run_block(Runs runs) {
  const unsigned x = runs.inner >= 256 ? 256 : runs.inner >= 128 ? 128 : runs.inner >= 64 ? 64 : 32;
  return dim3(x, 256 / x);
}

inline dim3 run_grid(Runs runs, dim3 block) {
  const int64_t gx = std::min<int64_t>((runs.inner + block.x - 1) / block.x, 65535);
  const int64_t gy = std::min<int64_t>((runs.outer + block.y - 1) / block.y, 65535);
  return dim3(static_cast<unsigned>(std::max<int64_t>(gx, 1)), static_cast<unsigned>(std::max<int64_t>(gy, 1)));
}

}  // namespace fused_resnet
