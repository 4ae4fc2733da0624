"""Duplicate detection by normalised (cosine) influence, ``score(i, j) / sqrt(s_i s_j)``.

All pairs are searched with the streaming top-k kernel: each chunk of training examples,
preconditioned and normalised, is scored against the store normalised by sqrt(s_j) in float32,
so memory never holds an n x n matrix: only [query chunk x topk] results. The normalised store is
built once and kept on the scan device when it fits (:class:`_NormalisedStore`), else it is
re-read and re-normalised chunk by chunk on every pass.
Transformed copies of the examples (e.g. shifted by a pixel, :mod:`.transforms`) can be searched
the same way (:func:`transformed_neighbours`) and merged in (:func:`merge_neighbours`), so copies
that differ by such a transform are found too.

``device``: where the scans run (``None``: the CPU). On a GPU the normalised store is held in
its memory when it fits (else streamed through it chunk by chunk by the top-k kernel); the
preconditioning stays on the CPU in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .. import ops, residency
from .._checks import count
from ..solver import Solver
from ..store import GradientStore
from .clustered import ClusteredIndex, ClusteredSearch

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


def _inverse_sqrt_self_influence(store: GradientStore, solver: Solver,
                                 s: np.ndarray | None) -> torch.Tensor:
    """1 / sqrt(s_i) per store row; ``s``: the self-influences if already computed."""
    s = solver.store_quad(store) if s is None else np.asarray(s, dtype=np.float64)
    if s.shape != (store.rows,):
        raise ValueError(f"self_influence must be [{store.rows}] (one per store row), got "
                         f"{s.shape}")
    return torch.from_numpy(1.0 / np.sqrt(np.maximum(s, _EPS)))


class _NormalisedStore:
    """The store's rows scaled by ``inv = 1 / sqrt(s_j)``, float32, as the top-k kernel's store:
    one tensor on the scan device, built once, when it fits (:mod:`..residency`), else re-read
    and re-normalised chunk by chunk on each pass."""

    def __init__(self, store: GradientStore, inv: torch.Tensor,
                 device: torch.device | str | None, num_threads: int | None) -> None:
        self.store, self.inv, self.num_threads = store, inv, num_threads
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.resident: torch.Tensor | None = None
        if residency.fits(self.device, store.rows * store.dim * 4):
            self.resident = torch.empty(store.rows, store.dim, dtype=torch.float32,
                                        device=self.device)
            for rows, first in self._chunks():
                self.resident[first:first + rows.shape[0]] = rows

    def _chunks(self) -> Iterator[tuple[torch.Tensor, int]]:
        for rows, first in self.store.iter_rows(dtype=torch.float64):
            yield (rows * self.inv[first:first + rows.shape[0], None]).float().contiguous(), first

    def query_rows(self, topk: int) -> int:
        """Queries per :meth:`topk` call: each call is one pass over the store."""
        return _QUERY_CHUNK

    def topk(self, q: torch.Tensor, self_rows: torch.Tensor, topk: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k rows for normalised, preconditioned float32 queries ``q [m, dim]``, each
        excluding its own store row (``self_rows [m]``, -1 for none), in one pass; CPU results."""
        q = q.to(self.device)
        if self.resident is not None:
            v, i = ops.score_topk(q, self.resident, topk, exclude=self_rows,
                                  num_threads=self.num_threads)
            return v.cpu(), i.cpu()
        m = q.shape[0]
        values = torch.full((m, topk), -torch.inf, dtype=torch.float32)
        idx = torch.full((m, topk), -1, dtype=torch.int64)
        for c, (g, first) in enumerate(self._chunks()):
            ops.score_topk(q, g, topk, exclude=self_rows, index_offset=first, out=(values, idx),
                           accumulate=c > 0, num_threads=self.num_threads)
        return values, idx


# How neighbours are searched: None (exact, all pairs), the settings of the approximate
# clustered search, or such an index already built (to search it again, e.g. per transform).
Search = ClusteredSearch | ClusteredIndex | None


def _scan(store: GradientStore, solver: Solver, inv: torch.Tensor,
          device: torch.device | str | None, num_threads: int | None,
          search: Search) -> _NormalisedStore | ClusteredIndex:
    """The exact scan, or the approximate clustered index (built here from its settings)."""
    if search is None:
        return _NormalisedStore(store, inv, device, num_threads)
    if isinstance(search, ClusteredIndex):
        if search.store is not store or search.solver is not solver:
            raise ValueError("a ClusteredIndex searches the store and solver it was built for")
        return search
    return ClusteredIndex(store, solver, inv, search, device, num_threads)


def clustered_index(store: GradientStore, solver: Solver, search: ClusteredSearch,
                    num_threads: int | None = None, self_influence: np.ndarray | None = None,
                    device: torch.device | str | None = None) -> ClusteredIndex:
    """The approximate search's index of ``store`` (:mod:`.clustered`), built once to be
    searched several times (pass it as ``search=``); ``self_influence`` as in
    :func:`normalised_neighbours`."""
    inv = _inverse_sqrt_self_influence(store, solver, self_influence)
    return ClusteredIndex(store, solver, inv, search, device, num_threads)


def normalised_neighbours(
    store: GradientStore,
    solver: Solver,
    topk: int,
    num_threads: int | None = None,
    self_influence: np.ndarray | None = None,
    device: torch.device | str | None = None,
    rows: tuple[int, int] | None = None,
    search: Search = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For every store row, its ``topk`` most similar other rows by normalised influence:
    ``(similarity [n, topk] float32, rows [n, topk] int64)``, best first (-inf / -1 padding).
    ``self_influence``: the store's ``s_i`` when already computed (else one pass computes it);
    ``rows=(start, stop)``: only those rows' neighbours (among all rows) are searched, the
    others are left empty (one rank's share of a distributed search); ``search``: approximate,
    in the clusters each row probes (a :class:`.ClusteredSearch`, or an index built by
    :func:`clustered_index`; None: exact, all pairs)."""
    _check_topk(topk)
    n = store.rows
    inv = _inverse_sqrt_self_influence(store, solver, self_influence)
    scan = _scan(store, solver, inv, device, num_threads, search)
    best_v = np.full((n, topk), -np.inf, dtype=np.float32)
    best_i = np.full((n, topk), -1, dtype=np.int64)
    for q_rows, q0 in store.iter_rows(scan.query_rows(topk), dtype=torch.float64, rows=rows,
                                      fill=True):
        m = q_rows.shape[0]
        q = (solver.precondition(q_rows) * inv[q0:q0 + m, None]).float().contiguous()
        v, i = scan.topk(q, torch.arange(q0, q0 + m), topk)
        best_v[q0:q0 + m], best_i[q0:q0 + m] = v.numpy(), i.numpy()
    return best_v, best_i


def transformed_neighbours(
    store: GradientStore,
    solver: Solver,
    queries: Iterable[tuple[torch.Tensor, torch.Tensor]],
    topk: int,
    num_threads: int | None = None,
    self_influence: np.ndarray | None = None,
    device: torch.device | str | None = None,
    search: Search = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of transformed copies of the store's own examples.

    ``queries`` yields ``(phi [B, dim], rows [B])``: the gradient features of a transform of
    the examples at those store rows (e.g. the image shifted by a pixel). Each copy is scored
    against the store, excluding its own row, with the normalised influence
    ``score(t x_i, x_j) / sqrt(s(t x_i) s_j)``. Returns ``[n, topk]`` like
    :func:`normalised_neighbours` for the rows the queries covered (-inf / -1 elsewhere).
    ``self_influence`` and ``search`` as in :func:`normalised_neighbours`.
    """
    _check_topk(topk)
    n = store.rows
    inv = _inverse_sqrt_self_influence(store, solver, self_influence)
    scan = _scan(store, solver, inv, device, num_threads, search)
    best_v = np.full((n, topk), -np.inf, dtype=np.float32)
    best_i = np.full((n, topk), -1, dtype=np.int64)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        phi = torch.cat([p for p, _ in pending]).to(torch.float64)
        rows = torch.cat([r for _, r in pending])
        pending.clear()
        pre = solver.precondition(phi)
        s = (pre * phi).sum(dim=1).clamp(min=_EPS)
        q = (pre / s.sqrt()[:, None]).float().contiguous()
        v, i = scan.topk(q, rows, topk)
        merge_rows(best_v, best_i, rows.numpy(), v.numpy(), i.numpy())

    queued = 0
    for phi, rows in queries:
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        phi = torch.as_tensor(phi).cpu()  # the solver is on the CPU (features may come from a GPU)
        if phi.ndim != 2 or phi.shape != (rows.shape[0], store.dim):
            raise ValueError(f"query features must be [{rows.shape[0]}, {store.dim}] to match "
                             f"{rows.shape[0]} rows and the store, got {tuple(phi.shape)}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
            raise ValueError(f"query rows must be store rows in [0, {n}), got "
                             f"[{int(rows.min())}, {int(rows.max())}]")
        pending.append((phi, rows))
        queued += rows.shape[0]
        if queued >= scan.query_rows(topk):
            flush()
            queued = 0
    if pending:
        flush()
    return best_v, best_i


def merge_rows(best_v: np.ndarray, best_i: np.ndarray, rows: np.ndarray, v: np.ndarray,
               i: np.ndarray) -> None:
    """Merges result p (v[p], i[p]) into row rows[p] of (best_v, best_i), in place; a row met
    more than once (in this call or an earlier one) keeps the best of all its results."""
    uniq, first = np.unique(rows, return_index=True)
    best_v[uniq], best_i[uniq] = merge_neighbours((best_v[uniq], best_i[uniq]),
                                                  (v[first], i[first]))
    for p in np.setdiff1d(np.arange(len(rows)), first):  # repeats within one batch (rare)
        r = rows[p:p + 1]
        best_v[r], best_i[r] = merge_neighbours((best_v[r], best_i[r]), (v[p:p + 1], i[p:p + 1]))


def merge_neighbours(
    *results: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Merges several ``(similarity [n, t], rows [n, t])`` neighbour lists of the same n
    examples into one of width ``max t``: a neighbour found more than once keeps its highest
    similarity; order by similarity (desc), then row (asc), as the top-k kernel orders ties."""
    if not results:
        raise ValueError("merge_neighbours needs at least one (similarity, rows) pair")
    n = results[0][0].shape[0]
    for v, i in results:
        if v.shape != i.shape or v.ndim != 2 or v.shape[0] != n:
            raise ValueError(f"neighbour lists must be matching [n, t] arrays with n = {n}, got "
                             f"{v.shape} and {i.shape}")
    width = max(v.shape[1] for v, _ in results)
    v = np.concatenate([r[0] for r in results], axis=1).astype(np.float32)
    i = np.concatenate([r[1] for r in results], axis=1).astype(np.int64)
    v = np.where(i < 0, -np.inf, v)
    # Sort each row by (row id, -similarity) so the best copy of a neighbour comes first, drop
    # the later copies, then sort by (-similarity, row id).
    order = np.lexsort((-v, i), axis=1)
    v, i = np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1)
    repeat = np.zeros_like(i, dtype=bool)
    repeat[:, 1:] = (i[:, 1:] == i[:, :-1]) & (i[:, 1:] >= 0)
    v = np.where(repeat | (i < 0), -np.inf, v)
    i = np.where(repeat | (i < 0), np.iinfo(np.int64).max, i)
    order = np.lexsort((i, -v), axis=1)[:, :width]
    v, i = np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1)
    i = np.where(np.isneginf(v), -1, i)
    return v, i


# Normalised influences are computed in float32 (the scan's precision): a threshold is met
# within this much, a few units of float32 rounding at 1.
SIMILARITY_SLACK = 4 * float(np.finfo(np.float32).eps)


def check_threshold(threshold: float) -> None:
    """A normalised influence (a cosine) threshold: in [-1, 1]."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [-1, 1], got {threshold}")


def _check_topk(topk: int) -> None:
    count(topk, "topk")


def find_duplicates(
    store: GradientStore,
    solver: Solver,
    *,
    threshold: float = 0.9,
    topk: int = 5,
    num_threads: int | None = None,
    neighbours: tuple[np.ndarray, np.ndarray] | None = None,
    device: torch.device | str | None = None,
    search: Search = None,
) -> DuplicatePairs:
    """Pairs of training examples whose normalised influence is at least ``threshold``.

    Each example keeps its ``topk`` most similar partners, so a cluster of more than ``topk + 1``
    copies reports only its strongest links. Exact duplicates come out at 1.0 and rank first
    when the views are shared by every example (``SSLAugment``'s default); with per-example
    views (``shared=False``) copies differ by their views and come out lower (0.85-0.96
    measured), possibly under the threshold.
    ``neighbours``: a precomputed :func:`normalised_neighbours` result to reuse;
    ``device``: where the scan runs when it is not given; ``search``: approximate
    (:mod:`.clustered`).
    """
    check_threshold(threshold)
    best_v, best_i = neighbours or normalised_neighbours(store, solver, topk, num_threads,
                                                         device=device, search=search)
    n, topk = best_v.shape
    a = np.repeat(np.arange(n), topk)
    b, sim = best_i.ravel(), best_v.ravel()
    # (an exact duplicate's similarity is 1 to float32 rounding: 0.99999994 meets threshold=1)
    keep = (b >= 0) & (sim >= threshold - SIMILARITY_SLACK)
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
