// AVX-512 (F/BW/VL/DQ) kernels (Skylake-X, Ice Lake, Zen 4 and newer). Compiled with -mavx512*;
// only called after cpu_features.cpp has checked the CPU supports them.
#include <immintrin.h>

#include <cstring>

#include "convert.h"
#include "isa_kernels.h"
#include "kernel_templates.h"
#include "transpose_avx.h"

namespace issl_fast::cpu {
namespace {

struct VecAvx512 {
  static constexpr int W = 16;
  using reg = __m512;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float a) { return _mm512_set1_ps(a); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load_tail(const float* p, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  }
  static void store(float* p, reg r) { _mm512_storeu_ps(p, r); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg xor_bits(reg a, uint32_t u) {
    return _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(static_cast<int>(u))));
  }
  static reg load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static reg load_f16_tail(const uint16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p));
  }
  static reg load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static reg load_bf16_tail(const uint16_t* p, int n) {
    const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static float hsum(reg r) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(r), _mm512_extractf32x8_ps(r, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

constexpr int kMR = 8;   // 8 x 2 zmm accumulators: 16 FMAs per 2 loads + 8 broadcasts
constexpr int kNR = 32;
// The narrow tile (IsaKernels::narrow): 12 x 1 zmm accumulators. For a 16-column GEMM (4096 x
// 512 x 16, 2 threads) it ran 1.3x faster than the 8 x 32 tile with half its columns padding.
constexpr int kNarrowMR = 12;

void micro(int64_t kc, const float* a, int64_t a_rs, int64_t a_cs, const float* b, float* c,
           int64_t ldc, int64_t m, int64_t n) {
  micro_impl<VecAvx512, kMR, kNR / VecAvx512::W>(kc, a, a_rs, a_cs, b, c, ldc, m, n);
}

void micro_packed(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t m,
                  int64_t n) {
  micro_packed_impl<VecAvx512, kMR, kNR / VecAvx512::W>(kc, a, b, c, ldc, m, n);
}

void micro_narrow(int64_t kc, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                  float* c, int64_t ldc, int64_t m, int64_t n) {
  micro_impl<VecAvx512, kNarrowMR, 1>(kc, a, a_rs, a_cs, b, c, ldc, m, n);
}

// NR = 16 * NV: each sliver row is NV vectors, one 16-bit chunk of the sign word each.
template <int NV>
void pack_signs_nv(uint64_t key, int64_t col0, int64_t kc, int64_t j0, int64_t nc, int64_t k,
                   float scale, float* dst) {
  const __m512 pos = _mm512_set1_ps(scale);
  const __m512 neg = _mm512_set1_ps(-scale);
  pack_signs_impl<16 * NV>(
      key, col0, kc, j0, nc, k, scale, dst, [pos, neg](uint64_t bits, int valid, float, float* d) {
        // Sign bits are used directly as blend masks; rows past k are zeroed by the valid mask.
        const uint32_t vmask = valid >= 32 ? 0xFFFFFFFFu : ((1u << valid) - 1u);
        for (int v = 0; v < NV; ++v) {
          const __mmask16 sign = static_cast<__mmask16>((bits >> (16 * v)) & 0xFFFF);
          const __mmask16 keep = static_cast<__mmask16>((vmask >> (16 * v)) & 0xFFFF);
          _mm512_storeu_ps(d + 16 * v,
                           _mm512_maskz_mov_ps(keep, _mm512_mask_blend_ps(sign, pos, neg)));
        }
      });
}

void pack_signs(uint64_t key, int64_t col0, int64_t kc, int64_t j0, int64_t nc, int64_t k,
                float scale, float* dst) {
  pack_signs_nv<kNR / 16>(key, col0, kc, j0, nc, k, scale, dst);
}

void to_f32(const void* src, DType dt, int64_t n, float* dst) {
  if (dt == DType::kFloat32) {
    std::memcpy(dst, src, sizeof(float) * n);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  if (dt == DType::kFloat16) {
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
    for (; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  } else {
    for (; i + 16 <= n; i += 16) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
      _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
    for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  }
}

void axpy(int64_t n, float a, const float* x, float* y) { axpy_impl<VecAvx512>(n, a, x, y); }

void sparse_table(uint64_t key, int64_t col0, int64_t pc, int64_t s, int64_t k, uint64_t* ck,
                  uint32_t* tab) {
  sparse_table_impl(key, col0, pc, s, k, ck, tab);
}

void scatter_group(const uint32_t* tab, int64_t s, int64_t pc, const float* xg, float* yg) {
  scatter_group_impl<VecAvx512>(tab, s, pc, xg, yg);
}

void pack_lanes(const float* const* rows, int64_t pc, float scale, float* dst) {
  pack_lanes_avx(rows, pc, scale, dst);
}

void dot_tile(const float* q, int64_t ldq, int64_t mq, const void* g, DType dt, int64_t ldg,
              int64_t ng, int64_t k, float* out, int64_t ldo, const void* side_src,
              DType side_dt, int64_t n_side, float* side_dst) {
  // 4 x 4 pair accumulators + 4 row vectors + 1 query vector: 21 of the 32 zmm registers.
  dot_tile_impl<VecAvx512, 4, 4>(q, ldq, mq, g, dt, ldg, ng, k, out, ldo, side_src, side_dt, n_side,
                                   side_dst);
}

const IsaKernels& avx512_narrow_kernels() {
  static const IsaKernels table{"avx512", kNarrowMR, 16, /*kc=*/256, /*nc=*/512,
                                micro_narrow, nullptr, pack_signs_nv<1>, to_f32, axpy,
                                sparse_table, scatter_group, pack_lanes, dot_tile, nullptr};
  return table;
}

}  // namespace

const IsaKernels& avx512_kernels() {
  // KC x NR x 4 B = 32 KB sliver in L1 (48 KB on Ice Lake); KC x NC panel = 512 KB in L2.
  static const IsaKernels table{"avx512", kMR, kNR, /*kc=*/256, /*nc=*/512,
                                micro,    micro_packed, pack_signs, to_f32, axpy, sparse_table,
                                scatter_group, pack_lanes, dot_tile, &avx512_narrow_kernels()};
  return table;
}

}  // namespace issl_fast::cpu
