// Portable kernels (any CPU): plain C++ over 8-float lane arrays that the compiler vectorises with
// the baseline ISA (SSE2 on x86-64, NEON on aarch64).
#include <cstring>

#include "convert.h"
#include "isa_kernels.h"
#include "kernel_templates.h"

namespace issl_fast::cpu {
namespace {

struct VecGeneric {
  static constexpr int W = 8;
  struct reg {
    float v[W];
  };
  static reg zero() { return reg{}; }
  static reg set1(float a) {
    reg r;
    for (int l = 0; l < W; ++l) r.v[l] = a;
    return r;
  }
  static reg load(const float* p) {
    reg r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static reg load_tail(const float* p, int n) {
    reg r{};
    std::memcpy(r.v, p, sizeof(float) * n);
    return r;
  }
  static void store(float* p, const reg& r) { std::memcpy(p, r.v, sizeof r.v); }
  static reg add(const reg& a, const reg& b) {
    reg r;
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] + b.v[l];
    return r;
  }
  static reg fma(const reg& a, const reg& b, const reg& c) {
    reg r;
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static reg xor_bits(const reg& a, uint32_t u) {
    reg r;
    for (int l = 0; l < W; ++l) {
      uint32_t b;
      std::memcpy(&b, &a.v[l], sizeof b);
      b ^= u;
      std::memcpy(&r.v[l], &b, sizeof b);
    }
    return r;
  }
  static reg load_f16(const uint16_t* p) {
    reg r;
    for (int l = 0; l < W; ++l) r.v[l] = f16_to_f32(p[l]);
    return r;
  }
  static reg load_f16_tail(const uint16_t* p, int n) {
    reg r{};
    for (int l = 0; l < n; ++l) r.v[l] = f16_to_f32(p[l]);
    return r;
  }
  static reg load_bf16(const uint16_t* p) {
    reg r;
    for (int l = 0; l < W; ++l) r.v[l] = bf16_to_f32(p[l]);
    return r;
  }
  static reg load_bf16_tail(const uint16_t* p, int n) {
    reg r{};
    for (int l = 0; l < n; ++l) r.v[l] = bf16_to_f32(p[l]);
    return r;
  }
  static float hsum(const reg& r) {
    return ((r.v[0] + r.v[4]) + (r.v[2] + r.v[6])) + ((r.v[1] + r.v[5]) + (r.v[3] + r.v[7]));
  }
};

constexpr int kMR = 4;   // 4 x 8 accumulators fit the 16 SSE registers
constexpr int kNR = 8;

void micro(int64_t kc, const float* a, int64_t a_rs, int64_t a_cs, const float* b, float* c,
           int64_t ldc, int64_t m, int64_t n) {
  micro_impl<VecGeneric, kMR, kNR / VecGeneric::W>(kc, a, a_rs, a_cs, b, c, ldc, m, n);
}

void micro_packed(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t m,
                  int64_t n) {
  micro_packed_impl<VecGeneric, kMR, kNR / VecGeneric::W>(kc, a, b, c, ldc, m, n);
}

void pack_signs(uint64_t key, int64_t col0, int64_t kc, int64_t j0, int64_t nc, int64_t k,
                float scale, float* dst) {
  pack_signs_impl<kNR>(key, col0, kc, j0, nc, k, scale, dst,
                       [](uint64_t bits, int valid, float s, float* d) {
                         for (int l = 0; l < kNR; ++l)
                           d[l] = l < valid ? (((bits >> l) & 1u) ? -s : s) : 0.0f;
                       });
}

void to_f32(const void* src, DType dt, int64_t n, float* dst) {
  if (dt == DType::kFloat32) {
    std::memcpy(dst, src, sizeof(float) * n);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  if (dt == DType::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  }
}

void axpy(int64_t n, float a, const float* x, float* y) { axpy_impl<VecGeneric>(n, a, x, y); }

void sparse_table(uint64_t key, int64_t col0, int64_t pc, int64_t s, int64_t k, uint64_t* ck,
                  uint32_t* tab) {
  sparse_table_impl(key, col0, pc, s, k, ck, tab);
}

void scatter_group(const uint32_t* tab, int64_t s, int64_t pc, const float* xg, float* yg) {
  scatter_group_impl<VecGeneric>(tab, s, pc, xg, yg);
}

void pack_lanes(const float* const* rows, int64_t pc, float scale, float* dst) {
  pack_lanes_scalar(rows, pc, scale, dst);
}

void dot_tile(const float* q, int64_t ldq, int64_t mq, const void* g, DType dt, int64_t ldg,
              int64_t ng, int64_t k, float* out, int64_t ldo, const void* side_src,
              DType side_dt, int64_t n_side, float* side_dst) {
  dot_tile_impl<VecGeneric, 2, 2>(q, ldq, mq, g, dt, ldg, ng, k, out, ldo, side_src, side_dt, n_side,
                                   side_dst);
}

}  // namespace

const IsaKernels& generic_kernels() {
  static const IsaKernels table{"generic", kMR, kNR, /*kc=*/256, /*nc=*/512,
                                micro,     micro_packed, pack_signs, to_f32, axpy, sparse_table,
                                scatter_group, pack_lanes, dot_tile, nullptr};
  return table;
}

}  // namespace issl_fast::cpu
