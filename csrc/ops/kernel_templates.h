// Internal: the inner-kernel algorithms, written once over a vector-traits type V and instantiated
// by each ISA file (kernels_generic.cpp, kernels_avx2.cpp, kernels_avx512.cpp). Included only by
// those files, so each instantiation is compiled with its ISA's flags.
//
// V provides: reg, W (lanes), zero(), set1(a), load(p), load_tail(p, n) (n < W, rest zero),
// store(p, r), add(a, b), fma(a, b, c) (= a*b + c), hsum(r) (a fixed reduction tree),
// xor_bits(r, u) (xor every lane's bit pattern with u: flips signs for u = 0x80000000),
// load_f16 / load_bf16 (+ _tail) (W half-precision values widened to float32, exactly).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "convert.h"
#include "issl_fast/common.h"
#include "issl_fast/hash.h"

namespace issl_fast::cpu {

// ---- GEMM micro-kernel: C[m x n] += A[m x kc] * B[kc x NR], NR = NV * W --------------------
// C[m x n] += acc (the valid part of an MR x NR tile of sums), C row stride ldc. Always
// inlined: called, it would take acc through memory (GCC 12 does not inline it by itself).
template <class V, int MR, int NV>
[[gnu::always_inline]] inline void add_tile(const typename V::reg (&acc)[MR][NV], float* c,
                                            int64_t ldc, int64_t m, int64_t n) {
  constexpr int W = V::W;
  constexpr int NR = NV * W;
  if (m == MR && n == NR) {
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) {
        float* cp = c + i * ldc + v * W;
        V::store(cp, V::add(V::load(cp), acc[i][v]));
      }
    return;
  }
  // Edge tile: same sums, added element by element (one rounding, as in the vector path).
  alignas(64) float tmp[MR * NR];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) V::store(tmp + i * NR + v * W, acc[i][v]);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] += tmp[i * NR + j];
}

// A element (i, p) is a[i * a_rs + p * a_cs]: (1, MR) for a packed sliver, (lda, 1) for a
// row-major matrix read in place, (1, ld) for a transposed one. Rows i >= m are never read (they
// alias row m-1 and their sums are discarded), so an unpadded matrix is safe to read in place.
template <class V, int MR, int NV>
void micro_impl(int64_t kc, const float* a, int64_t a_rs, int64_t a_cs, const float* b, float* c,
                int64_t ldc, int64_t m, int64_t n) {
  constexpr int W = V::W;
  constexpr int NR = NV * W;
  const float* arow[MR];
  for (int i = 0; i < MR; ++i) arow[i] = a + (i < m ? i : m - 1) * a_rs;
  typename V::reg acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
  for (int64_t p = 0, off = 0; p < kc; ++p, off += a_cs) {
    typename V::reg bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + p * NR + v * W);
    for (int i = 0; i < MR; ++i) {
      const typename V::reg ai = V::set1(arow[i][off]);
      for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(ai, bv[v], acc[i][v]);
    }
  }
  add_tile<V, MR, NV>(acc, c, ldc, m, n);
}

// The same product with A packed too, in MR-row slivers: element (i, p) at a[p * MR + i] (rows
// i >= m are padding; their sums are discarded). One pointer serves the MR broadcasts. The C
// tile is prefetched first: where C is large (a slab of G, rows d_in apart) it has left the
// caches since the previous KC step, and its misses would stall the tile's update (AVX2 6 x 16
// tile, 768-wide slab: the slab GEMM 1.06-1.08x faster with it; no change on AVX-512). Each
// element's FMA sequence is micro_impl's: both give the same bits.
template <class V, int MR, int NV>
void micro_packed_impl(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                       int64_t m, int64_t n) {
  constexpr int W = V::W;
  constexpr int NR = NV * W;
  for (int64_t i = 0; i < m; ++i) {  // every line of the row's n floats, at any alignment
    for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(c + i * ldc + j, 1, 3);
    __builtin_prefetch(c + i * ldc + n - 1, 1, 3);
  }
  typename V::reg acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
  for (int64_t p = 0; p < kc; ++p, a += MR, b += NR) {
    typename V::reg bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + v * W);
    for (int i = 0; i < MR; ++i) {
      const typename V::reg ai = V::set1(a[i]);
      for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(ai, bv[v], acc[i][v]);
    }
  }
  add_tile<V, MR, NV>(acc, c, ldc, m, n);
}

// ---- Rademacher panel ------------------------------------------------------------------------
// expand(bits, valid, scale, dst): dst[l] = (bit l set ? -scale : scale) for l < valid, 0 after.
template <int NR, class Expand>
void pack_signs_impl(uint64_t key, int64_t col0, int64_t kc, int64_t j0, int64_t nc, int64_t k,
                     float scale, float* dst, Expand expand) {
  static_assert(64 % NR == 0, "a sliver's signs must come from a single 64-bit word");
  const int64_t ng = (nc + NR - 1) / NR;
  for (int64_t p = 0; p < kc; ++p) {
    const uint64_t ck = column_key(key, static_cast<uint64_t>(col0 + p));
    int64_t last_w = -1;
    uint64_t word = 0;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t j = j0 + g * NR;
      const int64_t w = j >> 6;
      if (w != last_w) {
        word = hash_word(ck, static_cast<uint64_t>(w));
        last_w = w;
      }
      const int valid = static_cast<int>(std::min<int64_t>(NR, k - j));
      expand(word >> (j & 63), valid, scale, dst + (g * kc + p) * NR);
    }
  }
}

// ---- score tiles -----------------------------------------------------------------------------
// Store rows are read through a loader G (float32, or float16 / bfloat16 converted in registers:
// exact, so a score is the same bit pattern whichever loader produced it).
template <class V>
struct LoadF32 {
  using T = float;
  static typename V::reg load(const T* p) { return V::load(p); }
  static typename V::reg load_tail(const T* p, int n) { return V::load_tail(p, n); }
  static float one(const T* p) { return *p; }
};
template <class V>
struct LoadF16 {
  using T = uint16_t;
  static typename V::reg load(const T* p) { return V::load_f16(p); }
  static typename V::reg load_tail(const T* p, int n) { return V::load_f16_tail(p, n); }
  static float one(const T* p) { return f16_to_f32(*p); }
};
template <class V>
struct LoadBF16 {
  using T = uint16_t;
  static typename V::reg load(const T* p) { return V::load_bf16(p); }
  static typename V::reg load_tail(const T* p, int n) { return V::load_bf16_tail(p, n); }
  static float one(const T* p) { return bf16_to_f32(*p); }
};

// A dot block's optional side job: widening the next rows to score (a contiguous run of store
// elements, float16 / bfloat16 / float32, still in DRAM) into a float32 buffer, a few vectors per
// k-step. Interleaved with the FMAs at instruction granularity, those DRAM reads overlap the
// arithmetic; done as a separate pass (or only prefetched) they add to it on this class of CPU,
// where one core's streaming bandwidth is bounded by its fill buffers. The run's whole vectors
// are converted here; the caller finishes the tail (finish_side).
// NoSide and SidePrefetch sit in an anonymous namespace: this header is compiled into each ISA
// file with its own -m flags, and an external-linkage member function (one weak copy kept by the
// linker, built for whichever ISA) would break that separation in an unoptimised build.
namespace {
struct NoSide {
  void step() {}
};
}  // namespace

template <class V, class L>
struct SideWiden {
  // Prefetch distance of the side stream (16 lines): in A/B runs of m = 16 on both cores, 1 KiB
  // beat 512 B by ~15% and 2-4 KiB were no better.
  static constexpr int64_t kAheadBytes = 1024;
  const typename L::T* src;
  float* dst;
  int64_t vectors;  // whole vectors left
  int64_t per_step;
  uintptr_t last_line = 0;  // the line prefetched last: one request per line, any alignment
  void step() {
    for (int64_t r = 0; r < per_step && vectors > 0; ++r, --vectors) {
      const uintptr_t line = (reinterpret_cast<uintptr_t>(src) + kAheadBytes) & ~uintptr_t{63};
      if (line != last_line) {
        __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 3);
        last_line = line;
      }
      V::store(dst, L::load(src));
      src += V::W;
      dst += V::W;
    }
  }
};

// The side job of a sweep over a contiguous run of store rows by at most QR queries (the
// bandwidth-bound case: score_topk with m <= QR, i.e. m <= 4 on AVX-512, 3 on AVX2): software
// prefetch of the lines kAheadBytes past the ones being read, a few per k-step. With 1 < mq < QR
// the rows are swept once per query and only the first sweep is prefetched (the others hit L2).
// The hardware prefetchers alone leave the half-precision stream short of the machine's read
// bandwidth: on the reference VM (2 cores, n = 1M, k = 512, m = 1, alternating A/B runs) a
// float16 / bfloat16 store scored in 59-74 ms without and 45-57 ms with a 4 KiB lead (2 KiB:
// 50-63 ms, 8 KiB: like 4 KiB); a float32 store was unaffected (44-49 ms).
namespace {
struct SidePrefetch {
  static constexpr int64_t kAheadBytes = 4096;
  // Addresses as integers: the lead runs past the end of the rows (a prefetch never faults).
  uintptr_t next;
  uintptr_t end;
  int64_t per_step;
  void step() {
    for (int64_t r = 0; r < per_step && next < end; ++r, next += 64)
      __builtin_prefetch(reinterpret_cast<const void*>(next), 0, 3);
  }
};
}  // namespace

template <class V, class G, int QI, int GJ, class S = NoSide>
void dot_block(const float* q, int64_t ldq, const typename G::T* g, int64_t ldg, int64_t k,
               float* out, int64_t ldo, S& side_state) {
  constexpr int W = V::W;
  // A local copy: the side job's stores could alias a struct behind a reference, which would
  // pin its fields to memory; a local stays in registers.
  S side = side_state;
  typename V::reg acc[QI][GJ];
  for (int i = 0; i < QI; ++i)
    for (int j = 0; j < GJ; ++j) acc[i][j] = V::zero();
  int64_t p = 0;
  for (; p + W <= k; p += W) {
    side.step();
    typename V::reg gv[GJ];
    for (int j = 0; j < GJ; ++j) gv[j] = G::load(g + j * ldg + p);
    for (int i = 0; i < QI; ++i) {
      const typename V::reg qv = V::load(q + i * ldq + p);
      for (int j = 0; j < GJ; ++j) acc[i][j] = V::fma(qv, gv[j], acc[i][j]);
    }
  }
  if (p < k) {
    const int rem = static_cast<int>(k - p);
    typename V::reg gv[GJ];
    for (int j = 0; j < GJ; ++j) gv[j] = G::load_tail(g + j * ldg + p, rem);
    for (int i = 0; i < QI; ++i) {
      const typename V::reg qv = V::load_tail(q + i * ldq + p, rem);
      for (int j = 0; j < GJ; ++j) acc[i][j] = V::fma(qv, gv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < QI; ++i)
    for (int j = 0; j < GJ; ++j) out[i * ldo + j] = V::hsum(acc[i][j]);
  side_state = side;
}

// Every (query, row) pair goes through the same per-pair instruction sequence in every block
// shape, so its score is bit-identical whatever m, the tile, the loader or the thread count (the
// side job touches other registers only).
template <class V, class G, int QR, int GR, class S>
void dot_tile_typed(const float* q, int64_t ldq, int64_t mq, const typename G::T* g, int64_t ldg,
                    int64_t ng, int64_t k, float* out, int64_t ldo, S& side) {
  int64_t i0 = 0;
  for (; i0 + QR <= mq; i0 += QR) {
    int64_t j0 = 0;
    for (; j0 + GR <= ng; j0 += GR)
      dot_block<V, G, QR, GR>(q + i0 * ldq, ldq, g + j0 * ldg, ldg, k, out + i0 * ldo + j0, ldo,
                              side);
    for (; j0 < ng; ++j0)
      dot_block<V, G, QR, 1>(q + i0 * ldq, ldq, g + j0 * ldg, ldg, k, out + i0 * ldo + j0, ldo,
                             side);
  }
  for (; i0 < mq; ++i0) {
    int64_t j0 = 0;
    for (; j0 + GR <= ng; j0 += GR)
      dot_block<V, G, 1, GR>(q + i0 * ldq, ldq, g + j0 * ldg, ldg, k, out + i0 * ldo + j0, ldo,
                             side);
    for (; j0 < ng; ++j0)
      dot_block<V, G, 1, 1>(q + i0 * ldq, ldq, g + j0 * ldg, ldg, k, out + i0 * ldo + j0, ldo,
                            side);
  }
}

// Scores a float32 tile while widening the side run (n_side elements of dtype sdt at src into
// dst), spread evenly over the tile's k-steps; whatever is left (and the sub-vector tail) is
// converted at the end.
template <class V, int QR, int GR, class L>
void dot_tile_side(const float* q, int64_t ldq, int64_t mq, const float* g, int64_t ldg,
                   int64_t ng, int64_t k, float* out, int64_t ldo, const typename L::T* src,
                   int64_t n_side, float* dst) {
  const int64_t blocks = (mq / QR + mq % QR) * (ng / GR + ng % GR);
  const int64_t steps = std::max<int64_t>(1, blocks * (k / V::W));
  SideWiden<V, L> side{src, dst, n_side / V::W, (n_side / V::W + steps - 1) / steps, 0};
  dot_tile_typed<V, LoadF32<V>, QR, GR>(q, ldq, mq, g, ldg, ng, k, out, ldo, side);
  side.per_step = side.vectors;
  side.step();
  for (int64_t x = (n_side / V::W) * V::W; x < n_side; ++x) dst[x] = L::one(src + x);
}

// Calls f(Loader{}) with the store loader of dtype dt (one dispatch for every typed kernel).
template <class V, class F>
void with_loader(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat16: return f(LoadF16<V>{});
    case DType::kBFloat16: return f(LoadBF16<V>{});
    case DType::kFloat32: break;
  }
  f(LoadF32<V>{});
}

template <class V, int QR, int GR>
void dot_tile_impl(const float* q, int64_t ldq, int64_t mq, const void* g, DType dt, int64_t ldg,
                   int64_t ng, int64_t k, float* out, int64_t ldo, const void* side_src,
                   DType side_dt, int64_t n_side, float* side_dst) {
  if (n_side > 0) {  // the staged path: g is float32, the side run has the store's dtype
    return with_loader<V>(side_dt, [&](auto loader) {
      using L = decltype(loader);
      dot_tile_side<V, QR, GR, L>(q, ldq, mq, static_cast<const float*>(g), ldg, ng, k, out, ldo,
                                  static_cast<const typename L::T*>(side_src), n_side, side_dst);
    });
  }
  with_loader<V>(dt, [&](auto loader) {
    using L = decltype(loader);
    const auto* gt = static_cast<const typename L::T*>(g);
    if (mq <= QR) {  // one query block: prefetch ahead of its (first) sweep over the rows
      const int64_t bytes = ng * ldg * static_cast<int64_t>(sizeof(typename L::T));
      const int64_t blocks = ng / GR + ng % GR;
      // dot_block steps the side job once per whole vector of k (none for the tail).
      const int64_t steps = std::max<int64_t>(1, blocks * (k / V::W));
      const int64_t lines = (bytes + 63) / 64;
      const uintptr_t start =
          (reinterpret_cast<uintptr_t>(gt) + SidePrefetch::kAheadBytes) & ~uintptr_t{63};
      SidePrefetch pf{start, start + static_cast<uintptr_t>(lines) * 64, (lines + steps - 1) / steps};
      return dot_tile_typed<V, L, QR, GR>(q, ldq, mq, gt, ldg, ng, k, out, ldo, pf);
    }
    NoSide none;
    dot_tile_typed<V, L, QR, GR>(q, ldq, mq, gt, ldg, ng, k, out, ldo, none);
  });
}

// ---- axpy ------------------------------------------------------------------------------------
template <class V>
void axpy_impl(int64_t n, float a, const float* x, float* y) {
  constexpr int W = V::W;
  const typename V::reg av = V::set1(a);
  int64_t i = 0;
  for (; i + W <= n; i += W) V::store(y + i, V::fma(av, V::load(x + i), V::load(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// ---- sparse JL scatter ------------------------------------------------------------------------
// Rows of a batch are processed in lane groups of kLaneGroup (one 64-byte line of floats), stored
// transposed: xg[p * kLaneGroup + l] (input, already scaled) and yg[bucket * kLaneGroup + l]
// (output). Buckets are shared by the whole batch, so one bucket update is one full-line vector
// add, and a group's k x 16 outputs (e.g. 256 KB at k = 4096) stay in L2. Padding lanes hold
// zeros. Every lane sees the same ops in the same (p, r) order: results do not depend on the
// group, the thread split or the ISA.
constexpr int64_t kLaneGroup = 16;

template <class V>
void scatter_group_impl(const uint32_t* tab, int64_t s, int64_t pc, const float* xg, float* yg) {
  constexpr int W = V::W;
  static_assert(kLaneGroup % W == 0, "a lane group is a whole number of vectors");
  for (int64_t p = 0; p < pc; ++p) {
    const float* x = xg + p * kLaneGroup;
    typename V::reg xv[kLaneGroup / W];
    for (int v = 0; v < kLaneGroup / W; ++v) xv[v] = V::load(x + v * W);
    for (int64_t r = 0; r < s; ++r) {
      const uint32_t e = tab[r * pc + p];
      const uint32_t sign = e & 0x80000000u;
      float* y = yg + static_cast<int64_t>(e & 0x7FFFFFFFu) * kLaneGroup;
      for (int v = 0; v < kLaneGroup / W; ++v)
        V::store(y + v * W, V::add(V::load(y + v * W), V::xor_bits(xv[v], sign)));
    }
  }
}

// The bucket table of a block of pc input coordinates starting at col0: tab[r * pc + p] = bucket
// of replica r of coordinate col0 + p, with its sign in bit 31 (hash.h: sparse_bucket and
// sparse_sign of word(column_key(key, c), r)). Plain loops over p without cross-iteration
// dependences, so that each ISA file's compiler vectorises the 64-bit hash (AVX-512DQ multiplies
// 64-bit lanes natively); integer arithmetic, so every ISA builds the same table. ck: pc scratch.
static inline void sparse_table_impl(uint64_t key, int64_t col0, int64_t pc, int64_t s, int64_t k,
                                     uint64_t* ck, uint32_t* tab) {
  for (int64_t p = 0; p < pc; ++p) ck[p] = column_key(key, static_cast<uint64_t>(col0 + p));
  for (int64_t r = 0; r < s; ++r) {
    uint32_t* t = tab + r * pc;
    for (int64_t p = 0; p < pc; ++p) {
      const uint64_t h = hash_word(ck[p], static_cast<uint64_t>(r));
      // sparse_sign(h) is -1 exactly when bit 63 of h is set.
      t[p] = sparse_bucket(h, r, s, k) | (static_cast<uint32_t>(h >> 63) << 31);
    }
  }
}

// dst[p * kLaneGroup + l] = scale * rows[l][p] for p < pc, l < kLaneGroup (a lane-group
// transpose; rows[l] may point at zeros for padding lanes). Scalar version for any ISA.
static inline void pack_lanes_scalar(const float* const* rows, int64_t pc, float scale, float* dst) {
  for (int64_t l = 0; l < kLaneGroup; ++l)
    for (int64_t p = 0; p < pc; ++p) dst[p * kLaneGroup + l] = rows[l][p] * scale;
}

}  // namespace issl_fast::cpu
