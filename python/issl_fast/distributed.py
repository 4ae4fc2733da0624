"""Scale-out over ``torch.distributed`` ranks (launched with ``torchrun``).

With a process group of W > 1 ranks initialised, :class:`~issl_fast.InfluenceSSL` splits its work
(every rank runs the same script with the same encoder weights, data and queries):

- ``featurize``: rank r featurises batches r, r + W, r + 2W, ... of the data stream into its own
  part store, ``<path>/part-<r>-of-<W>/`` (resumable on its own); rank 0 then writes the store's
  manifest listing every part's shards (:meth:`.GradientStore.from_parts`; nothing is copied),
  so the result opens like any store, in one process or in many. A ``DataLoader`` is re-made
  per rank over its own batches (:func:`rank_batches`), so no rank loads another's images.
- ``fit``: each rank accumulates the curvature sums over its range of the store's rows
  (:func:`row_range`); they are summed over the ranks (:func:`all_reduce_sum`), so every rank
  holds the same solver.
- ``score``, ``self_influence``, ``neighbours`` (and so ``find_duplicates`` / ``find_outliers``):
  each rank scans its range of rows (or of queries); the results are gathered and merged into
  the same answer on every rank.

Collectives run on the CPU with gloo and on the rank's current GPU with nccl (call
``torch.cuda.set_device`` first, as torchrun scripts do). A Python exception on one rank is
sent to the others (:func:`together`), so that no rank waits forever in a collective for a rank
that failed: every rank raises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from .featurize import iterate_batches


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def row_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``(start, stop)`` of ``n`` rows split over ``size``
    ranks (the sizes differ by at most one)."""
    return n * rank // size, n * (rank + 1) // size


def _comm_device() -> torch.device:
    # nccl moves only CUDA tensors; gloo (and the others) CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks (a new tensor, on ``t``'s device)."""
    x = t.detach().to(_comm_device(), copy=True).contiguous()
    dist.all_reduce(x)
    return x.to(t.device)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every rank (same shape and dtype on every rank)."""
    x = t.detach().to(_comm_device(), copy=True).contiguous()
    dist.broadcast(x, src)
    return x.to(t.device)


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on every rank), in rank order, on ``t``'s
    device."""
    x = t.detach().to(_comm_device()).contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return [o.to(t.device) for o in out]


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """The ``[n, ...]`` array whose rows :func:`row_range` split over the ranks, from each
    rank's ``local`` block, on every rank."""
    rank, size = world()
    start, stop = row_range(n, rank, size)
    if local.shape[0] != stop - start:
        raise ValueError(f"rank {rank} holds rows [{start}, {stop}) of {n}, got "
                         f"{local.shape[0]} rows")
    counts = [row_range(n, r, size)[1] - row_range(n, r, size)[0] for r in range(size)]
    # all_gather moves equal shapes: every block padded to the largest share
    padded = np.zeros((max(counts), *local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local
    blocks = all_gather(torch.from_numpy(padded))
    return np.concatenate([b.numpy()[:c] for b, c in zip(blocks, counts)])


def same_on_all_ranks(value: str | None, what: str) -> None:
    """Raises on every rank unless ``value`` is equal on all the ranks that know it (None:
    this rank does not)."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    known = [(r, v) for r, v in enumerate(values) if v is not None]
    differ = [r for r, v in known if v != known[0][1]]
    if differ:
        raise ValueError(f"{what} differs between rank {known[0][0]} and rank(s) {differ}: "
                         "every rank must pass the same one")


@contextmanager
def together(what: str) -> Iterator[None]:
    """Runs the block on every rank, then tells every rank whether any failed: a rank that
    raised re-raises its own exception, the others raise a ``RuntimeError`` naming the rank and
    its error (instead of waiting forever in the next collective)."""
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (sent to the other ranks, then re-raised)
        error = exc
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None
                           else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"{what} failed on rank {rank} (of {len(messages)}): {message}")


def merge_topk(values: Sequence[torch.Tensor], rows: Sequence[torch.Tensor], topk: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``[m, topk]`` top-k from several of the same queries over disjoint rows: by value
    (descending), ties by the lower row, empty slots (-inf, -1) last, as ``ops.score_topk``
    orders them."""
    v = torch.cat(list(values), dim=1)
    r = torch.cat(list(rows), dim=1)
    by_row = torch.argsort(torch.where(r < 0, torch.iinfo(torch.int64).max, r), dim=1,
                           stable=True)
    v, r = v.gather(1, by_row), r.gather(1, by_row)
    by_value = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :topk]
    return v.gather(1, by_value), r.gather(1, by_value)


class RankBatches:
    """Rank ``rank``'s batches of ``data`` (batches rank, rank + size, ...), as
    ``(x, ids or None, position)`` with ``position`` the stream position of the batch's first
    example (the default ids of :func:`.featurize.iterate_batches` are positions).

    A map-style ``DataLoader`` with a batch sampler is re-made over this rank's batches only
    (same dataset, collate function, workers), so other ranks' examples are never loaded; its
    batch order must then be the same on every rank (a shuffling sampler needs a seeded
    ``generator=``): :attr:`digest` identifies it. Any other iterable is read whole on every
    rank, this rank's batches kept; its digest (every batch's size and ids) is known once the
    iteration has ended."""

    def __init__(self, data: Iterable[Any], rank: int, size: int) -> None:
        self.data, self.rank, self.size = data, rank, size
        self._loader: DataLoader | None = None
        self._hash = hashlib.sha256()
        self._known = False  # whether the digest covers the whole stream
        if (isinstance(data, DataLoader) and data.batch_sampler is not None
                and not isinstance(data.dataset, IterableDataset)):
            batches = [[int(i) for i in b] for b in data.batch_sampler]
            for b in batches:
                self._hash.update(np.asarray(b, dtype=np.int64).tobytes() + b"|")
            self._starts = np.concatenate([[0], np.cumsum([len(b) for b in batches])])
            self._mine = list(range(rank, len(batches), size))
            self.rows: int | None = sum(len(batches[i]) for i in self._mine)
            self._loader = _loader_over(data, [batches[i] for i in self._mine])
            self._known = True
        else:
            self.rows = None

    @property
    def digest(self) -> str | None:
        """What every rank must agree on: the batch order; None for a plain iterable until it
        has been read to the end."""
        return self._hash.hexdigest() if self._known else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, int]]:
        if self._loader is not None:
            for j, (x, ids) in enumerate(iterate_batches(self._loader)):
                yield x, ids, int(self._starts[self._mine[j]])
            return
        position = 0
        for j, (x, ids) in enumerate(iterate_batches(self.data)):
            B = x.shape[0]
            self._hash.update(f"{B}|".encode())
            if ids is not None:
                self._hash.update(ids.numpy().tobytes())
            if j % self.size == self.rank:
                yield x, ids, position
            position += B
        self._known = True


def _loader_over(loader: DataLoader, batches: list[list[int]]) -> DataLoader:
    """``loader`` with its batch sampler replaced by the list ``batches``."""
    kwargs: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
    }
    if loader.num_workers > 0:  # torch refuses these without workers
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["persistent_workers"] = loader.persistent_workers
    return DataLoader(loader.dataset, batch_sampler=batches, **kwargs)
