// sketch_linear: fused dense sketch of per-example linear-layer weight gradients,
//   G_b = sum_t D[b, t]^T A[b, t]  (d_out x d_in, flattened row-major: p = o * d_in + i)
//   out[b, j] (+)= (1/sqrt(k)) * sum_p R(seed, j, col_offset + p) * G_b[p]
// i.e. exactly sketch_dense(vec(G)), without ever materialising G: the CPU kernel holds a
// B x KC tile of it, or with T >= 4 (convolutions) a slab of ~64K floats per example, formed
// by GEMM over t (so A is read once per slab, not once per tile).
// A bias is an extra input column of ones in A.
// A     [B, T, d_in]   row-major, float32 / float16 / bfloat16 (dtype)
// D     [B, T, d_out]  row-major, same dtype as A
// out   [B, k]         row-major, float32; overwritten, or added to when accumulate
#pragma once
#include <cstdint>

#include "issl_fast/common.h"

namespace issl_fast {

void sketch_linear_cpu(const void* A, const void* D, DType dtype, int64_t B, int64_t T,
                       int64_t d_in, int64_t d_out, int64_t k, uint64_t seed, Dist dist,
                       int64_t col_offset, float* out, bool accumulate, int num_threads);

}  // namespace issl_fast
