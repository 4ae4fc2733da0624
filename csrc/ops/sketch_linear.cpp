#include "issl_fast/sketch_linear.h"

#include <algorithm>

#include "convert.h"
#include "gemm.h"
#include "issl_fast/hash.h"
#include "validate.h"

namespace issl_fast {
namespace {

// Row b of X is vec(G_b), G_b = sum_t D[b,t]^T A[b,t]; fill() computes one KC-long piece of it
// (a few partial rows o of G_b) as a sum over t of D[b,t,o] * A[b,t,i-range] (axpy), so only
// pc floats of the gradient ever exist per thread.
class LinearGradRows final : public cpu::RowSource {
 public:
  LinearGradRows(const void* A, const void* D, DType dt, int64_t T, int64_t d_in, int64_t d_out)
      : A_(A), D_(D), dt_(dt), T_(T), din_(d_in), dout_(d_out), K_(cpu::isa()) {}

  void fill(int64_t b, int64_t p0, int64_t pc, float* dst) const override {
    std::fill(dst, dst + pc, 0.0f);
    const int64_t o_lo = p0 / din_, o_hi = (p0 + pc - 1) / din_;
    // Small layers: the block covers whole rows of G, convert each A[b,t] row once. Wide layers:
    // convert only the segment each row o needs.
    const bool whole_rows = o_hi > o_lo && din_ <= 2 * pc;
    thread_local cpu::Scratch abuf;
    abuf.resize(din_);
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t row = b * T_ + t;
      const void* arow = cpu::offset_ptr(A_, dt_, row * din_);
      const void* drow = cpu::offset_ptr(D_, dt_, row * dout_);
      const float* afull = nullptr;
      if (whole_rows) afull = convert(arow, 0, din_, abuf.data());
      for (int64_t o = o_lo; o <= o_hi; ++o) {
        const int64_t q0 = std::max(p0, o * din_), q1 = std::min(p0 + pc, (o + 1) * din_);
        const int64_t i0 = q0 - o * din_;
        const float* a = whole_rows ? afull + i0 : convert(arow, i0, q1 - q0, abuf.data());
        K_.axpy(q1 - q0, cpu::load_f32(drow, dt_, o), a, dst + (q0 - p0));
      }
    }
  }

 private:
  // float32 rows are used in place; half types are converted into buf.
  const float* convert(const void* row, int64_t i0, int64_t n, float* buf) const {
    if (dt_ == DType::kFloat32) return static_cast<const float*>(row) + i0;
    K_.to_f32(cpu::offset_ptr(row, dt_, i0), dt_, n, buf);
    return buf;
  }

  const void* A_;
  const void* D_;
  DType dt_;
  int64_t T_, din_, dout_;
  const cpu::IsaKernels& K_;
};

}  // namespace

void sketch_linear_cpu(const void* A, const void* D, DType dtype, int64_t B, int64_t T,
                       int64_t d_in, int64_t d_out, int64_t k, uint64_t seed, Dist dist,
                       int64_t col_offset, float* out, bool accumulate, int num_threads) {
  cpu::require_dtype(dtype);
  cpu::require_dist(dist);
  cpu::require_nonneg(B, "B");
  cpu::require_nonneg(T, "T");
  cpu::require_pos(d_in, "d_in");
  cpu::require_pos(d_out, "d_out");
  cpu::require_pos(k, "k");
  cpu::require_nonneg(col_offset, "col_offset");
  cpu::require_ptr(A, B * T * d_in, "A");
  cpu::require_ptr(D, B * T * d_out, "D");
  cpu::require_ptr(out, B * k, "out");
  LinearGradRows rows(A, D, dtype, T, d_in, d_out);
  cpu::sketch_gemm(rows, B, d_in * d_out, k, stream_key(seed, Role::kDense, dist), dist,
                   col_offset, out, accumulate, cpu::clamp_threads(num_threads));
}

}  // namespace issl_fast
