// seedvl_kernels._C: the CUDA kernels, reached through DLPack tensors and the caller's CUDA stream.
//
// Python validates shapes and dtypes with messages for people (seedvl_kernels/_validate.py); the
// checks here guard the memory safety of each launch and raise ValueError (std::invalid_argument).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/common.h"
#include "grouped_gemm/grouped_gemm.h"
#include "pool_adapter/pool_adapter.h"
#include "rope_2d/rope_2d.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Array = nb::ndarray<>;

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

seedvl::DType float_dtype(const Array& a, const char* name) {
  const nb::dlpack::dtype d = a.dtype();
  if (d == nb::dtype<float>()) return seedvl::DType::kFloat32;
  if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && d.bits == 16 && d.lanes == 1)
    return seedvl::DType::kFloat16;
  if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && d.bits == 16 && d.lanes == 1)
    return seedvl::DType::kBFloat16;
  throw std::invalid_argument(std::string(name) + ": expected float32, float16 or bfloat16");
}

void require_cuda(const Array& a, const char* name, int device) {
  require(a.device_type() == nb::device::cuda::value, std::string(name) + ": expected a CUDA tensor");
  std::ostringstream msg;
  msg << name << ": expected a tensor on cuda:" << device << ", got cuda:" << a.device_id();
  require(a.device_id() == device, msg.str());
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// out <- rope_2d(x, pos_hw) (inverse=false) or its inverse rotation (inverse=true, the backward).
void rope_2d(Array x, Array pos_hw, Array out, double theta, bool inverse, uintptr_t stream) {
  const int device = x.device_id();
  require_cuda(x, "x", device);
  require_cuda(pos_hw, "pos_hw", device);
  require_cuda(out, "out", device);
  const seedvl::DType dtype = float_dtype(x, "x");
  require(out.dtype() == x.dtype(), "out: expected the dtype of x");
  require(x.ndim() == 3, "x: expected shape (T, H, D)");
  require(out.ndim() == 3 && out.shape(0) == x.shape(0) && out.shape(1) == x.shape(1) &&
              out.shape(2) == x.shape(2),
          "out: expected the shape of x");
  require(x.shape(2) % 4 == 0 && x.shape(2) > 0, "x: head dim D must be a positive multiple of 4");
  require(x.stride(2) == 1 || x.shape(2) == 1, "x: last dim must be contiguous");
  require(out.stride(2) == 1, "out: last dim must be contiguous");
  require(pos_hw.ndim() == 2 && pos_hw.shape(0) == x.shape(0) && pos_hw.shape(1) == 2,
          "pos_hw: expected shape (T, 2)");
  require(pos_hw.dtype() == nb::dtype<int32_t>(), "pos_hw: expected int32");

  seedvl::Rope2dParams p{};
  p.x = x.data();
  p.out = out.data();
  p.pos = static_cast<const int32_t*>(pos_hw.data());
  p.num_tokens = static_cast<int64_t>(x.shape(0));
  p.num_heads = static_cast<int64_t>(x.shape(1));
  p.head_dim = static_cast<int64_t>(x.shape(2));
  p.stride_x_t = x.stride(0);
  p.stride_x_h = x.stride(1);
  p.stride_out_t = out.stride(0);
  p.stride_out_h = out.stride(1);
  p.stride_pos_t = pos_hw.stride(0);
  p.stride_pos_c = pos_hw.stride(1);
  p.theta = theta;
  p.inverse = inverse;
  seedvl::DeviceGuard guard(device);
  seedvl::rope_2d_launch(p, dtype, as_stream(stream));
}

// ---- grouped_gemm (CUTLASS sm_90a, bf16): see csrc/grouped_gemm/grouped_gemm.h.

void require_bf16(const Array& a, const char* name) {
  const nb::dlpack::dtype d = a.dtype();
  require(d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && d.bits == 16 && d.lanes == 1,
          std::string(name) + ": expected bfloat16");
}

// A 2D bf16 operand TMA can read: unit last stride, row stride and base address 16-byte aligned.
void require_tma_matrix(const Array& a, const char* name, int device) {
  require_cuda(a, name, device);
  require_bf16(a, name);
  require(a.ndim() == 2, std::string(name) + ": expected 2 dims");
  require(a.stride(1) == 1 || a.shape(1) <= 1, std::string(name) + ": last dim must be contiguous");
  require(a.stride(0) % 8 == 0 && a.shape(1) % 8 == 0,
          std::string(name) + ": row length and row stride must be multiples of 8 elements (16 bytes)");
  require(reinterpret_cast<uintptr_t>(a.data()) % 16 == 0, std::string(name) + ": data must be 16-byte aligned");
}

void require_offsets(const Array& offsets, size_t groups_plus_one, int device) {
  require_cuda(offsets, "offsets", device);
  require(offsets.dtype() == nb::dtype<int32_t>(), "offsets: expected int32");
  require(offsets.ndim() == 1 && offsets.shape(0) == groups_plus_one && (offsets.stride(0) == 1 || groups_plus_one == 1),
          "offsets: expected a contiguous (E+1,) tensor");
  require(groups_plus_one - 1 <= 65535, "offsets: at most 65535 groups");
}

void require_workspace(const Array& ws, int num_groups, bool wgrad, int device) {
  require_cuda(ws, "workspace", device);
  require(ws.dtype() == nb::dtype<uint8_t>() && ws.ndim() == 1 && (ws.stride(0) == 1 || ws.shape(0) <= 1),
          "workspace: expected a contiguous uint8 vector");
  require(reinterpret_cast<uintptr_t>(ws.data()) % 256 == 0, "workspace: data must be 256-byte aligned");
  require(ws.shape(0) >= seedvl::grouped_gemm_workspace_size(num_groups, wgrad, device),
          "workspace: smaller than grouped_gemm_workspace_size()");
}

// out (M, N) <- per group e of offsets: a[rows of e] @ b[e] (b[e]^T with trans_b); padding rows 0.
void grouped_gemm(Array a, Array b, Array offsets, Array out, Array workspace, bool trans_b, uintptr_t stream) {
  const int device = a.device_id();
  require_tma_matrix(a, "a", device);
  require_cuda(b, "b", device);
  require_bf16(b, "b");
  require(b.ndim() == 3, "b: expected 3 dims (E, K, N) or (E, N, K)");
  require(b.stride(2) == 1 || b.shape(2) <= 1, "b: last dim must be contiguous");
  const size_t k = a.shape(1);
  const size_t n = trans_b ? b.shape(1) : b.shape(2);
  require((trans_b ? b.shape(2) : b.shape(1)) == k, "b: K must match a's columns");
  require(n % 8 == 0 && b.stride(1) % 8 == 0 && b.stride(0) % 8 == 0,
          "b: N and the strides must be multiples of 8 elements (16 bytes)");
  require(reinterpret_cast<uintptr_t>(b.data()) % 16 == 0, "b: data must be 16-byte aligned");
  require_tma_matrix(out, "out", device);
  require(out.shape(0) == a.shape(0) && out.shape(1) == n && out.stride(0) == static_cast<int64_t>(n),
          "out: expected a contiguous (M, N) tensor");
  require_offsets(offsets, b.shape(0) + 1, device);
  const int num_groups = static_cast<int>(b.shape(0));
  require(a.shape(0) < (size_t(1) << 31) && n < (size_t(1) << 31) && k < (size_t(1) << 31),
          "a, b: sizes must fit in int32");
  require_workspace(workspace, num_groups, false, device);

  seedvl::GroupedGemmParams p{};
  p.a = a.data();
  p.b = b.data();
  p.out = out.data();
  p.offsets = static_cast<const int32_t*>(offsets.data());
  p.lda = a.stride(0);
  p.ldb = b.stride(1);
  p.stride_b_group = b.stride(0);
  p.m = static_cast<int64_t>(a.shape(0));
  p.n = static_cast<int64_t>(n);
  p.k = static_cast<int64_t>(k);
  p.num_groups = num_groups;
  p.trans_b = trans_b;
  p.workspace = workspace.data();
  p.device = device;
  seedvl::DeviceGuard guard(device);
  seedvl::grouped_gemm_launch(p, as_stream(stream));
}

// out (E, P, Q) <- per group e of offsets: x[rows of e]^T @ y[rows of e]; empty groups 0.
void grouped_gemm_dw(Array x, Array y, Array offsets, Array out, Array workspace, uintptr_t stream) {
  const int device = x.device_id();
  require_tma_matrix(x, "x", device);
  require_tma_matrix(y, "y", device);
  require(y.shape(0) == x.shape(0), "y: expected the rows of x");
  require_cuda(out, "out", device);
  require_bf16(out, "out");
  const size_t p_dim = x.shape(1), q_dim = y.shape(1);
  require(out.ndim() == 3 && out.shape(1) == p_dim && out.shape(2) == q_dim && out.stride(2) == 1 &&
              out.stride(1) == static_cast<int64_t>(q_dim) && out.stride(0) == static_cast<int64_t>(p_dim * q_dim),
          "out: expected a contiguous (E, P, Q) tensor");
  require(reinterpret_cast<uintptr_t>(out.data()) % 16 == 0, "out: data must be 16-byte aligned");
  require_offsets(offsets, out.shape(0) + 1, device);
  const int num_groups = static_cast<int>(out.shape(0));
  require(x.shape(0) < (size_t(1) << 31) && p_dim < (size_t(1) << 31) && q_dim < (size_t(1) << 31),
          "x, y: sizes must fit in int32");
  require_workspace(workspace, num_groups, true, device);

  seedvl::GroupedGemmDwParams p{};
  p.x = x.data();
  p.y = y.data();
  p.out = out.data();
  p.offsets = static_cast<const int32_t*>(offsets.data());
  p.ldx = x.stride(0);
  p.ldy = y.stride(0);
  p.p = static_cast<int64_t>(p_dim);
  p.q = static_cast<int64_t>(q_dim);
  p.num_groups = num_groups;
  p.workspace = workspace.data();
  p.device = device;
  seedvl::DeviceGuard guard(device);
  seedvl::grouped_gemm_dw_launch(p, as_stream(stream));
}

// ---- pool_adapter (mma.sync, float16/bfloat16): see csrc/pool_adapter/pool_adapter.h.

enum class PaLayout { kRowOrColumnMajor, kRowMajor, kContiguous };

// A pool_adapter matrix: on the device, x's dtype, the shape, the layout, a leading stride of a
// multiple of 8 elements and 16-byte aligned data (the kernels move 16-byte vectors).
void require_pa_matrix(const Array& a, const char* name, int device, const Array& x, size_t rows, size_t cols,
                       PaLayout layout) {
  const std::string n(name);
  require_cuda(a, name, device);
  require(a.dtype() == x.dtype(), n + ": expected the dtype of x");
  std::ostringstream shape;
  shape << n << ": expected shape (" << rows << ", " << cols << ")";
  require(a.ndim() == 2 && a.shape(0) == rows && a.shape(1) == cols, shape.str());
  const bool row_major = a.stride(1) == 1 || cols <= 1;
  const bool col_major = a.stride(0) == 1 || rows <= 1;
  if (layout == PaLayout::kContiguous) {
    require(row_major && (a.stride(0) == static_cast<int64_t>(cols) || rows <= 1),
            n + ": expected a contiguous tensor");
  } else if (layout == PaLayout::kRowMajor) {
    require(row_major, n + ": last dim must be contiguous");
  } else {
    require(row_major || col_major, n + ": expected a row-major or column-major matrix");
  }
  const int64_t lead = row_major ? a.stride(0) : a.stride(1);
  require((lead % 8 == 0 || rows * cols == 0) && reinterpret_cast<uintptr_t>(a.data()) % 16 == 0,
          n + ": leading stride must be a multiple of 8 elements and data 16-byte aligned");
}

void require_pa_vector(const Array& v, const char* name, int device, const nb::dlpack::dtype& dtype, size_t size) {
  const std::string n(name);
  require_cuda(v, name, device);
  require(v.dtype() == dtype, n + ": expected " + (dtype.bits == 32 ? "float32" : "the dtype of x"));
  require(v.ndim() == 1 && v.shape(0) == size && (v.stride(0) == 1 || size <= 1),
          n + ": expected a contiguous vector of " + std::to_string(size));
}

seedvl::PaWeight pa_weight(const Array& w) {
  const bool row_major = w.stride(1) == 1 || w.shape(1) <= 1;
  return {w.data(), row_major ? w.stride(0) : 1, row_major ? 1 : w.stride(1)};
}

struct PaDims {
  size_t t, c, f, c_out;
};

// (T, C, F, C_out), after checking x, w1 and w2.
PaDims pa_dims(const Array& x, const Array& w1, const Array& w2, int device) {
  require_cuda(x, "x", device);
  require(float_dtype(x, "x") != seedvl::DType::kFloat32, "x: the CUDA pool_adapter takes float16 or bfloat16");
  require(x.ndim() == 2 && x.shape(0) % 4 == 0, "x: expected (T, C) with T a multiple of 4");
  require(w1.ndim() == 2 && w2.ndim() == 2, "w1, w2: expected 2 dims");
  const PaDims d{x.shape(0), x.shape(1), w1.shape(1), w2.shape(1)};
  require(d.c % 8 == 0 && d.f % 8 == 0 && d.c_out % 8 == 0, "C, F and C_out must be multiples of 8");
  constexpr size_t kMax = size_t(1) << 31;
  require(d.t / 4 < kMax && d.c < kMax && d.f < kMax && d.c_out < kMax, "x, w1, w2: sizes must fit in int32");
  require_pa_matrix(x, "x", device, x, d.t, d.c, PaLayout::kRowMajor);
  require_pa_matrix(w1, "w1", device, x, d.c, d.f, PaLayout::kRowOrColumnMajor);
  require_pa_matrix(w2, "w2", device, x, d.f, d.c_out, PaLayout::kRowOrColumnMajor);
  return d;
}

// y, h <- GELU(mean4(x) @ w1 + b1) @ w2 + b2 and its pre-activation; a: (T/4, F) scratch.
void pool_adapter_fwd(Array x, Array w1, Array b1, Array w2, Array b2, Array y, Array h, Array a,
                      uintptr_t stream) {
  const int device = x.device_id();
  const auto [t, c, f, c_out] = pa_dims(x, w1, w2, device);
  require_pa_vector(b1, "b1", device, x.dtype(), f);
  require_pa_vector(b2, "b2", device, x.dtype(), c_out);
  require_pa_matrix(y, "y", device, x, t / 4, c_out, PaLayout::kContiguous);
  require_pa_matrix(h, "h", device, x, t / 4, f, PaLayout::kContiguous);
  require_pa_matrix(a, "a", device, x, t / 4, f, PaLayout::kContiguous);

  seedvl::PoolAdapterFwdParams p{};
  p.x = x.data();
  p.stride_x = x.stride(0);
  p.w1 = pa_weight(w1);
  p.b1 = b1.data();
  p.w2 = pa_weight(w2);
  p.b2 = b2.data();
  p.y = y.data();
  p.h = h.data();
  p.a = a.data();
  p.tokens = static_cast<int64_t>(t);
  p.c = static_cast<int64_t>(c);
  p.f = static_cast<int64_t>(f);
  p.c_out = static_cast<int64_t>(c_out);
  seedvl::DeviceGuard guard(device);
  seedvl::pool_adapter_fwd_launch(p, float_dtype(x, "x"), as_stream(stream));
}

// dx, dw1, db1, dw2, db2 <- the gradients from dy and the saved x, w1, w2, h; dh, a: (T/4, F) and
// partial: (cdiv(T/4, 128), F + C_out) float32 scratch.
void pool_adapter_bwd(Array dy, Array x, Array w1, Array w2, Array h, Array dx, Array dw1, Array db1, Array dw2,
                      Array db2, Array dh, Array a, Array partial, uintptr_t stream) {
  const int device = x.device_id();
  const auto [t, c, f, c_out] = pa_dims(x, w1, w2, device);
  require_pa_matrix(dy, "dy", device, x, t / 4, c_out, PaLayout::kContiguous);
  require_pa_matrix(h, "h", device, x, t / 4, f, PaLayout::kContiguous);
  require_pa_matrix(dx, "dx", device, x, t, c, PaLayout::kContiguous);
  require_pa_matrix(dw1, "dw1", device, x, c, f, PaLayout::kContiguous);
  require_pa_vector(db1, "db1", device, x.dtype(), f);
  require_pa_matrix(dw2, "dw2", device, x, f, c_out, PaLayout::kContiguous);
  require_pa_vector(db2, "db2", device, x.dtype(), c_out);
  require_pa_matrix(dh, "dh", device, x, t / 4, f, PaLayout::kContiguous);
  require_pa_matrix(a, "a", device, x, t / 4, f, PaLayout::kContiguous);
  const size_t tiles = (t / 4 + seedvl::kPoolAdapterTileM - 1) / seedvl::kPoolAdapterTileM;
  require_pa_vector(partial, "partial", device, nb::dtype<float>(), tiles * (f + c_out));

  seedvl::PoolAdapterBwdParams p{};
  p.dy = dy.data();
  p.x = x.data();
  p.stride_x = x.stride(0);
  p.w1 = pa_weight(w1);
  p.w2 = pa_weight(w2);
  p.h = h.data();
  p.dx = dx.data();
  p.dw1 = dw1.data();
  p.db1 = db1.data();
  p.dw2 = dw2.data();
  p.db2 = db2.data();
  p.dh = dh.data();
  p.a = a.data();
  p.partial = static_cast<float*>(partial.data());
  p.tokens = static_cast<int64_t>(t);
  p.c = static_cast<int64_t>(c);
  p.f = static_cast<int64_t>(f);
  p.c_out = static_cast<int64_t>(c_out);
  seedvl::DeviceGuard guard(device);
  seedvl::pool_adapter_bwd_launch(p, float_dtype(x, "x"), as_stream(stream));
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::string cur;
  for (char ch : s) {
    if (ch == sep) {
      if (!cur.empty()) parts.push_back(cur);
      cur.clear();
    } else {
      cur += ch;
    }
  }
  if (!cur.empty()) parts.push_back(cur);
  return parts;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "seedvl CUDA kernels (DLPack tensors, caller's stream; no libtorch)";
  m.def("rope_2d", &rope_2d, "x"_a, "pos_hw"_a, "out"_a, "theta"_a, "inverse"_a, "stream"_a,
        "out <- 2D RoPE of x (or its inverse rotation); all CUDA tensors on one device");
  m.def("grouped_gemm", &grouped_gemm, "a"_a, "b"_a, "offsets"_a, "out"_a, "workspace"_a, "trans_b"_a,
        "stream"_a, "out <- M-grouped a @ b[e] (b[e]^T with trans_b), bf16, CUTLASS sm_90a");
  m.def("grouped_gemm_dw", &grouped_gemm_dw, "x"_a, "y"_a, "offsets"_a, "out"_a, "workspace"_a, "stream"_a,
        "out[e] <- x_e^T @ y_e over the rows of group e (K-grouped), bf16, CUTLASS sm_90a");
  m.def("grouped_gemm_workspace_size", &seedvl::grouped_gemm_workspace_size, "num_groups"_a, "wgrad"_a,
        "device"_a, "bytes of device workspace grouped_gemm / grouped_gemm_dw need");
  m.def("pool_adapter_fwd", &pool_adapter_fwd, "x"_a, "w1"_a, "b1"_a, "w2"_a, "b2"_a, "y"_a, "h"_a, "a"_a,
        "stream"_a, "y, h <- pool_adapter forward (mma.sync, float16/bfloat16); a: GELU(h) scratch");
  m.def("pool_adapter_bwd", &pool_adapter_bwd, "dy"_a, "x"_a, "w1"_a, "w2"_a, "h"_a, "dx"_a, "dw1"_a, "db1"_a,
        "dw2"_a, "db2"_a, "dh"_a, "a"_a, "partial"_a, "stream"_a,
        "dx, dw1, db1, dw2, db2 <- pool_adapter backward; dh, a, partial: scratch");
  m.attr("ops") = std::vector<std::string>{"rope_2d", "grouped_gemm", "pool_adapter"};
  m.attr("cuda_archs") = split(SEEDVL_CUDA_ARCHS, ',');
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.attr("cutlass_include") = std::string(SEEDVL_CUTLASS_INCLUDE);
}
