// A one-warpgroup wgmma probe (sm_90a) for tests: C = A B^T for one 64 x N x 64 tile through the
// exact helpers the wgmma kernels use (wgmma.cuh: swizzled cp.async placement,
// descriptors, register-A fragments from sign bits, fences, accumulator mapping). If those
// kernels disagree with the reference, this isolates whether a layout convention is at fault
// (the probe fails too) or their pipelines are (the probe passes).
#include <cuda_runtime.h>

#include "common.cuh"
#include "issl_fast/cuda_ops.h"
#include "wgmma.cuh"

namespace issl_fast::cuda::detail {
namespace {

constexpr int kProbeThreads = 128;  // one warpgroup

struct ProbeSmem {
  unsigned char a[64 * 128];  // A: 64 rows x 64 bf16, swizzled (SS mode)
  unsigned char b[256 * 128];  // B: N <= 256 rows x 64 bf16, swizzled
  uint32_t signs[64][8];      // RS mode: column c's 64-bit sign word in halves [c][0], [c][1]
};

// mode 0: SS, N = 64 (score_wgmma, 64-query blocks); 1: SS, N = 16 (16-query blocks);
// 2: RS, N = 64, A = +-1 from `signs` (linear_wgmma); 3: SS, N = 256 (linear_ws); 4, 5: SS,
// N = 48, 192 (score_stack's three query terms of 16- and 64-query blocks).
template <int kMode>
__global__ void __launch_bounds__(kProbeThreads) wgmma_probe_kernel(const uint16_t* A,
                                                                   const uint16_t* B,
                                                                   const uint64_t* signs,
                                                                   float* C) {
#if ISSL_WGMMA_DEVICE
  constexpr int N = kMode == 1 ? 16 : kMode == 3 ? 256 : kMode == 4 ? 48 : kMode == 5 ? 192 : 64;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  ProbeSmem& sm = *reinterpret_cast<ProbeSmem*>(smem_raw + (((raw + 1023u) & ~1023u) - raw));
  const int tid = threadIdx.x, lane = tid & 31, wq = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  for (int ch = tid; ch < N * 8 || ch < 64 * 8; ch += kProbeThreads) {
    const int row = ch >> 3, cc = ch & 7;
    if (kMode != 2 && row < 64)
      cp_async16(smem_u32(sm.a) + sw128_offset(row, cc), A + row * 64 + cc * 8, true);
    if (row < N) cp_async16(smem_u32(sm.b) + sw128_offset(row, cc), B + row * 64 + cc * 8, true);
  }
  if (kMode == 2 && tid < 64) {
    sm.signs[tid][0] = static_cast<uint32_t>(signs[tid]);
    sm.signs[tid][1] = static_cast<uint32_t>(signs[tid] >> 32);
  }
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
  float acc[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
  if constexpr (kMode == 2) {
    uint32_t af[4][4];
    pm1_a_fragments<__nv_bfloat16>(&sm.signs[0][wq >> 1], 8, (wq & 1) * 16 + g, t4, af);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_m64n64k16<__nv_bfloat16>(acc, af[kk], kmajor_sw128_desc(smem_u32(sm.b) + kk * 32),
                                     kk == 0 ? 0 : 1);
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) fence_reg(af[kk][r]);
  } else {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_ss<N>(acc, kmajor_sw128_desc(smem_u32(sm.a) + kk * 32),
                  kmajor_sw128_desc(smem_u32(sm.b) + kk * 32), kk == 0 ? 0 : 1);
    wgmma_commit();
    wgmma_wait<0>();
  }
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    fence_reg(acc[i]);
    const int row = wq * 16 + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * t4 + (i & 1);
    C[row * N + col] = acc[i];
  }
#else
  __trap();
#endif
}

}  // namespace
}  // namespace issl_fast::cuda::detail

namespace issl_fast {

void cuda_wgmma_probe(int mode, const void* A, const void* B, const uint64_t* signs, float* C,
                      std::uintptr_t stream) {
  using namespace cuda::detail;
  require(mode >= 0 && mode <= 5,
          "wgmma_probe: mode must be 0 (SS n64), 1 (SS n16), 2 (RS), 3 (SS n256), 4 (SS n48) or "
          "5 (SS n192)");
  const int64_t smem = static_cast<int64_t>(sizeof(ProbeSmem)) + 1024;
  auto launch = [&](auto kernel) {
    allow_smem(kernel, smem, "wgmma_probe_kernel");
    kernel<<<1, kProbeThreads, smem, as_stream(stream)>>>(static_cast<const uint16_t*>(A),
                                                         static_cast<const uint16_t*>(B),
                                                         signs, C);
    check_launch("wgmma_probe_kernel launch");
  };
  if (mode == 0) launch(wgmma_probe_kernel<0>);
  if (mode == 1) launch(wgmma_probe_kernel<1>);
  if (mode == 2) launch(wgmma_probe_kernel<2>);
  if (mode == 3) launch(wgmma_probe_kernel<3>);
  if (mode == 4) launch(wgmma_probe_kernel<4>);
  if (mode == 5) launch(wgmma_probe_kernel<5>);
}

}  // namespace issl_fast
