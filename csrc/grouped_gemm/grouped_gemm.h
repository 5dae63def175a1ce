// grouped_gemm: host-side parameters and launchers of the CUTLASS sm_90a grouped GEMMs (bf16 in,
// fp32 accumulate, bf16 out). See seedvl_kernels/grouped_gemm.py for the math and
// seedvl_kernels/grouped_gemm_cuda.py for the Python side.
//
// Neither launcher reads group sizes on the host: a setup kernel turns `offsets` (E+1 int32, on the
// device) into CUTLASS's per-group problem shapes, pointers and strides inside `workspace`, and the
// persistent grouped kernel (grid = #SMs) reads them from there. The host passes only E and bounds.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/common.h"

namespace seedvl {

// M-grouped (forward, dgrad): out[r] = a[r] @ B_e for the rows r of group e, B_e = b[e] (K, N), or
// b[e]^T with trans_b (b[e] stored (N, K)). Rows [offsets[E], m) of out are set to zero.
struct GroupedGemmParams {
  const void* a;         // (m, k) bf16, row stride lda
  const void* b;         // (E, k, n), or (E, n, k) with trans_b; bf16, row stride ldb, group stride
  void* out;             // (m, n) bf16, contiguous
  const int32_t* offsets;  // (E+1,)
  int64_t lda, ldb, stride_b_group;
  int64_t m, n, k;
  int num_groups;
  bool trans_b;
  void* workspace;       // grouped_gemm_workspace_size(num_groups, false, device) bytes
  int device;
};

// K-grouped (wgrad): out[e] = x_e^T @ y_e, x_e = rows of group e of x (rows, p), y_e those of y
// (rows, q); out (E, p, q) contiguous. Empty groups get exact zeros.
struct GroupedGemmDwParams {
  const void* x;         // (m, p) bf16, row stride ldx
  const void* y;         // (m, q) bf16, row stride ldy
  void* out;             // (E, p, q) bf16, contiguous
  const int32_t* offsets;  // (E+1,)
  int64_t ldx, ldy;
  int64_t p, q;
  int num_groups;
  void* workspace;       // grouped_gemm_workspace_size(num_groups, true, device) bytes
  int device;
};

// Bytes of device workspace the launchers need (group arrays + CUTLASS's per-SM TMA descriptors).
size_t grouped_gemm_workspace_size(int num_groups, bool wgrad, int device);

// Throws std::runtime_error when this build or this GPU cannot run the sm_90a kernels.
void grouped_gemm_launch(const GroupedGemmParams& p, cudaStream_t stream);
void grouped_gemm_dw_launch(const GroupedGemmDwParams& p, cudaStream_t stream);

}  // namespace seedvl
