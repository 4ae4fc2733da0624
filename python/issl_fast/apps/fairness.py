"""Group (fairness) analysis: how much each group of training examples is self-influential, and
how much each training group supports each test group.

The cross-group matrix ``M[g, h] = mean_{t in test group g} mean_{i in train group h} score(i, t)``
factorises as ``(mean_t F^-1 phi_t) . (mean_i phi_i)``, so it needs only per-group mean vectors
(never an m x n matrix); bootstrap confidence intervals resample examples within groups.

Memory does not grow with the data: the training store and the queries are read in blocks, and
the bootstrap counts (:class:`BootstrapCounts`) are drawn :data:`BOOT_CHUNK` rows at a time, so
the largest arrays are the per-group resampled means, ``groups x (n_boot + 1) x dim`` floats,
and the resampled cross-group matrix, ``test groups x groups x (n_boot + 1)``; either is refused
above :data:`MAX_MEANS_BYTES`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .._checks import count
from ..store import GradientStore

# Percentile interval of the bootstrap (95%).
_CI = (2.5, 97.5)
# Rows whose bootstrap counts are drawn at once: bounds those counts to n_boot x BOOT_CHUNK
# floats (32 MiB at n_boot = 1000) whatever the group sizes. Draws are made over these fixed
# windows of rows, so the intervals do not depend on how the rows arrive (shards, batches).
BOOT_CHUNK = 4096
# Resampled means or cross-group matrices above this size are refused with an n_boot that fits.
MAX_MEANS_BYTES = 4 << 30


@dataclass
class GroupInfluence:
    groups: list  # group labels, in order
    self_mean: np.ndarray  # [G] mean self-influence per training group
    self_median: np.ndarray  # [G]
    self_ci: np.ndarray  # [G, 2] bootstrap CI of the mean
    counts: np.ndarray  # [G] training examples per group
    cross: np.ndarray | None  # [G_test, G] mean score(train group h -> test group g)
    cross_ci: np.ndarray | None  # [G_test, G, 2]
    test_groups: list | None


class BootstrapCounts:
    """Weights of rows ``0..n-1`` (group ``gid[r]`` of ``sizes[gid[r]]`` members) for the plain
    group means and ``n_boot`` bootstrap resamples: ``[n_boot + 1, rows]``, row 0 ``1/size``,
    row b the member's count in resample b of its group over ``size``.

    Resample b of a group draws ``size`` members with replacement (multinomial counts). Drawing
    them for every member at once costs ``n_boot x n`` numbers (8 GB for 1M examples), so they
    are drawn a window of :data:`BOOT_CHUNK` rows at a time, in row order: a window's ``k``
    members of a group take ``Binomial(draws left, k / members left)`` of the group's draws, and
    split them ``Multinomial(taken, uniform over k)`` (a multinomial's counts over a part of its
    cells, given their total, are multinomial, so the counts are exactly a multinomial's). The
    same counts serve the self-influence and the cross-group intervals.
    Rows must be asked for in increasing order (one window is kept)."""

    def __init__(self, gid: np.ndarray, sizes: np.ndarray, n_boot: int,
                 rng: np.random.Generator, chunk: int = BOOT_CHUNK) -> None:
        self.gid, self.sizes, self.n_boot, self.rng, self.chunk = gid, sizes, n_boot, rng, chunk
        self._draws_left = np.repeat(sizes[:, None].astype(np.int64), n_boot, axis=1)
        self._members_left = sizes.astype(np.int64).copy()
        self._window = -1
        # the window's groups: (group, its rows within the window, weights [n_boot + 1, k])
        self._parts: list[tuple[int, np.ndarray, np.ndarray]] = []

    def _draw(self, window: int) -> None:
        a, e = window * self.chunk, min(len(self.gid), (window + 1) * self.chunk)
        g_in = self.gid[a:e]
        self._parts = []
        for g in np.unique(g_in):
            sel = np.flatnonzero(g_in == g)
            k, left = len(sel), self._members_left[g]
            taken = (self._draws_left[g] if k == left
                     else self.rng.binomial(self._draws_left[g], k / left))
            # Multinomial(taken[b], uniform over k) for every b: that many uniform picks,
            # counted (numpy's multinomial draws a binomial per cell, ~20x slower here).
            picks = self.rng.integers(0, k, int(taken.sum()), dtype=np.int32)
            cell = np.repeat(np.arange(self.n_boot, dtype=np.int64) * k, taken) + picks
            w = np.empty((self.n_boot + 1, k))
            w[0] = 1.0
            w[1:] = np.bincount(cell, minlength=self.n_boot * k).reshape(self.n_boot, k)
            w /= self.sizes[g]
            self._parts.append((int(g), sel, w))
            self._draws_left[g] -= taken
            self._members_left[g] -= k
        self._window = window

    def group_weights(self, first: int, rows: int
                      ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(group, positions within the range, weights [n_boot + 1, k])`` covering rows
        ``first .. first + rows - 1``, a window and group at a time."""
        r = first
        while r < first + rows:
            window = r // self.chunk
            if window < self._window:
                raise ValueError(f"bootstrap weights are drawn in row order: row {r} comes "
                                 f"after window {self._window}")
            while self._window < window:  # (windows are drawn in order, none skipped)
                self._draw(self._window + 1)
            base = window * self.chunk
            lo, hi = r - base, min(first + rows, base + self.chunk) - base
            for g, sel, w in self._parts:
                inside = (sel >= lo) & (sel < hi)
                if inside.all():
                    yield g, sel + (base - first), w
                elif inside.any():
                    yield g, sel[inside] + (base - first), w[:, inside]
            r = base + hi

    def weights(self, first: int, rows: int) -> np.ndarray:
        """``[n_boot + 1, rows]`` weights of rows ``first .. first + rows - 1``."""
        out = np.zeros((self.n_boot + 1, rows))
        for _, pos, w in self.group_weights(first, rows):
            out[:, pos] = w
        return out


class _GroupMeans:
    """Plain and resampled mean vectors ``[G, n_boot + 1, dim]`` of grouped rows that arrive in
    blocks, in row order."""

    def __init__(self, labels: np.ndarray, groups: list, n_boot: int, dim: int,
                 rng: np.random.Generator) -> None:
        index = {g: i for i, g in enumerate(groups)}
        self.gid = np.array([index[v] for v in labels.tolist()], dtype=np.int64)
        sizes = np.bincount(self.gid, minlength=len(groups))
        self.counts = BootstrapCounts(self.gid, sizes, n_boot, rng)
        self.means = torch.zeros(len(groups), n_boot + 1, dim, dtype=torch.float64)
        self.rows = 0

    def add(self, block: torch.Tensor) -> None:
        b = block.shape[0]
        if self.rows + b > len(self.gid):
            raise ValueError(f"more rows ({self.rows + b}+) than group labels ({len(self.gid)})")
        block = block.double()
        for g, pos, w in self.counts.group_weights(self.rows, b):
            self.means[g] += torch.from_numpy(w) @ block[torch.from_numpy(pos)]
        self.rows += b


def _check_size(what: str, count: int, n_boot: int, width: int) -> None:
    """Refuses ``count x (n_boot + 1) x width`` float64 arrays (twice that for the cross-group
    matrix, which the percentiles copy) above :data:`MAX_MEANS_BYTES`, naming an n_boot that
    fits."""
    need = count * (n_boot + 1) * width * 8
    if need <= MAX_MEANS_BYTES:
        return
    fits = MAX_MEANS_BYTES // (count * width * 8) - 1
    advice = (f"use n_boot <= {fits} or fewer groups" if fits >= 1
              else "use fewer groups")
    raise ValueError(f"{what} x (n_boot={n_boot} + 1) resampled values need "
                     f"{need / 2**30:.1f} GiB: {advice}")


def _groups_of(labels: np.ndarray, what: str) -> list:
    """The distinct labels, sorted (as strings, so that mixed types sort); NaN is refused."""
    values = labels.tolist()
    if any(isinstance(v, float) and v != v for v in values):
        raise ValueError(f"{what} contain NaN: give every example a group")
    return sorted(set(values), key=str)


def _group_index(labels: np.ndarray, groups: list) -> list[np.ndarray]:
    return [np.flatnonzero(labels == g) for g in groups]


def group_influence(
    store: GradientStore,
    self_influence: np.ndarray,
    train_groups: np.ndarray,
    *,
    preconditioned_queries: torch.Tensor | Iterable[torch.Tensor] | None = None,
    test_groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> GroupInfluence:
    """Per-group self-influence statistics and, given preconditioned test queries with their
    groups, the cross-group influence matrix; bootstrap CIs from ``n_boot`` resamples.

    ``train_groups [n]``: the group of each store row; ``preconditioned_queries``: ``F^-1 phi``
    of the test queries, ``[m, dim]`` or blocks of rows in order (e.g. many queries read from a
    loader), with ``test_groups [m]`` the group of each."""
    labels = np.asarray(train_groups)
    s = np.asarray(self_influence, dtype=np.float64)
    if labels.shape != (store.rows,) or s.shape != (store.rows,):
        raise ValueError(
            f"train_groups and self_influence must be [{store.rows}], got "
            f"{labels.shape} and {s.shape}"
        )
    n_boot = count(n_boot, "n_boot")
    groups = _groups_of(labels, "train_groups")
    idx = _group_index(labels, groups)
    # the training and test resamples come from streams of their own: independent, and the
    # self-influence intervals do not depend on whether queries are given
    rng, test_rng = (np.random.default_rng([seed, stream]) for stream in (0, 1))
    self_median = np.array([np.median(s[i]) for i in idx])
    s_col = torch.from_numpy(s)[:, None]
    cross = cross_ci = tgroups = None
    if preconditioned_queries is None:  # resampled means of the self-influences only
        train = _GroupMeans(labels, groups, n_boot, 1, rng)
        for a in range(0, store.rows, BOOT_CHUNK):
            train.add(s_col[a:a + BOOT_CHUNK])
    else:
        if test_groups is None:
            raise ValueError("test_groups is needed with preconditioned_queries")
        tl = np.asarray(test_groups)
        if tl.ndim != 1:
            raise ValueError(f"test_groups must be [m], got shape {tl.shape}")
        tgroups = _groups_of(tl, "test_groups")
        _check_size(f"{len(groups)} training groups' means of {store.dim} floats", len(groups),
                    n_boot, store.dim + 1)
        _check_size(f"{len(tgroups)} test groups' means of {store.dim} floats", len(tgroups),
                    n_boot, store.dim)
        _check_size(f"the {len(tgroups)} x {len(groups)} cross-group matrix", len(tgroups),
                    n_boot, 2 * len(groups))
        blocks = ([preconditioned_queries] if isinstance(preconditioned_queries, torch.Tensor)
                  else preconditioned_queries)
        qbar = _GroupMeans(tl, tgroups, n_boot, store.dim, test_rng)
        for q in blocks:
            if q.dim() != 2 or q.shape[1] != store.dim:
                raise ValueError(f"preconditioned queries must be [m, {store.dim}], got "
                                 f"{tuple(q.shape)}")
            if qbar.rows + q.shape[0] > len(tl):
                raise ValueError(f"test_groups must be [m], one per query: it has {len(tl)}, "
                                 "there are more queries")
            qbar.add(q)
        if qbar.rows != len(tl):
            raise ValueError(f"test_groups must be [{qbar.rows}], one per query, got {tl.shape}")
        # Resampled training-group means of [phi_i, s_i], over one streaming pass of the store.
        train = _GroupMeans(labels, groups, n_boot, store.dim + 1, rng)
        for rows, first in store.iter_rows(dtype=torch.float64):
            train.add(torch.cat([rows, s_col[first:first + rows.shape[0]]], dim=1))
        boots = torch.einsum("tbd,gbd->tgb", qbar.means,
                             train.means[:, :, :-1]).numpy()  # [Gt, G, B+1]
        cross = boots[:, :, 0]
        cross_ci = np.percentile(boots[:, :, 1:], _CI, axis=2).transpose(1, 2, 0)
    self_boot = train.means[:, :, -1].numpy()  # [G, B+1]
    self_mean = self_boot[:, 0]
    self_ci = np.percentile(self_boot[:, 1:], _CI, axis=1).T
    return GroupInfluence(
        groups,
        self_mean,
        self_median,
        self_ci,
        np.array([len(i) for i in idx]),
        cross,
        cross_ci,
        tgroups,
    )
