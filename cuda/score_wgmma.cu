// score_topk's tensor-core scoring on Hopper's warpgroup MMA (sm_90a; kernel variant
// CudaVariant::kScoreWgmma, on by default: 1.0-1.4x tc_score_kernel on an H200, runs 5-8). Same
// contract and top-k machinery as tc_score_kernel in score_topk.cu (score_topk_blocks.cuh); only
// how a tile's scores are computed differs.
//
// Why: for 64-query blocks the mma.sync scorer was compute-bound (m = 64: 22% / 30% of the copy
// bandwidth with float32 / bfloat16 queries on an H200; m = 1024: 11% / 20% of the bf16 mm rate),
// and for 16-query blocks its warps spent their shared-memory bandwidth on ldmatrix of the query
// terms (m = 1, 16: 69-77% / 56-62% of copy). wgmma reads both operands from shared memory and
// runs asynchronously, with no ldmatrix or fragment traffic in the issuing warps.
//
// Block: 2 warpgroups (256 threads, like the other scorers) x 128 store rows (64 per warpgroup:
// wgmma M) x MQ = 64 or 16 queries (wgmma N), 64-column k steps. G rows and the bf16 query terms
// stream through one ring of 128-byte-swizzled K-major tiles (16 KB of G and MQ x 128 bytes per
// query term per step), filled by TMA from one thread (CudaVariant::kScoreTma, on by default:
// 1.03-1.3x over every thread issuing cp.async, run 7; ncu showed those copies cost the 64-query
// blocks a third of their instructions) or by cp.async. Per step: barrier; copies of step s + 2
// into the slot step s - 2 used; wait for step s (mbarrier or cp.async group); 4 k16 slices x QP
// terms of wgmma m64nMQk16 committed as one group; wait until only that group is in flight. The
// last step of a tile waits for its group and hands the MQ / 2 scores per thread to
// process_tile. Accumulation order per score: k16 slices in increasing k, the QP terms of a slice
// in order (as in tc_score_kernel), so bfloat16 queries give the same scores in one pass as in
// three (the lower terms are zero), and TMA and cp.async give the same bits.
//
// Where the time goes at m = 64 (ncu, run 7): DRAM 36%, tensor pipe 10%, warps mostly stalled at
// the per-tile barriers while other warps merge candidates: each block refills its own top-k
// lists from -inf (a simulation of the shared bars gives ~17 flushes per query per block). The
// experimental score_prepass variant (score_topk.cu) attacks that; bench/gpu/README.md has more.
#include <algorithm>

#include "common.cuh"
#include "issl_fast/cuda_ops.h"
#include "score_topk_blocks.cuh"
#include "score_wgmma.h"
#include "tma.cuh"
#include "wgmma.cuh"

namespace issl_fast::topk {
namespace {

using cuda::detail::ceil_div;
using cuda::detail::cp_async16;
using cuda::detail::cp_async_commit;
using cuda::detail::cp_async_wait;
using cuda::detail::fence_proxy_async;
using cuda::detail::fence_reg;
using cuda::detail::fence_mbar_init;
using cuda::detail::kmajor_sw128_desc;
using cuda::detail::mbar_arrive_expect_tx;
using cuda::detail::mbar_init;
using cuda::detail::mbar_wait;
using cuda::detail::smem_u32;
using cuda::detail::sw128_offset;
using cuda::detail::tma_load_2d;
using cuda::detail::wgmma_commit;
using cuda::detail::wgmma_fence;
using cuda::detail::wgmma_ss;
using cuda::detail::wgmma_wait;

constexpr int kSwBK = 64;      // k columns per step: one 128-byte swizzle row
// Ring slots: step s computing, s - 1 draining, s + 1 (and s + 2 with four slots) copying. Four,
// except for 64-query blocks with one query term, where three keep the block under half of
// sm_90's 227 KB, so two blocks share an SM as the plan assumes (the same bytes in flight per SM,
// twice the warps); with three terms one block per SM fits either way. Deeper rings at one block
// per SM measured slower on an H200, cp.async- and TMA-fed alike (0.62-0.98x, runs 6 and 8): with
// one block an SM stops its MMAs and copies while the block merges candidates (process_tile).
template <int MQ, int QP>
constexpr int sw_stages() {
  return MQ == 64 && QP == 1 ? 3 : 4;
}
constexpr int kRowBytes = kSwBK * 2;
static_assert(kThreads == 256 && kRowsPerTile == 128, "two warpgroups of 64 store rows");
static_assert(kQPad % kSwBK == 0, "the padded query k is whole steps");

// MQ queries per block (the plan's 16- or 64-query blocks), CB candidates buffered per query
// (as tc_score_kernel's configs of the same MQ), QP bf16 terms per query.
// kTma: the slots are filled by TMA (one thread), completing on one mbarrier per slot.
template <int MQ, int CB, int QP, bool kTma>
struct SwSmem {
  static constexpr int kStages = sw_stages<MQ, QP>();
  unsigned char g[kStages][kRowsPerTile * kRowBytes];  // 16 KB per slot, 1024-aligned
  unsigned char q[kStages][QP][MQ * kRowBytes];        // 2 or 8 KB per term per slot
  TopkShared<MQ, CB> ts;
  uint64_t full[kTma ? kStages : 1];  // TMA: slot s's copies landed (phase = use count % 2)
};
template <int MQ, int CB, int QP, bool kTma>
constexpr int64_t sw_smem_bytes() {
  return static_cast<int64_t>(sizeof(SwSmem<MQ, CB, QP, kTma>)) + 1024;  // + alignment slack
}

// The scorer; gmap / qmap (TMA only) are the tensor maps of G [n, k] in 128 x 64 boxes and of
// the query terms [3 mp, kq] in MQ x 64 boxes.
// kStack (CudaVariant::kScoreStack, float32 queries: QP = 3): the three bf16 terms of the MQ
// queries sit in shared memory as one 3 MQ-row tile, so one wgmma of N = 3 MQ per k16 slice
// scores all three (three accumulator groups, added per score at the end of the tile:
// (hi + mid) + lo) instead of three wgmmas of N = MQ that each re-read the store tile.
template <int MQ, int CB, int QP, bool kTma, bool kStack, bool kPace>
__device__ __forceinline__ void score_body(const ScoreParams& p, const CUtensorMap* gmap,
                                           const CUtensorMap* qmap) {
#if ISSL_WGMMA_DEVICE
  static_assert(MQ == 16 || MQ == 64, "wgmma N of 16 or 64");
  static_assert(!kStack || QP == kQParts, "stacking is for the three terms of float32 queries");
  using SM = SwSmem<MQ, CB, QP, kTma>;
  constexpr int kSwStages = SM::kStages;
  static_assert(kSwStages >= 3, "slots: computing, draining, copying");
  constexpr int kNS = MQ / 2;  // scores per thread per tile (m64nMQ float32 accumulators)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  auto& sm = *reinterpret_cast<SM*>(smem_raw + (((raw + 1023u) & ~1023u) - raw));
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t qblk = blockIdx.x % p.qblocks, part = blockIdx.x / p.qblocks;
  const int64_t qbase = qblk * MQ;
  const int64_t row_begin = p.n * part / p.partitions;
  const int64_t row_end = p.n * (part + 1) / p.partitions;
  const int64_t part_rows = row_end - row_begin;
  const TopkCtx c = make_ctx<MQ, CB>(p, part, qbase, row_begin);
  if (kTma && tid == 0) {
    for (int s = 0; s < kSwStages; ++s) mbar_init(&sm.full[s], 1);
    fence_mbar_init();
  }
  init_block_lists(sm.ts, c, tid);  // its barrier also publishes the mbarriers' initialisation
  PaceState pace{kPace && p.progress != nullptr, 0};  // CudaVariant::kScorePace

  const int nk = static_cast<int>(p.kq / kSwBK);
  const int64_t total = ceil_div(part_rows, kRowsPerTile) * nk;
  const uint16_t* G = static_cast<const uint16_t*>(p.G);

  // Copy side: (tile, k step) counters of its own, as in tc_score_kernel.
  int64_t ld_r0 = row_begin;
  int ld_kc = 0;
  auto issue = [&](int slot) {
    const int64_t c0 = static_cast<int64_t>(ld_kc) * kSwBK;
    if constexpr (kTma) {  // thread 0 only: whole boxes, zero-filled past n and k
      constexpr uint32_t kBytes = (kRowsPerTile + QP * MQ) * kRowBytes;
      mbar_arrive_expect_tx(&sm.full[slot], kBytes);
      tma_load_2d(smem_u32(&sm.g[slot][0]), gmap, static_cast<int>(c0),
                  static_cast<int>(ld_r0), &sm.full[slot]);
#pragma unroll
      for (int qp = 0; qp < QP; ++qp)
        tma_load_2d(smem_u32(&sm.q[slot][qp][0]), qmap, static_cast<int>(c0),
                    static_cast<int>(qp * p.mp + qbase), &sm.full[slot]);
      if (++ld_kc == nk) {
        ld_kc = 0;
        ld_r0 += kRowsPerTile;
      }
      return;
    }
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

  constexpr int kAccN = kStack ? kNS * QP : kNS;  // stacked: term qp in acc[qp kNS ..]
  float acc[kAccN];
#pragma unroll
  for (int i = 0; i < kAccN; ++i) acc[i] = 0.0f;
  bool fresh = true;  // the next wgmma starts a new tile (scale-d = 0)

#pragma unroll
  for (int s = 0; s < kSwStages - 2; ++s) {
    if constexpr (kTma) {
      if (tid == 0 && s < total) issue(s);
    } else {
      if (s < total) issue(s);
      cp_async_commit();  // always: keeps the group count in step with the iterations
    }
  }
  int slot = 0, kc = 0;
  int64_t tile_off = 0;
  for (int64_t it = 0; it < total; ++it) {
    if (kc == 0) refresh_bars(sm.ts, c, tid);  // read by this tile's process_tile
    if constexpr (kTma) {
      __syncthreads();  // every warpgroup is done with step it - 2: its slot may be refilled
      if (tid == 0 && it + kSwStages - 2 < total)
        issue(static_cast<int>((it + kSwStages - 2) % kSwStages));
      // Step `it` landed: the (it / kSwStages)-th use of its slot, so that phase's parity.
      mbar_wait(&sm.full[slot], static_cast<uint32_t>((it / kSwStages) & 1));
      __syncwarp();  // thread 0's warp reconverged before the .aligned wgmma instructions
    } else {
      cp_async_wait<kSwStages - 3>();  // step `it` landed (this thread's copies)
      fence_proxy_async();
      __syncthreads();  // ... for every thread; every warpgroup is done with step it - 2
      if (it + kSwStages - 2 < total) issue(static_cast<int>((it + kSwStages - 2) % kSwStages));
      cp_async_commit();
    }
    const uint32_t ga = smem_u32(&sm.g[slot][0]) + wg * 64 * kRowBytes;
    wgmma_fence();
    if constexpr (kStack) {
#pragma unroll
      for (int kk = 0; kk < kSwBK / 16; ++kk)
        wgmma_ss<MQ * QP>(acc, kmajor_sw128_desc(ga + kk * 32),
                          kmajor_sw128_desc(smem_u32(&sm.q[slot][0][0]) + kk * 32),
                          (fresh && kk == 0) ? 0 : 1);
    } else {
#pragma unroll
      for (int kk = 0; kk < kSwBK / 16; ++kk)
#pragma unroll
        for (int qp = 0; qp < QP; ++qp)
          wgmma_ss<MQ>(
              acc, kmajor_sw128_desc(ga + kk * 32),
              kmajor_sw128_desc(smem_u32(&sm.q[slot][qp][0]) + kk * 32),
              (fresh && kk == 0 && qp == 0) ? 0 : 1);
    }
    wgmma_commit();
    fresh = false;
    if (++slot == kSwStages) slot = 0;
    if (++kc == nk) {  // the tile's scores are complete
      kc = 0;
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < kAccN; ++i) fence_reg(acc[i]);
      float sv[kNS];
      int srow[kNS], sq[kNS];
#pragma unroll
      for (int i = 0; i < kNS; ++i) {
        // Stacked: query column c of term qp is column c + qp MQ, i.e. register i + qp kNS.
        sv[i] = kStack ? (acc[i] + acc[i + kNS]) + acc[i + 2 * kNS] : acc[i];
        srow[i] = wg * 64 + wq * 16 + g + 8 * ((i >> 1) & 1);
        sq[i] = 8 * (i >> 2) + 2 * t4 + (i & 1);
      }
      fresh = true;
      process_tile(sm.ts, c, sv, srow, sq, tile_off, part_rows, lane, warp);
      tile_off += kRowsPerTile;
      if constexpr (kPace)
        pace_siblings(p, part, qblk, tile_off / kRowsPerTile, tile_off >= part_rows, warp, lane,
                      pace);
    } else {
      wgmma_wait<1>();  // step it - 1 done: its slot is free after the next barrier
#pragma unroll
      for (int i = 0; i < kAccN; ++i) fence_reg(acc[i]);
    }
  }
  wgmma_wait<0>();
  if constexpr (!kTma) cp_async_wait<0>();
  final_flush(sm.ts, c, lane, warp);
#else
  __trap();  // never launched: score_wgmma_usable requires a compute capability 9.0 device
#endif
}

// Stacked 16-query blocks are held to 128 registers, so two still fit on an SM (as the plan
// assumes); the others keep the bounds they were measured with.
template <int MQ, bool kStack>
constexpr int min_blocks() {
  return kStack && MQ == 16 ? 2 : 1;
}

// kPace: compiled with CudaVariant::kScorePace's code (pace_siblings); the default kernels are
// compiled without it, so its registers never reach them.
template <int MQ, int CB, int QP, bool kStack, bool kPace>
__global__ void __launch_bounds__(kThreads, (min_blocks<MQ, kStack>()))
    wgmma_score_kernel(const ScoreParams p) {
  score_body<MQ, CB, QP, false, kStack, kPace>(p, nullptr, nullptr);
}

// The tensor maps are kernel parameters (__grid_constant__: TMA reads them where they are).
template <int MQ, int CB, int QP, bool kStack, bool kPace>
__global__ void __launch_bounds__(kThreads, (min_blocks<MQ, kStack>()))
    tma_score_kernel(const ScoreParams p, const __grid_constant__ CUtensorMap gmap,
                     const __grid_constant__ CUtensorMap qmap) {
  score_body<MQ, CB, QP, true, kStack, kPace>(p, &gmap, &qmap);
}

// TMA takes 32-bit box coordinates: rows up to n + 127 and 3 mp must fit.
bool tma_fits(const ScoreParams& p) {
  return p.n + kRowsPerTile < (int64_t{1} << 31) && kQParts * p.mp < (int64_t{1} << 31) &&
         p.kq < (int64_t{1} << 31);
}

template <int MQ, int CB, int QP, bool kStack>
void launch_ring(const ScoreParams& p, int64_t blocks, cudaStream_t st) {
  if (cuda_variant_on(CudaVariant::kScoreTma) && tma_fits(p)) {
    const CUtensorMap gmap = cuda::detail::bf16_tensor_map_2d(
        p.G, static_cast<uint64_t>(p.n), static_cast<uint64_t>(p.k), static_cast<uint64_t>(p.k),
        kRowsPerTile, kSwBK);
    const CUtensorMap qmap = cuda::detail::bf16_tensor_map_2d(
        p.Qs, static_cast<uint64_t>(kQParts * p.mp), static_cast<uint64_t>(p.kq),
        static_cast<uint64_t>(p.kq), MQ, kSwBK);
    launch_paced(tma_score_kernel<MQ, CB, QP, kStack, false>,
                 tma_score_kernel<MQ, CB, QP, kStack, true>, sw_smem_bytes<MQ, CB, QP, true>(), p,
                 blocks, st, "tma_score_kernel", gmap, qmap);
    note_cuda_variant_launch(CudaVariant::kScoreTma);
    return;
  }
  launch_paced(wgmma_score_kernel<MQ, CB, QP, kStack, false>,
               wgmma_score_kernel<MQ, CB, QP, kStack, true>, sw_smem_bytes<MQ, CB, QP, false>(),
               p, blocks, st, "wgmma_score_kernel");
}

template <int MQ, int CB, int QP>
void launch(const ScoreParams& p, int64_t blocks, cudaStream_t st) {
  if constexpr (QP == kQParts) {
    if (cuda_variant_on(CudaVariant::kScoreStack)) {
      launch_ring<MQ, CB, QP, true>(p, blocks, st);
      note_cuda_variant_launch(CudaVariant::kScoreStack);
      return;
    }
  }
  launch_ring<MQ, CB, QP, false>(p, blocks, st);
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
