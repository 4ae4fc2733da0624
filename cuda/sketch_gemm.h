// Internal (host-only interface, no CUDA types): the on-the-fly random-matrix GEMM behind
// sketch_dense, sketch_linear and sketch_kron, implemented in sketch_gemm.cu.
//
//   out[M, N] (+)= scale * X[M, cols] * R[0:N, col_offset : col_offset + cols]^T
//
// R comes from hash.h (any key, so any role), never stored. Two kernels:
//   * tensor cores (Rademacher only): R = +-1 is exact in bf16/fp16, so bf16/fp16 X go through
//     mma.sync with float32 accumulation unchanged, and float32 X is split into three bf16 terms
//     whose sum is exactly X (three MMA passes);
//   * SIMT float32 FMA: Gaussian entries (not exact in 16 bits), or when forced (Algo::kSimt).
// Split-K partial sums go to a caller-provided workspace and are reduced in a fixed order, so every
// result is deterministic. The launch plan depends on the shapes and the device's SM count only.
#pragma once
#include <cstdint>

#include "issl_fast/common.h"
#include "issl_fast/cuda_ops.h"

namespace issl_fast::cuda::detail {

using Algo = ::issl_fast::CudaAlgo;

struct DenseGemm {
  const void* x = nullptr;  // X rows: element (m, c) at x[m * ld + c], dtype below
  DType dtype = DType::kFloat32;
  int64_t M = 0, ld = 0, cols = 0, N = 0;
  uint64_t key = 0;         // stream_key(seed, role, dist)
  Dist dist = Dist::kRademacher;
  uint64_t col_offset = 0;  // hash column of X's column 0
  float scale = 1.0f;
  float* out = nullptr;     // [M, N] row-major float32
  bool accumulate = false;
};

// Workspace bytes dense_gemm needs for these shapes (0 when no split-K partials are needed).
int64_t dense_gemm_workspace(DType dtype, int64_t M, int64_t cols, int64_t N, Dist dist,
                             Algo algo, int num_sms);
void dense_gemm(const DenseGemm& g, Algo algo, int num_sms, void* ws, int64_t ws_bytes,
                std::uintptr_t stream);

// sketch_linear without forming G: out[b] (+)= scale * sum_o sum_t D[b,t,o] (R_o A[b,t])^T, one
// MMA pass per t with float32 accumulation (exact products for bf16/fp16 inputs). Worth it when T
// is small; linear_direct_ok says when it is used.
struct LinearDirect {
  const void* A = nullptr;
  const void* D = nullptr;
  DType dtype = DType::kBFloat16;
  int64_t B = 0, T = 0, d_in = 0, d_out = 0, N = 0;
  uint64_t key = 0, col_offset = 0;
  float scale = 1.0f;
  float* out = nullptr;
  bool accumulate = false;
};
bool linear_direct_ok(DType dtype, int64_t B, int64_t T, int64_t d_in, Dist dist, Algo algo);
int64_t linear_direct_workspace(DType dtype, int64_t B, int64_t T, int64_t d_in, int64_t d_out,
                                int64_t N, int num_sms);
void linear_direct(const LinearDirect& g, int num_sms, void* ws, int64_t ws_bytes,
                   std::uintptr_t stream);

// W[b, pp] = sum_t D[b, t, o] * A[b, t, i] for p = p0 + pp < p0 + pc, o = p / d_in, i = p % d_in
// (float32 FMA over t in increasing order); W row stride ldw.
void form_linear_grad(const void* A, const void* D, DType dtype, int64_t B, int64_t T,
                      int64_t d_in, int64_t d_out, int64_t p0, int64_t pc, float* W, int64_t ldw,
                      std::uintptr_t stream);

// out[b, a * k_in + c] (+)= sum_t V[b, t, a] * U[b, t, c] for b < Bc (float32, t increasing).
void kron_outer(const float* U, const float* V, int64_t Bc, int64_t T, int64_t k_in,
                int64_t k_out, float* out, bool accumulate, std::uintptr_t stream);

// out[0..n) = 0 unless accumulate.
void zero_unless_accumulate(float* out, int64_t n, bool accumulate, std::uintptr_t stream);

// out[i] = (accumulate ? out[i] : 0) + scale * sum_{s < splits} part[s * n + i], s increasing.
void reduce_partials(const float* part, int64_t splits, int64_t n, float scale, float* out,
                     bool accumulate, std::uintptr_t stream);

}  // namespace issl_fast::cuda::detail
