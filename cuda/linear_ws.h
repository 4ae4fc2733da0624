// Internal, for sketch_gemm.cu (CUDA sources only): the direct sketch_linear route on Hopper with
// warp specialisation (sm_90a only), implemented in linear_ws.cu. An experimental kernel variant
// (CudaVariant::kLinearWs); linear_direct in sketch_gemm.cu tries it before linear_wgmma.
#pragma once
#include <cstdint>

#include "linear_direct_tiles.cuh"
#include "sketch_gemm.h"

namespace issl_fast::cuda::detail {

// 128 sketch rows x 256 examples per block, one block per SM.
DirectTilePlan linear_ws_plan(int64_t B, int64_t N, int64_t d_out, int num_sms);

// The switch is on, this binary holds sm_90a code, the current device is compute capability 9.0
// with room for the block's shared memory, B >= 128 (below that most of a 256-example block would
// idle), and A can be read by TMA (16-byte aligned base, d_in % 8 == 0, every coordinate within
// int32).
bool linear_ws_usable(const LinearDirect& g);

// Same contract as linear_direct; `part` holds direct_tile_partial_floats floats.
void linear_ws(const LinearDirect& g, const DirectTilePlan& pl, float* part, std::uintptr_t stream);

}  // namespace issl_fast::cuda::detail
