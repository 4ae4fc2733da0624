// sketch_sparse on the GPU, deterministic without atomics: each block owns a range of output
// buckets for 32 rows of g (one row per lane), keeps their sums in shared memory transposed
// ([bucket][row], like the CPU's lane groups), and walks its input coordinates in increasing order,
// adding each coordinate's value to the buckets it hashes to. So every output is summed in the
// CPU's order (increasing p); with more than one split of the input coordinates, the splits' sums
// are added afterwards in split order (a fixed order).
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "issl_fast/cuda_ops.h"
#include "sketch_gemm.h"
#include "validate.h"

namespace issl_fast {
namespace {

using cuda::detail::ceil_div;
using cuda::detail::to_f32;
using cuda::detail::xor_sign;

constexpr int kSpRows = 32;          // rows of g per block: one per lane, like the CPU lane groups
constexpr int kSpWarps = 4;
constexpr int kSpThreads = kSpWarps * 32;
constexpr int kSpWarpBuckets = 128;  // buckets each warp owns; a warp adds only into its own
constexpr int kSpRange = kSpWarps * kSpWarpBuckets;  // buckets per block: 512 x 33 floats = 66 KB
constexpr int kSpChunk = kSpThreads;  // input coordinates staged per pass: one hash per thread
constexpr int kSpPitch = kSpRows + 1;  // 33: row-major reads and transposed writes conflict-free
// Splits of the input coordinates: enough blocks for kSpCtasPerSm per SM, partials capped.
constexpr int64_t kSpCtasPerSm = 2;
constexpr int64_t kSpMaxSplits = 64;
constexpr uint32_t kSignBit = 0x80000000u;

struct SpSmem {
  float acc[kSpRange][kSpPitch];  // acc[bucket - j0][row]
  float xs[kSpChunk][kSpPitch];   // scale * g[b0 + row, p0 + pp], transposed
  unsigned long long ck[kSpChunk];
  uint32_t tab[kSpChunk];         // bucket | sign bit for the current replica
};

struct SpParams {
  const void* g;
  int64_t B, P, k, s;
  uint64_t key, col_offset;
  float scale;
  float* out;
  float* part;
  int64_t ranges, groups, splits, chunks;
  int accumulate;
};

struct SpPlan {
  int64_t ranges, groups, chunks, splits;
};

SpPlan make_plan(int64_t B, int64_t P, int64_t k, int num_sms) {
  SpPlan p;
  p.ranges = ceil_div(k, kSpRange);
  p.groups = ceil_div(std::max<int64_t>(B, 1), kSpRows);
  p.chunks = ceil_div(P, kSpChunk);
  const int64_t base = p.ranges * p.groups, target = num_sms * kSpCtasPerSm;
  p.splits = 1;
  if (base < target && p.chunks >= 2)
    p.splits = std::max<int64_t>(1, std::min({target / base, p.chunks, kSpMaxSplits}));
  return p;
}

template <class Alloc>
float* carve(Alloc& a, const SpPlan& pl, int64_t B, int64_t k) {
  return a.template take<float>(pl.splits > 1 ? pl.splits * B * k : 0);
}

// The replica r whose bucket block [r k / s, (r + 1) k / s) holds bucket j (hash.h).
__device__ __forceinline__ int64_t replica_of(int64_t j, int64_t s, int64_t k) {
  int64_t r = j * s / k;
  if (r > s - 1) r = s - 1;
  while (r + 1 < s && (r + 1) * k / s <= j) ++r;
  while (r > 0 && r * k / s > j) --r;
  return r;
}

template <class InT>
__global__ void __launch_bounds__(kSpThreads) sparse_kernel(const SpParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SpSmem& sm = *reinterpret_cast<SpSmem*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bid = blockIdx.x;
  const int64_t range = bid % p.ranges;
  const int64_t grp = (bid / p.ranges) % p.groups;
  const int64_t split = bid / (p.ranges * p.groups);
  const int64_t j0 = range * kSpRange, b0 = grp * kSpRows;
  const int64_t warp_j0 = j0 + warp * kSpWarpBuckets;
  const int64_t c_begin = p.chunks * split / p.splits, c_end = p.chunks * (split + 1) / p.splits;
  const InT* g = static_cast<const InT*>(p.g);

  for (int idx = tid; idx < kSpRange * kSpPitch; idx += kSpThreads) (&sm.acc[0][0])[idx] = 0.0f;
  // Replicas whose bucket blocks meet [j0, j0 + kSpRange): only they can land here.
  const int64_t r_lo = replica_of(j0, p.s, p.k);
  const int64_t j_last = (j0 + kSpRange < p.k ? j0 + kSpRange : p.k) - 1;
  const int64_t r_hi = replica_of(j_last, p.s, p.k);

  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t p0 = c * kSpChunk;
    const int cnt = static_cast<int>(p.P - p0 < kSpChunk ? p.P - p0 : kSpChunk);
    __syncthreads();  // the previous chunk's readers of xs / ck / tab are done
    for (int idx = tid; idx < kSpRows * kSpChunk; idx += kSpThreads) {
      const int row = idx / kSpChunk, pp = idx % kSpChunk;  // consecutive threads: one row
      const int64_t b = b0 + row;
      sm.xs[pp][row] = (b < p.B && pp < cnt) ? to_f32(g[b * p.P + p0 + pp]) * p.scale : 0.0f;
    }
    if (tid < cnt) sm.ck[tid] = column_key(p.key, p.col_offset + static_cast<uint64_t>(p0 + tid));
    for (int64_t r = r_lo; r <= r_hi; ++r) {
      __syncthreads();  // ck / xs written; the previous replica's table fully read
      if (tid < cnt) {
        const uint64_t h = hash_word(sm.ck[tid], static_cast<uint64_t>(r));
        sm.tab[tid] = sparse_bucket(h, r, p.s, p.k) | ((h >> 63) ? kSignBit : 0u);
      }
      __syncthreads();
      // Warp-uniform walk in increasing p: each lane adds its row's value into the bucket.
      for (int pp = 0; pp < cnt; ++pp) {
        const uint32_t e = sm.tab[pp];
        const int64_t rel = static_cast<int64_t>(e & ~kSignBit) - warp_j0;
        if (rel >= 0 && rel < kSpWarpBuckets) {
          float* a = &sm.acc[warp_j0 - j0 + rel][lane];
          *a += xor_sign(sm.xs[pp][lane], e & kSignBit);
        }
      }
    }
  }
  __syncthreads();
  for (int idx = tid; idx < kSpRows * kSpRange; idx += kSpThreads) {
    const int row = idx / kSpRange, lb = idx % kSpRange;  // consecutive threads: one output row
    const int64_t b = b0 + row, j = j0 + lb;
    if (b >= p.B || j >= p.k) continue;
    const float v = sm.acc[lb][row];
    if (p.splits == 1) {
      float* o = p.out + b * p.k + j;
      *o = p.accumulate ? *o + v : v;
    } else {
      p.part[(split * p.B + b) * p.k + j] = v;
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
  prm.ranges = pl.ranges;
  prm.groups = pl.groups;
  prm.splits = pl.splits;
  prm.chunks = pl.chunks;
  prm.accumulate = accumulate ? 1 : 0;
  cudaStream_t st = cuda::detail::as_stream(stream);
  const int64_t smem = sizeof(SpSmem);
  const unsigned grid = cuda::detail::grid_1d(pl.ranges * pl.groups * pl.splits, "sparse_kernel");
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
