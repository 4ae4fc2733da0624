// Internal: blocked GEMM machinery shared by the sketch and kron kernels — packing, the random
// panel generator and the sketch driver that multiplies row blocks by on-the-fly random panels.
#pragma once
#include <cstdint>
#include <memory>
#include <new>

#include "isa_kernels.h"
#include "issl_fast/common.h"

namespace issl_fast::cpu {

// 64-byte aligned float scratch. CPU kernels allocate only O(tile) scratch like this; nothing
// that grows with B*P or P*k.
class Scratch {
 public:
  Scratch() = default;
  explicit Scratch(int64_t n) { resize(n); }
  void resize(int64_t n) {
    if (n <= size_) return;
    data_.reset(static_cast<float*>(::operator new[](sizeof(float) * n, std::align_val_t(64))));
    size_ = n;
  }
  float* data() { return data_.get(); }

 private:
  struct Free {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<float, Free> data_;
  int64_t size_ = 0;
};

// scale * R[j, col0 + p] for p < kc, j0 <= j < j0 + nc, packed in the ISA's NR-wide slivers
// (layout of IsaKernels::pack_signs), for either distribution.
void pack_random_panel(const IsaKernels& K, uint64_t key, Dist dist, int64_t col0, int64_t kc,
                       int64_t j0, int64_t nc, int64_t k, float scale, float* dst);

// B operand packing into NR-column slivers: dst[(g * pc + p) * NR + l] = B(p0 + p, g * NR + l),
// zero for columns >= n; float32 source with element (p, j) at src[p * ld + j].
void pack_b_rowmajor(const IsaKernels& K, const float* src, int64_t ld, int64_t n, int64_t p0,
                     int64_t pc, float* dst);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row p of a [pc x n] block scattered into w-wide slivers, the packed operand layout of the
// micro-kernel (A slivers: w = MR, B slivers: w = NR): dst[(g * pc + p) * w + l] = row[g * w + l],
// zero for g * w + l >= n. Packing row by row reads a row-major source sequentially.
inline void pack_row(const float* row, int64_t n, int64_t w, int64_t p, int64_t pc, float* dst) {
  for (int64_t g = 0; g * w < n; ++g) {
    float* d = dst + (g * pc + p) * w;
    const float* r = row + g * w;
    const int64_t cols = n - g * w < w ? n - g * w : w;
    int64_t l = 0;
    for (; l < cols; ++l) d[l] = r[l];
    for (; l < w; ++l) d[l] = 0.0f;
  }
}

// Single-threaded C[M x N] += A[M x Kd] * B[Kd x N], A read in place (float32, element (i, p) at
// a[i * a_rs + p * a_cs]); pack_b(p0, pc) returns the packed B panel for rows [p0, p0+pc)
// (ceil(N/NR) slivers of pc x NR). Loop order keeps one B sliver in L1 while A rows stream.
template <class PackB>
void gemm_a_inplace(const IsaKernels& K, int64_t M, int64_t N, int64_t Kd, const float* a,
                    int64_t a_rs, int64_t a_cs, PackB pack_b, float* C, int64_t ldc) {
  for (int64_t p0 = 0; p0 < Kd; p0 += K.kc) {
    const int64_t pc = Kd - p0 < K.kc ? Kd - p0 : K.kc;
    const float* bpack = pack_b(p0, pc);
    for (int64_t g = 0; g * K.nr < N; ++g) {
      const int64_t n = N - g * K.nr < K.nr ? N - g * K.nr : K.nr;
      for (int64_t s = 0; s * K.mr < M; ++s) {
        const int64_t m = M - s * K.mr < K.mr ? M - s * K.mr : K.mr;
        K.micro(pc, a + s * K.mr * a_rs + p0 * a_cs, a_rs, a_cs, bpack + g * pc * K.nr,
                C + s * K.mr * ldc + g * K.nr, ldc, m, n);
      }
    }
  }
}

// Source of the rows of the matrix X [B, P] that a sketch multiplies: writes X[b, p0 .. p0+pc)
// as float32 into dst. Called concurrently from several threads (one row each).
class RowSource {
 public:
  virtual ~RowSource() = default;
  virtual void fill(int64_t b, int64_t p0, int64_t pc, float* dst) const = 0;
  // Sources with costly per-example work (forming a slab of G) do it here: sketch_gemm calls
  // prepare(b, p0, pc) for every row b, spread over all threads, before the fills of that
  // panel (which go by MR-row slivers: a batch of one sliver would use one thread).
  virtual bool prepares() const { return false; }
  virtual void prepare(int64_t /*b*/, int64_t /*p0*/, int64_t /*pc*/) const {}
};

// Y[B, k] (+)= X[B, P] * (scale * R[:, col_offset:col_offset+P])^T with R generated on the fly
// from `key`, scale = 1/sqrt(k). Threads split the k columns of Y (so every element's summation
// order, and thus the result, is independent of the thread count); X panels are shared.
void sketch_gemm(const RowSource& src, int64_t B, int64_t P, int64_t k, uint64_t key, Dist dist,
                 int64_t col_offset, float* Y, bool accumulate, int num_threads);

}  // namespace issl_fast::cpu
