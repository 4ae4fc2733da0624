// Internal: Hopper's tensor memory accelerator (TMA) for the sm_90a kernels: 2-D tiled tensor
// maps (host), bulk tensor copies global -> shared completed on an mbarrier, and the mbarrier
// operations around them (device). Device bodies exist only in sm_90a code (wgmma.cuh's
// ISSL_WGMMA_DEVICE); those kernels run only on compute capability 9.0 devices.
//
// Why TMA: one thread moves a whole 128-row x 128-byte tile per instruction, written in the
// 128-byte swizzle that the wgmma descriptors read (chunk c of row r at chunk c ^ (r % 8) of a
// 1024-byte-aligned atom, as sw128_offset), where cp.async needs every thread to compute and
// issue its own 16-byte copies each step.
#pragma once
#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes from the runtime)
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "wgmma.cuh"

namespace issl_fast::cuda::detail {

// ---- host --------------------------------------------------------------------------------------
// A 2-D tensor map of a row-major bf16 matrix [rows, cols] (row stride row_elems elements), read
// in boxes of box_rows x box_cols (box_cols * 2 == 128 bytes: one swizzle row), 128-byte
// swizzled, zero-filled outside the matrix. The encoder is the driver's cuTensorMapEncodeTiled,
// reached through the runtime so nothing links libcuda directly.
inline CUtensorMap bf16_tensor_map_2d(const void* base, uint64_t rows, uint64_t cols,
                                      uint64_t row_elems, uint32_t box_rows, uint32_t box_cols) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                              const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                              const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                           cudaEnableDefault, &q),
          "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
#else
    check(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &q),
          "cudaGetDriverEntryPoint(cuTensorMapEncodeTiled)");
#endif
    if (q != cudaDriverEntryPointSuccess || fn == nullptr)
      throw std::runtime_error("issl_fast CUDA: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<Encode>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {cols, rows};            // innermost first
  const cuuint64_t strides[1] = {row_elems * 2};      // bytes between rows (multiple of 16)
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base),
                            dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error("issl_fast CUDA: cuTensorMapEncodeTiled failed with CUresult " +
                             std::to_string(static_cast<int>(r)) + " (rows " +
                             std::to_string(rows) + ", cols " + std::to_string(cols) + ")");
  return map;
}

// ---- device ------------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#if ISSL_WGMMA_DEVICE
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count)
               : "memory");
#endif
}
// Makes the initialised mbarriers visible to the async proxy (the TMA unit); then a barrier.
__device__ __forceinline__ void fence_mbar_init() {
#if ISSL_WGMMA_DEVICE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// One arrival that also expects `bytes` of transactions (the copies of this phase).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if ISSL_WGMMA_DEVICE
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
#endif
}
// Waits until the phase with parity `parity` of `bar` completed. A copy that never lands would
// otherwise hang the GPU silently: after ~2^26 polls (seconds) the kernel traps, so the launch
// fails with an error instead.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if ISSL_WGMMA_DEVICE
  const uint32_t addr = smem_u32(bar);
  for (uint32_t polls = 0;; ++polls) {
    uint32_t done = 0;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
    if (done) return;
    if (polls > (1u << 26)) __trap();
  }
#endif
}
// Box (c0, r0) (column, row: innermost first) of `map` into shared memory at `dst` (1024-aligned
// for the 128-byte swizzle), completing its bytes on `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int r0,
                                            uint64_t* bar) {
#if ISSL_WGMMA_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(r0), "r"(smem_u32(bar))
      : "memory");
#endif
}

}  // namespace issl_fast::cuda::detail
