// Internal (host-only interface): sketch_kron in one kernel, implemented in kron_fused.cu. Used by
// sketch_kron.cu when its plan says so (kernel variant kKronFused, on by default: cuda_ops.h).
#pragma once
#include <cstdint>

#include "issl_fast/common.h"
#include "issl_fast/cuda_ops.h"

namespace issl_fast::cuda::detail {

// The whole plan of a sketch_kron call (fused or not); shapes, flags and num_sms only.
CudaKronPlan kron_plan(DType dtype, int64_t B, int64_t T, int64_t k_in, int64_t k_out, Dist dist,
                       CudaAlgo algo, int num_sms);

// Workspace floats of the fused kernel's split partials (0 with one split).
int64_t kron_fused_partial_floats(const CudaKronPlan& plan, int64_t B, int64_t k_in,
                                  int64_t k_out);

struct KronFused {
  const void* A = nullptr;  // [B, T, d_in], 16-bit
  const void* D = nullptr;  // [B, T, d_out], same dtype
  DType dtype = DType::kBFloat16;
  int64_t B = 0, T = 0, d_in = 0, d_out = 0, k_in = 0, k_out = 0;
  uint64_t key_in = 0, key_out = 0;  // stream_key(seed, kKronIn / kKronOut, Rademacher)
  float scale = 1.0f;                // 1 / sqrt(k_in k_out)
  float* out = nullptr;              // [B, k_out * k_in]
  bool accumulate = false;
};

// out[b, a * k_in + c] (+)= scale * sum_t (D_b P_out^T)[t, a] (A_b P_in^T)[t, c]; `part` holds
// kron_fused_partial_floats(plan, ...) floats.
void kron_fused(const KronFused& k, const CudaKronPlan& plan, float* part, std::uintptr_t stream);

}  // namespace issl_fast::cuda::detail
