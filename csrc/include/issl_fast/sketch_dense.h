// sketch_dense: dense JL sketch of rows of g with the on-the-fly random matrix of hash.h.
//   out[b, j] (+)= (1/sqrt(k)) * sum_p R(seed, j, col_offset + p) * g[b, p]
// g     [B, P]  row-major, float32 / float16 / bfloat16 (dtype)
// out   [B, k]  row-major, float32; overwritten, or added to when accumulate
// Memory: O(tile) scratch, independent of B*P and P*k. Deterministic for any thread count.
#pragma once
#include <cstdint>

#include "issl_fast/common.h"

namespace issl_fast {

void sketch_dense_cpu(const void* g, DType dtype, int64_t B, int64_t P, int64_t k, uint64_t seed,
                      Dist dist, int64_t col_offset, float* out, bool accumulate,
                      int num_threads);

}  // namespace issl_fast
