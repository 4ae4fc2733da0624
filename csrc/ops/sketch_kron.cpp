#include "issl_fast/sketch_kron.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "convert.h"
#include "gemm.h"
#include "issl_fast/hash.h"
#include "validate.h"

namespace issl_fast {
namespace {

// Rows (examples x T) projected per GEMM: enough to fill the MR-row micro-tiles at any T. More
// is slower at T = 64 (the chunk's A panel is read in place once per NR column group and falls
// out of L1: 128 or 256 rows took 3-8% longer), so T > 32 keeps one example per GEMM. At T = 1
// (B=256, d=1024, k=64) this took the op from 3.5 ms to 1.0 ms on 2 threads.
constexpr int64_t kChunkRows = 64;

// P^T [d x kp] (scaled) packed once per call as GEMM B-panels, one per KC block of d. It is
// k_p x d floats: small, and shared read-only by all threads.
struct PackedProjection {
  int64_t d, kp, n_pad;
  cpu::Scratch data;
  PackedProjection(const cpu::IsaKernels& K, uint64_t key, Dist dist, int64_t d_, int64_t kp_)
      : d(d_), kp(kp_), n_pad(cpu::ceil_div(kp_, K.nr) * K.nr) {
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(kp)));
    data.resize(cpu::ceil_div(d, K.kc) * K.kc * n_pad);
    for (int64_t p0 = 0; p0 < d; p0 += K.kc)
      cpu::pack_random_panel(K, key, dist, p0, std::min(K.kc, d - p0), 0, kp, kp, scale,
                             panel(K, p0));
  }
  float* panel(const cpu::IsaKernels& K, int64_t p0) { return data.data() + (p0 / K.kc) * K.kc * n_pad; }
};

}  // namespace

void sketch_kron_cpu(const void* A, const void* D, DType dtype, int64_t B, int64_t T,
                     int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out, uint64_t seed,
                     Dist dist, float* out, bool accumulate, int num_threads) {
  cpu::require_dtype(dtype);
  cpu::require_dist(dist);
  cpu::require_nonneg(B, "B");
  cpu::require_nonneg(T, "T");
  cpu::require_pos(d_in, "d_in");
  cpu::require_pos(d_out, "d_out");
  cpu::require_pos(k_in, "k_in");
  cpu::require_pos(k_out, "k_out");
  cpu::require_ptr(A, B * T * d_in, "A");
  cpu::require_ptr(D, B * T * d_out, "D");
  cpu::require_ptr(out, B * k_in * k_out, "out");

  const cpu::IsaKernels& K = cpu::isa();
  // A projection to at most one vector of columns uses the narrow tile (same results).
  auto tile_for = [&K](int64_t kp) -> const cpu::IsaKernels& {
    return K.narrow && kp <= K.narrow->nr ? *K.narrow : K;
  };
  const cpu::IsaKernels& Kin = tile_for(k_in);
  const cpu::IsaKernels& Kout = tile_for(k_out);
  PackedProjection p_in(Kin, stream_key(seed, Role::kKronIn, dist), dist, d_in, k_in);
  PackedProjection p_out(Kout, stream_key(seed, Role::kKronOut, dist), dist, d_out, k_out);
  const int64_t ky = k_in * k_out;
  // Examples are taken a chunk at a time, so that the projections see ~kChunkRows rows (B*T
  // flattened) whatever T is: with T = 1 (a Linear layer without a sequence axis) one example per
  // GEMM would use 1 row of each MR-row micro-tile. Each row's FMA sequence does not depend on
  // its position in the chunk, so results are independent of the chunking and thread count.
  // The chunks come in whole rounds of the threads (B = 64, T = 3 on 2 threads: 4 x 16
  // examples, not 3 x 21 + 1), so that the static schedule gives every thread an equal share.
  const int64_t want_threads = cpu::clamp_threads(num_threads);
  int64_t chunk = std::max<int64_t>(1, kChunkRows / std::max<int64_t>(T, 1));
  const int64_t rounds =
      std::max<int64_t>(1, cpu::ceil_div(cpu::ceil_div(B, chunk), want_threads));
  chunk = std::max<int64_t>(1, cpu::ceil_div(B, rounds * want_threads));
  const int64_t n_chunks = cpu::ceil_div(B, chunk);
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(want_threads, std::max<int64_t>(n_chunks, 1))));
  const int64_t max_rows = std::min(B, chunk) * T;

#pragma omp parallel num_threads(threads)
  {
    // Half-precision inputs are upcast once per chunk (vectorised) and then read in place.
    const bool upcast = dtype != DType::kFloat32;
    cpu::Scratch abuf(upcast ? std::max<int64_t>(max_rows * std::max(d_in, d_out), 1) : 1);
    cpu::Scratch bpack(K.kc * cpu::ceil_div(k_in, K.nr) * K.nr);  // U_b panels for the wide tile
    cpu::Scratch U(std::max<int64_t>(max_rows * k_in, 1)), V(std::max<int64_t>(max_rows * k_out, 1));
    auto as_f32 = [&](const void* src, int64_t n) -> const float* {
      if (!upcast) return static_cast<const float*>(src);
      K.to_f32(src, dtype, n, abuf.data());
      return abuf.data();
    };
#pragma omp for schedule(static)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t b0 = c * chunk, nb = std::min(chunk, B - b0), rows = nb * T;
      if (!accumulate) std::fill(out + b0 * ky, out + (b0 + nb) * ky, 0.0f);
      if (rows == 0) continue;
      std::fill(U.data(), U.data() + rows * k_in, 0.0f);
      std::fill(V.data(), V.data() + rows * k_out, 0.0f);
      // U = A_chunk P_in^T [rows x k_in], V = D_chunk P_out^T [rows x k_out]
      const float* Ac = as_f32(cpu::offset_ptr(A, dtype, b0 * T * d_in), rows * d_in);
      cpu::gemm_a_inplace(
          Kin, rows, k_in, d_in, Ac, d_in, 1,
          [&](int64_t p0, int64_t) -> const float* { return p_in.panel(Kin, p0); }, U.data(),
          k_in);
      const float* Dc = as_f32(cpu::offset_ptr(D, dtype, b0 * T * d_out), rows * d_out);
      cpu::gemm_a_inplace(
          Kout, rows, k_out, d_out, Dc, d_out, 1,
          [&](int64_t p0, int64_t) -> const float* { return p_out.panel(Kout, p0); }, V.data(),
          k_out);
      // y_b [k_out x k_in] += V_b^T U_b (sum over t); V_b^T is V_b read in place with swapped
      // strides.
      for (int64_t i = 0; i < nb; ++i) {
        const float* Ub = U.data() + i * T * k_in;
        cpu::gemm_a_inplace(
            K, k_out, k_in, T, V.data() + i * T * k_out, 1, k_out,
            [&](int64_t p0, int64_t pc) -> const float* {
              cpu::pack_b_rowmajor(K, Ub, k_in, k_in, p0, pc, bpack.data());
              return bpack.data();
            },
            out + (b0 + i) * ky, k_in);
      }
    }
  }
}

}  // namespace issl_fast
