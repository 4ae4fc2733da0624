"""Outlier identification from influence.

- ``self_influence``: ``s_i = phi_i^T F^-1 phi_i``; an example the rest of the data does not
  explain (memorised, corrupted) has a large, idiosyncratic gradient. Under the
  augmentation-stability loss an atypical but *stable* input (e.g. a smooth blob) has a small
  gradient, so this score can miss such outliers.
- ``neighbours``: ``1 -`` the normalised influence of the k-th most similar other training
  example: an example no other example's gradient resembles is an outlier, whatever its
  gradient's size. Computed with the streaming top-k kernel (no n x n matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NORMALISATIONS = (None, "zscore", "robust", "rank")
METHODS = ("self_influence", "neighbours")


@dataclass
class OutlierRanking:
    """Store rows ordered from most to least outlying, with their (normalised) scores."""

    order: np.ndarray  # [n] store rows, most outlying first
    scores: np.ndarray  # [n] per store row (not reordered)
    ids: np.ndarray  # [n] example ids in `order`

    def top(self, k: int) -> np.ndarray:
        return self.order[:k]


def normalise(s: np.ndarray, how: str | None) -> np.ndarray:
    """``None``: raw; ``"zscore"``: (s - mean)/std; ``"robust"``: (log s - median)/MAD of log s
    (self-influence is heavy-tailed, so the log scale and median/MAD resist the outliers
    themselves); ``"rank"``: percentile in [0, 1]."""
    s = np.asarray(s, dtype=np.float64)
    if how is None:
        return s
    if how == "zscore":
        return (s - s.mean()) / (s.std() or 1.0)
    if how == "robust":
        ls = np.log(np.maximum(s, np.finfo(np.float64).tiny))
        med = np.median(ls)
        mad = np.median(np.abs(ls - med)) * 1.4826 or 1.0
        return (ls - med) / mad
    if how == "rank":
        # ties share a rank, so the ranking (ties: lower row first) is that of the raw scores
        return np.searchsorted(np.sort(s), s, side="left") / max(len(s) - 1, 1)
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {how!r}")


def neighbour_scores(similarity: np.ndarray, k: int) -> np.ndarray:
    """``1 - similarity[:, k-1]`` from :func:`normalised_neighbours` output (best first)."""
    if not 1 <= k <= similarity.shape[1]:
        raise ValueError(f"k must be in [1, {similarity.shape[1]}], got {k}")
    kth = similarity[:, k - 1].astype(np.float64)
    return 1.0 - np.where(np.isfinite(kth), kth, -1.0)


def find_outliers(
    scores: np.ndarray,
    ids: np.ndarray | None = None,
    *,
    normalisation: str | None = "robust",
) -> OutlierRanking:
    """Rank examples by a (normalised) outlier score, highest first (ties: lower row first).
    ``scores``: self-influence, or :func:`neighbour_scores`."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D [n], got shape {s.shape}")
    scores = normalise(s, normalisation)
    order = np.lexsort((np.arange(len(s)), -scores))
    ids = np.arange(len(s)) if ids is None else np.asarray(ids)
    return OutlierRanking(order, scores, ids[order])
