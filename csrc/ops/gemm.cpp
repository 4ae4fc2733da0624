#include "gemm.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "issl_fast/hash.h"

namespace issl_fast::cpu {

void pack_random_panel(const IsaKernels& K, uint64_t key, Dist dist, int64_t col0, int64_t kc,
                       int64_t j0, int64_t nc, int64_t k, float scale, float* dst) {
  if (dist == Dist::kRademacher) {
    K.pack_signs(key, col0, kc, j0, nc, k, scale, dst);
    return;
  }
  // Gaussian: one hash and one Box-Muller per entry (scalar; the Rademacher path is the fast one).
  const int64_t nr = K.nr;
  const int64_t ng = ceil_div(nc, nr);
  for (int64_t p = 0; p < kc; ++p) {
    const uint64_t ck = column_key(key, static_cast<uint64_t>(col0 + p));
    for (int64_t g = 0; g < ng; ++g) {
      float* d = dst + (g * kc + p) * nr;
      for (int64_t l = 0; l < nr; ++l) {
        const int64_t j = j0 + g * nr + l;
        d[l] = j < k ? scale * gaussian_from_hash(hash_word(ck, static_cast<uint64_t>(j))) : 0.0f;
      }
    }
  }
}

void pack_b_rowmajor(const IsaKernels& K, const float* src, int64_t ld, int64_t n, int64_t p0,
                     int64_t pc, float* dst) {
  const int64_t nr = K.nr;
  for (int64_t g = 0; g * nr < n; ++g) {
    const int64_t cols = std::min(nr, n - g * nr);
    float* d = dst + g * pc * nr;
    for (int64_t p = 0; p < pc; ++p) {
      const float* sp = src + (p0 + p) * ld + g * nr;
      int64_t l = 0;
      for (; l < cols; ++l) d[p * nr + l] = sp[l];
      for (; l < nr; ++l) d[p * nr + l] = 0.0f;
    }
  }
}

void sketch_gemm(const RowSource& src, int64_t B, int64_t P, int64_t k, uint64_t key, Dist dist,
                 int64_t col_offset, float* Y, bool accumulate, int num_threads) {
  const IsaKernels& K = isa();
  const int64_t mr = K.mr, nr = K.nr, kc = K.kc, nc = K.nc;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k)));
  const int64_t n_slivers = ceil_div(B, mr);
  const int64_t n_groups = ceil_div(k, nr);
  // Each thread owns whole NR-column groups of Y; more threads than groups would idle.
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_groups)));
  // Double-buffered X panel: while a slow thread still multiplies panel t, the others may fill
  // panel t+1; one barrier per block (the end of the fill loop) then suffices.
  Scratch apack[2] = {Scratch(n_slivers * mr * kc), Scratch(n_slivers * mr * kc)};

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    const int64_t j_begin = std::min(k, n_groups * tid / nt * nr);
    const int64_t j_end = std::min(k, n_groups * (tid + 1) / nt * nr);
    Scratch rows(mr * kc), bpack(kc * nc);
    if (!accumulate)
      for (int64_t b = 0; b < B; ++b)
        std::fill(Y + b * k + j_begin, Y + b * k + j_end, 0.0f);

    for (int64_t p0 = 0, it = 0; p0 < P; p0 += kc, ++it) {
      const int64_t pc = std::min(kc, P - p0);
      float* ap = apack[it & 1].data();
      if (src.prepares()) {
#pragma omp for schedule(static, 1)
        for (int64_t b = 0; b < B; ++b) src.prepare(b, p0, pc);
      }  // implicit barrier: every row is prepared
#pragma omp for schedule(static)
      for (int64_t s = 0; s < n_slivers; ++s) {
        float* d = ap + s * mr * kc;
        for (int64_t i = 0; i < mr; ++i) {
          const int64_t b = s * mr + i;
          if (b < B) {
            src.fill(b, p0, pc, rows.data());
            for (int64_t p = 0; p < pc; ++p) d[p * mr + i] = rows.data()[p];
          } else {
            for (int64_t p = 0; p < pc; ++p) d[p * mr + i] = 0.0f;
          }
        }
      }  // implicit barrier: panel `it` is complete
      for (int64_t jc = j_begin; jc < j_end; jc += nc) {
        const int64_t ncur = std::min(nc, j_end - jc);
        pack_random_panel(K, key, dist, col_offset + p0, pc, jc, ncur, k, scale, bpack.data());
        for (int64_t jr = 0; jr < ncur; jr += nr) {
          const float* bp = bpack.data() + (jr / nr) * pc * nr;
          const int64_t n = std::min(nr, ncur - jr);
          for (int64_t s = 0; s < n_slivers; ++s)
            K.micro(pc, ap + s * mr * kc, 1, mr, bp, Y + s * mr * k + jc + jr, k,
                    std::min(mr, B - s * mr), n);
        }
      }
    }
  }
}

}  // namespace issl_fast::cpu
