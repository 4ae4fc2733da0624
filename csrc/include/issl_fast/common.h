// Shared host/device definitions: element types, the host/device qualifier, error helpers.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define ISSL_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
// Internal linkage on the host: the per-ISA translation units (compiled with -mavx2 / -mavx512f)
// must not hand the linker an out-of-line copy that a generic caller could then pick up.
#define ISSL_FAST_HOST_DEVICE static inline
#endif

namespace issl_fast {

// Element type of an input buffer. Values are part of the binding ABI (ops.py mirrors them).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Distribution of the dense random matrix entries. Values are part of the binding ABI.
enum class Dist : int { kRademacher = 0, kGaussian = 1 };

}  // namespace issl_fast

#if !defined(__CUDACC__)
#include <stdexcept>
#include <string>
namespace issl_fast {
// Argument errors surface in Python as ValueError (pybind11 maps std::invalid_argument).
[[noreturn]] inline void fail_arg(const std::string& msg) { throw std::invalid_argument(msg); }
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}
}  // namespace issl_fast
#endif
