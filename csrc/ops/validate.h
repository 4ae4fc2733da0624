// Internal: the shared argument checks (issl_fast/validate.h) as seen by the CPU ops.
#pragma once
#include "issl_fast/validate.h"

namespace issl_fast::cpu {

using namespace issl_fast::checks;  // cpu::require, cpu::require_pos, ...

inline int clamp_threads(int n) { return n < 1 ? 1 : n; }

}  // namespace issl_fast::cpu
