// The on-the-fly random-matrix GEMM of the dense sketches (sketch_gemm.h): a tensor-core kernel
// for Rademacher matrices, a SIMT kernel for Gaussian ones, split-K with a fixed-order reduction.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "sketch_gemm.h"
#if defined(ISSL_FAST_WITH_SM90A)
#include "linear_wgmma.h"
#include "linear_ws.h"
#endif

namespace issl_fast::cuda::detail {
namespace {

// ---- tensor-core kernel constants ---------------------------------------------------------------
// Block tile 128 x 128 (examples x sketch rows) with 8 warps of 64 x 32: the shape of the usual
// mma.sync GEMMs (4 x 4 m16n8 tiles per warp, 64 float32 accumulators per thread); BN = 128 is
// exactly two 64-bit hash words per input column, so every generated sign bit is used.
constexpr int kTcBM = 128;
constexpr int kTcBN = 128;
// Reduction depth per pipeline stage: two m16n8k16 steps; with two stages the float32 variant
// (three bf16 copies of the A tile) still fits the 99 KB a block may use on sm_86 / sm_89.
constexpr int kTcBK = 32;
constexpr int kTcStages = 2;
// 16-bit inputs whose rows are 16-byte aligned copy A with cp.async into a deeper ring instead:
// three steps in flight per block hide the global latency that one register-staged step did not
// (a 128-tile kron projection spent ~3.7 us per K step with it).
constexpr int kTcAsyncStages = 4;
constexpr int kTcThreads = 256;
constexpr int kTcWarpM = 64;
constexpr int kTcWarpN = 32;
constexpr int kTcMT = kTcWarpM / 16;  // m16 tiles per warp
constexpr int kTcNT = kTcWarpN / 8;   // n8 tiles per warp
// A row pitch in 16-bit elements. +8 (16 bytes) makes the 8 rows an ldmatrix phase reads start in
// 8 different 16-byte bank groups (80 B pitch), i.e. conflict-free.
constexpr int kTcAPitch = kTcBK + 8;
static_assert(kTcWarpN == 32 && kTcBN == 4 * kTcWarpN,
              "a warp's columns are one 32-bit half of a tile row's two sign words");
// Rows below which the 128-row MMA tile wastes more than the SIMT kernel costs, per MMA pass.
constexpr int64_t kTcMinRowsPerPass = 16;
// Direct sketch_linear (no G): worth it while T MMA passes cost no more than forming G and
// running the three-pass float32 GEMM, and while d_in fills most of a 32-deep stage.
constexpr int64_t kDirectMaxT = 3;
constexpr int64_t kDirectMinDin = 32;

// ---- SIMT kernel constants ----------------------------------------------------------------------
// 64 x 64 tile, 256 threads of 4 x 4 outputs (the classic register-blocked SGEMM); BN = 64 is one
// hash word per input column; BK = 16 keeps the Gaussian tile (16 x 64 Box-Muller draws) small.
constexpr int kSimtBM = 64;
constexpr int kSimtBN = 64;
constexpr int kSimtBK = 16;
constexpr int kSimtThreads = 256;
constexpr int kSimtPad = 4;  // keeps 16-byte float4 reads aligned, shifts banks between rows

// ---- split-K -------------------------------------------------------------------------------------
// Blocks per SM the plan aims for. The dense MMA kernel fits two per SM (~125 registers), and
// with one register-staged stage in flight per block it needs both to hide load latency (a
// 128-tile kron projection ran at 2.5 us per K step with one); the direct kernel (225 registers)
// holds one per SM; the SIMT one several.
constexpr int64_t kTcCtasPerSm = 2;
constexpr int64_t kDirectCtasPerSm = 1;
constexpr int64_t kSimtCtasPerSm = 4;
// A split gets at least this many input columns: below it, the partial-sum traffic outweighs it.
constexpr int64_t kMinColsPerSplit = 256;
// Caps the partial-sum workspace at kMaxSplits * M * N floats.
constexpr int64_t kMaxSplits = 64;

constexpr int kElemThreads = 256;

template <class T>
struct Tag {
  using type = T;
};

template <class F>
void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(Tag<float>{}); return;
    case DType::kFloat16: f(Tag<__half>{}); return;
    case DType::kBFloat16: f(Tag<__nv_bfloat16>{}); return;
  }
  throw std::invalid_argument("issl_fast CUDA: dtype must be float32, float16 or bfloat16");
}

int passes_for(DType dt) { return dt == DType::kFloat32 ? 3 : 1; }

bool use_tensor_cores(DType dt, int64_t M, Dist dist, Algo algo) {
  if (algo == Algo::kSimt) return false;
  if (algo == Algo::kTensorCore) {
    require(dist == Dist::kRademacher,
            "issl_fast CUDA: the tensor-core path needs dist='rademacher' (Gaussian entries are "
            "not exact in 16 bits)");
    return true;
  }
  require(algo == Algo::kAuto, "issl_fast CUDA: algo must be 0 (auto), 1 (simt) or 2 (tensor cores)");
  return dist == Dist::kRademacher && M >= kTcMinRowsPerPass * passes_for(dt);
}

int64_t pick_splits(int64_t tiles, int64_t ksteps, int64_t min_steps, int64_t target) {
  if (tiles >= target || ksteps < 2 * min_steps) return 1;
  int64_t s = target / tiles;
  s = std::min(s, ksteps / min_steps);
  s = std::min(s, kMaxSplits);
  return std::max<int64_t>(1, s);
}

CudaGemmPlan make_plan(DType dt, int64_t M, int64_t cols, int64_t N, Dist dist, Algo algo,
                       int num_sms) {
  require(num_sms >= 1, "issl_fast CUDA: num_sms must be >= 1");
  CudaGemmPlan p;
  p.tensor_cores = use_tensor_cores(dt, M, dist, algo);
  p.passes = p.tensor_cores ? passes_for(dt) : 1;
  p.tile_m = p.tensor_cores ? kTcBM : kSimtBM;
  p.tile_n = p.tensor_cores ? kTcBN : kSimtBN;
  const int64_t bk = p.tensor_cores ? kTcBK : kSimtBK;
  p.tiles_m = ceil_div(std::max<int64_t>(M, 1), p.tile_m);
  p.tiles_n = ceil_div(std::max<int64_t>(N, 1), p.tile_n);
  const int64_t target = num_sms * (p.tensor_cores ? kTcCtasPerSm : kSimtCtasPerSm);
  p.splits = pick_splits(p.tiles_m * p.tiles_n, ceil_div(cols, bk), kMinColsPerSplit / bk, target);
  return p;
}

template <class Alloc>
float* carve_partials(Alloc& a, const CudaGemmPlan& p, int64_t M, int64_t N) {
  return a.template take<float>(p.splits > 1 ? p.splits * M * N : 0);
}

// ---- tensor-core kernel --------------------------------------------------------------------------
struct TcParams {
  const void* x;  // dense: X [M, ld]; direct: A [B, T, d_in]
  const void* d;  // direct: D [B, T, d_out]
  int64_t M, N;
  int64_t ld, cols;        // dense
  int64_t T, d_in, d_out;  // direct
  uint64_t key, col_offset;
  float scale;
  float* out;
  float* part;
  int64_t tiles_m, tiles_n, splits;
  int64_t kunits;  // dense: K steps of kTcBK columns; direct: d_out
  int accumulate;
  int vec;  // 16-byte row loads are aligned and never straddle the valid column range
};

template <int kParts, int kStages>
struct alignas(16) TcSmem {
  uint16_t a[kStages][kParts][kTcBM][kTcAPitch];  // X rows (kParts bf16 terms for float32)
  // The +-1 tile as sign bits: bit j of row p's 128 bits is R[n0 + j, p] < 0. The MMAs' B
  // fragments are made from them in registers (no expanded tile, no ldmatrix for B).
  unsigned long long bits[kStages][kTcBK][kTcBN / 64];
  float d[kStages][kTcBM];                        // direct: D[b, t, o] of the tile rows
};

// Which K step is which: input columns, hash columns, and (direct) the (o, t) it belongs to.
struct Step {
  int64_t row_stride;  // elements between consecutive rows of the A operand
  int64_t elem_off;    // element offset of the step's first column within a row
  int64_t kbase;       // column index of the step's first column within the valid range
  int64_t klimit;      // valid columns: kbase + c < klimit
  uint64_t hash_col;   // hash column of the step's first column
  int64_t d_off;       // direct: element offset of D[0, t, o] (row stride T * d_out)
  bool last;           // direct: last K step of its (o, t): scale Z by D and fold into Y
};

// Walks the K steps in order. Decoding a step index needs 64-bit divisions by nci and T, which
// cost more than a step's MMAs, so the kernel keeps cursors for steps s+1 and s+2 and advances
// them with compares; only the start is divided out.
template <bool kDirect>
struct StepCursor {
  int64_t c = 0, t = 0, o = 0;  // direct: column chunk, t, output row o; dense: c = K step

  __device__ __forceinline__ void init(const TcParams& p, int64_t s, int64_t unit_begin,
                                       int64_t nci) {
    if constexpr (kDirect) {
      c = s % nci;
      const int64_t r = s / nci;
      t = r % p.T;
      o = unit_begin + r / p.T;
    } else {
      c = unit_begin + s;
    }
  }
  __device__ __forceinline__ void next(const TcParams& p, int64_t nci) {
    if constexpr (kDirect) {
      if (++c == nci) {
        c = 0;
        if (++t == p.T) {
          t = 0;
          ++o;
        }
      }
    } else {
      ++c;
    }
  }
  __device__ __forceinline__ Step step(const TcParams& p, int64_t nci) const {
    Step st;
    if constexpr (kDirect) {
      st.row_stride = p.T * p.d_in;
      st.elem_off = t * p.d_in + c * kTcBK;
      st.kbase = c * kTcBK;
      st.klimit = p.d_in;
      st.hash_col = p.col_offset + static_cast<uint64_t>(o * p.d_in + c * kTcBK);
      st.d_off = t * p.d_out + o;
      st.last = c == nci - 1;
    } else {
      const int64_t p0 = c * kTcBK;
      st.row_stride = p.ld;
      st.elem_off = p0;
      st.kbase = p0;
      st.klimit = p.cols;
      st.hash_col = p.col_offset + static_cast<uint64_t>(p0);
      st.d_off = 0;
      st.last = false;
    }
    return st;
  }
};

// Global -> register staging of one A tile (loaded before the MMAs of the current stage, stored
// to shared memory after them, so the loads' latency hides behind the math).
template <class InT>
struct TcLoader;

template <class InT>
struct TcLoader {  // 16-bit inputs: 128 x 32 elements = 512 chunks of 8, two per thread
  static constexpr int kChunks = 2;
  uint4 r[kChunks];
  __device__ __forceinline__ void load(const TcParams& p, const Step& st, int64_t m0, int tid) {
    const uint16_t* base = static_cast<const uint16_t*>(p.x);
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      const int c = tid + u * kTcThreads;
      const int row = c >> 2, col = (c & 3) * 8;
      const int64_t b = m0 + row;
      const int64_t kc = st.kbase + col;
      const uint16_t* src = base + b * st.row_stride + st.elem_off + col;
      if (p.vec) {
        r[u] = (b < p.M && kc < st.klimit) ? *reinterpret_cast<const uint4*>(src)
                                           : make_uint4(0u, 0u, 0u, 0u);
      } else {
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint32_t lo = (b < p.M && kc + 2 * e < st.klimit) ? src[2 * e] : 0u;
          const uint32_t hi = (b < p.M && kc + 2 * e + 1 < st.klimit) ? src[2 * e + 1] : 0u;
          w[e] = lo | (hi << 16);
        }
        r[u] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }
  template <class Smem>
  __device__ __forceinline__ void store(Smem& sm, int stage, int tid) const {
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      const int c = tid + u * kTcThreads;
      const int row = c >> 2, col = (c & 3) * 8;
      *reinterpret_cast<uint4*>(&sm.a[stage][0][row][col]) = r[u];
    }
  }
};

template <>
struct TcLoader<float> {  // float32: 128 x 32 = 1024 chunks of 4, four per thread, split in 3
  static constexpr int kChunks = 4;
  float4 r[kChunks];
  __device__ __forceinline__ void load(const TcParams& p, const Step& st, int64_t m0, int tid) {
    const float* base = static_cast<const float*>(p.x);
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      const int c = tid + u * kTcThreads;
      const int row = c >> 3, col = (c & 7) * 4;
      const int64_t b = m0 + row;
      const int64_t kc = st.kbase + col;
      const float* src = base + b * st.row_stride + st.elem_off + col;
      if (p.vec) {
        r[u] = (b < p.M && kc < st.klimit) ? *reinterpret_cast<const float4*>(src)
                                           : make_float4(0.f, 0.f, 0.f, 0.f);
      } else {
        r[u].x = (b < p.M && kc + 0 < st.klimit) ? src[0] : 0.f;
        r[u].y = (b < p.M && kc + 1 < st.klimit) ? src[1] : 0.f;
        r[u].z = (b < p.M && kc + 2 < st.klimit) ? src[2] : 0.f;
        r[u].w = (b < p.M && kc + 3 < st.klimit) ? src[3] : 0.f;
      }
    }
  }
  template <class Smem>
  __device__ __forceinline__ void store(Smem& sm, int stage, int tid) const {
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      const int c = tid + u * kTcThreads;
      const int row = c >> 3, col = (c & 7) * 4;
      const float v[4] = {r[u].x, r[u].y, r[u].z, r[u].w};
      uint32_t t[3][2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        __nv_bfloat16 h0, m0, l0, h1, m1, l1;
        split3_bf16(v[2 * e], h0, m0, l0);
        split3_bf16(v[2 * e + 1], h1, m1, l1);
        t[0][e] = static_cast<uint32_t>(__bfloat16_as_ushort(h0)) |
                  (static_cast<uint32_t>(__bfloat16_as_ushort(h1)) << 16);
        t[1][e] = static_cast<uint32_t>(__bfloat16_as_ushort(m0)) |
                  (static_cast<uint32_t>(__bfloat16_as_ushort(m1)) << 16);
        t[2][e] = static_cast<uint32_t>(__bfloat16_as_ushort(l0)) |
                  (static_cast<uint32_t>(__bfloat16_as_ushort(l1)) << 16);
      }
#pragma unroll
      for (int part = 0; part < 3; ++part)
        *reinterpret_cast<uint2*>(&sm.a[stage][part][row][col]) = make_uint2(t[part][0], t[part][1]);
    }
  }
};

template <class InT>
__device__ __forceinline__ float load_d(const void* d, int64_t i) {
  return to_f32(static_cast<const InT*>(d)[i]);
}

// kAsync: 16-bit inputs with p.vec (every 16-byte chunk of a row is wholly valid or wholly
// outside the columns), copied with cp.async into a ring of kTcAsyncStages.
template <class InT, bool kAsync>
__host__ __device__ constexpr int tc_stages() {
  static_assert(!kAsync || sizeof(InT) == 2, "cp.async path: 16-bit inputs");
  return kAsync ? kTcAsyncStages : kTcStages;
}

template <class InT, bool kDirect, bool kAsync>
__global__ void __launch_bounds__(kTcThreads) tc_sketch_kernel(const TcParams p) {
  using MmaT = std::conditional_t<std::is_same_v<InT, __half>, __half, __nv_bfloat16>;
  constexpr int kParts = std::is_same_v<InT, float> ? 3 : 1;
  constexpr int kStages = tc_stages<InT, kAsync>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  TcSmem<kParts, kStages>& sm = *reinterpret_cast<TcSmem<kParts, kStages>*>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;  // 2 x 4 warps
  const int g = lane >> 2, t4 = lane & 3;           // MMA fragment coordinates
  const int64_t bid = blockIdx.x;
  const int64_t tn = bid % p.tiles_n;
  const int64_t tm = (bid / p.tiles_n) % p.tiles_m;
  const int64_t split = bid / (p.tiles_n * p.tiles_m);
  const int64_t m0 = tm * kTcBM, n0 = tn * kTcBN;

  // This split's K range: steps of kTcBK columns (dense), or whole output rows o (direct).
  const int64_t nci = kDirect ? ceil_div(p.d_in, kTcBK) : 1;
  const int64_t unit_begin = p.kunits * split / p.splits;
  const int64_t unit_end = p.kunits * (split + 1) / p.splits;
  const int64_t nsteps = kDirect ? (unit_end - unit_begin) * p.T * nci : unit_end - unit_begin;

  float acc[kTcMT][kTcNT][4];
  float z[kDirect ? kTcMT : 1][kDirect ? kTcNT : 1][4];
#pragma unroll
  for (int i = 0; i < kTcMT; ++i)
#pragma unroll
    for (int j = 0; j < kTcNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  if constexpr (kDirect) {
#pragma unroll
    for (int i = 0; i < kTcMT; ++i)
#pragma unroll
      for (int j = 0; j < kTcNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) z[i][j][e] = 0.0f;
  }

  TcLoader<InT> loader;
  float dreg = 0.0f;

  // Sign words of the step's 32 columns x 128 rows: two 64-bit hash words per column.
  auto hash_stage = [&](const Step& st, int stage) {
    if (tid < kTcBK * 2) {
      const int pp = tid >> 1, w = tid & 1;
      const uint64_t ck = column_key(p.key, st.hash_col + static_cast<uint64_t>(pp));
      sm.bits[stage][pp][w] = hash_word(ck, static_cast<uint64_t>(n0 >> 6) + w);
    }
  };
  auto load_stage = [&](const Step& st) {
    loader.load(p, st, m0, tid);
    if constexpr (kDirect) {
      if (st.last && tid < kTcBM) {
        const int64_t b = m0 + tid;
        dreg = b < p.M ? load_d<InT>(p.d, b * p.T * p.d_out + st.d_off) : 0.0f;
      }
    }
  };
  auto store_stage = [&](const Step& st, int stage) {
    loader.store(sm, stage, tid);
    if constexpr (kDirect) {
      if (st.last && tid < kTcBM) sm.d[stage][tid] = dreg;
    }
  };
  // cp.async path: the whole step into ring slot `stage` (A asynchronously; the sign words and
  // D with ordinary stores, seen after the barriers before the step's MMAs).
  auto issue_async = [&](const Step& st, int stage) {
    if constexpr (kAsync) {
      const uint16_t* base = static_cast<const uint16_t*>(p.x);
#pragma unroll
      for (int u = 0; u < 2; ++u) {  // 128 x 32 elements = 512 chunks of 8
        const int c = tid + u * kTcThreads;
        const int row = c >> 2, col = (c & 3) * 8;
        const int64_t b = m0 + row;
        const bool ok = b < p.M && st.kbase + col < st.klimit;
        cp_async16(smem_u32(&sm.a[stage][0][row][col]),
                   ok ? base + b * st.row_stride + st.elem_off + col : base, ok);
      }
      hash_stage(st, stage);
      if constexpr (kDirect) {
        if (st.last && tid < kTcBM) {
          const int64_t b = m0 + tid;
          sm.d[stage][tid] = b < p.M ? load_d<InT>(p.d, b * p.T * p.d_out + st.d_off) : 0.0f;
        }
      }
    }
  };
  auto compute_stage = [&](int stage, float (&target)[kTcMT][kTcNT][4]) {
    // Row p's sign bits as four 32-bit halves; this warp's 32 columns are half warp_n.
    const uint32_t* sb = reinterpret_cast<const uint32_t*>(&sm.bits[stage][0][0]) + warp_n;
#pragma unroll
    for (int kk = 0; kk < kTcBK; kk += 16) {
      // B fragment of an m16n8k16 step: b0 holds rows k = 2 t4, 2 t4 + 1 of column g, b1 the
      // same rows + 8 (low half the even row). A set bit is -1: +1 with the sign bit set.
      const int r0 = kk + 2 * t4;
      const uint32_t x0 = sb[(r0 + 0) * 4] >> g, x1 = sb[(r0 + 1) * 4] >> g;
      const uint32_t x8 = sb[(r0 + 8) * 4] >> g, x9 = sb[(r0 + 9) * 4] >> g;
      constexpr uint32_t kOnes = PlusOne<MmaT>::kBits * 0x10001u;
      uint32_t bf[kTcNT][2];
#pragma unroll
      for (int nt = 0; nt < kTcNT; ++nt) {
        const int sh = 8 * nt;
        bf[nt][0] = kOnes | (((x0 >> sh) & 1u) << 15) | (((x1 >> sh) & 1u) << 31);
        bf[nt][1] = kOnes | (((x8 >> sh) & 1u) << 15) | (((x9 >> sh) & 1u) << 31);
      }
#pragma unroll
      for (int part = 0; part < kParts; ++part) {
#pragma unroll
        for (int mt = 0; mt < kTcMT; ++mt) {
          uint32_t a[4];
          ldmatrix_x4(a, smem_u32(&sm.a[stage][part][warp_m * kTcWarpM + mt * 16 + (lane & 15)]
                                       [kk + (lane >> 4) * 8]));
#pragma unroll
          for (int nt = 0; nt < kTcNT; ++nt)
            mma_16816<MmaT>(target[mt][nt], a, bf[nt][0], bf[nt][1]);
        }
      }
    }
  };
  // Direct: Y += D[b, t, o] * Z row by row, then Z = 0 for the next (o, t).
  auto fold_stage = [&](int stage) {
    if constexpr (kDirect) {
#pragma unroll
      for (int mt = 0; mt < kTcMT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float dv = sm.d[stage][warp_m * kTcWarpM + mt * 16 + g + 8 * h];
#pragma unroll
          for (int nt = 0; nt < kTcNT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              acc[mt][nt][2 * h + e] = fmaf(dv, z[mt][nt][2 * h + e], acc[mt][nt][2 * h + e]);
              z[mt][nt][2 * h + e] = 0.0f;
            }
        }
    }
  };

  if constexpr (kAsync) {
    // Ring of kStages: step s + kStages - 1 is issued into the slot step s - 1 used, after the
    // barrier that ends every read of it; step s waits for its own copies, then the barrier
    // makes them (and its sign words and D, stored when it was issued) visible to all.
    StepCursor<kDirect> ci, cc;  // the next step to issue; the step being computed
    ci.init(p, 0, unit_begin, nci);
    cc = ci;
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) {
      if (i < nsteps) {
        issue_async(ci.step(p, nci), i);
        ci.next(p, nci);
      }
      cp_async_commit();  // always: keeps the group count in step with the iterations
    }
    int slot = 0, issue_slot = kStages - 1;
    for (int64_t s = 0; s < nsteps; ++s) {
      cp_async_wait<kStages - 2>();
      __syncthreads();
      if (s + kStages - 1 < nsteps) {
        issue_async(ci.step(p, nci), issue_slot);
        ci.next(p, nci);
      }
      cp_async_commit();
      if constexpr (kDirect) {
        compute_stage(slot, z);
        if (cc.c == nci - 1) fold_stage(slot);
      } else {
        compute_stage(slot, acc);
      }
      cc.next(p, nci);
      slot = slot + 1 == kStages ? 0 : slot + 1;
      issue_slot = issue_slot + 1 == kStages ? 0 : issue_slot + 1;
    }
    cp_async_wait<0>();
  } else if (nsteps > 0) {
    // Register-staged pipeline, one barrier per step. Step s: load A(s+1) into registers and
    // hash the sign words of step s+1 into bits[(s+1)&1], MMAs on stage s&1, then store A(s+1)
    // into stage (s+1)&1, barrier. Every buffer written in step s was last read by the MMAs /
    // fold of step s-1, before its barrier, and everything read in step s+1 was written before
    // the barrier of step s.
    StepCursor<kDirect> c1;  // step s + 1
    c1.init(p, 0, unit_begin, nci);
    Step st = c1.step(p, nci);
    c1.next(p, nci);
    load_stage(st);
    hash_stage(st, 0);
    store_stage(st, 0);
    __syncthreads();  // stage 0 complete
    for (int64_t s = 0; s < nsteps; ++s) {
      const int cur = static_cast<int>(s & 1), nxt = cur ^ 1;
      const bool has_next = s + 1 < nsteps;
      const bool fold = kDirect && st.last;
      Step nst;
      if (has_next) {
        nst = c1.step(p, nci);
        load_stage(nst);  // global loads in flight during the MMAs
        hash_stage(nst, nxt);
      }
      if constexpr (kDirect) {
        compute_stage(cur, z);
      } else {
        compute_stage(cur, acc);
      }
      if (fold) fold_stage(cur);
      if (has_next) store_stage(nst, nxt);
      __syncthreads();
      if (has_next) st = nst;
      c1.next(p, nci);
    }
  }

  // Epilogue: scale * Y (+ out) into out, or raw Y into this split's partial slice.
#pragma unroll
  for (int mt = 0; mt < kTcMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + warp_m * kTcWarpM + mt * 16 + g + 8 * h;
      if (row >= p.M) continue;
#pragma unroll
      for (int nt = 0; nt < kTcNT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = n0 + warp_n * kTcWarpN + nt * 8 + 2 * t4 + e;
          if (col >= p.N) continue;
          const float v = acc[mt][nt][2 * h + e];
          if (p.splits == 1) {
            float* o = p.out + row * p.N + col;
            *o = p.accumulate ? *o + p.scale * v : p.scale * v;
          } else {
            p.part[(split * p.M + row) * p.N + col] = v;
          }
        }
    }
}

// ---- SIMT kernel ---------------------------------------------------------------------------------
struct SimtParams {
  const void* x;
  int64_t M, N, ld, cols;
  uint64_t key, col_offset;
  int gaussian;
  float scale;
  float* out;
  float* part;
  int64_t tiles_m, tiles_n, splits, ksteps;
  int accumulate;
};

template <class InT>
__global__ void __launch_bounds__(kSimtThreads) simt_sketch_kernel(const SimtParams p) {
  __shared__ __align__(16) float sa[kSimtBK][kSimtBM + kSimtPad];  // X tile, transposed [p][m]
  __shared__ __align__(16) float sb[kSimtBK][kSimtBN + kSimtPad];  // R tile [p][j]
  __shared__ unsigned long long sck[kSimtBK];                      // column keys
  __shared__ unsigned long long sword[kSimtBK];                    // Rademacher sign words

  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t bid = blockIdx.x;
  const int64_t tn = bid % p.tiles_n;
  const int64_t tm = (bid / p.tiles_n) % p.tiles_m;
  const int64_t split = bid / (p.tiles_n * p.tiles_m);
  const int64_t m0 = tm * kSimtBM, n0 = tn * kSimtBN;
  const int64_t s_begin = p.ksteps * split / p.splits, s_end = p.ksteps * (split + 1) / p.splits;
  const InT* x = static_cast<const InT*>(p.x);

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int64_t s = s_begin; s < s_end; ++s) {
    const int64_t p0 = s * kSimtBK;
    __syncthreads();  // the previous step's reads are done
#pragma unroll
    for (int u = 0; u < (kSimtBM * kSimtBK) / kSimtThreads; ++u) {
      const int idx = tid + u * kSimtThreads;
      const int row = idx / kSimtBK, col = idx % kSimtBK;
      const int64_t b = m0 + row, pc = p0 + col;
      sa[col][row] = (b < p.M && pc < p.cols) ? to_f32(x[b * p.ld + pc]) : 0.0f;
    }
    if (tid < kSimtBK) {
      const uint64_t ck = column_key(p.key, p.col_offset + static_cast<uint64_t>(p0 + tid));
      sck[tid] = ck;
      sword[tid] = hash_word(ck, static_cast<uint64_t>(n0 >> 6));  // BN = 64: one word
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < (kSimtBN * kSimtBK) / kSimtThreads; ++u) {
      const int idx = tid + u * kSimtThreads;
      const int kk = idx / kSimtBN, n = idx % kSimtBN;
      const int64_t j = n0 + n;
      float r;
      if (p.gaussian) {
        r = j < p.N ? gaussian_from_hash(hash_word(sck[kk], static_cast<uint64_t>(j))) : 0.0f;
      } else {
        r = ((sword[kk] >> n) & 1ull) ? -1.0f : 1.0f;  // n0 % 64 == 0, so bit (j & 63) = n
      }
      sb[kk][n] = r;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtBK; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(&sa[kk][ty * 4]);
      const float4 bv = *reinterpret_cast<const float4*>(&sb[kk][tx * 4]);
      const float a[4] = {av.x, av.y, av.z, av.w};
      const float bb[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], bb[j], acc[i][j]);
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + ty * 4 + i;
    if (row >= p.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx * 4 + j;
      if (col >= p.N) continue;
      if (p.splits == 1) {
        float* o = p.out + row * p.N + col;
        *o = p.accumulate ? *o + p.scale * acc[i][j] : p.scale * acc[i][j];
      } else {
        p.part[(split * p.M + row) * p.N + col] = acc[i][j];
      }
    }
  }
}

// out = (accumulate ? out : 0) + scale * sum_s part[s] (s increasing: a fixed order).
__global__ void reduce_splits_kernel(const float* __restrict__ part, int64_t splits, int64_t n,
                                     float scale, float* __restrict__ out, int accumulate) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float s = 0.0f;
    for (int64_t k = 0; k < splits; ++k) s += part[k * n + i];
    out[i] = accumulate ? out[i] + scale * s : scale * s;
  }
}

template <class InT>
__global__ void form_grad_kernel(const InT* __restrict__ A, const InT* __restrict__ D, int64_t B,
                                 int64_t T, int64_t d_in, int64_t d_out, int64_t p0, int64_t pc,
                                 float* __restrict__ W, int64_t ldw) {
  const int64_t total = B * pc;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t b = idx / pc, pp = idx % pc;
    const int64_t pcol = p0 + pp;
    const int64_t o = pcol / d_in, i = pcol % d_in;
    float acc = 0.0f;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = b * T + t;
      acc = fmaf(to_f32(D[row * d_out + o]), to_f32(A[row * d_in + i]), acc);
    }
    W[b * ldw + pp] = acc;
  }
}

// Many positions per example (a convolution's pixels): G_b's columns window [p0, p0 + pc) as
// 64 x 64 (o, i) tiles of rows o_lo.. of G_b, 4 x 4 per thread, T in chunks of 16 through shared
// memory (kron_outer_kernel's scheme), so A_b and D_b come from shared memory instead of once per
// element of G from L2. Each element is still fmaf(D, A, acc) over t in increasing order from
// 0: the same value as form_grad_kernel's.
constexpr int kFormTile = 64;
constexpr int kFormTK = 16;
// From this many positions per example on, the tiled kernel forms G (identical results).
constexpr int64_t kFormTiledMinT = 8;

template <class InT>
__global__ void __launch_bounds__(256) form_grad_tiled_kernel(
    const InT* __restrict__ A, const InT* __restrict__ D, int64_t T, int64_t d_in, int64_t d_out,
    int64_t p0, int64_t pc, int64_t o_lo, int64_t tiles_i, int64_t tiles_o,
    float* __restrict__ W, int64_t ldw) {
  __shared__ __align__(16) float sd[kFormTK][kFormTile + 4];
  __shared__ __align__(16) float sa[kFormTK][kFormTile + 4];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t bid = blockIdx.x;
  const int64_t ti = bid % tiles_i;
  const int64_t to = (bid / tiles_i) % tiles_o;
  const int64_t b = bid / (tiles_i * tiles_o);
  const int64_t o0 = o_lo + to * kFormTile, i0 = ti * kFormTile;
  float acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;
  for (int64_t t0 = 0; t0 < T; t0 += kFormTK) {
    __syncthreads();
#pragma unroll
    for (int u = 0; u < (kFormTile * kFormTK) / 256; ++u) {
      const int idx = tid + u * 256;
      const int tt = idx / kFormTile, xx = idx % kFormTile;
      const int64_t t = t0 + tt;
      sd[tt][xx] = (t < T && o0 + xx < d_out) ? to_f32(D[(b * T + t) * d_out + o0 + xx]) : 0.0f;
      sa[tt][xx] = (t < T && i0 + xx < d_in) ? to_f32(A[(b * T + t) * d_in + i0 + xx]) : 0.0f;
    }
    __syncthreads();
    const int64_t steps = T - t0 < kFormTK ? T - t0 : kFormTK;  // (no padded terms: same sums)
    for (int tt = 0; tt < steps; ++tt) {
      const float4 dv = *reinterpret_cast<const float4*>(&sd[tt][ty * 4]);
      const float4 av = *reinterpret_cast<const float4*>(&sa[tt][tx * 4]);
      const float dr[4] = {dv.x, dv.y, dv.z, dv.w};
      const float ac[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(dr[r], ac[c], acc[r][c]);
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t o = o0 + ty * 4 + r;
    if (o >= d_out) continue;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t i = i0 + tx * 4 + c;
      const int64_t p = o * d_in + i - p0;  // column of the window
      if (i < d_in && p >= 0 && p < pc) W[b * ldw + p] = acc[r][c];
    }
  }
}

// ---- sketch_kron's outer product ------------------------------------------------------------------
// 64 x 64 (a, c) tile per block, 4 x 4 per thread, T in chunks of 16 through shared memory.
constexpr int kKronTile = 64;
constexpr int kKronTK = 16;

__global__ void __launch_bounds__(256) kron_outer_kernel(const float* __restrict__ U,
                                                         const float* __restrict__ V, int64_t T,
                                                         int64_t k_in, int64_t k_out,
                                                         int64_t tiles_c, int64_t tiles_a,
                                                         float* __restrict__ out, int accumulate) {
  __shared__ __align__(16) float sv[kKronTK][kKronTile + 4];
  __shared__ __align__(16) float su[kKronTK][kKronTile + 4];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t bid = blockIdx.x;
  const int64_t tc = bid % tiles_c;
  const int64_t ta = (bid / tiles_c) % tiles_a;
  const int64_t b = bid / (tiles_c * tiles_a);
  const int64_t a0 = ta * kKronTile, c0 = tc * kKronTile;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  for (int64_t t0 = 0; t0 < T; t0 += kKronTK) {
    __syncthreads();
#pragma unroll
    for (int u = 0; u < (kKronTile * kKronTK) / 256; ++u) {
      const int idx = tid + u * 256;
      const int tt = idx / kKronTile, xx = idx % kKronTile;
      const int64_t t = t0 + tt;
      sv[tt][xx] = (t < T && a0 + xx < k_out) ? V[(b * T + t) * k_out + a0 + xx] : 0.0f;
      su[tt][xx] = (t < T && c0 + xx < k_in) ? U[(b * T + t) * k_in + c0 + xx] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int tt = 0; tt < kKronTK; ++tt) {
      const float4 va = *reinterpret_cast<const float4*>(&sv[tt][ty * 4]);
      const float4 ub = *reinterpret_cast<const float4*>(&su[tt][tx * 4]);
      const float av[4] = {va.x, va.y, va.z, va.w};
      const float bv[4] = {ub.x, ub.y, ub.z, ub.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
  float* y = out + b * k_out * k_in;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t a = a0 + ty * 4 + i;
    if (a >= k_out) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx * 4 + j;
      if (c >= k_in) continue;
      float* o = y + a * k_in + c;
      *o = accumulate ? *o + acc[i][j] : acc[i][j];
    }
  }
}

__global__ void zero_kernel(float* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = 0.0f;
}

void reduce_splits(const CudaGemmPlan& pl, const float* part, int64_t M, int64_t N, float scale,
                   float* out, bool accumulate, cudaStream_t st) {
  const int64_t n = M * N;
  reduce_splits_kernel<<<grid_stride_blocks(n, kElemThreads), kElemThreads, 0, st>>>(
      part, pl.splits, n, scale, out, accumulate ? 1 : 0);
  check_launch("reduce_splits_kernel launch");
}

template <class InT, bool kDirect, bool kAsync>
void launch_tc_kernel(const TcParams& prm, const CudaGemmPlan& pl, cudaStream_t st) {
  constexpr int kParts = std::is_same_v<InT, float> ? 3 : 1;
  const int64_t smem = sizeof(TcSmem<kParts, tc_stages<InT, kAsync>()>);
  auto kernel = tc_sketch_kernel<InT, kDirect, kAsync>;
  allow_smem(kernel, smem, "tc_sketch_kernel");
  kernel<<<grid_1d(pl.tiles_m * pl.tiles_n * pl.splits, "tc_sketch_kernel"), kTcThreads, smem, st>>>(prm);
  check_launch("tc_sketch_kernel launch");
}

// 16-bit aligned inputs take the cp.async ring (on an H200: bit-identical, 1.05x on the kron
// projections, 1.15x on direct sketch_linear over the register-staged pipeline, run 5); the rest
// stage A through registers.
template <class InT, bool kDirect>
void launch_tc(const TcParams& prm, const CudaGemmPlan& pl, cudaStream_t st) {
  if constexpr (sizeof(InT) == 2) {
    if (prm.vec) {
      launch_tc_kernel<InT, kDirect, true>(prm, pl, st);
      return;
    }
  }
  launch_tc_kernel<InT, kDirect, false>(prm, pl, st);
}

}  // namespace

// ---- host entry points ---------------------------------------------------------------------------
int64_t dense_gemm_workspace(DType dtype, int64_t M, int64_t cols, int64_t N, Dist dist,
                             Algo algo, int num_sms) {
  if (M <= 0 || N <= 0 || cols <= 0) return 0;
  const CudaGemmPlan pl = make_plan(dtype, M, cols, N, dist, algo, num_sms);
  Sizer sz;
  carve_partials(sz, pl, M, N);
  return sz.bytes();
}

void dense_gemm(const DenseGemm& g, Algo algo, int num_sms, void* ws, int64_t ws_bytes,
                std::uintptr_t stream) {
  if (g.M <= 0 || g.N <= 0) return;
  if (g.cols <= 0) {
    zero_unless_accumulate(g.out, g.M * g.N, g.accumulate, stream);
    return;
  }
  const CudaGemmPlan pl = make_plan(g.dtype, g.M, g.cols, g.N, g.dist, algo, num_sms);
  Carver cv(ws, ws_bytes);
  float* part = carve_partials(cv, pl, g.M, g.N);
  cudaStream_t st = as_stream(stream);
  if (pl.tensor_cores) {
    TcParams prm{};
    prm.x = g.x;
    prm.d = nullptr;
    prm.M = g.M;
    prm.N = g.N;
    prm.ld = g.ld;
    prm.cols = g.cols;
    prm.T = prm.d_in = prm.d_out = 0;
    prm.key = g.key;
    prm.col_offset = g.col_offset;
    prm.scale = g.scale;
    prm.out = g.out;
    prm.part = part;
    prm.tiles_m = pl.tiles_m;
    prm.tiles_n = pl.tiles_n;
    prm.splits = pl.splits;
    prm.kunits = ceil_div(g.cols, kTcBK);
    prm.accumulate = g.accumulate ? 1 : 0;
    const int64_t v = g.dtype == DType::kFloat32 ? 4 : 8;  // elements per 16 bytes
    prm.vec = (aligned16(g.x) && g.ld % v == 0 && g.cols % v == 0) ? 1 : 0;
    dispatch_dtype(g.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      launch_tc<T, false>(prm, pl, st);
    });
  } else {
    SimtParams prm{};
    prm.x = g.x;
    prm.M = g.M;
    prm.N = g.N;
    prm.ld = g.ld;
    prm.cols = g.cols;
    prm.key = g.key;
    prm.col_offset = g.col_offset;
    prm.gaussian = g.dist == Dist::kGaussian ? 1 : 0;
    prm.scale = g.scale;
    prm.out = g.out;
    prm.part = part;
    prm.tiles_m = pl.tiles_m;
    prm.tiles_n = pl.tiles_n;
    prm.splits = pl.splits;
    prm.ksteps = ceil_div(g.cols, kSimtBK);
    prm.accumulate = g.accumulate ? 1 : 0;
    dispatch_dtype(g.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      simt_sketch_kernel<T><<<grid_1d(pl.tiles_m * pl.tiles_n * pl.splits, "simt_sketch_kernel"),
                              kSimtThreads, 0, st>>>(prm);
      check_launch("simt_sketch_kernel launch");
    });
  }
  if (pl.splits > 1) reduce_splits(pl, part, g.M, g.N, g.scale, g.out, g.accumulate, st);
}

bool linear_direct_ok(DType dtype, int64_t B, int64_t T, int64_t d_in, Dist dist, Algo algo) {
  if (dtype == DType::kFloat32) return false;  // three passes either way: form G instead
  if (T < 1 || T > kDirectMaxT || d_in < kDirectMinDin) return false;
  return use_tensor_cores(dtype, B, dist, algo);
}

namespace {
CudaGemmPlan direct_plan(int64_t B, int64_t T, int64_t d_in, int64_t d_out, int64_t N,
                         int num_sms) {
  require(num_sms >= 1, "issl_fast CUDA: num_sms must be >= 1");
  CudaGemmPlan p;
  p.tensor_cores = true;
  p.passes = 1;
  p.tile_m = kTcBM;
  p.tile_n = kTcBN;
  p.tiles_m = ceil_div(std::max<int64_t>(B, 1), kTcBM);
  p.tiles_n = ceil_div(std::max<int64_t>(N, 1), kTcBN);
  const int64_t ksteps = d_out * T * ceil_div(d_in, kTcBK);
  p.splits = std::min(d_out, pick_splits(p.tiles_m * p.tiles_n, ksteps, kMinColsPerSplit / kTcBK,
                                         num_sms * kDirectCtasPerSm));
  return p;
}
}  // namespace

int64_t linear_direct_workspace(DType, int64_t B, int64_t T, int64_t d_in, int64_t d_out,
                                int64_t N, int num_sms) {
  if (B <= 0 || T <= 0 || N <= 0) return 0;
  const CudaGemmPlan pl = direct_plan(B, T, d_in, d_out, N, num_sms);
  Sizer sz;
  carve_partials(sz, pl, B, N);
  int64_t bytes = sz.bytes();
#if defined(ISSL_FAST_WITH_SM90A)
  // The wgmma routes are chosen at launch (they need the device and A's alignment): room for
  // any of them.
  if (cuda_variant_on(CudaVariant::kLinearWgmma)) {
    Sizer wz;
    wz.take<float>(direct_tile_partial_floats(linear_wgmma_plan(B, N, d_out, num_sms), B, N));
    bytes = std::max(bytes, wz.bytes());
  }
  for (const int pair : {1, 2}) {
    const bool on = pair == 1 ? cuda_variant_on(CudaVariant::kLinearWs) ||
                                    cuda_variant_on(CudaVariant::kLinearWsRegs)
                              : cuda_variant_on(CudaVariant::kLinearWsPair);
    if (!on) continue;
    Sizer wz;
    wz.take<float>(direct_tile_partial_floats(linear_ws_plan(B, N, d_out, num_sms, pair), B, N));
    bytes = std::max(bytes, wz.bytes());
  }
#endif
  return bytes;
}

void linear_direct(const LinearDirect& g, int num_sms, void* ws, int64_t ws_bytes,
                   std::uintptr_t stream) {
  if (g.B <= 0 || g.N <= 0) return;
  if (g.T <= 0) {
    zero_unless_accumulate(g.out, g.B * g.N, g.accumulate, stream);
    return;
  }
#if defined(ISSL_FAST_WITH_SM90A)
  if (const WsRoute route = linear_ws_route(g); route.pair > 0) {
    const DirectTilePlan wp = linear_ws_plan(g.B, g.N, g.d_out, num_sms, route.pair);
    Carver wcv(ws, ws_bytes);
    linear_ws(g, wp, route, wcv.take<float>(direct_tile_partial_floats(wp, g.B, g.N)), stream);
    return;
  }
  if (linear_wgmma_usable(g)) {
    const DirectTilePlan wp = linear_wgmma_plan(g.B, g.N, g.d_out, num_sms);
    Carver wcv(ws, ws_bytes);
    linear_wgmma(g, wp, wcv.take<float>(direct_tile_partial_floats(wp, g.B, g.N)), stream);
    return;
  }
#endif
  const CudaGemmPlan pl = direct_plan(g.B, g.T, g.d_in, g.d_out, g.N, num_sms);
  Carver cv(ws, ws_bytes);
  float* part = carve_partials(cv, pl, g.B, g.N);
  cudaStream_t st = as_stream(stream);
  TcParams prm{};
  prm.x = g.A;
  prm.d = g.D;
  prm.M = g.B;
  prm.N = g.N;
  prm.ld = prm.cols = 0;
  prm.T = g.T;
  prm.d_in = g.d_in;
  prm.d_out = g.d_out;
  prm.key = g.key;
  prm.col_offset = g.col_offset;
  prm.scale = g.scale;
  prm.out = g.out;
  prm.part = part;
  prm.tiles_m = pl.tiles_m;
  prm.tiles_n = pl.tiles_n;
  prm.splits = pl.splits;
  prm.kunits = g.d_out;
  prm.accumulate = g.accumulate ? 1 : 0;
  prm.vec = (aligned16(g.A) && g.d_in % 8 == 0) ? 1 : 0;
  if (g.dtype == DType::kBFloat16) {
    launch_tc<__nv_bfloat16, true>(prm, pl, st);
  } else if (g.dtype == DType::kFloat16) {
    launch_tc<__half, true>(prm, pl, st);
  } else {
    throw std::invalid_argument("issl_fast CUDA: direct sketch_linear needs float16/bfloat16");
  }
  if (pl.splits > 1) reduce_splits(pl, part, g.B, g.N, g.scale, g.out, g.accumulate, st);
}

void form_linear_grad(const void* A, const void* D, DType dtype, int64_t B, int64_t T,
                      int64_t d_in, int64_t d_out, int64_t p0, int64_t pc, float* W, int64_t ldw,
                      std::uintptr_t stream) {
  if (B <= 0 || pc <= 0) return;
  cudaStream_t st = as_stream(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    if (T >= kFormTiledMinT) {
      const int64_t o_lo = p0 / d_in, o_hi = (p0 + pc - 1) / d_in;
      const int64_t tiles_o = ceil_div(o_hi - o_lo + 1, kFormTile);
      const int64_t tiles_i = ceil_div(d_in, kFormTile);
      form_grad_tiled_kernel<T_><<<grid_1d(B * tiles_o * tiles_i, "form_grad_tiled_kernel"), 256,
                                   0, st>>>(static_cast<const T_*>(A), static_cast<const T_*>(D),
                                            T, d_in, d_out, p0, pc, o_lo, tiles_i, tiles_o, W,
                                            ldw);
      check_launch("form_grad_tiled_kernel launch");
      return;
    }
    form_grad_kernel<T_><<<grid_stride_blocks(B * pc, kElemThreads), kElemThreads, 0, st>>>(
        static_cast<const T_*>(A), static_cast<const T_*>(D), B, T, d_in, d_out, p0, pc, W, ldw);
    check_launch("form_grad_kernel launch");
  });
}

void kron_outer(const float* U, const float* V, int64_t Bc, int64_t T, int64_t k_in,
                int64_t k_out, float* out, bool accumulate, std::uintptr_t stream) {
  if (Bc <= 0) return;
  const int64_t tiles_c = ceil_div(k_in, kKronTile), tiles_a = ceil_div(k_out, kKronTile);
  kron_outer_kernel<<<grid_1d(tiles_c * tiles_a * Bc, "kron_outer_kernel"), 256, 0,
                      as_stream(stream)>>>(U, V, T, k_in, k_out, tiles_c, tiles_a, out,
                                           accumulate ? 1 : 0);
  check_launch("kron_outer_kernel launch");
}

void reduce_partials(const float* part, int64_t splits, int64_t n, float scale, float* out,
                     bool accumulate, std::uintptr_t stream) {
  if (n <= 0) return;
  reduce_splits_kernel<<<grid_stride_blocks(n, kElemThreads), kElemThreads, 0, as_stream(stream)>>>(
      part, splits, n, scale, out, accumulate ? 1 : 0);
  check_launch("reduce_splits_kernel launch");
}

void zero_unless_accumulate(float* out, int64_t n, bool accumulate, std::uintptr_t stream) {
  if (accumulate || n <= 0) return;
  zero_kernel<<<grid_stride_blocks(n, kElemThreads), kElemThreads, 0, as_stream(stream)>>>(out, n);
  check_launch("zero_kernel launch");
}

}  // namespace issl_fast::cuda::detail

namespace issl_fast {

CudaGemmPlan sketch_gemm_cuda_plan(DType dtype, int64_t M, int64_t cols, int64_t N, Dist dist,
                                   CudaAlgo algo, int num_sms) {
  return cuda::detail::make_plan(dtype, M, cols, N, dist, algo, num_sms);
}

}  // namespace issl_fast
