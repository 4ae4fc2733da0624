// sketch_sparse: sparse JL sketch (CountSketch when s = 1). Input coordinate c = col_offset + p
// goes to s buckets, one in each of s near-equal blocks of [0, k), with random signs (hash.h):
//   out[b, bucket(c, r)] (+)= sign(c, r) * g[b, p] / sqrt(s)      for r < s
// Cost O(B * P * s). Deterministic without atomics: each thread owns whole rows of out and adds
// in increasing (p, r) order.
// g     [B, P]  row-major, float32 / float16 / bfloat16 (dtype)
// out   [B, k]  row-major, float32; 1 <= s <= k < 2^31
#pragma once
#include <cstdint>

#include "issl_fast/common.h"

namespace issl_fast {

void sketch_sparse_cpu(const void* g, DType dtype, int64_t B, int64_t P, int64_t k, int64_t s,
                       uint64_t seed, int64_t col_offset, float* out, bool accumulate,
                       int num_threads);

}  // namespace issl_fast
