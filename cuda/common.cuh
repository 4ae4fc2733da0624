// Internal: helpers shared by the CUDA op kernels (error checks, element loads, the PTX wrappers
// for the tensor-core path). Included only by .cu files in this folder: no pybind11, no torch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "issl_fast/common.h"
#include "issl_fast/hash.h"
#include "validate.h"

namespace issl_fast::cuda::detail {

// ---- host side ----------------------------------------------------------------------------------
// Every CUDA runtime call and every launch goes through check(): pybind11 turns the
// std::runtime_error into a Python RuntimeError carrying the CUDA error string.
inline void check(cudaError_t st, const char* what) {
  if (st != cudaSuccess)
    throw std::runtime_error(std::string("issl_fast CUDA: ") + what + ": " + cudaGetErrorString(st));
}

inline void check_launch(const char* what) { check(cudaGetLastError(), what); }

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Argument errors (ValueError in Python) use the shared checks of cuda/validate.h, thrown before
// any CUDA work is queued.

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t round_up(int64_t a, int64_t b) {
  return ceil_div(a, b) * b;
}

// Workspace regions are carved at this alignment (covers float4/uint4 and cp.async sources).
constexpr int64_t kWsAlign = 256;

// Carves consecutive aligned regions out of the caller's workspace; throws if it is too small.
class Carver {
 public:
  Carver(void* base, int64_t bytes) : base_(static_cast<char*>(base)), bytes_(bytes) {}
  template <class T>
  T* take(int64_t count) {
    if (count <= 0) return nullptr;
    const int64_t at = round_up(used_, kWsAlign);
    const int64_t need = at + count * static_cast<int64_t>(sizeof(T));
    if (base_ == nullptr || need > bytes_)
      throw std::invalid_argument("issl_fast CUDA: workspace too small (" + std::to_string(bytes_) +
                                  " bytes, need at least " + std::to_string(need) +
                                  "); allocate what the *_workspace query returns");
    used_ = need;
    return reinterpret_cast<T*>(base_ + at);
  }

 private:
  char* base_;
  int64_t bytes_;
  int64_t used_ = 0;
};

// Size-only twin of Carver, so the workspace query and the launch share one layout function.
class Sizer {
 public:
  template <class T>
  T* take(int64_t count) {
    if (count <= 0) return nullptr;
    used_ = round_up(used_, kWsAlign) + count * static_cast<int64_t>(sizeof(T));
    return nullptr;
  }
  int64_t bytes() const { return used_; }

 private:
  int64_t used_ = 0;
};

// Largest dynamic shared memory a block of the current device may opt in to.
inline int max_dynamic_smem() {
  int dev = 0, v = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
        "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return v;
}

// Raises a kernel's dynamic shared-memory limit when it needs more than the default 48 KB.
template <class Kernel>
void allow_smem(Kernel kernel, int64_t bytes, const char* name) {
  if (bytes <= 48 * 1024) return;
  const int avail = max_dynamic_smem();
  if (bytes > avail)
    throw std::runtime_error(std::string("issl_fast CUDA: ") + name + " needs " +
                             std::to_string(bytes) + " bytes of shared memory per block, the "
                             "device allows " + std::to_string(avail));
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes)),
        name);
}

// Bytes per element of an input dtype (float32, or a 16-bit float).
inline int64_t elem_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// 16-byte alignment of a device pointer (cp.async / vector loads of whole rows).
inline bool aligned16(const void* ptr) {
  return (reinterpret_cast<std::uintptr_t>(ptr) & 15u) == 0;
}

// The current device is compute capability 9.0: the only one sm_90a code (wgmma) runs on.
inline bool current_device_is_cc90() {
  int dev = 0, major = 0, minor = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev),
        "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev),
        "cudaDeviceGetAttribute(ComputeCapabilityMinor)");
  return major == 9 && minor == 0;
}

// One-dimensional grids: blockIdx.x carries every tile index (no 65535 limits on y/z).
inline unsigned grid_1d(int64_t blocks, const char* name) {
  if (blocks > 0x7FFFFFFF)
    throw std::invalid_argument(std::string("issl_fast CUDA: ") + name + " needs " +
                                std::to_string(blocks) + " blocks (> 2^31 - 1); split the call");
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

// Blocks for a grid-stride elementwise kernel over n items.
inline unsigned grid_stride_blocks(int64_t n, int threads) {
  const int64_t b = ceil_div(n, threads);
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 * 16 ? 65535 * 16 : b));
}

// ---- device side --------------------------------------------------------------------------------
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// x(+)= sign flip by xor of the sign bit (exact negation, as the CPU kernels do).
__device__ __forceinline__ float xor_sign(float x, uint32_t sign_bit) {
  return __uint_as_float(__float_as_uint(x) ^ sign_bit);
}

// Splits a float32 into three bfloat16 terms whose exact sum is x for every normal float (each
// term carries 8 of the 24 significand bits; truncation keeps the residuals exact and avoids the
// overflow of rounding up near FLT_MAX). Non-finite x stays in the first term.
__device__ __forceinline__ void split3_bf16(float x, __nv_bfloat16& hi, __nv_bfloat16& mid,
                                            __nv_bfloat16& lo) {
  if (!isfinite(x)) {
    hi = __float2bfloat16_rz(x);
    mid = lo = __float2bfloat16_rz(0.0f);
    return;
  }
  hi = __float2bfloat16_rz(x);
  const float r1 = x - __bfloat162float(hi);
  mid = __float2bfloat16_rz(r1);
  const float r2 = r1 - __bfloat162float(mid);
  lo = __float2bfloat16_rz(r2);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices from shared memory (lanes 8i..8i+7 address the rows of matrix i).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D = A * B + D, m16n8k16, float32 accumulators; A row-major 16x16, B "col" 16x8.
template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy that bypasses registers; zero-fills when !pred (src unread).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Bit patterns of +1 in the two 16-bit MMA input formats; -1 is the same with bit 15 set.
template <class T>
struct PlusOne;
template <>
struct PlusOne<__nv_bfloat16> {
  static constexpr uint32_t kBits = 0x3F80u;
};
template <>
struct PlusOne<__half> {
  static constexpr uint32_t kBits = 0x3C00u;
};

}  // namespace issl_fast::cuda::detail
