"""Pure-PyTorch (+ numpy for the hash) version of every op: the oracle for tests, the baseline for
benchmarks.

Each function implements exactly the math of the compiled kernel of the same name, with the same
random matrix (hash version 1, see ``csrc/include/issl_fast/hash.h``), but materialises whatever is
convenient (per-example gradients, blocks of the random matrix, score chunks). It is written for
clarity, not speed, and never for production use on large inputs.

``accum`` selects the accumulation dtype (``torch.float32`` like the kernels, or ``torch.float64``
for a tighter oracle). Outputs are always returned in ``accum``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

HASH_VERSION = 1

_MASK = (1 << 64) - 1
_PHI = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

ROLES = {"dense": 0, "sparse": 1, "kron_in": 2, "kron_out": 3}
DISTS = {"rademacher": 0, "gaussian": 1}

# Columns of the random matrix generated per block: bounds the reference's memory to
# k * _COL_BLOCK floats whatever P is.
_COL_BLOCK = 8192
# Store rows scored per chunk in the reference top-k: bounds memory to m * _ROW_CHUNK.
_ROW_CHUNK = 65536


# ---------------------------------------------------------------------------------------------
# The hash (numpy uint64; array arithmetic wraps modulo 2^64 like C)
# ---------------------------------------------------------------------------------------------
def _mix_int(x: int) -> int:
    """splitmix64 finaliser on a Python int (scalar path, exact modulo 2^64)."""
    x &= _MASK
    x ^= x >> 30
    x = (x * _M1) & _MASK
    x ^= x >> 27
    x = (x * _M2) & _MASK
    x ^= x >> 31
    return x


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array."""
    x = np.asarray(x, dtype=np.uint64)
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(_M1)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(_M2)
    x = x ^ (x >> np.uint64(31))
    return x


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def stream_key(seed: int, role: str, dist: str = "rademacher") -> int:
    """Key of the random stream for (seed, role, dist): ``mix(mix(seed) + (stream+1) * PHI)``."""
    stream = ROLES[role] * 2 + DISTS[dist]
    return _mix_int(_mix_int(_check_seed(seed)) + (stream + 1) * _PHI)


def column_keys(key: int, columns: np.ndarray) -> np.ndarray:
    """``mix(key ^ (c * PHI))`` for each column index ``c`` (uint64 array)."""
    c = np.asarray(columns, dtype=np.uint64)
    return mix64(np.uint64(key) ^ (c * np.uint64(_PHI)))


def hash_words(col_keys: np.ndarray, words: np.ndarray) -> np.ndarray:
    """``mix(C + w * M2)``; broadcasts ``col_keys`` against ``words``."""
    w = np.asarray(words, dtype=np.uint64)
    return mix64(np.asarray(col_keys, dtype=np.uint64) + w * np.uint64(_M2))


def random_matrix(
    seed: int,
    rows: int,
    col_start: int,
    col_stop: int,
    *,
    role: str = "dense",
    dist: str = "rademacher",
) -> np.ndarray:
    """Unscaled entries ``R[j, c]`` for ``j < rows`` and ``col_start <= c < col_stop``, float64.

    Rademacher entries are exactly +-1; Gaussian entries are standard normal (Box-Muller).
    """
    key = stream_key(seed, role, dist)
    cols = np.arange(col_start, col_stop, dtype=np.uint64)
    ck = column_keys(key, cols)  # [C]
    if dist == "rademacher":
        n_words = (rows + 63) // 64
        words = hash_words(ck[None, :], np.arange(n_words, dtype=np.uint64)[:, None])  # [W, C]
        j = np.arange(rows, dtype=np.uint64)
        bits = (words[j >> np.uint64(6), :] >> (j & np.uint64(63))[:, None]) & np.uint64(1)
        return 1.0 - 2.0 * bits.astype(np.float64)
    if dist == "gaussian":
        h = hash_words(ck[None, :], np.arange(rows, dtype=np.uint64)[:, None])  # [rows, C]
        u1 = ((h >> np.uint64(40)) + np.uint64(1)).astype(np.float64) / 16777216.0
        u2 = ((h >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float64) / 16777216.0
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    raise ValueError(f"dist must be 'rademacher' or 'gaussian', got {dist!r}")


def sparse_buckets(
    seed: int, s: int, k: int, col_start: int, col_stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """Buckets ``[C, s]`` (int64) and signs ``[C, s]`` (+-1.0) of the sparse JL sketch."""
    key = stream_key(seed, "sparse")
    ck = column_keys(key, np.arange(col_start, col_stop, dtype=np.uint64))
    r = np.arange(s, dtype=np.uint64)
    h = hash_words(ck[:, None], r[None, :])  # [C, s]
    lo = (np.arange(s, dtype=np.int64) * k) // s
    hi = (np.arange(1, s + 1, dtype=np.int64) * k) // s
    width = (hi - lo).astype(np.uint64)
    off = ((h & np.uint64(0xFFFFFFFF)) * width[None, :]) >> np.uint64(32)
    buckets = lo[None, :] + off.astype(np.int64)
    signs = np.where((h >> np.uint64(63)) == 1, -1.0, 1.0)
    return buckets, signs


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------
def _as(x: torch.Tensor, accum: torch.dtype) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=accum)


def sketch_dense(
    g: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    dist: str = "rademacher",
    col_offset: int = 0,
    accum: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``y[b, j] = (1/sqrt(k)) sum_p R(seed, j, col_offset + p) g[b, p]``.  g: [B, P] -> [B, k]."""
    g = _as(g, accum)
    B, P = g.shape
    y = torch.zeros(B, k, dtype=accum)
    for c0 in range(0, P, _COL_BLOCK):
        c1 = min(P, c0 + _COL_BLOCK)
        r = random_matrix(seed, k, col_offset + c0, col_offset + c1, role="dense", dist=dist)
        y += g[:, c0:c1] @ torch.from_numpy(r).to(accum).T
    return y / math.sqrt(k)


def per_example_linear_grad(A: torch.Tensor, D: torch.Tensor, accum=torch.float32) -> torch.Tensor:
    """``G_b = sum_t D_b[t]^T A_b[t]`` flattened row-major: A [B,T,d_in], D [B,T,d_out] ->
    [B, d_out * d_in] (index ``o * d_in + i``)."""
    G = torch.einsum("bto,bti->boi", _as(D, accum), _as(A, accum))
    return G.reshape(G.shape[0], G.shape[1] * G.shape[2])


def sketch_linear(
    A: torch.Tensor,
    D: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    dist: str = "rademacher",
    col_offset: int = 0,
    accum: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``sketch_dense`` of the materialised per-example weight gradient ``vec(sum_t D^T A)``."""
    G = per_example_linear_grad(A, D, accum)
    return sketch_dense(G, k, seed=seed, dist=dist, col_offset=col_offset, accum=accum)


def sketch_sparse(
    g: torch.Tensor,
    k: int,
    *,
    s: int = 4,
    seed: int = 0,
    col_offset: int = 0,
    accum: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sparse JL: coordinate p adds ``sign * g[b, p] / sqrt(s)`` to each of its s buckets."""
    g = _as(g, accum)
    B, P = g.shape
    y = torch.zeros(B, k, dtype=accum)
    for c0 in range(0, P, _COL_BLOCK):
        c1 = min(P, c0 + _COL_BLOCK)
        buckets, signs = sparse_buckets(seed, s, k, col_offset + c0, col_offset + c1)
        contrib = g[:, c0:c1, None] * torch.from_numpy(signs).to(accum)[None]  # [B, C, s]
        y.index_add_(1, torch.from_numpy(buckets).reshape(-1), contrib.reshape(B, (c1 - c0) * s))
    return y / math.sqrt(s)


def kron_matrices(
    seed: int, d_in: int, d_out: int, k_in: int, k_out: int, dist: str = "rademacher"
) -> tuple[np.ndarray, np.ndarray]:
    """Unscaled ``P_in [k_in, d_in]`` and ``P_out [k_out, d_out]`` of ``sketch_kron``."""
    p_in = random_matrix(seed, k_in, 0, d_in, role="kron_in", dist=dist)
    p_out = random_matrix(seed, k_out, 0, d_out, role="kron_out", dist=dist)
    return p_in, p_out


def sketch_kron(
    A: torch.Tensor,
    D: torch.Tensor,
    k_in: int,
    k_out: int,
    *,
    seed: int = 0,
    dist: str = "rademacher",
    accum: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``y_b = vec(P_out G_b P_in^T) / sqrt(k_in k_out)`` with ``G_b = sum_t D_b[t]^T A_b[t]``,
    computed as ``sum_t (P_out D_b[t]) (x) (P_in A_b[t])``.  -> [B, k_out * k_in], index
    ``a * k_in + c``."""
    A, D = _as(A, accum), _as(D, accum)
    p_in, p_out = kron_matrices(seed, A.shape[2], D.shape[2], k_in, k_out, dist)
    U = A @ torch.from_numpy(p_in).to(accum).T  # [B, T, k_in]
    V = D @ torch.from_numpy(p_out).to(accum).T  # [B, T, k_out]
    y = torch.einsum("bta,btc->bac", V, U).reshape(A.shape[0], k_out * k_in)
    return y / math.sqrt(k_in * k_out)


def _merge(v: torch.Tensor, i: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the best ``topk`` per row by (value descending, index ascending)."""
    by_index = torch.sort(i, dim=1, stable=True).indices
    v, i = v.gather(1, by_index), i.gather(1, by_index)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :topk]
    return v.gather(1, order), i.gather(1, order)


def score_topk(
    Q: torch.Tensor,
    G: torch.Tensor | np.ndarray,
    topk: int,
    *,
    exclude: torch.Tensor | None = None,
    index_offset: int = 0,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    accum: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``topk`` of ``Q @ G.T`` per query row, streaming G in row chunks.

    Q [m, k]; G [n, k] (tensor or numpy array / memmap); exclude [m, e] int64 store ids to skip
    (``-1`` = none), in the id space of the returned indices (``index_offset`` included).
    ``init`` = (values, indices) [m, topk] of an earlier call (another shard) to merge into.
    Returns ``values [m, topk]`` (descending, ties by lower index) and
    ``indices [m, topk]`` int64 (``index_offset`` added); slots beyond n candidates hold ``-inf``
    and ``-1``. NaN scores are never selected.
    """
    Q = _as(Q, accum)
    m = Q.shape[0]
    n = G.shape[0]
    best_v = torch.full((m, 0), -math.inf, dtype=accum)
    best_i = torch.full((m, 0), -1, dtype=torch.int64)
    if init is not None:  # (its empty slots, and any NaN or index -1 in it, are no candidates)
        best_v, best_i = init[0].to(accum), init[1].to(torch.int64)
        kept = (best_i >= 0) & (best_v > -math.inf)  # (NaN fails the comparison)
        best_v = torch.where(kept, best_v, torch.full_like(best_v, -math.inf))
        best_i = torch.where(kept, best_i, torch.full_like(best_i, -1))
    for r0 in range(0, n, _ROW_CHUNK):
        r1 = min(n, r0 + _ROW_CHUNK)
        chunk = G[r0:r1]
        chunk = (
            torch.from_numpy(np.ascontiguousarray(chunk))
            if isinstance(chunk, np.ndarray)
            else chunk
        )
        s = Q @ _as(chunk, accum).T  # [m, c]
        idx = torch.arange(r0, r1, dtype=torch.int64).expand(m, -1) + index_offset
        s = torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s)
        valid = ~torch.isinf(s) | (s > 0)
        if exclude is not None:
            ex = torch.as_tensor(exclude).to(torch.int64)
            ex = ex[:, None] if ex.dim() == 1 else ex
            valid &= ~(idx[:, :, None] == ex[:, None, :]).any(-1)
        s = torch.where(valid, s, torch.full_like(s, -math.inf))
        idx = torch.where(valid, idx, torch.full_like(idx, -1))
        best_v, best_i = _merge(torch.cat([best_v, s], 1), torch.cat([best_i, idx], 1), topk)
    # Invalid slots (excluded / NaN / -inf) are reported as (-inf, -1) and sorted last.
    best_i = torch.where(torch.isinf(best_v) & (best_v < 0), torch.full_like(best_i, -1), best_i)
    if best_v.shape[1] < topk:
        pad = topk - best_v.shape[1]
        best_v = torch.cat([best_v, torch.full((m, pad), -math.inf, dtype=accum)], 1)
        best_i = torch.cat([best_i, torch.full((m, pad), -1, dtype=torch.int64)], 1)
    return best_v, best_i
