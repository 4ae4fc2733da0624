"""The single tolerance policy of the test suite.

Every kernel result is compared with ``issl_fast.reference`` run in float64 (``accum=float64``),
which is exact to ~1e-16 and so stands in for the true value. The kernels accumulate in float32,
and the error of a float32 sum is bounded by a multiple of the unit roundoff times the sum of the
*absolute values* of its terms, not of the (possibly cancelling) result. So each op's check is

    |ours - ref| <= RTOL * M        elementwise,

where ``M`` is the op's *magnitude*: the same sum with every factor replaced by its absolute value
(for a sketch ``y = P g``, ``M = |P| |g|``). This is scale-free, needs no absolute fudge term, and
where ``M == 0`` (zero inputs, P = 0) it demands an exact zero. float16 / bfloat16 inputs convert
to float32 exactly, so the same bound holds against the reference fed the same half-precision
tensor (the reference upcasts it exactly too).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from issl_fast import reference

# Why 2e-5: the kernels sum KC-deep blocks with FMA and then add the block sums, a worst-case
# relative error (vs M) of about (KC + P/KC + 3) * u, u = 2^-24 ~ 6e-8; with KC <= 256 and
# P <= 8192 that is <= 1.8e-5 (typical errors are ~sqrt(P) * u ~ 1e-7). A wrong sign, entry,
# scale or dropped term costs O(1) of M, far above this.
RTOL = 2e-5

# Why a floor of 1 for Gaussian entries: the kernel evaluates Box-Muller in float32 (logf, cosf
# of a rounded angle), so each entry has an absolute error of a few ulps of the radius
# sqrt(-2 ln u1) <= 5.8 (<= ~3e-6), not an error relative to |R| (which is ~0 near a zero of the
# cosine). Counting every Gaussian entry as at least 1 in M covers that with 6x margin at RTOL.
GAUSSIAN_ENTRY_FLOOR = 1.0

# Columns of the random matrix materialised at a time when computing a magnitude.
_COL_BLOCK = 8192


def _abs_entries(r: np.ndarray, dist: str) -> torch.Tensor:
    a = np.abs(r)
    if dist == "gaussian":
        a = np.maximum(a, GAUSSIAN_ENTRY_FLOOR)
    return torch.from_numpy(a)


def dense_magnitude(
    g: torch.Tensor, k: int, *, seed: int, dist: str, col_offset: int = 0
) -> torch.Tensor:
    """``M[b, j] = sum_p |R(seed, j, col_offset + p)| |g[b, p]| / sqrt(k)`` (float64, [B, k]).

    For Rademacher this is ``sum_p |g[b, p]| / sqrt(k)`` for every j."""
    ga = g.detach().to(torch.float64).abs()
    B, P = ga.shape
    m = torch.zeros(B, k, dtype=torch.float64)
    for c0 in range(0, P, _COL_BLOCK):
        c1 = min(P, c0 + _COL_BLOCK)
        r = reference.random_matrix(seed, k, col_offset + c0, col_offset + c1, dist=dist)
        m += ga[:, c0:c1] @ _abs_entries(r, dist).T
    return m / math.sqrt(k)


def linear_magnitude(
    A: torch.Tensor, D: torch.Tensor, k: int, *, seed: int, dist: str, col_offset: int = 0
) -> torch.Tensor:
    """Magnitude of ``sketch_linear``: the dense magnitude of ``sum_t |D_t|^T |A_t|``, i.e. the
    triple sum over (t, o, i) with every factor in absolute value (it also bounds the error of
    forming G in float32)."""
    g_abs = reference.per_example_linear_grad(A.abs(), D.abs(), accum=torch.float64)
    return dense_magnitude(g_abs, k, seed=seed, dist=dist, col_offset=col_offset)


def sparse_magnitude(
    g: torch.Tensor, k: int, *, s: int, seed: int, col_offset: int = 0
) -> torch.Tensor:
    """``M[b, j] = sum of |g[b, p]| / sqrt(s)`` over the (p, r) that land in bucket j."""
    ga = g.detach().to(torch.float64).abs()
    B, P = ga.shape
    m = torch.zeros(B, k, dtype=torch.float64)
    if P:
        buckets, _ = reference.sparse_buckets(seed, s, k, col_offset, col_offset + P)
        contrib = ga[:, :, None].expand(B, P, s).reshape(B, -1)
        m.index_add_(1, torch.from_numpy(buckets).reshape(-1), contrib)
    return m / math.sqrt(s)


def kron_magnitude(
    A: torch.Tensor, D: torch.Tensor, k_in: int, k_out: int, *, seed: int, dist: str
) -> torch.Tensor:
    """``vec(|P_out| (sum_t |D_t|^T |A_t|) |P_in|^T)``: every product of the factored sum
    ``sum_t (P_out D_t)_a (P_in A_t)_c`` in absolute value ([B, k_out * k_in], float64)."""
    p_in, p_out = reference.kron_matrices(seed, A.shape[2], D.shape[2], k_in, k_out, dist)
    g_abs = torch.einsum(
        "bto,bti->boi", D.detach().to(torch.float64).abs(), A.detach().to(torch.float64).abs()
    )
    m = _abs_entries(p_out, dist) @ g_abs @ _abs_entries(p_in, dist).T
    return m.reshape(A.shape[0], -1) / math.sqrt(k_in * k_out)


def score_magnitude(Q: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``|Q| @ |G|^T`` ([m, n], float64): the magnitude of each score ``q . g``."""
    return Q.to(torch.float64).abs() @ G.to(torch.float64).abs().T


def assert_topk_close(
    got: tuple[torch.Tensor, torch.Tensor],
    ref: tuple[torch.Tensor, torch.Tensor],
    Q: torch.Tensor,
    G: torch.Tensor,
    index_offset: int = 0,
    what: str = "",
) -> None:
    """score_topk vs the float64 reference.

    * empty slots (no candidate left) are exactly ``(-inf, -1)`` in the same places;
    * each value is within ``RTOL * |q|.|g|`` of the exact score of the index it comes with;
    * indices equal the reference's exactly, except where the two candidates' exact scores are
      within ``2 * RTOL * |q|.|g|`` of each other: a near-tie that float32 scores cannot order
      (e.g. 9.85141003 vs 9.85140997 both round to the same float32 and then tie-break by index).
      Exact ties are exact in both, so tie order is checked exactly.
    """
    v, i = got
    rv, ri = ref
    assert v.dtype == torch.float32 and i.dtype == torch.int64, what
    assert v.shape == rv.shape and i.shape == ri.shape, f"{what}: {v.shape} vs {rv.shape}"
    empty = i < 0
    assert torch.equal(empty, ri < 0), f"{what}: empty slots differ\nours {i}\nref  {ri}"
    assert bool((v[empty] == -math.inf).all()), f"{what}: empty slots must hold -inf"
    for q in range(i.shape[0]):
        assert len(set(i[q].tolist()) - {-1}) == int((~empty[q]).sum()), f"{what}: duplicate ids"
    if not (~empty).any():
        return
    rows = torch.arange(i.shape[0])[:, None].expand_as(i)[~empty]
    q64 = Q.detach().to(torch.float64)[rows]
    ours_g = G.detach().to(torch.float64)[i[~empty] - index_offset]
    ref_g = G.detach().to(torch.float64)[ri[~empty] - index_offset]
    exact_ours = (q64 * ours_g).sum(1)  # exact score of the index we returned
    mag_ours = (q64.abs() * ours_g.abs()).sum(1)
    mag_ref = (q64.abs() * ref_g.abs()).sum(1)
    err = (v[~empty].to(torch.float64) - exact_ours).abs()
    assert bool((err <= RTOL * mag_ours).all()), (
        f"{what}: a value is off its index's exact score by "
        f"{float((err / mag_ours).max()):.3e} * |q||g| > RTOL={RTOL}"
    )
    differ = i[~empty] != ri[~empty]
    gap = (exact_ours - rv[~empty].to(torch.float64)).abs()
    near_tie = gap <= 2 * RTOL * torch.maximum(mag_ours, mag_ref)
    bad = differ & ~near_tie
    assert not bool(bad.any()), (
        f"{what}: indices differ from the reference beyond near-ties\nours {i}\nref  {ri}"
    )


def assert_close(
    ours: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, what: str = ""
) -> None:
    """``|ours - ref| <= RTOL * magnitude`` elementwise, with a readable failure message."""
    assert ours.dtype == torch.float32, f"{what}: kernel output must be float32, got {ours.dtype}"
    assert tuple(ours.shape) == tuple(ref.shape), (
        f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    )
    if ours.numel() == 0:
        return
    err = (ours.to(torch.float64) - ref.to(torch.float64)).abs()
    bound = RTOL * magnitude.to(torch.float64)
    bad = ~(err <= bound)  # NaN in ours counts as a failure
    if bad.any():
        idx = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {ours.numel()} elements exceed RTOL*M (RTOL={RTOL}); "
            f"first at {idx}: ours={ours[idx].item()!r} ref={ref[idx].item()!r} "
            f"|err|={err[idx].item():.3e} bound={bound[idx].item():.3e}; "
            f"max |err|/M = {(err / magnitude.to(torch.float64)).nan_to_num(nan=0.0).max():.3e}"
        )
