// Internal: the shared argument checks (issl_fast/validate.h) as seen by the CUDA entry points.
#pragma once
#include "issl_fast/validate.h"

namespace issl_fast::cuda::detail {

using namespace issl_fast::checks;  // require, require_pos, ... (same rules as the CPU ops)

}  // namespace issl_fast::cuda::detail
