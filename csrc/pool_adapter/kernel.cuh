// pool_adapter device code: one tensor-core GEMM building block, out = A @ B (fp32 accumulation),
// with the operand loads and epilogues the adapter's six GEMMs need (see launch.cu for which).
//
// CTA tile 128 x 128 x 64, 8 warps as 2 (M) x 4 (N), each warp 64 x 32 = 4 x 4 mma.sync.m16n8k16
// (bf16 or fp16 in, fp32 accumulators). Operand tiles sit in shared memory in their global storage
// order, K-major (128 rows of 64) or MN-major (64 rows of 128), padded by 16 bytes per row so that
// the 8 row addresses of each ldmatrix phase hit distinct bank groups; ldmatrix (.trans for the
// MN-major tiles) yields the mma fragments for every layout. A 3-stage cp.async ring feeds B (and A
// when it is not pooled).
//
// Pooled A (A_POOL): storage row r of the A tile is the mean of source rows 4r..4r+3 (a 2x2
// window). Each thread loads its 4 chunks x 4 window rows of 16 bytes straight into registers one
// K-step ahead (issued before the current step's MMAs, so their latency hides behind them), sums
// them in fp32, scales by 1/4, rounds once to the input type and stores the pooled tile into the
// ring slot of the next step. In a K-major A tile the pooled rows are tokens (the forward GEMM-1);
// in an MN-major A tile they run along K (dw1 = mean4(x)^T dh). The pooled tensor never exists in
// global memory, and the K-step's shared-memory traffic is that of a plain GEMM.
//
// Epilogues (a run-time switch: it runs once per tile): store; + bias; + bias, then h -> out and
// GELU(h) -> out2; dh = acc * GELU'(h) -> out and GELU(h) -> out2 with h loaded from aux, plus the
// per-M-tile partial column sums of dh and of the A operand (dy) for the bias gradients; and the
// window store, acc / 4 written to rows 4m..4m+3 of out (dx without a pooled gradient in memory).
#pragma once

#include <cstdint>

#include "common/common.h"
#include "pool_adapter/pool_adapter.h"

namespace seedvl {
namespace pool_adapter {

enum class Epilogue : int { kStore, kBias, kBiasGelu, kDGelu, kWindow };

// One GEMM: out (M x N) = A (M x K) @ B (K x N). Operands are given by their storage: a sequence of
// rows with unit stride inside a row and a row stride (ld). A K-major operand stores M (or N) rows
// of K; an MN-major one stores K rows of M (or N). A pooled A's storage row r reads source rows
// 4r..4r+3 at stride lda.
struct GemmParams {
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* out;
  int64_t ld_out;
  void* out2;  // kBiasGelu, kDGelu: GELU(h)
  int64_t ld_out2;
  const void* aux;  // kDGelu: h
  int64_t ld_aux;
  const void* bias;  // kBias, kBiasGelu: (N,)
  float* sum_out;    // kDGelu: (cdiv(M, 128), N) partial column sums of out
  float* sum_a;      // kDGelu: (cdiv(M, 128), K) partial column sums of a K-major A
  int M, N, K;
  Epilogue epilogue;
};

constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kBlockK = 64;
constexpr int kStages = 3;
constexpr int kThreads = 256;
constexpr int kPad = 8;  // elements (16 bytes) of padding per shared-memory row
constexpr int kGroupM = 8;  // M-tiles per swizzle band (L2 reuse of the B tiles)
constexpr int kWarpsM = 2;
constexpr int kWarpM = 64;
constexpr int kWarpN = 32;
constexpr int kMmaM = kWarpM / 16;  // m16 tiles per warp
constexpr int kMmaN = kWarpN / 8;   // n8 tiles per warp
static_assert(kBlockM == kBlockN, "Tile<> serves A and B with one MN extent");
static_assert(kThreads / 32 == kWarpsM * (kBlockN / kWarpN), "8 warps as 2 x 4");
static_assert(kPoolAdapterTileM == kBlockM, "the partial-sum scratch has one row per M-tile");

// An operand tile in shared memory: 128 (M or N) x 64 (K) elements in storage order.
template <bool K_MAJOR>
struct Tile {
  static constexpr int kRows = K_MAJOR ? kBlockM : kBlockK;
  static constexpr int kCols = K_MAJOR ? kBlockK : kBlockM;
  static constexpr int kLd = kCols + kPad;
  static constexpr int kElems = kRows * kLd;
  static constexpr int kChunksPerRow = kCols / 8;  // 16-byte chunks
  static constexpr int kChunksPerThread = kRows * kChunksPerRow / kThreads;
};

constexpr float kRsqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// ----------------------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; an invalid chunk copies nothing and zero-fills (src-size 0).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two values as one 32-bit word (the pair an mma accumulator fragment holds per row).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ void store2(T* ptr, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(ptr) = pack2<T>(lo, hi);
}

// ----------------------------------------------------------------------------- operand tiles

// cp.async one operand tile whose storage rows [row0, row0 + kRows) and columns [col0, col0 + kCols)
// are valid below (rows, cols); cols is a multiple of 8, so a 16-byte chunk is all in or all out.
template <typename T, bool K_MAJOR>
__device__ __forceinline__ void load_tile_async(T* tile, const T* src, int64_t ld, int row0, int rows, int col0,
                                                int cols, int tid) {
  using Tl = Tile<K_MAJOR>;
#pragma unroll
  for (int i = 0; i < Tl::kChunksPerThread; ++i) {
    const int chunk = tid + i * kThreads;
    const int r = chunk / Tl::kChunksPerRow;
    const int c = (chunk % Tl::kChunksPerRow) * 8;
    const bool valid = row0 + r < rows && col0 + c < cols;
    const T* g = valid ? src + static_cast<int64_t>(row0 + r) * ld + col0 + c : src;
    cp_async_16(smem_u32(tile + r * Tl::kLd + c), g, valid);
  }
}

// The 4 window rows of each of this thread's chunks of a pooled tile, into registers.
template <typename T, bool K_MAJOR>
__device__ __forceinline__ void load_pooled(uint4 (&raw)[Tile<K_MAJOR>::kChunksPerThread][4], const T* src,
                                            int64_t ld, int row0, int rows, int col0, int cols, int tid) {
  using Tl = Tile<K_MAJOR>;
#pragma unroll
  for (int i = 0; i < Tl::kChunksPerThread; ++i) {
    const int chunk = tid + i * kThreads;
    const int r = chunk / Tl::kChunksPerRow;
    const int c = (chunk % Tl::kChunksPerRow) * 8;
    const bool valid = row0 + r < rows && col0 + c < cols;
    const T* g = src + static_cast<int64_t>(row0 + r) * 4 * ld + col0 + c;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      raw[i][j] = valid ? __ldg(reinterpret_cast<const uint4*>(g + j * ld)) : make_uint4(0, 0, 0, 0);
    }
  }
}

// mean of the 4 window rows in fp32, rounded once, into the shared tile.
template <typename T, bool K_MAJOR>
__device__ __forceinline__ void store_pooled(T* tile, const uint4 (&raw)[Tile<K_MAJOR>::kChunksPerThread][4],
                                             int tid) {
  using Tl = Tile<K_MAJOR>;
#pragma unroll
  for (int i = 0; i < Tl::kChunksPerThread; ++i) {
    const int chunk = tid + i * kThreads;
    const int r = chunk / Tl::kChunksPerRow;
    const int c = (chunk % Tl::kChunksPerRow) * 8;
    float sum[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) sum[e] = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const T* v = reinterpret_cast<const T*>(&raw[i][j]);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum[e] += to_float(v[e]);
    }
    uint4 out;
    out.x = pack2<T>(0.25f * sum[0], 0.25f * sum[1]);
    out.y = pack2<T>(0.25f * sum[2], 0.25f * sum[3]);
    out.z = pack2<T>(0.25f * sum[4], 0.25f * sum[5]);
    out.w = pack2<T>(0.25f * sum[6], 0.25f * sum[7]);
    *reinterpret_cast<uint4*>(tile + r * Tl::kLd + c) = out;
  }
}

// ----------------------------------------------------------------------------- fragments

// A fragments of the warp's 4 m16 tiles at k16 step kk (mma.m16n8k16 "row" operand layout).
template <typename T, bool K_MAJOR>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[kMmaM][4], const T* tile, int warp_m0, int kk,
                                             int lane) {
  constexpr int ld = Tile<K_MAJOR>::kLd;
#pragma unroll
  for (int i = 0; i < kMmaM; ++i) {
    if constexpr (K_MAJOR) {  // lanes 0-15: rows 0-15 at k 0; lanes 16-31: rows 0-15 at k 8
      const int m = warp_m0 + i * 16 + (lane & 15);
      const int k = kk * 16 + (lane >> 4) * 8;
      ldmatrix_x4(a[i], smem_u32(tile + m * ld + k));
    } else {  // matrices (m0-7, k0-7), (m8-15, k0-7), (m0-7, k8-15), (m8-15, k8-15), stored as k rows
      const int k = kk * 16 + (lane & 7) + (lane >> 4) * 8;
      const int m = warp_m0 + i * 16 + ((lane >> 3) & 1) * 8;
      ldmatrix_x4_trans(a[i], smem_u32(tile + k * ld + m));
    }
  }
}

// B fragments of the warp's 4 n8 tiles at k16 step kk (the "col" operand), two tiles per ldmatrix.
template <typename T, bool K_MAJOR>
__device__ __forceinline__ void load_b_frags(uint32_t (&b)[kMmaN][2], const T* tile, int warp_n0, int kk,
                                             int lane) {
  constexpr int ld = Tile<K_MAJOR>::kLd;
#pragma unroll
  for (int p = 0; p < kMmaN / 2; ++p) {
    uint32_t r[4];
    const int n_base = warp_n0 + p * 16 + (lane >> 4) * 8;
    const int k_base = kk * 16 + ((lane >> 3) & 1) * 8;
    if constexpr (K_MAJOR) {
      ldmatrix_x4(r, smem_u32(tile + (n_base + (lane & 7)) * ld + k_base));
    } else {
      ldmatrix_x4_trans(r, smem_u32(tile + (k_base + (lane & 7)) * ld + n_base));
    }
    b[2 * p][0] = r[0];
    b[2 * p][1] = r[1];
    b[2 * p + 1][0] = r[2];
    b[2 * p + 1][1] = r[3];
  }
}

// ----------------------------------------------------------------------------- kernel

template <typename T, bool A_K_MAJOR, bool A_POOL, bool B_K_MAJOR>
__global__ void __launch_bounds__(kThreads, 1) pool_adapter_gemm_kernel(const GemmParams p) {
  using TA = Tile<A_K_MAJOR>;
  using TB = Tile<B_K_MAJOR>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem_a = reinterpret_cast<T*>(smem_raw);  // kStages tiles
  T* smem_b = smem_a + kStages * TA::kElems;    // kStages tiles

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m0 = (warp % kWarpsM) * kWarpM;
  const int warp_n0 = (warp / kWarpsM) * kWarpN;

  // Swizzle: M-tiles in bands of kGroupM, so the CTAs running together share B tiles in L2.
  const int num_pid_m = (p.M + kBlockM - 1) / kBlockM;
  const int num_pid_n = (p.N + kBlockN - 1) / kBlockN;
  const int pid = blockIdx.x;
  const int width = kGroupM * num_pid_n;
  const int first_m = (pid / width) * kGroupM;
  const int size_m = min(num_pid_m - first_m, kGroupM);
  const int pid_m = first_m + (pid % width) % size_m;
  const int pid_n = (pid % width) / size_m;
  const int m0 = pid_m * kBlockM;
  const int n0 = pid_n * kBlockN;

  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  // Storage extents: (rows, cols) and the tile origin in them, per operand layout.
  const int a_rows = A_K_MAJOR ? p.M : p.K, a_cols = A_K_MAJOR ? p.K : p.M;
  const int b_rows = B_K_MAJOR ? p.N : p.K, b_cols = B_K_MAJOR ? p.K : p.N;
  auto a_origin = [&](int kt, int& row0, int& col0) {
    row0 = A_K_MAJOR ? m0 : kt * kBlockK;
    col0 = A_K_MAJOR ? kt * kBlockK : m0;
  };
  auto load_stage_async = [&](int kt, int slot) {
    const int b_row0 = B_K_MAJOR ? n0 : kt * kBlockK, b_col0 = B_K_MAJOR ? kt * kBlockK : n0;
    load_tile_async<T, B_K_MAJOR>(smem_b + slot * TB::kElems, B, p.ldb, b_row0, b_rows, b_col0, b_cols, tid);
    if constexpr (!A_POOL) {
      int row0, col0;
      a_origin(kt, row0, col0);
      load_tile_async<T, A_K_MAJOR>(smem_a + slot * TA::kElems, A, p.lda, row0, a_rows, col0, a_cols, tid);
    }
  };

  float acc[kMmaM][kMmaN][4];
#pragma unroll
  for (int i = 0; i < kMmaM; ++i)
#pragma unroll
    for (int j = 0; j < kMmaN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  const int num_k = (p.K + kBlockK - 1) / kBlockK;
  uint4 raw[TA::kChunksPerThread][4];  // pooled A: the next K-step's window rows
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_k) load_stage_async(s, s);
    cp_async_commit();
  }
  if constexpr (A_POOL) {
    if (num_k > 0) {
      int row0, col0;
      a_origin(0, row0, col0);
      load_pooled<T, A_K_MAJOR>(raw, A, p.lda, row0, a_rows, col0, a_cols, tid);
      store_pooled<T, A_K_MAJOR>(smem_a, raw, tid);
    }
  }

  for (int kt = 0; kt < num_k; ++kt) {
    cp_async_wait<kStages - 2>();  // stage kt has landed (this thread's copies) ...
    __syncthreads();               // ... everyone's, and stage kt - 1 is free for reuse
    const int next = kt + kStages - 1;
    if (next < num_k) load_stage_async(next, next % kStages);
    cp_async_commit();
    if constexpr (A_POOL) {
      if (kt + 1 < num_k) {
        int row0, col0;
        a_origin(kt + 1, row0, col0);
        load_pooled<T, A_K_MAJOR>(raw, A, p.lda, row0, a_rows, col0, a_cols, tid);
      }
    }

    const T* tile_a = smem_a + (kt % kStages) * TA::kElems;
    const T* tile_b = smem_b + (kt % kStages) * TB::kElems;
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      uint32_t af[kMmaM][4], bf[kMmaN][2];
      load_a_frags<T, A_K_MAJOR>(af, tile_a, warp_m0, kk, lane);
      load_b_frags<T, B_K_MAJOR>(bf, tile_b, warp_n0, kk, lane);
#pragma unroll
      for (int i = 0; i < kMmaM; ++i)
#pragma unroll
        for (int j = 0; j < kMmaN; ++j) mma_16816<T>(acc[i][j], af[i], bf[j]);
    }

    if constexpr (A_POOL) {
      // Slot (kt + 1) % kStages was last read at step kt - 2, before this step's barrier.
      if (kt + 1 < num_k) store_pooled<T, A_K_MAJOR>(smem_a + ((kt + 1) % kStages) * TA::kElems, raw, tid);
    }
  }
  cp_async_wait<0>();

  // ---------------------------------------------------------------- epilogue
  const int g = lane >> 2;  // accumulator row (and row + 8) inside an m16 tile
  const int t = lane & 3;   // accumulator column pair inside an n8 tile
  const Epilogue epi = p.epilogue;
  T* out = static_cast<T*>(p.out);
  T* out2 = static_cast<T*>(p.out2);
  const T* aux = static_cast<const T*>(p.aux);
  const T* bias = static_cast<const T*>(p.bias);
  float colsum[kMmaN][2];
#pragma unroll
  for (int j = 0; j < kMmaN; ++j) colsum[j][0] = colsum[j][1] = 0.f;

#pragma unroll
  for (int j = 0; j < kMmaN; ++j) {
    const int n = n0 + warp_n0 + j * 8 + 2 * t;
    if (n >= p.N) continue;  // N is even, so n + 1 < N as well
    float b0 = 0.f, b1 = 0.f;
    if (epi == Epilogue::kBias || epi == Epilogue::kBiasGelu) {
      b0 = to_float(bias[n]);
      b1 = to_float(bias[n + 1]);
    }
#pragma unroll
    for (int i = 0; i < kMmaM; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int m = m0 + warp_m0 + i * 16 + g + half * 8;
        if (m >= p.M) continue;
        const float v0 = acc[i][j][2 * half] + b0;
        const float v1 = acc[i][j][2 * half + 1] + b1;
        const int64_t row = static_cast<int64_t>(m);
        switch (epi) {
          case Epilogue::kStore:
          case Epilogue::kBias:
            store2(out + row * p.ld_out + n, v0, v1);
            break;
          case Epilogue::kBiasGelu: {
            store2(out + row * p.ld_out + n, v0, v1);
            const float a0 = 0.5f * v0 * (1.f + erff(v0 * kRsqrt2));
            const float a1 = 0.5f * v1 * (1.f + erff(v1 * kRsqrt2));
            store2(out2 + row * p.ld_out2 + n, a0, a1);
            break;
          }
          case Epilogue::kDGelu: {
            const uint32_t hw = *reinterpret_cast<const uint32_t*>(aux + row * p.ld_aux + n);
            const T* hv = reinterpret_cast<const T*>(&hw);
            float gelu[2], dh[2];
            const float vs[2] = {v0, v1};
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float h = to_float(hv[e]);
              const float cdf = 0.5f * (1.f + erff(h * kRsqrt2));
              const float pdf = expf(-0.5f * h * h) * kInvSqrt2Pi;
              gelu[e] = h * cdf;
              dh[e] = vs[e] * (cdf + h * pdf);
              colsum[j][e] += dh[e];
            }
            store2(out + row * p.ld_out + n, dh[0], dh[1]);
            store2(out2 + row * p.ld_out2 + n, gelu[0], gelu[1]);
            break;
          }
          case Epilogue::kWindow: {
            const uint32_t w = pack2<T>(0.25f * v0, 0.25f * v1);
#pragma unroll
            for (int r = 0; r < 4; ++r) *reinterpret_cast<uint32_t*>(out + (4 * row + r) * p.ld_out + n) = w;
            break;
          }
        }
      }
    }
  }
  if (epi != Epilogue::kDGelu) return;

  // Bias gradients, as this M-tile's partial column sums (fixed order, no atomics): of dh over the
  // tile's rows (lanes, then the two M-warps through shared memory), and of the A operand dy over
  // the same rows, its K columns split among the CTAs of this M-tile.
  float* red = reinterpret_cast<float*>(smem_raw);  // [kWarpsM][kBlockN], the drained ring
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kMmaN; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = colsum[j][e];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (g == 0) red[(warp % kWarpsM) * kBlockN + warp_n0 + j * 8 + 2 * t + e] = v;
    }
  }
  __syncthreads();
  if (tid < kBlockN && n0 + tid < p.N) {
    p.sum_out[static_cast<int64_t>(pid_m) * p.N + n0 + tid] = red[tid] + red[kBlockN + tid];
  }

  const int col_in = tid % kBlockN;
  const int row_half = tid / kBlockN;  // 2 halves of the tile's rows
  for (int c0 = n0; c0 < p.K; c0 += num_pid_n * kBlockN) {
    const int col = c0 + col_in;
    float s = 0.f;
    if (col < p.K) {
      for (int r = 0; r < kBlockM / 2; ++r) {
        const int m = m0 + row_half * (kBlockM / 2) + r;
        if (m < p.M) s += to_float(A[static_cast<int64_t>(m) * p.lda + col]);
      }
    }
    __syncthreads();  // the previous chunk's reads of red are done
    red[row_half * kBlockN + col_in] = s;
    __syncthreads();
    if (tid < kBlockN && col < p.K) {
      p.sum_a[static_cast<int64_t>(pid_m) * p.K + col] = red[tid] + red[kBlockN + tid];
    }
  }
}

// dst[c] = sum over rows r (in order) of src[r * ld + c]: the bias gradients from the partial sums.
template <typename In, typename Out>
__global__ void column_sum_kernel(const In* src, int64_t rows, int64_t cols, int64_t ld, Out* dst) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float s = 0.f;
  for (int64_t r = 0; r < rows; ++r) s += to_float(src[r * ld + col]);
  dst[col] = from_float<Out>(s);
}

}  // namespace pool_adapter
}  // namespace seedvl
