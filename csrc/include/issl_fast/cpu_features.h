// Run-time choice of the CPU kernels' instruction set. The build never uses -march=native: every
// ISA is compiled into the module and the best one the running CPU supports is chosen at first
// use (or forced with the ISSL_FAST_SIMD environment variable / set_simd_level, for tests).
#pragma once

namespace issl_fast {

enum class SimdLevel : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

const char* simd_name(SimdLevel level);
SimdLevel cpu_simd_supported();    // best level this CPU (and the build) supports
SimdLevel simd_level();            // level in use
void set_simd_level(SimdLevel);    // std::invalid_argument if the CPU lacks it

}  // namespace issl_fast
