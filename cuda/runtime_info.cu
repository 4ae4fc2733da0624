// CUDA runtime queries and the device-side hash probe. The first CUDA translation unit; the op
// kernels (issue: CUDA backend) join it in this folder with the same conventions: torch-free, no
// Python headers, every CUDA call checked, work launched on the caller's stream.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "issl_fast/cuda_runtime_info.h"
#include "issl_fast/hash.h"

namespace issl_fast::cuda {
namespace {

constexpr int kThreadsPerBlock = 256;

void check(cudaError_t st, const char* what) {
  if (st != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(st));
}

__global__ void hash_words_kernel(uint64_t key, const uint64_t* cols, const uint64_t* words,
                                  uint64_t* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = hash_word(column_key(key, cols[i]), words[i]);
}

}  // namespace

DeviceQuery device_count() {
  DeviceQuery q;
  int n = 0;  // cudaGetDeviceCount leaves it unwritten on error (e.g. 35, no driver)
  const cudaError_t st = cudaGetDeviceCount(&n);
  if (st != cudaSuccess) {
    q.error = static_cast<int>(st);
    q.message = cudaGetErrorString(st);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return q;
  }
  q.count = n;
  return q;
}

int runtime_version() { return CUDART_VERSION; }

void hash_words(uint64_t key, const uint64_t* cols, const uint64_t* words, uint64_t* out,
                int64_t n, std::uintptr_t stream) {
  if (n <= 0) return;
  const int64_t blocks = (n + kThreadsPerBlock - 1) / kThreadsPerBlock;
  hash_words_kernel<<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0,
                      reinterpret_cast<cudaStream_t>(stream)>>>(key, cols, words, out, n);
  check(cudaGetLastError(), "hash_words launch");
}

}  // namespace issl_fast::cuda
