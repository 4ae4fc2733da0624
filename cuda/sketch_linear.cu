// sketch_linear on the GPU. Two routes, both exactly the dense sketch of vec(G_b), G_b =
// sum_t D[b,t]^T A[b,t], with the same random matrix:
//   * direct (Rademacher, float16/bfloat16, small T): never forms G; the tensor-core kernel sums
//     D[b,t,o] * (R_o A[b,t]) over (o, t), each product exact in float32 (sketch_gemm.h);
//   * otherwise: G is formed in float32, one column chunk at a time in the workspace, and each
//     chunk goes through the dense GEMM at its column offset (chunks in increasing order).
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "issl_fast/cuda_ops.h"
#include "sketch_gemm.h"
#include "validate.h"

namespace issl_fast {

namespace {

// Columns of G formed per chunk: bounds the workspace to ~64 MB of G whatever B * P is.
constexpr int64_t kGradChunkFloats = int64_t{1} << 24;
// Chunks start on multiples of the GEMM's deepest K step, so its 16-byte row loads stay aligned.
constexpr int64_t kGradChunkAlign = 32;
constexpr int64_t kGradChunkMinCols = 256;

int64_t chunk_cols(int64_t B, int64_t P) {
  int64_t pc = kGradChunkFloats / std::max<int64_t>(B, 1) / kGradChunkAlign * kGradChunkAlign;
  pc = std::max(pc, kGradChunkMinCols);
  return std::min(pc, cuda::detail::round_up(P, kGradChunkAlign));
}

// Workspace of the chunked route: the G chunk, then the GEMM's split-K partials (the largest of
// the full chunk's and the last chunk's plans).
template <class Alloc>
void chunked_layout(Alloc& a, int64_t B, int64_t P, int64_t k, Dist dist, CudaAlgo algo,
                    int num_sms, float** G, char** gemm_ws, int64_t* gemm_bytes) {
  const int64_t pc = chunk_cols(B, P);
  int64_t gb = cuda::detail::dense_gemm_workspace(DType::kFloat32, B, std::min(pc, P), k, dist,
                                                  algo, num_sms);
  if (P % pc != 0)
    gb = std::max(gb, cuda::detail::dense_gemm_workspace(DType::kFloat32, B, P % pc, k, dist,
                                                         algo, num_sms));
  *G = a.template take<float>(B * pc);
  *gemm_ws = a.template take<char>(gb);
  *gemm_bytes = gb;
}

void validate(DType dtype, int64_t B, int64_t T, int64_t d_in, int64_t d_out, int64_t k,
              Dist dist, int64_t col_offset, int num_sms) {
  using namespace cuda::detail;
  require_dtype(dtype);
  require_dist(dist);
  require_nonneg(B, "B");
  require_nonneg(T, "T");
  require_pos(d_in, "d_in");
  require_pos(d_out, "d_out");
  require_pos(k, "k");
  require_nonneg(col_offset, "col_offset");
  require_pos(num_sms, "num_sms");
}

}  // namespace

int64_t sketch_linear_cuda_workspace(DType dtype, int64_t B, int64_t T, int64_t d_in,
                                     int64_t d_out, int64_t k, Dist dist, CudaAlgo algo,
                                     int num_sms) {
  validate(dtype, B, T, d_in, d_out, k, dist, 0, num_sms);
  if (B == 0 || T == 0) return 0;
  if (cuda::detail::linear_direct_ok(dtype, B, T, d_in, dist, algo))
    return cuda::detail::linear_direct_workspace(dtype, B, T, d_in, d_out, k, num_sms);
  cuda::detail::Sizer sz;
  float* G;
  char* gemm_ws;
  int64_t gemm_bytes;
  chunked_layout(sz, B, d_in * d_out, k, dist, algo, num_sms, &G, &gemm_ws, &gemm_bytes);
  return sz.bytes();
}

void sketch_linear_cuda(const void* A, const void* D, DType dtype, int64_t B, int64_t T,
                        int64_t d_in, int64_t d_out, int64_t k, uint64_t seed, Dist dist,
                        int64_t col_offset, float* out, bool accumulate, void* ws,
                        int64_t ws_bytes, int num_sms, CudaAlgo algo, std::uintptr_t stream) {
  validate(dtype, B, T, d_in, d_out, k, dist, col_offset, num_sms);
  cuda::detail::require_ptr(A, B * T * d_in, "A");
  cuda::detail::require_ptr(D, B * T * d_out, "D");
  cuda::detail::require_ptr(out, B * k, "out");
  if (B == 0) return;
  if (T == 0) {  // G = 0: the sketch is exactly zero
    cuda::detail::zero_unless_accumulate(out, B * k, accumulate, stream);
    return;
  }
  const uint64_t key = stream_key(seed, Role::kDense, dist);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k)));

  if (cuda::detail::linear_direct_ok(dtype, B, T, d_in, dist, algo)) {
    cuda::detail::LinearDirect g;
    g.A = A;
    g.D = D;
    g.dtype = dtype;
    g.B = B;
    g.T = T;
    g.d_in = d_in;
    g.d_out = d_out;
    g.N = k;
    g.key = key;
    g.col_offset = static_cast<uint64_t>(col_offset);
    g.scale = scale;
    g.out = out;
    g.accumulate = accumulate;
    cuda::detail::linear_direct(g, num_sms, ws, ws_bytes, stream);
    return;
  }

  const int64_t P = d_in * d_out;
  const int64_t pc = chunk_cols(B, P);
  cuda::detail::Carver cv(ws, ws_bytes);
  float* G;
  char* gemm_ws;
  int64_t gemm_bytes;
  chunked_layout(cv, B, P, k, dist, algo, num_sms, &G, &gemm_ws, &gemm_bytes);
  for (int64_t p0 = 0; p0 < P; p0 += pc) {
    const int64_t cols = std::min(pc, P - p0);
    cuda::detail::form_linear_grad(A, D, dtype, B, T, d_in, d_out, p0, cols, G, pc, stream);
    cuda::detail::DenseGemm g;
    g.x = G;
    g.dtype = DType::kFloat32;
    g.M = B;
    g.ld = pc;
    g.cols = cols;
    g.N = k;
    g.key = key;
    g.dist = dist;
    g.col_offset = static_cast<uint64_t>(col_offset + p0);
    g.scale = scale;
    g.out = out;
    g.accumulate = accumulate || p0 > 0;
    cuda::detail::dense_gemm(g, algo, num_sms, gemm_ws, gemm_bytes, stream);
  }
}

}  // namespace issl_fast
