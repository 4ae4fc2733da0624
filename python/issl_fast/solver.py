"""Curvature solvers: apply ``F^-1`` (damped) to gradient features.

``F`` is the Gauss-Newton / empirical Fisher of the loss in feature space,
``F = (1/n) sum_i phi_i phi_i^T + lambda I``, in one of four forms:

- ``identity``: F = I (influence = gradient similarity).
- ``gauss_newton``: the full dim x dim matrix, Cholesky-factored in float64 (never inverted).
- ``block``: one Gauss-Newton block per layer (block-diagonal F).
- ``ekfac``: per kron layer block, the eigenbasis of the K-FAC factors (projected input and
  output-gradient covariances, gathered while featurising) with eigenvalues corrected from the
  per-example features (George et al. 2018; Grosse et al. 2023); other blocks use ``block``.

Damping: ``damping`` is relative by default, ``lambda = damping * mean eigenvalue`` of the block
(0.1, Grosse et al.'s heuristic); pass ``absolute_damping`` to fix lambda. A JL sketch preserves
the trace, so the mean eigenvalue in a k-dim sketch is about P/k times the parameter-space one: the
same relative rule damps far more after sketching. The absolute lambda used per block is in
``solver.damping_used``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .projection import Block
from .store import GradientStore

SOLVERS = ("identity", "gauss_newton", "block", "ekfac")
# Rows read from the store per step when accumulating curvature: bounded memory for any n.
_CHUNK = 16384


def _accumulate_gram(store: GradientStore, blocks: list[Block], rows: tuple[int, int] | None
                     ) -> list[torch.Tensor]:
    """Per block sum_i phi_i phi_i^T (float64) over the store's rows (``rows``: a range)."""
    grams = [torch.zeros(b.dim, b.dim, dtype=torch.float64) for b in blocks]
    for chunk, _ in store.iter_rows(_CHUNK, torch.float64, rows=rows):
        for g, b in zip(grams, blocks):
            part = chunk[:, b.start : b.stop]
            g += part.T @ part
    return grams


def _damping(mean_eig: float, relative: float, absolute: float | None) -> float:
    if absolute is not None:
        return float(absolute)
    lam = relative * mean_eig
    # An all-zero block (e.g. a layer the representation does not use) still needs an SPD matrix.
    return lam if lam > 0 else 1e-12


class _CholeskyBlock:
    """``(F_b + lambda I)^-1`` of one block through its Cholesky factor."""

    def __init__(self, gram: torch.Tensor, n: int, relative: float, absolute: float | None):
        F = gram / max(n, 1)
        self.lam = _damping(
            float(torch.diagonal(F).mean()) if F.numel() else 0.0, relative, absolute
        )
        F = F + self.lam * torch.eye(F.shape[0], dtype=F.dtype)
        self.L, info = torch.linalg.cholesky_ex(F)
        if int(info):
            raise ValueError(
                f"the curvature (+ lambda = {self.lam:.3g}) is not positive definite (Cholesky "
                f"fails at column {int(info)} of {F.shape[0]}): the features hold NaN/Inf, or "
                "lambda is too small for their scale: raise damping / absolute_damping")

    def solve(self, x: torch.Tensor) -> torch.Tensor:  # x [m, d] float64
        return torch.cholesky_solve(x.T, self.L).T

    def quad(self, x: torch.Tensor) -> torch.Tensor:  # x^T F^-1 x per row
        y = torch.linalg.solve_triangular(self.L, x.T, upper=False)
        return (y * y).sum(dim=0)


class _EKFACBlock:
    """EK-FAC on one kron block: phi is vec of a [k_out, k_in] matrix M; in the K-FAC eigenbasis
    ``M' = Q_D^T M Q_A`` the curvature is diagonal with corrected eigenvalues
    ``Lambda = mean_i M'_i ** 2``."""

    def __init__(self, block: Block, cov_a: torch.Tensor, cov_d: torch.Tensor):
        self.block = block
        _, self.QA = torch.linalg.eigh(cov_a)
        _, self.QD = torch.linalg.eigh(cov_d)
        self.sq = torch.zeros(block.k_out, block.k_in, dtype=torch.float64)
        self.lam = 0.0

    def rotate(self, x: torch.Tensor) -> torch.Tensor:  # [m, d] -> [m, k_out, k_in]
        M = x.reshape(-1, self.block.k_out, self.block.k_in)
        return self.QD.T @ M @ self.QA

    def finish(self, n: int, relative: float, absolute: float | None) -> None:
        self.eig = self.sq / max(n, 1)
        self.lam = _damping(float(self.eig.mean()), relative, absolute)

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        Mp = self.rotate(x) / (self.eig + self.lam)
        return (self.QD @ Mp @ self.QA.T).reshape(x.shape[0], -1)

    def quad(self, x: torch.Tensor) -> torch.Tensor:
        Mp = self.rotate(x)
        return (Mp * Mp / (self.eig + self.lam)).sum(dim=(1, 2))


class Solver:
    """Fitted ``F^-1``. Build with :func:`make_solver`, then :meth:`fit` on a store."""

    def __init__(
        self,
        kind: str,
        blocks: list[Block],
        damping: float = 0.1,
        absolute_damping: float | None = None,
    ) -> None:
        if kind not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {kind!r}")
        # (> 0: with fewer examples than feature dimensions the curvature is singular, and an
        # undamped solve returns noise, or fails in the Cholesky factorisation)
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping!r}")
        if absolute_damping is not None and not absolute_damping > 0:
            raise ValueError(f"absolute_damping must be > 0, got {absolute_damping!r}")
        self.kind = kind
        self.blocks = blocks
        # (plain floats: a numpy or tensor scalar given here would otherwise travel into the
        # settings the ranks compare, and into the damping reported)
        self.damping = float(damping)
        self.absolute_damping = None if absolute_damping is None else float(absolute_damping)
        self._parts: list[tuple[Block, Any]] = []
        self._bases: tuple[Any, dict[str, _EKFACBlock]] | None = None
        self.n = 0
        self.fitted = kind == "identity"

    @property
    def damping_used(self) -> dict[str, float]:
        """Absolute lambda per block (empty for identity)."""
        return {b.name: float(p.lam) for b, p in self._parts}

    def fit(self, store: GradientStore) -> Solver:
        """Fits the curvature (and damping) on the store's features."""
        return self.finish(store, self.accumulate(store))

    def accumulate(self, store: GradientStore, rows: tuple[int, int] | None = None
                   ) -> list[torch.Tensor]:
        """The first half of :meth:`fit`: the curvature sums over the store's rows (``rows``: a
        range of them), float64 tensors, with no communication. Processes that split a store's
        rows add their sums (:func:`.distributed.all_reduce_sum`) and each calls
        :meth:`finish` with the totals, so they all hold the same solver."""
        if self.kind == "identity":
            return []
        if store.dim != (self.blocks[-1].stop if self.blocks else 0):
            raise ValueError(
                f"store dim {store.dim} does not match the projection's {self.blocks[-1].stop}"
            )
        if self.kind == "gauss_newton":
            return _accumulate_gram(store, [Block("all", 0, store.dim, "dense")], rows)
        ek, gn = self._ekfac_blocks(), self._gauss_newton_blocks()
        sums = _accumulate_gram(store, gn, rows) if gn else []
        if ek:
            eks = self._eigenbases(store, ek)
            sq = [torch.zeros(b.k_out, b.k_in, dtype=torch.float64) for b in ek]
            for chunk, _ in store.iter_rows(_CHUNK, torch.float64, rows=rows):
                for acc, b in zip(sq, ek):
                    Mp = eks[b.name].rotate(chunk[:, b.start : b.stop])
                    acc += (Mp * Mp).sum(dim=0)
            sums += sq
        return sums

    def finish(self, store: GradientStore, sums: list[torch.Tensor]) -> Solver:
        """The second half of :meth:`fit`, from the sums of :meth:`accumulate` over all rows."""
        n = store.rows
        if self.kind == "identity":
            self.n = n
            return self
        if self.kind == "gauss_newton":
            whole = Block("all", 0, store.dim, "dense")
            self._parts = [
                (whole, _CholeskyBlock(sums[0], n, self.damping, self.absolute_damping))
            ]
        else:
            ek, gn = self._ekfac_blocks(), self._gauss_newton_blocks()
            parts: dict[str, Any] = {
                b.name: _CholeskyBlock(g, n, self.damping, self.absolute_damping)
                for b, g in zip(gn, sums)
            }
            if ek:
                eks = self._eigenbases(store, ek)
                for b, sq in zip(ek, sums[len(gn):]):
                    eks[b.name].sq = sq
                    eks[b.name].finish(n, self.damping, self.absolute_damping)
                parts.update(eks)
            self._parts = [(b, parts[b.name]) for b in self.blocks]
        self.n = n
        self.fitted = True
        return self

    def _ekfac_blocks(self) -> list[Block]:
        return [b for b in self.blocks if self.kind == "ekfac" and b.kind == "kron"]

    def _gauss_newton_blocks(self) -> list[Block]:
        ek = self._ekfac_blocks()
        return [b for b in self.blocks if b not in ek]

    def _eigenbases(self, store: GradientStore, ek: list[Block]) -> dict[str, _EKFACBlock]:
        """EK-FAC blocks with the eigenbases of the store's K-FAC statistics (the same on every
        process reading the same store; computed once per store and kept)."""
        key = (store.content_key, tuple(b.name for b in ek))
        if self._bases is not None and self._bases[0] == key:
            return self._bases[1]
        stats = store.stats()
        missing = [b.name for b in ek if f"{b.name}/A" not in stats]
        if missing and store.rows == 0:
            raise ValueError(f"the store at {store.path} has no rows: featurize examples into "
                             "it before fit (EK-FAC needs their K-FAC statistics)")
        if missing:
            raise ValueError(
                f"the store has no K-FAC statistics for {missing[:3]}: featurize with "
                "solver='ekfac' (it collects them) or choose solver='block'"
            )
        eks = {b.name: _EKFACBlock(b, stats[f"{b.name}/A"], stats[f"{b.name}/D"]) for b in ek}
        self._bases = (key, eks)
        return eks

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("call fit(store) before using the solver")
        dim = self.blocks[-1].stop if self.blocks else x.shape[1]
        if x.dim() != 2 or x.shape[1] != dim:
            raise ValueError(f"features must be [m, {dim}], got {tuple(x.shape)}")
        # The curvature lives on the CPU in float64 (it is fitted from the store there): features
        # computed on a GPU are brought over, so the results are float64 CPU tensors.
        return x.to(device="cpu", dtype=torch.float64)

    def precondition(self, x: torch.Tensor) -> torch.Tensor:
        """``F^-1 x`` row-wise, float64 ``[m, dim]``."""
        x = self._check(x)
        if self.kind == "identity":
            return x.clone()
        out = torch.empty_like(x)
        for b, part in self._parts:
            out[:, b.start : b.stop] = part.solve(x[:, b.start : b.stop])
        return out

    def store_quad(self, store: GradientStore, rows: tuple[int, int] | None = None
                   ) -> np.ndarray:
        """:meth:`quad` of every store row (the self-influences), float64 ``[n]`` (``rows``: of
        that range only)."""
        start, stop = (0, store.rows) if rows is None else rows
        out = np.empty(stop - start)  # (filled in place: a list of per-chunk results between
        # the freed float64 chunks kept ~1 GB of a 2M-row scan from going back to the system)
        for chunk, first in store.iter_rows(dtype=torch.float64, rows=rows):
            out[first - start:first - start + chunk.shape[0]] = self.quad(chunk).numpy()
        return out

    def quad(self, x: torch.Tensor) -> torch.Tensor:
        """``x^T F^-1 x`` per row (self-influence), float64 ``[m]``."""
        x = self._check(x)
        if self.kind == "identity":
            return (x * x).sum(dim=1)
        total = torch.zeros(x.shape[0], dtype=torch.float64)
        for b, part in self._parts:
            total += part.quad(x[:, b.start : b.stop])
        return total
