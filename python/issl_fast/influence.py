"""The user-facing object: ``InfluenceSSL``.

Score convention (used everywhere a score is returned)::

    score(train i -> test t) = phi_t^T F^-1 phi_i

Positive: training example i *supports* test example t (upweighting i lowers t's loss). F
stands in for the curvature of the *mean* training loss: ``(1/n) sum_i phi_i phi_i^T + lambda
I``, its Gauss-Newton / empirical-Fisher form (positive definite; not the Hessian itself, which
can have negative eigenvalues). Koh & Liang's ``I_up,loss(z_i, z_t) = -g_t^T H^-1 g_i`` (their H
is the mean loss's Hessian too) is therefore ``-score`` with F in H's place, and removing i
changes t's loss by about ``-I_up,loss / n = score / n`` (exactly ``score / n / (1 - s_i / n)``
in the quadratic model F defines: :meth:`TopInfluence.removal_effect`).
Self-influence ``s_i = phi_i^T F^-1 phi_i >= 0`` (high = atypical / memorised / outlier); the
normalised (cosine) influence is ``score / sqrt(s_i s_t)``.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import apps, distributed, loading, ops, residency
from ._backend import has_cuda
from ._checks import count
from .capture import build_layout
from .featurize import Featurizer, model_device
from .loss import AugmentationStability
from .projection import Projection
from .recheck import RECHECK_ROWS, Recheck, store_recheck
from .reference import HASH_VERSION
from .solver import Solver
from .store import (
    MANIFEST,
    PART_PATTERN,
    WRITER_LOCK,
    GradientStore,
    StoreError,
    part_name,
)

# Queries scored per pass over the store when there are many (score of a loader or a store):
# large enough for the top-k kernel's matrix-rate path, small enough for its [block, topk] lists.
QUERY_BLOCK = 1024


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape, bytes): the weights hash."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # (flattened first: a 0-dim tensor, e.g. BatchNorm's num_batches_tracked or a learned
        # temperature, has no last dimension to view as bytes; the bytes are the same)
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class TopInfluence:
    """Top-k influence per query. ``values[q, j]`` = score of store row ``rows[q, j]`` (example
    id ``ids[q, j]``) for query q; empty slots (fewer candidates than topk) have row and id -1
    and value -inf (+inf with ``opponents=True``). Koh & Liang's ``I_up,loss`` is
    ``-values`` (:meth:`koh_liang`); the first-order effect of removing the example is
    ``values / n`` (:meth:`removal_effect`)."""

    values: torch.Tensor
    rows: torch.Tensor
    ids: torch.Tensor
    n: int
    # The queries' example ids (their own, a DataLoader's dataset indices, or stream positions).
    query_ids: torch.Tensor | None = None
    # The solver kind whose F the scores used (None: not known, e.g. made by hand).
    solver: str | None = None

    def koh_liang(self) -> torch.Tensor:
        """Koh & Liang's ``I_up,loss = -score``: the derivative of the query's loss with respect
        to the weight ``eps`` of the example added to the mean training loss
        (``(1/n) sum_j l_j + eps l_i``), with F (Gauss-Newton / empirical Fisher) as that mean
        loss's curvature."""
        return -self.values

    def removal_effect(self, self_influence: np.ndarray | torch.Tensor | None = None
                       ) -> torch.Tensor:
        """The change of the query's loss when the example is left out; positive (a proponent
        removed) raises it. Without ``self_influence``: first order (``eps = -1/n``),
        ``score / n``. With the training rows' self-influences ``s`` (``[n]``, e.g.
        :meth:`InfluenceSSL.self_influence`): ``score / n / (1 - s_i / n)``, the exact change in
        the quadratic model F defines (F without the example's own term, by Sherman-Morrison;
        the other examples keep their weights 1/n). The first-order value underestimates it
        where ``s_i / n`` is not small: examples of high leverage, with dim ~ n or more and
        little damping. Only for ``solver="gauss_newton"``: a block-diagonal or EK-FAC F does
        not lose a rank-one term with the example (each block holds its own leverage, and their
        sum can exceed n). Empty slots stay -inf / +inf."""
        first = self.values / self.n
        if self_influence is None:
            return first
        if self.solver not in (None, "gauss_newton"):
            raise ValueError(
                f"removal_effect(self_influence) is exact for solver='gauss_newton' only (these "
                f"scores used {self.solver!r}, whose F does not lose a rank-one term with the "
                "example): use the first-order removal_effect(), or fit with "
                "solver='gauss_newton'")
        s = torch.as_tensor(np.asarray(self_influence), dtype=torch.float64)
        if s.shape != (self.n,):
            raise ValueError(f"self_influence must be [n] = [{self.n}] (one per store row), got "
                             f"shape {tuple(s.shape)}")
        held = self.rows >= 0
        leverage = torch.zeros(self.rows.shape, dtype=torch.float64)
        leverage[held] = s[self.rows[held]] / self.n
        if bool((leverage >= 1).any()) or bool((leverage < 0).any()):
            raise ValueError("self_influence must be in [0, n): s_i / n < 1 whenever the damping "
                             "is positive (are these another store's or solver's values?)")
        return (first.double() / (1 - leverage)).to(first.dtype)


class InfluenceSSL:
    """Label-free influence for a self-supervised encoder.

    Args:
        encoder: any ``nn.Module``; its output (or ``loss.representation(output)``) is z.
        loss: the per-example loss; default ``AugmentationStability(views=4, seed=0)``.
        projection: how gradients are sketched; default ``Projection("kron", k=256)``.
        solver: ``"identity" | "gauss_newton" | "block" | "ekfac"`` (default).
        track: module / parameter names to track; default every Linear, Conv1d/2d/3d and the two
            projections of every ``nn.MultiheadAttention`` (see capture.build_layout).
        damping: relative damping (x mean eigenvalue); absolute_damping overrides it.
        store_dtype: ``"float16" | "bfloat16" | "float32" | "float64"`` for stored features.
        num_threads: threads for the CPU kernels (default: torch's).
        distributed: split featurize / fit / scans over the ranks of the initialised
            ``torch.distributed`` process group (:mod:`.distributed`; every rank must then call
            the same methods with the same arguments). Default False: this process works
            alone, whatever process group exists (e.g. attribution on rank 0 of a DDP job).

    Device: everything runs where the encoder's parameters are (:attr:`device`, read at each
    call). With the encoder on a GPU, batches are moved there, the sketches and the store scans
    run on the GPU (the store stays a memory-mapped file, streamed through the GPU or held there
    when it fits), and the curvature stays on the CPU in float64 (it is small). A build without
    the CUDA kernels scans on the CPU (:attr:`scan_device`) and cannot featurise on a GPU
    (``ops.BackendUnavailableError`` names what the build lacks). Results (scores, self-influence,
    duplicates) come back as CPU tensors / numpy arrays; :meth:`features` returns ``phi`` on
    the device.
    """

    def __init__(
        self,
        encoder: nn.Module,
        loss: AugmentationStability | None = None,
        projection: Projection | None = None,
        solver: str = "ekfac",
        *,
        track: Iterable[str] | None = None,
        damping: float = 0.1,
        absolute_damping: float | None = None,
        store_dtype: str = "float16",
        num_threads: int | None = None,
        distributed: bool = False,
    ) -> None:
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be True or False, got {distributed!r}")
        if distributed and not (torch.distributed.is_available()
                                and torch.distributed.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed.init_process_group(...) "
                             "first (e.g. under torchrun)")
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        encoder = unwrap_encoder(encoder)
        self.encoder = encoder
        self.loss = loss if loss is not None else AugmentationStability(views=4, seed=0)
        self.projection = projection if projection is not None else Projection("kron", k=256)
        if solver == "ekfac" and self.projection.kind != "kron":
            raise ValueError(
                "solver='ekfac' works in the kron sketch space: use "
                "Projection('kron', ...) or solver='block' / 'gauss_newton'"
            )
        self.layout = build_layout(encoder, track)
        self.featurizer = Featurizer(
            encoder,
            self.layout,
            self.loss,
            self.projection,
            collect_stats=solver == "ekfac",
            num_threads=num_threads,
        )
        self.solver = Solver(solver, self.featurizer.blocks, damping, absolute_damping)
        self.store_dtype = store_dtype
        self.num_threads = num_threads
        self.distributed = distributed
        # The default store of scans: the one fit used, else the last one featurised (so that
        # featurising a test set after fit does not make it the training set).
        self.store: GradientStore | None = None
        self._fitted_store: GradientStore | None = None
        # Every store featurised by this object (resolved paths): fit() without a store is
        # refused when that would have to guess between several.
        self._featurized: set[str] = set()
        # (store content, device, its rows there): repeated scores read them on the GPU instead
        # of streaming the store over PCIe every time.
        self._held: tuple[tuple, torch.Tensor] | None = None
        # (what the weights were when hashed, their hash): see _weights_hash
        self._hashed: tuple[tuple, str] | None = None
        # resolved store path -> (its manifest's SHA-256 when opened, the store): see _store
        self._opened: dict[str, tuple[str, GradientStore]] = {}

    @property
    def device(self) -> torch.device:
        """Where featurisation and store scans run: the encoder's device."""
        return model_device(self.encoder)

    @property
    def scan_device(self) -> torch.device:
        """Where store scans (score, neighbours, duplicates) run: the encoder's GPU when this
        build has the CUDA kernels, else the CPU (the store and the solver live there anyway)."""
        device = self.device
        return device if device.type == "cuda" and has_cuda() else torch.device("cpu")

    @property
    def ranks(self) -> tuple[int, int]:
        """``(rank, world size)`` this object shares its work over; ``(0, 1)`` alone."""
        return distributed.world() if self.distributed else (0, 1)

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return self.featurizer.dim

    def fingerprint(self) -> dict[str, Any]:
        """Everything that determines the stored features."""
        return {
            "model": self._weights_hash(),
            "layout": self.layout.describe(),
            "loss": self.loss.config(),
            "projection": self.projection.config(),
            "hash_version": HASH_VERSION,
            "kfac_stats": self.featurizer.collect_stats,
        }

    def _weights_hash(self, refresh: bool = False) -> str:
        """:func:`model_fingerprint` of the encoder, hashed again only when the weights changed
        since the last call, as far as a cheap key tells: every parameter's and buffer's storage,
        in-place version counter, and a sample of its values (updates through ``p.data``, as
        momentum encoders are written, or a fused optimiser, leave the version counter as it
        was). Every scan checks its store with it; ``refresh`` (featurize, which stamps stores
        with it): hash all the bytes whatever the key says."""
        tensors = list(self.encoder.state_dict(keep_vars=True).items())
        meta = tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.device)
                     for name, t in tensors)
        key = (meta, _value_sample(t for _, t in tensors))
        if refresh or self._hashed is None or self._hashed[0] != key:
            self._hashed = (key, model_fingerprint(self.encoder))
        return self._hashed[1]

    # -- features ---------------------------------------------------------------------------------
    def features(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient features ``[B, dim]`` of a batch, on the encoder's device (ids default to
        0..B-1: pass the examples' own ids when their augmentations must match the store's)."""
        if ids is None:
            ids = torch.arange(x.shape[0])
        return self.featurizer(x, torch.as_tensor(ids, dtype=torch.int64))[0]

    def featurize(
        self,
        data: Iterable[Any],
        path: str | os.PathLike,
        *,
        shard_rows: int = 4096,
        progress: bool = True,
        append: bool = False,
        recheck: int = RECHECK_ROWS,
    ) -> GradientStore:
        """Features of every example of ``data`` into a store at ``path``; resumes a store left
        incomplete by a crash (the data must come in the same order: the ids of the rows it
        holds are checked). Returns the store. Examples' ids and order: :mod:`.loading` (a
        ``DataLoader`` is read by dataset index, a shuffling one in index order).

        A complete store at ``path`` is returned as it is when the data have as many examples
        (known for a ``DataLoader``; other iterables are not read again); more or fewer is a
        :class:`StoreError`. ``append=True`` adds the examples after the stored ones (the data
        set grew): the stored ones must come first, in the same order (their ids are checked as
        on a resume, without loading them where the loader's indices show it: a data set whose
        new examples are sorted in among the old ones, e.g. a grown ImageFolder, renumbers them
        and needs a new store). The store is marked incomplete only when the first new rows
        arrive and marked complete again if the run fails before a new shard is written; a
        crash after that resumes (run the same call again). New shards have ``shard_rows``
        rows. Call :meth:`fit` again afterwards.

        A store met again (resumed, appended to, or complete) is checked against the data by
        featurising ``recheck`` of its examples again (evenly spread, the last one always among
        them; 0: none): an example that no longer matches its stored row (data renumbered or
        replaced, or a dataset with random transforms) is a :class:`StoreError`
        (:mod:`.recheck`). A complete store is checked when the data are a ``DataLoader`` read
        by dataset index (other iterables are not read again).

        Distributed (:attr:`ranks`): every rank passes the same data and path; each featurises
        its share of the batches into ``path/part-<rank>-of-<world>`` and rank 0 joins the
        parts into one store (:mod:`.distributed`); a crash resumes with the same world size."""
        self.release_device_memory()  # the GPU memory goes to the model while it featurises
        if not isinstance(append, bool):
            raise TypeError(f"append must be True or False, got {append!r}")
        recheck = count(recheck, "recheck (stored examples featurised again)", minimum=0)
        rank, size = self.ranks
        if size > 1:
            if append:
                raise ValueError("append=True is for one process: featurize the new examples "
                                 "into a store of their own, or append without distributed")
            store = self._featurize_distributed(data, Path(path), shard_rows, progress,
                                                recheck)
        else:
            # (a new store: refuse bad samplers before its directory is made)
            examples = (None if (Path(path) / MANIFEST).exists()
                        else loading.Examples(data, unique=True))
            self._weights_hash(refresh=True)  # (stores are stamped with it: all bytes hashed)
            store = GradientStore.create_or_resume(
                path, self.fingerprint(), self.dim, self.store_dtype, shard_rows, reopen=append
            )
            check = self._recheck(store, recheck)
            if store.complete and not append:  # (its samplers are not judged again)
                _check_complete_store(store, loading.Examples(data), check)
            else:
                try:
                    examples = examples or loading.Examples(data, unique=True)
                    # (appending: the store is reopened by the first new rows, once the stored
                    # examples have been checked against the data)
                    pieces = examples.after(store.rows, store.ids(), str(path),
                                            what="store" if store.complete else "incomplete store",
                                            recheck=check)
                except BaseException:
                    store.close()  # resumable: the writer's lock goes
                    raise
                self._featurize_into(store, pieces, examples.total, progress)
        self.store = store
        self._featurized.add(str(store.path.resolve()))
        return store

    def _recheck(self, store: GradientStore, rows: int) -> Recheck | None:
        """The check of ``rows`` of ``store``'s examples against the data (:mod:`.recheck`)."""
        return store_recheck(store, lambda x, ids: self.featurizer(x, ids)[0], rows)

    def _featurize_into(self, store: GradientStore, pieces: Iterable[loading.Piece],
                        total: int | None, progress: bool, desc: str = "featurize",
                        check: Callable[[], None] | None = None,
                        finalize: bool = True) -> None:
        """Appends the features of ``(x, ids, stream position)`` pieces (those after the rows
        the store holds, :meth:`.loading.Examples.after`) to ``store`` and completes it
        (``finalize``); ``check`` runs before each piece (it raises to stop)."""
        from tqdm.auto import tqdm

        try:
            with tqdm(total=total, initial=store.rows, unit="ex", desc=desc,
                      disable=not progress) as bar:
                for x, ids, _ in pieces:
                    if check is not None:
                        check()
                    if x.shape[0] == 0:  # (a collate that filters may leave a batch empty)
                        continue
                    phi, stats = self.featurizer(x, ids)
                    if store.complete:  # append=True: the first new rows (GradientStore.reopen)
                        store.reopen()
                    store.append(phi, ids, stats)
                    bar.update(x.shape[0])
        except BaseException:
            store.close()  # resumable: the durable shards stay, the writer's lock goes
            raise
        if finalize:
            store.finalize()

    def _featurize_distributed(self, data: Iterable[Any], path: Path, shard_rows: int,
                               progress: bool, recheck: int) -> GradientStore:
        """Every rank featurises its blocks of the stream into its part store; rank 0 then
        lists every part's shards, in turn, in the store's manifest (stream order)."""
        rank, size = self.ranks
        fingerprint = self.fingerprint()
        # (dim and store_dtype too: parts of other layouts are refused only when rank 0 joins
        # them, after all the work, and the finished odd part then blocks the corrected rerun)
        settings = dict(fingerprint, dim=self.dim, store_dtype=self.store_dtype)
        distributed.same_on_all_ranks(
            hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
            .hexdigest(), "the encoder's weights, layers, loss, projection (fingerprint), "
            "dim or store_dtype")
        failures = distributed.PeerFailures(path, rank)
        done: GradientStore | None = None
        with distributed.together("featurize: open"):
            if (path / MANIFEST).exists():  # a finished store (or a one-process one)
                done = GradientStore.open(path, fingerprint=fingerprint, verify=False,
                                          require_complete=False)
                if not done.complete:
                    raise StoreError(f"store at {path} was started by one process: finish it "
                                     "with one process (distributed=False) or remove it")
                done.check_layout(self.dim, self.store_dtype, None)
                # As one process checks a complete store met again: as many examples, and a
                # sample of them featurised again. Every rank checks its own data (in parallel:
                # no longer than rank 0 alone), so a rank given other data fails here too.
                _check_complete_store(done, loading.Examples(data, rank, size, shard_rows),
                                      self._recheck(done, recheck))
            else:
                _check_part_directory(path, size)
                if rank == 0:
                    failures.clear()
        if done is not None:
            return done
        part: GradientStore | None = None
        try:
            with distributed.together("featurize: parts"):
                batches = loading.Examples(data, rank, size, shard_rows, unique=True)
                path.mkdir(parents=True, exist_ok=True)
                part = GradientStore.create_or_resume(path / part_name(rank, size), fingerprint,
                                                      self.dim, self.store_dtype, batches.block)
            self._featurize_part(part, batches, failures, progress and rank == 0, size,
                                 self._recheck(part, recheck))
        except BaseException:
            if part is not None:  # resumable; its writer's lock goes (a rerun here takes it)
                part.close()
            raise
        with distributed.together("featurize: join the parts"):
            if rank == 0:
                parts = [GradientStore.open(path / part_name(r, size), verify=False)
                         for r in range(size)]
                GradientStore.from_parts(path, parts)
        with distributed.together("featurize: open the store"):
            store = GradientStore.open(path, fingerprint=fingerprint, verify=False)
        return store

    def _featurize_part(self, part: GradientStore, batches: loading.Examples,
                        failures: distributed.PeerFailures, progress: bool, size: int,
                        recheck: Recheck | None) -> None:
        """This rank's part: featurised, then (once every rank read the same stream) finished."""
        distributed.same_on_all_ranks(batches.digest, "the data loader's order of examples or "
                                      "their values (a custom sampler must draw the same on "
                                      "every rank, and the dataset hold the same examples: "
                                      "e.g. give random_split a seeded generator, and keep "
                                      "random transforms out of the dataset's __getitem__; "
                                      "the views come from the loss's augment)")
        with distributed.together("featurize"):
            try:
                if not part.complete:
                    pieces = batches.after(part.rows, part.ids(), str(part.path),
                                           recheck=recheck)
                    self._featurize_into(part, pieces, batches.rows, progress,
                                         desc=f"featurize (rank 0 of {size})",
                                         check=failures.check, finalize=False)
            except Exception as exc:
                failures.record(exc)  # the other ranks stop at their next batch
                raise
        # The stream every rank read (a plain iterable's is known now; a finished part kept
        # its own), compared before any part is finished: a mismatch leaves them resumable.
        digest = batches.digest if not part.complete else part.meta.get("stream")
        distributed.same_on_all_ranks(digest, "the data stream (batch sizes, ids, values)")
        with distributed.together("featurize: finish the parts"):
            if not part.complete:
                part.finalize(meta={"stream": digest})

    def _same_arguments(self, call: str, /, **arguments: Any) -> None:
        """Distributed: raises on every rank unless every rank called ``call`` with the same
        ``arguments`` (:func:`_described`), before any collective: another topk meets in the
        gathers with other shapes and aborts every process (gloo), another threshold or k gives
        each rank another answer, and a step taken by some ranks only leaves the others
        waiting."""
        if self.ranks[1] > 1:
            distributed.same_on_all_ranks(
                repr({name: _described(value) for name, value in arguments.items()}),
                f"the {', '.join(arguments)} passed to {call}")

    # -- curvature and scores ---------------------------------------------------------------------
    def _store(self, store: GradientStore | str | os.PathLike | None) -> GradientStore:
        """The training store a scan or fit reads (default: the one fit used, else the last
        one featurised), checked against the encoder as it is now: features of other weights
        (trained further, or another checkpoint loaded) do not mix with new queries'."""
        if store is None:
            store = self._fitted_store if self._fitted_store is not None else self.store
            if store is None:
                raise ValueError("no store: call featurize(...) first or pass store=")
        if isinstance(store, GradientStore):
            store.check_fingerprint(self.fingerprint())
            return store
        rank, size = self.ranks
        if size == 1:
            # A path met again, its manifest unchanged: the store opened then (its shards were
            # checksummed then; a path per call would hash the whole store every scan).
            key = str(Path(store).resolve())
            try:
                seen: str | None = hashlib.sha256((Path(key) / MANIFEST).read_bytes()).hexdigest()
            except OSError:
                seen = None
            cached = self._opened.get(key)
            if seen is not None and cached is not None and cached[0] == seen:
                cached[1].check_fingerprint(self.fingerprint())
                return cached[1]
            opened = GradientStore.open(key, fingerprint=self.fingerprint())
            if seen is not None:
                self._opened[key] = (seen, opened)
            return opened
        with distributed.together("opening the store"):  # each rank checksums its share
            opened = GradientStore.open(store, fingerprint=self.fingerprint(), verify=False)
            opened.verify(shards=range(rank, opened.num_shards, size))
        return opened

    def fit(self, store: GradientStore | str | os.PathLike | None = None) -> InfluenceSSL:
        """Fit the curvature (and damping) on a store's features (default: the store this
        object featurised; with several, pass the training store); scans then default to it."""
        if store is None:
            known = set(self._featurized)
            if self._fitted_store is not None:
                known.add(str(self._fitted_store.path.resolve()))
            if len(known) > 1:
                raise ValueError(f"fit() has {len(known)} stores to choose from "
                                 f"({sorted(known)[:3]}): pass the training store, fit(store)")
            if self.store is None:
                raise ValueError("no store: call featurize(...) first or pass store=")
        store = self._store(store if store is not None else self.store)
        self.release_device_memory()
        rank, size = self.ranks
        if size > 1:  # each rank sums its rows; the sums are added over the ranks
            # Before the all-reduce: other solver kinds sum other shapes (gloo aborts every
            # process), and another damping or store would silently give each rank its own F.
            solver = self.solver
            distributed.same_on_all_ranks(
                json.dumps([solver.kind, solver.damping, solver.absolute_damping, store.rows,
                            store.dim, store.content_key[1]]),
                "the solver, damping, absolute_damping or store (its rows) fitted")
            with distributed.together("fit"):
                sums = self.solver.accumulate(store,
                                              distributed.row_range(store.rows, rank, size))
            sums = [distributed.all_reduce_sum(t) for t in sums]
            with distributed.together("fit"):
                self.solver.finish(store, sums)
        else:
            self.solver.fit(store)
        self.store = self._fitted_store = store
        return self

    def preconditioned(
        self, queries: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``F^-1 phi_t`` for a batch of query inputs, float32 ``[m, dim]`` on the CPU
        (distributed: rank 0's, on every rank, so that all ranks score the same queries)."""
        if self.ranks[1] == 1:
            return self._precondition_here(queries, ids)
        with distributed.together("preconditioned"):
            q = self._precondition_here(queries, ids)
        distributed.same_on_all_ranks(str(tuple(q.shape)), "the queries' shape")
        return distributed.broadcast(q)

    def _precondition_here(self, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """``F^-1 phi`` of a batch, float32 on the CPU, by this process alone."""
        return self.solver.precondition(self.features(x, ids)).float().contiguous()

    def score(
        self,
        queries: torch.Tensor | GradientStore | Iterable[Any],
        topk: int = 10,
        *,
        ids: torch.Tensor | None = None,
        store: GradientStore | None = None,
        opponents: bool = False,
        exclude_rows: torch.Tensor | None = None,
    ) -> TopInfluence:
        """Top-k training examples per query by ``score = phi_t^T F^-1 phi_i``: the proponents
        (most positive), or with ``opponents=True`` the most negative ones. ``store``: the
        training store (default: the one :meth:`fit` used).

        ``queries``: a batch of inputs ``[m, ...]`` (``ids``: their example ids, for their
        augmentations); or many: an iterable of batches as :meth:`featurize` takes (a test
        ``DataLoader``), or a complete :class:`GradientStore` of query features made by this
        object's :meth:`featurize` (e.g. a test set featurised once; its features carry the
        store's precision). Many queries are scored in blocks of :data:`QUERY_BLOCK`, one
        pass over the training store per block (not per batch). ``exclude_rows``: ``[m]`` or
        ``[m, e]`` store rows each query must not return (-1: none), e.g. its own row when the
        queries are the training set. ``query_ids`` of the result: the queries' ids (see
        :mod:`.loading`: their own, a ``DataLoader``'s dataset indices, or stream positions)."""
        topk = count(topk, "topk")
        store = self._store(store)
        if isinstance(queries, torch.Tensor):
            q = self.preconditioned(queries, ids)
            top = self.topk_from_preconditioned(
                -q if opponents else q, topk, store, negate=opponents, exclude_rows=exclude_rows
            )
            top.query_ids = (torch.arange(q.shape[0]) if ids is None
                             else torch.as_tensor(ids, dtype=torch.int64).reshape(-1))
            return top
        if ids is not None:
            raise ValueError("ids= is for a batch tensor: many queries carry their own ids (or "
                             "are numbered by their position)")
        exclude = None if exclude_rows is None else _exclusions(exclude_rows, store.rows)
        if (isinstance(queries, GradientStore) and exclude is not None
                and exclude.shape[0] != queries.rows):
            raise ValueError(f"exclude_rows must have one row per query: it has "
                             f"{exclude.shape[0]}, the query store {queries.rows}")
        blocks = self._query_blocks(queries)
        store_ids = store.ids()
        parts: list[TopInfluence] = []
        done = 0
        for q, q_ids in blocks:
            ex = None
            if exclude is not None:
                ex = exclude[done:done + q.shape[0]]
                if ex.shape[0] != q.shape[0]:
                    raise ValueError(f"exclude_rows must have one row per query: it has "
                                     f"{exclude.shape[0]}, there are more queries")
            part = self.topk_from_preconditioned(-q if opponents else q, topk, store,
                                                 negate=opponents, exclude_rows=ex,
                                                 store_ids=store_ids)
            part.query_ids = q_ids
            parts.append(part)
            done += q.shape[0]
        if exclude is not None and exclude.shape[0] != done:
            raise ValueError(f"exclude_rows must have one row per query: it has "
                             f"{exclude.shape[0]}, there are {done} queries")
        if not parts:  # no queries
            empty = torch.zeros(0, topk, dtype=torch.int64)
            return TopInfluence(torch.zeros(0, topk, dtype=torch.float32), empty, empty.clone(),
                                store.rows, torch.zeros(0, dtype=torch.int64),
                                self.solver.kind)
        return TopInfluence(torch.cat([t.values for t in parts]),
                            torch.cat([t.rows for t in parts]),
                            torch.cat([t.ids for t in parts]), store.rows,
                            torch.cat([t.query_ids for t in parts
                                       if t.query_ids is not None]), self.solver.kind)

    def _query_blocks(self, queries: GradientStore | Iterable[Any]
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(F^-1 phi [<=QUERY_BLOCK, dim] float32, ids)`` blocks of many queries, in order: a
        query store's rows, or the batches of an iterable featurised here (distributed: by the
        ranks in turns, :meth:`_shared_query_blocks`)."""
        if isinstance(queries, GradientStore):
            self._check_query_store(queries)
            query_ids = queries.ids()
            return _blocks_of(((self.solver.precondition(rows).float(),
                                torch.from_numpy(query_ids[first:first + rows.shape[0]]))
                               for rows, first in queries.iter_rows(QUERY_BLOCK, torch.float64)),
                              QUERY_BLOCK)
        if self.ranks[1] > 1:
            return self._shared_query_blocks(queries)
        return _blocks_of(self._preconditioned_batches(queries), QUERY_BLOCK)

    def _check_query_store(self, queries: GradientStore) -> None:
        if not queries.complete:
            raise StoreError(f"query store at {queries.path} is incomplete ({queries.rows} rows "
                             "written): run featurize again to finish it")
        queries.check_fingerprint(self.fingerprint(), what="query store")

    def _shared_query_blocks(self, data: Iterable[Any]
                             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Distributed: ``(F^-1 phi [<=QUERY_BLOCK, dim], ids)`` blocks of the queries of
        ``data`` in stream order, on every rank; the ranks take turns featurising them (block j
        is rank j % W's, :class:`.loading.Examples`) and share each round's blocks."""
        rank, size = self.ranks
        with distributed.together("score: queries"):
            batches = loading.Examples(data, rank, size, QUERY_BLOCK, balance=False)
        distributed.same_on_all_ranks(batches.digest, "the queries' loader order or values")
        mine = self._own_query_blocks(batches)
        empty = (torch.zeros(0, self.dim, dtype=torch.float32), torch.zeros(0, dtype=torch.int64))
        while True:  # one round: every rank's next block (block round * W + rank)
            with distributed.together("score: queries"):
                q, ids = next(mine, empty)
            q_all = distributed.all_gather_rows(q)
            if not any(len(q_r) for q_r in q_all):
                break
            for q_r, ids_r in zip(q_all, distributed.all_gather_rows(ids)):
                if len(q_r):
                    yield q_r, ids_r
        # a plain iterable's content is known once read to the end
        distributed.same_on_all_ranks(batches.digest, "the query stream")

    def _own_query_blocks(self, batches: loading.Examples
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's blocks of ``batches``, preconditioned here (no collectives)."""
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        current = -1
        for x, ids, position in batches:
            block = position // batches.block
            if pending and block != current:
                yield torch.cat([q for q, _ in pending]), torch.cat([i for _, i in pending])
                pending = []
            current = block
            pending.append((self._precondition_here(x, ids), ids.to(torch.int64)))
        if pending:
            yield torch.cat([q for q, _ in pending]), torch.cat([i for _, i in pending])

    def _preconditioned_batches(self, data: Iterable[Any]
                                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(F^-1 phi [B, dim] float32, ids [B])`` per batch of ``data``."""
        for x, ids, _ in loading.Examples(data):
            yield self.preconditioned(x, ids), ids

    def topk_from_preconditioned(
        self,
        q: torch.Tensor,
        topk: int,
        store: GradientStore | None = None,
        *,
        negate: bool = False,
        exclude_rows: torch.Tensor | None = None,
        store_ids: np.ndarray | None = None,
    ) -> TopInfluence:
        """Streaming top-k of ``q @ phi_i`` over a store's shards (memory independent of n), on
        :attr:`scan_device`. On a GPU the store's rows are held there after the first call when
        they fit (:meth:`release_device_memory` drops them), else each call streams the shards
        from the memory-mapped files. The result is on the CPU. Distributed: each rank scans its
        range of rows, and the ranks' top-k lists are merged (every rank gets the result).
        ``store_ids``: ``store.ids()`` when the caller has them already."""
        store = self._store(store)
        if exclude_rows is not None:  # (checked as for many queries: out of range is an error)
            exclude_rows = _exclusions(exclude_rows, store.rows)
            if exclude_rows.shape[0] != q.shape[0]:
                raise ValueError(f"exclude_rows must have a row per query ({q.shape[0]}), got "
                                 f"shape {tuple(exclude_rows.shape)}")
        rank, size = self.ranks
        if size > 1:  # (different shapes would meet in the gathers below and abort the ranks;
            # other exclusions would give each rank's range of rows other answers)
            distributed.same_on_all_ranks(str((tuple(q.shape), topk, negate,
                                               _described(exclude_rows))),
                                          "the queries' shape, topk, negate or exclude_rows")
        span = distributed.row_range(store.rows, rank, size)
        with distributed.together("score") if size > 1 else nullcontext():
            values, rows = self._scan(q, topk, store, span, exclude_rows)
        if size > 1:
            values, rows = distributed.merge_topk(distributed.all_gather(values),
                                                  distributed.all_gather(rows), topk)
        all_ids = torch.from_numpy(store.ids() if store_ids is None else store_ids)
        ids = torch.full_like(rows, -1)
        if len(all_ids):  # (an empty store returns only empty slots)
            ids = torch.where(rows >= 0, all_ids[rows.clamp(min=0)], ids)
        return TopInfluence(-values if negate else values, rows, ids, store.rows,
                            solver=self.solver.kind)

    def _scan(self, q: torch.Tensor, topk: int, store: GradientStore, span: tuple[int, int],
              exclude_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of ``q @ phi_i`` over the store rows ``span``: (values, rows), on the CPU."""
        q = q.to(self.scan_device)
        held = self._held_rows(store, span)
        shards = [(held, span[0])] if held is not None else store.shards(span)
        if held is None and store.dtype == "float64":  # exactness tests: scored in float32
            shards = ((np.asarray(arr, dtype=np.float32), first) for arr, first in shards)
        return ops.score_topk_parts(q, shards, topk, exclude=exclude_rows,
                                    num_threads=self.num_threads)

    def _held_rows(self, store: GradientStore, span: tuple[int, int]) -> torch.Tensor | None:
        """The store's rows ``span`` on the scan GPU, copied there on first use and kept while
        the same store is scanned, when they fit (:mod:`.residency`); None on the CPU or when
        they don't (then each scan streams the shards through the GPU)."""
        device = self.scan_device
        if device.type != "cuda":
            return None
        key = (store.content_key, span, device)
        if self._held is not None and self._held[0] == key:
            return self._held[1]
        self._held = None  # another store or device: free the old copy before sizing the new
        dtype = torch.float32 if store.dtype == "float64" else getattr(torch, store.dtype)
        nbytes = (span[1] - span[0]) * store.dim * dtype.itemsize
        if not store.complete or not residency.fits(device, nbytes):
            return None
        self._held = (key, store.load_to(device, dtype, rows=span))
        return self._held[1]

    def release_device_memory(self) -> None:
        """Drops the copy of the store that scores keep on the GPU (it is rebuilt when needed)."""
        self._held = None

    def score_matrix(
        self,
        queries: torch.Tensor,
        *,
        ids: torch.Tensor | None = None,
        store: GradientStore | None = None,
        normalised: bool = False,
    ) -> torch.Tensor:
        """Full ``[m, n]`` float64 score matrix (for small problems and tests); with
        ``normalised`` the cosine form ``score / sqrt(s_i s_t)``."""
        store = self._store(store)
        phi = self.features(queries, ids).cpu()
        q = self.solver.precondition(phi)
        S = torch.cat([q @ rows.T for rows, _ in store.iter_rows(dtype=torch.float64)], dim=1)
        if normalised:
            s_t = (q * phi.double()).sum(dim=1)
            s_i = torch.from_numpy(self.self_influence(store))
            S = S / torch.sqrt(torch.outer(s_t, s_i)).clamp(min=1e-300)
        return S

    def self_influence(self, store: GradientStore | None = None) -> np.ndarray:
        """``s_i = phi_i^T F^-1 phi_i`` for every store row, float64 ``[n]`` (distributed: each
        rank computes its range of rows; every rank gets them all)."""
        store = self._store(store)
        rank, size = self.ranks
        if size == 1:
            return self.solver.store_quad(store)
        with distributed.together("self_influence"):
            local = self.solver.store_quad(store, distributed.row_range(store.rows, rank, size))
        return distributed.gather_rows(local, store.rows)

    # -- applications -----------------------------------------------------------------------------
    def neighbours(self, topk: int = 5, store: GradientStore | None = None, *,
                   data: Iterable[Any] | None = None,
                   transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
                   search: apps.ClusteredSearch | apps.ClusteredIndex | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Each training example's ``topk`` most similar others by normalised influence:
        ``(similarity [n, topk], rows [n, topk])``.

        ``transforms`` (e.g. ``apps.translations(1)``): each example is also featurised as
        ``t(x)`` for every transform and compared with the store, and a neighbour keeps its best
        similarity, so copies that differ by such a transform (a one-pixel shift) are found.
        Needs ``data``, the examples as given to :meth:`featurize` (their ids locate the rows; a
        re-iterable such as a list or a DataLoader); costs one featurisation pass over ``data``
        and one top-k pass over the store per transform. ``data`` is unused without transforms.

        ``search``: approximate, for large stores (``apps.ClusteredSearch(probes=...)``): each
        example is compared with the examples of the few clusters nearest to it instead of all
        of them (:mod:`.apps.clustered`; the similarities found are exact, a neighbour in a
        cluster not probed is missed). The index is built once for all transforms; pass one
        built by ``apps.clustered_index`` to search it again (e.g. for duplicates, then
        outliers).
        """
        self._same_arguments("neighbours", topk=topk, data=data is not None,
                             transforms=transforms, search=search)
        if transforms:
            if data is None:
                raise ValueError("transforms need data=: the training examples, as given to "
                                 "featurize")
            if iter(data) is data:  # a generator would be empty after one transform
                raise TypeError("data must be re-iterable (e.g. a list or a DataLoader), not a "
                                "one-shot iterator: it is read once per transform")
        store = self._store(store)
        self.release_device_memory()  # the scans hold their own (normalised) copy
        rank, size = self.ranks
        # shared by every rank and pass
        s = (self.self_influence(store)
             if size > 1 or transforms or isinstance(search, apps.ClusteredSearch) else None)
        index = (apps.clustered_index(store, self.solver, search, self.num_threads,
                                      self_influence=s, device=self.scan_device)
                 if isinstance(search, apps.ClusteredSearch) else search)
        span = distributed.row_range(store.rows, rank, size)
        with distributed.together("neighbours") if size > 1 else nullcontext():
            result = apps.normalised_neighbours(store, self.solver, topk, self.num_threads,
                                                self_influence=s, device=self.scan_device,
                                                rows=span, search=index)
        if size > 1:  # each rank found its range's neighbours
            result = (distributed.gather_rows(result[0][span[0]:span[1]], store.rows),
                      distributed.gather_rows(result[1][span[0]:span[1]], store.rows))
        for t in transforms:
            assert data is not None  # checked above
            if size == 1:
                found = apps.transformed_neighbours(
                    store, self.solver, self._transformed_queries(store, loading.Examples(data), t),
                    topk, self.num_threads, self_influence=s, device=self.scan_device,
                    search=index)
                result = apps.merge_neighbours(result, found)
                continue
            with distributed.together("neighbours"):  # each rank featurises its share of data
                batches = loading.Examples(data, rank, size, store.shard_rows)
                found = apps.transformed_neighbours(
                    store, self.solver, self._transformed_queries(store, batches, t), topk,
                    self.num_threads, self_influence=s, device=self.scan_device, search=index)
            distributed.same_on_all_ranks(batches.digest, "the data stream")
            # each rank found the rows of its examples: only those rows travel
            mine = np.flatnonzero((found[1] >= 0).any(axis=1))
            sims = distributed.all_gather_rows(torch.from_numpy(found[0][mine]))
            nbrs = distributed.all_gather_rows(torch.from_numpy(found[1][mine]))
            where = distributed.all_gather_rows(torch.from_numpy(mine.astype(np.int64)))
            result = (result[0].copy(), result[1].copy())
            for v, i, r in zip(sims, nbrs, where):
                if len(r):
                    apps.merge_rows(result[0], result[1], r.numpy(), v.numpy(), i.numpy())
        return result

    def _transformed_queries(
        self, store: GradientStore,
        batches: Iterable[loading.Piece],
        transform: Callable[[torch.Tensor], torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(features of transform(x), store rows)`` per ``(x, ids, position)`` piece."""
        ids_all = store.ids()
        order = np.argsort(ids_all, kind="stable")
        sorted_ids = ids_all[order]
        for x, ids, _ in batches:
            pos = np.minimum(np.searchsorted(sorted_ids, ids.numpy()), max(len(sorted_ids) - 1, 0))
            missing = ids.numpy()[sorted_ids[pos] != ids.numpy()] if len(sorted_ids) else ids
            if len(missing):
                raise ValueError(f"data has example ids the store does not: {missing[:5].tolist()}")
            yield self.features(transform(x), ids), torch.from_numpy(order[pos])

    def find_duplicates(self, threshold: float = 0.9, topk: int = 5,
                        store: GradientStore | None = None, *,
                        neighbours: tuple[np.ndarray, np.ndarray] | None = None,
                        data: Iterable[Any] | None = None,
                        transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
                        search: apps.ClusteredSearch | apps.ClusteredIndex | None = None
                        ) -> apps.DuplicatePairs:
        """Training pairs with normalised influence >= threshold (see apps.duplicates);
        ``data``/``transforms``/``search`` as in :meth:`neighbours`."""
        self._same_arguments("find_duplicates", threshold=threshold, topk=topk,
                             neighbours=neighbours, data=data is not None,
                             transforms=transforms, search=search)
        apps.duplicates.check_threshold(threshold)  # before any scan
        store = self._store(store)
        if neighbours is not None and (transforms or search is not None):
            raise ValueError("pass either neighbours= (precomputed) or transforms=/search=, "
                             "not both")
        if neighbours is None:
            neighbours = self.neighbours(topk, store, data=data, transforms=transforms,
                                         search=search)
        return apps.find_duplicates(store, self.solver, threshold=threshold,
                                    topk=topk, num_threads=self.num_threads,
                                    neighbours=neighbours, device=self.scan_device)

    def find_outliers(self, method: str = "neighbours", *, k: int = 5,
                      normalisation: str | None = "robust", store: GradientStore | None = None,
                      neighbours: tuple[np.ndarray, np.ndarray] | None = None,
                      search: apps.ClusteredSearch | apps.ClusteredIndex | None = None
                      ) -> apps.OutlierRanking:
        """Training examples ranked from most to least outlying, by ``"neighbours"`` (1 - the
        normalised influence of the k-th most similar example; ``search`` as in
        :meth:`neighbours`) or ``"self_influence"``."""
        self._same_arguments("find_outliers", method=method, k=k, normalisation=normalisation,
                             neighbours=neighbours, search=search)
        store = self._store(store)
        if method == "self_influence":
            scores = self.self_influence(store)
        elif method == "neighbours":
            if (not isinstance(k, numbers.Integral) or isinstance(k, bool)
                    or not 1 <= k < max(store.rows, 2)):
                raise ValueError(f"k must be an int in [1, {max(store.rows - 1, 1)}] (the k-th "
                                 f"nearest other example of the store's {store.rows}), got {k!r}")
            k = int(k)
            sim, _ = neighbours or self.neighbours(k, store, search=search)
            scores = apps.neighbour_scores(sim, k)
        else:
            raise ValueError(f"method must be one of {apps.outliers.METHODS}, got {method!r}")
        return apps.find_outliers(scores, store.ids(), normalisation=normalisation)

    def group_influence(self, train_groups: np.ndarray,
                        queries: torch.Tensor | GradientStore | Iterable[Any] | None = None,
                        test_groups: np.ndarray | None = None, *, ids: torch.Tensor | None = None,
                        n_boot: int = 1000, store: GradientStore | None = None,
                        seed: int = 0) -> apps.GroupInfluence:
        """Self-influence per training group and, with queries and their groups, the cross-group
        influence matrix, with bootstrap confidence intervals (see apps.fairness).

        ``train_groups [n]``: the group of each store row (a ``DataLoader``'s rows are in
        dataset order, :mod:`.loading`). ``queries``: a batch ``[m, ...]`` (``ids``: their
        example ids), or many, as :meth:`score` takes them (a test loader or a query store),
        read in blocks; ``test_groups [m]``: the group of each query, in the order read."""
        store = self._store(store)
        s = self.self_influence(store)
        q: torch.Tensor | Iterator[torch.Tensor] | None = None
        if isinstance(queries, torch.Tensor):
            q = self.preconditioned(queries, ids)
        elif queries is not None:
            if ids is not None:
                raise ValueError("ids= is for a batch tensor: many queries carry their own ids")
            how = loading.random_set(queries)
            if how is not None:  # test_groups could not follow an order drawn here
                raise ValueError(f"group_influence: the test DataLoader's {how}, so test_groups "
                                 "cannot follow the order its queries are read in: pass "
                                 "shuffle=False or a fixed subset (torch.utils.data.Subset)")
            q = (block for block, _ in self._query_blocks(queries))
        return apps.group_influence(store, s, np.asarray(train_groups),
                                    preconditioned_queries=q, test_groups=test_groups,
                                    n_boot=n_boot, seed=seed)


def _described(value: Any) -> Any:
    """``value`` as ranks can compare it: arrays by a hash of their values, dataclasses (the
    transforms, ``ClusteredSearch``) by their fields, a built index by its settings and size,
    other callables by name (their repr holds an address, another in every process)."""
    if isinstance(value, (list, tuple)):
        return [_described(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        a = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        a = np.ascontiguousarray(a)
        return (a.dtype.str, a.shape, hashlib.sha256(a.tobytes()).hexdigest())
    if isinstance(value, apps.ClusteredIndex):
        return ("ClusteredIndex", repr(value.search), value.n_clusters, value.store.rows)
    if is_dataclass(value) and not isinstance(value, type):
        return repr(value)
    if callable(value):
        return getattr(value, "__qualname__", type(value).__qualname__)
    return repr(value)


def _check_complete_store(store: GradientStore, examples: loading.Examples,
                          recheck: Recheck | None) -> None:
    """A complete store met again by featurize holds the data's examples, when that can be
    told without reading them all: a re-made DataLoader whose dataset indices the store's ids
    are (a collate function that drops rows, or batches with ids of their own, leave it
    unjudged) has as many, and ``recheck``'s sample of them matches; else :class:`StoreError`."""
    planned = examples.planned_indices()
    if planned is None:
        return
    stored = store.ids()
    if len(planned) == store.rows:
        if np.array_equal(planned, stored):
            examples.recheck_stored(stored, recheck, str(store.path), "store")
        return
    common = min(len(planned), len(stored))
    if not np.array_equal(planned[:common], stored[:common]):
        return  # not the store of these indices: nothing to tell without reading the data
    if len(planned) > store.rows:  # grown, or batches with ids of their own that drop rows
        last, batches = examples.last_batch(), examples.batches or []
        if (last is not None and batches and last[0].shape[0] != len(batches[-1])
                and np.isin(last[1].numpy(), stored).all()):
            return  # its collate dropped rows (where added examples would be), all stored
    hint = ("pass append=True to add the examples after its own" if len(planned) > store.rows
            else "featurize these data into another path")
    raise StoreError(f"the store at {store.path} is complete with {store.rows} examples, but "
                     f"the data have {len(planned)}: {hint}, or remove the store")


# Values of each weight tensor in the weights hash's cache key (evenly strided): an update that
# moves every value (an optimiser or momentum step) shows in them.
SAMPLED_VALUES = 64


def _value_sample(tensors: Iterable[torch.Tensor]) -> bytes:
    """The bytes of :data:`SAMPLED_VALUES` evenly strided values of each tensor, gathered per
    device and copied to the host once (not a copy of the weights)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // SAMPLED_VALUES)
            by_device.setdefault(t.device, []).append(
                flat[::step][:SAMPLED_VALUES].to(torch.float64))
    return b"".join(torch.cat(parts).cpu().numpy().tobytes()
                    for _, parts in sorted(by_device.items(), key=lambda kv: str(kv[0])))


def unwrap_encoder(encoder: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` / ``DistributedDataParallel`` / ``DataParallel`` wrapper
    runs (the same parameters): attribution hooks every layer and runs eagerly anyway (a
    compiled graph would break at each hook, and DDP would all-reduce gradients nobody asked
    for), and its layer names then carry no wrapper prefix (``_orig_mod.``, ``module.``), so a
    store opens with the plain module too."""
    while True:
        inner = encoder._modules.get("_orig_mod")  # (no import of torch._dynamo for the check)
        if type(encoder).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
            encoder = inner
        elif isinstance(encoder, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            encoder = encoder.module
        else:
            return encoder


def _exclusions(exclude_rows: Any, n: int) -> torch.Tensor:
    """Many queries' ``exclude_rows`` as ``[m, e]`` int64, checked: integers, store rows in
    [0, n) or -1 (their number is checked against the queries as the blocks go)."""
    exclude = torch.as_tensor(exclude_rows)
    if exclude.dtype.is_floating_point or exclude.dtype.is_complex or exclude.dtype == torch.bool:
        raise TypeError(f"exclude_rows must hold integer store rows, got {exclude.dtype}")
    exclude = exclude.to(torch.int64)
    if exclude.dim() == 1:
        exclude = exclude[:, None]
    if exclude.dim() != 2:
        raise ValueError(f"exclude_rows must be [m] or [m, e], got shape {tuple(exclude.shape)}")
    if exclude.numel() and (int(exclude.min()) < -1 or int(exclude.max()) >= n):
        raise ValueError(f"exclude_rows must be store rows in [0, {n}) or -1, got values in "
                         f"[{int(exclude.min())}, {int(exclude.max())}]")
    return exclude


def _check_part_directory(path: Path, size: int) -> None:
    """``path`` may hold only parts of a distributed featurisation by ``size`` ranks."""
    if not path.exists():
        return
    names = [p.name for p in path.iterdir()
             if not p.name.endswith(".tmp") and p.name != WRITER_LOCK
             and not p.name.startswith(distributed.PeerFailures.PREFIX)]
    other = [n for n in names if (m := PART_PATTERN.match(n)) and int(m.group(2)) != size]
    if other:
        raise StoreError(f"{path} holds parts of a run by another number of ranks ({other[:3]}): "
                         "resume it with that many ranks or remove it")
    alien = [n for n in names if not PART_PATTERN.match(n)]
    if alien:
        raise StoreError(f"{path} is not empty and has no {MANIFEST}: refusing to write a store "
                         f"over {alien[:5]}")


def _blocks_of(pieces: Iterable[tuple[torch.Tensor, torch.Tensor]], block: int
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Regroups ``(rows [b, ...], ids [b])`` pieces of any sizes into blocks of ``block`` rows
    (the last one shorter), copying each row once."""
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    count = 0
    for rows, ids in pieces:
        start = 0
        while start < rows.shape[0]:
            take = min(block - count, rows.shape[0] - start)
            pending.append((rows[start:start + take], ids[start:start + take]))
            count += take
            start += take
            if count == block:
                yield torch.cat([r for r, _ in pending]), torch.cat([i for _, i in pending])
                pending, count = [], 0
    if count:
        yield torch.cat([r for r, _ in pending]), torch.cat([i for _, i in pending])
