"""The naive baseline the demo compares against: nearest neighbours in the encoder's
representation space (cosine) for duplicates, distance to the k-th neighbour for outliers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def representations(encoder: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """L2-normalised encoder outputs [n, d] (eval mode), on the CPU in float64; ``x`` is moved
    to the encoder's device batch by batch."""
    was = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    z = torch.cat([encoder(x[i:i + batch].to(device)).cpu() for i in range(0, len(x), batch)])
    encoder.train(was)
    return F.normalize(z.reshape(len(x), -1).double(), dim=1)


def _neighbours(z: torch.Tensor, topk: int, shifted: Sequence[torch.Tensor] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    sim = z @ z.T
    for zt in shifted:  # representations of transformed copies: a pair keeps its best match
        s = zt @ z.T
        sim = torch.maximum(sim, torch.maximum(s, s.T))
    sim.fill_diagonal_(-np.inf)
    return torch.topk(sim, topk, dim=1)


def knn_pairs(z: torch.Tensor, topk: int = 5, shifted: Sequence[torch.Tensor] = ()
              ) -> tuple[np.ndarray, np.ndarray]:
    """Candidate duplicate pairs (i < j) among each example's top-k cosine neighbours, ranked by
    similarity (rows [p, 2], similarity [p]). ``shifted``: the representations of transformed
    copies of the same examples (e.g. shifted by a pixel), matched the way
    ``InfluenceSSL.neighbours(transforms=...)`` matches them."""
    vals, idx = _neighbours(z, topk, shifted)
    a = np.repeat(np.arange(len(z)), topk)
    b, s = idx.numpy().ravel(), vals.numpy().ravel()
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = lo * len(z) + hi
    _, first = np.unique(key, return_index=True)
    lo, hi, s = lo[first], hi[first], s[first]
    order = np.argsort(-s, kind="stable")
    return np.stack([lo[order], hi[order]], axis=1), s[order]


def knn_distance(z: torch.Tensor, k: int = 5) -> np.ndarray:
    """Outlier score: cosine distance to the k-th nearest neighbour."""
    vals, _ = _neighbours(z, k)
    return (1.0 - vals[:, -1]).numpy()
