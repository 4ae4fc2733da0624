// sketch_kron: factored (LoGra-style) sketch of per-example linear-layer gradients,
//   out[b, a * k_in + c] (+)= sum_t (P_out D[b, t])[a] * (P_in A[b, t])[c]
// = vec(P_out G_b P_in^T), i.e. the dense sketch with matrix (P_out (x) P_in), where
// P_in [k_in, d_in] = R_kron_in(seed) / sqrt(k_in) and P_out [k_out, d_out] = R_kron_out(seed) /
// sqrt(k_out) (hash.h roles kKronIn / kKronOut). Cost O(T (d_in k_in + d_out k_out + k_in k_out))
// per example; memory O(T (k_in + k_out)) per thread.
// A     [B, T, d_in]       row-major, float32 / float16 / bfloat16 (dtype)
// D     [B, T, d_out]      row-major, same dtype
// out   [B, k_out * k_in]  row-major, float32
#pragma once
#include <cstdint>

#include "issl_fast/common.h"

namespace issl_fast {

void sketch_kron_cpu(const void* A, const void* D, DType dtype, int64_t B, int64_t T,
                     int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out, uint64_t seed,
                     Dist dist, float* out, bool accumulate, int num_threads);

}  // namespace issl_fast
