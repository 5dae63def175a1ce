// pool_adapter: host-side parameters and launchers (see seedvl_kernels/pool_adapter.py for the math).
#pragma once

#include <cstdint>

#include "common/common.h"

namespace seedvl {

// Rows of pooled tokens per M-tile of the backward's dh GEMM: the partial bias-gradient scratch
// holds one row of column sums per M-tile.
constexpr int64_t kPoolAdapterTileM = 128;

// A weight matrix with one unit stride: row-major (stride_col == 1) or column-major (stride_row == 1).
struct PaWeight {
  const void* ptr;
  int64_t stride_row, stride_col;
};

struct PoolAdapterFwdParams {
  const void* x;     // (T, C), unit column stride, 2x2-window order
  int64_t stride_x;  // row stride of x
  PaWeight w1;       // (C, F)
  const void* b1;    // (F,)
  PaWeight w2;       // (F, C_out)
  const void* b2;    // (C_out,)
  void* y;           // (T/4, C_out) contiguous
  void* h;           // (T/4, F) contiguous: the pre-activation, saved for backward
  void* a;           // (T/4, F) contiguous scratch: GELU(h) between the two GEMMs
  int64_t tokens, c, f, c_out;
};

struct PoolAdapterBwdParams {
  const void* dy;  // (T/4, C_out) contiguous
  const void* x;   // (T, C), unit column stride
  int64_t stride_x;
  PaWeight w1, w2;
  const void* h;                 // (T/4, F) contiguous
  void* dx;                      // (T, C) contiguous
  void *dw1, *db1, *dw2, *db2;   // contiguous, the shapes of w1, b1, w2, b2
  void *dh, *a;                  // (T/4, F) contiguous scratch
  float* partial;                // (cdiv(T/4, kPoolAdapterTileM), F + C_out) fp32 scratch
  int64_t tokens, c, f, c_out;
};

void pool_adapter_fwd_launch(const PoolAdapterFwdParams& p, DType dtype, cudaStream_t stream);
void pool_adapter_bwd_launch(const PoolAdapterBwdParams& p, DType dtype, cudaStream_t stream);

}  // namespace seedvl
