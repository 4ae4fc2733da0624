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
// A tiled tensor map of a 16-bit float tensor (bf16, or fp16 when `fp16`) of `rank` <= 3
// dimensions, innermost first: dims[i] elements, strides[i - 1] bytes between consecutive
// indices of dimension i (multiples of 16), read in boxes of box[i] elements (box[0] * 2 == 128
// bytes: one swizzle row), 128-byte swizzled, zero-filled outside the tensor. The encoder is the
// driver's cuTensorMapEncodeTiled, reached through the runtime so nothing links libcuda directly.
inline CUtensorMap tensor_map_16bit(const void* base, bool fp16, int rank,
                                    const uint64_t* dims, const uint64_t* strides,
                                    const uint32_t* box) {
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
  if (rank < 1 || rank > 3) throw std::invalid_argument("issl_fast CUDA: tensor map rank 1..3");
  cuuint64_t d[3], st[2];
  cuuint32_t bx[3], es[3];
  std::string shape;
  for (int i = 0; i < rank; ++i) {
    d[i] = dims[i];
    bx[i] = box[i];
    es[i] = 1;
    if (i > 0) st[i - 1] = strides[i - 1];
    shape += (i ? " x " : "") + std::to_string(dims[i]);
  }
  CUtensorMap map;
  const CUresult r = encode(
      &map, fp16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
      static_cast<cuuint32_t>(rank), const_cast<void*>(base), d, st, bx, es,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error("issl_fast CUDA: cuTensorMapEncodeTiled failed with CUresult " +
                             std::to_string(static_cast<int>(r)) + " (dims, innermost first: " +
                             shape + ")");
  return map;
}

// A row-major bf16 matrix [rows, cols] (row stride row_elems elements) in boxes of box_rows x
// box_cols.
inline CUtensorMap bf16_tensor_map_2d(const void* base, uint64_t rows, uint64_t cols,
                                      uint64_t row_elems, uint32_t box_rows, uint32_t box_cols) {
  const uint64_t dims[2] = {cols, rows};
  const uint64_t strides[1] = {row_elems * 2};
  const uint32_t box[2] = {box_cols, box_rows};
  return tensor_map_16bit(base, false, 2, dims, strides, box);
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
// One plain arrival (release: this thread's earlier shared-memory writes are seen by whoever
// waits on the phase).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#if ISSL_WGMMA_DEVICE
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
#endif
}
// Waits until the phase with parity `parity` of `bar` completed. A copy that never lands would
// otherwise hang the GPU silently: after kMbarTimeoutNs of waiting (read from %globaltimer, so
// bounded in time whatever each try_wait's own suspend limit is) the kernel traps and the launch
// fails with an error instead. The clock is read only once a first try fails (no cost on the
// common path). The poll loop lives inside the asm: as a C++ loop its data-dependent exit made
// ptxas treat the wgmma that follow as divergent and serialise them (C7518).
constexpr unsigned long long kMbarTimeoutNs = 10000000000ull;  // 10 s
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if ISSL_WGMMA_DEVICE
  asm volatile(
      "{\n.reg .pred p;\n.reg .u64 t0, t;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@p bra DONE;\n"
      "mov.u64 t0, %%globaltimer;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@p bra DONE;\n"
      "mov.u64 t, %%globaltimer;\n"
      "sub.u64 t, t, t0;\n"
      "setp.lt.u64 p, t, %2;\n"
      "@p bra WAIT;\n"
      "trap;\n"
      "DONE:\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity), "l"(kMbarTimeoutNs)
      : "memory");
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

// Box (c0, c1, c2) (innermost first) of a 3-D `map` into shared memory at `dst`, as tma_load_2d.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                            int c2, uint64_t* bar) {
#if ISSL_WGMMA_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
      : "memory");
#endif
}

// ---- thread-block clusters (device) -----------------------------------------------------------
// This block's rank in its cluster.
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r = 0;
#if ISSL_WGMMA_DEVICE
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return r;
}
// Every thread of every block of the cluster: also orders the mbarrier initialisations (and
// anything before it) before what follows, cluster-wide.
__device__ __forceinline__ void cluster_sync() {
#if ISSL_WGMMA_DEVICE
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n"
               ::: "memory");
#endif
}
// One arrival on the mbarrier at the same offset in block `cta` of the cluster. The plain form
// (as CUTLASS's ClusterBarrier::arrive): .release.cluster would put a GPU-wide fence
// (MEMBAR.ALL.GPU) before every arrival, and what it would order here needs none: the partner
// only writes the slot through TMA, after wgmma_wait ordered this block's reads of it.
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t cta) {
#if ISSL_WGMMA_DEVICE
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_u32(bar)), "r"(cta)
      : "memory");
#endif
}
// tma_load_3d into the same offset `dst` of every block in `cta_mask` of the cluster, each copy
// completing its bytes on that block's mbarrier at the offset of `bar`.
__device__ __forceinline__ void tma_load_3d_multicast(uint32_t dst, const CUtensorMap* map, int c0,
                                                      int c1, int c2, uint64_t* bar,
                                                      uint16_t cta_mask) {
#if ISSL_WGMMA_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3, %4}], [%5], %6;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar)),
      "h"(cta_mask)
      : "memory");
#endif
}

}  // namespace issl_fast::cuda::detail
