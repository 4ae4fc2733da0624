// sketch_dense on the GPU: the on-the-fly random-matrix GEMM of sketch_gemm.cu applied to g.
#include <cmath>

#include "common.cuh"
#include "issl_fast/cuda_ops.h"
#include "sketch_gemm.h"
#include "validate.h"

namespace issl_fast {

namespace {
cuda::detail::DenseGemm dense_args(const void* g, DType dtype, int64_t B, int64_t P, int64_t k,
                                   uint64_t seed, Dist dist, int64_t col_offset, float* out,
                                   bool accumulate) {
  cuda::detail::DenseGemm a;
  a.x = g;
  a.dtype = dtype;
  a.M = B;
  a.ld = P;
  a.cols = P;
  a.N = k;
  a.key = stream_key(seed, Role::kDense, dist);
  a.dist = dist;
  a.col_offset = static_cast<uint64_t>(col_offset);
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k)));
  a.out = out;
  a.accumulate = accumulate;
  return a;
}

void validate(DType dtype, int64_t B, int64_t P, int64_t k, Dist dist, int64_t col_offset,
              int num_sms) {
  cuda::detail::require_dtype(dtype);
  cuda::detail::require_dist(dist);
  cuda::detail::require_nonneg(B, "B");
  cuda::detail::require_nonneg(P, "P");
  cuda::detail::require_pos(k, "k");
  cuda::detail::require_nonneg(col_offset, "col_offset");
  cuda::detail::require_pos(num_sms, "num_sms");
}
}  // namespace

int64_t sketch_dense_cuda_workspace(DType dtype, int64_t B, int64_t P, int64_t k, Dist dist,
                                    CudaAlgo algo, int num_sms) {
  validate(dtype, B, P, k, dist, 0, num_sms);
  return cuda::detail::dense_gemm_workspace(dtype, B, P, k, dist, algo, num_sms);
}

void sketch_dense_cuda(const void* g, DType dtype, int64_t B, int64_t P, int64_t k, uint64_t seed,
                       Dist dist, int64_t col_offset, float* out, bool accumulate, void* ws,
                       int64_t ws_bytes, int num_sms, CudaAlgo algo, std::uintptr_t stream) {
  validate(dtype, B, P, k, dist, col_offset, num_sms);
  cuda::detail::require_ptr(g, B * P, "g");
  cuda::detail::require_ptr(out, B * k, "out");
  if (B == 0) return;
  cuda::detail::dense_gemm(dense_args(g, dtype, B, P, k, seed, dist, col_offset, out, accumulate),
                           algo, num_sms, ws, ws_bytes, stream);
}

}  // namespace issl_fast
