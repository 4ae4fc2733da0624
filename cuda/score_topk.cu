// score_topk on the GPU: one pass over the store G with a fused per-query top-k.
//
// The rows [0, n) are cut into `partitions` contiguous ranges and the queries into blocks of MQ;
// one thread block scores one (partition, query block) pair, 128 rows x MQ queries per tile, and
// never writes a score to memory: after each tile every score that beats its query's current
// threshold (the block's own topk-th best so far) goes to a small per-query candidate buffer in
// shared memory; a full buffer is sorted and merged by one warp into the block's running list in
// the workspace (global memory, so topk may be anything), which raises the threshold. At the end,
// a tree of merges (up to 16 lists at a time in shared memory, pairwise for very large topk)
// combines the partitions' lists (and an earlier result when accumulating) into values/indices.
//
// Ordering is the total order (value desc, index asc) everywhere, and every merge is exact, so the
// result is the exact top-k of the scores whatever the partitioning or the order in which
// candidates reached a buffer (they are appended with shared-memory integer atomics, then sorted).
// A (query, row) score depends only on the kernel family: deterministic run to run. (The
// wgmma scorer, score_wgmma.cu, used on compute capability 9.0, is a family of its own.)
//
// Scores: bfloat16 stores use the tensor cores, the float32 query split into three bf16 terms
// whose sum is exactly the query (so each product is exact and accumulates in float32, three MMA
// passes; one pass when the caller says the queries are bfloat16 numbers, whose two lower terms
// are zero); float32 / float16 stores (and unaligned bf16 ones) use a float32 FMA kernel.
#include <algorithm>
#include <cmath>
#include <cfloat>
#include <climits>
#include <cstdint>
#include <utility>

#include "common.cuh"
#include "issl_fast/cuda_ops.h"
#include "score_topk_blocks.cuh"
#include "validate.h"
#if defined(ISSL_FAST_WITH_SM90A)
#include "score_wgmma.h"
#endif

namespace issl_fast {
namespace {

using namespace topk;  // the per-block top-k machinery shared with the sm_90a scorer

using cuda::detail::ceil_div;
using cuda::detail::cp_async16;
using cuda::detail::cp_async_commit;
using cuda::detail::cp_async_wait;
using cuda::detail::ldmatrix_x4;
using cuda::detail::mma_16816;
using cuda::detail::smem_u32;
using cuda::detail::to_f32;

// SIMT kernel: k columns per shared-memory chunk.
constexpr int kBK = 32;
// A partition gets at least this many rows (a few tiles), so its list setup and final flush
// stay small next to its streaming.
constexpr int64_t kMinRowsPerPartition = 4 * kRowsPerTile;
// Partitions' lists (values + indices of m x topk each) are capped at this many bytes in total.
constexpr int64_t kListBudgetBytes = int64_t{256} << 20;
// Row offsets inside a partition are kept as uint32 in the candidate buffers.
constexpr int64_t kMaxPartitionRows = int64_t{1} << 30;
// Thread blocks per SM the partitioning aims for: more blocks, more bytes in flight.
constexpr int64_t kCtasPerSm = 2;
constexpr int kMergeThreads = 128;
// The final merge takes up to kMaxFanIn lists at a time when they fit in kMergeSmemBytes of
// shared memory (topk <= 2048): a few launches instead of log2(partitions) pairwise ones, and
// its binary searches run in shared memory. Larger topk merges pairwise from global memory.
constexpr int kMaxFanIn = 16;
constexpr int64_t kMergeSmemBytes = 48 * 1024;
constexpr int kMergeManyThreads = 256;
constexpr int kElemThreads = 256;
// CudaVariant::kScorePrepass (experimental): about this many rows (whole tiles of each
// pre-partition) are scored first, and a pre-pass is planned only for stores at least
// kPrepassMinRatio times larger, with topk at most a quarter of the sample.
constexpr int64_t kPrepassRows = 32768;
constexpr int64_t kPrepassMinRatio = 8;
// CudaVariant::kScorePace (experimental): the rows between a partition's slowest and fastest
// query block, over all partitions, are kept under about a third of an H100/H200's 50 MB L2.
constexpr int64_t kPaceBytes = int64_t{16} << 20;
constexpr int64_t kPaceMaxWindow = 8;

// ---- tensor-core scoring (bfloat16 stores) -------------------------------------------------------
// Warp grid kWarpsM x kWarpsN, each warp kWM m16 tiles (store rows) x kWN n8 tiles (queries);
// BK k columns per pipeline stage, Stages stages of G and Q in flight (cp.async ring).
// QP bf16 terms per query: 3 for float32 queries, 1 when the queries are bfloat16 numbers.
template <int kWarpsM_, int kWarpsN_, int kWM_, int kWN_, int kCB_, int kBK_, int kStages_,
          int kQP_>
struct TcCfg {
  static constexpr int kWarpsM = kWarpsM_, kWarpsN = kWarpsN_, kWM = kWM_, kWN = kWN_;
  static constexpr int MQ = kWarpsN * kWN * 8;
  static constexpr int CB = kCB_;
  static constexpr int NS = kWM * kWN * 4;
  static constexpr int BK = kBK_, Stages = kStages_, QP = kQP_;
  // Shared-memory row pitch in bf16: +8 (16 bytes, an odd number of 16-byte units per row)
  // makes ldmatrix phases conflict-free.
  static constexpr int Pitch = BK + 8;
  static_assert(kWarpsM * kWarpsN == kWarps, "8 warps");
  static_assert(kWarpsM * kWM * 16 == kRowsPerTile, "128-row tiles");
  static_assert(kWN % 2 == 0, "query fragments load in pairs of n8 tiles");
  static_assert(BK % 16 == 0 && kQPad % BK == 0, "k steps of whole m16n8k16 steps");
  static_assert(Stages >= 2, "a ring of at least two stages");
  static_assert(QP == 1 || QP == kQParts, "one term, or the three of a float32 query");
};
// m <= 16: all warps along the rows (16 x 16 each); a larger buffer. Memory-bound, so the deepest
// ring that still fits 99 KB (sm_86/89; two blocks per SM on sm_90): 3 x 16 KB of G per block,
// and 64-column steps halve the barriers per byte.
using CfgSmall = TcCfg<8, 1, 1, 2, 128, 64, 3, kQParts>;
// m > 16: 64 queries per block, warps 32 rows x 32 queries; buffers of 32 keep it under 99 KB.
using CfgLarge = TcCfg<4, 2, 2, 4, 32, 32, 3, kQParts>;
// bfloat16 queries: one MMA pass; the smaller query tiles leave room for a deeper ring (small m)
// or 64-column steps (large m) within 99 KB.
using CfgSmall1 = TcCfg<8, 1, 1, 2, 128, 64, 4, 1>;
using CfgLarge1 = TcCfg<4, 2, 2, 4, 32, 64, 3, 1>;

template <class Cfg>
struct alignas(16) TcScoreSmem {
  uint16_t g[Cfg::Stages][kRowsPerTile][Cfg::Pitch];
  uint16_t q[Cfg::Stages][Cfg::QP][Cfg::MQ][Cfg::Pitch];
  TopkShared<Cfg::MQ, Cfg::CB> ts;
};

// kPace: compiled with CudaVariant::kScorePace's code (the default kernels are not).
template <class Cfg, bool kPace>
__global__ void __launch_bounds__(kThreads) tc_score_kernel(const ScoreParams p) {
  constexpr int MQ = Cfg::MQ, CB = Cfg::CB, NS = Cfg::NS, kWM = Cfg::kWM, kWN = Cfg::kWN;
  constexpr int BK = Cfg::BK, Stages = Cfg::Stages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  TcScoreSmem<Cfg>& sm = *reinterpret_cast<TcScoreSmem<Cfg>*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / Cfg::kWarpsN, warp_n = warp % Cfg::kWarpsN;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t qblk = blockIdx.x % p.qblocks, part = blockIdx.x / p.qblocks;
  const int64_t qbase = qblk * MQ;
  const int64_t row_begin = p.n * part / p.partitions;
  const int64_t row_end = p.n * (part + 1) / p.partitions;
  const int64_t part_rows = row_end - row_begin;
  const TopkCtx c = make_ctx<MQ, CB>(p, part, qbase, row_begin);
  init_block_lists(sm.ts, c, tid);
  PaceState pace{kPace && p.progress != nullptr, 0};  // CudaVariant::kScorePace

  // k steps per tile (kq / BK < 2^31 for any store row that fits in memory).
  const int nk = static_cast<int>(p.kq / BK);
  const int64_t total = ceil_div(part_rows, kRowsPerTile) * nk;
  const uint16_t* G = static_cast<const uint16_t*>(p.G);

  // The copy side walks (tile, k step, ring slot) with counters of its own: no 64-bit divisions
  // in the loop (they cost more than the MMAs of a memory-bound step).
  int64_t ld_r0 = row_begin;
  int ld_kc = 0, ld_stage = 0;
  auto issue_next = [&]() {
    const int64_t c0 = static_cast<int64_t>(ld_kc) * BK;
    constexpr int kChunksPerRow = BK / 8;
    constexpr int kGChunks = kRowsPerTile * kChunksPerRow;
    static_assert(kGChunks % kThreads == 0, "whole G chunks per thread");
#pragma unroll
    for (int u = 0; u < kGChunks / kThreads; ++u) {
      const int ch = tid + u * kThreads;
      const int row = ch / kChunksPerRow, col = (ch % kChunksPerRow) * 8;
      const int64_t grow = ld_r0 + row;
      const bool ok = grow < row_end && c0 + col < p.k;  // k % 8 == 0: chunks are all in or out
      cp_async16(smem_u32(&sm.g[ld_stage][row][col]), ok ? G + grow * p.k + c0 + col : G, ok);
    }
    constexpr int kQChunks = Cfg::QP * MQ * kChunksPerRow;
    constexpr int kQIters = (kQChunks + kThreads - 1) / kThreads;
#pragma unroll
    for (int u = 0; u < kQIters; ++u) {
      const int ch = tid + u * kThreads;
      if (ch < kQChunks) {
        const int qp = ch / (MQ * kChunksPerRow), rem = ch % (MQ * kChunksPerRow);
        const int qr = rem / kChunksPerRow, col = (rem % kChunksPerRow) * 8;
        cp_async16(smem_u32(&sm.q[ld_stage][qp][qr][col]),
                   p.Qs + (qp * p.mp + qbase + qr) * p.kq + c0 + col, true);
      }
    }
    if (++ld_kc == nk) {
      ld_kc = 0;
      ld_r0 += kRowsPerTile;
    }
    if (++ld_stage == Stages) ld_stage = 0;
  };

  float acc[kWM][kWN][4];
#pragma unroll
  for (int i = 0; i < kWM; ++i)
#pragma unroll
    for (int j = 0; j < kWN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < Stages - 1; ++s) {
    if (s < total) issue_next();
    cp_async_commit();  // always: keeps the group count in step with the iterations
  }
  int stage = 0, kc = 0;
  int64_t tile_off = 0;
  for (int64_t it = 0; it < total; ++it) {
    if (kc == 0) refresh_bars(sm.ts, c, tid);  // read by this tile's process_tile
    cp_async_wait<Stages - 2>();  // stage `it` landed (for this thread) ...
    __syncthreads();              // ... for every thread; stage it-1 is free again
    if (it + Stages - 1 < total) issue_next();
    cp_async_commit();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[kWM][4];
#pragma unroll
      for (int mt = 0; mt < kWM; ++mt)
        ldmatrix_x4(a[mt], smem_u32(&sm.g[stage][warp_m * kWM * 16 + mt * 16 + (lane & 15)]
                                         [kk + (lane >> 4) * 8]));
#pragma unroll
      for (int qp = 0; qp < Cfg::QP; ++qp) {
        uint32_t b[kWN][2];
#pragma unroll
        for (int np = 0; np < kWN / 2; ++np) {
          const int mat = lane >> 3, rr = lane & 7;
          uint32_t r[4];
          ldmatrix_x4(r, smem_u32(&sm.q[stage][qp][warp_n * kWN * 8 + np * 16 + (mat >> 1) * 8 + rr]
                                       [kk + (mat & 1) * 8]));
          b[2 * np][0] = r[0];
          b[2 * np][1] = r[1];
          b[2 * np + 1][0] = r[2];
          b[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int mt = 0; mt < kWM; ++mt)
#pragma unroll
          for (int nt = 0; nt < kWN; ++nt)
            mma_16816<__nv_bfloat16>(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
      }
    }
    if (++stage == Stages) stage = 0;
    if (++kc == nk) {  // the tile's scores are complete
      kc = 0;
      float sv[NS];
      int srow[NS], sq[NS];
#pragma unroll
      for (int mt = 0; mt < kWM; ++mt)
#pragma unroll
        for (int nt = 0; nt < kWN; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int s = (mt * kWN + nt) * 4 + e;
            sv[s] = acc[mt][nt][e];
            srow[s] = warp_m * kWM * 16 + mt * 16 + g + 8 * (e >> 1);
            sq[s] = warp_n * kWN * 8 + nt * 8 + 2 * t4 + (e & 1);
            acc[mt][nt][e] = 0.0f;
          }
      process_tile(sm.ts, c, sv, srow, sq, tile_off, part_rows, lane, warp);
      tile_off += kRowsPerTile;
      if constexpr (kPace)
        pace_siblings(p, part, qblk, tile_off / kRowsPerTile, tile_off >= part_rows, warp, lane,
                      pace);
    }
  }
  cp_async_wait<0>();
  final_flush(sm.ts, c, lane, warp);
}

// ---- SIMT scoring (float32 / float16 stores, unaligned bf16) ------------------------------------
constexpr int kSimtMQ = 16;   // 8 warps x 2 queries
constexpr int kSimtCB = 128;
constexpr int kSimtNS = 8;    // 4 rows x 2 queries per thread

struct SimtScoreSmem {
  float g[kRowsPerTile][kBK + 1];  // +1: lane-strided row reads are conflict-free
  float q[kSimtMQ][kBK + 1];
  TopkShared<kSimtMQ, kSimtCB> ts;
};

template <class GT, bool kPace>
__global__ void __launch_bounds__(kThreads) simt_score_kernel(const ScoreParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SimtScoreSmem& sm = *reinterpret_cast<SimtScoreSmem*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t qblk = blockIdx.x % p.qblocks, part = blockIdx.x / p.qblocks;
  const int64_t qbase = qblk * kSimtMQ;
  const int64_t row_begin = p.n * part / p.partitions;
  const int64_t row_end = p.n * (part + 1) / p.partitions;
  const int64_t part_rows = row_end - row_begin;
  const TopkCtx c = make_ctx<kSimtMQ, kSimtCB>(p, part, qbase, row_begin);
  init_block_lists(sm.ts, c, tid);
  PaceState pace{kPace && p.progress != nullptr, 0};  // CudaVariant::kScorePace
  const GT* G = static_cast<const GT*>(p.G);

  for (int64_t tile_off = 0; tile_off < part_rows; tile_off += kRowsPerTile) {
    const int64_t r0 = row_begin + tile_off;
    float acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = 0.0f;
    refresh_bars(sm.ts, c, tid);
    for (int64_t c0 = 0; c0 < p.k; c0 += kBK) {
      __syncthreads();  // the previous chunk's reads are done
#pragma unroll
      for (int u = 0; u < (kRowsPerTile * kBK) / kThreads; ++u) {
        const int idx = tid + u * kThreads;
        const int row = idx / kBK, col = idx % kBK;
        const int64_t grow = r0 + row, gc = c0 + col;
        sm.g[row][col] = (grow < row_end && gc < p.k) ? to_f32(G[grow * p.k + gc]) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < (kSimtMQ * kBK) / kThreads; ++u) {
        const int idx = tid + u * kThreads;
        const int qr = idx / kBK, col = idx % kBK;
        const int64_t q = qbase + qr, gc = c0 + col;
        sm.q[qr][col] = (q < p.m && gc < p.k) ? p.Q[q * p.k + gc] : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kBK; ++kk) {
        const float q0 = sm.q[2 * warp][kk], q1 = sm.q[2 * warp + 1][kk];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float gv = sm.g[lane + 32 * i][kk];
          acc[i][0] = fmaf(gv, q0, acc[i][0]);
          acc[i][1] = fmaf(gv, q1, acc[i][1]);
        }
      }
    }
    float sv[kSimtNS];
    int srow[kSimtNS], sq[kSimtNS];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int jq = 0; jq < 2; ++jq) {
        sv[i * 2 + jq] = acc[i][jq];
        srow[i * 2 + jq] = lane + 32 * i;
        sq[i * 2 + jq] = 2 * warp + jq;
      }
    process_tile(sm.ts, c, sv, srow, sq, tile_off, part_rows, lane, warp);
    if constexpr (kPace)
      pace_siblings(p, part, qblk, tile_off / kRowsPerTile + 1,
                    tile_off + kRowsPerTile >= part_rows, warp, lane, pace);
  }
  final_flush(sm.ts, c, lane, warp);
}

// ---- helpers ---------------------------------------------------------------------------------------
__global__ void split_queries_kernel(const float* __restrict__ Q, int64_t m, int64_t k, int64_t mp,
                                     int64_t kq, __nv_bfloat16* __restrict__ Qs) {
  const int64_t total = mp * kq;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t q = idx / kq, kk = idx % kq;
    const float v = (q < m && kk < k) ? Q[q * k + kk] : 0.0f;
    __nv_bfloat16 hi, mid, lo;
    cuda::detail::split3_bf16(v, hi, mid, lo);
    Qs[idx] = hi;
    Qs[total + idx] = mid;
    Qs[2 * total + idx] = lo;
  }
}

// dst list `pair` = the best topk of src lists 2 pair and 2 pair + 1 (or a copy of the first when
// it has no partner), for query q; lists are [list][m][topk].
__global__ void merge_lists_kernel(const float* __restrict__ src_v,
                                   const long long* __restrict__ src_i, int64_t nlists, int64_t m,
                                   int64_t topk, float* __restrict__ dst_v,
                                   long long* __restrict__ dst_i) {
  const int64_t q = blockIdx.x % m, pair = blockIdx.x / m;
  const float* xv = src_v + ((2 * pair) * m + q) * topk;
  const long long* xi = src_i + ((2 * pair) * m + q) * topk;
  float* ov = dst_v + (pair * m + q) * topk;
  long long* oi = dst_i + (pair * m + q) * topk;
  if (2 * pair + 1 >= nlists) {
    for (int64_t i = threadIdx.x; i < topk; i += blockDim.x) {
      ov[i] = xv[i];
      oi[i] = xi[i];
    }
    return;
  }
  const float* yv = src_v + ((2 * pair + 1) * m + q) * topk;
  const long long* yi = src_i + ((2 * pair + 1) * m + q) * topk;
  for (int64_t i = threadIdx.x; i < topk; i += blockDim.x) {  // X entries: ties go to X first
    const float v = xv[i];
    const long long id = xi[i];
    int64_t lo = 0, hi = topk;  // #{j : Y[j] strictly before X[i]}
    while (lo < hi) {
      const int64_t mid = (lo + hi) >> 1;
      if (better(yv[mid], yi[mid], v, id)) lo = mid + 1; else hi = mid;
    }
    const int64_t r = i + lo;
    if (r < topk) {
      ov[r] = v;
      oi[r] = id;
    }
  }
  for (int64_t j = threadIdx.x; j < topk; j += blockDim.x) {
    const float v = yv[j];
    const long long id = yi[j];
    int64_t lo = 0, hi = topk;  // #{i : X[i] before or equal to Y[j]}
    while (lo < hi) {
      const int64_t mid = (lo + hi) >> 1;
      if (!better(v, id, xv[mid], xi[mid])) lo = mid + 1; else hi = mid;
    }
    const int64_t r = j + lo;
    if (r < topk) {
      ov[r] = v;
      oi[r] = id;
    }
  }
}

// dst list `grp` = the best topk of src lists [grp fan_in, grp fan_in + fan_in) (those < nlists)
// for query q, staged in shared memory. An entry's rank in the merged order is its position in
// its own list plus, for every other list, the entries ranking before it: before or equal in a
// lower list (exact ties keep list order, as in the pairwise merge), strictly before in a higher
// one. The ranks are distinct; those below topk are written, so every output slot is filled.
__global__ void __launch_bounds__(kMergeManyThreads) merge_many_kernel(
    const float* __restrict__ src_v, const long long* __restrict__ src_i, int64_t nlists,
    int64_t m, int topk, int fan_in, float* __restrict__ dst_v, long long* __restrict__ dst_i) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  long long* si = reinterpret_cast<long long*>(smem_raw);
  float* sv = reinterpret_cast<float*>(si + fan_in * topk);
  const int64_t q = blockIdx.x % m, grp = blockIdx.x / m;
  const int64_t first = grp * fan_in;
  const int cnt = static_cast<int>(nlists - first < fan_in ? nlists - first : fan_in);
  const int total = cnt * topk;
  for (int e = threadIdx.x; e < total; e += kMergeManyThreads) {
    const int l = e / topk;
    const int64_t src = ((first + l) * m + q) * topk + (e - l * topk);
    sv[e] = src_v[src];
    si[e] = src_i[src];
  }
  __syncthreads();
  float* ov = dst_v + (grp * m + q) * topk;
  long long* oi = dst_i + (grp * m + q) * topk;
  for (int e = threadIdx.x; e < total; e += kMergeManyThreads) {
    const int l = e / topk;
    const float v = sv[e];
    const long long id = si[e];
    int rank = e - l * topk;
    for (int l2 = 0; l2 < cnt && rank < topk; ++l2) {
      if (l2 == l) continue;
      const float* yv = sv + l2 * topk;
      const long long* yi = si + l2 * topk;
      int lo = 0, hi = topk;
      if (l2 < l) {  // #{y before or equal to (v, id)}
        while (lo < hi) {
          const int mid = (lo + hi) >> 1;
          if (!better(v, id, yv[mid], yi[mid])) lo = mid + 1; else hi = mid;
        }
      } else {  // #{y strictly before (v, id)}
        while (lo < hi) {
          const int mid = (lo + hi) >> 1;
          if (better(yv[mid], yi[mid], v, id)) lo = mid + 1; else hi = mid;
        }
      }
      rank += lo;
    }
    if (rank < topk) {
      ov[rank] = v;
      oi[rank] = id;
    }
  }
}

int merge_fan_in(int64_t topk) {
  const int64_t fit = kMergeSmemBytes / (topk * 12);
  return static_cast<int>(fit < kMaxFanIn ? fit : kMaxFanIn);  // < 2: pairwise from global
}

// CudaVariant::kScorePrepass. Why: every block refills its own lists from -inf, and the shared
// bars (the best k-th value any block has published) rise no faster than one block's own, since
// all blocks start together; on an H200 the 64-query scorer spent most of its time merging
// candidates (ncu: tensor pipe 10%, DRAM 36%; a simulation of the bars gives ~17 flushes per query
// per block). The k-th best value of the pre-pass's union of lists (~32K rows) is a far higher
// bar from the first tile on: the same simulation gives ~1-2 flushes per query per block.
//
// bars[q] = max(bars[q], the topk-th best value of the union of lists 0 .. nlists - 1 of query
// q) when the union holds topk real entries: the largest order key K with #{entries with key
// >= K} >= topk, by bisection (each list is sorted best first, so its count is a binary search).
// Safe as a bar: topk distinct rows score at least from_order_key(K), so a lower score is in no
// top-k. One block per query.
__global__ void __launch_bounds__(kElemThreads) prepass_bars_kernel(
    const float* __restrict__ lv, int64_t nlists, int64_t m, int64_t topk,
    int* __restrict__ bars) {
  __shared__ long long partial[kElemThreads / 32];
  __shared__ long long total;
  const int64_t q = blockIdx.x;
  auto count_at_least = [&](int key) -> long long {  // block-uniform
    long long c = 0;
    for (int64_t l = threadIdx.x; l < nlists; l += kElemThreads) {
      const float* L = lv + (l * m + q) * topk;
      int64_t lo = 0, hi = topk;  // #{i : key(L[i]) >= key}, a prefix of the list
      while (lo < hi) {
        const int64_t mid = (lo + hi) >> 1;
        if (order_key(L[mid]) >= key) lo = mid + 1; else hi = mid;
      }
      c += lo;
    }
    for (int o = 16; o > 0; o >>= 1) c += __shfl_down_sync(0xFFFFFFFFu, c, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
      long long t = 0;
      for (int w = 0; w < kElemThreads / 32; ++w) t += partial[w];
      total = t;
    }
    __syncthreads();
    const long long t = total;
    __syncthreads();  // partial and total are rewritten by the next call
    return t;
  };
  int lo = order_key(-FLT_MAX);  // the lowest finite value: -inf padding is not an entry
  if (count_at_least(lo) < topk) return;
  int hi = order_key(INFINITY);
  while (lo < hi) {  // count(lo) >= topk throughout; the largest such key
    const int mid = static_cast<int>(lo + (static_cast<long long>(hi) - lo + 1) / 2);
    if (count_at_least(mid) >= topk) lo = mid; else hi = mid - 1;
  }
  if (threadIdx.x == 0) atomicMax(bars + q, lo);
}

__global__ void init_bars_kernel(int* __restrict__ bars, int64_t m) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < m; x += stride)
    bars[x] = order_key(-INFINITY);
}

__global__ void fill_empty_kernel(float* __restrict__ v, long long* __restrict__ i, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < n; x += stride) {
    v[x] = -INFINITY;
    i[x] = -1;
  }
}

// ---- plan ----------------------------------------------------------------------------------------
CudaTopkPlan make_plan(int64_t m, const void* G, DType dtype, int64_t n, int64_t k, int64_t topk,
                       int num_sms, CudaAlgo algo) {
  cuda::detail::require(num_sms >= 1, "num_sms must be >= 1");
  const bool aligned = (reinterpret_cast<std::uintptr_t>(G) & 15u) == 0;
  const bool tc_ok = dtype == DType::kBFloat16 && k % 8 == 0 && aligned;
  CudaTopkPlan p;
  if (algo == CudaAlgo::kTensorCore) {
    cuda::detail::require(tc_ok, "score_topk: the tensor-core path needs a bfloat16 store "
                                     "with k % 8 == 0 and a 16-byte aligned address");
    p.tensor_cores = true;
  } else {
    cuda::detail::require(algo == CudaAlgo::kAuto || algo == CudaAlgo::kSimt,
                              "algo must be 0 (auto), 1 (simt) or 2 (tensor cores)");
    p.tensor_cores = algo == CudaAlgo::kAuto && tc_ok;
  }
  p.queries_per_block = p.tensor_cores ? (m <= CfgSmall::MQ ? CfgSmall::MQ : CfgLarge::MQ) : kSimtMQ;
  p.query_blocks = ceil_div(std::max<int64_t>(m, 1), p.queries_per_block);
  p.rows_per_tile = kRowsPerTile;
  int64_t parts = std::max<int64_t>(1, num_sms * kCtasPerSm / p.query_blocks);
  parts = std::min(parts, std::max<int64_t>(1, ceil_div(n, kMinRowsPerPartition)));
  const int64_t list_bytes = std::max<int64_t>(1, m * topk * 12);
  parts = std::min(parts, std::max<int64_t>(1, kListBudgetBytes / list_bytes));
  parts = std::max(parts, ceil_div(n, kMaxPartitionRows));
  p.partitions = parts;
  if (cuda_variant_on(CudaVariant::kScorePrepass)) {
    // One pre-partition per SM and query block (the pre-pass fills the GPU once), whole tiles.
    const int64_t pre = std::max<int64_t>(1, std::min<int64_t>(parts, num_sms / p.query_blocks));
    const int64_t rows = ceil_div(kPrepassRows, pre * kRowsPerTile) * pre * kRowsPerTile;
    if (n >= kPrepassMinRatio * rows && topk * 4 <= rows &&
        (pre + parts) * list_bytes <= kListBudgetBytes) {
      p.pre_partitions = pre;
      p.pre_rows = rows;
    }
  }
  if (cuda_variant_on(CudaVariant::kScorePace) && p.query_blocks > 1) {
    const int64_t tile_bytes = kRowsPerTile * k * cuda::detail::elem_size(dtype);
    p.pace_window = std::clamp<int64_t>(kPaceBytes / (parts * tile_bytes), 1, kPaceMaxWindow);
  }
  return p;
}

struct TopkWs {
  float* av;
  long long* ai;
  float* bv;
  long long* bi;
  __nv_bfloat16* qs;
  int* bars;
  int* progress;  // CudaVariant::kScorePace: [partitions][query_blocks], or null
};

template <class Alloc>
TopkWs layout(Alloc& a, const CudaTopkPlan& pl, int64_t m, int64_t k, int64_t topk,
              bool accumulate) {
  const int64_t lists = pl.pre_partitions + pl.partitions + (accumulate ? 1 : 0);
  const int64_t per = m * topk;
  TopkWs w;
  w.av = a.template take<float>(lists * per);
  w.ai = a.template take<long long>(lists * per);
  const int64_t second = lists > 2 ? ceil_div(lists, 2) : 0;  // ping-pong half for the merge tree
  w.bv = a.template take<float>(second * per);
  w.bi = a.template take<long long>(second * per);
  w.bars = a.template take<int>(m);
  w.progress = nullptr;
  if (pl.pace_window > 0) w.progress = a.template take<int>(pl.partitions * pl.query_blocks);
  w.qs = nullptr;
  if (pl.tensor_cores)
    w.qs = a.template take<__nv_bfloat16>(kQParts * pl.query_blocks * pl.queries_per_block *
                                          cuda::detail::round_up(k, kQPad));
  return w;
}

void validate(int64_t m, DType dtype, int64_t n, int64_t k, int64_t topk, int64_t e,
              int64_t index_offset, int num_sms) {
  using namespace cuda::detail;
  require_dtype(dtype);
  require_nonneg(m, "m");
  require_nonneg(n, "n");
  require_pos(k, "k");
  require_pos(topk, "topk");
  require_nonneg(e, "e");
  require_nonneg(index_offset, "index_offset");
  require_pos(num_sms, "num_sms");
}

template <class Cfg>
void launch_tc(const ScoreParams& prm, cudaStream_t st, const char* name) {
  launch_paced(tc_score_kernel<Cfg, false>, tc_score_kernel<Cfg, true>,
               sizeof(TcScoreSmem<Cfg>), prm, prm.partitions * prm.qblocks, st, name);
}

template <class GT>
void launch_simt(const ScoreParams& prm, cudaStream_t st) {
  launch_paced(simt_score_kernel<GT, false>, simt_score_kernel<GT, true>,
               sizeof(SimtScoreSmem), prm, prm.partitions * prm.qblocks, st,
               "simt_score_kernel");
}

// Scores rows [0, prm.n) of prm.G in prm.partitions partitions into prm's lists, with the
// kernel family the plan and the device choose.
void launch_scorer(const CudaTopkPlan& pl, const ScoreParams& prm, DType dtype, bool query_bf16,
                   cudaStream_t st) {
  if (pl.tensor_cores) {
    static_assert(CfgSmall::MQ == CfgSmall1::MQ && CfgLarge::MQ == CfgLarge1::MQ, "same plans");
    const bool small = pl.queries_per_block == CfgSmall::MQ;
#if defined(ISSL_FAST_WITH_SM90A)
    static_assert(CfgLarge::MQ == kWgmmaScoreMQ && CfgSmall::MQ == kWgmmaScoreSmallMQ &&
                      CfgLarge::CB == 32 && CfgSmall::CB == 128,
                  "the wgmma scorer takes the same blocks and candidate buffers");
    if (score_wgmma_usable()) {
      launch_score_wgmma(prm, static_cast<int>(pl.queries_per_block),
                         prm.partitions * prm.qblocks, query_bf16, st);
      return;
    }
#endif
    if (query_bf16 && small)
      launch_tc<CfgSmall1>(prm, st, "tc_score_kernel<16, bf16 query>");
    else if (query_bf16)
      launch_tc<CfgLarge1>(prm, st, "tc_score_kernel<64, bf16 query>");
    else if (small)
      launch_tc<CfgSmall>(prm, st, "tc_score_kernel<16>");
    else
      launch_tc<CfgLarge>(prm, st, "tc_score_kernel<64>");
    return;
  }
  switch (dtype) {
    case DType::kFloat32: launch_simt<float>(prm, st); break;
    case DType::kFloat16: launch_simt<__half>(prm, st); break;
    case DType::kBFloat16: launch_simt<__nv_bfloat16>(prm, st); break;
  }
}

}  // namespace

CudaTopkPlan score_topk_cuda_plan(int64_t m, const void* G, DType dtype, int64_t n, int64_t k,
                                  int64_t topk, int num_sms, CudaAlgo algo) {
  validate(m, dtype, n, k, topk, 0, 0, num_sms);
  return make_plan(m, G, dtype, n, k, topk, num_sms, algo);
}

int64_t score_topk_cuda_workspace(int64_t m, const void* G, DType dtype, int64_t n, int64_t k,
                                  int64_t topk, bool accumulate, int num_sms, CudaAlgo algo) {
  validate(m, dtype, n, k, topk, 0, 0, num_sms);
  if (m == 0 || n == 0) return 0;
  const CudaTopkPlan pl = make_plan(m, G, dtype, n, k, topk, num_sms, algo);
  cuda::detail::Sizer sz;
  layout(sz, pl, m, k, topk, accumulate);
  return sz.bytes();
}

void score_topk_cuda(const float* Q, int64_t m, const void* G, DType dtype, int64_t n, int64_t k,
                     int64_t topk, const int64_t* exclude, int64_t e, int64_t index_offset,
                     float* values, int64_t* indices, bool accumulate, void* ws, int64_t ws_bytes,
                     int num_sms, CudaAlgo algo, std::uintptr_t stream, bool query_bf16) {
  validate(m, dtype, n, k, topk, e, index_offset, num_sms);
  using cuda::detail::require_ptr;
  require_ptr(Q, m * k, "Q");
  require_ptr(G, n * k, "G");
  require_ptr(exclude, m * e, "exclude");
  require_ptr(values, m * topk, "values");
  require_ptr(indices, m * topk, "indices");
  if (m == 0) return;
  cudaStream_t st = cuda::detail::as_stream(stream);
  long long* out_i = reinterpret_cast<long long*>(indices);
  const int64_t per = m * topk;
  if (n == 0) {  // no candidates: an earlier result stays as it is
    if (!accumulate) {
      fill_empty_kernel<<<cuda::detail::grid_stride_blocks(per, kElemThreads), kElemThreads, 0, st>>>(
          values, out_i, per);
      cuda::detail::check_launch("fill_empty_kernel launch");
    }
    return;
  }
  const CudaTopkPlan pl = make_plan(m, G, dtype, n, k, topk, num_sms, algo);
  cuda::detail::Carver cv(ws, ws_bytes);
  const TopkWs w = layout(cv, pl, m, k, topk, accumulate);

  ScoreParams prm{};
  prm.Q = Q;
  prm.G = G;
  prm.m = m;
  prm.n = n;
  prm.k = k;
  prm.topk = topk;
  prm.e = e;
  prm.index_offset = index_offset;
  prm.exclude = exclude;
  prm.lists_v = w.av;
  prm.lists_i = w.ai;
  prm.bars = w.bars;
  init_bars_kernel<<<cuda::detail::grid_stride_blocks(m, kElemThreads), kElemThreads, 0, st>>>(
      w.bars, m);
  cuda::detail::check_launch("init_bars_kernel launch");
  prm.qblocks = pl.query_blocks;
  prm.partitions = pl.partitions;
  prm.progress = nullptr;  // the main pass only (below)
  prm.pace_window = static_cast<int>(pl.pace_window);
  if (pl.tensor_cores) {
    prm.mp = pl.query_blocks * pl.queries_per_block;
    prm.kq = cuda::detail::round_up(k, kQPad);
    prm.Qs = reinterpret_cast<const uint16_t*>(w.qs);
    split_queries_kernel<<<cuda::detail::grid_stride_blocks(prm.mp * prm.kq, kElemThreads),
                           kElemThreads, 0, st>>>(Q, m, k, prm.mp, prm.kq, w.qs);
    cuda::detail::check_launch("split_queries_kernel launch");
  } else {
    prm.mp = prm.kq = 0;
    prm.Qs = nullptr;
  }
  if (pl.pre_partitions > 0) {
    // Pre-pass: rows [0, pre_rows) into the first pre_partitions lists; their union's k-th best
    // value becomes each query's bar; then rows [pre_rows, n) into the lists after them.
    ScoreParams pre = prm;
    pre.n = pl.pre_rows;
    pre.partitions = pl.pre_partitions;
    launch_scorer(pl, pre, dtype, query_bf16, st);
    prepass_bars_kernel<<<cuda::detail::grid_1d(m, "prepass_bars_kernel"), kElemThreads, 0, st>>>(
        w.av, pl.pre_partitions, m, topk, w.bars);
    cuda::detail::check_launch("prepass_bars_kernel launch");
    note_cuda_variant_launch(CudaVariant::kScorePrepass);
    prm.G = static_cast<const char*>(G) + pl.pre_rows * k * cuda::detail::elem_size(dtype);
    prm.n = n - pl.pre_rows;
    prm.index_offset = index_offset + pl.pre_rows;
    prm.lists_v = w.av + pl.pre_partitions * per;
    prm.lists_i = w.ai + pl.pre_partitions * per;
  }
  if (w.progress != nullptr) {
    cuda::detail::check(cudaMemsetAsync(w.progress, 0,
                                        pl.partitions * pl.query_blocks * sizeof(int), st),
                        "cudaMemsetAsync(progress)");
    prm.progress = w.progress;  // if the launch can hold the whole grid (pace_if_resident)
  }
  launch_scorer(pl, prm, dtype, query_bf16, st);

  // Merge the partitions' lists (and the earlier result) pairwise until one is left.
  int64_t lists = pl.pre_partitions + pl.partitions;
  if (accumulate) {
    cuda::detail::check(cudaMemcpyAsync(w.av + lists * per, values, per * sizeof(float),
                                        cudaMemcpyDeviceToDevice, st),
                        "cudaMemcpyAsync(values)");
    cuda::detail::check(cudaMemcpyAsync(w.ai + lists * per, indices, per * sizeof(long long),
                                        cudaMemcpyDeviceToDevice, st),
                        "cudaMemcpyAsync(indices)");
    ++lists;
  }
  float* src_v = w.av;
  long long* src_i = w.ai;
  float* oth_v = w.bv;
  long long* oth_i = w.bi;
  const int fan_in = merge_fan_in(topk);
  while (true) {
    const int64_t groups = ceil_div(lists, fan_in >= 2 ? fan_in : 2);
    const bool last = groups == 1;
    float* dv = last ? values : oth_v;
    long long* di = last ? out_i : oth_i;
    if (fan_in >= 2) {
      const int64_t smem = static_cast<int64_t>(fan_in) * topk * 12;
      merge_many_kernel<<<cuda::detail::grid_1d(groups * m, "merge_many_kernel"),
                          kMergeManyThreads, smem, st>>>(src_v, src_i, lists, m,
                                                         static_cast<int>(topk), fan_in, dv, di);
      cuda::detail::check_launch("merge_many_kernel launch");
    } else {
      merge_lists_kernel<<<cuda::detail::grid_1d(groups * m, "merge_lists_kernel"),
                           kMergeThreads, 0, st>>>(src_v, src_i, lists, m, topk, dv, di);
      cuda::detail::check_launch("merge_lists_kernel launch");
    }
    if (last) break;
    lists = groups;
    std::swap(src_v, oth_v);
    std::swap(src_i, oth_i);
  }
}

}  // namespace issl_fast
