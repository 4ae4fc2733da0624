// The direct sketch_linear route (sketch_gemm.h: LinearDirect) on Hopper's warpgroup MMA. Built
// for sm_90a only (its own library, cuda/CMakeLists.txt); kernel variant CudaVariant::kLinearWgmma,
// on by default: 1.33x the mma.sync kernel on an H200 (30% of the bf16 mm rate against 23%,
// bench/gpu/results/2026-11-28-run5.txt).
//
// Why: the mma.sync kernel reached 22% of the H200's bf16 rate here; our reading (no profile yet)
// is that its issue slots go to ldmatrix, B-fragment building and MMAs of one warp at a time,
// with one block per SM to hide their latency. wgmma issues a
// 64 x 64 x 16 product per instruction, asynchronously, so the same warps build the next +-1
// fragments while the tensor cores work.
//
// Roles are swapped relative to the mma.sync kernel: per (o, t)
//   Z[j, b] = sum_i R[j, p(o, i)] A[b, t, i]          (wgmma: M = sketch rows j, N = examples b)
//   Y[j, b] += D[b, t, o] * Z[j, b]                   (float32 FMA, once per (o, t))
// so the +-1 operand is A, taken from registers: each thread builds its four fragment registers
// straight from the hash words' sign bits (as the mma.sync kernel builds its B fragments), and no
// +-1 tile is ever written to shared memory. The B operand is the example rows A[b, t, i0:i0+64],
// copied with cp.async into a 128-byte-swizzled K-major tile (the canonical wgmma layout: 16-byte
// chunk c of row r stored at chunk c ^ (r % 8) of a 1024-byte-aligned 8-row atom).
//
// Block: 4 warpgroups (512 threads) x 256 sketch rows (64 per warpgroup) x 64 examples, over a
// split of the output rows o. Z lives in registers (32 per thread), Y in shared memory (thread-
// private slots, so no barrier). Per step (64 input columns): barrier; copies of step s + 2
// issued into the slot step s - 2 used; fragments of step s built; four wgmmas committed as one
// group; the sign words of step s + 2 hashed; then wait until only that group is in flight (step s - 1 done: its slot and its
// fragment registers are free; the fragments alternate between two register sets). The last step
// of an (o, t) waits for its own group and folds Z into Y. Every sum is float32 in a fixed order:
// deterministic, and within the tolerance of the mma.sync route (another order of the same exact
// products).
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "issl_fast/cuda_ops.h"
#include "linear_direct_tiles.cuh"
#include "linear_wgmma.h"
#include "wgmma.cuh"

namespace issl_fast::cuda::detail {
namespace {

constexpr int kWgRowsJ = 256;  // sketch rows per block: 4 warpgroups x wgmma M = 64
constexpr int kWgB = 64;       // examples per block: wgmma N
constexpr int kWgK = 64;       // input columns per step: one 128-byte swizzle row per example
constexpr int kWgStages = 4;   // ring slots: step s computing, s - 1 draining, s + 1, s + 2 copying
constexpr int kWgThreads = 512;
constexpr int kWgAcc = kWgB / 2;  // float32 accumulators per thread for m64n64
constexpr int64_t kWgMaxSplits = 64;
static_assert(kWgB * kWgK * 2 == kWgThreads * 16, "one 16-byte chunk per thread per step");

// Shared memory, from a 1024-byte-aligned base: the swizzled tiles first (each 8 KB, so every
// slot and every 8-row atom stays 1024-aligned), then the sign words, D, and Y.
struct WgSmem {
  unsigned char a[kWgStages][kWgB * kWgK * 2];
  unsigned long long bits[kWgStages][kWgK][kWgRowsJ / 64];  // word w: sketch rows 64 w .. + 63
  float dv[kWgStages][kWgB];                                 // D[b0 + n, t, o] of a last step
  float y[kWgAcc][kWgThreads];                               // Y, thread-private columns
};
constexpr int64_t kWgSmemBytes = sizeof(WgSmem) + 1024;  // + alignment slack

template <class InT>
__global__ void __launch_bounds__(kWgThreads, 1) linear_wgmma_kernel(const DirectParams p) {
#if ISSL_WGMMA_DEVICE
  using MmaT = std::conditional_t<std::is_same_v<InT, __half>, __half, __nv_bfloat16>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  WgSmem& sm = *reinterpret_cast<WgSmem*>(smem_raw + (((raw + 1023u) & ~1023u) - raw));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wq = warp & 3;  // warpgroup (64 sketch rows), warp within it
  const int g = lane >> 2, t4 = lane & 3;
  const DirectBlock bk = direct_block(p, kWgRowsJ, kWgB, kWgK);
  const int64_t j0 = bk.j0, b0 = bk.b0, split = bk.split, o_begin = bk.o_begin;
  const int64_t nci = bk.nci, nsteps = bk.nsteps;
  const uint16_t* A = static_cast<const uint16_t*>(p.A);
  const InT* D = static_cast<const InT*>(p.D);

#pragma unroll
  for (int i = 0; i < kWgAcc; ++i) sm.y[i][tid] = 0.0f;

  // Issue one step into ring slot `slot`: this thread's 16-byte chunk of the 64 x 64 example
  // tile (swizzled, cp.async) ...
  const int crow = tid >> 3, cch = tid & 7;
  const uint32_t a_dst0 = smem_u32(&sm.a[0][0]) + sw128_offset(crow, cch);
  auto issue_copy = [&](const LinearStepCursor& cu, int slot) {
    const int64_t b = b0 + crow;
    const int64_t col = cu.c * kWgK + cch * 8;
    const bool ok = b < p.B && col < p.d_in;
    cp_async16(a_dst0 + slot * (kWgB * kWgK * 2),
               ok ? A + (b * p.T + cu.t) * p.d_in + col : A, ok);
  };
  // ... then the sign words of its 64 columns for the block's 256 sketch rows, and D of the
  // (o, t) when the step is its last (ordinary stores, seen after the barriers before the step).
  auto issue_words = [&](const LinearStepCursor& cu, int slot) {
    if (tid < kWgK * (kWgRowsJ / 64)) {
      const int cx = tid >> 2, w = tid & 3;
      const uint64_t ck = column_key(
          p.key, p.col_offset + static_cast<uint64_t>(cu.o * p.d_in + cu.c * kWgK + cx));
      sm.bits[slot][cx][w] = hash_word(ck, static_cast<uint64_t>(j0 >> 6) + w);
    }
    if (cu.c == nci - 1 && tid < kWgB) {
      const int64_t bb = b0 + tid;
      sm.dv[slot][tid] = bb < p.B ? to_f32(D[(bb * p.T + cu.t) * p.d_out + cu.o]) : 0.0f;
    }
  };

  // The A fragments of one step from the sign bits: this warp's 16 sketch rows are bits
  // [16 wq, 16 wq + 16) of word wg, i.e. bits [16 (wq & 1), +16) of its 32-bit half wq >> 1
  // (columns 4 words = 8 halves apart).
  const int half = wg * 2 + (wq >> 1), sh = (wq & 1) * 16 + g;
  auto build = [&](int slot, uint32_t (&af)[4][4]) {
    pm1_a_fragments<MmaT>(reinterpret_cast<const uint32_t*>(&sm.bits[slot][0][0]) + half, 8, sh,
                          t4, af);
  };

  float z[kWgAcc];
#pragma unroll
  for (int i = 0; i < kWgAcc; ++i) z[i] = 0.0f;
  uint32_t af[2][4][4];
  bool fresh = true;  // the next wgmma starts a new Z (scale-d = 0)
  LinearStepCursor ci, cc;
  ci.o = cc.o = o_begin;

  auto fence_all = [&]() {
#pragma unroll
    for (int i = 0; i < kWgAcc; ++i) fence_reg(z[i]);
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) fence_reg(af[s][kk][r]);
  };

  auto step = [&](int64_t s, auto set_tag) {
    constexpr int kSet = decltype(set_tag)::value;
    const int slot = static_cast<int>(s % kWgStages);
    cp_async_wait<kWgStages - 3>();  // this thread's copies of step s have landed
    fence_proxy_async();
    __syncthreads();  // step s visible to all; every warpgroup is done with step s - 2
    const bool more = s + kWgStages - 2 < nsteps;
    const int islot = static_cast<int>((s + kWgStages - 2) % kWgStages);
    if (more) issue_copy(ci, islot);
    cp_async_commit();
    build(slot, af[kSet]);
    const uint32_t base = smem_u32(&sm.a[slot][0]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_m64n64k16<MmaT>(z, af[kSet][kk], kmajor_sw128_desc(base + kk * 32),
                            (fresh && kk == 0) ? 0 : 1);
    wgmma_commit();
    fresh = false;
    // Hashing step s + 2's sign words after the wgmmas are queued keeps it off the path to them
    // (its slot's words and D were last read by step s - 2, before the previous barrier).
    if (more) {
      issue_words(ci, islot);
      ci.next(nci, p.T);
    }
    if (cc.c == nci - 1) {
      wgmma_wait<0>();
      fence_all();
      // Y += D[b, t, o] Z: accumulator i is row 16 wq + g + 8 ((i >> 1) & 1), column
      // 8 (i >> 2) + 2 t4 + (i & 1) of the warpgroup's 64 x 64 tile.
#pragma unroll
      for (int i = 0; i < kWgAcc; ++i) {
        const float dv = sm.dv[slot][8 * (i >> 2) + 2 * t4 + (i & 1)];
        sm.y[i][tid] = fmaf(dv, z[i], sm.y[i][tid]);
      }
      fresh = true;
    } else {
      wgmma_wait<1>();  // step s - 1 done: its slot and fragment registers are free
      fence_all();
    }
    cc.next(nci, p.T);
  };

  // Prologue: steps 0 and 1 in flight (one commit group each, empty past the end).
#pragma unroll
  for (int i = 0; i < kWgStages - 2; ++i) {
    if (i < nsteps) {
      issue_copy(ci, i);
      issue_words(ci, i);
      ci.next(nci, p.T);
    }
    cp_async_commit();
  }
  int64_t s = 0;
  for (; s + 1 < nsteps; s += 2) {
    step(s, std::integral_constant<int, 0>{});
    step(s + 1, std::integral_constant<int, 1>{});
  }
  if (s < nsteps) step(s, std::integral_constant<int, 0>{});
  wgmma_wait<0>();
  cp_async_wait<0>();

  // Epilogue: scale * Y (+ out) into out[b, j], or raw Y into this split's partial slice.
#pragma unroll
  for (int i = 0; i < kWgAcc; ++i) {
    const int64_t j = j0 + wg * 64 + wq * 16 + g + 8 * ((i >> 1) & 1);
    const int64_t b = b0 + 8 * (i >> 2) + 2 * t4 + (i & 1);
    if (j >= p.N || b >= p.B) continue;
    direct_store(p, split, b, j, sm.y[i][tid]);
  }
#else
  __trap();  // never launched: linear_wgmma_usable requires a compute capability 9.0 device
#endif
}

}  // namespace

DirectTilePlan linear_wgmma_plan(int64_t B, int64_t N, int64_t d_out, int num_sms) {
  return direct_tile_plan(B, N, d_out, num_sms, kWgRowsJ, kWgB, kWgMaxSplits);
}

bool linear_wgmma_usable(const LinearDirect& g) {
  if (!cuda_variant_on(CudaVariant::kLinearWgmma)) return false;
  if (g.dtype == DType::kFloat32 || !aligned16(g.A) || g.d_in % 8 != 0) return false;
  return current_device_is_cc90();
}

void linear_wgmma(const LinearDirect& g, const DirectTilePlan& pl, float* part,
                  std::uintptr_t stream) {
  const DirectParams prm = direct_params(g, pl, part);
  cudaStream_t st = as_stream(stream);
  auto launch = [&](auto kernel) {
    allow_smem(kernel, kWgSmemBytes, "linear_wgmma_kernel");
    kernel<<<grid_1d(pl.tiles_j * pl.tiles_b * pl.splits, "linear_wgmma_kernel"), kWgThreads,
             kWgSmemBytes, st>>>(prm);
    check_launch("linear_wgmma_kernel launch");
  };
  if (g.dtype == DType::kBFloat16) {
    launch(linear_wgmma_kernel<__nv_bfloat16>);
  } else {
    launch(linear_wgmma_kernel<__half>);
  }
  note_cuda_variant_launch(CudaVariant::kLinearWgmma);
  if (pl.splits > 1)
    reduce_partials(part, pl.splits, g.B * g.N, g.scale, g.out, g.accumulate, stream);
}

}  // namespace issl_fast::cuda::detail
