// Internal: argument checks of the CUDA entry points (std::invalid_argument -> Python ValueError),
// the same rules and messages as the CPU ops' (csrc/ops/validate.h).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "issl_fast/common.h"

namespace issl_fast::cuda::detail {

inline void require_arg(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}
inline void require_nonneg(int64_t v, const char* name) {
  require_arg(v >= 0, std::string(name) + " must be >= 0, got " + std::to_string(v));
}
inline void require_pos(int64_t v, const char* name) {
  require_arg(v >= 1, std::string(name) + " must be >= 1, got " + std::to_string(v));
}
inline void require_ptr(const void* p, int64_t elements, const char* name) {
  require_arg(p != nullptr || elements == 0, std::string(name) + " is a null pointer");
}
inline void require_dist(Dist d) {
  require_arg(d == Dist::kRademacher || d == Dist::kGaussian,
              "dist must be rademacher (0) or gaussian (1)");
}
inline void require_dtype(DType d) {
  require_arg(d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16,
              "dtype must be float32 (0), float16 (1) or bfloat16 (2)");
}

}  // namespace issl_fast::cuda::detail
