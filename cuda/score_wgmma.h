// Internal: the sm_90a (wgmma) scorer of score_topk, implemented in score_wgmma.cu.
// A kernel variant (CudaVariant::kScoreWgmma, on by default); score_topk.cu uses it
// in place of tc_score_kernel (all four configs) when usable.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "score_topk_blocks.cuh"

namespace issl_fast::topk {

constexpr int kWgmmaScoreMQ = 64;       // queries per block: the plan's blocks for m > 16
constexpr int kWgmmaScoreSmallMQ = 16;  // ... and for m <= 16

// The switch is on and the current device is compute capability 9.0 (the caller has checked the
// tensor-core plan: bfloat16 store, 16-byte aligned, k % 8 == 0).
bool score_wgmma_usable();

// Scores `blocks` (partition, query block) pairs of 16 or 64 queries into the partitions' lists,
// like tc_score_kernel: query_bf16 selects one MMA pass instead of three.
void launch_score_wgmma(const ScoreParams& p, int queries_per_block, int64_t blocks,
                        bool query_bf16, cudaStream_t st);

}  // namespace issl_fast::topk
