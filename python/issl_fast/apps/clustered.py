"""Approximate neighbour search by normalised influence: an inverted file over clusters (the IVF
index of FAISS; SemDeDup clusters the same way before de-duplicating), for stores too large for
the exact all-pairs scan (n^2 dim operations: hours on a CPU at n = 1M).

The normalised influence ``phi_i^T F^-1 phi_j / sqrt(s_i s_j)`` is the cosine of ``phi_i`` and
``phi_j`` in the geometry of ``F^-1`` (``<a, b>_F = a^T F^-1 b``; ``s_i = <phi_i, phi_i>_F``), so
the normalised rows ``u_j = phi_j / sqrt(s_j)`` lie on its unit sphere and are clustered there:

1. spherical k-means in that geometry on a sample of the rows (:attr:`ClusteredSearch.sample`
   per cluster): a row goes to the centroid ``c`` of highest ``<u, c>_F`` (the top-k kernel,
   queries the rows, ``store`` the preconditioned centroids ``F^-1 c``); a centroid is the mean
   of its rows, scaled to ``<c, c>_F = 1``;
2. every row is assigned, and the normalised rows are held sorted by cluster;
3. a query probes the :attr:`ClusteredSearch.probes` clusters whose centroids it scores highest
   and is scored exactly against their rows (the top-k kernel, one call per cluster and block of
   queries), merging as it goes.

The similarities returned are exact; a neighbour is missed only when it sits in a cluster the
query did not probe. Near-duplicates, the search's purpose, are close to their query's centroid
and are found in the first probes; ``tests/test_clustered.py`` measures recall against the exact
search. Ties are ordered by row, as the exact search orders them; among rows tied at the
``topk``-th place another one than the exact search's may be kept.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .. import ops, residency
from .._checks import count
from ..distributed import merge_topk
from ..solver import Solver
from ..store import GradientStore

# Store rows read (and normalised) per step while building the index.
_BUILD_CHUNK = 16384
# Queries searched per call: many, so that each cluster's kernel call gets many of them (one
# call per probed cluster and block; at 4096 queries a small cluster's call is mostly overhead),
# within a memory budget: a query row costs its float64 features and their preconditioned copy,
# and its [probes, topk] candidates while they are merged (values, rows, sort keys, gathers:
# about 48 bytes each).
QUERY_CHUNK = 32768
MIN_QUERY_CHUNK = 256
QUERY_BLOCK_BYTES = 256 << 20


@dataclass(frozen=True)
class ClusteredSearch:
    """Settings of the approximate search (see the module docstring).

    ``clusters``: how many (None: ``round(2 sqrt(n))``, at least 1 and at most n);
    ``probes``: clusters searched per query (more: higher recall, proportionally slower);
    ``sample``: rows per cluster that train k-means (at most n); ``iterations`` of k-means;
    ``seed``: of the sample and the initial centroids. Cost: k-means ``iterations x sample x
    clusters^2 x dim`` multiply-adds, then ``n x probes x (n / clusters) x dim`` for the
    search, against ``n^2 x dim`` for the exact one."""

    clusters: int | None = None
    probes: int = 8
    sample: int = 64
    iterations: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("probes", "sample", "iterations"):
            object.__setattr__(self, name, count(getattr(self, name), f"ClusteredSearch.{name}"))
        if self.clusters is not None:
            object.__setattr__(self, "clusters",
                               count(self.clusters, "ClusteredSearch.clusters (or None)"))

    def clusters_for(self, n: int) -> int:
        """The number of clusters used for ``n`` rows."""
        want = self.clusters if self.clusters is not None else round(2 * math.sqrt(n))
        return max(1, min(n, want))


class ClusteredIndex:
    """The normalised store rows, sorted by cluster, with their centroids: a drop-in for the
    exact scan's ``topk(q, self_rows, topk)`` (see :mod:`.duplicates`).

    ``inv [n]``: ``1 / sqrt(s_j)`` per store row; ``device``: where the rows are held and the
    kernel runs (None: the CPU); the preconditioning stays on the CPU in float64."""

    def __init__(self, store: GradientStore, solver: Solver, inv: torch.Tensor,
                 search: ClusteredSearch, device: torch.device | str | None = None,
                 num_threads: int | None = None) -> None:
        self.store, self.solver, self.inv = store, solver, inv
        self.search, self.num_threads = search, num_threads
        self.device = torch.device("cpu") if device is None else torch.device(device)
        n = store.rows
        self.n_clusters = search.clusters_for(n) if n else 0
        self.centroids = self._kmeans() if n else torch.zeros(0, store.dim, dtype=torch.float32)
        # centroids in the kernel's store layout, and preconditioned (assignment by <u, c>_F)
        self._probe_rows = self.centroids.float().contiguous().to(self.device)
        self._assign_rows = self.solver.precondition(self.centroids).float().contiguous().to(
            self.device)
        assign = np.zeros(n, dtype=np.int64)
        for rows, first in self._normalised():
            assign[first:first + rows.shape[0]] = self._nearest(rows)
        used = np.bincount(assign, minlength=self.n_clusters) > 0
        if not used.all():  # clusters no row joined would waste probes: dropped
            assign = (np.cumsum(used) - 1)[assign]
            keep = torch.from_numpy(used)
            self.centroids = self.centroids[keep]
            self._probe_rows = self._probe_rows[keep.to(self.device)]
            self._assign_rows = self._assign_rows[keep.to(self.device)]
            self.n_clusters = int(used.sum())
        self.order = np.argsort(assign, kind="stable")  # sorted position -> store row
        self.position = np.empty(n, dtype=np.int64)  # store row -> sorted position
        self.position[self.order] = np.arange(n)
        counts = np.bincount(assign, minlength=self.n_clusters)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # The rows live on the scan device when they fit its budget (:mod:`..residency`); a
        # GPU index too large for it keeps them in host memory and the top-k kernel streams
        # each probed cluster through the GPU (slower, bounded by PCIe, but it runs). Pageable
        # memory: torch's page-locked allocator would round the request up to a power of two
        # and keep it cached; the kernel copies each cluster through its own pinned buffers.
        fits = self.device.type == "cpu" or residency.fits(self.device, n * store.dim * 4)
        held = self.device if fits else torch.device("cpu")
        self.rows = torch.empty(n, store.dim, dtype=torch.float32, device=held)
        for rows, first in self._normalised():
            where = torch.from_numpy(self.position[first:first + rows.shape[0]])
            self.rows[where.to(held)] = rows.to(held)

    def query_rows(self, topk: int) -> int:
        """Queries per :meth:`topk` call (see :data:`QUERY_BLOCK_BYTES`)."""
        per_row = 16 * self.store.dim + 48 * min(self.search.probes, max(self.n_clusters, 1)) * topk
        return int(np.clip(QUERY_BLOCK_BYTES // per_row, MIN_QUERY_CHUNK, QUERY_CHUNK))

    def _normalised(self, chunk: int = _BUILD_CHUNK):
        """``(u rows float32 [<=chunk, dim], first row)`` over the store."""
        for rows, first in self.store.iter_rows(chunk, dtype=torch.float64):
            u = rows * self.inv[first:first + rows.shape[0], None]
            yield u.float().contiguous(), first

    def _nearest(self, u: torch.Tensor, assign_rows: torch.Tensor | None = None) -> np.ndarray:
        """The cluster of highest ``<u, c>_F`` for each row of ``u [m, dim]``."""
        target = self._assign_rows if assign_rows is None else assign_rows
        return _best_centroids(u.to(target.device), target, 1)[:, 0].cpu().numpy()

    def _unit(self, c: torch.Tensor) -> torch.Tensor:
        """Centroids ``c [C, dim]`` (float64) scaled to ``<c, c>_F = 1`` (zero ones stay)."""
        norm = self.solver.quad(c).clamp(min=0).sqrt()
        return c / torch.where(norm > 0, norm, 1.0)[:, None]

    def _kmeans(self) -> torch.Tensor:
        """Spherical k-means (geometry of ``F^-1``) on a sample of the normalised rows."""
        n, C = self.store.rows, self.n_clusters
        rng = np.random.default_rng(self.search.seed)
        size = min(n, C * self.search.sample)
        picked = np.sort(rng.choice(n, size, replace=False))
        sample = torch.empty(size, self.store.dim, dtype=torch.float64)
        for rows, first in self.store.iter_rows(_BUILD_CHUNK, dtype=torch.float64):
            here = picked[(picked >= first) & (picked < first + rows.shape[0])]
            where = np.searchsorted(picked, here)
            sample[torch.from_numpy(where)] = (rows[torch.from_numpy(here - first)]
                                               * self.inv[torch.from_numpy(here), None])
        centroids = sample[torch.from_numpy(rng.choice(size, C, replace=False))].clone()
        sample32 = sample.float().contiguous().to(self.device)
        for _ in range(self.search.iterations):
            assign_rows = self.solver.precondition(self._unit(centroids)).float().contiguous()
            labels = torch.from_numpy(self._nearest(sample32, assign_rows.to(self.device)))
            sums = torch.zeros(C, self.store.dim, dtype=torch.float64)
            sums.index_add_(0, labels, sample)
            counts = torch.bincount(labels, minlength=C)
            empty = torch.nonzero(counts == 0).flatten()
            if len(empty):  # an empty cluster restarts at a random sample row
                sums[empty] = sample[torch.from_numpy(rng.choice(size, len(empty)))]
            centroids = sums
        return self._unit(centroids)

    def topk(self, q: torch.Tensor, self_rows: torch.Tensor, topk: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k store rows for normalised, preconditioned float32 queries ``q [m, dim]``, each
        excluding its own store row (``self_rows [m]``, -1 for none), searched in the
        ``probes`` best clusters; ``(similarity, rows) [m, topk]`` on the CPU."""
        m = q.shape[0]
        probes = min(self.search.probes, self.n_clusters)
        # (on the scan device: on a GPU the clusters' results stay there until the end)
        values = torch.full((m, max(probes, 1), topk), -torch.inf, dtype=torch.float32,
                            device=self.device)
        found = torch.full((m, max(probes, 1), topk), -1, dtype=torch.int64, device=self.device)
        if m and self.store.rows:
            self._search(q.to(self.device), self_rows, topk, probes, values, found)
        values, found = values.reshape(m, -1).cpu(), found.reshape(m, -1).cpu()
        rows = torch.where(found >= 0, torch.from_numpy(self.order)[found.clamp(min=0)], -1)
        # the probes' lists cover disjoint rows (a row sits in one cluster): merged as the
        # ranks' lists are, best first, ties by row
        return merge_topk([values], [rows], topk)

    def _search(self, q: torch.Tensor, self_rows: torch.Tensor, topk: int, probes: int,
                values: torch.Tensor, found: torch.Tensor) -> None:
        """Fills ``values, found [m, probes, topk]``: slot j of query i holds its top-k in the
        j-th cluster it probes (sorted positions). Clusters are searched in parallel threads
        (a cluster is smaller than one of the kernel's tiles, so one call uses one thread);
        each writes only its own slots."""
        probed = _best_centroids(q, self._probe_rows, probes).cpu().numpy()
        own = self_rows.numpy()
        own_pos = np.where(own >= 0, self.position[np.maximum(own, 0)], -1)
        flat = probed.ravel()
        by_cluster = np.argsort(flat, kind="stable")
        starts = np.searchsorted(flat[by_cluster], np.arange(self.n_clusters + 1))

        def one(c: int) -> None:
            lo, hi = int(self.offsets[c]), int(self.offsets[c + 1])
            picks = by_cluster[starts[c]:starts[c + 1]]
            if len(picks) == 0 or lo == hi:
                return
            qi = torch.from_numpy(picks // probes).to(self.device)
            slot = torch.from_numpy(picks % probes).to(self.device)
            exclude = torch.from_numpy(own_pos[picks // probes])[:, None].to(self.device)
            v, i = ops.score_topk(q[qi], self.rows[lo:hi], topk, exclude=exclude,
                                  index_offset=lo, num_threads=1)
            values[qi, slot], found[qi, slot] = v, i

        threads = 1 if self.device.type != "cpu" else (self.num_threads
                                                       or torch.get_num_threads())
        if threads == 1:
            for c in range(self.n_clusters):
                one(c)
            return
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(self.n_clusters)))


def _best_centroids(u: torch.Tensor, centroids: torch.Tensor, k: int,
                    chunk: int = 8192) -> torch.Tensor:
    """Indices ``[m, k]`` of the ``k`` highest ``u @ centroids.T`` per row. A matrix product and
    ``torch.topk`` in row chunks: the centroids are far fewer than one of the top-k kernel's
    store tiles, which it would scan on one thread."""
    out = torch.empty(u.shape[0], k, dtype=torch.int64, device=u.device)
    for a in range(0, u.shape[0], chunk):
        out[a:a + chunk] = torch.topk(u[a:a + chunk] @ centroids.T, k, dim=1).indices
    return out
