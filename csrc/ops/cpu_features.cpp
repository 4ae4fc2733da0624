#include "issl_fast/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "isa_kernels.h"
#include "issl_fast/common.h"

namespace issl_fast {
namespace {

SimdLevel detect() {
#if defined(ISSL_FAST_X86)
  __builtin_cpu_init();
  // GCC's checks include the OS's XSAVE state (XCR0), so a level reported here is usable.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
    return SimdLevel::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return SimdLevel::kAvx2;
#endif
  return SimdLevel::kGeneric;
}

SimdLevel parse(const char* s, bool* ok) {
  *ok = true;
  if (std::strcmp(s, "generic") == 0) return SimdLevel::kGeneric;
  if (std::strcmp(s, "avx2") == 0) return SimdLevel::kAvx2;
  if (std::strcmp(s, "avx512") == 0) return SimdLevel::kAvx512;
  *ok = false;
  return SimdLevel::kGeneric;
}

std::atomic<int>& current() {
  static std::atomic<int> level{[] {
    SimdLevel best = detect();
    if (const char* env = std::getenv("ISSL_FAST_SIMD")) {
      bool ok = false;
      const SimdLevel want = parse(env, &ok);
      // An unknown or unsupported request falls back to the best level rather than crashing
      // at import; build_info() reports what is in use.
      if (ok && static_cast<int>(want) <= static_cast<int>(best)) best = want;
    }
    return static_cast<int>(best);
  }()};
  return level;
}

}  // namespace

const char* simd_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx2: return "avx2";
    case SimdLevel::kGeneric: break;
  }
  return "generic";
}

SimdLevel cpu_simd_supported() {
  static const SimdLevel best = detect();
  return best;
}

SimdLevel simd_level() { return static_cast<SimdLevel>(current().load()); }

void set_simd_level(SimdLevel level) {
  if (static_cast<int>(level) > static_cast<int>(cpu_simd_supported()))
    fail_arg(std::string("SIMD level '") + simd_name(level) + "' is not supported by this CPU (best: " +
             simd_name(cpu_simd_supported()) + ")");
  current().store(static_cast<int>(level));
}

namespace cpu {
const IsaKernels& isa() {
#if defined(ISSL_FAST_X86)
  switch (simd_level()) {
    case SimdLevel::kAvx512: return avx512_kernels();
    case SimdLevel::kAvx2: return avx2_kernels();
    case SimdLevel::kGeneric: break;
  }
#endif
  return generic_kernels();
}
}  // namespace cpu

}  // namespace issl_fast
