// Internal: the sm_90a (wgmma) scorer of score_topk for blocks of 64 queries, implemented in
// score_wgmma.cu. Experimental (CudaExperimental::kScoreWgmma) until a GPU run validates it;
// score_topk.cu uses it in place of tc_score_kernel<CfgLarge / CfgLarge1> when usable.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "score_topk_blocks.cuh"

namespace issl_fast::topk {

constexpr int kWgmmaScoreMQ = 64;  // queries per block: the plan's blocks for m > 16

// The switch is on and the current device is compute capability 9.0 (the caller has checked the
// tensor-core plan: bfloat16 store, 16-byte aligned, k % 8 == 0, 64 queries per block).
bool score_wgmma_usable();

// Scores `blocks` (partition, query block) pairs into the partitions' lists, like
// tc_score_kernel: query_bf16 selects one MMA pass instead of three.
void launch_score_wgmma(const ScoreParams& p, int64_t blocks, bool query_bf16, cudaStream_t st);

}  // namespace issl_fast::topk
