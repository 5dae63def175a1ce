// grouped_gemm device code: the CUTLASS sm_90a kernel types and the setup kernels that feed them.
//
// GEMM. CUTLASS 3.x grouped GEMM (GroupProblemShape, one <M, N, K> per group, read from device
// memory): KernelPtrArrayTmaWarpSpecialized{Cooperative,Pingpong}, a persistent kernel (grid =
// #SMs) whose producer warp loads A/B tiles with TMA and whose two consumer warpgroups run wgmma
// with fp32 accumulators, together on 128 x 256 output tiles (cooperative: forward and dgrad) or
// each on its own 128 x 128 tile (pingpong: wgrad); the epilogue rounds to bf16 once and stores
// with TMA. When a CTA moves to a tile of another group it rewrites its TMA descriptors in place
// (tensormap replace) with that group's pointers, extents and strides, so ragged groups need no padding:
// TMA zero-fills loads past a group's extent and clips stores to it. Groups with M = 0 have no
// tiles and are skipped. Clusters of 2 CTAs along M share (multicast) B tiles.
//
// Three instantiations (compile time matters: CI builds on 2 cores):
//   MGroupedRowB   A (M, K) K-major, B (K, N) N-major          forward / dgrad with trans_b=False
//   MGroupedColB   A (M, K) K-major, B (N, K) K-major          forward / dgrad with trans_b=True
//   KGrouped       A' = x_e^T (p, rows) p-major, B' = y_e (rows, q) q-major: out[e] = x_e^T y_e
//                  (pingpong 128 x 128; the other two cooperative 128 x 256)
// bf16 wgmma reads either major order from shared memory, so no operand is ever transposed in
// memory. The wgrad is the same kernel with the ragged extent in K: problem <p, q, rows_e>.
//
// Setup (one small kernel per call, before the GEMM, on the same stream): thread e of the grid
// reads offsets[e], offsets[e+1] and writes group e's problem shape, A/B/D pointers and strides
// into the workspace; the rest of the grid zero-fills what CUTLASS will not write (rows past
// offsets[E] for the M-grouped kernel; out[e] of an empty group for the K-grouped one, whose
// problem is then given M = 0 so that CUTLASS skips it). No value goes back to the host.
#pragma once

#include "common/common.h"
#include "grouped_gemm/grouped_gemm.h"

// A build without sm_90a (CMakeLists.txt: no 90a in SEEDVL_CUDA_ARCHS) compiles only the launchers'
// error paths: none of CUTLASS is included or instantiated.
#if !defined(SEEDVL_GROUPED_GEMM_STUBS)
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

// tensormap.replace (the in-kernel TMA descriptor update) needs nvcc >= 12.3 and sm_90a.
#if defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#define SEEDVL_GROUPED_GEMM_SM90 1
#endif

namespace seedvl {
namespace grouped_gemm_sm90 {

using Element = cutlass::bfloat16_t;
using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // <M, N, K>
using Shape3 = ProblemShape::UnderlyingProblemShape;
constexpr int kAlignment = 8;  // elements per 16 bytes: TMA needs 16-byte aligned rows

using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
using LayoutD = cutlass::layout::RowMajor;

using CooperativeTile = cute::Shape<cute::_128, cute::_256, cute::_64>;
using PingpongTile = cute::Shape<cute::_128, cute::_128, cute::_64>;

// The epilogues. ElementC = void: D = alpha * acc with no source operand (alpha = 1). Kept at
// namespace scope on purpose: spelled inside the class template below, nvcc 13.0's host code for
// g++ 12 loses a `typename` in the epilogue type and fails to compile.
using CooperativeEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, CooperativeTile, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignment, Element,
    LayoutD*, kAlignment, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;
using PingpongEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, PingpongTile, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignment, Element,
    LayoutD*, kAlignment, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
    cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;
constexpr int kCooperativeEpilogueSmemBytes = static_cast<int>(sizeof(typename CooperativeEpilogue::SharedStorage));
constexpr int kPingpongEpilogueSmemBytes = static_cast<int>(sizeof(typename PingpongEpilogue::SharedStorage));

// The two schedules. Cooperative: both consumer warpgroups share one 128 x 256 tile (64 rows each)
// and run its epilogue together, so the tensor cores idle during each tile's epilogue. Pingpong:
// each consumer warpgroup owns a whole 128 x 128 tile and the two alternate, one running its
// mainloop while the other runs its epilogue. The wgrad's problems <p, q, rows_e> have a short K
// (an expert's rows: 256 at 4k tokens for Qwen3-235B) and many tiles, so the epilogue is a large
// share of each tile's time, which pingpong hides.
struct Cooperative {
  using TileShape = CooperativeTile;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = CooperativeEpilogue;
  static constexpr int kEpilogueSmemBytes = kCooperativeEpilogueSmemBytes;
};
struct Pingpong {
  using TileShape = PingpongTile;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = PingpongEpilogue;
  static constexpr int kEpilogueSmemBytes = kPingpongEpilogueSmemBytes;
};

template <class LayoutA, class LayoutB, class Schedule>
struct Config {
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element,
      LayoutB*, kAlignment, float, typename Schedule::TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<Schedule::kEpilogueSmemBytes>,
      typename Schedule::KernelSchedule>::CollectiveOp;

  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, typename Schedule::Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

using MGroupedRowB = Config<cutlass::layout::RowMajor, cutlass::layout::RowMajor, Cooperative>;
using MGroupedColB = Config<cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, Cooperative>;
using KGrouped = Config<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, Pingpong>;

// Per-group arrays the grouped kernel reads, carved out of the caller's workspace.
template <class Cfg>
struct GroupArrays {
  Shape3* shapes;
  const Element** ptr_a;
  const Element** ptr_b;
  Element** ptr_d;
  typename Cfg::StrideA* stride_a;
  typename Cfg::StrideB* stride_b;
  typename Cfg::StrideD* stride_d;
};

// A cute stride of a 2D operand with one unit mode: set its one dynamic (leading) mode to `ld`.
template <class Stride>
__device__ __forceinline__ Stride leading_stride(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_static<cute::remove_cvref_t<decltype(cute::get<0>(s))>>::value) {
    cute::get<1>(s) = ld;
  } else {
    cute::get<0>(s) = ld;
  }
  return s;
}

__device__ __forceinline__ void zero_fill(uint4* ptr, int64_t begin, int64_t end, int64_t tid, int64_t nthreads) {
  for (int64_t i = begin + tid; i < end; i += nthreads) ptr[i] = make_uint4(0u, 0u, 0u, 0u);
}

// Grid: 1D, at least E threads. Thread e fills group e; all threads zero rows [offsets[E], m).
template <class Cfg>
__global__ void m_grouped_setup_kernel(GroupedGemmParams p, GroupArrays<Cfg> g) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const Element* a = static_cast<const Element*>(p.a);
  const Element* b = static_cast<const Element*>(p.b);
  Element* out = static_cast<Element*>(p.out);
  if (tid < p.num_groups) {
    const int e = static_cast<int>(tid);
    const int64_t start = p.offsets[e];
    const int rows = p.offsets[e + 1] - p.offsets[e];
    g.shapes[e] = Shape3{rows, static_cast<int>(p.n), static_cast<int>(p.k)};
    g.ptr_a[e] = a + start * p.lda;
    g.ptr_b[e] = b + e * p.stride_b_group;
    g.ptr_d[e] = out + start * p.n;
    g.stride_a[e] = leading_stride<typename Cfg::StrideA>(p.lda);
    g.stride_b[e] = leading_stride<typename Cfg::StrideB>(p.ldb);
    g.stride_d[e] = leading_stride<typename Cfg::StrideD>(p.n);
  }
  // out is contiguous with n % 8 == 0, so padding rows are whole 16-byte vectors.
  const int64_t vec_per_row = p.n / kAlignment;
  zero_fill(reinterpret_cast<uint4*>(out), static_cast<int64_t>(p.offsets[p.num_groups]) * vec_per_row,
            p.m * vec_per_row, tid, static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// Grid: (x, E). Block (0, e) thread 0 fills group e; if group e is empty, blocks (*, e) zero out[e].
template <class Cfg>
__global__ void k_grouped_setup_kernel(GroupedGemmDwParams p, GroupArrays<Cfg> g) {
  const int e = static_cast<int>(blockIdx.y);
  const int64_t start = p.offsets[e];
  const int rows = p.offsets[e + 1] - p.offsets[e];
  Element* out_e = static_cast<Element*>(p.out) + static_cast<int64_t>(e) * p.p * p.q;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    // An empty group gets M = 0 (no tiles): CUTLASS skips it and the zero fill below stands.
    g.shapes[e] = Shape3{rows > 0 ? static_cast<int>(p.p) : 0, static_cast<int>(p.q), rows};
    g.ptr_a[e] = static_cast<const Element*>(p.x) + start * p.ldx;
    g.ptr_b[e] = static_cast<const Element*>(p.y) + start * p.ldy;
    g.ptr_d[e] = out_e;
    g.stride_a[e] = leading_stride<typename Cfg::StrideA>(p.ldx);
    g.stride_b[e] = leading_stride<typename Cfg::StrideB>(p.ldy);
    g.stride_d[e] = leading_stride<typename Cfg::StrideD>(p.q);
  }
  if (rows == 0) {
    zero_fill(reinterpret_cast<uint4*>(out_e), 0, p.p * p.q / kAlignment,
              static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
              static_cast<int64_t>(gridDim.x) * blockDim.x);
  }
}

}  // namespace grouped_gemm_sm90
}  // namespace seedvl

#endif  // !SEEDVL_GROUPED_GEMM_STUBS
