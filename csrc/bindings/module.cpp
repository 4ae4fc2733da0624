// The only file that includes pybind11. The module is private (issl_fast._C): it takes raw
// pointers as integers plus sizes, so it needs neither torch nor numpy headers; issl_fast/ops.py
// validates tensors and produces the pointers. Every kernel call releases the GIL.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "issl_fast/common.h"
#include "issl_fast/cpu_features.h"
#include "issl_fast/hash.h"
#include "issl_fast/score_topk.h"
#include "issl_fast/sketch_dense.h"
#include "issl_fast/sketch_kron.h"
#include "issl_fast/sketch_linear.h"
#include "issl_fast/sketch_sparse.h"
#if defined(ISSL_FAST_WITH_CUDA)
#include "issl_fast/cuda_ops.h"
#include "issl_fast/cuda_runtime_info.h"
#endif

namespace py = pybind11;
using issl_fast::Dist;
using issl_fast::DType;

namespace {

template <class T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

DType to_dtype(int d) { return static_cast<DType>(d); }
Dist to_dist(int d) { return static_cast<Dist>(d); }

issl_fast::SimdLevel parse_simd(const std::string& s) {
  if (s == "generic") return issl_fast::SimdLevel::kGeneric;
  if (s == "avx2") return issl_fast::SimdLevel::kAvx2;
  if (s == "avx512") return issl_fast::SimdLevel::kAvx512;
  throw std::invalid_argument("simd level must be 'generic', 'avx2' or 'avx512', got '" + s + "'");
}

py::dict build_info() {
  py::dict d;
#if defined(ISSL_FAST_VERSION)
  d["version"] = ISSL_FAST_VERSION;
#endif
  d["hash_version"] = issl_fast::kHashVersion;
  d["openmp_max_threads"] = omp_get_max_threads();
  d["simd_level"] = issl_fast::simd_name(issl_fast::simd_level());
  d["simd_supported"] = issl_fast::simd_name(issl_fast::cpu_simd_supported());
#if defined(ISSL_FAST_WITH_CUDA)
  d["cuda_compiled"] = true;
  const int v = issl_fast::cuda::runtime_version();
  d["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  d["cuda_architectures"] = ISSL_FAST_CUDA_ARCHS;
#else
  d["cuda_compiled"] = false;
  d["cuda_version"] = py::none();
  d["cuda_architectures"] = py::none();
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "issl_fast compiled kernels (private: use issl_fast.ops)";
  m.attr("HASH_VERSION") = issl_fast::kHashVersion;
  m.def("build_info", &build_info);
  m.def("simd_level", [] { return std::string(issl_fast::simd_name(issl_fast::simd_level())); });
  m.def("set_simd_level", [](const std::string& s) { issl_fast::set_simd_level(parse_simd(s)); });

  m.def(
      "sketch_dense",
      [](std::uintptr_t g, int dtype, int64_t B, int64_t P, int64_t k, uint64_t seed, int dist,
         int64_t col_offset, std::uintptr_t out, bool accumulate, int threads) {
        issl_fast::sketch_dense_cpu(ptr<const void>(g), to_dtype(dtype), B, P, k, seed,
                                    to_dist(dist), col_offset, ptr<float>(out), accumulate,
                                    threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "sketch_linear",
      [](std::uintptr_t A, std::uintptr_t D, int dtype, int64_t B, int64_t T, int64_t d_in,
         int64_t d_out, int64_t k, uint64_t seed, int dist, int64_t col_offset, std::uintptr_t out,
         bool accumulate, int threads) {
        issl_fast::sketch_linear_cpu(ptr<const void>(A), ptr<const void>(D), to_dtype(dtype), B,
                                     T, d_in, d_out, k, seed, to_dist(dist), col_offset,
                                     ptr<float>(out), accumulate, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "sketch_sparse",
      [](std::uintptr_t g, int dtype, int64_t B, int64_t P, int64_t k, int64_t s, uint64_t seed,
         int64_t col_offset, std::uintptr_t out, bool accumulate, int threads) {
        issl_fast::sketch_sparse_cpu(ptr<const void>(g), to_dtype(dtype), B, P, k, s, seed,
                                     col_offset, ptr<float>(out), accumulate, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "sketch_kron",
      [](std::uintptr_t A, std::uintptr_t D, int dtype, int64_t B, int64_t T, int64_t d_in,
         int64_t d_out, int64_t k_in, int64_t k_out, uint64_t seed, int dist, std::uintptr_t out,
         bool accumulate, int threads) {
        issl_fast::sketch_kron_cpu(ptr<const void>(A), ptr<const void>(D), to_dtype(dtype), B, T,
                                   d_in, d_out, k_in, k_out, seed, to_dist(dist), ptr<float>(out),
                                   accumulate, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "score_topk",
      [](std::uintptr_t Q, int64_t mq, std::uintptr_t G, int dtype, int64_t n, int64_t k,
         int64_t topk, std::uintptr_t exclude, int64_t e, int64_t index_offset,
         std::uintptr_t values, std::uintptr_t indices, bool accumulate, int threads) {
        issl_fast::score_topk_cpu(ptr<const float>(Q), mq, ptr<const void>(G), to_dtype(dtype), n,
                                  k, topk, ptr<const int64_t>(exclude), e, index_offset,
                                  ptr<float>(values), ptr<int64_t>(indices), accumulate, threads);
      },
      py::call_guard<py::gil_scoped_release>());

#if defined(ISSL_FAST_WITH_CUDA)
  m.def("cuda_device_count", [] {
    const auto q = issl_fast::cuda::device_count();
    return py::make_tuple(q.count, q.error, q.message);
  });
  m.def(
      "cuda_hash_words",
      [](uint64_t key, std::uintptr_t cols, std::uintptr_t words, std::uintptr_t out, int64_t n,
         std::uintptr_t stream) {
        issl_fast::cuda::hash_words(key, ptr<const uint64_t>(cols), ptr<const uint64_t>(words),
                                    ptr<uint64_t>(out), n, stream);
      },
      py::call_guard<py::gil_scoped_release>());

  // CUDA ops (cuda_ops.h): device pointers as integers, the caller's stream as an integer, a
  // workspace sized by the matching *_workspace query, `algo` 0 = auto, 1 = simt, 2 = tensor
  // cores. issl_fast/ops.py allocates everything with torch on the tensors' device.
  using issl_fast::CudaAlgo;
  auto to_algo = [](int a) { return static_cast<CudaAlgo>(a); };
  m.def("sketch_dense_cuda_workspace",
        [to_algo](int dtype, int64_t B, int64_t P, int64_t k, int dist, int algo, int num_sms) {
          return issl_fast::sketch_dense_cuda_workspace(to_dtype(dtype), B, P, k, to_dist(dist),
                                                        to_algo(algo), num_sms);
        });
  m.def(
      "sketch_dense_cuda",
      [to_algo](std::uintptr_t g, int dtype, int64_t B, int64_t P, int64_t k, uint64_t seed,
                int dist, int64_t col_offset, std::uintptr_t out, bool accumulate,
                std::uintptr_t ws, int64_t ws_bytes, int num_sms, int algo,
                std::uintptr_t stream) {
        issl_fast::sketch_dense_cuda(ptr<const void>(g), to_dtype(dtype), B, P, k, seed,
                                     to_dist(dist), col_offset, ptr<float>(out), accumulate,
                                     ptr<void>(ws), ws_bytes, num_sms, to_algo(algo), stream);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("sketch_linear_cuda_workspace",
        [to_algo](int dtype, int64_t B, int64_t T, int64_t d_in, int64_t d_out, int64_t k,
                  int dist, int algo, int num_sms) {
          return issl_fast::sketch_linear_cuda_workspace(to_dtype(dtype), B, T, d_in, d_out, k,
                                                         to_dist(dist), to_algo(algo), num_sms);
        });
  m.def(
      "sketch_linear_cuda",
      [to_algo](std::uintptr_t A, std::uintptr_t D, int dtype, int64_t B, int64_t T, int64_t d_in,
                int64_t d_out, int64_t k, uint64_t seed, int dist, int64_t col_offset,
                std::uintptr_t out, bool accumulate, std::uintptr_t ws, int64_t ws_bytes,
                int num_sms, int algo, std::uintptr_t stream) {
        issl_fast::sketch_linear_cuda(ptr<const void>(A), ptr<const void>(D), to_dtype(dtype), B,
                                      T, d_in, d_out, k, seed, to_dist(dist), col_offset,
                                      ptr<float>(out), accumulate, ptr<void>(ws), ws_bytes,
                                      num_sms, to_algo(algo), stream);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("sketch_sparse_cuda_workspace",
        [](int64_t B, int64_t P, int64_t k, int64_t s, int num_sms) {
          return issl_fast::sketch_sparse_cuda_workspace(B, P, k, s, num_sms);
        });
  m.def(
      "sketch_sparse_cuda",
      [](std::uintptr_t g, int dtype, int64_t B, int64_t P, int64_t k, int64_t s, uint64_t seed,
         int64_t col_offset, std::uintptr_t out, bool accumulate, std::uintptr_t ws,
         int64_t ws_bytes, int num_sms, std::uintptr_t stream) {
        issl_fast::sketch_sparse_cuda(ptr<const void>(g), to_dtype(dtype), B, P, k, s, seed,
                                      col_offset, ptr<float>(out), accumulate, ptr<void>(ws),
                                      ws_bytes, num_sms, stream);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("sketch_kron_cuda_workspace",
        [to_algo](int dtype, int64_t B, int64_t T, int64_t d_in, int64_t d_out, int64_t k_in,
                  int64_t k_out, int dist, int algo, int num_sms) {
          return issl_fast::sketch_kron_cuda_workspace(to_dtype(dtype), B, T, d_in, d_out, k_in,
                                                       k_out, to_dist(dist), to_algo(algo),
                                                       num_sms);
        });
  m.def(
      "sketch_kron_cuda",
      [to_algo](std::uintptr_t A, std::uintptr_t D, int dtype, int64_t B, int64_t T, int64_t d_in,
                int64_t d_out, int64_t k_in, int64_t k_out, uint64_t seed, int dist,
                std::uintptr_t out, bool accumulate, std::uintptr_t ws, int64_t ws_bytes,
                int num_sms, int algo, std::uintptr_t stream) {
        issl_fast::sketch_kron_cuda(ptr<const void>(A), ptr<const void>(D), to_dtype(dtype), B, T,
                                    d_in, d_out, k_in, k_out, seed, to_dist(dist),
                                    ptr<float>(out), accumulate, ptr<void>(ws), ws_bytes,
                                    num_sms, to_algo(algo), stream);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("score_topk_cuda_workspace",
        [to_algo](int64_t mq, std::uintptr_t G, int dtype, int64_t n, int64_t k, int64_t topk,
                  bool accumulate, int num_sms, int algo) {
          return issl_fast::score_topk_cuda_workspace(mq, ptr<const void>(G), to_dtype(dtype), n,
                                                      k, topk, accumulate, num_sms,
                                                      to_algo(algo));
        });
  m.def(
      "score_topk_cuda",
      [to_algo](std::uintptr_t Q, int64_t mq, std::uintptr_t G, int dtype, int64_t n, int64_t k,
                int64_t topk, std::uintptr_t exclude, int64_t e, int64_t index_offset,
                std::uintptr_t values, std::uintptr_t indices, bool accumulate, std::uintptr_t ws,
                int64_t ws_bytes, int num_sms, int algo, std::uintptr_t stream, bool query_bf16) {
        issl_fast::score_topk_cuda(ptr<const float>(Q), mq, ptr<const void>(G), to_dtype(dtype),
                                   n, k, topk, ptr<const int64_t>(exclude), e, index_offset,
                                   ptr<float>(values), ptr<int64_t>(indices), accumulate,
                                   ptr<void>(ws), ws_bytes, num_sms, to_algo(algo), stream,
                                   query_bf16);
      },
      py::call_guard<py::gil_scoped_release>());
  // Kernel variants (cuda_ops.h): names -> bits, the default set, and the process-wide mask.
  {
    using issl_fast::CudaVariant;
    py::dict flags;
    flags["kron_fused"] = static_cast<uint32_t>(CudaVariant::kKronFused);
    flags["linear_wgmma"] = static_cast<uint32_t>(CudaVariant::kLinearWgmma);
    flags["score_wgmma"] = static_cast<uint32_t>(CudaVariant::kScoreWgmma);
    flags["score_tma"] = static_cast<uint32_t>(CudaVariant::kScoreTma);
    flags["score_prepass"] = static_cast<uint32_t>(CudaVariant::kScorePrepass);
    flags["linear_ws"] = static_cast<uint32_t>(CudaVariant::kLinearWs);
    flags["score_pace"] = static_cast<uint32_t>(CudaVariant::kScorePace);
    flags["linear_ws_pair"] = static_cast<uint32_t>(CudaVariant::kLinearWsPair);
    flags["score_stack"] = static_cast<uint32_t>(CudaVariant::kScoreStack);
    flags["linear_ws_regs"] = static_cast<uint32_t>(CudaVariant::kLinearWsRegs);
    m.attr("CUDA_VARIANTS") = flags;
    m.attr("CUDA_VARIANTS_DEFAULT") = issl_fast::kCudaVariantsDefault;
  }
#if defined(ISSL_FAST_WITH_SM90A)
  m.attr("CUDA_SM90A") = true;  // the wgmma kernels (sm_90a code) are in this build
  m.def(
      "cuda_wgmma_probe",
      [](int mode, std::uintptr_t A, std::uintptr_t B, std::uintptr_t signs, std::uintptr_t C,
         std::uintptr_t stream) {
        issl_fast::cuda_wgmma_probe(mode, ptr<const void>(A), ptr<const void>(B),
                                    ptr<const uint64_t>(signs), ptr<float>(C), stream);
      },
      py::call_guard<py::gil_scoped_release>());
#else
  m.attr("CUDA_SM90A") = false;
#endif
  m.def("set_cuda_variants", [](uint32_t mask) { issl_fast::set_cuda_variants(mask); });
  m.def("cuda_variants", [] { return issl_fast::cuda_variants(); });
  m.def("cuda_variant_launches", [](uint32_t bit) {
    return issl_fast::cuda_variant_launches(static_cast<issl_fast::CudaVariant>(bit));
  });
  // Launch plans (pure host functions, no device needed): for tests and benchmarks.
  m.def("sketch_kron_cuda_plan",
        [to_algo](int dtype, int64_t B, int64_t T, int64_t k_in, int64_t k_out, int dist, int algo,
                  int num_sms) {
          const auto p = issl_fast::sketch_kron_cuda_plan(to_dtype(dtype), B, T, k_in, k_out,
                                                          to_dist(dist), to_algo(algo), num_sms);
          py::dict d;
          d["fused"] = p.fused;
          d["in_blocks"] = p.in_blocks;
          d["out_blocks"] = p.out_blocks;
          d["splits"] = p.splits;
          d["row_chunks"] = p.row_chunks;
          return d;
        });
  m.def("sketch_gemm_cuda_plan",
        [to_algo](int dtype, int64_t M, int64_t cols, int64_t N, int dist, int algo,
                  int num_sms) {
          const auto p = issl_fast::sketch_gemm_cuda_plan(to_dtype(dtype), M, cols, N,
                                                          to_dist(dist), to_algo(algo), num_sms);
          py::dict d;
          d["tensor_cores"] = p.tensor_cores;
          d["passes"] = p.passes;
          d["tile_m"] = p.tile_m;
          d["tile_n"] = p.tile_n;
          d["tiles_m"] = p.tiles_m;
          d["tiles_n"] = p.tiles_n;
          d["splits"] = p.splits;
          return d;
        });
  m.def("score_topk_cuda_plan",
        [to_algo](int64_t mq, std::uintptr_t G, int dtype, int64_t n, int64_t k, int64_t topk,
                  int num_sms, int algo) {
          const auto p = issl_fast::score_topk_cuda_plan(mq, ptr<const void>(G), to_dtype(dtype),
                                                         n, k, topk, num_sms, to_algo(algo));
          py::dict d;
          d["tensor_cores"] = p.tensor_cores;
          d["queries_per_block"] = p.queries_per_block;
          d["query_blocks"] = p.query_blocks;
          d["partitions"] = p.partitions;
          d["rows_per_tile"] = p.rows_per_tile;
          d["pre_partitions"] = p.pre_partitions;
          d["pre_rows"] = p.pre_rows;
          d["pace_window"] = p.pace_window;
          return d;
        });
#endif
}
