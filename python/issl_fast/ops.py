"""Public kernel API: input validation and backend dispatch (``cpu`` | ``cuda`` | ``reference``).

Every op accepts float32 / float16 / bfloat16 inputs, accumulates in float32 and returns float32.
The random matrices are pure functions of ``(seed, row, column)`` (hash version 1, shared with
:mod:`issl_fast.reference`), so results do not depend on the backend's tiling, the batch size or
the thread count beyond float rounding (Rademacher entries are bit-identical everywhere).

``backend="auto"`` picks ``cuda`` for CUDA tensors and ``cpu`` otherwise. There is no silent
fallback: asking for a backend this build lacks raises :class:`BackendUnavailableError`.

Bad arguments are refused before anything is written. An op that fails while it runs (a
``MemoryError`` for its scratch buffers) may leave ``out`` partly written: with
``accumulate=True``, recompute it rather than retry into it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Union

import numpy as np
import torch

from . import _backend, reference
from ._backend import _C
from ._cuda_ops import (
    _cuda_ops_compiled,
    _score_topk_cuda,
    _sketch_dense_cuda,
    _sketch_kron_cuda,
    _sketch_linear_cuda,
    _sketch_sparse_cuda,
)

Backend = Literal["auto", "cpu", "cuda", "reference"]
Dist = Literal["rademacher", "gaussian"]
Store = Union[torch.Tensor, np.ndarray]

_TORCH_DTYPES = _backend.TORCH_DTYPE_CODES
_NUMPY_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}
_DISTS = {"rademacher": 0, "gaussian": 1}
_BACKENDS = ("auto", "cpu", "cuda", "reference")


class BackendUnavailableError(RuntimeError):
    """The requested backend (or the one the inputs' device needs) is not in this build."""


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------
def _check_tensor(x: object, name: str, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.dtype not in _TORCH_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got {x.dtype} (shape {tuple(x.shape)})"
        )
    if x.layout != torch.strided:  # (sparse / mkldnn tensors have no row-major data to read)
        raise ValueError(f"{name} must be a dense (strided) tensor {shape_doc}, got layout "
                         f"{x.layout}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (row-major), got strides {x.stride()} for shape "
            f"{tuple(x.shape)}; call .contiguous() first"
        )
    if x.requires_grad:
        x = x.detach()
    return x


def _check_int(v: object, name: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if v < minimum or (maximum is not None and v > maximum):
        hi = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be >= {minimum}{hi}, got {v}")
    return v


_INT64_MAX = 2**63 - 1


def _check_columns(col_offset: int, P: int) -> None:
    """The kernels index columns with int64: the last column must fit."""
    if col_offset + P > _INT64_MAX:
        raise ValueError(f"col_offset + P must be <= 2**63 - 1, got col_offset={col_offset}, P={P}")


def _check_index_offset(index_offset: object, n: int) -> int:
    """A store part's first row id: the last one (``+ n - 1``) must fit int64."""
    offset = _check_int(index_offset, "index_offset", 0)
    if offset + n > _INT64_MAX:
        raise ValueError(
            f"index_offset + n must be <= 2**63 - 1, got index_offset={offset}, n={n}")
    return offset


def _check_seed(seed: object) -> int:
    return _check_int(seed, "seed", 0, 2**64 - 1)


def _check_dist(dist: object) -> int:
    if dist not in _DISTS:
        raise ValueError(f"dist must be 'rademacher' or 'gaussian', got {dist!r}")
    return _DISTS[dist]


# More OpenMP threads than any machine has (the bindings take a C int; OpenMP would try to start
# them all).
MAX_THREADS = 4096


def _threads(num_threads: int | None) -> int:
    if num_threads is None:
        return torch.get_num_threads()
    return _check_int(num_threads, "num_threads", 1, MAX_THREADS)


def _check_bool(v: object, name: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):  # (a comparison of numpy ints gives np.bool_)
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return bool(v)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share bytes (the kernels write ``out`` while they read),
    by address range: two storages may hold the same memory (tensors from one numpy buffer)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _resolve_backend(backend: str, device: torch.device, op: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    if backend == "auto":
        backend = "cuda" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not _cuda_ops_compiled():
            # No CUDA kernels in this build: say so, never fall back silently.
            info = _backend.build_info()
            raise BackendUnavailableError(
                f"{op}: no CUDA kernel for this op in this build (issl_fast.build_info(): "
                f"cuda_compiled={info['cuda_compiled']}, cuda_devices={info['cuda_devices']}). "
                "Move the tensors to the CPU, or use backend='reference'."
            )
    return backend


def _same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def _prepare_out(
    out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device, accumulate: bool,
    inputs: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """``out`` checked (or a new tensor): float32, ``shape``, contiguous, on ``device``, and
    sharing no memory with ``inputs``."""
    accumulate = _check_bool(accumulate, "accumulate")
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an out= tensor to add into")
        return torch.empty(shape, dtype=torch.float32, device=device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32, got {out.dtype}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but the inputs are on {device}")
    _check_disjoint("out", out, inputs)
    return out


def _check_disjoint(name: str, out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
    if any(_overlap(out, x) for x in inputs):
        raise ValueError(f"{name} shares memory with an input: the kernels write it while they "
                         "read the input; pass a separate tensor")


def _finish_reference(y: torch.Tensor, out: torch.Tensor | None, accumulate: bool) -> torch.Tensor:
    y = y.to(torch.float32)
    if out is None:
        return y
    if accumulate:
        out += y.to(out.device)
    else:
        out.copy_(y)
    return out


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------
def sketch_dense(
    g: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    dist: Dist = "rademacher",
    col_offset: int = 0,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    backend: Backend = "auto",
    num_threads: int | None = None,
) -> torch.Tensor:
    """Dense JL sketch ``y[b, j] = (1/sqrt(k)) sum_p R(seed, j, col_offset + p) g[b, p]``.

    g: [B, P] float32/float16/bfloat16, contiguous. Returns [B, k] float32 (``out`` if given;
    with ``accumulate`` the sketch is added to it). ``col_offset`` places g's columns inside a
    longer gradient, so sketches of column blocks sum to the sketch of the whole. The random
    matrix is never stored: memory is O(tile), not O(P k).
    """
    g = _check_tensor(g, "g", 2, "[B, P]")
    k = _check_int(k, "k", 1)
    seed, dist_code = _check_seed(seed), _check_dist(dist)
    col_offset = _check_int(col_offset, "col_offset", 0)
    be = _resolve_backend(backend, g.device, "sketch_dense")
    B, P = g.shape
    _check_columns(col_offset, P)
    given = out is not None
    out = _prepare_out(out, (B, k), g.device, accumulate, (g,))
    if be == "reference":
        y = reference.sketch_dense(g, k, seed=seed, dist=dist, col_offset=col_offset)
        return _finish_reference(y, out if given else None, accumulate)
    if be == "cuda":
        return _sketch_dense_cuda(g, k, seed, dist_code, col_offset, out, accumulate)
    _C.sketch_dense(
        g.data_ptr(),
        _TORCH_DTYPES[g.dtype],
        B,
        P,
        k,
        seed,
        dist_code,
        col_offset,
        out.data_ptr(),
        accumulate,
        _threads(num_threads),
    )
    return out


def _check_linear_pair(A: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    A = _check_tensor(A, "A", 3, "[B, T, d_in]")
    D = _check_tensor(D, "D", 3, "[B, T, d_out]")
    if A.shape[:2] != D.shape[:2]:
        raise ValueError(
            f"A [B, T, d_in] and D [B, T, d_out] must agree on B and T, got A {tuple(A.shape)} "
            f"and D {tuple(D.shape)}"
        )
    if A.dtype != D.dtype:
        raise TypeError(f"A and D must have the same dtype, got {A.dtype} and {D.dtype}")
    if A.shape[2] < 1 or D.shape[2] < 1:
        raise ValueError(f"d_in and d_out must be >= 1, got A {tuple(A.shape)}, D {tuple(D.shape)}")
    _same_device("A", A, "D", D)
    return A, D


def sketch_linear(
    A: torch.Tensor,
    D: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    dist: Dist = "rademacher",
    col_offset: int = 0,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    backend: Backend = "auto",
    num_threads: int | None = None,
) -> torch.Tensor:
    """Fused sketch of per-example linear-layer weight gradients.

    A: [B, T, d_in] layer inputs, D: [B, T, d_out] gradients w.r.t. the layer outputs (same
    dtype). Equals ``sketch_dense(vec(G))`` with ``G_b = sum_t D_b[t]^T A_b[t]`` flattened
    row-major (index ``o * d_in + i``), without materialising G. Append a column of ones to A to
    include the bias. Returns [B, k] float32.
    """
    A, D = _check_linear_pair(A, D)
    k = _check_int(k, "k", 1)
    seed, dist_code = _check_seed(seed), _check_dist(dist)
    col_offset = _check_int(col_offset, "col_offset", 0)
    be = _resolve_backend(backend, A.device, "sketch_linear")
    B, T, d_in = A.shape
    d_out = D.shape[2]
    _check_columns(col_offset, d_in * d_out)
    given = out is not None
    out = _prepare_out(out, (B, k), A.device, accumulate, (A, D))
    if be == "reference":
        y = reference.sketch_linear(A, D, k, seed=seed, dist=dist, col_offset=col_offset)
        return _finish_reference(y, out if given else None, accumulate)
    if be == "cuda":
        return _sketch_linear_cuda(A, D, k, seed, dist_code, col_offset, out, accumulate)
    _C.sketch_linear(
        A.data_ptr(),
        D.data_ptr(),
        _TORCH_DTYPES[A.dtype],
        B,
        T,
        d_in,
        d_out,
        k,
        seed,
        dist_code,
        col_offset,
        out.data_ptr(),
        accumulate,
        _threads(num_threads),
    )
    return out


def sketch_sparse(
    g: torch.Tensor,
    k: int,
    *,
    s: int = 4,
    seed: int = 0,
    col_offset: int = 0,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    backend: Backend = "auto",
    num_threads: int | None = None,
) -> torch.Tensor:
    """Sparse JL sketch (CountSketch for ``s=1``): each input coordinate is added, with a random
    sign and weight ``1/sqrt(s)``, to one bucket in each of ``s`` blocks of the k outputs.

    g: [B, P]. Cost O(B P s) instead of O(B P k). Deterministic (no float atomics).
    Returns [B, k] float32. Needs ``1 <= s <= k < 2**31``.
    """
    g = _check_tensor(g, "g", 2, "[B, P]")
    k = _check_int(k, "k", 1, 2**31 - 1)
    s = _check_int(s, "s", 1, k)
    seed = _check_seed(seed)
    col_offset = _check_int(col_offset, "col_offset", 0)
    be = _resolve_backend(backend, g.device, "sketch_sparse")
    B, P = g.shape
    _check_columns(col_offset, P)
    given = out is not None
    out = _prepare_out(out, (B, k), g.device, accumulate, (g,))
    if be == "reference":
        y = reference.sketch_sparse(g, k, s=s, seed=seed, col_offset=col_offset)
        return _finish_reference(y, out if given else None, accumulate)
    if be == "cuda":
        return _sketch_sparse_cuda(g, k, s, seed, col_offset, out, accumulate)
    _C.sketch_sparse(
        g.data_ptr(),
        _TORCH_DTYPES[g.dtype],
        B,
        P,
        k,
        s,
        seed,
        col_offset,
        out.data_ptr(),
        accumulate,
        _threads(num_threads),
    )
    return out


def sketch_kron(
    A: torch.Tensor,
    D: torch.Tensor,
    k_in: int,
    k_out: int,
    *,
    seed: int = 0,
    dist: Dist = "rademacher",
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    backend: Backend = "auto",
    num_threads: int | None = None,
) -> torch.Tensor:
    """Factored (LoGra-style) sketch ``y_b = vec(P_out G_b P_in^T)`` of per-example linear-layer
    gradients, computed as ``sum_t (P_out D_b[t]) (x) (P_in A_b[t])`` without materialising G.

    A: [B, T, d_in], D: [B, T, d_out]. ``P_in = R_in / sqrt(k_in)`` [k_in, d_in] and
    ``P_out = R_out / sqrt(k_out)`` [k_out, d_out] come from the hash (roles kron_in/kron_out).
    Returns [B, k_out * k_in] float32, index ``a * k_in + c``.
    """
    A, D = _check_linear_pair(A, D)
    k_in = _check_int(k_in, "k_in", 1)
    k_out = _check_int(k_out, "k_out", 1)
    seed, dist_code = _check_seed(seed), _check_dist(dist)
    be = _resolve_backend(backend, A.device, "sketch_kron")
    B, T, d_in = A.shape
    d_out = D.shape[2]
    given = out is not None
    out = _prepare_out(out, (B, k_out * k_in), A.device, accumulate, (A, D))
    if be == "reference":
        y = reference.sketch_kron(A, D, k_in, k_out, seed=seed, dist=dist)
        return _finish_reference(y, out if given else None, accumulate)
    if be == "cuda":
        return _sketch_kron_cuda(A, D, k_in, k_out, seed, dist_code, out, accumulate)
    _C.sketch_kron(
        A.data_ptr(),
        D.data_ptr(),
        _TORCH_DTYPES[A.dtype],
        B,
        T,
        d_in,
        d_out,
        k_in,
        k_out,
        seed,
        dist_code,
        out.data_ptr(),
        accumulate,
        _threads(num_threads),
    )
    return out


def _store_pointer(G: Store) -> tuple[int, int, tuple[int, ...], torch.device]:
    """(pointer, dtype code, shape, device) of a store given as a tensor or a numpy array/memmap."""
    if isinstance(G, np.ndarray):
        if G.dtype not in _NUMPY_DTYPES:
            raise TypeError(
                f"G as a numpy array must be float32 or float16, got {G.dtype} (shape {G.shape}); "
                "for a bfloat16 store pass torch.from_numpy(a).view(torch.bfloat16)"
            )
        if G.ndim != 2:
            raise ValueError(f"G must be 2-D [n, k], got shape {G.shape}")
        if not G.flags.c_contiguous:
            raise ValueError(f"G must be C-contiguous, got strides {G.strides} for shape {G.shape}")
        ptr = G.__array_interface__["data"][0] if G.size else 0
        return ptr, _NUMPY_DTYPES[G.dtype], tuple(G.shape), torch.device("cpu")
    G = _check_tensor(G, "G", 2, "[n, k]")
    return G.data_ptr(), _TORCH_DTYPES[G.dtype], tuple(G.shape), G.device


def _check_exclude(exclude: object, m: int) -> torch.Tensor | None:
    if exclude is None:
        return None
    ex = torch.as_tensor(exclude)
    if ex.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"exclude must hold integer ids, got {ex.dtype}")
    if ex.dim() not in (1, 2) or ex.shape[0] != m:
        raise ValueError(f"exclude must be [m] or [m, e] with m={m}, got shape {tuple(ex.shape)}")
    if ex.dim() == 1:
        ex = ex[:, None]
    return ex.to(device="cpu", dtype=torch.int64).contiguous()


def score_topk(
    Q: torch.Tensor,
    G: Store,
    topk: int,
    *,
    exclude: torch.Tensor | np.ndarray | None = None,
    index_offset: int = 0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    accumulate: bool = False,
    backend: Backend = "auto",
    num_threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Streaming top-k of the scores ``Q @ G.T`` for each query row, in one pass over G.

    Q: [m, k] float32, or bfloat16 (scored exactly as its float32 value; on a GPU with a
    bfloat16 store that takes one tensor-core pass instead of three). G: [n, k] store, a
    float32/float16/bfloat16 tensor or a float32/float16 numpy array (a ``numpy.memmap`` is
    read tile by tile, never loaded whole; memory is independent of n). ``exclude``: [m] or
    [m, e] ids never returned for a query (-1 = unused), in the id space of the result.
    Returns ``values [m, topk]`` float32 descending (ties broken by the lower index) and
    ``indices [m, topk]`` int64 (row + ``index_offset``); slots beyond the available
    candidates are ``(-inf, -1)``. NaN and -inf scores are never selected. With
    ``out=(values, indices)`` and ``accumulate=True``, the result of an earlier call (e.g.
    another shard, with its own ``index_offset``) is merged in.
    """
    if not isinstance(Q, torch.Tensor):
        raise TypeError(f"Q must be a torch.Tensor [m, k], got {type(Q).__name__}")
    if Q.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(
            f"Q must be float32 or bfloat16 (precondition queries in float32), got {Q.dtype}"
        )
    query_bf16 = Q.dtype == torch.bfloat16
    Q = _check_tensor(Q, "Q", 2, "[m, k]")
    if query_bf16:
        Q = Q.float()  # exact: every kernel scores the float32 value
    gptr, gcode, gshape, gdev = _store_pointer(G)
    m, k = Q.shape
    n = gshape[0]
    if gshape[1] != k:
        raise ValueError(f"Q is [m, k] = {tuple(Q.shape)} but G is [n, k] = {gshape}: k differs")
    if k < 1:
        raise ValueError(f"k must be >= 1, got Q shape {tuple(Q.shape)}")
    topk = _check_int(topk, "topk", 1)
    index_offset = _check_index_offset(index_offset, n)
    if not (Q.device.type == "cuda" and gdev.type == "cpu"):  # CUDA streams a CPU store
        _same_device("Q", Q, "G", torch.empty(0, device=gdev))
    ex = _check_exclude(exclude, m)
    accumulate = _check_bool(accumulate, "accumulate")
    if out is not None and isinstance(out, tuple) and len(out) == 2:
        stores = (G,) if isinstance(G, torch.Tensor) else ()
        for name, t in zip(("values", "indices"), out):
            if isinstance(t, torch.Tensor):
                _check_disjoint(f"out {name}", t, (Q, *stores))
    be = _resolve_backend(backend, Q.device, "score_topk")
    if be == "cuda":
        return _score_topk_cuda(
            Q, G, gptr, gcode, n, gdev, topk, ex, index_offset, out, accumulate, query_bf16
        )
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out=(values, indices) to merge into")
        values = torch.empty(m, topk, dtype=torch.float32)
        indices = torch.empty(m, topk, dtype=torch.int64)
    else:
        values, indices = out
        for name, t, dt in (("values", values, torch.float32), ("indices", indices, torch.int64)):
            if not isinstance(t, torch.Tensor) or t.dtype != dt or tuple(t.shape) != (m, topk):
                raise ValueError(f"out {name} must be a {dt} tensor of shape {(m, topk)}")
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"out {name} must be a contiguous CPU tensor")
    if be == "reference":
        init = (values, indices) if accumulate else None
        v, i = reference.score_topk(Q, G, topk, exclude=ex, index_offset=index_offset, init=init)
        values.copy_(v)
        indices.copy_(i)
        return values, indices
    _C.score_topk(
        Q.data_ptr(),
        m,
        gptr,
        gcode,
        n,
        k,
        topk,
        ex.data_ptr() if ex is not None else 0,
        ex.shape[1] if ex is not None else 0,
        index_offset,
        values.data_ptr(),
        indices.data_ptr(),
        accumulate,
        _threads(num_threads),
    )
    return values, indices


def score_topk_parts(
    Q: torch.Tensor,
    parts: Iterable[tuple[Store, int]],
    topk: int,
    *,
    exclude: torch.Tensor | np.ndarray | None = None,
    num_threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_topk` over a store in parts ``(G_part, index_offset)`` (e.g. its shards),
    merged into CPU ``(values, indices)``: the same result as one call over the rows joined. On
    the CPU the queries, ``exclude`` and the result are checked by the first part's call only,
    not per part (a store of many small shards spent more time in the per-call checks than in
    the kernel); on a GPU every part goes through :func:`score_topk`.
    """
    topk = _check_int(topk, "topk", 1)
    m = Q.shape[0] if isinstance(Q, torch.Tensor) and Q.dim() == 2 else 0
    values = torch.full((m, topk), -torch.inf, dtype=torch.float32)
    indices = torch.full((m, topk), -1, dtype=torch.int64)
    checked: tuple[torch.Tensor, torch.Tensor | None, int] | None = None
    for i, (G, offset) in enumerate(parts):
        if checked is None or not isinstance(G, (np.ndarray, torch.Tensor)):
            score_topk(Q, G, topk, exclude=exclude, index_offset=offset, out=(values, indices),
                       accumulate=i > 0, num_threads=num_threads)
            if Q.device.type == "cpu":  # (valid: that call checked them)
                q = Q.float() if Q.dtype == torch.bfloat16 else Q
                checked = (q.contiguous(), _check_exclude(exclude, m), _threads(num_threads))
            continue
        q, ex, threads = checked
        gptr, gcode, gshape, gdev = _store_pointer(G)
        if gshape[1] != q.shape[1] or gdev.type != "cpu":
            raise ValueError(f"a part of the store is {gshape} on {gdev}, the queries "
                             f"{tuple(q.shape)} on the CPU")
        offset = _check_index_offset(offset, gshape[0])
        _C.score_topk(q.data_ptr(), m, gptr, gcode, gshape[0], q.shape[1], topk,
                      ex.data_ptr() if ex is not None else 0, ex.shape[1] if ex is not None else 0,
                      offset, values.data_ptr(), indices.data_ptr(), True, threads)
    return values, indices
