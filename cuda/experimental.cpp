// The process-wide switches of the experimental CUDA kernels (cuda_ops.h). Host code only: the
// op launchers read them when they plan a call.
#include <atomic>
#include <stdexcept>
#include <string>

#include "issl_fast/cuda_ops.h"

namespace issl_fast {
namespace {
std::atomic<uint32_t> g_experimental{0};
constexpr int kBits = 32;
std::atomic<uint64_t> g_launches[kBits];

int bit_index(CudaExperimental which) {
  const uint32_t v = static_cast<uint32_t>(which);
  if (v == 0 || (v & (v - 1)) != 0 || (v & ~kCudaExperimentalAll) != 0)
    throw std::invalid_argument("issl_fast CUDA: not a single experimental kernel bit: " +
                                std::to_string(v));
  int i = 0;
  while (((v >> i) & 1u) == 0) ++i;
  return i;
}
}  // namespace

void note_cuda_experimental_launch(CudaExperimental which) {
  g_launches[bit_index(which)].fetch_add(1, std::memory_order_relaxed);
}

uint64_t cuda_experimental_launches(CudaExperimental which) {
  return g_launches[bit_index(which)].load(std::memory_order_relaxed);
}

void set_cuda_experimental(uint32_t mask) {
  if ((mask & ~kCudaExperimentalAll) != 0)
    throw std::invalid_argument("issl_fast CUDA: unknown experimental kernel bits " +
                                std::to_string(mask & ~kCudaExperimentalAll));
  g_experimental.store(mask);
}

uint32_t cuda_experimental() { return g_experimental.load(); }

bool cuda_experimental_on(CudaExperimental which) {
  return (g_experimental.load() & static_cast<uint32_t>(which)) != 0;
}

}  // namespace issl_fast
