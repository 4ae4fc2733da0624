"""The pure-PyTorch baselines: what a competent PyTorch user writes today for each op.

The ones a user can run without the hash (dense, linear, kron, score_topk) ship in the package
(:mod:`issl_fast.baselines`, also timed by ``issl-fast bench``) and are re-exported here; the
hash-matrix sources, TRAK's projector and the sparse baselines live here. Every baseline takes
its random matrix from a pluggable source, so the bench files first run it with the issl_fast
hash matrix (and check it equals the reference: same math, no shortcut), then time it with
torch's own RNG, which is what users do (and is faster than reproducing our hash).
"""

from __future__ import annotations

import math
import warnings

import torch
from _bench import reference
from issl_fast.baselines import (  # noqa: F401  (re-exported: the bench files use bl.<name>)
    DENSE_BLOCK,
    TOPK_CHUNK,
    BlockFn,
    TorchRademacherBlocks,
    blocked_projection,
    dense_baseline,
    kron_baseline,
    linear_baseline,
    topk_baseline,
    torch_rademacher,
)

# Input coordinates per index_add_ chunk in the sparse baseline: bounds its [C*s, B] temporary.
SPARSE_CHUNK = 16384


# ---------------------------------------------------------------------------------------------
# dense / linear: materialise the per-example gradient, project by column blocks of R
# ---------------------------------------------------------------------------------------------
def hash_blocks(seed: int, P: int, rows: int, col_offset: int = 0) -> BlockFn:
    """Blocks of the issl_fast hash matrix (rows j < ``rows``), for checking the baselines."""
    rt = torch.from_numpy(
        reference.random_matrix(seed, rows, col_offset, col_offset + P)
    ).to(torch.float32).T.contiguous()  # [P, rows], exactly +-1
    return lambda j0, j1: rt[:, j0:j1]


def trak_basic_projector(G: torch.Tensor, k: int, seed: int = 0,
                         block_size: int = 200) -> torch.Tensor:
    """TRAK's ``BasicProjector.project`` (trak/projectors.py) as written there: a [P, block_size]
    fp32 buffer refilled by ``bernoulli_(0.5)``, ``*= 2``, ``-= 1`` per block, then
    ``grads.type(fp32) @ block``. (TRAK applies no 1/sqrt(k); we add it so outputs compare.)"""
    P = G.shape[1]
    proj = torch.empty(P, block_size, dtype=torch.float32)
    gen = torch.Generator()
    y = torch.zeros(G.shape[0], k, dtype=torch.float32)
    for ind in range(math.ceil(k / block_size)):
        gen.manual_seed(seed + 1000 * ind)
        proj.bernoulli_(p=0.5, generator=gen)
        proj *= 2.0
        proj -= 1.0
        st, ed = ind * block_size, min((ind + 1) * block_size, k)
        y[:, st:ed] = G.type(torch.float32) @ proj[:, : ed - st]
    return y.mul_(1.0 / math.sqrt(k))


# ---------------------------------------------------------------------------------------------
# sparse JL: scatter with index_add_, or a cached torch.sparse CSR matrix
# ---------------------------------------------------------------------------------------------
def sparse_tables(seed: int, s: int, k: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets [P, s] int64 and signs [P, s] float32 of the hash (set up once, not timed)."""
    b, sg = reference.sparse_buckets(seed, s, k, 0, P)
    return torch.from_numpy(b), torch.from_numpy(sg).to(torch.float32)


def sparse_index_add(g: torch.Tensor, k: int, s: int, buckets: torch.Tensor,
                     signs: torch.Tensor, chunk: int = SPARSE_CHUNK) -> torch.Tensor:
    """``y^T[bucket(p, r)] += sign(p, r) * g[:, p]`` with ``index_add_`` over chunks of inputs.
    Scatters whole rows of B values into y^T [k, B] (contiguous rows: ~2x faster than scattering
    single values along dim 1 of y [B, k])."""
    B, P = g.shape
    g = g.float()
    yT = torch.zeros(k, B, dtype=torch.float32)
    for c0 in range(0, P, chunk):
        c1 = min(P, c0 + chunk)
        contrib = (g[:, c0:c1].T[:, None, :] * signs[c0:c1, :, None]).reshape(-1, B)  # [C*s, B]
        yT.index_add_(0, buckets[c0:c1].reshape(-1), contrib)
    return yT.T.mul(1.0 / math.sqrt(s))


def sparse_csr_matrix(k: int, s: int, buckets: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The sketch as a cached torch.sparse CSR matrix S [k, P] (built once, not timed)."""
    P = buckets.shape[0]
    rows = buckets.reshape(-1)
    cols = torch.arange(P).repeat_interleave(s)
    vals = signs.reshape(-1) / math.sqrt(s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta" / invariant checks
        coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (k, P)).coalesce()
        return coo.to_sparse_csr()


def sparse_csr(g: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``y = (S @ g^T)^T`` with torch.sparse (CSR x dense)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (S @ g.float().T).T


# ---------------------------------------------------------------------------------------------
# kron (LoGra-style factored projection)
# ---------------------------------------------------------------------------------------------
def kron_hash_matrices(seed: int, d_in: int, d_out: int, k_in: int, k_out: int):
    p_in, p_out = reference.kron_matrices(seed, d_in, d_out, k_in, k_out)
    return torch.from_numpy(p_in).float(), torch.from_numpy(p_out).float()
