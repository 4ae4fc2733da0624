"""How examples are read from what users pass as data: their order, their ids, the share of one
rank, and where a resumed featurisation starts.

An example's id names it in a store (``top.ids``), seeds its augmentations when they are drawn
per example (``SSLAugment(shared=False)`` draws from ``(seed, id, view)``) and finds its store
row in ``neighbours(data=...)``, so it must not depend on the order a loader happens to draw:

- batches that carry ids (dicts with ``"id"``/``"ids"``) keep theirs;
- a ``torch.utils.data.DataLoader`` (the class itself, not a subclass) over a map-style dataset
  is read by dataset index and its examples' ids are those indices. A shuffling sampler
  (``shuffle=True``, ``SubsetRandomSampler``) draws another order on every pass, which would make
  a resumed store and ``neighbours(data=...)`` read other examples than the first pass: it is
  read in increasing index order instead, every example of its set once, in batches of the
  loader's ``batch_size``. ``drop_last`` is for training batch shapes and is not applied.
  Featurising refuses samplers that draw random sets or repeats (a store holds a fixed set of
  examples once each); queries are read as such samplers draw them. The loader is re-made over
  the index batches (same dataset, collate function and workers, batches in order), so a
  resume skips the examples already stored without loading them;
- anything else (an iterable of batches, a loader subclass, a sampler of other keys) is read as
  it is, and an example's id is its position in the stream.
"""

from __future__ import annotations

import hashlib
import itertools
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
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from .recheck import Recheck
from .store import StoreError

# (x [B, ...], ids [B] int64 on the CPU, stream position of the first example)
Piece = tuple[torch.Tensor, torch.Tensor, int]

# Examples of a re-made loader whose values the ranks' digest covers besides its index batches
# (evenly spread over the stream): loaders holding other examples at the same indices (an
# unseeded random_split, drawn per process) are told apart by loading these few.
DIGEST_EXAMPLES = 4

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
            _refuse_labels_as_x(item)
        elif isinstance(item, dict):
            key = next((k for k in ("x", "image", "input") if k in item), None)
            if key is None:
                raise ValueError(
                    f"a dict batch needs an 'x', 'image' or 'input' entry, got keys {sorted(item)}"
                )
            x = item[key]
            id_key = "ids" if "ids" in item else "id"
            ids = None if item.get(id_key) is None else _integer_ids(item[id_key], id_key)
        else:
            raise TypeError(
                f"cannot read a batch from {type(item).__name__}: yield tensors, "
                "(x, ...) tuples or dicts with 'x'"
            )
        if ids is not None and ids.shape[0] != x.shape[0]:
            raise ValueError(f"a batch has {ids.shape[0]} ids for {x.shape[0]} examples")
        yield x, ids


def _refuse_labels_as_x(item: tuple | list) -> None:
    """A ``(label, input)`` batch would featurise the labels as x (the first element is taken):
    refused, naming what was taken, when element 0 holds one integer per example and a later
    element is a float batch of images or signals (``[B, C, ...]``). One integer per example
    with a float ``[B, D]`` beside it is a legitimate ``(x, target)``: categorical ids for an
    embedding encoder; token ids are ``[B, T]``."""
    x = item[0]
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dim() != 1:
        return
    for j, other in enumerate(item[1:], start=1):
        if (isinstance(other, torch.Tensor) and other.dtype.is_floating_point
                and other.dim() >= 3 and other.shape[0] == x.shape[0]):
            raise ValueError(
                f"a batch (x, ...) is read with its first element as x, here {x.dtype} of shape "
                f"{tuple(x.shape)} (labels?), while element {j} is {other.dtype} of shape "
                f"{tuple(other.shape)}: put the inputs first ((x, label)), or name them: batches "
                "that are dicts (a dataset returning dicts) are read by their 'x' (or 'image', "
                "'input') entry")


def _integer_ids(raw: Any, key: str) -> torch.Tensor:
    """A dict batch's ``key`` entry as int64 ids on the CPU; a TypeError naming it unless they
    are integers (as float they would be truncated, 1.5 and 1 becoming one example)."""
    try:
        ids = torch.as_tensor(raw)
    except (TypeError, ValueError, RuntimeError):  # (strings: "too many dimensions 'str'")
        ids = None
    if ids is not None and ids.numel() == 0:  # (an empty batch: [] is float32 to torch)
        return torch.zeros(0, dtype=torch.int64)
    if (ids is None or ids.dtype.is_floating_point or ids.dtype.is_complex
            or ids.dtype == torch.bool):
        shown = repr(raw[:3] if isinstance(raw, (list, tuple)) else raw)[:80]
        raise TypeError(f"a dict batch's {key!r} must hold integer example ids, got {shown}: "
                        f"map them to integers (e.g. the dataset index), or leave {key!r} out "
                        "to number the examples by their dataset index or stream position")
    return ids.to(torch.int64).reshape(-1).cpu()


def index_batches(data: Iterable[Any], *, distributed: bool = False, strict: bool = False
                  ) -> list[np.ndarray] | None:
    """The batches of dataset indices (int64 arrays) a plain ``DataLoader`` over a map-style
    dataset is read in, None for anything else (read as it is).

    With torch's ``BatchSampler`` (what ``batch_size=`` makes) every example its sampler gives
    is read (``drop_last`` is for training batch shapes and is not applied), and a shuffling
    sampler (``RandomSampler`` drawing each example once, ``SubsetRandomSampler``) gives its
    set in increasing order. ``strict`` (featurising a store, which must hold a fixed set of
    examples once each): samplers that draw random sets or repeats are refused; otherwise
    (queries) they are read as drawn. A ``DistributedSampler`` is refused with ``distributed``
    (the ranks' split is made here) and with ``strict`` (it holds one rank's share of the data
    set: a store of it would silently miss the rest)."""
    if type(data) is not DataLoader or data.batch_sampler is None or isinstance(
            data.dataset, IterableDataset):
        return None
    # (a DistributedSampler over one replica holds the whole data set: read as a shuffling one)
    sampler = data.sampler
    split = isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1
    if distributed and split:
        raise ValueError("do not give the DataLoader a DistributedSampler: InfluenceSSL splits "
                         "the examples over the ranks itself (every rank passes the same "
                         "loader; a DistributedSampler would also pad with repeated examples)")
    if strict and isinstance(sampler, DistributedSampler) and split:
        raise ValueError("the DataLoader has a DistributedSampler: it gives this process's "
                         f"share of the data set only (rank {sampler.rank} of "
                         f"{sampler.num_replicas}), so the store would miss the others' "
                         "examples. Rebuild the loader without the DistributedSampler (e.g. "
                         "DataLoader(loader.dataset, batch_size=...)), or featurize on every "
                         "rank with InfluenceSSL(..., distributed=True)")
    batch_sampler = data.batch_sampler
    if type(batch_sampler) is BatchSampler:
        order = _sampler_order(batch_sampler.sampler, strict, random_set(data))
        if order is None:
            return None
        size = batch_sampler.batch_size
        return [order[a:a + size] for a in range(0, len(order), size)]
    batches = [list(b) for b in batch_sampler]  # a batch sampler of the user's own
    if not all(isinstance(i, (int, np.integer)) for b in batches for i in b):
        return None  # a sampler of other keys: read as any iterable
    return [np.asarray(b, dtype=np.int64) for b in batches]


def random_set(data: Any) -> str | None:
    """How a plain ``DataLoader``'s sampler draws another set of examples on every pass (with
    replacement, a random number of them, by weight), None when it reads a fixed set."""
    if type(data) is not DataLoader or type(data.batch_sampler) is not BatchSampler:
        return None
    sampler = data.batch_sampler.sampler
    if isinstance(sampler, RandomSampler):
        n = len(sampler.data_source)  # type: ignore[arg-type]
        if sampler.replacement:
            return "RandomSampler draws with replacement"
        if sampler.num_samples != n:
            return f"RandomSampler draws {sampler.num_samples} of {n} examples"
    if isinstance(sampler, WeightedRandomSampler):
        return "WeightedRandomSampler draws by weight"
    return None


def _sampler_order(sampler: Any, strict: bool, how: str | None) -> np.ndarray | None:
    """The dataset indices ``sampler`` gives, in the order they are read (see
    :func:`index_batches`; ``how``: :func:`random_set`'s answer); None when they are not
    integers."""
    if isinstance(sampler, SequentialSampler):
        return np.arange(len(sampler.data_source), dtype=np.int64)  # type: ignore[arg-type]
    if isinstance(sampler, SubsetRandomSampler):
        return np.sort(np.asarray(list(sampler.indices), dtype=np.int64))
    if isinstance(sampler, DistributedSampler) and sampler.num_replicas == 1:  # every example
        return np.arange(len(sampler.dataset), dtype=np.int64)  # type: ignore[arg-type]
    if how is None and isinstance(sampler, RandomSampler):  # each example once
        return np.arange(len(sampler.data_source), dtype=np.int64)  # type: ignore[arg-type]
    if how is not None and strict:
        raise ValueError(f"the DataLoader's {how}: another set of examples on every pass, "
                         "with repeats or misses. A store holds a fixed set once each: pass "
                         "shuffle=False, or a fixed subset (torch.utils.data.Subset, "
                         "SubsetRandomSampler)")
    drawn = list(sampler)
    if not all(isinstance(i, (int, np.integer)) for i in drawn):
        return None
    return np.asarray(drawn, dtype=np.int64)


class _IndexBatches:
    """A batch sampler over fixed batches of indices, handed to the loader as Python ints."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return (b.tolist() for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def loader_over(loader: DataLoader, batches: list[np.ndarray]) -> DataLoader:
    """``loader`` with its batch sampler replaced by ``batches``, delivered in that order."""
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
    if hasattr(loader, "pin_memory_device"):  # (newer torch versions only)
        kwargs["pin_memory_device"] = loader.pin_memory_device
    if hasattr(loader, "in_order"):
        # Batches are named by their position in the sampler: they must arrive in that order
        # (in_order=False hands back whichever a worker finished first).
        kwargs["in_order"] = True
    return DataLoader(loader.dataset, batch_sampler=_IndexBatches(batches), **kwargs)


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

    :attr:`digest` identifies the stream (the loader's index batches and, with ranks, the values
    of :data:`DIGEST_EXAMPLES` of its examples; or every batch's size, ids and a sample of its
    values) so that ranks can check they all read the same one; for a plain
    iterable it is known once it has been read to the end (None before). ``unique``
    (featurising: a store holds a fixed set of examples, each once): refuse samplers that draw
    random sets or give an index twice.
    """

    def __init__(self, data: Iterable[Any], rank: int = 0, size: int = 1,
                 shard_rows: int = 4096, *, balance: bool = True, unique: bool = False) -> None:
        self.data, self.rank, self.size = data, rank, size
        self._hash = hashlib.sha256()
        self._known = False  # whether the digest covers the whole stream
        # a re-made loader's (dataset indices, stream position) pieces for this rank
        self._pieces: list[tuple[np.ndarray, int]] = []
        batches = index_batches(data, distributed=size > 1, strict=unique)
        self.batches = batches
        if batches is None:
            self.rows: int | None = None
            self.block = block_rows(None, size, shard_rows)
            return
        if unique:
            _refuse_repeats(batches)
        for b in batches:
            self._hash.update(b.tobytes() + b"|")
        if size > 1:  # (only ranks compare digests)
            assert isinstance(data, DataLoader)  # (index_batches reads only those)
            self._hash.update(_value_bytes(data, batches))
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

    def planned_indices(self) -> np.ndarray | None:
        """The dataset indices a re-made loader will read, in order (None for other data)."""
        if self.batches is None:
            return None
        return np.concatenate(self.batches) if self.batches else np.zeros(0, dtype=np.int64)

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
        for x, ids in _checked_batches(self.data):
            B = x.shape[0]
            self._hash.update(f"{B}|".encode() + _sample_bytes(x))
            if ids is not None:
                self._hash.update(ids.numpy().tobytes())
            else:
                if position == 0 and _shuffles(self.data):
                    warnings.warn(
                        f"{type(self.data).__name__} shuffles and is read as it is (a "
                        "DataLoader subclass, or one without a batch sampler), so its examples "
                        "are numbered by their position in this pass's random order: pass a "
                        "DataLoader with shuffle=False, or batches with 'ids', so that ids name "
                        "the same examples on every pass", UserWarning, stacklevel=2)
                ids = torch.arange(position, position + B)
            for a, e in self._cuts(position, B):
                yield x[a:e], ids[a:e], position + a
            position += B
        self._known = True

    def _load(self, pieces: list[tuple[np.ndarray, int]]) -> Iterator[Piece]:
        """The examples of ``pieces`` (dataset indices, stream position) through the loader."""
        assert isinstance(self.data, DataLoader)
        loader = loader_over(self.data, [b for b, _ in pieces])
        for (x, ids), (indices, pos) in zip(iterate_batches(loader), pieces):
            if x.shape[0] != len(indices) and (ids is None or self.size > 1):
                raise ValueError(
                    f"the DataLoader gave a batch of {x.shape[0]} rows for {len(indices)} "
                    "sampled dataset indices (its collate_fn or dataset drops or adds rows), "
                    "so its examples' indices are unknown"
                    + (": give the batches ids (a dict with 'ids'), or pass it wrapped, e.g. "
                       "(batch for batch in loader), to number the examples by their position"
                       if self.size == 1 else
                       ", and so are the ranks' shares: pass it wrapped, e.g. (batch for batch "
                       "in loader), to have every rank read it whole"))
            yield x, torch.from_numpy(indices.copy()) if ids is None else ids, pos

    def after(self, done: int, stored_ids: np.ndarray, where: str,
              what: str = "incomplete store", recheck: Recheck | None = None
              ) -> Iterator[Piece]:
        """The pieces after the first ``done`` examples, which a store at ``where`` being
        resumed (or appended to: ``what``) holds with ids ``stored_ids[:done]``: they must be
        the same examples, and the data must have that many (else :class:`.StoreError`, before
        anything is written). A re-made loader skips them without loading them when their
        indices are the stored ids (``recheck`` then loads its sample of them only); otherwise
        they are read and their ids compared (and ``recheck``'s sample kept for it)."""
        if done == 0:
            yield from self
            return
        if self._pieces:
            planned = np.concatenate([b for b, _ in self._pieces])[:done]
            if len(planned) == done and np.array_equal(planned, stored_ids[:done]):
                self._known = True
                self.recheck_stored(stored_ids[:done], recheck, where, what)
                yield from self._load(_cut_front(self._pieces, done))
                return
        rows = recheck.sample(done) if recheck is not None else np.zeros(0, dtype=np.int64)
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # the sampled examples, as read
        seen = 0
        for x, ids, pos in self:
            B = x.shape[0]
            if seen >= done:
                yield x, ids, pos
                continue
            cut = min(B, done - seen)
            differ = np.flatnonzero(ids[:cut].numpy() != stored_ids[seen:seen + cut])
            if len(differ):
                at = seen + int(differ[0])
                raise StoreError(
                    f"the data do not come in the order of the {what} at {where}: its "
                    f"row {at} holds example id {int(stored_ids[at])}, the data give id "
                    f"{int(ids[at - seen])} there. Resume with the same data in the same order "
                    "(a DataLoader with shuffle=True is read in index order; a sampler of your "
                    "own must draw the same order again), or remove the store")
            here = torch.from_numpy(rows[(rows >= seen) & (rows < seen + cut)] - seen)
            if len(here):
                kept.append((x[here.to(x.device)], ids[here]))
            if seen + cut == done and recheck is not None and kept:
                recheck.compare(torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept]),
                                rows)
            if cut < B:
                yield x[cut:], ids[cut:], pos + cut
            seen += B
        if seen < done:
            raise StoreError(f"the data end after {seen} examples, but the {what} at "
                             f"{where} already holds {done}: resume with the same data, or "
                             "remove the store")


    def last_batch(self) -> Piece | None:
        """The last batch a re-made loader reads (None for other data, or none)."""
        if not self._pieces:
            return None
        return next(self._load(self._pieces[-1:]))

    def recheck_stored(self, stored_ids: np.ndarray, recheck: Recheck | None, where: str,
                       what: str) -> None:
        """``recheck``'s sample of the examples a store at ``where`` holds with ``stored_ids``
        (the first ids of this re-made loader's stream), loaded through the loader alone."""
        if recheck is None:
            return
        rows = recheck.sample(len(stored_ids))
        if not len(rows):
            return
        # (the caller found the loader's first indices to be the stored ids: load those)
        x, ids, _ = next(self._load([(stored_ids[rows], 0)]))
        if len(ids) != len(rows):  # batches with ids of their own, whose collate drops rows
            keep = np.isin(stored_ids[rows], ids.numpy())
            rows = rows[keep]
            if len(rows) != len(ids):
                return  # (unjudged: which loaded example is which is not known)
        differ = np.flatnonzero(ids.numpy() != stored_ids[rows])
        if len(differ):  # (a loader whose batches carry ids of their own)
            at = int(rows[differ[0]])
            raise StoreError(f"the data do not hold the examples of the {what} at {where}: its "
                             f"row {at} holds example id {int(stored_ids[at])}, the data give "
                             f"id {int(ids[differ[0]])} there")
        recheck.compare(x, ids, rows)


def _iterable_workers(data: Any) -> int:
    """The workers of a ``DataLoader`` over an ``IterableDataset`` when there are several (each
    iterates the dataset itself: the whole of it unless the dataset shards by worker), else 0."""
    if (isinstance(data, DataLoader) and isinstance(data.dataset, IterableDataset)
            and data.num_workers > 1):
        return data.num_workers
    return 0


def _checked_batches(data: Iterable[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """:func:`iterate_batches`; for an ``IterableDataset`` read by several workers, the first two
    batches of every worker (they take turns: batch j is worker j % W's) are held and compared
    first, so that a dataset read whole by every worker is refused before any is used."""
    workers = _iterable_workers(data)
    stream = iterate_batches(data)
    if workers:
        head = list(itertools.islice(stream, 2 * workers))
        if _worker_copies(head, workers):
            _refuse_worker_copies(getattr(data, "dataset", None), workers)
        yield from head
    yield from stream


def _worker_copies(head: list[tuple[torch.Tensor, torch.Tensor | None]], workers: int) -> bool:
    """Whether some worker's first batches (``head[w::workers]``) repeat worker 0's: equal values
    and, where the batches carry ids, equal ids (a dataset sharded by worker may well start two
    shards alike, e.g. silence, under other ids). Without ids, two batches each must match."""
    def same(a: tuple[torch.Tensor, torch.Tensor | None],
             b: tuple[torch.Tensor, torch.Tensor | None]) -> bool:
        if a[0].shape != b[0].shape or not torch.equal(a[0], b[0]):
            return False
        return a[1] is None or b[1] is None or torch.equal(a[1], b[1])

    first = head[0::workers]
    with_ids = any(ids is not None for _, ids in head)
    for w in range(1, workers):
        mine = head[w::workers]
        if (mine and len(mine) == len(first) and (with_ids or len(mine) >= 2)
                and all(same(a, b) for a, b in zip(mine, first))):
            return True
    return False


def _refuse_worker_copies(dataset: Any, workers: int) -> None:
    raise ValueError(
        f"the DataLoader's {type(dataset).__name__} (an IterableDataset) gave the same "
        f"first batches in two of its {workers} workers: each worker iterates the whole dataset "
        "unless the dataset shards itself (by torch.utils.data.get_worker_info()), so every "
        "example would be read once per worker, under other ids (its stream positions). "
        "Shard the dataset by worker, or pass num_workers=0 or 1")


def _shuffles(data: Any) -> bool:
    """Whether ``data`` is a loader drawing a random order."""
    random = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
    return isinstance(data, DataLoader) and (
        isinstance(data.sampler, random)
        or isinstance(getattr(data.batch_sampler, "sampler", None), random))


def _positions(batches: list[np.ndarray]) -> list[int]:
    return np.concatenate([[0], np.cumsum([len(b) for b in batches])]).astype(int).tolist()[:-1]


def _cut_front(pieces: list[tuple[np.ndarray, int]], done: int
               ) -> list[tuple[np.ndarray, int]]:
    """``pieces`` without their first ``done`` examples (a piece may be cut)."""
    rest, seen = [], 0
    for b, pos in pieces:
        skip = min(len(b), max(0, done - seen))
        if skip < len(b):
            rest.append((b[skip:], pos + skip))
        seen += len(b)
    return rest


def _refuse_repeats(batches: list[np.ndarray]) -> None:
    if not batches:
        return
    uniq, counts = np.unique(np.concatenate(batches), return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"the DataLoader's sampler gives dataset indices "
                         f"{uniq[counts > 1][:5].tolist()} more than once: a store holds each "
                         "example once (use a sampler without replacement)")


def _value_bytes(loader: DataLoader, batches: list[np.ndarray]) -> bytes:
    """The bytes of the inputs of :data:`DIGEST_EXAMPLES` examples of ``batches`` (evenly
    spread, the first and the last among them), loaded in this process (no workers started
    for so few)."""
    indices = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    if not len(indices):
        return b""
    pick = np.linspace(0, len(indices) - 1, min(DIGEST_EXAMPLES, len(indices))).round()
    few = DataLoader(loader.dataset, batch_sampler=_IndexBatches([indices[pick.astype(np.int64)]]),
                     collate_fn=loader.collate_fn)
    x, _ = next(iterate_batches(few))
    x = torch.as_tensor(x).detach().cpu().contiguous()
    return (f"{x.dtype}|{tuple(x.shape)}|".encode()
            + (x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""))


def _sample_bytes(x: torch.Tensor, values: int = 64) -> bytes:
    """A few of a batch's values, evenly spaced: tells different data apart at no cost."""
    flat = x.detach().reshape(-1)
    step = max(1, flat.numel() // values)
    return flat[::step][:values].to("cpu", torch.float32).numpy().tobytes()
