#include "issl_fast/sketch_sparse.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "convert.h"
#include "first_error.h"
#include "gemm.h"
#include "issl_fast/hash.h"
#include "kernel_templates.h"
#include "validate.h"

namespace issl_fast {
namespace {

// Input coordinates per block: the block's bucket table (block * s uint32) and the thread's
// transposed input block (block x its rows) stay in cache while they are scattered. Every thread
// holds its own table, so large s gets shorter blocks (the table at most kTableEntries). The
// scatter order, coordinate by coordinate, does not depend on the block length.
constexpr int64_t kBlock = 1024;
constexpr int64_t kTableEntries = 64 * 1024;

}  // namespace

void sketch_sparse_cpu(const void* g, DType dtype, int64_t B, int64_t P, int64_t k, int64_t s,
                       uint64_t seed, int64_t col_offset, float* out, bool accumulate,
                       int num_threads) {
  cpu::require_dtype(dtype);
  cpu::require_nonneg(B, "B");
  cpu::require_nonneg(P, "P");
  cpu::require_pos(k, "k");
  cpu::require(k < (int64_t{1} << 31), "k must be < 2^31 for sketch_sparse, got " + std::to_string(k));
  cpu::require(s >= 1 && s <= k, "s must satisfy 1 <= s <= k, got s=" + std::to_string(s) +
                                     ", k=" + std::to_string(k));
  cpu::require_nonneg(col_offset, "col_offset");
  cpu::require_ptr(g, B * P, "g");
  cpu::require_ptr(out, B * k, "out");
  if (B == 0) return;

  const cpu::IsaKernels& K = cpu::isa();
  const uint64_t key = stream_key(seed, Role::kSparse, Dist::kRademacher);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s)));
  const int threads = static_cast<int>(std::min<int64_t>(cpu::clamp_threads(num_threads), B));
  const int64_t block = std::clamp<int64_t>(kTableEntries / s, cpu::kLaneGroup, kBlock);

  cpu::FirstError error;  // (k sizes each thread's scratch: a failed allocation is raised)
#pragma omp parallel num_threads(threads)
  error.capture([&] {
    // Each thread owns rows [b0, b1), handled in lane groups of kLaneGroup rows kept transposed
    // (kernel_templates.h), so one bucket update is one vector add over a group's rows. Every
    // thread builds each block's bucket table itself (vectorised hashing costs less than a
    // shared table's barrier per block), so threads never wait for each other.
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t b0 = B * tid / nt, b1 = B * (tid + 1) / nt;
    const int64_t groups = cpu::ceil_div(b1 - b0, cpu::kLaneGroup);
    std::vector<uint32_t> tab(block * s);
    std::vector<uint64_t> ck(block);
    cpu::Scratch yT(std::max<int64_t>(groups * k * cpu::kLaneGroup, 1));
    cpu::Scratch xT(std::max<int64_t>(groups * block * cpu::kLaneGroup, 1));
    cpu::Scratch rows((b1 - b0) * block + block);  // converted rows + one zero row for padding
    float* zero_row = rows.data() + (b1 - b0) * block;
    std::fill(zero_row, zero_row + block, 0.0f);
    std::fill(yT.data(), yT.data() + groups * k * cpu::kLaneGroup, 0.0f);
    for (int64_t p0 = 0; p0 < P; p0 += block) {
      const int64_t pc = std::min(block, P - p0);
      K.sparse_table(key, col_offset + p0, pc, s, k, ck.data(), tab.data());
      for (int64_t grp = 0; grp < groups; ++grp) {
        const float* lane_rows[cpu::kLaneGroup];
        for (int64_t l = 0; l < cpu::kLaneGroup; ++l) {
          const int64_t b = b0 + grp * cpu::kLaneGroup + l;
          if (b < b1 && dtype == DType::kFloat32) {  // read in place: no copy needed
            lane_rows[l] = static_cast<const float*>(g) + b * P + p0;
          } else if (b < b1) {
            float* dst = rows.data() + (b - b0) * block;
            K.to_f32(cpu::offset_ptr(g, dtype, b * P + p0), dtype, pc, dst);
            lane_rows[l] = dst;
          } else {
            lane_rows[l] = zero_row;
          }
        }
        float* xg = xT.data() + grp * block * cpu::kLaneGroup;
        K.pack_lanes(lane_rows, pc, scale, xg);
        K.scatter_group(tab.data(), s, pc, xg, yT.data() + grp * k * cpu::kLaneGroup);
      }
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t grp = (b - b0) / cpu::kLaneGroup, l = (b - b0) % cpu::kLaneGroup;
      const float* src = yT.data() + grp * k * cpu::kLaneGroup + l;
      float* y = out + b * k;
      if (accumulate) {
        for (int64_t j = 0; j < k; ++j) y[j] += src[j * cpu::kLaneGroup];
      } else {
        for (int64_t j = 0; j < k; ++j) y[j] = src[j * cpu::kLaneGroup];
      }
    }
  });
  error.rethrow();
}

}  // namespace issl_fast
