// sketch_kron on the GPU: for a chunk of examples at a time, U = A P_in^T and V = D P_out^T (the
// dense GEMM of sketch_gemm.cu over the B*T rows of A and D, roles kron_in / kron_out), then
// out[b] (+)= V_b^T U_b (float32, t in increasing order). G is never formed; U and V exist for
// one chunk of examples only. With the fused kernel variant on (kron_fused.cu; the default), 16-bit
// Rademacher calls with k_in, k_out of a few 64-blocks run in one kernel instead.
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "issl_fast/cuda_ops.h"
#include "kron_fused.h"
#include "sketch_gemm.h"
#include "validate.h"

namespace issl_fast {

namespace {

// U and V of one chunk of examples: at most ~64 MB (always at least one example).
constexpr int64_t kFactorFloats = int64_t{1} << 24;

int64_t chunk_examples(int64_t B, int64_t T, int64_t k_in, int64_t k_out) {
  const int64_t per = std::max<int64_t>(1, T * (k_in + k_out));
  return std::max<int64_t>(1, std::min(B, kFactorFloats / per));
}

template <class Alloc>
void layout(Alloc& a, DType dtype, int64_t B, int64_t T, int64_t d_in, int64_t d_out,
            int64_t k_in, int64_t k_out, Dist dist, CudaAlgo algo, int num_sms, float** U,
            float** V, char** gemm_ws, int64_t* gemm_bytes) {
  const int64_t bc = chunk_examples(B, T, k_in, k_out);
  int64_t gb = 0;
  for (const int64_t rows : {bc, B % bc}) {
    if (rows == 0) continue;
    gb = std::max(gb, cuda::detail::dense_gemm_workspace(dtype, rows * T, d_in, k_in, dist, algo,
                                                         num_sms));
    gb = std::max(gb, cuda::detail::dense_gemm_workspace(dtype, rows * T, d_out, k_out, dist,
                                                         algo, num_sms));
  }
  *U = a.template take<float>(bc * T * k_in);
  *V = a.template take<float>(bc * T * k_out);
  *gemm_ws = a.template take<char>(gb);
  *gemm_bytes = gb;
}

void validate(DType dtype, int64_t B, int64_t T, int64_t d_in, int64_t d_out, int64_t k_in,
              int64_t k_out, Dist dist, int num_sms) {
  using namespace cuda::detail;
  require_dtype(dtype);
  require_dist(dist);
  require_nonneg(B, "B");
  require_nonneg(T, "T");
  require_pos(d_in, "d_in");
  require_pos(d_out, "d_out");
  require_pos(k_in, "k_in");
  require_pos(k_out, "k_out");
  require_pos(num_sms, "num_sms");
}

}  // namespace

int64_t sketch_kron_cuda_workspace(DType dtype, int64_t B, int64_t T, int64_t d_in,
                                   int64_t d_out, int64_t k_in, int64_t k_out, Dist dist,
                                   CudaAlgo algo, int num_sms) {
  validate(dtype, B, T, d_in, d_out, k_in, k_out, dist, num_sms);
  if (B == 0 || T == 0) return 0;
  cuda::detail::Sizer sz;
  const CudaKronPlan plan =
      cuda::detail::kron_plan(dtype, B, T, k_in, k_out, dist, algo, num_sms);
  if (plan.fused) {
    sz.take<float>(cuda::detail::kron_fused_partial_floats(plan, B, k_in, k_out));
    return sz.bytes();
  }
  float *U, *V;
  char* gemm_ws;
  int64_t gemm_bytes;
  layout(sz, dtype, B, T, d_in, d_out, k_in, k_out, dist, algo, num_sms, &U, &V, &gemm_ws,
         &gemm_bytes);
  return sz.bytes();
}

void sketch_kron_cuda(const void* A, const void* D, DType dtype, int64_t B, int64_t T,
                      int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out, uint64_t seed,
                      Dist dist, float* out, bool accumulate, void* ws, int64_t ws_bytes,
                      int num_sms, CudaAlgo algo, std::uintptr_t stream) {
  validate(dtype, B, T, d_in, d_out, k_in, k_out, dist, num_sms);
  cuda::detail::require_ptr(A, B * T * d_in, "A");
  cuda::detail::require_ptr(D, B * T * d_out, "D");
  cuda::detail::require_ptr(out, B * k_in * k_out, "out");
  if (B == 0) return;
  if (T == 0) {
    cuda::detail::zero_unless_accumulate(out, B * k_in * k_out, accumulate, stream);
    return;
  }
  cuda::detail::Carver cv(ws, ws_bytes);
  const CudaKronPlan plan =
      cuda::detail::kron_plan(dtype, B, T, k_in, k_out, dist, algo, num_sms);
  if (plan.fused) {
    float* part = cv.take<float>(cuda::detail::kron_fused_partial_floats(plan, B, k_in, k_out));
    cuda::detail::KronFused kf;
    kf.A = A;
    kf.D = D;
    kf.dtype = dtype;
    kf.B = B;
    kf.T = T;
    kf.d_in = d_in;
    kf.d_out = d_out;
    kf.k_in = k_in;
    kf.k_out = k_out;
    kf.key_in = stream_key(seed, Role::kKronIn, dist);
    kf.key_out = stream_key(seed, Role::kKronOut, dist);
    kf.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k_in) *
                                                  static_cast<double>(k_out)));
    kf.out = out;
    kf.accumulate = accumulate;
    cuda::detail::kron_fused(kf, plan, part, stream);
    return;
  }
  float *U, *V;
  char* gemm_ws;
  int64_t gemm_bytes;
  layout(cv, dtype, B, T, d_in, d_out, k_in, k_out, dist, algo, num_sms, &U, &V, &gemm_ws,
         &gemm_bytes);
  const int64_t bc = chunk_examples(B, T, k_in, k_out);
  const int64_t es = cuda::detail::elem_size(dtype);
  for (int64_t b0 = 0; b0 < B; b0 += bc) {
    const int64_t rows = std::min(bc, B - b0);
    cuda::detail::DenseGemm gu;
    gu.x = static_cast<const char*>(A) + b0 * T * d_in * es;
    gu.dtype = dtype;
    gu.M = rows * T;
    gu.ld = d_in;
    gu.cols = d_in;
    gu.N = k_in;
    gu.key = stream_key(seed, Role::kKronIn, dist);
    gu.dist = dist;
    gu.col_offset = 0;
    gu.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k_in)));
    gu.out = U;
    gu.accumulate = false;
    cuda::detail::dense_gemm(gu, algo, num_sms, gemm_ws, gemm_bytes, stream);
    cuda::detail::DenseGemm gv = gu;
    gv.x = static_cast<const char*>(D) + b0 * T * d_out * es;
    gv.ld = d_out;
    gv.cols = d_out;
    gv.N = k_out;
    gv.key = stream_key(seed, Role::kKronOut, dist);
    gv.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k_out)));
    gv.out = V;
    cuda::detail::dense_gemm(gv, algo, num_sms, gemm_ws, gemm_bytes, stream);
    cuda::detail::kron_outer(U, V, rows, T, k_in, k_out, out + b0 * k_out * k_in, accumulate,
                             stream);
  }
}

CudaKronPlan sketch_kron_cuda_plan(DType dtype, int64_t B, int64_t T, int64_t k_in, int64_t k_out,
                                   Dist dist, CudaAlgo algo, int num_sms) {
  validate(dtype, B, T, 1, 1, k_in, k_out, dist, num_sms);
  return cuda::detail::kron_plan(dtype, B, T, k_in, k_out, dist, algo, num_sms);
}

}  // namespace issl_fast
