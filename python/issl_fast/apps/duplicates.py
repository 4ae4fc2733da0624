"""Duplicate detection by normalised (cosine) influence, ``score(i, j) / sqrt(s_i s_j)``.

All pairs are searched with the streaming top-k kernel: each chunk of training examples,
preconditioned and normalised, is scored against the store read chunk by chunk (normalised by
sqrt(s_j) in float32), so memory never holds an n x n matrix: only [query chunk x topk] results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import ops
from ..solver import Solver
from ..store import GradientStore

# Training rows scored per pass over the store: bounds the preconditioned query block in memory.
_QUERY_CHUNK = 4096
# Guard for an all-zero gradient row (its normalised influence is defined as 0).
_EPS = 1e-30


@dataclass
class DuplicatePairs:
    """Pairs ``(rows[p, 0], rows[p, 1])`` (store rows, first < second) with normalised influence
    ``similarity[p] >= threshold``, most similar first; ``ids`` are the example ids."""

    rows: np.ndarray  # [pairs, 2] int64
    ids: np.ndarray  # [pairs, 2] int64
    similarity: np.ndarray  # [pairs] float32

    def __len__(self) -> int:
        return len(self.similarity)


def normalised_neighbours(
    store: GradientStore, solver: Solver, topk: int, num_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """For every store row, its ``topk`` most similar other rows by normalised influence:
    ``(similarity [n, topk] float32, rows [n, topk] int64)``, best first (-inf / -1 padding)."""
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    n = store.rows
    s = np.concatenate([solver.quad(r).numpy() for r, _ in store.iter_rows(dtype=torch.float64)])
    inv = torch.from_numpy(1.0 / np.sqrt(np.maximum(s, _EPS)))
    best_v = np.full((n, topk), -np.inf, dtype=np.float32)
    best_i = np.full((n, topk), -1, dtype=np.int64)
    for q_rows, q0 in store.iter_rows(_QUERY_CHUNK, dtype=torch.float64):
        m = q_rows.shape[0]
        q = (solver.precondition(q_rows) * inv[q0:q0 + m, None]).float().contiguous()
        values = torch.full((m, topk), -torch.inf)
        idx = torch.full((m, topk), -1, dtype=torch.int64)
        self_rows = torch.arange(q0, q0 + m)
        for i, (rows, first) in enumerate(store.iter_rows(dtype=torch.float64)):
            g = (rows * inv[first:first + rows.shape[0], None]).float().contiguous()
            ops.score_topk(q, g, topk, exclude=self_rows, index_offset=first, out=(values, idx),
                           accumulate=i > 0, num_threads=num_threads)
        best_v[q0:q0 + m], best_i[q0:q0 + m] = values.numpy(), idx.numpy()
    return best_v, best_i


def find_duplicates(
    store: GradientStore,
    solver: Solver,
    *,
    threshold: float = 0.9,
    topk: int = 5,
    num_threads: int | None = None,
    neighbours: tuple[np.ndarray, np.ndarray] | None = None,
) -> DuplicatePairs:
    """Pairs of training examples whose normalised influence is at least ``threshold``.

    Each example keeps its ``topk`` most similar partners, so a cluster of more than ``topk + 1``
    copies reports only its strongest links. Exact duplicates come out at ~1.0 and rank first.
    ``neighbours``: a precomputed :func:`normalised_neighbours` result to reuse.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [-1, 1], got {threshold}")
    best_v, best_i = neighbours or normalised_neighbours(store, solver, topk, num_threads)
    n, topk = best_v.shape
    a = np.repeat(np.arange(n), topk)
    b, sim = best_i.ravel(), best_v.ravel()
    keep = (b >= 0) & (sim >= threshold)
    a, b, sim = a[keep], b[keep], sim[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    # Each pair is found from both ends: keep one, with the higher of its two similarities.
    order = np.lexsort((-sim, hi, lo))
    lo, hi, sim = lo[order], hi[order], sim[order]
    first = np.ones(len(lo), dtype=bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    lo, hi, sim = lo[first], hi[first], sim[first]
    rank = np.lexsort((hi, lo, -sim))
    rows = np.stack([lo[rank], hi[rank]], axis=1)
    ids = store.ids()[rows] if len(rows) else np.zeros((0, 2), dtype=np.int64)
    return DuplicatePairs(rows, ids, sim[rank])
