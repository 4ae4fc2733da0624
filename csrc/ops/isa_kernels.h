// Internal: the table of ISA-specific inner kernels, chosen once at run time (cpu_features.cpp).
// Each ISA lives in its own translation unit compiled with its own -m flags, so the default build
// runs on any x86-64 and still uses AVX2 / AVX-512 where the CPU has them.
#pragma once
#include <cstdint>

#include "issl_fast/common.h"

namespace issl_fast::cpu {

struct IsaKernels {
  const char* name;
  // GEMM micro-tile (MR x NR) and cache blocking (KC: reduction depth per packed panel, sized so a
  // KC x NR sliver of the random matrix stays in L1; NC: columns of the random panel, sized for L2).
  int64_t mr, nr, kc, nc;
  // C[m x n] += A[m x kc] * B[kc x NR] (packed, zero-padded columns), C row stride ldc; A element
  // (i, p) at a[i * a_rs + p * a_cs] (a packed sliver is (1, MR)); only m <= MR rows of A are
  // read and only the valid m x n (n <= NR) part of C is written.
  void (*micro)(int64_t kc, const float* a, int64_t a_rs, int64_t a_cs, const float* b, float* c,
                int64_t ldc, int64_t m, int64_t n);
  // The same product with A packed as well, in MR-row slivers (element (i, p) at a[p * MR + i]),
  // for GEMMs that pack both operands (sketch_linear's slabs); it prefetches its C tile. Same
  // FMA sequence per element as micro, so the same results. nullptr in the narrow tables.
  void (*micro_packed)(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t m,
                       int64_t n);
  // Packs scale * R[j, col0 + p] (Rademacher, unscaled entries +-1) for p < kc and
  // j0 <= j < j0 + nc (j0 a multiple of NR) into NR-wide slivers: dst[(g * kc + p) * NR + l] for
  // j = j0 + g * NR + l; rows j >= k are written as 0.
  void (*pack_signs)(uint64_t key, int64_t col0, int64_t kc, int64_t j0, int64_t nc, int64_t k,
                     float scale, float* dst);
  // dst[0..n) = float(src[0..n)) for a float32 / float16 / bfloat16 source.
  void (*to_f32)(const void* src, DType dt, int64_t n, float* dst);
  // y[0..n) += a * x[0..n)
  void (*axpy)(int64_t n, float a, const float* x, float* y);
  // Sparse JL: a block's bucket table (sparse_table_impl in kernel_templates.h; ck: pc uint64
  // scratch), scatter one transposed lane group of the block (scatter_group_impl), and build
  // such a group from kLaneGroup rows (a scaled transpose).
  void (*sparse_table)(uint64_t key, int64_t col0, int64_t pc, int64_t s, int64_t k, uint64_t* ck,
                       uint32_t* tab);
  void (*scatter_group)(const uint32_t* tab, int64_t s, int64_t pc, const float* xg, float* yg);
  void (*pack_lanes)(const float* const* rows, int64_t pc, float scale, float* dst);
  // out[i * ldo + j] = dot(q[i * ldq ..], g[j * ldg ..]) over k, for i < mq, j < ng, with g rows
  // of dtype dt widened in registers. Every (i, j) pair uses the same arithmetic whatever its
  // position in the tile or g's dtype path, so a score never depends on the batch of queries or
  // rows it was computed with. With n_side > 0 (g then float32), the n_side contiguous elements
  // of dtype side_dt at side_src are also widened into side_dst, interleaved with the
  // arithmetic (see SideWiden in kernel_templates.h).
  void (*dot_tile)(const float* q, int64_t ldq, int64_t mq, const void* g, DType dt, int64_t ldg,
                   int64_t ng, int64_t k, float* out, int64_t ldo, const void* side_src,
                   DType side_dt, int64_t n_side, float* side_dst);
  // The same kernels with NR = one vector and a taller MR, for GEMMs with at most that many
  // columns (sketch_kron projections with k <= nr: k = 16 on AVX-512 wastes half of a 32-wide
  // tile). Same KC, so every element's FMA sequence, and thus the result, is the same as with
  // the wide tile. nullptr where NR is already one vector.
  const IsaKernels* narrow;
};

const IsaKernels& generic_kernels();
#if defined(ISSL_FAST_X86)
const IsaKernels& avx2_kernels();
const IsaKernels& avx512_kernels();
#endif

// The kernels in use (best the CPU supports, or the level forced by set_simd_level / the
// ISSL_FAST_SIMD environment variable).
const IsaKernels& isa();

}  // namespace issl_fast::cpu
