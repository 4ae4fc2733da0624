// Internal: AVX (256-bit) lane-group transpose for the sparse sketch, included by the AVX2 and
// AVX-512 kernel files (static: each file compiles its own copy with its own flags).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "kernel_templates.h"

namespace issl_fast::cpu {

// Transposes the 8x8 block rows[r0 + i][p0 + j] (scaled) into dst[(p0 + j) * 16 + r0 + i].
static inline void transpose8x8(const float* const* rows, int64_t r0, int64_t p0, __m256 scale,
                                float* dst) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_mul_ps(_mm256_loadu_ps(rows[r0 + i] + p0), scale);
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 o[8] = {
      _mm256_permute2f128_ps(s0, s4, 0x20), _mm256_permute2f128_ps(s1, s5, 0x20),
      _mm256_permute2f128_ps(s2, s6, 0x20), _mm256_permute2f128_ps(s3, s7, 0x20),
      _mm256_permute2f128_ps(s0, s4, 0x31), _mm256_permute2f128_ps(s1, s5, 0x31),
      _mm256_permute2f128_ps(s2, s6, 0x31), _mm256_permute2f128_ps(s3, s7, 0x31)};
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (p0 + j) * kLaneGroup + r0, o[j]);
}

// pack_lanes with 8x8 register transposes; the last pc % 8 columns go the scalar way (the same
// single multiply per element, so results are identical).
static inline void pack_lanes_avx(const float* const* rows, int64_t pc, float scale, float* dst) {
  const __m256 sv = _mm256_set1_ps(scale);
  int64_t p0 = 0;
  for (; p0 + 8 <= pc; p0 += 8) {
    transpose8x8(rows, 0, p0, sv, dst);
    transpose8x8(rows, 8, p0, sv, dst);
  }
  for (int64_t l = 0; l < kLaneGroup; ++l)
    for (int64_t p = p0; p < pc; ++p) dst[p * kLaneGroup + l] = rows[l][p] * scale;
}

}  // namespace issl_fast::cpu
