"""CUDA dispatch of the ops (private; :mod:`issl_fast.ops` validates and calls in here).

Python allocates (outputs, workspaces) with torch on the tensors' device; the compiled kernels only
queue work on torch's current stream of that device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Union, cast

import numpy as np
import torch

from ._backend import _C
from ._backend import TORCH_DTYPE_CODES as _TORCH_DTYPES

Store = Union[torch.Tensor, np.ndarray]

# ---------------------------------------------------------------------------------------------
# Kernel family of the CUDA ops: 0 = auto (tensor cores where the result is exact), 1 = float32
# SIMT, 2 = tensor cores. Tests and benchmarks compare the families through issl_fast._C.
_CUDA_ALGO = 0
# Bytes of a CPU-resident store copied to the GPU per step (two steps in flight): large enough to
# amortise the launches and the final merge of a step, small enough to double-buffer cheaply.
_CUDA_STREAM_CHUNK_BYTES = 256 << 20
_STORE_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


def _cuda_ops_compiled() -> bool:
    return hasattr(_C, "sketch_dense_cuda")


# ---------------------------------------------------------------------------------------------
# Kernel variants (cuda_ops.h): kernels chosen over the portable ones where the hardware has what
# they need. The default set holds those that passed the cuda tests on a GPU and beat what they
# replace there; switching one off runs the portable kernel (what other GPUs run), so one GPU can
# test both. The others are experimental: compiled and host-tested, not yet validated on a GPU,
# so off by default. ISSL_FAST_CUDA_VARIANTS sets the mask when the package is imported (see
# parse_variants_env); bench/gpu/run.sh runs test passes with "none" and "all", and its benchmarks
# compare each variant with the kernel it replaces through variants().
VARIANTS_ENV = "ISSL_FAST_CUDA_VARIANTS"


def variant_names() -> tuple[str, ...]:
    """Every kernel variant this build has (empty without CUDA)."""
    return tuple(sorted(getattr(_C, "CUDA_VARIANTS", {})))


def _variant_mask(names: Iterable[str]) -> int:
    flags = getattr(_C, "CUDA_VARIANTS", {})
    mask = 0
    for name in names:
        if name not in flags:
            raise ValueError(
                f"unknown CUDA kernel variant {name!r}; this build has "
                f"{sorted(flags) or 'none (no CUDA kernels)'}"
            )
        mask |= int(flags[name])
    return mask


def _names_of(mask: int) -> tuple[str, ...]:
    return tuple(n for n in variant_names() if mask & int(_C.CUDA_VARIANTS[n]))


def default_variants() -> tuple[str, ...]:
    """The variants on unless switched off: validated on a GPU and faster there."""
    return _names_of(int(getattr(_C, "CUDA_VARIANTS_DEFAULT", 0)))


def experimental_variants() -> tuple[str, ...]:
    """The variants not yet validated on a GPU (off unless switched on)."""
    default = default_variants()
    return tuple(n for n in variant_names() if n not in default)


def enabled_variants() -> tuple[str, ...]:
    """The variants switched on in this process."""
    return _names_of(int(_C.cuda_variants())) if _cuda_ops_compiled() else ()


def set_variants(names: Iterable[str]) -> None:
    """Switch on exactly ``names`` (process-wide; the ops read it when they plan a call)."""
    mask = _variant_mask(list(names))
    if _cuda_ops_compiled():
        _C.set_cuda_variants(mask)


@contextmanager
def variants(names: Iterable[str]) -> Iterator[None]:
    """Run a block with exactly ``names`` switched on, restoring the previous set after it. The
    switch is process-wide: calls from other threads during the block see it too."""
    before = enabled_variants()
    set_variants(names)
    try:
        yield
    finally:
        set_variants(before)


def variant_launches(name: str) -> int:
    """How many times the kernel of variant ``name`` was launched in this process."""
    mask = _variant_mask([name])
    return int(_C.cuda_variant_launches(mask)) if _cuda_ops_compiled() else 0


def parse_variants_env(value: str) -> tuple[str, ...]:
    """A comma-separated list -> the variant names (validated). Items apply in order, starting
    from the default set: ``all``, ``none`` and ``default`` replace the set, ``+name`` adds,
    ``-name`` removes, and a bare ``name`` adds it to an empty set when it comes first (so
    ``"kron_fused"`` means that variant alone, ``"-score_tma"`` the default set without it)."""
    current = list(default_variants())
    items = [t.strip().lower() for t in value.split(",") if t.strip()]
    for pos, item in enumerate(items):
        if item in ("all", "none", "default"):
            current = {"all": list(variant_names()), "none": [],
                       "default": list(default_variants())}[item]
            continue
        sign, name = (item[0], item[1:].strip()) if item[0] in "+-" else ("", item)
        _variant_mask([name])
        if sign == "" and pos == 0:
            current = []
        if sign == "-":
            current = [n for n in current if n != name]
        elif name not in current:
            current.append(name)
    return tuple(n for n in variant_names() if n in current)


if os.environ.get(VARIANTS_ENV) is not None:
    try:
        set_variants(parse_variants_env(os.environ[VARIANTS_ENV]))
    except ValueError as exc:
        raise ValueError(f"environment variable {VARIANTS_ENV}: {exc}") from None


def _cuda_launch(device: torch.device) -> tuple[int, int]:
    """(current stream handle, multiprocessor count) of a CUDA device."""
    stream = torch.cuda.current_stream(device).cuda_stream
    return stream, torch.cuda.get_device_properties(device).multi_processor_count


def _cuda_workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)


def _sketch_dense_cuda(
    g: torch.Tensor,
    k: int,
    seed: int,
    dist: int,
    col_offset: int,
    out: torch.Tensor,
    accumulate: bool,
) -> torch.Tensor:
    B, P = g.shape
    dt = _TORCH_DTYPES[g.dtype]
    with torch.cuda.device(g.device):
        stream, sms = _cuda_launch(g.device)
        nbytes = _C.sketch_dense_cuda_workspace(dt, B, P, k, dist, _CUDA_ALGO, sms)
        ws = _cuda_workspace(nbytes, g.device)
        _C.sketch_dense_cuda(
            g.data_ptr(),
            dt,
            B,
            P,
            k,
            seed,
            dist,
            col_offset,
            out.data_ptr(),
            accumulate,
            ws.data_ptr(),
            ws.numel(),
            sms,
            _CUDA_ALGO,
            stream,
        )
    return out


def _sketch_linear_cuda(
    A: torch.Tensor,
    D: torch.Tensor,
    k: int,
    seed: int,
    dist: int,
    col_offset: int,
    out: torch.Tensor,
    accumulate: bool,
) -> torch.Tensor:
    B, T, d_in = A.shape
    d_out = D.shape[2]
    dt = _TORCH_DTYPES[A.dtype]
    with torch.cuda.device(A.device):
        stream, sms = _cuda_launch(A.device)
        nbytes = _C.sketch_linear_cuda_workspace(dt, B, T, d_in, d_out, k, dist, _CUDA_ALGO, sms)
        ws = _cuda_workspace(nbytes, A.device)
        _C.sketch_linear_cuda(
            A.data_ptr(),
            D.data_ptr(),
            dt,
            B,
            T,
            d_in,
            d_out,
            k,
            seed,
            dist,
            col_offset,
            out.data_ptr(),
            accumulate,
            ws.data_ptr(),
            ws.numel(),
            sms,
            _CUDA_ALGO,
            stream,
        )
    return out


def _sketch_sparse_cuda(
    g: torch.Tensor, k: int, s: int, seed: int, col_offset: int, out: torch.Tensor, accumulate: bool
) -> torch.Tensor:
    B, P = g.shape
    with torch.cuda.device(g.device):
        stream, sms = _cuda_launch(g.device)
        ws = _cuda_workspace(_C.sketch_sparse_cuda_workspace(B, P, k, s, sms), g.device)
        _C.sketch_sparse_cuda(
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
            ws.data_ptr(),
            ws.numel(),
            sms,
            stream,
        )
    return out


def _sketch_kron_cuda(
    A: torch.Tensor,
    D: torch.Tensor,
    k_in: int,
    k_out: int,
    seed: int,
    dist: int,
    out: torch.Tensor,
    accumulate: bool,
) -> torch.Tensor:
    B, T, d_in = A.shape
    d_out = D.shape[2]
    dt = _TORCH_DTYPES[A.dtype]
    with torch.cuda.device(A.device):
        stream, sms = _cuda_launch(A.device)
        nbytes = _C.sketch_kron_cuda_workspace(
            dt, B, T, d_in, d_out, k_in, k_out, dist, _CUDA_ALGO, sms
        )
        ws = _cuda_workspace(nbytes, A.device)
        _C.sketch_kron_cuda(
            A.data_ptr(),
            D.data_ptr(),
            dt,
            B,
            T,
            d_in,
            d_out,
            k_in,
            k_out,
            seed,
            dist,
            out.data_ptr(),
            accumulate,
            ws.data_ptr(),
            ws.numel(),
            sms,
            _CUDA_ALGO,
            stream,
        )
    return out


def _sorted_topk(v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An earlier result as the CUDA merge needs it: invalid slots (index < 0, NaN or -inf) made
    (-inf, -1), rows sorted by (value desc, index asc), empty slots last."""
    bad = ~((i >= 0) & (v > -math.inf))
    v = torch.where(bad, torch.full_like(v, -math.inf), v)
    i = torch.where(bad, torch.full_like(i, -1), i)
    by_index = torch.sort(i, dim=1, stable=True).indices
    v, i = v.gather(1, by_index), i.gather(1, by_index)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices
    return v.gather(1, order), i.gather(1, order)


def _score_topk_cuda(
    Q: torch.Tensor,
    G: Store,
    gptr: int,
    gcode: int,
    n: int,
    gdev: torch.device,
    topk: int,
    ex: torch.Tensor | None,
    index_offset: int,
    out: tuple[torch.Tensor, torch.Tensor] | None,
    accumulate: bool,
    query_bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """score_topk with Q on a GPU; G on the same GPU, or on the CPU (a tensor, pinned or not, or a
    numpy array / memmap), streamed to the GPU in double-buffered steps. ``out`` may live on
    Q's device or on the CPU; the result is returned on out's device (Q's when out is None)."""
    dev = Q.device
    m, k = Q.shape
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out=(values, indices) to merge into")
        values = torch.empty(m, topk, dtype=torch.float32, device=dev)
        indices = torch.empty(m, topk, dtype=torch.int64, device=dev)
    else:
        values, indices = out
        for name, t, dt in (("values", values, torch.float32), ("indices", indices, torch.int64)):
            if not isinstance(t, torch.Tensor) or t.dtype != dt or tuple(t.shape) != (m, topk):
                raise ValueError(f"out {name} must be a {dt} tensor of shape {(m, topk)}")
            if not t.is_contiguous() or t.device not in (dev, torch.device("cpu")):
                raise ValueError(f"out {name} must be a contiguous tensor on {dev} or the CPU")
    on_dev = values.device == dev and indices.device == dev
    dv = values if on_dev else torch.empty(m, topk, dtype=torch.float32, device=dev)
    di = indices if on_dev else torch.empty(m, topk, dtype=torch.int64, device=dev)
    if accumulate:
        v, i = _sorted_topk(values.to(dev), indices.to(dev))
        dv.copy_(v)
        di.copy_(i)
    exd = ex.to(dev) if ex is not None else None
    ex_ptr, e = (exd.data_ptr(), exd.shape[1]) if exd is not None else (0, 0)
    with torch.cuda.device(dev):
        stream, sms = _cuda_launch(dev)
        if m == 0:
            pass
        elif gdev.type == "cuda":
            nbytes = _C.score_topk_cuda_workspace(
                m, gptr, gcode, n, k, topk, accumulate, sms, _CUDA_ALGO
            )
            ws = _cuda_workspace(nbytes, dev)
            _C.score_topk_cuda(
                Q.data_ptr(),
                m,
                gptr,
                gcode,
                n,
                k,
                topk,
                ex_ptr,
                e,
                index_offset,
                dv.data_ptr(),
                di.data_ptr(),
                accumulate,
                ws.data_ptr(),
                ws.numel(),
                sms,
                _CUDA_ALGO,
                stream,
                query_bf16,
            )
        else:
            _score_topk_cuda_streamed(
                Q, G, gcode, n, topk, ex_ptr, e, index_offset, dv, di, accumulate, stream, sms,
                query_bf16,
            )
    if not on_dev:
        values.copy_(dv)
        indices.copy_(di)
    return values, indices


def _score_topk_cuda_streamed(
    Q: torch.Tensor,
    G: Store,
    gcode: int,
    n: int,
    topk: int,
    ex_ptr: int,
    e: int,
    index_offset: int,
    dv: torch.Tensor,
    di: torch.Tensor,
    accumulate: bool,
    stream: int,
    sms: int,
    query_bf16: bool,
) -> None:
    """A CPU store through the GPU: step c copies rows into a pinned staging buffer (skipped for a
    pinned tensor), then to device buffer c % 2 on a side stream, while the kernel of step c - 1
    runs on the current stream; events order the reuse of both buffers. Each step merges its rows
    into (dv, di) with its own index offset, like a shard."""
    dev = Q.device
    m, k = Q.shape
    dtype = _STORE_DTYPES[gcode]
    if n == 0:
        _C.score_topk_cuda(
            Q.data_ptr(),
            m,
            0,
            gcode,
            0,
            k,
            topk,
            ex_ptr,
            e,
            index_offset,
            dv.data_ptr(),
            di.data_ptr(),
            accumulate,
            0,
            0,
            sms,
            _CUDA_ALGO,
            stream,
            query_bf16,
        )
        return
    rows = max(1, min(n, _CUDA_STREAM_CHUNK_BYTES // (k * dtype.itemsize)))
    pinned_src = isinstance(G, torch.Tensor) and G.is_pinned()
    staging = (
        []
        if pinned_src
        else [torch.empty((rows, k), dtype=dtype, pin_memory=True) for _ in range(2)]
    )
    bufs = [torch.empty((rows, k), dtype=dtype, device=dev) for _ in range(2)]
    main = torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(dev)
    # bufs came from the caching allocator on `main`: their memory may still be in use by work
    # queued there before this call (a block freed and reused in stream order). The side stream
    # writes them, so it must start after that work.
    side.wait_stream(main)
    copied = [torch.cuda.Event() for _ in range(2)]
    consumed = [torch.cuda.Event() for _ in range(2)]
    nbytes = _C.score_topk_cuda_workspace(
        m, bufs[0].data_ptr(), gcode, rows, k, topk, True, sms, _CUDA_ALGO
    )
    ws = _cuda_workspace(nbytes, dev)
    for c, r0 in enumerate(range(0, n, rows)):
        s, r = c % 2, min(rows, n - r0)
        if pinned_src:
            src = cast(torch.Tensor, G)[r0 : r0 + r]
        else:
            if c >= 2:
                copied[s].synchronize()  # the copy out of staging[s] (step c - 2) is done
            src = staging[s][:r]
            if isinstance(G, torch.Tensor):
                src.copy_(G[r0 : r0 + r])
            else:
                np.copyto(src.numpy(), G[r0 : r0 + r])
        if c >= 2:
            side.wait_event(consumed[s])  # the kernel of step c - 2 has read bufs[s]
        with torch.cuda.stream(side):
            bufs[s][:r].copy_(src, non_blocking=True)
            copied[s].record(side)
        main.wait_event(copied[s])
        _C.score_topk_cuda(
            Q.data_ptr(),
            m,
            bufs[s].data_ptr(),
            gcode,
            r,
            k,
            topk,
            ex_ptr,
            e,
            index_offset + r0,
            dv.data_ptr(),
            di.data_ptr(),
            accumulate or c > 0,
            ws.data_ptr(),
            ws.numel(),
            sms,
            _CUDA_ALGO,
            stream,
            query_bf16,
        )
        consumed[s].record(main)
