"""How examples are read from what users pass as data: their order, their ids, the share of one
rank, and where a resumed featurisation starts.

An example's id names it in a store (``top.ids``), seeds its augmentations (``SSLAugment`` draws
from ``(seed, id, view)``) and finds its store row in ``neighbours(data=...)``, so it must not
depend on the order a loader happens to draw:

- batches that carry ids (dicts with ``"id"``/``"ids"``) keep theirs;
- a ``torch.utils.data.DataLoader`` (the class itself, not a subclass) over a map-style dataset
  is read by dataset index and its examples' ids are those indices. A shuffling sampler
  (``shuffle=True``, ``SubsetRandomSampler``) draws another order on every pass, which would make
  a resumed store and ``neighbours(data=...)`` read other examples than the first pass: it is
  read in increasing index order instead, every example of its set once, in batches of the
  loader's ``batch_size`` (``drop_last`` is for training batch shapes and is not applied).
  The loader is re-made over the index batches (same dataset, collate function and workers), so
  a resume skips the examples already stored without loading them;
- anything else (an iterable of batches, a loader subclass, a sampler of other keys) is read as
  it is, and an example's id is its position in the stream.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
)

from .store import StoreError

# (x [B, ...], ids [B] int64 on the CPU, stream position of the first example)
Piece = tuple[torch.Tensor, torch.Tensor, int]

# Each rank's share of a stream of known length: about this many blocks per rank, so that the
# shares differ by at most ~1/8 (a block is one shard of the rank's part store).
BLOCKS_PER_RANK = 8


def block_rows(n: int | None, size: int, shard_rows: int) -> int:
    """Rows of the blocks the ranks take turns on: ``shard_rows``, or smaller when the stream's
    length ``n`` is known and short (about :data:`BLOCKS_PER_RANK` blocks per rank)."""
    if n is None:
        return shard_rows
    return max(1, min(shard_rows, -(-n // (size * BLOCKS_PER_RANK))))


def iterate_batches(data: Iterable[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Normalise what a data loader yields to ``(x, ids or None)``.

    Accepted items: a tensor ``x``; a tuple/list ``(x, ...)`` (labels ignored); a dict with
    ``"x"``/``"image"``/``"input"`` and optionally ``"id"``/``"ids"`` (stable example ids).
    """
    for item in data:
        ids = None
        if isinstance(item, torch.Tensor):
            x = item
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
            x = item[0]
        elif isinstance(item, dict):
            key = next((k for k in ("x", "image", "input") if k in item), None)
            if key is None:
                raise ValueError(
                    f"a dict batch needs an 'x', 'image' or 'input' entry, got keys {sorted(item)}"
                )
            x = item[key]
            raw = item.get("ids", item.get("id"))
            ids = (None if raw is None
                   else torch.as_tensor(raw, dtype=torch.int64).reshape(-1).cpu())
        else:
            raise TypeError(
                f"cannot read a batch from {type(item).__name__}: yield tensors, "
                "(x, ...) tuples or dicts with 'x'"
            )
        if ids is not None and ids.shape[0] != x.shape[0]:
            raise ValueError(f"a batch has {ids.shape[0]} ids for {x.shape[0]} examples")
        yield x, ids


def index_batches(data: Iterable[Any], *, distributed: bool = False
                  ) -> list[list[int]] | None:
    """The batches of dataset indices a plain ``DataLoader`` over a map-style dataset is read in
    (a shuffling sampler's set in increasing order, see the module docstring); None for anything
    else, which is read as it is. ``distributed``: refuse a ``DistributedSampler`` (the ranks'
    split is made here)."""
    if not isinstance(data, DataLoader):
        return None
    sampler = data.sampler
    shuffles = isinstance(sampler, (RandomSampler, SubsetRandomSampler))
    if type(data) is not DataLoader or data.batch_sampler is None or isinstance(
            data.dataset, IterableDataset):
        if shuffles:
            warnings.warn(f"{type(data).__name__} shuffles, and is read as it is (a subclass, or "
                          "no batch sampler): its examples are numbered by their position in "
                          "this pass's random order. Pass a DataLoader with shuffle=False (or "
                          "batches with 'ids') so that ids name the same examples on every pass",
                          UserWarning, stacklevel=3)
        return None
    if distributed and isinstance(data.sampler, DistributedSampler):
        raise ValueError("do not give the DataLoader a DistributedSampler: InfluenceSSL splits "
                         "the examples over the ranks itself (every rank passes the same "
                         "loader; a DistributedSampler would also pad with repeated examples)")
    if isinstance(sampler, (RandomSampler, SubsetRandomSampler)) and type(
            data.batch_sampler) is BatchSampler:
        order = _shuffled_set(sampler)
        size = data.batch_sampler.batch_size
        return [order[a:a + size] for a in range(0, len(order), size)]
    batches = [list(b) for b in data.batch_sampler]
    if not all(isinstance(i, (int, np.integer)) for b in batches for i in b):
        return None  # a sampler of other keys: read as any iterable
    return [[int(i) for i in b] for b in batches]


def _shuffled_set(sampler: RandomSampler | SubsetRandomSampler) -> list[int]:
    """The dataset indices a shuffling sampler draws from, in increasing order."""
    if isinstance(sampler, SubsetRandomSampler):
        return sorted(int(i) for i in sampler.indices)
    n = len(sampler.data_source)  # type: ignore[arg-type]
    if sampler.replacement:
        raise ValueError("the DataLoader's RandomSampler draws with replacement (repeats and "
                         "misses examples at random): featurise each example once, e.g. "
                         "DataLoader(dataset, batch_size=..., shuffle=False)")
    if sampler.num_samples != n:
        raise ValueError(f"the DataLoader's RandomSampler draws a random {sampler.num_samples} "
                         f"of the dataset's {n} examples, another set on every pass: pass a "
                         "fixed set (torch.utils.data.Subset, or a SubsetRandomSampler)")
    return list(range(n))


def loader_over(loader: DataLoader, batches: list[list[int]]) -> DataLoader:
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
    for name in ("pin_memory_device", "in_order"):  # (newer torch versions only)
        if hasattr(loader, name):
            kwargs[name] = getattr(loader, name)
    return DataLoader(loader.dataset, batch_sampler=batches, **kwargs)


class Examples:
    """The examples of ``data`` as ``(x, ids, position)`` pieces of batches, every piece with its
    ids (see the module docstring); with ``size`` > 1 only rank ``rank``'s share.

    Ranks: the stream is cut into blocks of :attr:`block` examples and the ranks take turns
    (block j is rank j % size's); a batch is cut where a block ends. A rank's blocks are exactly
    the shards of its part store, so taking every rank's shards in turn gives the rows in stream
    order. Blocks are ``shard_rows`` examples, or (``balance``) fewer when the length is known
    and short (:func:`block_rows`; ``balance=False`` keeps blocks of ``shard_rows``: query
    blocks, where fewer, larger blocks mean fewer passes over the store).
    A re-made ``DataLoader`` reads this rank's examples only; any other iterable is read whole
    on every rank and this rank's pieces kept.

    :attr:`digest` identifies the stream (the loader's index batches; or every batch's size, ids
    and a sample of its values) so that ranks can check they all read the same one; for a plain
    iterable it is known once it has been read to the end (None before). ``unique``: refuse a
    loader whose sampler gives an index twice (featurising: a store holds each example once).
    """

    def __init__(self, data: Iterable[Any], rank: int = 0, size: int = 1,
                 shard_rows: int = 4096, *, balance: bool = True, unique: bool = False) -> None:
        self.data, self.rank, self.size = data, rank, size
        self._hash = hashlib.sha256()
        self._known = False  # whether the digest covers the whole stream
        self._pieces: list[tuple[list[int], int]] = []  # (dataset indices, position): a loader's
        batches = index_batches(data, distributed=size > 1)
        self.batches = batches
        if batches is None:
            self.rows: int | None = None
            self.block = block_rows(None, size, shard_rows)
            return
        if unique:
            _refuse_repeats(batches)
        for b in batches:
            self._hash.update(np.asarray(b, dtype=np.int64).tobytes() + b"|")
        self._known = True
        self.block = block_rows(sum(len(b) for b in batches) if balance else None, size,
                                shard_rows)
        self._pieces = [(b[a:e], pos + a) for b, pos in zip(batches, _positions(batches))
                        for a, e in self._cuts(pos, len(b))]
        self.rows = sum(len(b) for b, _ in self._pieces)

    @property
    def total(self) -> int | None:
        """Examples of the whole stream when known (for progress bars)."""
        if self.batches is not None:
            return sum(len(b) for b in self.batches)
        dataset = getattr(self.data, "dataset", None)
        return len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]

    @property
    def digest(self) -> str | None:
        """What every rank must agree on (None: not known yet)."""
        return self._hash.hexdigest() if self._known else None

    def _cuts(self, position: int, B: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` within a batch of ``B`` examples at ``position``: this rank's."""
        if self.size == 1:  # one process: whole batches
            yield 0, B
            return
        a = 0
        while a < B:
            block = (position + a) // self.block
            e = min(B, (block + 1) * self.block - position)
            if block % self.size == self.rank:
                yield a, e
            a = e

    def __iter__(self) -> Iterator[Piece]:
        if self.batches is not None:
            yield from self._load(self._pieces)
            return
        position = 0
        for x, ids in iterate_batches(self.data):
            B = x.shape[0]
            self._hash.update(f"{B}|".encode() + _sample_bytes(x))
            if ids is not None:
                self._hash.update(ids.numpy().tobytes())
            else:
                ids = torch.arange(position, position + B)
            for a, e in self._cuts(position, B):
                yield x[a:e], ids[a:e], position + a
            position += B
        self._known = True

    def _load(self, pieces: list[tuple[list[int], int]]) -> Iterator[Piece]:
        """The examples of ``pieces`` (dataset indices, stream position) through the loader."""
        assert isinstance(self.data, DataLoader)
        loader = loader_over(self.data, [b for b, _ in pieces])
        for (x, ids), (indices, pos) in zip(iterate_batches(loader), pieces):
            if x.shape[0] != len(indices):
                raise ValueError(
                    f"the DataLoader gave a batch of {x.shape[0]} rows for {len(indices)} "
                    "sampled dataset indices (its collate_fn or dataset drops or adds rows), "
                    "so its examples' indices are unknown: give the batches ids (a dict with "
                    "'ids'), or pass it wrapped, e.g. (batch for batch in loader), to number "
                    "the examples by their position")
            yield x, torch.tensor(indices, dtype=torch.int64) if ids is None else ids, pos

    def after(self, done: int, stored_ids: np.ndarray, where: str) -> Iterator[Piece]:
        """The pieces after the first ``done`` examples, which a store at ``where`` being
        resumed holds with ids ``stored_ids[:done]``: they must be the same examples (else
        :class:`.StoreError`). A re-made loader skips them without loading them when their
        indices are the stored ids; otherwise they are read and their ids compared."""
        if done == 0:
            yield from self
            return
        if self.batches is not None:
            planned = [i for b, _ in self._pieces for i in b][:done]
            if len(planned) == done and np.array_equal(planned, stored_ids[:done]):
                rest = _cut_front(self._pieces, done)
                self._known = True
                yield from self._load(rest)
                return
        seen = 0
        for x, ids, pos in self:
            B = x.shape[0]
            if seen >= done:
                yield x, ids, pos
                continue
            cut = min(B, done - seen)
            if not np.array_equal(ids[:cut].numpy(), stored_ids[seen:seen + cut]):
                at = seen + int(np.flatnonzero(ids[:cut].numpy() != stored_ids[seen:seen + cut])[0])
                raise StoreError(
                    f"the data do not come in the order of the incomplete store at {where}: its "
                    f"row {at} holds example id {int(stored_ids[at])}, the data give id "
                    f"{int(ids[at - seen])} there. Resume with the same data in the same order "
                    "(a shuffling DataLoader is read in index order, so this is other data), "
                    "or remove the store")
            if cut < B:
                yield x[cut:], ids[cut:], pos + cut
            seen += B


def _positions(batches: list[list[int]]) -> list[int]:
    return np.concatenate([[0], np.cumsum([len(b) for b in batches])]).astype(int).tolist()[:-1]


def _cut_front(pieces: list[tuple[list[int], int]], done: int
               ) -> list[tuple[list[int], int]]:
    """``pieces`` without their first ``done`` examples (a piece may be cut)."""
    rest, seen = [], 0
    for b, pos in pieces:
        skip = min(len(b), max(0, done - seen))
        if skip < len(b):
            rest.append((b[skip:], pos + skip))
        seen += len(b)
    return rest


def _refuse_repeats(batches: list[list[int]]) -> None:
    flat = np.fromiter((i for b in batches for i in b), dtype=np.int64)
    uniq, counts = np.unique(flat, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"the DataLoader's sampler gives dataset indices "
                         f"{uniq[counts > 1][:5].tolist()} more than once: a store holds each "
                         "example once (use a sampler without replacement)")


def _sample_bytes(x: torch.Tensor, values: int = 64) -> bytes:
    """A few of a batch's values, evenly spaced: tells different data apart at no cost."""
    flat = x.detach().reshape(-1)
    step = max(1, flat.numel() // values)
    return flat[::step][:values].to("cpu", torch.float32).numpy().tobytes()
