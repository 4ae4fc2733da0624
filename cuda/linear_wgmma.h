// Internal, for sketch_gemm.cu (CUDA sources only): the direct sketch_linear route on Hopper's
// warpgroup MMA (wgmma, sm_90a only), implemented in linear_wgmma.cu. A kernel variant
// (CudaVariant::kLinearWgmma, on by default); linear_direct in sketch_gemm.cu
// picks it when linear_wgmma_usable says so and otherwise runs its mma.sync kernel.
#pragma once
#include <cstdint>

#include "linear_direct_tiles.cuh"
#include "sketch_gemm.h"

namespace issl_fast::cuda::detail {

// 256 sketch rows x 64 examples per block, one block per SM.
DirectTilePlan linear_wgmma_plan(int64_t B, int64_t N, int64_t d_out, int num_sms);

// The switch is on, this binary holds sm_90a code, the current device is compute capability 9.0,
// and A's rows can be copied in 16-byte chunks (aligned, d_in % 8 == 0).
bool linear_wgmma_usable(const LinearDirect& g);

// Same contract as linear_direct; `part` holds direct_tile_partial_floats floats.
void linear_wgmma(const LinearDirect& g, const DirectTilePlan& pl, float* part,
                  std::uintptr_t stream);

}  // namespace issl_fast::cuda::detail
