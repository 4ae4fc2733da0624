"""Scale-out over ``torch.distributed`` ranks (launched with ``torchrun``).

With a process group of W > 1 ranks initialised, :class:`~issl_fast.InfluenceSSL` splits its work
(every rank runs the same script with the same encoder weights, data and queries):

- ``featurize``: the stream of examples is cut into blocks and the ranks take turns (block j is
  rank j % W's, :class:`.loading.Examples`); each writes its blocks as the shards of its own part
  store, ``<path>/part-<r>-of-<W>/`` (resumable on its own); rank 0 then writes the store's
  manifest listing the parts' shards in turn (:meth:`.GradientStore.from_parts`; nothing is
  copied), so the store holds the rows in stream order, as one process would, and opens like any
  store. A ``DataLoader`` is re-made per rank over its own examples, so no rank loads another's
  (but for the few, the same on every rank, whose values the ranks compare:
  :data:`.loading.DIGEST_EXAMPLES`).
- ``fit``: each rank accumulates the curvature sums over its range of the store's rows
  (:func:`row_range`); they are summed over the ranks (:func:`all_reduce_sum`), so every rank
  holds the same solver.
- ``score``, ``self_influence``, ``neighbours`` (and so ``find_duplicates`` / ``find_outliers``):
  each rank scans its range of rows (or of queries); the results are gathered and merged into
  the same answer on every rank.

Collectives run on the CPU with gloo and on the rank's current GPU with nccl (call
``torch.cuda.set_device`` first, as torchrun scripts do). A Python exception on one rank is
sent to the others (:func:`together`), so that no rank waits forever in a collective for a rank
that failed: every rank raises. Each agreement names its step, so ranks that got out of step
(one skipped a step the others took) fail with both steps named instead of pairing wrong ones.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


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


def all_gather_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (any number of rows, the rest of the shape and the dtype the same on
    every rank), in rank order, on ``t``'s device."""
    counts = [int(c) for c in all_gather(torch.tensor([t.shape[0]]))]
    # all_gather moves equal shapes: every block padded to the largest
    padded = torch.cat([t, t.new_zeros(max(counts) - t.shape[0], *t.shape[1:])])
    return [b[:c] for b, c in zip(all_gather(padded), counts)]


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """The ``[n, ...]`` array whose rows :func:`row_range` split over the ranks, from each
    rank's ``local`` block, on every rank."""
    rank, size = world()
    start, stop = row_range(n, rank, size)
    if local.shape[0] != stop - start:
        raise ValueError(f"rank {rank} holds rows [{start}, {stop}) of {n}, got "
                         f"{local.shape[0]} rows")
    return np.concatenate([b.numpy() for b in all_gather_rows(torch.from_numpy(local))])


# How long ranks wait for each other where one may legitimately be far behind (a resumed
# featurize: ranks whose part is done wait for the others), instead of the process group's
# timeout (30 min for gloo, 10 min for nccl by default).
AGREEMENT_TIMEOUT = timedelta(hours=24)
_agreement: tuple[Any, Any] | None = None  # (default group it was made for, gloo group)


def _agreement_group() -> Any:
    """A gloo group over all ranks with :data:`AGREEMENT_TIMEOUT`, made on first use (every rank
    reaches its first use at the same call) and remade for a new default group."""
    global _agreement
    world_group = dist.group.WORLD
    if _agreement is None or _agreement[0] is not world_group:
        _agreement = (world_group, dist.new_group(backend="gloo", timeout=AGREEMENT_TIMEOUT))
    return _agreement[1]


def _forget_agreement_group() -> None:
    # A group object still referenced while the interpreter shuts down can abort the process
    # (gloo, seen as SIGABRT at exit): drop it while the interpreter still runs normally.
    global _agreement
    _agreement = None


atexit.register(_forget_agreement_group)


def _gather_objects(step: str, value: Any) -> list[Any]:
    """Every rank's ``value`` for agreement ``step``; raises if the ranks are at other steps."""
    pairs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pairs, (step, value), group=_agreement_group())
    lost = [(r, st) for r, (st, _) in enumerate(pairs) if st != step]
    if lost:
        raise RuntimeError(f"ranks out of step: this rank is at {step!r}, rank {lost[0][0]} at "
                           f"{lost[0][1]!r} (every rank must call the same methods in the same "
                           "order)")
    return [v for _, v in pairs]


def same_on_all_ranks(value: str | None, what: str) -> None:
    """Raises on every rank unless ``value`` is equal on all the ranks that know it (None:
    this rank does not)."""
    values = _gather_objects(f"compare {what}", value)
    known = [(r, v) for r, v in enumerate(values) if v is not None]
    differ = [r for r, v in known if v != known[0][1]]
    if differ:
        raise ValueError(f"{what} differs between rank {known[0][0]} and rank(s) {differ}: "
                         "every rank must pass the same one")


@contextmanager
def together(what: str) -> Iterator[None]:
    """Runs the block on every rank, then tells every rank whether any failed: a rank that
    raised re-raises its own exception, the others raise a ``RuntimeError`` naming the rank and
    its error (instead of waiting forever in the next collective). The block must not itself
    enter a collective (a failed rank would be waiting here while the others wait there)."""
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (sent to the other ranks, then re-raised)
        error = exc
    messages = _gather_objects(what, None if error is None
                               else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"{what} failed on rank {rank} (of {len(messages)}): {message}")


class PeerStopped(RuntimeError):
    """This rank stopped because another one failed (:meth:`PeerFailures.check`)."""


class PeerFailures:
    """Failure notes in a directory every rank sees (the store's): a rank that fails writes
    one, and the others stop at their next :meth:`check` instead of finishing their share
    before they learn of it."""

    PREFIX = "failed-rank-"
    # Seconds between looks at the directory (a listing on a shared file system costs).
    INTERVAL_S = 2.0

    def __init__(self, path: Path, rank: int) -> None:
        self.path, self.rank = path, rank
        self._next = 0.0

    def clear(self) -> None:
        """Removes notes of an earlier run (one rank, before any rank starts working)."""
        for note in self.path.glob(self.PREFIX + "*"):
            note.unlink(missing_ok=True)

    def record(self, error: BaseException) -> None:
        """Leaves a note of this rank's failure (not for a :class:`PeerStopped`: the rank that
        failed left its own)."""
        if isinstance(error, PeerStopped):
            return
        note = self.path / f"{self.PREFIX}{self.rank:05d}.txt"
        tmp = self.path / f".{note.name}.tmp"  # (renamed whole: never read half-written)
        tmp.write_text(f"{type(error).__name__}: {error}")
        tmp.replace(note)

    def check(self) -> None:
        """Raises :class:`PeerStopped` if another rank has left a note (looks at most every
        :attr:`INTERVAL_S` seconds)."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.INTERVAL_S
        for note in sorted(self.path.glob(self.PREFIX + "*")):
            rank = int(note.stem[len(self.PREFIX):])
            if rank != self.rank:
                raise PeerStopped(f"stopped: rank {rank} failed ({note.read_text()})")


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
