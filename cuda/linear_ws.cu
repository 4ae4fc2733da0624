// The direct sketch_linear route (sketch_gemm.h: LinearDirect) on Hopper with warp
// specialisation: a producer warpgroup makes the +-1 tile and a TMA copy brings the example
// tile; two consumer warpgroups only issue shared-shared wgmma m64n256k16. Built for sm_90a only
// (its own library, cuda/CMakeLists.txt); experimental kernel variants CudaVariant::kLinearWs,
// kLinearWsPair (clusters of two blocks, see linear_ws_kernel) and kLinearWsRegs (WsCfg), off
// by default until a GPU run validates and times them; linear_direct tries them before
// linear_wgmma.
//
// Why (Nsight Compute on an H200, bench/gpu/README.md): linear_wgmma reaches 30% of the bf16 mm
// rate with the tensor pipe 24% busy and the issue slots 48% busy. Its blocks cover 64 examples,
// so every +-1 entry is rebuilt, in the registers of every consumer warp, for each of the 4
// example tiles of B = 256, and the same warps that issue the MMAs hash the sign words (~320
// SASS instructions per step against 512 tensor cycles). Here each block covers 256 examples, so
// a +-1 entry is made once per 512 flops, by warps that never issue an MMA, and the consumers
// wait only on mbarriers.
//
// Roles (per (o, t), as linear_wgmma):
//   Z[j, b] = sum_i R[j, p(o, i)] A[b, t, i]          (wgmma: M = sketch rows j, N = examples b)
//   Y[j, b] += D[b, t, o] * Z[j, b]                   (float32 FMA, once per (o, t))
// Block: 384 threads x 128 sketch rows x 256 examples, over a split of the output rows o.
//   * warpgroups 0 and 1 (consumers): sketch rows 64 wg .. + 63 each; Z in registers (128 per
//     thread), Y in shared memory (thread-private float4 slots, no barrier);
//   * warpgroup 2 (producer): per step (64 input columns) each warp hashes the sign words of
//     its 32 sketch rows (lane l: columns l and l + 32), passes them round by shuffles
//     (two bits per shuffle, see produce_step) and makes its rows of the +-1 tile (lane l: row
//     32 w + l, whose sign is bit l of every word's half), all before it waits for a free slot;
//     then its thread 0 starts the TMA copy of A[b0 .. b0 + 255, t, 64 c .. + 63] (zero-filled
//     outside A) and the warps store their rows in the 128-byte swizzle; D[b, t, o] of a last
//     step goes to shared memory too.
// Two ring slots (Y takes 128 KB of the 227; three with kRegs): full[s] completes when the
// copy's bytes landed and the 128 producer threads arrived (each after a proxy fence over its own
// writes); empty[s] when the 8 consumer warps arrived after the wgmmas reading the slot
// completed. Per step the consumers commit four wgmmas (k = 16 each) as one group, then wait
// until only that group is in flight and free the previous slot; the last step of an (o, t)
// waits for its own group, folds Z into Y and frees its slot. Every sum is float32 in a fixed
// order: deterministic, and within the tolerance of the other routes (another order of the same
// exact products).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <type_traits>

#include "common.cuh"
#include "issl_fast/cuda_ops.h"
#include "linear_direct_tiles.cuh"
#include "linear_ws.h"
#include "tma.cuh"
#include "wgmma.cuh"

namespace issl_fast::cuda::detail {
namespace {

constexpr int kRows = 128;          // sketch rows per block: 2 consumer warpgroups x wgmma M
constexpr int kExamples = 256;      // examples per block: wgmma N
constexpr int kCols = 64;           // input columns per step: one 128-byte swizzle row
constexpr int kConsumers = 256;     // threads of warpgroups 0 and 1
constexpr int kThreads = 384;       // + the producer warpgroup
constexpr int kAcc = kExamples / 2;  // float32 accumulators per consumer thread (m64n256)
constexpr uint32_t kATileBytes = kExamples * kCols * 2;
constexpr uint32_t kRTileBytes = kRows * kCols * 2;
constexpr int64_t kMaxSplits = 64;
constexpr int kMaxDevices = 64;  // once_per_device remembers answers for device ids below this
// Fewer examples than this leave over half of every 256-wide block idle: linear_wgmma's 64-wide
// blocks do less work there.
constexpr int64_t kMinExamples = 128;

// kRegs = false: two ring slots, Y all in shared memory (128 of the 227 KB).
// kRegs = true (CudaVariant::kLinearWsRegs): setmaxnreg moves registers from the producer
// warpgroup (down to 64) to the consumers (up to 216), which keep Y's first 12 register quads
// (48 floats) in registers: the fold moves 37.5% less shared memory, and the 48 KB freed buys a
// third ring slot (the producer may run two steps ahead).
template <bool kRegs>
struct WsCfg {
  static constexpr int kStages = kRegs ? 3 : 2;
  static constexpr int kYRegQuads = kRegs ? 12 : 0;
  static constexpr int kYSmemQuads = kAcc / 4 - kYRegQuads;
};
// setmaxnreg targets (kRegs only): 128 x 64 + 256 x 216 <= 384 x 168 allocated at launch.
constexpr int kProducerRegs = 64, kConsumerRegs = 216;

// Shared memory from a 1024-byte-aligned base: the swizzled tiles first (every slot and every
// 8-row atom 1024-aligned), then Y, D and the mbarriers.
template <bool kRegs>
struct Smem {
  using C = WsCfg<kRegs>;
  unsigned char a[C::kStages][kATileBytes];  // A[b0 + n, t, 64 c + kk]: row n, 128 B, swizzled
  unsigned char r[C::kStages][kRTileBytes];  // +-1 entries: row = sketch row j - j0, swizzled
  float4 y[2][C::kYSmemQuads][128];          // Y's shared quads: warpgroup, quad, thread
  uint16_t dv[C::kStages][kExamples];        // D[b0 + n, t, o] (raw 16-bit) of a last step
  uint64_t full[C::kStages], empty[C::kStages];
};
template <bool kRegs>
constexpr int64_t smem_bytes() {
  return static_cast<int64_t>(sizeof(Smem<kRegs>)) + 1024;  // + alignment slack
}
static_assert(smem_bytes<false>() <= 232448 && smem_bytes<true>() <= 232448,
              "an H100 / H200 block's shared memory (227 KB)");

template <class T>
__device__ __forceinline__ float bits_to_f32(uint16_t v);
template <>
__device__ __forceinline__ float bits_to_f32<__nv_bfloat16>(uint16_t v) {
  return __bfloat162float(__ushort_as_bfloat16(v));
}
template <>
__device__ __forceinline__ float bits_to_f32<__half>(uint16_t v) {
  return __half2float(__ushort_as_half(v));
}

// The producer's share of step `cu` (the s-th) into ring slot `slot` (all 128 producer threads;
// ptid = thread within the warpgroup). Everything that does not touch the slot (D's loads, the
// hashing and the +-1 values) comes before the wait for the slot to be free; the thread ends
// with its arrival on full[slot].
template <class InT, int kPair, bool kRegs>
__device__ __forceinline__ void produce_step(const DirectParams& p, const CUtensorMap* amap,
                                             Smem<kRegs>& sm, const LinearStepCursor& cu,
                                             int64_t nci, int64_t s, int64_t j0, int64_t b0,
                                             int ptid, uint32_t rank) {
  constexpr int S = WsCfg<kRegs>::kStages;
  const int slot = static_cast<int>(s % S);
  const bool last = cu.c == nci - 1;  // the (o, t)'s last step carries D[b, t, o]
  uint16_t dv[2] = {0, 0};
  if (last) {
    const uint16_t* D = static_cast<const uint16_t*>(p.D);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t b = b0 + ptid + 128 * e;
      if (b < p.B) dv[e] = D[(b * p.T + cu.t) * p.d_out + cu.o];
    }
  }
  // Warp w makes sketch rows 32 w .. + 31 of the tile: bits 32 (w & 1) .. + 31 of word w >> 1
  // (rows 64 (w >> 1) .. + 63) of each column. Columns past d_in get signs too; A is zero there.
  const int lane = ptid & 31, w = ptid >> 5;
  const uint64_t col0 = p.col_offset + static_cast<uint64_t>(cu.o * p.d_in + cu.c * kCols) +
                        static_cast<uint64_t>(lane);
  const uint64_t wi = static_cast<uint64_t>(j0 >> 6) + static_cast<uint64_t>(w >> 1);
  const int sh = 32 * (w & 1);
  const uint32_t lo = static_cast<uint32_t>(hash_word(column_key(p.key, col0), wi) >> sh);
  const uint32_t hi = static_cast<uint32_t>(hash_word(column_key(p.key, col0 + 32), wi) >> sh);
  constexpr uint32_t kOnes = PlusOne<std::conditional_t<std::is_same_v<InT, __half>, __half,
                                                        __nv_bfloat16>>::kBits * 0x10001u;
  // Lane l needs bit l of every column's half-word, two columns per packed register. Lane
  // m (< 16) gathers columns 2 m, 2 m + 1 as (c0 & 0xFFFF) | (c1 << 16) and lane 16 + m as
  // (c0 >> 16) | (c1 & 0xFFFF0000): then the pair (2 m, 2 m + 1) sits at bits l & 15 and
  // (l & 15) + 16 of the register of lane (l & 16) + m, which one width-16 shuffle brings to
  // every lane l; one shift and one mask-or make the two +-1 values.
  const int m = lane & 15;
  const uint32_t sel = lane < 16 ? 0x5410u : 0x7632u;
  const uint32_t vlo = __byte_perm(__shfl_sync(0xFFFFFFFFu, lo, 2 * m),
                                   __shfl_sync(0xFFFFFFFFu, lo, 2 * m + 1), sel);
  const uint32_t vhi = __byte_perm(__shfl_sync(0xFFFFFFFFu, hi, 2 * m),
                                   __shfl_sync(0xFFFFFFFFu, hi, 2 * m + 1), sel);
  const int up = 15 - m;
  uint32_t q[kCols / 2];  // packed pair pr: columns 2 pr (low half), 2 pr + 1 (high half)
#pragma unroll
  for (int pr = 0; pr < kCols / 2; ++pr) {
    const uint32_t v = __shfl_sync(0xFFFFFFFFu, pr < 16 ? vlo : vhi, pr & 15, 16);
    q[pr] = ((v << up) & 0x80008000u) | kOnes;
  }

  // The slot: free once the consumers are done with step s - 2.
  if (s >= S) mbar_wait(&sm.empty[slot], static_cast<uint32_t>((s / S - 1) & 1));
  if (ptid == 0) {
    mbar_arrive_expect_tx(&sm.full[slot], kATileBytes);  // with a pair: both halves land here
    if constexpr (kPair == 1) {
      tma_load_3d(smem_u32(&sm.a[slot][0]), amap, static_cast<int>(cu.c * kCols),
                  static_cast<int>(cu.t), static_cast<int>(b0), &sm.full[slot]);
    } else {  // this block's half of the examples, into both blocks of the pair
      constexpr int kHalf = kExamples / 2;
      tma_load_3d_multicast(smem_u32(&sm.a[slot][0]) + rank * (kATileBytes / 2), amap,
                            static_cast<int>(cu.c * kCols), static_cast<int>(cu.t),
                            static_cast<int>(b0 + kHalf * rank), &sm.full[slot], 0x3);
    }
  }
  if (last) {
    sm.dv[slot][ptid] = dv[0];
    sm.dv[slot][ptid + 128] = dv[1];
  }
  const uint32_t row_dst = smem_u32(&sm.r[slot][0]);
  const int row = 32 * w + lane;
#pragma unroll
  for (int ch = 0; ch < kCols / 8; ++ch)
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(row_dst +
                                                                   sw128_offset(row, ch)),
                 "r"(q[4 * ch]), "r"(q[4 * ch + 1]), "r"(q[4 * ch + 2]), "r"(q[4 * ch + 3])
                 : "memory");
  fence_proxy_async();  // the +-1 tile is read by wgmma (async proxy)
  mbar_arrive(&sm.full[slot]);
}

// The consumer warpgroups' loop and epilogue (wg 0 or 1; tid = thread in the block).
template <class InT, int kPair, bool kRegs>
__device__ __forceinline__ void consume(const DirectParams& p, Smem<kRegs>& sm, int wg, int tid,
                                        int64_t nsteps, int64_t nci, int64_t o_begin, int64_t j0,
                                        int64_t b0, int64_t split, uint32_t partner) {
  using MmaT = std::conditional_t<std::is_same_v<InT, __half>, __half, __nv_bfloat16>;
  const int tw = tid & 127;
  // This warp is done with `slot`: one arrival per warp on this block's empty barrier (lane 0)
  // and, in a pair, on the partner's (lane 1), after the warp's lanes all got here.
  const int lane_id = tid & 31;
  auto release = [&](int slot) {
    __syncwarp();
    if (lane_id == 0) mbar_arrive(&sm.empty[slot]);
    if constexpr (kPair == 2) {
      if (lane_id == 1) mbar_arrive_cluster(&sm.empty[slot], partner);
    }
  };
  using C = WsCfg<kRegs>;
  constexpr int S = C::kStages, R = C::kYRegQuads;
  const int lane = tid & 31, wq = (tid >> 5) & 3, g = lane >> 2, t4 = lane & 3;
  float4 yr[R > 0 ? R : 1];  // Y's register quads (kRegs)
#pragma unroll
  for (int q = 0; q < R; ++q) yr[q] = make_float4(0.f, 0.f, 0.f, 0.f);
  float z[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) z[i] = 0.0f;
  auto fence_z = [&]() {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) fence_reg(z[i]);
  };
  LinearStepCursor cu;
  cu.o = o_begin;
  bool fresh = true;     // the next wgmma starts a new Z (scale-d = 0)
  bool pending = false;  // the previous step's slot is not yet freed
  for (int64_t s = 0; s < nsteps; ++s) {
    const int slot = static_cast<int>(s % S), prev = (slot + S - 1) % S;
    mbar_wait(&sm.full[slot], static_cast<uint32_t>((s / S) & 1));
    const uint32_t rbase = smem_u32(&sm.r[slot][0]) + wg * 64 * 128;
    const uint32_t abase = smem_u32(&sm.a[slot][0]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_ss<kExamples, MmaT>(z, kmajor_sw128_desc(rbase + kk * 32),
                                kmajor_sw128_desc(abase + kk * 32), (fresh && kk == 0) ? 0 : 1);
    wgmma_commit();
    fresh = false;
    if (cu.c == nci - 1) {
      // Free the previous step's slot as soon as its group is done (the producer can start
      // step s + 1 while this one finishes), then wait for this step's own group.
      wgmma_wait<1>();
      fence_z();
      if (pending) release(prev);
      wgmma_wait<0>();
      fence_z();
      // Y += D[b, t, o] Z: register 4 q + e is row g (+8 for e >= 2), column 8 q + 2 t4 (+1 for
      // odd e) of the warpgroup's 64 x 256 tile.
      const uint32_t* dv = reinterpret_cast<const uint32_t*>(&sm.dv[slot][0]);
#pragma unroll
      for (int q = 0; q < kAcc / 4; ++q) {
        const uint32_t pair = dv[4 * q + t4];  // columns 8 q + 2 t4, + 1
        const float d0 = bits_to_f32<InT>(static_cast<uint16_t>(pair & 0xFFFFu));
        const float d1 = bits_to_f32<InT>(static_cast<uint16_t>(pair >> 16));
        float4 y = q < R ? yr[q < R ? q : 0] : sm.y[wg][q - R][tw];
        y.x = fmaf(d0, z[4 * q + 0], y.x);
        y.y = fmaf(d1, z[4 * q + 1], y.y);
        y.z = fmaf(d0, z[4 * q + 2], y.z);
        y.w = fmaf(d1, z[4 * q + 3], y.w);
        if (q < R) {
          yr[q < R ? q : 0] = y;
        } else {
          sm.y[wg][q - R][tw] = y;
        }
      }
      release(slot);  // after the fold: the slot's D was read
      pending = false;
      fresh = true;
    } else {
      wgmma_wait<1>();  // the previous step is done: its slot is free
      fence_z();
      if (pending) release(prev);
      pending = true;
    }
    cu.next(nci, p.T);
  }
  wgmma_wait<0>();  // nothing is in flight (the last step folded); says so to ptxas (C7517)
  fence_z();

  // Epilogue: scale * Y (+ out) into out[b, j], or raw Y into this split's partial slice; the
  // register quads in a loop of their own, unrolled (an indexed register array would go to
  // local memory).
  auto store_quad = [&](int q, const float4& y) {
    const float v[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = j0 + wg * 64 + wq * 16 + g + 8 * (e >> 1);
      const int64_t b = b0 + 8 * q + 2 * t4 + (e & 1);
      if (j < p.N && b < p.B) direct_store(p, split, b, j, v[e]);
    }
  };
#pragma unroll
  for (int q = 0; q < R; ++q) store_quad(q, yr[q]);
#pragma unroll 4
  for (int q = R; q < kAcc / 4; ++q) store_quad(q, sm.y[wg][q - R][tw]);
}

// kPair = 2 (CudaVariant::kLinearWsPair): clusters of two blocks with adjacent sketch-row tiles
// (same examples, same split): each block's producer copies half of the example tile and the TMA
// unit multicasts it into both blocks, so each tile comes through L2 once per pair. A slot is
// then free only when the consumers of both blocks released it: each consumer warp arrives on
// its own block's empty barrier and on the partner's (count 2 x 8).
template <class InT, int kPair, bool kRegs>
__global__ void __launch_bounds__(kThreads, 1)
    linear_ws_kernel(const DirectParams p, const __grid_constant__ CUtensorMap amap) {
#if ISSL_WGMMA_DEVICE
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  Smem<kRegs>& sm =
      *reinterpret_cast<Smem<kRegs>*>(smem_raw + (((raw + 1023u) & ~1023u) - raw));
  using C = WsCfg<kRegs>;

  const int tid = threadIdx.x, tw = tid & 127;
  // The warpgroup, broadcast from lane 0 so ptxas sees it warp-uniform: otherwise the role
  // branch below counts as divergent and it serialises the consumers' wgmma (C7518).
  const int wg = __shfl_sync(0xFFFFFFFFu, tid >> 7, 0);

  if (tid == 0) {
    for (int s = 0; s < C::kStages; ++s) {
      mbar_init(&sm.full[s], 1 + 128);  // the copy's expect_tx arrival + 128 producer threads
      mbar_init(&sm.empty[s], kConsumers / 32 * kPair);  // one arrival per consumer warp
    }
    fence_mbar_init();
  }
  if (wg < 2) {
#pragma unroll
    for (int q = 0; q < C::kYSmemQuads; ++q) sm.y[wg][q][tw] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const uint32_t rank = kPair == 2 ? cluster_ctarank() : 0;
  if constexpr (kPair == 2) {
    cluster_sync();  // the partner's barriers are initialised before any copy or arrival
  } else {
    __syncthreads();
  }

  // The block's tile coordinates are computed in each role, after its setmaxnreg: live across
  // it, ptxas spilled them and reloaded them every step.
  if (wg == 2) {  // ---- producer ----
    if constexpr (kRegs)
      asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    const DirectBlock bk = direct_block(p, kRows, kExamples, kCols);
    LinearStepCursor cu;
    cu.o = bk.o_begin;
    for (int64_t s = 0; s < bk.nsteps; ++s) {
      produce_step<InT, kPair, kRegs>(p, &amap, sm, cu, bk.nci, s, bk.j0, bk.b0, tw, rank);
      cu.next(bk.nci, p.T);
    }
  } else {
    if constexpr (kRegs)
      asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
    const DirectBlock bk = direct_block(p, kRows, kExamples, kCols);
    consume<InT, kPair, kRegs>(p, sm, wg, tid, bk.nsteps, bk.nci, bk.o_begin, bk.j0, bk.b0,
                               bk.split, rank ^ 1u);
  }
  // No block of a pair leaves while its partner may still copy into it or arrive on its
  // barriers.
  if constexpr (kPair == 2) cluster_sync();
#else
  __trap();  // never launched: linear_ws_route requires a compute capability 9.0 device
#endif
}

}  // namespace

DirectTilePlan linear_ws_plan(int64_t B, int64_t N, int64_t d_out, int num_sms, int pair) {
  // Pairs take adjacent sketch-row tiles: an even count (rows past N are computed, not stored).
  return direct_tile_plan(B, round_up(std::max<int64_t>(N, 1), kRows * pair), d_out, num_sms,
                          kRows, kExamples, kMaxSplits);
}

namespace {
// The launch, with clusters of `pair` blocks along the grid (1: no cluster attribute).
template <bool kRegs, class Kernel>
cudaLaunchConfig_t ws_config(Kernel kernel, int pair, unsigned blocks, cudaStream_t st,
                             cudaLaunchAttribute* attr) {
  allow_smem(kernel, smem_bytes<kRegs>(), "linear_ws_kernel");
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem_bytes<kRegs>());
  cfg.stream = st;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = static_cast<unsigned>(pair);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pair > 1 ? 1 : 0;
  return cfg;
}

// ask() for the current device, once per device id below kMaxDevices (`known`: 0 not asked,
// 1 no, 2 yes): the answers below depend on the device, never on the call.
template <class Ask>
bool once_per_device(std::atomic<int> (&known)[kMaxDevices], Ask ask) {
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  const bool keep = dev >= 0 && dev < kMaxDevices;
  if (keep && known[dev].load() != 0) return known[dev].load() == 2;
  const bool yes = ask();
  if (keep) known[dev].store(yes ? 2 : 1);
  return yes;
}

// Whether a cluster of two of these blocks (2 x ~226 KB of shared memory) can be resident on
// the current device (per layout; a failed query counts as no).
template <bool kRegs>
bool pair_fits() {
  static std::atomic<int> known[kMaxDevices];
  return once_per_device(known, [] {
    auto kernel = linear_ws_kernel<__nv_bfloat16, 2, kRegs>;
    cudaLaunchAttribute attr{};
    const cudaLaunchConfig_t cfg = ws_config<kRegs>(kernel, 2, 2, nullptr, &attr);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky: clear it so later checks do not report it
      clusters = 0;
    }
    return clusters >= 1;
  });
}

// setmaxnreg moves registers within the block's launch allocation: the kRegs kernels must be
// allocated at least what the producer and consumers ask for (ptxas gives them 168 today),
// else the consumers' setmaxnreg.inc would wait forever.
bool regs_pool_fits() {
  static std::atomic<int> known[kMaxDevices];
  return once_per_device(known, [] {
    bool ok = true;
    auto fits = [&](auto kernel) {
      cudaFuncAttributes a{};
      if (cudaFuncGetAttributes(&a, kernel) != cudaSuccess) {
        (void)cudaGetLastError();
        ok = false;
        return;
      }
      ok = ok && a.numRegs * kThreads >= kProducerRegs * 128 + kConsumerRegs * kConsumers;
    };
    fits(linear_ws_kernel<__nv_bfloat16, 1, true>);
    fits(linear_ws_kernel<__half, 1, true>);
    fits(linear_ws_kernel<__nv_bfloat16, 2, true>);
    fits(linear_ws_kernel<__half, 2, true>);
    return ok;
  });
}
}  // namespace

WsRoute linear_ws_route(const LinearDirect& g) {
  WsRoute r;
  const bool single = cuda_variant_on(CudaVariant::kLinearWs);
  const bool pair = cuda_variant_on(CudaVariant::kLinearWsPair);
  const bool regs = cuda_variant_on(CudaVariant::kLinearWsRegs);
  if (!single && !pair && !regs) return r;
  if (g.dtype == DType::kFloat32 || !aligned16(g.A) || g.d_in % 8 != 0) return r;
  if (g.B < kMinExamples) return r;
  // TMA box coordinates are int32: the last column chunk, t and the last example tile.
  if (g.d_in > INT_MAX - kCols || g.T > INT_MAX || g.B > INT_MAX - kExamples) return r;
  if (!current_device_is_cc90()) return r;
  if (max_dynamic_smem() < (regs ? smem_bytes<true>() : smem_bytes<false>())) return r;
  r.regs = regs && regs_pool_fits();
  if (regs && !r.regs && !single && !pair) return r;
  // Pairs need an even number of 128-row tiles: rounding up may add at most an eighth of them
  // (an odd count of 7 or more), else the second block of a pair would mostly idle.
  const int64_t tiles = ceil_div(g.N, kRows);
  if (pair && (tiles % 2 == 0 || tiles >= 7) &&
      (r.regs ? pair_fits<true>() : pair_fits<false>())) {
    r.pair = 2;
  } else if (single || r.regs) {
    r.pair = 1;
  }
  return r;
}

void linear_ws(const LinearDirect& g, const DirectTilePlan& pl, const WsRoute& route,
               float* part, std::uintptr_t stream) {
  const int pair = route.pair;
  require(pair == 1 || pair == 2, "issl_fast CUDA: linear_ws pair must be 1 or 2");
  require(pl.tiles_j % pair == 0, "issl_fast CUDA: linear_ws pairs need an even tile count");
  const DirectParams prm = direct_params(g, pl, part);
  // A [B, T, d_in] as a 3-D tensor (innermost first), read in boxes of 64 columns x 1 x 256
  // examples (one 32 KB swizzled tile per step), or of 128 examples: each block's half of a
  // pair's tile.
  const uint64_t dims[3] = {static_cast<uint64_t>(g.d_in), static_cast<uint64_t>(g.T),
                            static_cast<uint64_t>(g.B)};
  const uint64_t strides[2] = {static_cast<uint64_t>(g.d_in) * 2,
                               static_cast<uint64_t>(g.T * g.d_in) * 2};
  const uint32_t box[3] = {kCols, 1, static_cast<uint32_t>(kExamples / pair)};
  const CUtensorMap amap =
      tensor_map_16bit(g.A, g.dtype == DType::kFloat16, 3, dims, strides, box);
  const unsigned blocks = grid_1d(pl.tiles_j * pl.tiles_b * pl.splits, "linear_ws_kernel");
  auto launch = [&](auto regs_tag, auto kernel) {
    cudaLaunchAttribute attr{};
    const cudaLaunchConfig_t cfg =
        ws_config<decltype(regs_tag)::value>(kernel, pair, blocks, as_stream(stream), &attr);
    check(cudaLaunchKernelEx(&cfg, kernel, prm, amap), "linear_ws_kernel launch");
  };
  // One instantiation per (dtype, pair, regs).
  auto by_dtype = [&](auto pair_tag, auto regs_tag) {
    constexpr int kP = decltype(pair_tag)::value;
    constexpr bool kR = decltype(regs_tag)::value;
    if (g.dtype == DType::kBFloat16) {
      launch(regs_tag, linear_ws_kernel<__nv_bfloat16, kP, kR>);
    } else {
      launch(regs_tag, linear_ws_kernel<__half, kP, kR>);
    }
  };
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  if (route.regs) {
    pair == 2 ? by_dtype(Two{}, std::true_type{}) : by_dtype(One{}, std::true_type{});
    note_cuda_variant_launch(CudaVariant::kLinearWsRegs);
  } else {
    pair == 2 ? by_dtype(Two{}, std::false_type{}) : by_dtype(One{}, std::false_type{});
  }
  if (pair == 2) {
    note_cuda_variant_launch(CudaVariant::kLinearWsPair);
  } else if (!route.regs) {
    note_cuda_variant_launch(CudaVariant::kLinearWs);
  }
  if (pl.splits > 1)
    reduce_partials(part, pl.splits, g.B * g.N, g.scale, g.out, g.accumulate, stream);
}

}  // namespace issl_fast::cuda::detail
