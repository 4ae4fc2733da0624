"""Johnson-Lindenstrauss norm preservation of the three sketches, with stated failure
probabilities.

For a fixed input g and the random matrix P of a sketch, rho = ||P g||^2 / ||g||^2 has mean 1.
Every bound below is 8 standard deviations of rho over the random matrix, and rho's tail is
sub-exponential (it is a quadratic form in independent Gaussian / Rademacher entries:
Laurent-Massart for chi^2, Achlioptas 2003 for Rademacher, Hanson-Wright in general), so the
probability of exceeding 8 sigma is about 2 exp(-24) ~ 1e-10 per example (chi^2_k / k at
k = 1024: 2 sqrt(x/k) + 2x/k = 8 sqrt(2/k) gives x = 24). A union bound over 64 examples and the
few cases here keeps the chance that a *random* seed fails below 1e-7; the seeds are fixed, so
the tests are deterministic. A sketch with a wrong scale, repeated or missing rows, or a broken
hash misses these bounds by far.
"""

from __future__ import annotations

import math

import pytest
import torch
from inputs import DISTS, randn
from issl_fast import ops, reference

B, N, K = 64, 4096, 1024


def _ratios(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return y.double().pow(2).sum(1) / g.double().pow(2).sum(1)


@pytest.mark.parametrize("dist", DISTS)
def test_sketch_dense_preserves_norms(dist: str) -> None:
    # rho = (1/k) sum_j (r_j . u)^2 with u = g/||g||: chi^2_k / k for Gaussian entries
    # (Var = 2/k); for Rademacher Var = (2/k)(1 - sum u^4) <= 2/k.
    g = randn((B, N), seed=1)
    rho = _ratios(ops.sketch_dense(g, K, seed=2, dist=dist), g)
    bound = 8 * math.sqrt(2 / K)
    assert float((rho - 1).abs().max()) <= bound, rho


@pytest.mark.parametrize("s", [1, 4])
def test_sketch_sparse_preserves_norms(s: int) -> None:
    # Replica r is a CountSketch into a block of w = k/s buckets: ||C_r u||^2 - 1 is a Rademacher
    # chaos with variance 2(1 - sum u^4)/w (pairs colliding with probability 1/w); averaging s
    # independent replicas gives Var(rho) = 2(1 - sum u^4)/k <= 2/k, as for the dense sketch.
    # For spread-out g (Gaussian, max u_p^2 ~ 2 log(N)/N) the chaos' tail is sub-exponential
    # on that scale (Hanson-Wright).
    g = randn((B, N), seed=3)
    rho = _ratios(ops.sketch_sparse(g, K, s=s, seed=4), g)
    bound = 8 * math.sqrt(2 / K)
    assert float((rho - 1).abs().max()) <= bound, rho


@pytest.mark.parametrize("dist", DISTS)
def test_sketch_kron_preserves_norms(dist: str) -> None:
    # y = vec(P_out G P_in^T) is two independent JL maps in a row: rho = rho_1 rho_2 with
    #   rho_1 = ||X||^2 / ||G||^2 (X = P_out G),  Var = (2/k_out) ||G G^T||_F^2 / ||G||_F^4,
    #   rho_2 = ||X P_in^T||^2 / ||X||^2,          Var = (2/k_in) ||X^T X||_F^2 / ||X||_F^4
    # (each a quadratic form in P's entries; Gaussian variances shown, Rademacher ones are
    # smaller). The sigmas s1, s2 are computed exactly from each example's G and the realised
    # P_out (from the reference), and rho_1 too, so rho_2 = rho / rho_1 isolates what the kernel
    # did with P_in. Each stage is within 8 of its sigmas w.p. ~1 - 2e-10, hence
    # |rho - 1| <= (1 + 8 s1)(1 + 8 s2) - 1. With G i.i.d. (flat spectrum) s1 ~ 0.044 and
    # s2 ~ 0.063: a Kronecker sketch concentrates less than a dense one of the same k.
    d_in = d_out = 64  # N = 4096 gradient entries
    k_in = k_out = 32  # k = 1024
    # A = identity over T = d_in steps makes G_b = sum_t D_b[t]^T e_t^T = D_b^T: any G we like,
    # here i.i.d. Gaussian.
    A = torch.eye(d_in).expand(B, d_in, d_in).contiguous()
    D = randn((B, d_in, d_out), seed=5)
    G = D.double().transpose(1, 2)  # [B, d_out, d_in]
    y = ops.sketch_kron(A, D, k_in, k_out, seed=6, dist=dist)
    rho = y.double().pow(2).sum(1) / G.pow(2).sum((1, 2))
    _, p_out = reference.kron_matrices(6, d_in, d_out, k_in, k_out, dist)
    X = torch.from_numpy(p_out / math.sqrt(k_out)) @ G  # [B, k_out, d_in]

    def frob_ratio(M: torch.Tensor) -> torch.Tensor:  # ||M M^T||_F^2 / ||M||_F^4
        return (M @ M.transpose(1, 2)).pow(2).sum((1, 2)) / M.pow(2).sum((1, 2)).pow(2)

    s1 = torch.sqrt(2 / k_out * frob_ratio(G))
    s2 = torch.sqrt(2 / k_in * frob_ratio(X))
    rho1 = X.pow(2).sum((1, 2)) / G.pow(2).sum((1, 2))
    rho2 = rho / rho1
    assert bool(((rho1 - 1).abs() <= 8 * s1).all()), (rho1, s1)
    assert bool(((rho2 - 1).abs() <= 8 * s2).all()), (rho2, s2)
    assert bool(((rho - 1).abs() <= (1 + 8 * s1) * (1 + 8 * s2) - 1).all())
