// rope_2d: host-side parameters and launcher (see seedvl_kernels/rope_2d.py for the math).
#pragma once

#include <cstdint>

#include "common/common.h"

namespace seedvl {

struct Rope2dParams {
  const void* x;      // (T, H, D), last dim contiguous
  void* out;          // (T, H, D), last dim contiguous; may alias x
  const int32_t* pos; // (T, 2) = (row, col)
  int64_t num_tokens, num_heads, head_dim;
  int64_t stride_x_t, stride_x_h;
  int64_t stride_out_t, stride_out_h;
  int64_t stride_pos_t, stride_pos_c;
  double theta;
  bool inverse;       // true: rotate by -angle (the backward)
};

void rope_2d_launch(const Rope2dParams& p, DType dtype, cudaStream_t stream);

}  // namespace seedvl
