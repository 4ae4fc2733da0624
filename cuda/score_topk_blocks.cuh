// Internal: the per-block top-k machinery of score_topk (score_topk.cu), shared by its scoring
// kernels and the sm_90a wgmma scorer (score_wgmma.cu): per-query candidate buffers in shared
// memory, their warp-level flush into the block's running list, shared bars, and the kernel
// parameters, and the launch-side check of score_pace. Included by .cu files of this folder.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "issl_fast/cuda_ops.h"

namespace issl_fast::topk {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Store rows per tile: 8 warps x 16 (or 4 x 32) rows; the unit of candidate processing.
constexpr int kRowsPerTile = 128;
// Tensor cores: the split query's k is padded to this (every config's k step divides it).
constexpr int kQPad = 64;
constexpr int kQParts = 3;  // bf16 terms of a float32 query
constexpr uint32_t kNoRow = 0xFFFFFFFFu;

// (av, ai) ranks before (bv, bi): higher value, or equal value and lower index.
__device__ __forceinline__ bool better(float av, long long ai, float bv, long long bi) {
  return av > bv || (av == bv && ai < bi);
}

// Per-query state of a block's running top-k, in shared memory.
template <int MQ, int CB>
struct TopkShared {
  float buf_v[MQ][CB];     // candidates not yet merged: value
  uint32_t buf_r[MQ][CB];  // ... and row offset inside the partition
  float thr_v[MQ];         // the block list's last entry (the bar a candidate must beat)
  long long thr_i[MQ];
  float bar_v[MQ];         // the best bar any block has published for the query (see TopkCtx)
  int cnt[MQ];             // candidates appended (may exceed CB: those did not fit)
};

// Shared bars: a block whose list holds topk real entries publishes its last value v to bars[q]
// (atomicMax on an order-preserving int), and every block drops scores below the best bar
// published. Safe: a score below v ranks after topk entries of one block, so it is in no
// top-k; ties with v are kept. It only skips work (late partitions see few candidates instead
// of each refilling its own list from -inf); the result stays the exact top-k.
__device__ __forceinline__ int order_key(float f) {
  const int i = __float_as_int(f);
  return i >= 0 ? i : i ^ 0x7FFFFFFF;
}
__device__ __forceinline__ float from_order_key(int k) {
  return __int_as_float(k >= 0 ? k : k ^ 0x7FFFFFFF);
}

struct TopkCtx {
  int* bars;       // bars of local query 0 (query ql at bars + ql)
  float* lv;       // this block's list of its local query 0; query ql at lv + ql * topk
  long long* li;
  int64_t topk;
  int64_t id_base;  // index_offset + first row of the partition
  const int64_t* exclude;  // exclude of local query 0 (row stride e), or null
  int64_t e;
  int q_valid;  // local queries < q_valid exist (qbase + ql < m)
};

__device__ __forceinline__ bool is_excluded(const TopkCtx& c, int ql, long long id) {
  if (c.e == 0) return false;
  const int64_t* ex = c.exclude + static_cast<int64_t>(ql) * c.e;
  for (int64_t x = 0; x < c.e; ++x)
    if (ex[x] == id) return true;
  return false;
}

// One warp merges query ql's candidate buffer into the block's list (sorted, topk long) in place,
// then raises the threshold and empties the buffer. Ranks in the merged order: a candidate B[j]
// goes to j + #{list entries ranking before or equal to it}, a list entry L[i] to
// i + #{candidates ranking strictly before it}; the ranks are distinct, entries past topk drop.
// List entries only move to higher positions, so moving them from the top down is safe.
template <int MQ, int CB>
__device__ void flush_query(TopkShared<MQ, CB>& ts, const TopkCtx& c, int ql, int lane) {
  static_assert(CB % 32 == 0 && (CB & (CB - 1)) == 0, "CB: a power of two, >= 32");
  const int n = ts.cnt[ql] < CB ? ts.cnt[ql] : CB;
  float* bv = ts.buf_v[ql];
  uint32_t* br = ts.buf_r[ql];
  for (int j = n + lane; j < CB; j += 32) {  // sentinels rank after every real candidate
    bv[j] = -INFINITY;
    br[j] = kNoRow;
  }
  __syncwarp();
  // Bitonic sort, best first.
  for (int size = 2; size <= CB; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int x = lane; x < CB / 2; x += 32) {
        const int i = 2 * x - (x & (stride - 1));
        const int j = i + stride;
        const float vi = bv[i], vj = bv[j];
        const uint32_t ri = br[i], rj = br[j];
        const bool j_first = vj > vi || (vj == vi && rj < ri);
        const bool i_first = vi > vj || (vi == vj && ri < rj);
        if ((i & size) == 0 ? j_first : i_first) {
          bv[i] = vj;
          bv[j] = vi;
          br[i] = rj;
          br[j] = ri;
        }
      }
      __syncwarp();
    }
  }
  float* Lv = c.lv + static_cast<int64_t>(ql) * c.topk;
  long long* Li = c.li + static_cast<int64_t>(ql) * c.topk;
  const int64_t topk = c.topk;
  constexpr int kPer = CB / 32;
  int64_t rb[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int j = lane + 32 * u;
    rb[u] = INT64_MAX;
    if (j < n) {
      const float v = bv[j];
      const long long id = c.id_base + br[j];
      int64_t lo = 0, hi = topk;  // #{i : L[i] ranks before or equals (v, id)}
      while (lo < hi) {
        const int64_t mid = (lo + hi) >> 1;
        const float lv = Lv[mid];
        const long long li = Li[mid];
        if (lv > v || (lv == v && li <= id)) lo = mid + 1; else hi = mid;
      }
      rb[u] = j + lo;
    }
  }
  const int64_t min_rank = __shfl_sync(0xFFFFFFFFu, rb[0], 0);  // the best candidate's rank
  if (min_rank < topk) {
    for (int64_t top = topk - 1; top >= min_rank; top -= 32) {
      const int64_t i = top - lane;
      const bool valid = i >= min_rank;
      float v = 0.0f;
      long long id = 0;
      int64_t r = 0;
      if (valid) {
        v = Lv[i];
        id = Li[i];
        int lo = 0, hi = n;  // #{j : B[j] ranks strictly before (v, id)}
        while (lo < hi) {
          const int mid = (lo + hi) >> 1;
          const float bm = bv[mid];
          const long long bi = c.id_base + br[mid];
          if (bm > v || (bm == v && bi < id)) lo = mid + 1; else hi = mid;
        }
        r = i + lo;
      }
      __syncwarp();  // every lane has read its entry before any lane overwrites
      if (valid && r != i && r < topk) {
        Lv[r] = v;
        Li[r] = id;
      }
      __syncwarp();
    }
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int j = lane + 32 * u;
      if (j < n && rb[u] < topk) {
        Lv[rb[u]] = bv[j];
        Li[rb[u]] = c.id_base + br[j];
      }
    }
    __syncwarp();
  }
  if (lane == 0) {
    const float last = Lv[topk - 1];
    ts.thr_v[ql] = last;
    ts.thr_i[ql] = Li[topk - 1];
    if (last > -INFINITY) {  // topk real entries: publish, and take the best bar so far
      const float prev = from_order_key(atomicMax(c.bars + ql, order_key(last)));
      ts.bar_v[ql] = prev > last ? prev : last;
    }
    ts.cnt[ql] = 0;
  }
  __syncwarp();
}

template <int MQ, int CB>
__device__ void init_block_lists(TopkShared<MQ, CB>& ts, const TopkCtx& c, int tid) {
  const int64_t total = static_cast<int64_t>(c.q_valid) * c.topk;
  for (int64_t idx = tid; idx < total; idx += kThreads) {
    c.lv[idx] = -INFINITY;
    c.li[idx] = -1;
  }
  for (int ql = tid; ql < MQ; ql += kThreads) {
    ts.thr_v[ql] = -INFINITY;
    ts.thr_i[ql] = -1;
    ts.bar_v[ql] = -INFINITY;
    ts.cnt[ql] = 0;
  }
  __syncthreads();
}

// After a tile: this thread's NS scores (value, row in tile, local query) compete for the lists.
// Block-uniform control flow (every thread reaches every barrier).
template <int MQ, int CB, int NS>
__device__ void process_tile(TopkShared<MQ, CB>& ts, const TopkCtx& c, const float (&sv)[NS],
                             const int (&srow)[NS], const int (&sq)[NS], int64_t tile_off,
                             int64_t part_rows, int lane, int warp) {
  static_assert(NS <= 32, "pending candidates are tracked in a 32-bit mask");
  uint32_t pend = 0;
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const int64_t off = tile_off + srow[s];
    if (off < part_rows && sq[s] < c.q_valid) {
      const long long id = c.id_base + off;
      if (sv[s] >= ts.bar_v[sq[s]] && better(sv[s], id, ts.thr_v[sq[s]], ts.thr_i[sq[s]]) &&
          !is_excluded(c, sq[s], id))
        pend |= 1u << s;
    }
  }
  while (true) {
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      if (pend & (1u << s)) {
        const int pos = atomicAdd(&ts.cnt[sq[s]], 1);
        if (pos < CB) {
          ts.buf_v[sq[s]][pos] = sv[s];
          ts.buf_r[sq[s]][pos] = static_cast<uint32_t>(tile_off + srow[s]);
          pend &= ~(1u << s);
        }
      }
    }
    if (!__syncthreads_or(pend != 0u)) break;  // all appended (and visible)
    for (int ql = warp; ql < MQ; ql += kWarps)
      if (ts.cnt[ql] >= CB) flush_query(ts, c, ql, lane);
    __syncthreads();
#pragma unroll
    for (int s = 0; s < NS; ++s) {  // the bar went up: some pending scores no longer qualify
      if ((pend & (1u << s)) &&
          (!(sv[s] >= ts.bar_v[sq[s]]) ||
           !better(sv[s], c.id_base + tile_off + srow[s], ts.thr_v[sq[s]], ts.thr_i[sq[s]])))
        pend &= ~(1u << s);
    }
  }
}

// Takes up bars other blocks published since (block-uniform call, before a barrier).
template <int MQ, int CB>
__device__ __forceinline__ void refresh_bars(TopkShared<MQ, CB>& ts, const TopkCtx& c, int tid) {
  if (tid < MQ && tid < c.q_valid) {
    const float b = from_order_key(*reinterpret_cast<volatile const int*>(c.bars + tid));
    if (b > ts.bar_v[tid]) ts.bar_v[tid] = b;
  }
}

template <int MQ, int CB>
__device__ void final_flush(TopkShared<MQ, CB>& ts, const TopkCtx& c, int lane, int warp) {
  __syncthreads();
  for (int ql = warp; ql < MQ; ql += kWarps)
    if (ts.cnt[ql] > 0) flush_query(ts, c, ql, lane);
}

struct ScoreParams {
  const float* Q;       // [m, k] float32
  const void* G;        // [n, k]
  const uint16_t* Qs;   // tensor cores: [3][mp][kq] bf16 terms of Q, zero padded
  int64_t m, n, k, topk, e, index_offset;
  const int64_t* exclude;
  float* lists_v;       // [partitions][m][topk]
  long long* lists_i;
  int* bars;            // [m] shared bars (order_key of a value)
  int64_t qblocks, partitions, mp, kq;
  int* progress;        // CudaVariant::kScorePace: [partitions][qblocks] tiles done, or null
  int pace_window;      // tiles a block may run ahead of its slowest sibling
};

template <int MQ, int CB>
__device__ __forceinline__ TopkCtx make_ctx(const ScoreParams& p, int64_t part, int64_t qbase,
                                            int64_t row_begin) {
  TopkCtx c;
  c.lv = p.lists_v + (part * p.m + qbase) * p.topk;
  c.li = p.lists_i + (part * p.m + qbase) * p.topk;
  c.topk = p.topk;
  c.id_base = p.index_offset + row_begin;
  c.exclude = p.e > 0 ? p.exclude + qbase * p.e : nullptr;
  c.e = p.e;
  c.q_valid = static_cast<int>(p.m - qbase < MQ ? p.m - qbase : MQ);
  c.bars = p.bars + qbase;
  return c;
}

// CudaVariant::kScorePace (experimental). The query blocks of one partition (adjacent block
// indices) read the same store rows; drifting apart, they make each row come from DRAM again
// (43% L2 hits at m = 1024 on an H200, run 7). After each tile, warp 0 publishes the block's
// finished tiles and, when it is more than pace_window tiles ahead of the slowest sibling it
// last saw, polls until it is not; the other warps wait at the block's next barrier. A hint,
// never a dependency: it runs only when the launch can hold the whole grid at once
// (pace_if_resident), a block gives up pacing after kPaceMaxPolls polls (~2-4 ms), and no
// result depends on it (the bars only ever skip rows that cannot reach the top-k).
constexpr int kPaceMaxPolls = 4096;
struct PaceState {
  bool on;      // still pacing
  int slowest;  // the slowest sibling's finished tiles, as last seen
};

// Polls (warp 0) until the slowest sibling is within `window` tiles of `mine`; returns its
// tiles, or INT_MIN after kPaceMaxPolls polls. Out of line: inlined, its registers made the
// 64-query tc_score_kernel configs spill on sm_80 even with pacing off.
static __device__ __noinline__ int pace_poll(const int* progress_row, int64_t qblocks,
                                             int mine, int window, int lane) {
  const volatile int* row = progress_row;
  for (int polls = 0; polls < kPaceMaxPolls; ++polls) {
    int slowest = mine;
    for (int64_t b = lane; b < qblocks; b += 32) slowest = min(slowest, row[b]);
    slowest = __reduce_min_sync(0xFFFFFFFFu, slowest);
    if (mine - slowest <= window) return slowest;
    __nanosleep(500);
  }
  return INT_MIN;
}

// After a finished tile (`tiles_done` so far; `last`: the partition's last tile, publish only).
__device__ __forceinline__ void pace_siblings(const ScoreParams& p, int64_t part, int64_t qblk,
                                              int64_t tiles_done, bool last, int warp, int lane,
                                              PaceState& ps) {
  if (!ps.on || warp != 0) return;
  int* row = p.progress + part * p.qblocks;
  const int mine = static_cast<int>(tiles_done);
  if (lane == 0) *static_cast<volatile int*>(row + qblk) = mine;
  if (last || mine - ps.slowest <= p.pace_window) return;
  ps.slowest = pace_poll(row, p.qblocks, mine, p.pace_window, lane);
  if (ps.slowest == INT_MIN) ps.on = false;
}

// The launch-side half: pacing stays on only if `kernel` (kThreads threads, `smem` bytes of
// dynamic shared memory, already allowed) can hold every block of the grid at once on this
// device; a block waiting on a sibling that cannot start would hold its SM for nothing.
template <class Kernel>
ScoreParams pace_if_resident(ScoreParams p, Kernel kernel, int64_t smem) {
  if (p.progress == nullptr) return p;
  int dev = 0, sms = 0, per_sm = 0;
  cuda::detail::check(cudaGetDevice(&dev), "cudaGetDevice");
  cuda::detail::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
                      "cudaDeviceGetAttribute(MultiProcessorCount)");
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                    static_cast<size_t>(smem)) != cudaSuccess) {
    (void)cudaGetLastError();
    per_sm = 0;
  }
  if (p.partitions * p.qblocks > static_cast<int64_t>(per_sm) * sms) {
    p.progress = nullptr;
  } else {
    note_cuda_variant_launch(CudaVariant::kScorePace);
  }
  return p;
}

// One launch of `unpaced`, or of `paced` when the plan asks for pacing (p.progress) and the
// paced kernel holds the whole grid at once (pace_if_resident); `args` after the parameters.
template <class Kernel, class... Args>
void launch_paced(Kernel unpaced, Kernel paced, int64_t smem, const ScoreParams& p,
                  int64_t blocks, cudaStream_t st, const char* name, const Args&... args) {
  ScoreParams q = p;
  if (q.progress != nullptr) {
    cuda::detail::allow_smem(paced, smem, name);
    q = pace_if_resident(q, paced, smem);
  }
  Kernel kernel = q.progress != nullptr ? paced : unpaced;
  cuda::detail::allow_smem(kernel, smem, name);
  kernel<<<cuda::detail::grid_1d(blocks, name), kThreads, smem, st>>>(q, args...);
  cuda::detail::check_launch(name);
}

}  // namespace issl_fast::topk
