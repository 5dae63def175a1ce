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
  m.attr("ops") = std::vector<std::string>{"rope_2d"};
  m.attr("cuda_archs") = split(SEEDVL_CUDA_ARCHS, ',');
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.attr("cutlass_include") = std::string(SEEDVL_CUTLASS_INCLUDE);
}
