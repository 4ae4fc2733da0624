"""The pure-PyTorch baselines: what a competent PyTorch user writes today for each op.

Every baseline takes its random matrix from a pluggable source, so the bench files first run it
with the issl_fast hash matrix (and check it equals the reference: same math, no shortcut), then
time it with torch's own RNG, which is what users do (and is faster than reproducing our hash).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
from _bench import reference

BlockFn = Callable[[int, int], torch.Tensor]  # (j0, j1) -> [P, j1 - j0] block of R^T

# Columns of the k-dim sketch generated per block by the dense baseline. TRAK's BasicProjector
# defaults to 200; 1024 was the fastest of {200, 512, 1024} here (fewer, larger torch.mm calls)
# while keeping the block at P * 1024 * 4 B = 1 GiB for P = 262144.
DENSE_BLOCK = 1024
# Store rows upcast and scored per chunk by the score_topk baseline (65536 x 512 x 4 B = 128 MiB).
TOPK_CHUNK = 65536
# Input coordinates per index_add_ chunk in the sparse baseline: bounds its [C*s, B] temporary.
SPARSE_CHUNK = 16384


# ---------------------------------------------------------------------------------------------
# dense / linear: materialise the per-example gradient, project by column blocks of R
# ---------------------------------------------------------------------------------------------
def blocked_projection(G: torch.Tensor, k: int, block_fn: BlockFn, kb: int) -> torch.Tensor:
    """``y = G @ R^T / sqrt(k)`` with R^T generated ``kb`` columns at a time (TRAK's CPU path).
    G: [B, P] float32 -> [B, k] float32."""
    y = torch.empty(G.shape[0], k, dtype=G.dtype)
    for j0 in range(0, k, kb):
        j1 = min(k, j0 + kb)
        y[:, j0:j1] = G @ block_fn(j0, j1)
    return y.mul_(1.0 / math.sqrt(k))


class TorchRademacherBlocks:
    """Rademacher blocks of R^T from torch's CPU generator, regenerated on every call into one
    preallocated [P, kb] float32 buffer. ``random_(0, 2)`` then ``mul_(2).sub_(1)`` was the
    fastest torch way to fill it here (about 2x TRAK's ``bernoulli_(0.5)``)."""

    def __init__(self, P: int, kb: int, seed: int = 0) -> None:
        self.buf = torch.empty(P, kb, dtype=torch.float32)
        self.gen = torch.Generator().manual_seed(seed)
        self.seed = seed

    def __call__(self, j0: int, j1: int) -> torch.Tensor:
        b = self.buf[:, : j1 - j0]
        self.gen.manual_seed(self.seed * 100003 + j0)  # block j0 reproducible, as TRAK does
        return b.random_(0, 2, generator=self.gen).mul_(2.0).sub_(1.0)


def hash_blocks(seed: int, P: int, rows: int, col_offset: int = 0) -> BlockFn:
    """Blocks of the issl_fast hash matrix (rows j < ``rows``), for checking the baselines."""
    rt = torch.from_numpy(
        reference.random_matrix(seed, rows, col_offset, col_offset + P)
    ).to(torch.float32).T.contiguous()  # [P, rows], exactly +-1
    return lambda j0, j1: rt[:, j0:j1]


def dense_baseline(g: torch.Tensor, k: int, block_fn: BlockFn,
                   kb: int = DENSE_BLOCK) -> torch.Tensor:
    """g [B, P] (fp16/bf16 upcast to fp32 once per call: torch's fp16 CPU matmul is far slower
    than fp32, and one upcast of B x P is cheaper than upcasting inside every block)."""
    return blocked_projection(g.float(), k, block_fn, kb)


def linear_baseline(A: torch.Tensor, D: torch.Tensor, k: int, block_fn: BlockFn,
                    kb: int = DENSE_BLOCK) -> torch.Tensor:
    """Materialise ``G_b = sum_t D_b[t]^T A_b[t]`` ([B, d_out*d_in], index o*d_in+i), then project.
    fp16/bf16 inputs are upcast to fp32 first (small: B x T x d)."""
    B = A.shape[0]
    G = torch.einsum("bto,bti->boi", D.float(), A.float()).reshape(B, -1)
    return blocked_projection(G, k, block_fn, kb)


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
def kron_baseline(A: torch.Tensor, D: torch.Tensor, P_in: torch.Tensor,
                  P_out: torch.Tensor) -> torch.Tensor:
    """``U = A P_in^T; V = D P_out^T; y_b = vec(sum_t V_b[t] (x) U_b[t]) / sqrt(k_in k_out)``.
    P_in [k_in, d_in], P_out [k_out, d_out] unscaled +-1."""
    k_in, k_out = P_in.shape[0], P_out.shape[0]
    U = A.float() @ P_in.T  # [B, T, k_in]
    V = D.float() @ P_out.T  # [B, T, k_out]
    y = torch.einsum("bta,btc->bac", V, U).reshape(A.shape[0], -1)
    return y.mul_(1.0 / math.sqrt(k_in * k_out))


def torch_rademacher(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(rows, cols).random_(0, 2, generator=gen).mul_(2.0).sub_(1.0)


def kron_hash_matrices(seed: int, d_in: int, d_out: int, k_in: int, k_out: int):
    p_in, p_out = reference.kron_matrices(seed, d_in, d_out, k_in, k_out)
    return torch.from_numpy(p_in).float(), torch.from_numpy(p_out).float()


# ---------------------------------------------------------------------------------------------
# score_topk: chunked upcast + torch.mm + torch.topk + merge
# ---------------------------------------------------------------------------------------------
def _as_torch_rows(G, r0: int, r1: int) -> torch.Tensor:
    rows = G[r0:r1]
    if isinstance(rows, np.ndarray):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only memmap: "array is not writable"
            rows = torch.from_numpy(rows)
    return rows


def topk_baseline(Q: torch.Tensor, G, topk: int, chunk: int = TOPK_CHUNK):
    """Top-``topk`` of ``Q @ G^T`` per row, G [n, k] fp16/bf16 tensor or numpy (mem)map:
    upcast ``chunk`` rows into one reused fp32 buffer, ``torch.mm``, ``torch.topk`` per chunk,
    then merge the chunk's winners with the running best (cat + topk + gather)."""
    m, k = Q.shape
    n = G.shape[0]
    buf = torch.empty(min(chunk, n), k, dtype=torch.float32)
    best_v = torch.empty(m, 0)
    best_i = torch.empty(m, 0, dtype=torch.int64)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        c = buf[: r1 - r0]
        c.copy_(_as_torch_rows(G, r0, r1))
        v, i = torch.topk(Q @ c.T, min(topk, r1 - r0), dim=1)
        cat_v, cat_i = torch.cat([best_v, v], 1), torch.cat([best_i, i + r0], 1)
        best_v, j = torch.topk(cat_v, min(topk, cat_v.shape[1]), dim=1)
        best_i = cat_i.gather(1, j)
    return best_v, best_i
