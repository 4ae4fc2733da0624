// score_topk: streaming top-k of Q G^T per query, in one pass over the store G, never holding
// an m x n score matrix (only an m x tile block).
// Q        [m, k]     row-major, float32
// G        [n, k]     row-major, float32 / float16 / bfloat16 (dtype); may be a memory map
// exclude  [m, e]     int64 ids never returned for query i (-1 = unused), or null with e = 0
// values   [m, topk]  float32, descending; ties broken by the lower index
// indices  [m, topk]  int64, row index + index_offset; empty slots are (-inf, -1)
// With accumulate, values/indices hold an earlier result (another shard) that is merged in.
// Scores that are NaN or -inf are never selected. A (query, row) score is bit-identical
// whatever m, the tiling or the thread count.
#pragma once
#include <cstdint>

#include "issl_fast/common.h"

namespace issl_fast {

void score_topk_cpu(const float* Q, int64_t m, const void* G, DType dtype, int64_t n, int64_t k,
                    int64_t topk, const int64_t* exclude, int64_t e, int64_t index_offset,
                    float* values, int64_t* indices, bool accumulate, int num_threads);

}  // namespace issl_fast
