// sketch_kron in one kernel (kernel variant CudaVariant::kKronFused, on by default: 1.48x faster
// than the unfused path on an H200, bench/gpu/results/2026-11-28-run5.txt). The unfused path runs two projection GEMMs whose N is only k_in / k_out (half of
// each 128-wide MMA tile idle at 64), writes U and V to memory and reads them back for the outer
// product: three launches, each latency-bound at the benchmark's size. Here one block owns
//   (example b, a split of its T rows, 64 sketch rows c of P_in, 64 sketch rows a of P_out)
// and for each 64-row chunk t of its rows computes
//   U'[t, c] = sum_i A[b, t, i] P_in[c, i]     (MMA, bf16/fp16 exact products, float32 sums)
//   V'[t, a] = sum_o D[b, t, o] P_out[a, o]    (the same with the other role's hash)
// into shared memory, then adds V'[t, a] U'[t, c] over the chunk's t (float32 FMA, t increasing)
// into per-thread registers. A and D stream through one cp.async ring of 64 x 64 tiles, the U
// steps of a chunk, then its V steps, then the next chunk's, so the copies never stop at a phase
// boundary. The sign bits of P_in / P_out come from one hash word per input column (64 sketch
// rows), made into MMA B fragments in registers as in sketch_gemm.cu. Splits of T write partials
// that reduce_partials adds in split order: deterministic for a given shape and SM count.
#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "kron_fused.h"
#include "sketch_gemm.h"

namespace issl_fast::cuda::detail {
namespace {

constexpr int kKfRows = 64;     // T rows per chunk (the MMA M of a block)
constexpr int kKfBN = 64;       // sketch rows per block along k_in and k_out: one hash word
constexpr int kKfBK = 64;       // input columns per K step: 8 KB of A or D per step
constexpr int kKfStages = 4;    // ring depth: three steps (24 KB) in flight per block
constexpr int kKfThreads = 256;
constexpr int kKfAPitch = kKfBK + 8;   // 144-byte rows: ldmatrix phases conflict-free
constexpr int kKfUPitch = kKfBN + 4;   // float rows, 16-byte aligned for float4 reads
// Warps: 2 along the rows (32 each) x 4 along the sketch rows (16 each).
constexpr int kKfWarpM = 32;
constexpr int kKfWarpN = 16;
constexpr int kKfMT = kKfWarpM / 16;
constexpr int kKfNT = kKfWarpN / 8;
// U and V are recomputed for every output block of the other factor: above this many blocks the
// unfused path (each projection once) does less work.
constexpr int64_t kKfMaxBlocks = 4;
// ~73 KB of shared memory and ~103 registers: two blocks per SM (registers allow no more) on
// every target architecture with 164 KB or more; the split count aims for two.
constexpr int64_t kKfCtasPerSm = 2;
constexpr int64_t kKfMaxSplits = 64;
static_assert(kKfRows * kKfBK == 2 * 8 * kKfThreads, "two 16-byte chunks per thread per step");
static_assert(kKfRows == 2 * kKfWarpM && kKfBN == 4 * kKfWarpN, "2 x 4 warps");

struct alignas(16) KfSmem {
  uint16_t a[kKfStages][kKfRows][kKfAPitch];  // A or D rows of one step
  uint32_t bits[kKfStages][kKfBK][2];         // sign bits: bit j of column p = P[n0 + j, p] < 0
  float u[kKfRows][kKfUPitch];                // U' of the chunk
  float v[kKfRows][kKfUPitch];                // V' of the chunk
};

struct KfParams {
  const void* A;
  const void* D;
  int64_t B, T, d_in, d_out, k_in, k_out;
  uint64_t key_in, key_out;
  float scale;
  float* out;
  float* part;
  int64_t in_blocks, out_blocks, splits, row_chunks;
  int64_t nk_in, nk_out;  // K steps of the U and V phases
  int vec_in, vec_out;    // 16-byte chunk loads are aligned (and whole, as d % 8 == 0)
  int accumulate;
};

// The step being issued or computed: (row chunk, phase 0 = U / 1 = V, K step), advanced in order.
struct KfCursor {
  int64_t chunk = 0, kstep = 0;
  int phase = 0;
  __device__ __forceinline__ void next(const KfParams& p) {
    if (++kstep == (phase == 0 ? p.nk_in : p.nk_out)) {
      kstep = 0;
      phase ^= 1;
      if (phase == 0) ++chunk;
    }
  }
};

template <class InT>
__global__ void __launch_bounds__(kKfThreads, 2) kron_fused_kernel(const KfParams p) {
  using MmaT = std::conditional_t<std::is_same_v<InT, __half>, __half, __nv_bfloat16>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  KfSmem& sm = *reinterpret_cast<KfSmem*>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t bid = blockIdx.x;
  const int64_t cb = bid % p.in_blocks;
  const int64_t ab = (bid / p.in_blocks) % p.out_blocks;
  const int64_t b = (bid / (p.in_blocks * p.out_blocks)) % p.B;
  const int64_t split = bid / (p.in_blocks * p.out_blocks * p.B);
  const int64_t ch_begin = p.row_chunks * split / p.splits;
  const int64_t ch_end = p.row_chunks * (split + 1) / p.splits;
  const int64_t nsteps = (ch_end - ch_begin) * (p.nk_in + p.nk_out);

  // Step issue: a 64 x 64 tile of A or D into ring slot `slot` (cp.async when aligned, else
  // element loads and shared stores, seen after the barriers before its MMAs), and the sign words
  // of its 64 input columns (64 sketch rows starting at block * 64: hash word `block`).
  auto issue = [&](const KfCursor& cu, int slot) {
    const bool v = cu.phase == 1;
    const int64_t K = v ? p.d_out : p.d_in;
    const int64_t t0 = cu.chunk * kKfRows;
    const int64_t rows = p.T - t0 < kKfRows ? p.T - t0 : kKfRows;
    const int64_t k0 = cu.kstep * kKfBK;
    const uint16_t* base = static_cast<const uint16_t*>(v ? p.D : p.A);
    const uint16_t* src = base + (b * p.T + t0) * K + k0;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int c = tid + u * kKfThreads;
      const int row = c >> 3, col = (c & 7) * 8;
      uint16_t* dst = &sm.a[slot][row][col];
      const uint16_t* s = src + row * K + col;
      if (v ? p.vec_out : p.vec_in) {
        const bool ok = row < rows && k0 + col < K;
        cp_async16(smem_u32(dst), ok ? s : base, ok);  // !ok: zero-fill, nothing read
      } else {
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool ok0 = row < rows && k0 + col + 2 * e < K;
          const bool ok1 = row < rows && k0 + col + 2 * e + 1 < K;
          const uint32_t lo = ok0 ? s[2 * e] : 0u, hi = ok1 ? s[2 * e + 1] : 0u;
          w[e] = lo | (hi << 16);
        }
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
    if (tid < kKfBK) {
      const uint64_t ck = column_key(v ? p.key_out : p.key_in, static_cast<uint64_t>(k0 + tid));
      const uint64_t word = hash_word(ck, static_cast<uint64_t>(v ? ab : cb));
      sm.bits[slot][tid][0] = static_cast<uint32_t>(word);
      sm.bits[slot][tid][1] = static_cast<uint32_t>(word >> 32);
    }
  };

  float acc[kKfMT][kKfNT][4];
  auto zero_acc = [&]() {
#pragma unroll
    for (int i = 0; i < kKfMT; ++i)
#pragma unroll
      for (int j = 0; j < kKfNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  };
  zero_acc();

  auto compute = [&](int slot) {
    // This warp's 16 sketch rows are bits [16 warp_n, 16 warp_n + 16) of each column's word.
    const uint32_t* sb = &sm.bits[slot][0][warp_n >> 1];
    const int sh = (warp_n & 1) * 16 + g;
    constexpr uint32_t kOnes = PlusOne<MmaT>::kBits * 0x10001u;
#pragma unroll
    for (int kk = 0; kk < kKfBK; kk += 16) {
      // B fragment of m16n8k16: b0 = rows 2 t4, 2 t4 + 1 of column g, b1 the same + 8; a set bit
      // is -1 (+1 with the sign bit set).
      const int r0 = kk + 2 * t4;
      const uint32_t x0 = sb[(r0 + 0) * 2] >> sh, x1 = sb[(r0 + 1) * 2] >> sh;
      const uint32_t x8 = sb[(r0 + 8) * 2] >> sh, x9 = sb[(r0 + 9) * 2] >> sh;
      uint32_t bf[kKfNT][2];
#pragma unroll
      for (int nt = 0; nt < kKfNT; ++nt) {
        const int s8 = 8 * nt;
        bf[nt][0] = kOnes | (((x0 >> s8) & 1u) << 15) | (((x1 >> s8) & 1u) << 31);
        bf[nt][1] = kOnes | (((x8 >> s8) & 1u) << 15) | (((x9 >> s8) & 1u) << 31);
      }
#pragma unroll
      for (int mt = 0; mt < kKfMT; ++mt) {
        uint32_t a[4];
        ldmatrix_x4(a, smem_u32(&sm.a[slot][warp_m * kKfWarpM + mt * 16 + (lane & 15)]
                                    [kk + (lane >> 4) * 8]));
#pragma unroll
        for (int nt = 0; nt < kKfNT; ++nt) mma_16816<MmaT>(acc[mt][nt], a, bf[nt][0], bf[nt][1]);
      }
    }
  };

  // The phase's accumulators into U' or V' (row t of the chunk, sketch row within the block).
  auto store_acc = [&](float (*dst)[kKfUPitch]) {
#pragma unroll
    for (int mt = 0; mt < kKfMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int nt = 0; nt < kKfNT; ++nt) {
          const int row = warp_m * kKfWarpM + mt * 16 + g + 8 * h;
          const int col = warp_n * kKfWarpN + nt * 8 + 2 * t4;
          *reinterpret_cast<float2*>(&dst[row][col]) =
              make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
        }
  };

  // Thread (ta, tc) owns outputs a = 4 ta + i, c = 4 tc + j of the block: 16 running sums over t.
  const int ta = tid >> 4, tc = tid & 15;
  float out4[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) out4[i][j] = 0.0f;
  auto outer = [&](int64_t chunk) {
    const int64_t left = p.T - chunk * kKfRows;
    const int rows = static_cast<int>(left < kKfRows ? left : kKfRows);
    for (int r = 0; r < rows; ++r) {
      const float4 vv = *reinterpret_cast<const float4*>(&sm.v[r][4 * ta]);
      const float4 uu = *reinterpret_cast<const float4*>(&sm.u[r][4 * tc]);
      const float va[4] = {vv.x, vv.y, vv.z, vv.w}, ua[4] = {uu.x, uu.y, uu.z, uu.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) out4[i][j] = fmaf(va[i], ua[j], out4[i][j]);
    }
  };

  // Ring of kKfStages: step s + kKfStages - 1 is issued into the slot step s - 1 used, after the
  // barrier that ends every read of it; step s waits for its own copies, and the barrier makes
  // them (and its sign words) visible to all. U' and V' are written after the last step of their
  // phase; U' is next written a whole V phase (>= 1 barrier) after the outer product read it.
  KfCursor ci, cc;
  ci.chunk = cc.chunk = ch_begin;
#pragma unroll
  for (int i = 0; i < kKfStages - 1; ++i) {
    if (i < nsteps) {
      issue(ci, i);
      ci.next(p);
    }
    cp_async_commit();  // always: keeps the group count in step with the iterations
  }
  int slot = 0, issue_slot = kKfStages - 1;
  for (int64_t s = 0; s < nsteps; ++s) {
    cp_async_wait<kKfStages - 2>();
    __syncthreads();
    if (s + kKfStages - 1 < nsteps) {
      issue(ci, issue_slot);
      ci.next(p);
    }
    cp_async_commit();
    compute(slot);
    const bool last = cc.kstep + 1 == (cc.phase == 0 ? p.nk_in : p.nk_out);
    if (last) {
      store_acc(cc.phase == 0 ? sm.u : sm.v);
      zero_acc();
      if (cc.phase == 1) {
        __syncthreads();  // U' and V' of the chunk complete
        outer(cc.chunk);
      }
    }
    cc.next(p);
    slot = slot + 1 == kKfStages ? 0 : slot + 1;
    issue_slot = issue_slot + 1 == kKfStages ? 0 : issue_slot + 1;
  }
  cp_async_wait<0>();

  const int64_t kk = p.k_in * p.k_out;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t a = ab * kKfBN + 4 * ta + i;
    if (a >= p.k_out) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = cb * kKfBN + 4 * tc + j;
      if (c >= p.k_in) continue;
      const float val = out4[i][j];
      if (p.splits == 1) {
        float* o = p.out + b * kk + a * p.k_in + c;
        *o = p.accumulate ? *o + p.scale * val : p.scale * val;
      } else {
        p.part[(split * p.B + b) * kk + a * p.k_in + c] = val;
      }
    }
  }
}

}  // namespace

CudaKronPlan kron_plan(DType dtype, int64_t B, int64_t T, int64_t k_in, int64_t k_out, Dist dist,
                       CudaAlgo algo, int num_sms) {
  CudaKronPlan p;
  p.in_blocks = ceil_div(std::max<int64_t>(k_in, 1), kKfBN);
  p.out_blocks = ceil_div(std::max<int64_t>(k_out, 1), kKfBN);
  p.row_chunks = ceil_div(std::max<int64_t>(T, 1), kKfRows);
  p.fused = cuda_variant_on(CudaVariant::kKronFused) && dtype != DType::kFloat32 &&
            dist == Dist::kRademacher && algo != CudaAlgo::kSimt &&
            p.in_blocks * p.out_blocks <= kKfMaxBlocks;
  p.splits = 1;
  if (p.fused) {
    const int64_t base = std::max<int64_t>(B, 1) * p.in_blocks * p.out_blocks;
    const int64_t target = std::max(1, num_sms) * kKfCtasPerSm;
    if (base < target)
      p.splits = std::max<int64_t>(1, std::min({ceil_div(target, base), p.row_chunks, kKfMaxSplits}));
  }
  return p;
}

int64_t kron_fused_partial_floats(const CudaKronPlan& plan, int64_t B, int64_t k_in,
                                  int64_t k_out) {
  return plan.fused && plan.splits > 1 ? plan.splits * B * k_in * k_out : 0;
}

void kron_fused(const KronFused& k, const CudaKronPlan& plan, float* part, std::uintptr_t stream) {
  require(plan.fused, "issl_fast CUDA: kron_fused called without a fused plan");
  require(k.dtype != DType::kFloat32, "issl_fast CUDA: kron_fused takes 16-bit inputs");
  if (k.B <= 0) return;
  KfParams prm{};
  prm.A = k.A;
  prm.D = k.D;
  prm.B = k.B;
  prm.T = k.T;
  prm.d_in = k.d_in;
  prm.d_out = k.d_out;
  prm.k_in = k.k_in;
  prm.k_out = k.k_out;
  prm.key_in = k.key_in;
  prm.key_out = k.key_out;
  prm.scale = k.scale;
  prm.out = k.out;
  prm.part = part;
  prm.in_blocks = plan.in_blocks;
  prm.out_blocks = plan.out_blocks;
  prm.splits = plan.splits;
  prm.row_chunks = plan.row_chunks;
  prm.nk_in = ceil_div(k.d_in, kKfBK);
  prm.nk_out = ceil_div(k.d_out, kKfBK);
  prm.vec_in = aligned16(k.A) && k.d_in % 8 == 0;
  prm.vec_out = aligned16(k.D) && k.d_out % 8 == 0;
  prm.accumulate = k.accumulate ? 1 : 0;
  const int64_t blocks = plan.splits * k.B * plan.in_blocks * plan.out_blocks;
  cudaStream_t st = as_stream(stream);
  const int64_t smem = sizeof(KfSmem);
  auto launch = [&](auto kernel) {
    allow_smem(kernel, smem, "kron_fused_kernel");
    kernel<<<grid_1d(blocks, "kron_fused_kernel"), kKfThreads, smem, st>>>(prm);
    check_launch("kron_fused_kernel launch");
  };
  if (k.dtype == DType::kBFloat16) {
    launch(kron_fused_kernel<__nv_bfloat16>);
  } else {
    launch(kron_fused_kernel<__half>);
  }
  note_cuda_variant_launch(CudaVariant::kKronFused);
  if (plan.splits > 1)
    reduce_partials(part, plan.splits, k.B * k.k_in * k.k_out, k.scale, k.out, k.accumulate,
                    stream);
}

}  // namespace issl_fast::cuda::detail
