// The random matrix of every sketch: a pure function of (seed, row, column).
//
// HASH VERSION 1. Implemented identically in python/issl_fast/reference.py (numpy uint64) and
// pinned by golden values in tests/test_hash.py. Changing anything here is a store format break:
// bump kHashVersion.
//
//   mix(x)            splitmix64 finaliser (a bijection on uint64)
//   stream_key(s, r)  = mix(mix(s) + (r + 1) * PHI)          r = role * 2 + dist
//   column_key(K, c)  = mix(K ^ (c * PHI))                     c = column (input coordinate)
//   word(C, w)        = mix(C + w * M2)                        C = column key
//
// Rademacher: R[j, c] = -1 if bit (j & 63) of word(column_key(K, c), j >> 6) is set, else +1, so
//   one hash yields the signs of 64 consecutive rows of a column: identical on every backend and
//   under any tiling, because it depends only on (seed, j, c).
// Gaussian:   h = word(column_key(K, c), j); u1 = ((h >> 40) + 1) / 2^24 in (0, 1],
//   u2 = ((h >> 16) & (2^24 - 1)) / 2^24 in [0, 1); R[j, c] = sqrt(-2 ln u1) cos(2 pi u2)
//   (Box-Muller; agrees across backends to float rounding).
// Sparse JL: coordinate c, replica r < s: h = word(column_key(K, c), r); the replica's bucket lies
//   in block r of s near-equal blocks of [0, k): lo = r*k/s, hi = (r+1)*k/s (integer division),
//   bucket = lo + ((h & 0xffffffff) * (hi - lo)) >> 32, sign = -1 if h >> 63 else +1.
#pragma once
#include <cstdint>

#include "issl_fast/common.h"

namespace issl_fast {

constexpr int kHashVersion = 1;
constexpr uint64_t kPhi = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kM1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kM2 = 0x94D049BB133111EBULL;

// Roles keep the matrices of different ops independent for the same user seed.
enum class Role : int { kDense = 0, kSparse = 1, kKronIn = 2, kKronOut = 3 };

ISSL_FAST_HOST_DEVICE uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= kM1;
  x ^= x >> 27;
  x *= kM2;
  x ^= x >> 31;
  return x;
}

ISSL_FAST_HOST_DEVICE uint64_t stream_key(uint64_t seed, Role role, Dist dist) {
  const uint64_t stream = static_cast<uint64_t>(role) * 2u + static_cast<uint64_t>(dist);
  return mix64(mix64(seed) + (stream + 1u) * kPhi);
}

ISSL_FAST_HOST_DEVICE uint64_t column_key(uint64_t key, uint64_t column) {
  return mix64(key ^ (column * kPhi));
}

ISSL_FAST_HOST_DEVICE uint64_t hash_word(uint64_t col_key, uint64_t w) {
  return mix64(col_key + w * kM2);
}

// Gaussian entry from one 64-bit hash (float math: CPU and GPU agree to rounding).
ISSL_FAST_HOST_DEVICE float gaussian_from_hash(uint64_t h) {
  const float u1 = static_cast<float>((h >> 40) + 1u) * (1.0f / 16777216.0f);
  const float u2 = static_cast<float>((h >> 16) & 0xFFFFFFu) * (1.0f / 16777216.0f);
  const float two_pi = 6.283185307179586f;
#if defined(__CUDA_ARCH__)
  return sqrtf(-2.0f * logf(u1)) * cosf(two_pi * u2);
#else
  return __builtin_sqrtf(-2.0f * __builtin_logf(u1)) * __builtin_cosf(two_pi * u2);
#endif
}

// Sparse JL bucket of replica r (of s) for a k-dim sketch; requires 1 <= s <= k < 2^32.
ISSL_FAST_HOST_DEVICE uint32_t sparse_bucket(uint64_t h, int64_t r, int64_t s, int64_t k) {
  const uint64_t lo = static_cast<uint64_t>(r * k / s);
  const uint64_t hi = static_cast<uint64_t>((r + 1) * k / s);
  return static_cast<uint32_t>(lo + (((h & 0xFFFFFFFFull) * (hi - lo)) >> 32));
}

ISSL_FAST_HOST_DEVICE float sparse_sign(uint64_t h) { return (h >> 63) ? -1.0f : 1.0f; }

}  // namespace issl_fast
