// score_topk's tensor-core scoring on Hopper's warpgroup MMA (sm_90a; kernel variant
// CudaVariant::kScoreWgmma, on by default: 1.0-1.18x tc_score_kernel on an H200, run 5). Same contract and top-k machinery as tc_score_kernel in
// score_topk.cu (score_topk_blocks.cuh); only how a tile's scores are computed differs.
//
// Why: for 64-query blocks the mma.sync scorer is compute-bound (m = 64: 22% / 30% of the copy
// bandwidth with float32 / bfloat16 queries on an H200; m = 1024: 11% / 20% of the bf16 mm rate),
// and for 16-query blocks its warps spend their shared-memory bandwidth on ldmatrix of the query
// terms (m = 1, 16: 69-77% / 56-62% of copy). wgmma reads both operands from shared memory and
// runs asynchronously, with no ldmatrix or fragment traffic in the issuing warps.
//
// Block: 2 warpgroups (256 threads, like the other scorers) x 128 store rows (64 per warpgroup:
// wgmma M) x MQ = 64 or 16 queries (wgmma N), 64-column k steps. G rows and the bf16 query terms
// stream through one cp.async ring of 128-byte-swizzled K-major tiles (16 KB of G and MQ x 128
// bytes per query term per step). Per step: barrier; copies of step s + 2 into the slot step s - 2 used; 4 k16
// slices x QP terms of wgmma m64nMQk16 committed as one group; wait until only that group is in
// flight. The last step of a tile waits for its group and hands the MQ / 2 scores per thread to
// process_tile. Accumulation order per score: k16 slices in increasing k, the QP terms of a slice
// in order (as in tc_score_kernel), so bfloat16 queries give the same scores in one pass as in
// three (the lower terms are zero).
#include <algorithm>

#include "common.cuh"
#include "issl_fast/cuda_ops.h"
#include "score_topk_blocks.cuh"
#include "score_wgmma.h"
#include "wgmma.cuh"

namespace issl_fast::topk {
namespace {

using cuda::detail::ceil_div;
using cuda::detail::cp_async16;
using cuda::detail::cp_async_commit;
using cuda::detail::cp_async_wait;
using cuda::detail::fence_proxy_async;
using cuda::detail::fence_reg;
using cuda::detail::kmajor_sw128_desc;
using cuda::detail::smem_u32;
using cuda::detail::sw128_offset;
using cuda::detail::wgmma_commit;
using cuda::detail::wgmma_fence;
using cuda::detail::wgmma_ss;
using cuda::detail::wgmma_wait;

constexpr int kSwBK = 64;      // k columns per step: one 128-byte swizzle row
// Ring slots: step s computing, s - 1 draining, s + 1 (and s + 2 with four slots) copying. Four,
// except for 64-query blocks with one query term, where three keep the block under half of
// sm_90's 227 KB, so two blocks share an SM as the plan assumes (the same bytes in flight per SM,
// twice the warps); with three terms one block per SM fits either way.
template <int MQ, int QP>
constexpr int sw_stages() {
  return MQ == 64 && QP == 1 ? 3 : 4;
}
constexpr int kRowBytes = kSwBK * 2;
// Experimental (CudaVariant::kScoreDeepRing): as many slots as sm_90's 227 KB per block holds
// (one block per SM; 8-11 slots with bf16 queries). Why: on an H200 the scorer moved about
// (G bytes in flight per SM) / 3 us; the 64-query blocks with 3 slots keep 2 x 16 KB of G in
// flight per SM (1.3 TB/s measured), the 16-query ones 4 x 16 KB (3.2 TB/s), against ~95 KB needed
// for the copy rate. Deep rings keep 96-160 KB in flight with bf16 queries; the plan's partitions
// (sized for two blocks per SM) then run in two waves.
constexpr int64_t kSmemOptin = 232448;  // sm_90: 227 KB of dynamic shared memory per block
template <int MQ, int CB, int QP>
constexpr int deep_stages() {
  constexpr int64_t slot = kRowsPerTile * kRowBytes + QP * MQ * kRowBytes;
  return static_cast<int>((kSmemOptin - 1024 - 64 - sizeof(TopkShared<MQ, CB>)) / slot);
}
static_assert(kThreads == 256 && kRowsPerTile == 128, "two warpgroups of 64 store rows");
static_assert(kQPad % kSwBK == 0, "the padded query k is whole steps");

// MQ queries per block (the plan's 16- or 64-query blocks), CB candidates buffered per query
// (as tc_score_kernel's configs of the same MQ), QP bf16 terms per query.
template <int MQ, int CB, int QP, int S>
struct SwSmem {
  static constexpr int kStages = S;
  unsigned char g[kStages][kRowsPerTile * kRowBytes];  // 16 KB per slot, 1024-aligned
  unsigned char q[kStages][QP][MQ * kRowBytes];        // 2 or 8 KB per term per slot
  TopkShared<MQ, CB> ts;
};
template <int MQ, int CB, int QP, int S>
constexpr int64_t sw_smem_bytes() {
  return static_cast<int64_t>(sizeof(SwSmem<MQ, CB, QP, S>)) + 1024;  // + alignment slack
}

template <int MQ, int CB, int QP, int S>
__global__ void __launch_bounds__(kThreads, 1) wgmma_score_kernel(const ScoreParams p) {
#if ISSL_WGMMA_DEVICE
  static_assert(MQ == 16 || MQ == 64, "wgmma N of 16 or 64");
  static_assert(S >= 3, "slots: computing, draining, copying");
  constexpr int kSwStages = S;
  constexpr int kNS = MQ / 2;  // scores per thread per tile (m64nMQ float32 accumulators)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  auto& sm = *reinterpret_cast<SwSmem<MQ, CB, QP, S>*>(smem_raw + (((raw + 1023u) & ~1023u) - raw));
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t qblk = blockIdx.x % p.qblocks, part = blockIdx.x / p.qblocks;
  const int64_t qbase = qblk * MQ;
  const int64_t row_begin = p.n * part / p.partitions;
  const int64_t row_end = p.n * (part + 1) / p.partitions;
  const int64_t part_rows = row_end - row_begin;
  const TopkCtx c = make_ctx<MQ, CB>(p, part, qbase, row_begin);
  init_block_lists(sm.ts, c, tid);

  const int nk = static_cast<int>(p.kq / kSwBK);
  const int64_t total = ceil_div(part_rows, kRowsPerTile) * nk;
  const uint16_t* G = static_cast<const uint16_t*>(p.G);

  // Copy side: (tile, k step) counters of its own, as in tc_score_kernel.
  int64_t ld_r0 = row_begin;
  int ld_kc = 0;
  auto issue = [&](int slot) {
    const int64_t c0 = static_cast<int64_t>(ld_kc) * kSwBK;
    const uint32_t gbase = smem_u32(&sm.g[slot][0]);
#pragma unroll
    for (int u = 0; u < kRowsPerTile * 8 / kThreads; ++u) {  // 1024 chunks of 16 bytes
      const int ch = tid + u * kThreads;
      const int row = ch >> 3, cc = ch & 7;
      const int64_t grow = ld_r0 + row;
      const bool ok = grow < row_end && c0 + cc * 8 < p.k;  // k % 8 == 0: whole chunks
      cp_async16(gbase + sw128_offset(row, cc),
                 ok ? G + grow * p.k + c0 + cc * 8 : G, ok);
    }
#pragma unroll
    for (int u = 0; u < (QP * MQ * 8 + kThreads - 1) / kThreads; ++u) {  // query terms
      const int ch = tid + u * kThreads;
      if (ch >= QP * MQ * 8) break;
      const int qp = ch / (MQ * 8), rem = ch % (MQ * 8);
      const int qr = rem >> 3, cc = rem & 7;
      cp_async16(smem_u32(&sm.q[slot][qp][0]) + sw128_offset(qr, cc),
                 p.Qs + (qp * p.mp + qbase + qr) * p.kq + c0 + cc * 8, true);
    }
    if (++ld_kc == nk) {
      ld_kc = 0;
      ld_r0 += kRowsPerTile;
    }
  };

  float acc[kNS];
#pragma unroll
  for (int i = 0; i < kNS; ++i) acc[i] = 0.0f;
  bool fresh = true;  // the next wgmma starts a new tile (scale-d = 0)

#pragma unroll
  for (int s = 0; s < kSwStages - 2; ++s) {
    if (s < total) issue(s);
    cp_async_commit();  // always: keeps the group count in step with the iterations
  }
  int slot = 0, kc = 0;
  int64_t tile_off = 0;
  for (int64_t it = 0; it < total; ++it) {
    if (kc == 0) refresh_bars(sm.ts, c, tid);  // read by this tile's process_tile
    cp_async_wait<kSwStages - 3>();  // step `it` landed (this thread's copies)
    fence_proxy_async();
    __syncthreads();  // ... for every thread; every warpgroup is done with step it - 2
    if (it + kSwStages - 2 < total) issue(static_cast<int>((it + kSwStages - 2) % kSwStages));
    cp_async_commit();
    const uint32_t ga = smem_u32(&sm.g[slot][0]) + wg * 64 * kRowBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kSwBK / 16; ++kk)
#pragma unroll
      for (int qp = 0; qp < QP; ++qp)
        wgmma_ss<MQ>(
            acc, kmajor_sw128_desc(ga + kk * 32),
            kmajor_sw128_desc(smem_u32(&sm.q[slot][qp][0]) + kk * 32),
            (fresh && kk == 0 && qp == 0) ? 0 : 1);
    wgmma_commit();
    fresh = false;
    if (++slot == kSwStages) slot = 0;
    if (++kc == nk) {  // the tile's scores are complete
      kc = 0;
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < kNS; ++i) fence_reg(acc[i]);
      float sv[kNS];
      int srow[kNS], sq[kNS];
#pragma unroll
      for (int i = 0; i < kNS; ++i) {
        sv[i] = acc[i];
        srow[i] = wg * 64 + wq * 16 + g + 8 * ((i >> 1) & 1);
        sq[i] = 8 * (i >> 2) + 2 * t4 + (i & 1);
      }
      fresh = true;
      process_tile(sm.ts, c, sv, srow, sq, tile_off, part_rows, lane, warp);
      tile_off += kRowsPerTile;
    } else {
      wgmma_wait<1>();  // step it - 1 done: its slot is free after the next barrier
#pragma unroll
      for (int i = 0; i < kNS; ++i) fence_reg(acc[i]);
    }
  }
  wgmma_wait<0>();
  cp_async_wait<0>();
  final_flush(sm.ts, c, lane, warp);
#else
  __trap();  // never launched: score_wgmma_usable requires a compute capability 9.0 device
#endif
}

template <int MQ, int CB, int QP, int S>
void launch_slots(const ScoreParams& p, int64_t blocks, cudaStream_t st) {
  constexpr int64_t smem = sw_smem_bytes<MQ, CB, QP, S>();
  static_assert(smem <= kSmemOptin, "fits sm_90's shared memory per block");
  auto kernel = wgmma_score_kernel<MQ, CB, QP, S>;
  cuda::detail::allow_smem(kernel, smem, "wgmma_score_kernel");
  kernel<<<cuda::detail::grid_1d(blocks, "wgmma_score_kernel"), kThreads, smem, st>>>(p);
  cuda::detail::check_launch("wgmma_score_kernel launch");
}

template <int MQ, int CB, int QP>
void launch(const ScoreParams& p, int64_t blocks, cudaStream_t st) {
  if (cuda_variant_on(CudaVariant::kScoreDeepRing)) {
    launch_slots<MQ, CB, QP, deep_stages<MQ, CB, QP>()>(p, blocks, st);
    note_cuda_variant_launch(CudaVariant::kScoreDeepRing);
  } else {
    launch_slots<MQ, CB, QP, sw_stages<MQ, QP>()>(p, blocks, st);
  }
}

}  // namespace

bool score_wgmma_usable() {
  return cuda_variant_on(CudaVariant::kScoreWgmma) &&
         cuda::detail::current_device_is_cc90();
}

void launch_score_wgmma(const ScoreParams& p, int queries_per_block, int64_t blocks,
                        bool query_bf16, cudaStream_t st) {
  if (queries_per_block == kWgmmaScoreSmallMQ) {
    if (query_bf16) {
      launch<kWgmmaScoreSmallMQ, 128, 1>(p, blocks, st);
    } else {
      launch<kWgmmaScoreSmallMQ, 128, kQParts>(p, blocks, st);
    }
  } else {
    cuda::detail::require(queries_per_block == kWgmmaScoreMQ,
                          "score_wgmma: blocks of 16 or 64 queries");
    if (query_bf16) {
      launch<kWgmmaScoreMQ, 32, 1>(p, blocks, st);
    } else {
      launch<kWgmmaScoreMQ, 32, kQParts>(p, blocks, st);
    }
  }
  note_cuda_variant_launch(CudaVariant::kScoreWgmma);
}

}  // namespace issl_fast::topk
