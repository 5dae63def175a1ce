// rope_2d launcher: picks the widest aligned vector access and the element type at run time.
#include <algorithm>
#include <cstdint>

#include "rope_2d/kernel.cuh"

namespace seedvl {
namespace {

constexpr int kThreads = 128;

bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename T, int VEC>
void launch(const Rope2dParams& p, cudaStream_t stream) {
  const int threads_per_token = static_cast<int>(p.head_dim / 2 / VEC);
  const int threads = std::max(kThreads, threads_per_token);
  const int tokens_per_block = threads / threads_per_token;
  const int64_t blocks = std::min<int64_t>((p.num_tokens + tokens_per_block - 1) / tokens_per_block, 1 << 30);
  const size_t smem = sizeof(float) * static_cast<size_t>(p.head_dim / 4);
  rope_2d_kernel<T, VEC><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
  check_cuda(cudaGetLastError(), "rope_2d_kernel launch");
}

template <typename T>
void dispatch_vec(const Rope2dParams& p, cudaStream_t stream) {
  // Widest VEC (at most 16 bytes) that divides D/2, every stride, and both base pointers.
  int vec = 16 / static_cast<int>(sizeof(T));
  auto fits = [&](int v) {
    return (p.head_dim / 2) % v == 0 && p.stride_x_t % v == 0 && p.stride_x_h % v == 0 &&
           p.stride_out_t % v == 0 && p.stride_out_h % v == 0 && aligned(p.x, v * sizeof(T)) &&
           aligned(p.out, v * sizeof(T));
  };
  while (vec > 1 && !fits(vec)) vec /= 2;
  switch (vec) {
    case 8: if constexpr (sizeof(T) <= 2) { launch<T, 8>(p, stream); return; } break;
    case 4: launch<T, 4>(p, stream); return;
    case 2: launch<T, 2>(p, stream); return;
    default: launch<T, 1>(p, stream); return;
  }
  launch<T, 1>(p, stream);
}

}  // namespace

void rope_2d_launch(const Rope2dParams& p, DType dtype, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_heads == 0) return;
  switch (dtype) {
    case DType::kFloat32: dispatch_vec<float>(p, stream); break;
    case DType::kFloat16: dispatch_vec<__half>(p, stream); break;
    case DType::kBFloat16: dispatch_vec<__nv_bfloat16>(p, stream); break;
  }
}

}  // namespace seedvl
