"""Group (fairness) analysis: how much each group of training examples is self-influential, and
how much each training group supports each test group.

The cross-group matrix ``M[g, h] = mean_{t in test group g} mean_{i in train group h} score(i, t)``
factorises as ``(mean_t F^-1 phi_t) . (mean_i phi_i)``, so it needs only per-group mean vectors
(never an m x n matrix); bootstrap confidence intervals resample examples within groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..store import GradientStore

# Percentile interval of the bootstrap (95%).
_CI = (2.5, 97.5)


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


def _group_index(labels: np.ndarray, groups: list) -> list[np.ndarray]:
    return [np.flatnonzero(labels == g) for g in groups]


def group_influence(
    store: GradientStore,
    self_influence: np.ndarray,
    train_groups: np.ndarray,
    *,
    preconditioned_queries: torch.Tensor | None = None,
    test_groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> GroupInfluence:
    """Per-group self-influence statistics and, given preconditioned test queries with their
    groups, the cross-group influence matrix; bootstrap CIs from ``n_boot`` resamples."""
    labels = np.asarray(train_groups)
    s = np.asarray(self_influence, dtype=np.float64)
    if labels.shape != (store.rows,) or s.shape != (store.rows,):
        raise ValueError(
            f"train_groups and self_influence must be [{store.rows}], got "
            f"{labels.shape} and {s.shape}"
        )
    groups = sorted(set(labels.tolist()), key=str)
    idx = _group_index(labels, groups)
    rng = np.random.default_rng(seed)
    self_mean = np.array([s[i].mean() for i in idx])
    self_median = np.array([np.median(s[i]) for i in idx])
    self_ci = np.array(
        [np.percentile([s[rng.choice(i, len(i))].mean() for _ in range(n_boot)], _CI) for i in idx]
    )
    cross = cross_ci = tgroups = None
    if preconditioned_queries is not None:
        if test_groups is None:
            raise ValueError("test_groups is needed with preconditioned_queries")
        tl = np.asarray(test_groups)
        q = preconditioned_queries.double()
        if tl.shape != (q.shape[0],):
            raise ValueError(f"test_groups must be [{q.shape[0]}], got {tl.shape}")
        tgroups = sorted(set(tl.tolist()), key=str)
        tidx = _group_index(tl, tgroups)

        # Bootstrap weights (multinomial counts) per group; column 0 of each is the plain mean.
        def weights(members: np.ndarray) -> torch.Tensor:
            w = np.zeros((n_boot + 1, len(members)))
            w[0] = 1.0
            for b in range(1, n_boot + 1):
                w[b] = np.bincount(
                    rng.integers(0, len(members), len(members)), minlength=len(members)
                )
            return torch.from_numpy(w / len(members))

        wq = [weights(t) for t in tidx]
        qbar = [w @ q[torch.from_numpy(t)] for w, t in zip(wq, tidx)]  # [n_boot+1, dim] each
        wi = [weights(i) for i in idx]
        pos = np.empty(store.rows, dtype=np.int64)  # position of each row within its group
        for i in idx:
            pos[i] = np.arange(len(i))
        gid = np.empty(store.rows, dtype=np.int64)
        for gi, i in enumerate(idx):
            gid[i] = gi
        # Resampled training-group mean vectors, accumulated over one streaming pass of the store.
        phibar = [torch.zeros(n_boot + 1, store.dim, dtype=torch.float64) for _ in idx]
        for rows, first in store.iter_rows(dtype=torch.float64):
            rg, rp = gid[first : first + rows.shape[0]], pos[first : first + rows.shape[0]]
            for gi in range(len(groups)):
                sel = np.flatnonzero(rg == gi)
                if len(sel):
                    phibar[gi] += wi[gi][:, rp[sel]] @ rows[torch.from_numpy(sel)]
        boots = np.array([[(qb * pb).sum(dim=1).numpy() for pb in phibar] for qb in qbar])
        cross = boots[:, :, 0]  # [Gt, G]
        cross_ci = np.percentile(boots[:, :, 1:], _CI, axis=2).transpose(1, 2, 0)
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
