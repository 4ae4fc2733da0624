// CUDA versions of the five ops (cuda/*.cu), as plain C++: no CUDA headers needed by the caller.
// Same contracts as the CPU headers (sketch_dense.h ... score_topk.h), with these differences:
//   * every pointer is a device pointer of the current CUDA device (the caller selects it);
//   * work is queued on `stream` (a cudaStream_t passed as an integer) and nothing waits for it;
//   * nothing is allocated: outputs and a workspace come from the caller. Each op has a
//     *_workspace query giving the workspace bytes for the same arguments (0 = none needed);
//     the op throws std::invalid_argument if it gets less;
//   * `num_sms` is the device's multiprocessor count (it shapes the launch plan, nothing else);
//   * `algo` picks the kernel family: kAuto, kSimt (float32 FMA) or kTensorCore (bf16/fp16 MMA
//     with float32 accumulation; Rademacher sketches and bfloat16 stores only), for tests and
//     benchmarks that compare the two.
// Argument errors throw std::invalid_argument (Python ValueError) before any CUDA work is queued;
// CUDA failures throw std::runtime_error with the CUDA error string (Python RuntimeError).
// Results are deterministic run to run (no float atomics). Rademacher entries are bit-identical
// to the CPU's; sums differ from the CPU's by float rounding (another summation order).
#pragma once
#include <cstdint>

#include "issl_fast/common.h"

namespace issl_fast {

enum class CudaAlgo : int { kAuto = 0, kSimt = 1, kTensorCore = 2 };

// Kernel variants: a process-wide bit mask read when an op is planned (workspace query and launch
// alike); a variant changes which kernel runs, never the contract. The default set holds the
// variants that passed the cuda tests on a GPU and beat the kernel they replace there
// (bench/gpu/results); switching one off runs the portable kernel instead, the one GPUs without
// the variant's hardware run, so one GPU can test both. Experimental variants are written and
// compiled but not yet validated on a GPU, so off by default: bench/gpu/run.sh tests them in a
// pass of their own and benchmarks each against the default; one that passes and is faster
// joins the default set.
enum class CudaVariant : uint32_t {
  kKronFused = 1u << 0,       // sketch_kron in one kernel per (example, rows, output block)
  kLinearWgmma = 1u << 1,     // direct sketch_linear on wgmma (sm_90a builds, CC 9.0 devices)
  kScoreWgmma = 1u << 2,      // score_topk's tensor-core blocks scored with wgmma (same)
  kScoreTma = 1u << 3,        // the wgmma scorer's ring filled by TMA (one thread per copy)
  kScorePrepass = 1u << 4,    // experimental: score_topk bars from an exact pre-pass (any GPU)
  kLinearWs = 1u << 5,        // experimental: direct sketch_linear, producer/consumer warpgroups
  kScorePace = 1u << 6,       // experimental: score_topk's query blocks paced to share L2 (any GPU)
  kLinearWsPair = 1u << 7,    // experimental: linear_ws in clusters of two sharing A by multicast
  kScoreStack = 1u << 8,      // experimental: score_wgmma, float32 queries' 3 terms in one wgmma
  kLinearWsRegs = 1u << 9,    // experimental: linear_ws with Y partly in registers, 3 ring slots
};
constexpr uint32_t kCudaVariantsAll = 0x3FFu;
constexpr uint32_t kCudaVariantsDefault = 0xFu;
void set_cuda_variants(uint32_t mask);  // throws std::invalid_argument on unknown bits
uint32_t cuda_variants();
bool cuda_variant_on(CudaVariant which);
// Launches of each variant's kernel in this process (tests check that a switch took effect).
void note_cuda_variant_launch(CudaVariant which);
uint64_t cuda_variant_launches(CudaVariant which);

// g [B, P] -> out [B, k] (sketch_dense.h).
int64_t sketch_dense_cuda_workspace(DType dtype, int64_t B, int64_t P, int64_t k, Dist dist,
                                    CudaAlgo algo, int num_sms);
void sketch_dense_cuda(const void* g, DType dtype, int64_t B, int64_t P, int64_t k, uint64_t seed,
                       Dist dist, int64_t col_offset, float* out, bool accumulate, void* ws,
                       int64_t ws_bytes, int num_sms, CudaAlgo algo, std::uintptr_t stream);

// A [B, T, d_in], D [B, T, d_out] -> out [B, k] (sketch_linear.h). G is never materialised
// whole: either not at all (small T, tensor cores) or in column chunks of the workspace.
int64_t sketch_linear_cuda_workspace(DType dtype, int64_t B, int64_t T, int64_t d_in,
                                     int64_t d_out, int64_t k, Dist dist, CudaAlgo algo,
                                     int num_sms);
void sketch_linear_cuda(const void* A, const void* D, DType dtype, int64_t B, int64_t T,
                        int64_t d_in, int64_t d_out, int64_t k, uint64_t seed, Dist dist,
                        int64_t col_offset, float* out, bool accumulate, void* ws,
                        int64_t ws_bytes, int num_sms, CudaAlgo algo, std::uintptr_t stream);

// g [B, P] -> out [B, k], 1 <= s <= k < 2^31 (sketch_sparse.h). With one split per output the
// sums are in the CPU's order (increasing p), so results then equal the CPU's bit for bit.
int64_t sketch_sparse_cuda_workspace(int64_t B, int64_t P, int64_t k, int64_t s, int num_sms);
void sketch_sparse_cuda(const void* g, DType dtype, int64_t B, int64_t P, int64_t k, int64_t s,
                        uint64_t seed, int64_t col_offset, float* out, bool accumulate, void* ws,
                        int64_t ws_bytes, int num_sms, std::uintptr_t stream);

// A [B, T, d_in], D [B, T, d_out] -> out [B, k_out * k_in] (sketch_kron.h). The projected
// factors U = A P_in^T, V = D P_out^T live in the workspace for a chunk of examples at a time.
int64_t sketch_kron_cuda_workspace(DType dtype, int64_t B, int64_t T, int64_t d_in,
                                   int64_t d_out, int64_t k_in, int64_t k_out, Dist dist,
                                   CudaAlgo algo, int num_sms);
void sketch_kron_cuda(const void* A, const void* D, DType dtype, int64_t B, int64_t T,
                      int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out, uint64_t seed,
                      Dist dist, float* out, bool accumulate, void* ws, int64_t ws_bytes,
                      int num_sms, CudaAlgo algo, std::uintptr_t stream);

// Q [m, k] float32, G [n, k] -> values [m, topk], indices [m, topk] (score_topk.h), all on the
// device. One pass over G with a fused per-query top-k per thread block, then a merge of the
// blocks' lists; never an m x n matrix. With accumulate, values/indices must hold an earlier
// result sorted by (value desc, index asc) with empty slots (-inf, -1) last (ops.py sorts and
// sanitises it). The workspace size depends on G's address (16-byte alignment picks the kernel).
// query_bf16: every Q value is a bfloat16 number (ops.py sets it for bfloat16 queries), so the
// tensor-core scorer needs one MMA pass instead of three; the scores are the same.
int64_t score_topk_cuda_workspace(int64_t m, const void* G, DType dtype, int64_t n, int64_t k,
                                  int64_t topk, bool accumulate, int num_sms, CudaAlgo algo);
void score_topk_cuda(const float* Q, int64_t m, const void* G, DType dtype, int64_t n, int64_t k,
                     int64_t topk, const int64_t* exclude, int64_t e, int64_t index_offset,
                     float* values, int64_t* indices, bool accumulate, void* ws, int64_t ws_bytes,
                     int num_sms, CudaAlgo algo, std::uintptr_t stream, bool query_bf16 = false);

// Tests only, sm_90a builds (ISSL_FAST_WITH_SM90A), compute capability 9.0 devices: one
// warpgroup computes one tile through the helpers of the wgmma kernels (cuda/wgmma.cuh),
// isolating their layout conventions from their pipelines. Device pointers, queued on `stream`:
//   mode 0: C[64, 64] = A[64, 64] B[64, 64]^T  (bf16, shared-shared wgmma m64n64k16)
//   mode 1: C[64, 16] = A[64, 64] B[16, 64]^T  (shared-shared m64n16k16)
//   mode 2: C[64, 64] = S B[64, 64]^T, S[j, c] = -1 if bit j of signs[c] is set, else +1
//           (register-A m64n64k16 built from sign bits)
//   mode 3: C[64, 256] = A[64, 64] B[256, 64]^T  (shared-shared m64n256k16: linear_ws)
//   modes 4, 5: the same with N = 48, 192 (m64n48k16, m64n192k16: score_stack)
// A, B row-major bfloat16 with 64 columns, 16-byte aligned; signs[64]; C row-major float32.
void cuda_wgmma_probe(int mode, const void* A, const void* B, const uint64_t* signs, float* C,
                      std::uintptr_t stream);

// The launch plans, for tests and benchmarks (pure host functions: no device needed).
struct CudaGemmPlan {
  bool tensor_cores = false;  // MMA kernel (else SIMT)
  int passes = 1;             // MMA passes per product (3 for float32 inputs split in bf16)
  int64_t tile_m = 0, tile_n = 0, tiles_m = 0, tiles_n = 0, splits = 0;
};
CudaGemmPlan sketch_gemm_cuda_plan(DType dtype, int64_t M, int64_t cols, int64_t N, Dist dist,
                                   CudaAlgo algo, int num_sms);
struct CudaTopkPlan {
  bool tensor_cores = false;
  int64_t queries_per_block = 0, query_blocks = 0, partitions = 0, rows_per_tile = 0;
  // CudaVariant::kScorePrepass: the first pre_rows rows are scored first by pre_partitions
  // partitions, and the k-th best value of their union seeds every query's bar for the rest
  // (partitions over rows [pre_rows, n)); 0 and 0 without it.
  int64_t pre_partitions = 0, pre_rows = 0;
  // CudaVariant::kScorePace: with several query blocks, each keeps within pace_window tiles of
  // the slowest block of its partition (same store rows, so they stay in L2); 0 without it.
  int64_t pace_window = 0;
};
// sketch_kron: fused (one kernel, CudaVariant::kKronFused) or the two projections plus the
// outer product; for the fused kernel, blocks of 64 outputs along k_in / k_out and the splits of
// the T rows (partials reduced in split order).
struct CudaKronPlan {
  bool fused = false;
  int64_t in_blocks = 0, out_blocks = 0, splits = 0, row_chunks = 0;
};
CudaKronPlan sketch_kron_cuda_plan(DType dtype, int64_t B, int64_t T, int64_t k_in, int64_t k_out,
                                   Dist dist, CudaAlgo algo, int num_sms);
CudaTopkPlan score_topk_cuda_plan(int64_t m, const void* G, DType dtype, int64_t n, int64_t k,
                                  int64_t topk, int num_sms, CudaAlgo algo);

}  // namespace issl_fast
