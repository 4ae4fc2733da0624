// Internal: Hopper warpgroup-MMA (wgmma) helpers shared by the sm_90a kernels (linear_wgmma.cu,
// score_wgmma.cu, and the tests' layout probe wgmma_probe.cu). Their bodies exist only when
// compiling for sm_90a; those kernels are launched only on compute capability 9.0 devices.
//
// Conventions (PTX ISA, "asynchronous warpgroup level matrix"): a warpgroup is 4 consecutive
// warps; for m64nNk16 with 16-bit inputs, warp w of the group owns rows 16 w .. 16 w + 15 of the
// 64 x N float32 accumulator, register i of a thread holding row 16 w + g + 8 ((i >> 1) & 1),
// column 8 (i >> 2) + 2 t4 + (i & 1) (g = lane / 4, t4 = lane % 4); a register A operand uses the
// mma.sync m16n8k16 A layout per warp. Shared operands are K-major, 128-byte swizzled: 8-row x
// 128-byte atoms, 1024-byte aligned, 16-byte chunk c of row r stored at chunk c ^ (r % 8).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace issl_fast::cuda::detail {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ISSL_WGMMA_DEVICE 1
#else
#define ISSL_WGMMA_DEVICE 0
#endif

// Matrix descriptor of a K-major, 128-byte-swizzled operand (PTX "matrix descriptor"): start
// address >> 4 (bits 0-13), leading byte offset (unused for swizzled K-major; 1), stride byte
// offset >> 4 (bits 32-45: 1024 bytes between 8-row atoms), layout 1 = 128-byte swizzle (62-63).
__device__ __forceinline__ uint64_t kmajor_sw128_desc(uint32_t smem_addr) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a K-major, 128-byte-swizzled tile
// of 128-byte rows (the layout kmajor_sw128_desc describes), from a 1024-aligned base.
__device__ __forceinline__ uint32_t sw128_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

__device__ __forceinline__ void wgmma_fence() {
#if ISSL_WGMMA_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if ISSL_WGMMA_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if ISSL_WGMMA_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Generic-proxy shared-memory writes (cp.async, st.shared) made visible to the async proxy that
// wgmma reads through; each thread after its own writes, before the barrier.
__device__ __forceinline__ void fence_proxy_async() {
#if ISSL_WGMMA_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Keeps the compiler from moving register reads/writes of an operand of an in-flight wgmma
// across the fence (the asm says it reads and rewrites the register here).
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_reg(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// The 32 float32 accumulators of an m64n64 wgmma: the asm output operands %0..%31 (array z) and
// their register list in the instruction text.
#define ISSL_WGMMA_Z32_OUT                                                                       \
  "+f"(z[0]), "+f"(z[1]), "+f"(z[2]), "+f"(z[3]), "+f"(z[4]), "+f"(z[5]), "+f"(z[6]),           \
      "+f"(z[7]), "+f"(z[8]), "+f"(z[9]), "+f"(z[10]), "+f"(z[11]), "+f"(z[12]), "+f"(z[13]),   \
      "+f"(z[14]), "+f"(z[15]), "+f"(z[16]), "+f"(z[17]), "+f"(z[18]), "+f"(z[19]),             \
      "+f"(z[20]), "+f"(z[21]), "+f"(z[22]), "+f"(z[23]), "+f"(z[24]), "+f"(z[25]),             \
      "+f"(z[26]), "+f"(z[27]), "+f"(z[28]), "+f"(z[29]), "+f"(z[30]), "+f"(z[31])
#define ISSL_WGMMA_Z32_REGS                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                      \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"

// Z (+)= A_frag (64 x 16, registers) * B (16 x 64, shared, K-major) for one warpgroup; TYPE is
// the PTX input type (bf16 or f16).
#define ISSL_WGMMA_RS_M64N64K16(TYPE)                                                            \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                     \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                   \
               ISSL_WGMMA_Z32_REGS ", {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"              \
               : ISSL_WGMMA_Z32_OUT                                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d))

template <class MmaT>
__device__ __forceinline__ void wgmma_m64n64k16(float (&z)[32], const uint32_t (&a)[4],
                                                uint64_t desc, int scale_d) {
#if ISSL_WGMMA_DEVICE
  if constexpr (std::is_same_v<MmaT, __nv_bfloat16>) {
    ISSL_WGMMA_RS_M64N64K16("bf16");
  } else {
    ISSL_WGMMA_RS_M64N64K16("f16");
  }
#endif
}

// Accumulator operand lists for the shared-shared wgmma below: N / 2 float32 accumulators
// (array z) as asm output operands %0 .. %(N / 2 - 1), in groups of eight, and their register
// list, for N = 48, 192 and 256 (N = 64 uses ISSL_WGMMA_Z32_* above).
#define ISSL_Z8(b)                                                                              \
  "+f"(z[b]), "+f"(z[b + 1]), "+f"(z[b + 2]), "+f"(z[b + 3]), "+f"(z[b + 4]), "+f"(z[b + 5]),   \
      "+f"(z[b + 6]), "+f"(z[b + 7])
#define ISSL_WGMMA_Z128_OUT                                                                     \
  ISSL_Z8(0), ISSL_Z8(8), ISSL_Z8(16), ISSL_Z8(24), ISSL_Z8(32), ISSL_Z8(40), ISSL_Z8(48),      \
      ISSL_Z8(56), ISSL_Z8(64), ISSL_Z8(72), ISSL_Z8(80), ISSL_Z8(88), ISSL_Z8(96),             \
      ISSL_Z8(104), ISSL_Z8(112), ISSL_Z8(120)
#define ISSL_WGMMA_Z128_REGS \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
  "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, " \
  "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
  "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, " \
  "%66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, " \
  "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, " \
  "%98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, " \
  "%111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, " \
  "%124, %125, %126, %127" \
  "}"
#define ISSL_WGMMA_Z24_OUT \
  ISSL_Z8(0), ISSL_Z8(8), ISSL_Z8(16)
#define ISSL_WGMMA_Z24_REGS \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
  "%18, %19, %20, %21, %22, %23" \
  "}"
#define ISSL_WGMMA_Z96_OUT \
  ISSL_Z8(0), ISSL_Z8(8), ISSL_Z8(16), ISSL_Z8(24), ISSL_Z8(32), ISSL_Z8(40), \
      ISSL_Z8(48), ISSL_Z8(56), ISSL_Z8(64), ISSL_Z8(72), ISSL_Z8(80), ISSL_Z8(88)
#define ISSL_WGMMA_Z96_REGS \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
  "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, " \
  "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
  "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, " \
  "%66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, " \
  "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95" \
  "}"

// Register A fragments of 4 k16 slices (64 columns) of +-1 rows, for one warp: `sb` points at
// the 32-bit word holding this warp's rows of column 0 (consecutive columns `stride` words
// apart), and bit sh (sh + 8) of it is the warp's row g (g + 8), set = -1. Register r of slice
// kk holds rows g (+8 for r = 1, 3), columns 16 kk + 2 t4, + 1 (+8 for r = 2, 3): the mma.sync
// m16n8k16 A layout per warp, which wgmma's register A uses.
template <class MmaT>
__device__ __forceinline__ void pm1_a_fragments(const uint32_t* sb, int stride, int sh, int t4,
                                                uint32_t (&af)[4][4]) {
  constexpr uint32_t kOnes = PlusOne<MmaT>::kBits * 0x10001u;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const int c0 = kk * 16 + 2 * t4;
    const uint32_t x0 = sb[(c0 + 0) * stride] >> sh, x1 = sb[(c0 + 1) * stride] >> sh;
    const uint32_t x8 = sb[(c0 + 8) * stride] >> sh, x9 = sb[(c0 + 9) * stride] >> sh;
    af[kk][0] = kOnes | ((x0 & 1u) << 15) | ((x1 & 1u) << 31);
    af[kk][1] = kOnes | (((x0 >> 8) & 1u) << 15) | (((x1 >> 8) & 1u) << 31);
    af[kk][2] = kOnes | ((x8 & 1u) << 15) | ((x9 & 1u) << 31);
    af[kk][3] = kOnes | (((x8 >> 8) & 1u) << 15) | (((x9 >> 8) & 1u) << 31);
  }
}

// One shared-shared wgmma: SHAPE "m64nNk16", TYPE "bf16" or "f16", REGS / OUT the accumulator
// list and operands, IA IB IS the operand numbers of desc_a, desc_b, scale_d (after the N / 2
// accumulators).
#define ISSL_WGMMA_SS(SHAPE, TYPE, REGS, OUT, IA, IB, IS)                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " IS ", 0;\n"                                   \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " " REGS ", " IA      \
               ", " IB ", p, 1, 1, 0, 0;\n}\n"                                                  \
               : OUT                                                                            \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d))
#define ISSL_WGMMA_Z8_REGS "{%0, %1, %2, %3, %4, %5, %6, %7}"
#define ISSL_WGMMA_Z8_OUT ISSL_Z8(0)

// D (+)= A (64 x 16, shared, K-major) * B (16 x N, shared, K-major) for one warpgroup, float32
// accumulators; MmaT: bf16 (every N) or f16 (N = 256, linear_ws). Thread register i holds row
// 16 w + g + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2 t4 + (i & 1). N: 16 and 64 (score_topk's
// query blocks), 48 and 192 (their three stacked query terms, score_stack), 256 (linear_ws).
template <int N, class MmaT = __nv_bfloat16>
__device__ __forceinline__ void wgmma_ss(float (&z)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                         int scale_d) {
  static_assert(N == 16 || N == 48 || N == 64 || N == 192 || N == 256, "m64nNk16 for these N");
  static_assert(std::is_same_v<MmaT, __nv_bfloat16> || (N == 256 && std::is_same_v<MmaT, __half>),
                "bf16 operands (f16 for N = 256)");
#if ISSL_WGMMA_DEVICE
  if constexpr (N == 16) {
    ISSL_WGMMA_SS("m64n16k16", "bf16", ISSL_WGMMA_Z8_REGS, ISSL_WGMMA_Z8_OUT, "%8", "%9", "%10");
  } else if constexpr (N == 48) {
    ISSL_WGMMA_SS("m64n48k16", "bf16", ISSL_WGMMA_Z24_REGS, ISSL_WGMMA_Z24_OUT, "%24", "%25",
                  "%26");
  } else if constexpr (N == 64) {
    ISSL_WGMMA_SS("m64n64k16", "bf16", ISSL_WGMMA_Z32_REGS, ISSL_WGMMA_Z32_OUT, "%32", "%33",
                  "%34");
  } else if constexpr (N == 192) {
    ISSL_WGMMA_SS("m64n192k16", "bf16", ISSL_WGMMA_Z96_REGS, ISSL_WGMMA_Z96_OUT, "%96", "%97",
                  "%98");
  } else if constexpr (std::is_same_v<MmaT, __nv_bfloat16>) {
    ISSL_WGMMA_SS("m64n256k16", "bf16", ISSL_WGMMA_Z128_REGS, ISSL_WGMMA_Z128_OUT, "%128",
                  "%129", "%130");
  } else {
    ISSL_WGMMA_SS("m64n256k16", "f16", ISSL_WGMMA_Z128_REGS, ISSL_WGMMA_Z128_OUT, "%128",
                  "%129", "%130");
  }
#endif
}

}  // namespace issl_fast::cuda::detail
