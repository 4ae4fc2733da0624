// AVX2 + FMA + F16C kernels (Haswell / Zen 1 and newer). Compiled with -mavx2 -mfma -mf16c; only
// called after cpu_features.cpp has checked the CPU supports them.
#include <immintrin.h>

#include <cstring>

#include "convert.h"
#include "isa_kernels.h"
#include "kernel_templates.h"
#include "transpose_avx.h"

namespace issl_fast::cpu {
namespace {

struct VecAvx2 {
  static constexpr int W = 8;
  using reg = __m256;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float a) { return _mm256_set1_ps(a); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load_tail(const float* p, int n) {
    alignas(32) static const int32_t ramp[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    const __m256i mask =
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_load_si256(reinterpret_cast<const __m256i*>(ramp)));
    return _mm256_maskload_ps(p, mask);
  }
  static void store(float* p, reg r) { _mm256_storeu_ps(p, r); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg xor_bits(reg a, uint32_t u) {
    return _mm256_xor_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(u))));
  }
  static reg load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static reg load_f16_tail(const uint16_t* p, int n) {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, sizeof(uint16_t) * n);
    return load_f16(buf);
  }
  static reg load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static reg load_bf16_tail(const uint16_t* p, int n) {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, sizeof(uint16_t) * n);
    return load_bf16(buf);
  }
  static float hsum(reg r) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

constexpr int kMR = 6;   // 6 x 2 ymm accumulators + 2 B vectors + 1 broadcast of the 16 registers
constexpr int kNR = 16;

// The narrow tile (IsaKernels::narrow): 12 x 1 ymm accumulators + 1 B vector + 1 broadcast.
constexpr int kNarrowMR = 12;

void micro(int64_t kc, const float* a, int64_t a_rs, int64_t a_cs, const float* b, float* c,
           int64_t ldc, int64_t m, int64_t n) {
  micro_impl<VecAvx2, kMR, kNR / VecAvx2::W>(kc, a, a_rs, a_cs, b, c, ldc, m, n);
}

void micro_packed(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t m,
                  int64_t n) {
  micro_packed_impl<VecAvx2, kMR, kNR / VecAvx2::W>(kc, a, b, c, ldc, m, n);
}

void micro_narrow(int64_t kc, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                  float* c, int64_t ldc, int64_t m, int64_t n) {
  micro_impl<VecAvx2, kNarrowMR, 1>(kc, a, a_rs, a_cs, b, c, ldc, m, n);
}

// 8 sign bits -> 8 floats: lane l is -scale where bit l is set.
inline __m256 expand8(uint32_t byte, __m256 splat) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(byte), sel), sel);
  const __m256 sign = _mm256_and_ps(_mm256_castsi256_ps(set), _mm256_set1_ps(-0.0f));
  return _mm256_xor_ps(splat, sign);
}

// NR = 8 * NV: each sliver row is NV vectors, one byte of the sign word each.
template <int NV>
void pack_signs_nv(uint64_t key, int64_t col0, int64_t kc, int64_t j0, int64_t nc, int64_t k,
                   float scale, float* dst) {
  const __m256 splat = _mm256_set1_ps(scale);
  pack_signs_impl<8 * NV>(key, col0, kc, j0, nc, k, scale, dst,
                          [splat](uint64_t bits, int valid, float, float* d) {
                            for (int v = 0; v < NV; ++v)
                              _mm256_storeu_ps(d + 8 * v,
                                               expand8(static_cast<uint32_t>((bits >> (8 * v)) & 0xFF),
                                                       splat));
                            for (int l = valid; l < 8 * NV; ++l) d[l] = 0.0f;
                          });
}

void pack_signs(uint64_t key, int64_t col0, int64_t kc, int64_t j0, int64_t nc, int64_t k,
                float scale, float* dst) {
  pack_signs_nv<kNR / 8>(key, col0, kc, j0, nc, k, scale, dst);
}

void to_f32(const void* src, DType dt, int64_t n, float* dst) {
  if (dt == DType::kFloat32) {
    std::memcpy(dst, src, sizeof(float) * n);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  if (dt == DType::kFloat16) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    for (; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  } else {
    for (; i + 8 <= n; i += 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  }
}

void axpy(int64_t n, float a, const float* x, float* y) { axpy_impl<VecAvx2>(n, a, x, y); }

void sparse_table(uint64_t key, int64_t col0, int64_t pc, int64_t s, int64_t k, uint64_t* ck,
                  uint32_t* tab) {
  sparse_table_impl(key, col0, pc, s, k, ck, tab);
}

void scatter_group(const uint32_t* tab, int64_t s, int64_t pc, const float* xg, float* yg) {
  scatter_group_impl<VecAvx2>(tab, s, pc, xg, yg);
}

void pack_lanes(const float* const* rows, int64_t pc, float scale, float* dst) {
  pack_lanes_avx(rows, pc, scale, dst);
}

void dot_tile(const float* q, int64_t ldq, int64_t mq, const void* g, DType dt, int64_t ldg,
              int64_t ng, int64_t k, float* out, int64_t ldo, const void* side_src,
              DType side_dt, int64_t n_side, float* side_dst) {
  // 3 x 3 pair accumulators + 3 row vectors + 1 query vector: 13 of the 16 ymm registers.
  dot_tile_impl<VecAvx2, 3, 3>(q, ldq, mq, g, dt, ldg, ng, k, out, ldo, side_src, side_dt, n_side,
                                   side_dst);
}

const IsaKernels& avx2_narrow_kernels() {
  static const IsaKernels table{"avx2", kNarrowMR, 8, /*kc=*/256, /*nc=*/512,
                                micro_narrow, nullptr, pack_signs_nv<1>, to_f32, axpy,
                                sparse_table, scatter_group, pack_lanes, dot_tile, nullptr};
  return table;
}

}  // namespace

const IsaKernels& avx2_kernels() {
  // KC x NR x 4 B = 16 KB sliver in L1; KC x NC panel = 512 KB in L2.
  static const IsaKernels table{"avx2", kMR, kNR, /*kc=*/256, /*nc=*/512,
                                micro,  micro_packed, pack_signs, to_f32, axpy, sparse_table,
                                scatter_group, pack_lanes, dot_tile, &avx2_narrow_kernels()};
  return table;
}

}  // namespace issl_fast::cpu
