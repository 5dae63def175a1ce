// pool_adapter launchers: the forward's two GEMMs and the backward's four, as launches of the one
// GEMM kernel in kernel.cuh with their operand layouts and epilogues (N = T/4 pooled tokens):
//
//   forward   F1  h, GELU(h) = mean4(x) @ w1 + b1     A pooled K-major   N x F x C       kBiasGelu
//             F2  y = GELU(h) @ w2 + b2               A K-major          N x C_out x F   kBias
//   backward  B1  dh, GELU(h) = dy @ w2^T * GELU'(h)  A K-major          N x F x C_out   kDGelu
//                 + partial column sums of dh and dy, then two tiny column_sum launches -> db1, db2
//             B2  dw2 = GELU(h)^T dy                  A MN-major         F x C_out x N   kStore
//             B3  dw1 = mean4(x)^T dh                 A pooled MN-major  C x F x N       kStore
//             B4  dx[4n + j] = (dh @ w1^T)[n] / 4     A K-major          N x C x F       kWindow
//
// B's layout follows the weight's (row-major w: N-major as w, K-major as w^T; column-major the
// other way round); the wgrad B operands (dy, dh) are N-major. Six instantiations per dtype.
#include <cstdint>
#include <stdexcept>

#include "pool_adapter/kernel.cuh"

namespace seedvl {
namespace {

using pool_adapter::Epilogue;
using pool_adapter::GemmParams;
using pool_adapter::Tile;

struct Operand {
  const void* ptr;
  int64_t ld;
  bool k_major;
};

// w (R x S) as the B operand of a GEMM: B = w (K = R, N = S) or B = w^T (K = S, N = R).
Operand as_b(const PaWeight& w) {
  return w.stride_col == 1 ? Operand{w.ptr, w.stride_row, false} : Operand{w.ptr, w.stride_col, true};
}
Operand as_b_transposed(const PaWeight& w) {
  return w.stride_col == 1 ? Operand{w.ptr, w.stride_row, true} : Operand{w.ptr, w.stride_col, false};
}

template <typename T, bool A_K_MAJOR, bool A_POOL, bool B_K_MAJOR>
void launch_gemm(const GemmParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return;
  auto kernel = pool_adapter::pool_adapter_gemm_kernel<T, A_K_MAJOR, A_POOL, B_K_MAJOR>;
  const int smem = static_cast<int>(pool_adapter::kStages *
                                    (Tile<A_K_MAJOR>::kElems + Tile<B_K_MAJOR>::kElems) * sizeof(T));
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "pool_adapter_gemm_kernel shared-memory attribute");
  const int64_t blocks = static_cast<int64_t>((p.M + pool_adapter::kBlockM - 1) / pool_adapter::kBlockM) *
                         ((p.N + pool_adapter::kBlockN - 1) / pool_adapter::kBlockN);
  kernel<<<static_cast<unsigned>(blocks), pool_adapter::kThreads, smem, stream>>>(p);
  check_cuda(cudaGetLastError(), "pool_adapter_gemm_kernel launch");
}

// The six layout combinations the adapter uses; the wgrad GEMMs (A MN-major) always have an
// N-major B (dy or dh, row-major).
template <typename T>
void run_gemm(const GemmParams& p, bool a_k_major, bool a_pool, bool b_k_major, cudaStream_t stream) {
  if (a_k_major) {
    if (a_pool) {
      b_k_major ? launch_gemm<T, true, true, true>(p, stream) : launch_gemm<T, true, true, false>(p, stream);
    } else {
      b_k_major ? launch_gemm<T, true, false, true>(p, stream) : launch_gemm<T, true, false, false>(p, stream);
    }
    return;
  }
  if (b_k_major) throw std::logic_error("pool_adapter: an MN-major A with a K-major B is not instantiated");
  a_pool ? launch_gemm<T, false, true, false>(p, stream) : launch_gemm<T, false, false, false>(p, stream);
}

template <typename In, typename Out>
void column_sum(const In* src, int64_t rows, int64_t cols, Out* dst, cudaStream_t stream) {
  if (cols == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = (cols + kThreads - 1) / kThreads;
  pool_adapter::column_sum_kernel<In, Out><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      src, rows, cols, cols, dst);
  check_cuda(cudaGetLastError(), "pool_adapter column_sum_kernel launch");
}

int as_int(int64_t v, const char* what) {
  if (v < 0 || v > INT32_MAX) throw std::invalid_argument(std::string("pool_adapter: ") + what + " exceeds int32");
  return static_cast<int>(v);
}

template <typename T>
void forward(const PoolAdapterFwdParams& p, cudaStream_t stream) {
  const int n = as_int(p.tokens / 4, "T/4"), c = as_int(p.c, "C"), f = as_int(p.f, "F");
  const int c_out = as_int(p.c_out, "C_out");

  GemmParams g1{};
  const Operand w1 = as_b(p.w1);
  g1.a = p.x;
  g1.lda = p.stride_x;
  g1.b = w1.ptr;
  g1.ldb = w1.ld;
  g1.out = p.h;
  g1.ld_out = f;
  g1.out2 = p.a;
  g1.ld_out2 = f;
  g1.bias = p.b1;
  g1.M = n;
  g1.N = f;
  g1.K = c;
  g1.epilogue = Epilogue::kBiasGelu;
  run_gemm<T>(g1, true, true, w1.k_major, stream);

  GemmParams g2{};
  const Operand w2 = as_b(p.w2);
  g2.a = p.a;
  g2.lda = f;
  g2.b = w2.ptr;
  g2.ldb = w2.ld;
  g2.out = p.y;
  g2.ld_out = c_out;
  g2.bias = p.b2;
  g2.M = n;
  g2.N = c_out;
  g2.K = f;
  g2.epilogue = Epilogue::kBias;
  run_gemm<T>(g2, true, false, w2.k_major, stream);
}

template <typename T>
void backward(const PoolAdapterBwdParams& p, cudaStream_t stream) {
  const int n = as_int(p.tokens / 4, "T/4"), c = as_int(p.c, "C"), f = as_int(p.f, "F");
  const int c_out = as_int(p.c_out, "C_out");
  const int64_t tiles = (n + kPoolAdapterTileM - 1) / kPoolAdapterTileM;
  float* sum_dh = p.partial;              // (tiles, F)
  float* sum_dy = p.partial + tiles * f;  // (tiles, C_out)

  GemmParams b1{};
  const Operand w2t = as_b_transposed(p.w2);
  b1.a = p.dy;
  b1.lda = c_out;
  b1.b = w2t.ptr;
  b1.ldb = w2t.ld;
  b1.out = p.dh;
  b1.ld_out = f;
  b1.out2 = p.a;
  b1.ld_out2 = f;
  b1.aux = p.h;
  b1.ld_aux = f;
  b1.sum_out = sum_dh;
  b1.sum_a = sum_dy;
  b1.M = n;
  b1.N = f;
  b1.K = c_out;
  b1.epilogue = Epilogue::kDGelu;
  run_gemm<T>(b1, true, false, w2t.k_major, stream);
  column_sum(sum_dh, tiles, f, static_cast<T*>(p.db1), stream);
  if (f > 0) {
    column_sum(sum_dy, tiles, c_out, static_cast<T*>(p.db2), stream);
  } else {  // no B1 CTA ran to sum dy
    column_sum(static_cast<const T*>(p.dy), n, c_out, static_cast<T*>(p.db2), stream);
  }

  GemmParams b2{};
  b2.a = p.a;
  b2.lda = f;
  b2.b = p.dy;
  b2.ldb = c_out;
  b2.out = p.dw2;
  b2.ld_out = c_out;
  b2.M = f;
  b2.N = c_out;
  b2.K = n;
  b2.epilogue = Epilogue::kStore;
  run_gemm<T>(b2, false, false, false, stream);

  GemmParams b3{};
  b3.a = p.x;
  b3.lda = p.stride_x;
  b3.b = p.dh;
  b3.ldb = f;
  b3.out = p.dw1;
  b3.ld_out = f;
  b3.M = c;
  b3.N = f;
  b3.K = n;
  b3.epilogue = Epilogue::kStore;
  run_gemm<T>(b3, false, true, false, stream);

  GemmParams b4{};
  const Operand w1t = as_b_transposed(p.w1);
  b4.a = p.dh;
  b4.lda = f;
  b4.b = w1t.ptr;
  b4.ldb = w1t.ld;
  b4.out = p.dx;
  b4.ld_out = c;
  b4.M = n;
  b4.N = c;
  b4.K = f;
  b4.epilogue = Epilogue::kWindow;
  run_gemm<T>(b4, true, false, w1t.k_major, stream);
}

}  // namespace

void pool_adapter_fwd_launch(const PoolAdapterFwdParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: forward<__half>(p, stream); return;
    case DType::kBFloat16: forward<__nv_bfloat16>(p, stream); return;
    default: throw std::invalid_argument("pool_adapter: the CUDA kernels take float16 or bfloat16");
  }
}

void pool_adapter_bwd_launch(const PoolAdapterBwdParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: backward<__half>(p, stream); return;
    case DType::kBFloat16: backward<__nv_bfloat16>(p, stream); return;
    default: throw std::invalid_argument("pool_adapter: the CUDA kernels take float16 or bfloat16");
  }
}

}  // namespace seedvl
