"""Outlier identification by self-influence ``s_i = phi_i^T F^-1 phi_i``: an example the rest of
the data does not explain (atypical, memorised, corrupted) has a large, idiosyncratic gradient."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NORMALISATIONS = (None, "zscore", "robust", "rank")


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
        return np.argsort(np.argsort(s, kind="stable"), kind="stable") / max(len(s) - 1, 1)
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {how!r}")


def find_outliers(
    self_influence: np.ndarray,
    ids: np.ndarray | None = None,
    *,
    normalisation: str | None = "robust",
) -> OutlierRanking:
    """Rank examples by (normalised) self-influence, highest first (ties: lower row first)."""
    s = np.asarray(self_influence, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"self_influence must be 1-D [n], got shape {s.shape}")
    scores = normalise(s, normalisation)
    order = np.lexsort((np.arange(len(s)), -scores))
    ids = np.arange(len(s)) if ids is None else np.asarray(ids)
    return OutlierRanking(order, scores, ids[order])
