#include "issl_fast/score_topk.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "convert.h"
#include "first_error.h"
#include "gemm.h"
#include "validate.h"

namespace issl_fast {
namespace {

// Store rows per tile: the converted tile (kTileBytes of float32) stays in L2 while every query
// block is scored against it.
constexpr int64_t kTileBytes = 256 * 1024;
constexpr int64_t kMinTileRows = 16;
constexpr int64_t kMaxTileRows = 1024;
// Queries scored per pass over a tile: bounds the score block to kQueryBlock x tile floats.
constexpr int64_t kQueryBlock = 256;
// Up to this many queries, half-precision rows are widened in registers inside the dot kernel
// (one pass over memory, no staging buffer: the bandwidth-bound case). With more queries each
// row would be widened once per query block, so the tile is converted once into a float32
// buffer instead. Both paths give bit-identical scores.
constexpr int64_t kFusedMaxQueries = 4;
// Above that, when all queries' float32 rows fit this L1 budget, the store streams past them in
// blocks of kStageRows rows: while one block (widened to float32, in L1) is scored, the dot
// kernel widens the next block from DRAM a vector per k-step (dot_tile's side run). With every
// dot operand in L1, the stream's reads overlap the arithmetic instead of adding to it: m = 16,
// k = 512 on one thread ran 1.25-1.45x faster than staging whole tiles (about 5% with both
// cores of the reference VM busy). Up to kMicroMaxQueries queries: beyond that (small k) the
// per-block overhead outweighs the overlap (m = 64 at k = 128 measured slower than tile
// staging). Other query sets take the tile-staged path.
constexpr int64_t kL1QueryBytes = 32 * 1024;
constexpr int64_t kMicroMaxQueries = 32;
constexpr int64_t kStageRows = 4;

struct Entry {
  float v;
  int64_t i;
};

// "a ranks after b": lower value, or equal value and higher index.
inline bool worse(const Entry& a, const Entry& b) { return a.v < b.v || (a.v == b.v && a.i > b.i); }
inline bool better(const Entry& a, const Entry& b) { return worse(b, a); }

// Extra room of a query's candidate buffer beyond its top-k: a full buffer is cut back to the
// best k (nth_element, linear), so each cut admits at least this many candidates and a
// candidate costs O(1) comparisons on average instead of a heap's O(log k). Measured on one
// thread, 293 queries x 224 rows (a cluster of the approximate neighbour search, where fresh
// lists fill and most candidates are admitted): as fast as the heap at k = 10 (nth_element's
// constant eats the gain), 17% faster at k = 100. Bounded for large k.
constexpr int64_t kMinSlack = 16;
constexpr int64_t kMaxSlack = 4096;

// One query's best entries: a buffer of candidates, cut back to the best `cap` when full.
class TopK {
 public:
  void reset(int64_t cap) {
    cap_ = cap;
    room_ = cap + std::clamp<int64_t>(cap, kMinSlack, kMaxSlack);
    thr_ = -std::numeric_limits<float>::infinity();
    buf_.clear();
    buf_.reserve(static_cast<size_t>(room_));
  }
  // Entries arrive in increasing index within a thread, so a tie with the cap-th best never
  // displaces it: a strict > test is exact.
  float threshold() const { return thr_; }
  void push(Entry e) {
    buf_.push_back(e);
    if (static_cast<int64_t>(buf_.size()) == room_) cut();
  }
  // The best min(cap, seen) entries, in no particular order.
  const std::vector<Entry>& entries() {
    if (static_cast<int64_t>(buf_.size()) > cap_) cut();
    return buf_;
  }

 private:
  void cut() {
    std::nth_element(buf_.begin(), buf_.begin() + (cap_ - 1), buf_.end(), better);
    buf_.resize(static_cast<size_t>(cap_));
    thr_ = buf_.back().v;  // the cap-th best: a candidate must now beat it
  }
  int64_t cap_ = 0, room_ = 0;
  float thr_ = -std::numeric_limits<float>::infinity();
  std::vector<Entry> buf_;
};

// Scores are first checked against a heap's threshold a chunk at a time, branch-free (a
// vectorisable max), instead of a test and branch per score.
constexpr int64_t kScanChunk = 32;

// Whether any of s[0..len) is > thr; `x > mx ? x : mx` skips NaN (never selected anyway).
inline bool any_above(const float* s, int64_t len, float thr) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < len; ++j) mx = s[j] > mx ? s[j] : mx;
  return mx > thr;
}

inline bool excluded(const int64_t* ex, int64_t e, int64_t id) {
  for (int64_t x = 0; x < e; ++x)
    if (ex[x] == id) return true;
  return false;
}

}  // namespace

void score_topk_cpu(const float* Q, int64_t m, const void* G, DType dtype, int64_t n, int64_t k,
                    int64_t topk, const int64_t* exclude, int64_t e, int64_t index_offset,
                    float* values, int64_t* indices, bool accumulate, int num_threads) {
  cpu::require_dtype(dtype);
  cpu::require_nonneg(m, "m");
  cpu::require_nonneg(n, "n");
  cpu::require_pos(k, "k");
  cpu::require_pos(topk, "topk");
  cpu::require_nonneg(e, "e");
  cpu::require_nonneg(index_offset, "index_offset");
  cpu::require_ptr(Q, m * k, "Q");
  cpu::require_ptr(G, n * k, "G");
  cpu::require_ptr(exclude, m * e, "exclude");
  cpu::require_ptr(values, m * topk, "values");
  cpu::require_ptr(indices, m * topk, "indices");

  const cpu::IsaKernels& K = cpu::isa();
  const int64_t tile = std::clamp<int64_t>(kTileBytes / (4 * k) / kMinTileRows * kMinTileRows,
                                           kMinTileRows, kMaxTileRows);
  const int64_t n_tiles = cpu::ceil_div(n, tile);
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(cpu::clamp_threads(num_threads), n_tiles)));
  std::vector<std::vector<TopK>> heaps(threads, std::vector<TopK>(m));
  // A query has at most n candidates: heaps hold no more (a topk far above n reserves nothing).
  const int64_t cap = std::min(topk, std::max<int64_t>(n, 1));
  cpu::FirstError error;  // (topk sizes the heaps: a failed allocation is raised, see the header)
  // Offers scores[i * rows + j] (query q0 + i, store row r0 + j) to the thread's heaps.
  auto scan = [&](std::vector<TopK>& mine, const float* scores, int64_t rows, int64_t q0,
                  int64_t mq, int64_t r0) {
    for (int64_t i = 0; i < mq; ++i) {
      TopK& h = mine[q0 + i];
      const float* s = scores + i * rows;
      float thr = h.threshold();
      for (int64_t c0 = 0; c0 < rows; c0 += kScanChunk) {
        const int64_t c1 = std::min(rows, c0 + kScanChunk);
        if (!any_above(s + c0, c1 - c0, thr)) continue;  // the usual case once a heap is full
        for (int64_t j = c0; j < c1; ++j) {
          if (!(s[j] > thr)) continue;  // also drops NaN and -inf
          const int64_t id = index_offset + r0 + j;
          if (e > 0 && excluded(exclude + (q0 + i) * e, e, id)) continue;
          h.push(Entry{s[j], id});
          thr = h.threshold();
        }
      }
    }
  };

  // The micro-staged path (see kL1QueryBytes) or the tile-staged one.
  const bool micro = m > kFusedMaxQueries && m <= kMicroMaxQueries && m * k * 4 <= kL1QueryBytes;
  const bool stage = !micro && dtype != DType::kFloat32 && m > kFusedMaxQueries;
  auto stored = [&](int64_t row) { return cpu::offset_ptr(G, dtype, row * k); };

#pragma omp parallel num_threads(threads)
  error.capture([&] {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<TopK>& mine = heaps[tid];
    for (TopK& h : mine) h.reset(cap);
    cpu::Scratch buf(stage ? tile * k : 1);
    cpu::Scratch rowbuf[2] = {cpu::Scratch(micro ? kStageRows * k : 1),
                              cpu::Scratch(micro ? kStageRows * k : 1)};
    cpu::Scratch scores(std::min(m, kQueryBlock) * tile);
    // Contiguous ranges of tiles: each thread streams its part of the store once.
    const int64_t t_begin = n_tiles * tid / nt, t_end = n_tiles * (tid + 1) / nt;
    const int64_t row_end = std::min(n, t_end * tile);
    if (micro && t_begin < t_end)
      K.to_f32(stored(t_begin * tile), dtype, std::min(kStageRows, row_end - t_begin * tile) * k,
               rowbuf[0].data());
    int64_t block = 0;  // micro-staged blocks scored so far (picks the buffer)
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t r0 = t * tile, rows = std::min(tile, n - r0);
      if (micro) {
        for (int64_t j0 = 0; j0 < rows; j0 += kStageRows, ++block) {
          const int64_t nr = std::min(kStageRows, rows - j0), next = r0 + j0 + nr;
          const int64_t next_rows = std::min(kStageRows, row_end - next);
          K.dot_tile(Q, k, m, rowbuf[block % 2].data(), DType::kFloat32, k, nr, k,
                     scores.data() + j0, rows, stored(next), dtype, next_rows * k,
                     rowbuf[(block + 1) % 2].data());
        }
        scan(mine, scores.data(), rows, 0, m, r0);
        continue;
      }
      const void* g = stored(r0);
      DType gdt = dtype;
      if (stage) {
        K.to_f32(g, dtype, rows * k, buf.data());
        g = buf.data();
        gdt = DType::kFloat32;
      }
      for (int64_t q0 = 0; q0 < m; q0 += kQueryBlock) {
        const int64_t mq = std::min(kQueryBlock, m - q0);
        K.dot_tile(Q + q0 * k, k, mq, g, gdt, k, rows, k, scores.data(), rows, nullptr, dtype, 0,
                   nullptr);
        scan(mine, scores.data(), rows, q0, mq, r0);
      }
    }
  });
  error.rethrow();

  // Merge the per-thread heaps (and an earlier result when accumulating) by (value desc, index
  // asc): the outcome does not depend on how rows were split among threads.
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < m; ++i) error.capture([&] {
    std::vector<Entry> all;
    all.reserve(static_cast<size_t>(cap) * threads + static_cast<size_t>(accumulate ? topk : 0));
    for (int t = 0; t < threads; ++t) {
      const auto& ent = heaps[t][i].entries();  // (query i: merged by this thread alone)
      all.insert(all.end(), ent.begin(), ent.end());
    }
    if (accumulate)
      for (int64_t x = 0; x < topk; ++x) {
        const Entry old{values[i * topk + x], indices[i * topk + x]};
        if (old.i >= 0 && old.v > neg_inf) all.push_back(old);  // NaN fails the test too
      }
    const int64_t keep = std::min<int64_t>(topk, static_cast<int64_t>(all.size()));
    std::partial_sort(all.begin(), all.begin() + keep, all.end(),
                      [](const Entry& a, const Entry& b) { return worse(b, a); });
    for (int64_t x = 0; x < topk; ++x) {
      values[i * topk + x] = x < keep ? all[x].v : neg_inf;
      indices[i * topk + x] = x < keep ? all[x].i : -1;
    }
  });
  error.rethrow();
}

}  // namespace issl_fast
