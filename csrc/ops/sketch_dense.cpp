#include "issl_fast/sketch_dense.h"

#include "convert.h"
#include "gemm.h"
#include "issl_fast/hash.h"
#include "validate.h"

namespace issl_fast {
namespace {

// Rows of g, converted to float32 tile by tile.
class DenseRows final : public cpu::RowSource {
 public:
  DenseRows(const void* g, DType dt, int64_t P) : g_(g), dt_(dt), P_(P), K_(cpu::isa()) {}
  void fill(int64_t b, int64_t p0, int64_t pc, float* dst) const override {
    K_.to_f32(cpu::offset_ptr(g_, dt_, b * P_ + p0), dt_, pc, dst);
  }

 private:
  const void* g_;
  DType dt_;
  int64_t P_;
  const cpu::IsaKernels& K_;
};

}  // namespace

void sketch_dense_cpu(const void* g, DType dtype, int64_t B, int64_t P, int64_t k, uint64_t seed,
                      Dist dist, int64_t col_offset, float* out, bool accumulate,
                      int num_threads) {
  cpu::require_dtype(dtype);
  cpu::require_dist(dist);
  cpu::require_nonneg(B, "B");
  cpu::require_nonneg(P, "P");
  cpu::require_pos(k, "k");
  cpu::require_nonneg(col_offset, "col_offset");
  cpu::require_ptr(g, B * P, "g");
  cpu::require_ptr(out, B * k, "out");
  DenseRows rows(g, dtype, P);
  cpu::sketch_gemm(rows, B, P, k, stream_key(seed, Role::kDense, dist), dist, col_offset, out,
                   accumulate, cpu::clamp_threads(num_threads));
}

}  // namespace issl_fast
