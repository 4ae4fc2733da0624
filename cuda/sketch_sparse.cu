// sketch_sparse on the GPU, deterministic without atomics.
//
// Block = (32 rows of g, one per lane) x (a range of output buckets) x (a split of the input
// coordinates). The block keeps its buckets' sums in shared memory, transposed ([bucket][row],
// pitch 33); each of its 16 warps owns a contiguous sub-range of them and only that warp ever
// adds into them. The coordinates go by in units: a chunk of 512 (thread t <-> coordinate
// p0 + t), and more than one unit per chunk only when more than kSpMaxRep replicas meet the
// range. Per unit:
//   1. each thread hashes its coordinate for the unit's replicas (one hash per (p, r), shared by
//      all warps) and ranks its in-range entries by owning warp with ballots: a stable counting
//      sort, entries keep the order (source warp, replica, lane), which is increasing p for any
//      one bucket (a bucket belongs to exactly one replica);
//   2. barrier; the chunk's 32 x 512 values scale * g are stored transposed (loaded into
//      registers a chunk ahead); each warp turns the 16 x 16 count matrix into offsets and
//      places its entries in the owners' lists;
//   3. barrier; each warp walks its own list, four entries at a time (loads first, a bucket
//      repeated within the four chained through registers, stores in order), lane = row: 32
//      useful adds per entry. In the same interval each warp also does step 1 of the next unit
//      (odd warps after their walk, even warps before it, so hashing overlaps the walks).
// So every output is summed from 0.0f in increasing p within a split (the CPU's order), each
// value xor_sign(to_f32(g) * scale, sign) rounded before its add. Splits (a function of the shapes
// and num_sms only) are combined by reduce_partials in split order. The bucket ranges do not
// affect any sum, so their width may follow the device's shared-memory limit.
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "issl_fast/cuda_ops.h"
#include "sketch_gemm.h"
#include "validate.h"

namespace issl_fast {
namespace {

using cuda::detail::ceil_div;
using cuda::detail::round_up;
using cuda::detail::to_f32;
using cuda::detail::xor_sign;

constexpr int kSpRows = 32;  // rows of g per block: one per lane, like the CPU lane groups
constexpr int kSpWarps = 16;
constexpr int kSpWarpBits = 4;  // log2(kSpWarps)
constexpr int kSpThreads = kSpWarps * 32;
constexpr int kSpChunk = kSpThreads;   // coordinates per chunk: one per thread
constexpr int kSpPitch = kSpRows + 1;  // 33: row-major reads and transposed writes conflict-free
constexpr int kSpMaxRep = 4;           // replicas hashed per unit
// Sorted entries of one unit; each warp's list starts at a multiple of 4 (uint4 reads).
constexpr int kSpListCap = kSpMaxRep * kSpChunk + 4 * kSpWarps;
// Nominal buckets per block: sets the split count (shapes and num_sms only). On sm_90 a range of
// this width fits; devices with less shared memory (sm_80: 163 KB, sm_86/89: 99 KB per block)
// use narrower ranges, so more of them (same results, more blocks).
constexpr int64_t kSpNomRange = 1024;
constexpr int64_t kSpCtasPerSm = 1;  // one block per SM (about 210 KB of shared memory each)
constexpr int64_t kSpMaxSplits = 64;
constexpr uint32_t kSignBit = 0x80000000u;
constexpr unsigned kFull = 0xFFFFFFFFu;
static_assert(kSpWarps == 1 << kSpWarpBits, "kSpWarpBits");
static_assert(kSpChunk * kSpPitch < (1 << 16), "entry field for the coordinate");

struct SpParams {
  const void* g;
  int64_t B, P, k, s;
  uint64_t key, col_offset;
  float scale;
  float* out;
  float* part;
  int64_t ranges, groups, splits, chunks;
  int R, Rw;           // buckets per range (the accumulator rows), per warp; R = Rw * kSpWarps
  uint64_t rw_magic;   // floor(2^32 / Rw) + 1: lb / Rw = (lb * rw_magic) >> 32 for lb < R
  int aligned;         // ranges cut at replica boundaries (else at multiples of R)
  int accumulate;
};

// Split count and sizes: shapes and num_sms only (the workspace query has no device).
struct SpPlan {
  int64_t groups, chunks, splits;
};

SpPlan make_plan(int64_t B, int64_t P, int64_t k, int num_sms) {
  SpPlan p;
  p.groups = ceil_div(std::max<int64_t>(B, 1), kSpRows);
  p.chunks = ceil_div(P, kSpChunk);
  const int64_t base = ceil_div(k, kSpNomRange) * p.groups, target = num_sms * kSpCtasPerSm;
  p.splits = 1;
  if (base < target && p.chunks >= 2)
    p.splits = std::max<int64_t>(1, std::min({target / base, p.chunks, kSpMaxSplits}));
  return p;
}

template <class Alloc>
float* carve(Alloc& a, const SpPlan& pl, int64_t B, int64_t k) {
  return a.template take<float>(pl.splits > 1 ? pl.splits * B * k : 0);
}

// Dynamic shared memory of a block with R accumulator rows: acc, xs, the entry list, the count
// matrix and the replica boundaries (at most R + 1 of them: every replica has >= 1 bucket).
int64_t smem_bytes(int64_t R) {
  const int64_t words = R * kSpPitch + int64_t{kSpChunk} * kSpPitch + kSpListCap +
                        kSpWarps * kSpWarps + R + 2;
  return round_up(words * 4, 16);
}

// Bucket ranges for a device allowing smem_limit bytes per block.
struct SpRanges {
  int64_t ranges, R;
  bool aligned;
};

SpRanges make_ranges(int64_t k, int64_t s, int64_t smem_limit) {
  // Widest range that fits, a multiple of kSpWarps (smem_bytes grows by 4 * 34 bytes per row).
  const int64_t fixed = smem_bytes(0) + 16;
  int64_t fit = smem_limit > fixed ? (smem_limit - fixed) / (4 * (kSpPitch + 1)) : 0;
  fit = fit / kSpWarps * kSpWarps;
  while (fit > 0 && smem_bytes(fit) > smem_limit) fit -= kSpWarps;
  if (fit < kSpWarps)
    throw std::runtime_error("issl_fast CUDA: sketch_sparse needs at least " +
                             std::to_string(smem_bytes(kSpWarps)) +
                             " bytes of shared memory per block, the device allows " +
                             std::to_string(smem_limit));
  SpRanges r;
  r.ranges = std::max(ceil_div(k, kSpNomRange), ceil_div(k, fit));
  r.aligned = false;
  if (r.ranges > 1 && s >= r.ranges && r.ranges <= 4096) {
    // Whole replicas per range (range i: replicas [i s / n, (i + 1) s / n)), so that no block
    // hashes a replica it shares with a neighbour. Only when the widest such range fits.
    int64_t widest = 0;
    for (int64_t i = 0; i < r.ranges; ++i) {
      const int64_t lo = (i * s / r.ranges) * k / s, hi = ((i + 1) * s / r.ranges) * k / s;
      widest = std::max(widest, hi - lo);
    }
    if (round_up(widest, kSpWarps) <= fit) {
      r.R = round_up(widest, kSpWarps);
      r.aligned = true;
      return r;
    }
  }
  r.R = round_up(ceil_div(k, r.ranges), kSpWarps);  // <= fit
  r.ranges = ceil_div(k, r.R);
  return r;
}

// The replica r whose bucket block [r k / s, (r + 1) k / s) holds bucket j (hash.h).
__device__ __forceinline__ int64_t replica_of(int64_t j, int64_t s, int64_t k) {
  int64_t r = j * s / k;
  if (r > s - 1) r = s - 1;
  while (r + 1 < s && (r + 1) * k / s <= j) ++r;
  while (r > 0 && r * k / s > j) --r;
  return r;
}

// acc[a] += x for a warp's four entries in order: all loads first, a bucket repeated within the
// four takes the sum just computed for it (so the adds are exactly the sequential ones), stores
// in order (the last store to a repeated bucket holds the latest sum).
__device__ __forceinline__ void walk4(float* aw, const float* xl, uint4 e) {
  const uint32_t a0 = (e.x >> 16) & 0x7FFFu, a1 = (e.y >> 16) & 0x7FFFu;
  const uint32_t a2 = (e.z >> 16) & 0x7FFFu, a3 = (e.w >> 16) & 0x7FFFu;
  const float x0 = xor_sign(xl[e.x & 0xFFFFu], e.x & kSignBit);
  const float x1 = xor_sign(xl[e.y & 0xFFFFu], e.y & kSignBit);
  const float x2 = xor_sign(xl[e.z & 0xFFFFu], e.z & kSignBit);
  const float x3 = xor_sign(xl[e.w & 0xFFFFu], e.w & kSignBit);
  const float o0 = aw[a0], o1 = aw[a1], o2 = aw[a2], o3 = aw[a3];
  const float v0 = o0 + x0;
  const float v1 = (a1 == a0 ? v0 : o1) + x1;
  const float v2 = (a2 == a1 ? v1 : a2 == a0 ? v0 : o2) + x2;
  const float v3 = (a3 == a2 ? v2 : a3 == a1 ? v1 : a3 == a0 ? v0 : o3) + x3;
  aw[a0] = v0;
  aw[a1] = v1;
  aw[a2] = v2;
  aw[a3] = v3;
}

template <class InT>
__global__ void __launch_bounds__(kSpThreads, 1) sparse_kernel(const SpParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* acc = reinterpret_cast<float*>(smem_raw);                  // [R][33]: acc[lb][row]
  float* xs = acc + p.R * kSpPitch;                                  // [512][33]: scale * g
  uint32_t* list = reinterpret_cast<uint32_t*>(xs + kSpChunk * kSpPitch);  // sorted entries
  int* wt = reinterpret_cast<int*>(list + kSpListCap);  // wt[src warp][dst warp]: entry counts
  uint32_t* rlo = reinterpret_cast<uint32_t*>(wt + kSpWarps * kSpWarps);  // replica boundaries

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bid = blockIdx.x;
  const int64_t range = bid % p.ranges;
  const int64_t grp = (bid / p.ranges) % p.groups;
  const int64_t split = bid / (p.ranges * p.groups);
  int64_t j0, j1;
  if (p.aligned) {
    j0 = (range * p.s / p.ranges) * p.k / p.s;
    j1 = ((range + 1) * p.s / p.ranges) * p.k / p.s;
  } else {
    j0 = range * p.R;
    j1 = j0 + p.R < p.k ? j0 + p.R : p.k;
  }
  const uint32_t width = static_cast<uint32_t>(j1 - j0);  // <= R
  const int64_t b0 = grp * kSpRows;
  const int rows = static_cast<int>(p.B - b0 < kSpRows ? p.B - b0 : kSpRows);
  const int64_t c_begin = p.chunks * split / p.splits, c_end = p.chunks * (split + 1) / p.splits;
  // Replicas whose bucket blocks meet [j0, j1): only they can land here (nrep <= width).
  const int64_t r_lo = replica_of(j0, p.s, p.k);
  const int nrep = static_cast<int>(replica_of(j1 - 1, p.s, p.k) - r_lo + 1);
  const int npass = (nrep + kSpMaxRep - 1) / kSpMaxRep;  // pass q holds replicas q + i * npass
  const int64_t units = (c_end - c_begin) * npass;       // (chunk, pass) in order
  const InT* g = static_cast<const InT*>(p.g);

  for (int i = tid; i < p.R * kSpPitch; i += kSpThreads) acc[i] = 0.0f;
  for (int i = tid; i <= nrep; i += kSpThreads)
    rlo[i] = static_cast<uint32_t>((r_lo + i) * p.k / p.s);

  // g for the next chunk, loaded a chunk ahead: pf[row] = g[b0 + row, chunk start + tid].
  InT pf[kSpRows];
  auto load_chunk = [&](int64_t c) {
    const int64_t col = c * kSpChunk + tid;
    const InT* src = g + b0 * p.P + col;
#pragma unroll
    for (int row = 0; row < kSpRows; ++row) {
      pf[row] = (row < rows && col < p.P) ? src[0] : InT{};
      src += p.P;
    }
  };

  const unsigned lt_mask = (1u << lane) - 1u;
  const uint32_t xo = static_cast<uint32_t>(tid * kSpPitch);  // this coordinate's row in xs
  float* aw = acc + warp * p.Rw * kSpPitch + lane;             // this warp's buckets, my row
  const float* xl = xs + lane;

  // ---- 1. hash one unit, rank its entries by owning warp (order: round q, then lane) ---------
  uint32_t eq[kSpMaxRep];
  int dq[kSpMaxRep], lq[kSpMaxRep];
  uint64_t ck = 0;  // column key of this thread's coordinate in the current chunk
  bool in = false;
  auto hash_rank = [&](int64_t c, int pass) {
    if (pass == 0) {
      const int64_t col = c * kSpChunk + tid;
      in = col < p.P;
      ck = column_key(p.key, p.col_offset + static_cast<uint64_t>(col));
    }
    int run = 0;  // lane d < 16: this warp's entries for warp d so far
#pragma unroll
    for (int q = 0; q < kSpMaxRep; ++q) {
      dq[q] = kSpWarps;
      lq[q] = 0;
      eq[q] = 0;
      const int ri = pass + q * npass;  // block-uniform
      if (ri >= nrep) continue;
      int d = kSpWarps;  // owning warp, kSpWarps: none
      uint32_t e = 0;
      if (in) {
        const uint64_t h = hash_word(ck, static_cast<uint64_t>(r_lo + ri));
        const uint32_t lo = rlo[ri], wd = rlo[ri + 1] - lo;
        // sparse_bucket(h, r, s, k) - j0: lo + ((h & 0xffffffff) * (hi - lo)) >> 32 - j0
        const uint32_t lb = lo + __umulhi(static_cast<uint32_t>(h), wd) -
                            static_cast<uint32_t>(j0);  // wraps when below j0
        if (lb < width) {
          d = static_cast<int>((static_cast<uint64_t>(lb) * p.rw_magic) >> 32);
          const uint32_t lbw = lb - static_cast<uint32_t>(d * p.Rw);
          e = (static_cast<uint32_t>(h >> 32) & kSignBit) | ((lbw * kSpPitch) << 16) | xo;
        }
      }
      const unsigned valid = __ballot_sync(kFull, d < kSpWarps);
      unsigned peers = valid, mine = valid;  // same owner as mine; owned by warp `lane`
#pragma unroll
      for (int bit = 0; bit < kSpWarpBits; ++bit) {
        const unsigned bb = __ballot_sync(kFull, (d >> bit) & 1);
        peers &= ((d >> bit) & 1) ? bb : ~bb;
        mine &= ((lane >> bit) & 1) ? bb : ~bb;
      }
      lq[q] = __shfl_sync(kFull, run, d & (kSpWarps - 1)) + __popc(peers & lt_mask);
      run += __popc(mine);
      dq[q] = d;
      eq[q] = e;
    }
    if (lane < kSpWarps) wt[warp * kSpWarps + lane] = run;
  };

  // ---- 2. stage a chunk's values; place this warp's entries --------------------------------
  auto stage = [&](int64_t c) {
#pragma unroll
    for (int row = 0; row < kSpRows; ++row) xs[xo + row] = to_f32(pf[row]) * p.scale;
    if (c + 1 < c_end) load_chunk(c + 1);
  };
  int my_base = 0, my_n = 0;  // this warp's list
  auto place = [&]() {
    int tot = 0, pre = 0;  // lane d < 16: entries for warp d in all warps, in warps < mine
    if (lane < kSpWarps) {
#pragma unroll
      for (int w = 0; w < kSpWarps; ++w) {
        const int v = wt[w * kSpWarps + lane];
        tot += v;
        pre += w < warp ? v : 0;
      }
    }
    const int padded = (tot + 3) & ~3;
    int incl = padded;
#pragma unroll
    for (int o = 1; o < kSpWarps; o <<= 1) {
      const int t = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += t;
    }
    const int base = incl - padded;  // lane d: start of warp d's list
    const int start = base + pre;    // lane d: start of this warp's entries in it
#pragma unroll
    for (int q = 0; q < kSpMaxRep; ++q) {
      const int at = __shfl_sync(kFull, start, dq[q] & (kSpWarps - 1)) + lq[q];
      if (dq[q] < kSpWarps) list[at] = eq[q];
    }
    my_base = __shfl_sync(kFull, base, warp);
    my_n = __shfl_sync(kFull, tot, warp);
  };

  // ---- 3. walk this warp's entries in list order ----------------------------------------
  auto walk = [&]() {
    const uint32_t* L = list + my_base;
    int i = 0;
    for (; i + 4 <= my_n; i += 4) walk4(aw, xl, *reinterpret_cast<const uint4*>(L + i));
    for (; i < my_n; ++i) {
      const uint32_t e = L[i];
      float* a = aw + ((e >> 16) & 0x7FFFu);
      *a += xor_sign(xl[e & 0xFFFFu], e & kSignBit);
    }
  };

  // Pipeline: while walking unit u, the same warps hash unit u + 1 (odd warps walk first, even
  // warps hash first, so that the ALU-bound hashing overlaps the shared-memory-bound walks).
  // Barrier A: counts of u + 1 written, walks of u done (xs and the lists are free). Barrier B:
  // xs and lists of u + 1 written.
  if (units > 0) {
    load_chunk(c_begin);
    __syncthreads();  // acc zeroed, rlo written
    hash_rank(c_begin, 0);
  }
  int64_t c = c_begin;
  int pass = 0;
  for (int64_t u = 0; u < units; ++u) {
    __syncthreads();  // A
    if (pass == 0) stage(c);
    place();
    __syncthreads();  // B
    int64_t cn = c;
    int pn = pass + 1;
    if (pn == npass) {
      pn = 0;
      ++cn;
    }
    const bool more = u + 1 < units;
    if (warp & 1) {
      walk();
      if (more) hash_rank(cn, pn);
    } else {
      if (more) hash_rank(cn, pn);
      walk();
    }
    c = cn;
    pass = pn;
  }
  __syncthreads();
  for (int row = 0; row < rows; ++row) {
    const int64_t b = b0 + row;
    for (int lb = tid; lb < static_cast<int>(width); lb += kSpThreads) {
      const float v = acc[lb * kSpPitch + row];
      const int64_t j = j0 + lb;
      if (p.splits == 1) {
        float* o = p.out + b * p.k + j;
        *o = p.accumulate ? *o + v : v;
      } else {
        p.part[(split * p.B + b) * p.k + j] = v;
      }
    }
  }
}

void validate(DType dtype, int64_t B, int64_t P, int64_t k, int64_t s, int64_t col_offset,
              int num_sms) {
  using namespace cuda::detail;
  require_dtype(dtype);
  require_nonneg(B, "B");
  require_nonneg(P, "P");
  require_pos(k, "k");
  require(k < (int64_t{1} << 31),
              "k must be < 2^31 for sketch_sparse, got " + std::to_string(k));
  require(s >= 1 && s <= k, "s must satisfy 1 <= s <= k, got s=" + std::to_string(s) +
                                    ", k=" + std::to_string(k));
  require_nonneg(col_offset, "col_offset");
  require_pos(num_sms, "num_sms");
}

}  // namespace

int64_t sketch_sparse_cuda_workspace(int64_t B, int64_t P, int64_t k, int64_t s, int num_sms) {
  validate(DType::kFloat32, B, P, k, s, 0, num_sms);
  if (B == 0 || P == 0) return 0;
  cuda::detail::Sizer sz;
  carve(sz, make_plan(B, P, k, num_sms), B, k);
  return sz.bytes();
}

void sketch_sparse_cuda(const void* g, DType dtype, int64_t B, int64_t P, int64_t k, int64_t s,
                        uint64_t seed, int64_t col_offset, float* out, bool accumulate, void* ws,
                        int64_t ws_bytes, int num_sms, std::uintptr_t stream) {
  validate(dtype, B, P, k, s, col_offset, num_sms);
  cuda::detail::require_ptr(g, B * P, "g");
  cuda::detail::require_ptr(out, B * k, "out");
  if (B == 0) return;
  if (P == 0) {
    cuda::detail::zero_unless_accumulate(out, B * k, accumulate, stream);
    return;
  }
  const SpPlan pl = make_plan(B, P, k, num_sms);
  cuda::detail::Carver cv(ws, ws_bytes);
  float* part = carve(cv, pl, B, k);
  const SpRanges rg = make_ranges(k, s, cuda::detail::max_dynamic_smem());
  SpParams prm{};
  prm.g = g;
  prm.B = B;
  prm.P = P;
  prm.k = k;
  prm.s = s;
  prm.key = stream_key(seed, Role::kSparse, Dist::kRademacher);
  prm.col_offset = static_cast<uint64_t>(col_offset);
  prm.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s)));
  prm.out = out;
  prm.part = part;
  prm.ranges = rg.ranges;
  prm.groups = pl.groups;
  prm.splits = pl.splits;
  prm.chunks = pl.chunks;
  prm.R = static_cast<int>(rg.R);
  prm.Rw = static_cast<int>(rg.R / kSpWarps);
  prm.rw_magic = (uint64_t{1} << 32) / static_cast<uint64_t>(prm.Rw) + 1;
  prm.aligned = rg.aligned ? 1 : 0;
  prm.accumulate = accumulate ? 1 : 0;
  cuda::detail::require(int64_t{prm.Rw} * kSpPitch < (1 << 15),
                        "sketch_sparse: bucket range too wide for the entry format");
  cudaStream_t st = cuda::detail::as_stream(stream);
  const int64_t smem = smem_bytes(rg.R);
  const unsigned grid =
      cuda::detail::grid_1d(rg.ranges * pl.groups * pl.splits, "sparse_kernel");
  auto launch = [&](auto kernel) {
    cuda::detail::allow_smem(kernel, smem, "sparse_kernel");
    kernel<<<grid, kSpThreads, smem, st>>>(prm);
    cuda::detail::check_launch("sparse_kernel launch");
  };
  switch (dtype) {
    case DType::kFloat32: launch(sparse_kernel<float>); break;
    case DType::kFloat16: launch(sparse_kernel<__half>); break;
    case DType::kBFloat16: launch(sparse_kernel<__nv_bfloat16>); break;
  }
  if (pl.splits > 1) cuda::detail::reduce_partials(part, pl.splits, B * k, 1.0f, out, accumulate, stream);
}

}  // namespace issl_fast
