// Internal: what the direct sketch_linear kernels on wgmma share (linear_wgmma.cu,
// linear_ws.cu): the one-block-per-SM tile plan, the kernel parameters, and the step order.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "sketch_gemm.h"

namespace issl_fast::cuda::detail {

// Tiles of `rows` sketch rows x `examples` examples, and splits of d_out (at most max_splits)
// so that the grid fills num_sms blocks: these kernels run one block per SM.
struct DirectTilePlan {
  int64_t tiles_j = 0, tiles_b = 0, splits = 0;
};
inline DirectTilePlan direct_tile_plan(int64_t B, int64_t N, int64_t d_out, int num_sms,
                                       int64_t rows, int64_t examples, int64_t max_splits) {
  DirectTilePlan p;
  p.tiles_j = ceil_div(std::max<int64_t>(N, 1), rows);
  p.tiles_b = ceil_div(std::max<int64_t>(B, 1), examples);
  const int64_t tiles = p.tiles_j * p.tiles_b, target = std::max(1, num_sms);
  p.splits = tiles >= target
                 ? 1
                 : std::max<int64_t>(1, std::min({target / tiles, d_out, max_splits}));
  return p;
}
// Floats of split partials (splits x B x N; none with one split).
inline int64_t direct_tile_partial_floats(const DirectTilePlan& pl, int64_t B, int64_t N) {
  return pl.splits > 1 ? pl.splits * B * N : 0;
}

struct DirectParams {
  const void* A;
  const void* D;
  int64_t B, T, d_in, d_out, N;
  uint64_t key, col_offset;
  float scale;
  float* out;
  float* part;  // [splits][B][N] when splits > 1
  int64_t tiles_j, tiles_b, splits;
  int accumulate;
};
inline DirectParams direct_params(const LinearDirect& g, const DirectTilePlan& pl, float* part) {
  DirectParams prm{};
  prm.A = g.A;
  prm.D = g.D;
  prm.B = g.B;
  prm.T = g.T;
  prm.d_in = g.d_in;
  prm.d_out = g.d_out;
  prm.N = g.N;
  prm.key = g.key;
  prm.col_offset = g.col_offset;
  prm.scale = g.scale;
  prm.out = g.out;
  prm.part = part;
  prm.tiles_j = pl.tiles_j;
  prm.tiles_b = pl.tiles_b;
  prm.splits = pl.splits;
  prm.accumulate = g.accumulate ? 1 : 0;
  return prm;
}

// A block's share of the grid (blockIdx.x = j tile, then example tile, then split): sketch rows
// j0 .. + rows - 1, examples b0 .. + examples - 1, and the steps of `cols` input columns of its
// split of the output rows o.
struct DirectBlock {
  int64_t j0, b0, split, o_begin, nci, nsteps;
};
__device__ __forceinline__ DirectBlock direct_block(const DirectParams& p, int64_t rows,
                                                    int64_t examples, int64_t cols) {
  DirectBlock t;
  const int64_t bid = blockIdx.x;
  t.j0 = bid % p.tiles_j * rows;
  t.b0 = (bid / p.tiles_j) % p.tiles_b * examples;
  t.split = bid / (p.tiles_j * p.tiles_b);
  t.o_begin = p.d_out * t.split / p.splits;
  const int64_t o_end = p.d_out * (t.split + 1) / p.splits;
  t.nci = ceil_div(p.d_in, cols);
  t.nsteps = (o_end - t.o_begin) * p.T * t.nci;
  return t;
}

// The epilogue of one sum: out[b, j] = scale * v (+ out[b, j]) with one split, else raw v into
// this split's partial slice (reduce_partials scales and adds them in split order).
__device__ __forceinline__ void direct_store(const DirectParams& p, int64_t split, int64_t b,
                                             int64_t j, float v) {
  if (p.splits == 1) {
    float* o = p.out + b * p.N + j;
    *o = p.accumulate ? *o + p.scale * v : p.scale * v;
  } else {
    p.part[(split * p.B + b) * p.N + j] = v;
  }
}

// Step order: (o, t, column chunk c), c fastest (the mma.sync direct kernel's order), so a block
// folds Z into Y once per (o, t), after its last chunk.
struct LinearStepCursor {
  int64_t c = 0, t = 0, o = 0;
  __device__ __forceinline__ void next(int64_t nci, int64_t T) {
    if (++c == nci) {
      c = 0;
      if (++t == T) {
        t = 0;
        ++o;
      }
    }
  }
};

}  // namespace issl_fast::cuda::detail
