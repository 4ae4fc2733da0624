// The process-wide switches of the experimental CUDA kernels (cuda_ops.h). Host code only: the
// op launchers read them when they plan a call.
#include <atomic>
#include <stdexcept>
#include <string>

#include "issl_fast/cuda_ops.h"

namespace issl_fast {
namespace {
std::atomic<uint32_t> g_experimental{0};
}  // namespace

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
