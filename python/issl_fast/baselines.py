"""The pure-PyTorch baselines: what a competent PyTorch user writes today for each op.

They are what ``issl-fast bench`` (:mod:`.benchmark`) and the pytest-benchmark suite in
``bench/`` time the kernels against. Every sketch baseline takes its random matrix from a
pluggable source: the benchmarks first run it with the issl_fast hash matrix (and check it equals
the reference: same math, no shortcut), then time it with torch's own RNG, which is what users
do (and is faster than reproducing our hash).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np
import torch

BlockFn = Callable[[int, int], torch.Tensor]  # (j0, j1) -> [P, j1 - j0] block of R^T

# Columns of the k-dim sketch generated per block by the dense baseline. TRAK's BasicProjector
# defaults to 200; 1024 was the fastest of {200, 512, 1024} here (fewer, larger torch.mm calls)
# while keeping the block at P * 1024 * 4 B = 1 GiB for P = 262144.
DENSE_BLOCK = 1024
# Store rows upcast and scored per chunk by the score_topk baseline (65536 x 512 x 4 B = 128 MiB).
TOPK_CHUNK = 65536


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
    signs = torch.empty(rows, cols, dtype=torch.float32).random_(0, 2, generator=gen)
    return signs.mul_(2.0).sub_(1.0)


def _as_torch_rows(G: Any, r0: int, r1: int) -> torch.Tensor:
    rows = G[r0:r1]
    if isinstance(rows, np.ndarray):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only memmap: "array is not writable"
            rows = torch.from_numpy(rows)
    return rows


def topk_baseline(Q: torch.Tensor, G: Any, topk: int, chunk: int = TOPK_CHUNK
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``topk`` of ``Q @ G^T`` per row, G [n, k] fp16/bf16 tensor or numpy (mem)map:
    upcast ``chunk`` rows into one reused fp32 buffer, ``torch.mm``, ``torch.topk`` per chunk,
    then merge the chunk's winners with the running best (cat + topk + gather)."""
    m, k = Q.shape
    n = G.shape[0]
    buf = torch.empty(min(chunk, n), k, dtype=torch.float32)
    best_v = torch.empty(m, 0, dtype=torch.float32)
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
