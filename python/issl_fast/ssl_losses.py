"""Self-supervised *training* losses (for the demo and for users who train small encoders here):
SimCLR's NT-Xent, BYOL and Barlow Twins. They take two batches of embeddings of the same
examples under two augmentations. (The attribution loss is :mod:`issl_fast.loss`.)
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over 2B embeddings [B, d] x 2: each view's
    positive is the other view of the same example, the 2B - 2 others are negatives."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [B, d], got {tuple(z1.shape)}, {tuple(z2.shape)}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3) -> torch.Tensor:
    """Barlow Twins: push the cross-correlation of the standardised embeddings to the identity
    (invariance on the diagonal, redundancy reduction off it)."""
    b = z1.shape[0]
    n1 = (z1 - z1.mean(0)) / (z1.std(0) + 1e-6)
    n2 = (z2 - z2.mean(0)) / (z2.std(0) + 1e-6)
    c = n1.T @ n2 / b
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambd * off


class BYOL(nn.Module):
    """BYOL: an online network + predictor regresses the embedding of a target network that is an
    exponential moving average of the online one (no negatives). ``loss(x1, x2)`` is symmetric;
    call :meth:`update_target` after each optimiser step."""

    def __init__(self, online: nn.Module, dim: int, hidden: int = 64, tau: float = 0.99) -> None:
        super().__init__()
        self.online = online
        self.predictor = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.target = copy.deepcopy(online)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.tau = tau

    @staticmethod
    def _regress(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()

    def loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        p1, p2 = self.predictor(self.online(x1)), self.predictor(self.online(x2))
        with torch.no_grad():
            t1, t2 = self.target(x1), self.target(x2)
        return self._regress(p1, t2) + self._regress(p2, t1)

    @torch.no_grad()
    def update_target(self) -> None:
        for po, pt in zip(self.online.parameters(), self.target.parameters()):
            pt.mul_(self.tau).add_(po.detach(), alpha=1 - self.tau)
