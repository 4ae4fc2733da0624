// Argument checks shared by the CPU and CUDA entry points: the same rules and messages on every
// backend (std::invalid_argument -> Python ValueError). ops.py validates first with friendlier
// messages; these guard the C++ entry points themselves. Host code only.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "issl_fast/common.h"

namespace issl_fast::checks {

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

inline void require_nonneg(int64_t v, const char* name) {
  require(v >= 0, std::string(name) + " must be >= 0, got " + std::to_string(v));
}

inline void require_pos(int64_t v, const char* name) {
  require(v >= 1, std::string(name) + " must be >= 1, got " + std::to_string(v));
}

inline void require_ptr(const void* p, int64_t elements, const char* name) {
  require(p != nullptr || elements == 0, std::string(name) + " is a null pointer");
}

inline void require_dist(Dist d) {
  require(d == Dist::kRademacher || d == Dist::kGaussian,
          "dist must be rademacher (0) or gaussian (1)");
}

inline void require_dtype(DType d) {
  require(d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16,
          "dtype must be float32 (0), float16 (1) or bfloat16 (2)");
}

}  // namespace issl_fast::checks
