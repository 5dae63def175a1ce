// rope_2d device code.
//
// Each token's (row, col) angles are shared by all heads, so a thread owns VEC rotation pairs of one
// token and walks the heads: its sin/cos are computed once and reused H times, which keeps the
// kernel bound by memory rather than by the (precise) sincosf. The D/4 inverse frequencies are
// computed once per block in double precision and rounded to fp32, matching the reference exactly.
//
// Per head a thread reads VEC elements of the first half (dims i) and VEC of the second half
// (dims i + D/2), rotates each pair, and writes both back: 2 * T * H * D * sizeof(T) bytes in all.
#pragma once

#include "common/common.h"
#include "rope_2d/rope_2d.h"

namespace seedvl {

template <typename T, int VEC>
__global__ void rope_2d_kernel(Rope2dParams p) {
  extern __shared__ float inv_freq[];  // (D/4,)
  const int quarter = static_cast<int>(p.head_dim / 4);
  for (int j = threadIdx.x; j < quarter; j += blockDim.x) {
    inv_freq[j] = static_cast<float>(1.0 / pow(p.theta, static_cast<double>(j) / quarter));
  }
  __syncthreads();

  const int threads_per_token = static_cast<int>(p.head_dim / 2 / VEC);
  const int tokens_per_block = blockDim.x / threads_per_token;
  const int lane = threadIdx.x % threads_per_token;
  const int local = threadIdx.x / threads_per_token;
  if (local >= tokens_per_block) return;
  const int64_t half = p.head_dim / 2;
  const float sign = p.inverse ? -1.f : 1.f;

  for (int64_t t = static_cast<int64_t>(blockIdx.x) * tokens_per_block + local; t < p.num_tokens;
       t += static_cast<int64_t>(gridDim.x) * tokens_per_block) {
    const float row = static_cast<float>(p.pos[t * p.stride_pos_t]);
    const float col = static_cast<float>(p.pos[t * p.stride_pos_t + p.stride_pos_c]);
    float c[VEC], s[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int i = lane * VEC + k;  // pair index in [0, D/2)
      const bool is_row = i < quarter;
      const float angle = (is_row ? row : col) * inv_freq[is_row ? i : i - quarter];
      sincosf(angle, &s[k], &c[k]);
      s[k] *= sign;
    }
    const T* x_tok = static_cast<const T*>(p.x) + t * p.stride_x_t + lane * VEC;
    T* o_tok = static_cast<T*>(p.out) + t * p.stride_out_t + lane * VEC;
    for (int64_t h = 0; h < p.num_heads; ++h) {
      const T* xh = x_tok + h * p.stride_x_h;
      T* oh = o_tok + h * p.stride_out_h;
      const Vec<T, VEC> a = *reinterpret_cast<const Vec<T, VEC>*>(xh);
      const Vec<T, VEC> b = *reinterpret_cast<const Vec<T, VEC>*>(xh + half);
      Vec<T, VEC> ra, rb;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float x1 = to_float(a.v[k]);
        const float x2 = to_float(b.v[k]);
        ra.v[k] = from_float<T>(x1 * c[k] - x2 * s[k]);
        rb.v[k] = from_float<T>(x2 * c[k] + x1 * s[k]);
      }
      *reinterpret_cast<Vec<T, VEC>*>(oh) = ra;
      *reinterpret_cast<Vec<T, VEC>*>(oh + half) = rb;
    }
  }
}

}  // namespace seedvl
