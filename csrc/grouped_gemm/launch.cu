// grouped_gemm launchers: carve the workspace, launch the setup kernel, then the CUTLASS grouped GEMM.
//
// The caller (seedvl_kernels/grouped_gemm_cuda.py) allocates the workspace from PyTorch's caching
// allocator with grouped_gemm_workspace_size() bytes, so nothing here allocates, synchronises or
// reads device memory on the host: the call is stream-ordered and capturable in a CUDA graph.
#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

#include "grouped_gemm/kernel.cuh"

namespace seedvl {
namespace {

// CMakeLists.txt compiles this file for sm_90a alone when SEEDVL_CUDA_ARCHS has 90a, and as stubs
// (SEEDVL_GROUPED_GEMM_STUBS) when it has not.
#if !defined(SEEDVL_GROUPED_GEMM_SM90)
[[noreturn]] void require_sm90(int /*device*/) {
#if defined(SEEDVL_GROUPED_GEMM_STUBS)
  throw std::runtime_error(std::string("grouped_gemm: seedvl_kernels._C was built for ") + SEEDVL_CUDA_ARCHS +
                           ", without sm_90a (set SEEDVL_CUDA_ARCHS to include 90a); use impl=\"triton\"");
#else
  throw std::runtime_error(
      "grouped_gemm: this build has no CUTLASS sm_90a kernels (nvcc older than 12.3); use impl=\"triton\"");
#endif
}
#else
constexpr int kSetupThreads = 256;
constexpr int kMaxDevices = 64;

size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Cached per device: cudaDeviceGetAttribute is cheap but not free, and this runs every call.
int device_attribute(cudaDeviceAttr attr, int device, std::atomic<int>* cache) {
  if (device < 0 || device >= kMaxDevices) throw std::runtime_error("grouped_gemm: device index out of range");
  int value = cache[device].load(std::memory_order_relaxed);
  if (value <= 0) {
    check_cuda(cudaDeviceGetAttribute(&value, attr, device), "cudaDeviceGetAttribute");
    cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices];
  return device_attribute(cudaDevAttrMultiProcessorCount, device, cache);
}

// Major * 10 + minor.
int compute_capability(int device) {
  static std::atomic<int> major[kMaxDevices];
  static std::atomic<int> minor_plus_one[kMaxDevices];  // +1 so that 0 means "not cached"
  const int ma = device_attribute(cudaDevAttrComputeCapabilityMajor, device, major);
  int mi = minor_plus_one[device].load(std::memory_order_relaxed);
  if (mi <= 0) {
    check_cuda(cudaDeviceGetAttribute(&mi, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
    minor_plus_one[device].store(++mi, std::memory_order_relaxed);
  }
  return ma * 10 + (mi - 1);
}

void require_sm90(int device) {
  const int cc = compute_capability(device);
  if (cc != 90) {
    throw std::runtime_error("grouped_gemm: the CUTLASS kernels are sm_90a code (H100/H200), this GPU is sm_" +
                             std::to_string(cc) + "; use impl=\"triton\"");
  }
}

using namespace grouped_gemm_sm90;

void check_cutlass(cutlass::Status status, const char* what) {
  if (status != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("grouped_gemm: CUTLASS ") + what + " failed: " +
                             cutlassGetStatusString(status));
  }
}

template <class Cfg>
typename Cfg::Gemm::Arguments make_arguments(const GroupArrays<Cfg>& g, int num_groups, int device) {
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = device;
  hw_info.sm_count = sm_count(device);
  // No host problem shapes (nullptr): the persistent grid is sized by the SM count alone.
  typename Cfg::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {num_groups, g.shapes, nullptr},
      {g.ptr_a, g.stride_a, g.ptr_b, g.stride_b},
      {{}, nullptr, nullptr, g.ptr_d, g.stride_d},
      hw_info};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  return args;
}

// Byte offsets of the group arrays and of CUTLASS's own workspace inside the caller's buffer.
template <class Cfg>
struct WorkspaceLayout {
  size_t shapes, ptr_a, ptr_b, ptr_d, stride_a, stride_b, stride_d, cutlass, total;

  WorkspaceLayout(int num_groups, int device) {
    size_t at = 0;
    auto take = [&](size_t bytes) {
      const size_t here = at;
      at = round_up(at + bytes, 256);
      return here;
    };
    const size_t n = static_cast<size_t>(num_groups);
    shapes = take(n * sizeof(Shape3));
    ptr_a = take(n * sizeof(void*));
    ptr_b = take(n * sizeof(void*));
    ptr_d = take(n * sizeof(void*));
    stride_a = take(n * sizeof(typename Cfg::StrideA));
    stride_b = take(n * sizeof(typename Cfg::StrideB));
    stride_d = take(n * sizeof(typename Cfg::StrideD));
    cutlass = at;
    const GroupArrays<Cfg> none{};
    total = cutlass + Cfg::Gemm::get_workspace_size(make_arguments<Cfg>(none, num_groups, device));
  }

  GroupArrays<Cfg> carve(void* workspace) const {
    char* base = static_cast<char*>(workspace);
    return {reinterpret_cast<Shape3*>(base + shapes),
            reinterpret_cast<const Element**>(base + ptr_a),
            reinterpret_cast<const Element**>(base + ptr_b),
            reinterpret_cast<Element**>(base + ptr_d),
            reinterpret_cast<typename Cfg::StrideA*>(base + stride_a),
            reinterpret_cast<typename Cfg::StrideB*>(base + stride_b),
            reinterpret_cast<typename Cfg::StrideD*>(base + stride_d)};
  }
};

template <class Cfg>
void run_gemm(const WorkspaceLayout<Cfg>& layout, const GroupArrays<Cfg>& g, void* workspace, int num_groups,
              int device, cudaStream_t stream) {
  auto args = make_arguments<Cfg>(g, num_groups, device);
  typename Cfg::Gemm gemm;
  check_cutlass(gemm.can_implement(args), "can_implement");
  check_cutlass(gemm.initialize(args, static_cast<char*>(workspace) + layout.cutlass, stream), "initialize");
  check_cutlass(gemm.run(stream), "run");
  check_cuda(cudaGetLastError(), "grouped_gemm CUTLASS kernel launch");
}

template <class Cfg>
void launch_m_grouped(const GroupedGemmParams& p, cudaStream_t stream) {
  const WorkspaceLayout<Cfg> layout(p.num_groups, p.device);
  const GroupArrays<Cfg> g = layout.carve(p.workspace);
  const int64_t pad_vectors = p.m * p.n / kAlignment;  // upper bound of the zero fill
  const int64_t blocks = std::max(cdiv(p.num_groups, kSetupThreads),
                                  std::min<int64_t>(cdiv(pad_vectors, kSetupThreads * 8), 1024));
  m_grouped_setup_kernel<Cfg><<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), kSetupThreads, 0, stream>>>(p, g);
  check_cuda(cudaGetLastError(), "m_grouped_setup_kernel launch");
  run_gemm<Cfg>(layout, g, p.workspace, p.num_groups, p.device, stream);
}
#endif  // SEEDVL_GROUPED_GEMM_SM90

}  // namespace

size_t grouped_gemm_workspace_size(int num_groups, bool wgrad, int device) {
#if defined(SEEDVL_GROUPED_GEMM_SM90)
  if (num_groups <= 0) return 0;
  // The two M-grouped configurations have the same layout (strides of the same size): take the larger.
  if (wgrad) return WorkspaceLayout<KGrouped>(num_groups, device).total;
  return std::max(WorkspaceLayout<MGroupedRowB>(num_groups, device).total,
                  WorkspaceLayout<MGroupedColB>(num_groups, device).total);
#else
  (void)num_groups, (void)wgrad, (void)device;
  return 0;
#endif
}

void grouped_gemm_launch(const GroupedGemmParams& p, cudaStream_t stream) {
  require_sm90(p.device);
#if defined(SEEDVL_GROUPED_GEMM_SM90)
  if (p.m == 0 || p.n == 0) return;
  if (p.num_groups == 0 || p.k == 0) {  // every row is padding, or every product is empty: zeros
    check_cuda(cudaMemsetAsync(p.out, 0, static_cast<size_t>(p.m * p.n) * sizeof(Element), stream),
               "grouped_gemm zero fill");
    return;
  }
  if (p.trans_b) {
    launch_m_grouped<MGroupedColB>(p, stream);
  } else {
    launch_m_grouped<MGroupedRowB>(p, stream);
  }
#endif
}

void grouped_gemm_dw_launch(const GroupedGemmDwParams& p, cudaStream_t stream) {
  require_sm90(p.device);
#if defined(SEEDVL_GROUPED_GEMM_SM90)
  if (p.num_groups == 0 || p.p == 0 || p.q == 0) return;
  const WorkspaceLayout<KGrouped> layout(p.num_groups, p.device);
  const GroupArrays<KGrouped> g = layout.carve(p.workspace);
  const int64_t fill_blocks = std::min<int64_t>(std::max<int64_t>(cdiv(p.p * p.q / kAlignment, kSetupThreads * 8), 1), 64);
  const dim3 grid(static_cast<unsigned>(fill_blocks), static_cast<unsigned>(p.num_groups));
  k_grouped_setup_kernel<KGrouped><<<grid, kSetupThreads, 0, stream>>>(p, g);
  check_cuda(cudaGetLastError(), "k_grouped_setup_kernel launch");
  run_gemm<KGrouped>(layout, g, p.workspace, p.num_groups, p.device, stream);
#endif
}

}  // namespace seedvl
