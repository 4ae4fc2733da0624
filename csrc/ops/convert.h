// Internal: scalar float16 / bfloat16 -> float32 conversions (exact; both formats are subsets of
// float32), used by the generic kernels and for scattered single elements. `static`: see the
// note on ISSL_FAST_HOST_DEVICE in common.h.
#pragma once
#include <cstdint>
#include <cstring>

#include "issl_fast/common.h"

namespace issl_fast::cpu {

static inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_f32(sign | 0x7F800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_to_f32(sign);
    // Subnormal: value = man * 2^-24, exact in float32.
    const float v = static_cast<float>(man) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

static inline float load_f32(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::kFloat32: break;
  }
  return static_cast<const float*>(base)[i];
}

static inline int64_t dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

static inline const void* offset_ptr(const void* base, DType dt, int64_t elements) {
  return static_cast<const char*>(base) + elements * dtype_size(dt);
}

}  // namespace issl_fast::cpu
