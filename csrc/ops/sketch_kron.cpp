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
  PackedProjection p_in(K, stream_key(seed, Role::kKronIn, dist), dist, d_in, k_in);
  PackedProjection p_out(K, stream_key(seed, Role::kKronOut, dist), dist, d_out, k_out);
  const int64_t ky = k_in * k_out;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cpu::clamp_threads(num_threads), std::max<int64_t>(B, 1))));

#pragma omp parallel num_threads(threads)
  {
    // Half-precision inputs are upcast once per example (vectorised) and then read in place.
    const bool upcast = dtype != DType::kFloat32;
    cpu::Scratch abuf(upcast ? std::max<int64_t>(T * std::max(d_in, d_out), 1) : 1);
    cpu::Scratch bpack(K.kc * p_in.n_pad);
    cpu::Scratch U(std::max<int64_t>(T * k_in, 1)), V(std::max<int64_t>(T * k_out, 1));
    auto as_f32 = [&](const void* src, int64_t n) -> const float* {
      if (!upcast) return static_cast<const float*>(src);
      K.to_f32(src, dtype, n, abuf.data());
      return abuf.data();
    };
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      float* y = out + b * ky;
      if (!accumulate) std::fill(y, y + ky, 0.0f);
      if (T == 0) continue;
      std::fill(U.data(), U.data() + T * k_in, 0.0f);
      std::fill(V.data(), V.data() + T * k_out, 0.0f);
      // U = A_b P_in^T [T x k_in], V = D_b P_out^T [T x k_out]
      const float* Ab = as_f32(cpu::offset_ptr(A, dtype, b * T * d_in), T * d_in);
      cpu::gemm_a_inplace(
          K, T, k_in, d_in, Ab, d_in, 1,
          [&](int64_t p0, int64_t) -> const float* { return p_in.panel(K, p0); }, U.data(), k_in);
      const float* Db = as_f32(cpu::offset_ptr(D, dtype, b * T * d_out), T * d_out);
      cpu::gemm_a_inplace(
          K, T, k_out, d_out, Db, d_out, 1,
          [&](int64_t p0, int64_t) -> const float* { return p_out.panel(K, p0); }, V.data(),
          k_out);
      // y_b [k_out x k_in] += V^T U (sum over t); V^T is V read in place with swapped strides.
      cpu::gemm_a_inplace(
          K, k_out, k_in, T, V.data(), 1, k_out,
          [&](int64_t p0, int64_t pc) -> const float* {
            cpu::pack_b_rowmajor(K, U.data(), k_in, k_in, p0, pc, bpack.data());
            return bpack.data();
          },
          y, k_in);
    }
  }
}

}  // namespace issl_fast
