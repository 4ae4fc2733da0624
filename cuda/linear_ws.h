// Internal, for sketch_gemm.cu (CUDA sources only): the direct sketch_linear route on Hopper with
// warp specialisation (sm_90a only), implemented in linear_ws.cu. Experimental kernel variants
// (CudaVariant::kLinearWs, kLinearWsPair, kLinearWsRegs); linear_direct in sketch_gemm.cu tries
// them before linear_wgmma.
#pragma once
#include <cstdint>

#include "linear_direct_tiles.cuh"
#include "sketch_gemm.h"

namespace issl_fast::cuda::detail {

// 128 sketch rows x 256 examples per block, one block per SM; with pair = 2, an even number of
// sketch-row tiles (clusters of two blocks).
DirectTilePlan linear_ws_plan(int64_t B, int64_t N, int64_t d_out, int num_sms, int pair);

// How linear_direct runs the product here: pair = 0 not at all (not usable), 1 single blocks,
// 2 clusters of two blocks sharing each example tile through TMA multicast
// (CudaVariant::kLinearWsPair, when such a cluster fits and the 128-row tiles of N are even in
// number or at least 7); regs: Y partly in registers and a third ring slot
// (CudaVariant::kLinearWsRegs). Usable: one of the kLinearWs* switches is on, this binary holds
// sm_90a code, the current device is compute capability 9.0 with room for the block's shared
// memory, B >= 128 (below that most of a 256-example block would idle), and A can be read by
// TMA (16-byte aligned base, d_in % 8 == 0, every coordinate within int32).
struct WsRoute {
  int pair = 0;
  bool regs = false;
};
WsRoute linear_ws_route(const LinearDirect& g);

// Same contract as linear_direct; `pl` from linear_ws_plan with route.pair; `part` holds
// direct_tile_partial_floats floats.
void linear_ws(const LinearDirect& g, const DirectTilePlan& pl, const WsRoute& route,
               float* part, std::uintptr_t stream);

}  // namespace issl_fast::cuda::detail
