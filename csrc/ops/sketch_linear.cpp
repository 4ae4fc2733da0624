#include "issl_fast/sketch_linear.h"

#include <algorithm>
#include <vector>

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

// Row b of X is vec(G_b) again, for many positions per example (convolutions: T = output
// pixels x views): G_b is formed a slab of whole rows o at a time by one GEMM over t, so A_b is
// read once per slab. LinearGradRows reads all of A_b for every KC-long piece the sketch asks
// for (d_in * d_out / KC times), from memory once A_b outgrows the caches: 6.6 s against 0.3 s
// at B = 8, T = 4797, d_in = 768, d_out = 256 (a 1-D conv layer on one second of audio).
class LinearGradSlabs final : public cpu::RowSource {
 public:
  LinearGradSlabs(const void* A, const void* D, DType dt, int64_t B, int64_t T, int64_t d_in,
                  int64_t d_out)
      : A_(A), D_(D), dt_(dt), T_(T), din_(d_in), dout_(d_out), K_(cpu::isa()),
        slab_rows_(slab_rows(K_, B, T, d_in, d_out)), slabs_(B) {}

  // Floats of G held per example: 256 KiB (a few slabs per layer), 1 MiB from T = KC on, and
  // at most kSlabBudget floats (64 MiB) for the whole batch: a large B gets thinner slabs, never
  // less than the piece the sketch asks for (KC floats: what its own panels already hold per
  // example). Every slab packs all of A_b (T x d_in) for a GEMM only `rows` high, so thin slabs
  // cost passes over A_b: at B = 8, T = 4797, 768 -> 256, 256 KiB slabs (80, 80, 80 and 16
  // rows) formed G 1.4x (AVX-512) / 1.15x (AVX2) slower than one 1 MiB slab, and the op was
  // 1.1-1.2x slower at B = 16, T = 256-1024, 512 x 512. With few positions the passes are cheap
  // and the sketch dominates: 1 MiB slabs made B = 64, T = 4-32, 512 x 512 6-18% slower
  // (48 MiB more to fault in and read back per call).
  static constexpr int64_t kSlabFloats = int64_t{1} << 16;
  static constexpr int64_t kSlabFloatsLongT = int64_t{1} << 18;
  static constexpr int64_t kSlabBudget = int64_t{1} << 24;

  // Rows of G per slab, in whole MR-row micro-tiles where possible.
  static int64_t slab_rows(const cpu::IsaKernels& K, int64_t B, int64_t T, int64_t d_in,
                           int64_t d_out) {
    const int64_t want = T >= K.kc ? kSlabFloatsLongT : kSlabFloats;
    const int64_t floats = std::min(want, kSlabBudget / std::max<int64_t>(B, 1));
    int64_t rows = std::max<int64_t>(1, floats / d_in);
    if (rows > K.mr) rows -= rows % K.mr;
    return std::min(rows, d_out);
  }

  // A slab's GEMM goes in blocks of rows and columns, so that its per-thread scratch stays
  // under ~8 MiB whatever d_in and the slab's height (packing whole rows of a 200k-input layer
  // would take 200 MB per thread, kept by the thread_local buffers).
  static constexpr int64_t kRowBlock = 256;
  static constexpr int64_t kColBlock = 4096;

  // The sketch asks for each example's pieces in increasing p0 (one thread per example at a
  // time), so each slab is formed once (bar the row a piece straddles, formed twice).
  bool prepares() const override { return true; }
  void prepare(int64_t b, int64_t p0, int64_t pc) const override {
    Slab& s = slabs_[b];
    const int64_t o_lo = p0 / din_, o_hi = (p0 + pc - 1) / din_;
    if (s.rows == 0 || o_lo < s.o0 || o_hi >= s.o0 + s.rows) form(b, o_lo, o_hi - o_lo + 1, s);
  }
  void fill(int64_t b, int64_t p0, int64_t pc, float* dst) const override {
    prepare(b, p0, pc);  // (done already when called from sketch_gemm)
    Slab& s = slabs_[b];
    const float* src = s.data.data() - s.o0 * din_;
    std::copy(src + p0, src + p0 + pc, dst);
  }

 private:
  struct Slab {
    int64_t o0 = 0, rows = 0;
    cpu::Scratch data;
  };

  // s = G_b[o0 : o0 + rows, :] = sum_t D_b[t, o0 : o0 + rows]^T A_b[t, :] with rows >= need
  // (the piece asked for), by KC-deep steps over t, in kColBlock x kRowBlock blocks of the slab.
  // Both operands are packed, a row of their source at a time (row t of A_b and of D_b, read
  // sequentially): A_b's into NR-column slivers once per step, D_b^T's into MR-row slivers. Read
  // in place, D_b^T's column stride (d_out floats) put a micro-kernel's KC broadcasts in a few
  // L1 sets, and packing A_b a sliver at a time read it in strips, 2-3 lines per 3 KB row.
  // Each element of G is the same sum of the same KC-deep block sums in the same order
  // whatever the blocking, the slab height or the thread, so results are unchanged bit for bit.
  void form(int64_t b, int64_t o0, int64_t need, Slab& s) const {
    const int64_t rows = std::min(std::max(slab_rows_, need), dout_ - o0);
    const int64_t kc = K_.kc, mr = K_.mr, nr = K_.nr;
    s.o0 = o0;
    s.rows = rows;
    s.data.resize(rows * din_);
    float* C = s.data.data();
    std::fill(C, C + rows * din_, 0.0f);
    const int64_t rb_max = std::min(rows, kRowBlock), nb_max = std::min(din_, kColBlock);
    thread_local cpu::Scratch apack, bpack, rowbuf;
    apack.resize(kc * cpu::ceil_div(rb_max, mr) * mr);
    bpack.resize(kc * cpu::ceil_div(nb_max, nr) * nr);
    if (dt_ != DType::kFloat32) rowbuf.resize(std::max(rb_max, nb_max));
    // n elements of X (A or D) from element `at`, as float32: in place, or half types widened.
    auto row = [&](const void* X, int64_t at, int64_t n) -> const float* {
      if (dt_ == DType::kFloat32) return static_cast<const float*>(X) + at;
      K_.to_f32(cpu::offset_ptr(X, dt_, at), dt_, n, rowbuf.data());
      return rowbuf.data();
    };
    for (int64_t t0 = 0; t0 < T_; t0 += kc) {
      const int64_t tc = std::min(kc, T_ - t0), row0 = b * T_ + t0;
      for (int64_t i0 = 0; i0 < din_; i0 += kColBlock) {
        const int64_t nb = std::min(kColBlock, din_ - i0);
        for (int64_t t = 0; t < tc; ++t)
          cpu::pack_row(row(A_, (row0 + t) * din_ + i0, nb), nb, nr, t, tc, bpack.data());
        for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
          const int64_t rb = std::min(kRowBlock, rows - r0);
          for (int64_t t = 0; t < tc; ++t)
            cpu::pack_row(row(D_, (row0 + t) * dout_ + o0 + r0, rb), rb, mr, t, tc, apack.data());
          // One B sliver stays in L1 while the block's A slivers stream from L2.
          for (int64_t g = 0; g * nr < nb; ++g) {
            const int64_t n = std::min(nr, nb - g * nr);
            for (int64_t sv = 0; sv * mr < rb; ++sv)
              K_.micro_packed(tc, apack.data() + sv * tc * mr, bpack.data() + g * tc * nr,
                              C + (r0 + sv * mr) * din_ + i0 + g * nr, din_,
                              std::min(mr, rb - sv * mr), n);
          }
        }
      }
    }
  }

  const void* A_;
  const void* D_;
  DType dt_;
  int64_t T_, din_, dout_;
  const cpu::IsaKernels& K_;
  int64_t slab_rows_;
  mutable std::vector<Slab> slabs_;  // one per example (see fill)
};

// From this many positions per example on, G is formed in slabs by GEMM (LinearGradSlabs).
// Measured on 2 threads (slabs vs rows): 0.93-1.04x at T = 1-8 for B = 64, 512 x 512, k = 1024;
// 1.1-1.7x for smaller layers at T = 1-8; 1.2-3.8x at T = 32-128. Below it, the per-row
// route needs no per-example buffer.
constexpr int64_t kSlabMinT = 4;

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
  const uint64_t key = stream_key(seed, Role::kDense, dist);
  const int threads = cpu::clamp_threads(num_threads);
  if (T >= kSlabMinT) {
    LinearGradSlabs slabs(A, D, dtype, B, T, d_in, d_out);
    cpu::sketch_gemm(slabs, B, d_in * d_out, k, key, dist, col_offset, out, accumulate, threads);
    return;
  }
  LinearGradRows rows(A, D, dtype, T, d_in, d_out);
  cpu::sketch_gemm(rows, B, d_in * d_out, k, key, dist, col_offset, out, accumulate, threads);
}

}  // namespace issl_fast
