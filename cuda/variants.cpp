// The process-wide switches of the CUDA kernel variants (cuda_ops.h). Host code only: the op
// launchers read them when they plan a call.
#include <atomic>
#include <stdexcept>
#include <string>

#include "issl_fast/cuda_ops.h"

namespace issl_fast {
namespace {
std::atomic<uint32_t> g_variants{kCudaVariantsDefault};
constexpr int kBits = 32;
std::atomic<uint64_t> g_launches[kBits];

int bit_index(CudaVariant which) {
  const uint32_t v = static_cast<uint32_t>(which);
  if (v == 0 || (v & (v - 1)) != 0 || (v & ~kCudaVariantsAll) != 0)
    throw std::invalid_argument("issl_fast CUDA: not a single kernel variant bit: " +
                                std::to_string(v));
  int i = 0;
  while (((v >> i) & 1u) == 0) ++i;
  return i;
}
}  // namespace

void note_cuda_variant_launch(CudaVariant which) {
  g_launches[bit_index(which)].fetch_add(1, std::memory_order_relaxed);
}

uint64_t cuda_variant_launches(CudaVariant which) {
  return g_launches[bit_index(which)].load(std::memory_order_relaxed);
}

void set_cuda_variants(uint32_t mask) {
  if ((mask & ~kCudaVariantsAll) != 0)
    throw std::invalid_argument("issl_fast CUDA: unknown kernel variant bits " +
                                std::to_string(mask & ~kCudaVariantsAll));
  g_variants.store(mask);
}

uint32_t cuda_variants() { return g_variants.load(); }

bool cuda_variant_on(CudaVariant which) {
  return (g_variants.load() & static_cast<uint32_t>(which)) != 0;
}

}  // namespace issl_fast
