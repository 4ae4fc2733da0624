"""The gradient store: a directory holding the features ``phi`` of a training set.

Layout::

    manifest.json          format/hash versions, fingerprint, dim, dtype, shard list, complete flag
    phi_000000.npy ...     [rows, dim] shards (float16 / bfloat16 as uint16 / float32 / float64)
    ids_000000.npy ...     [rows] int64 example ids of each shard's rows
    stats_000000.npz ...   optional per-shard sums of curvature statistics (EK-FAC covariances)

Every file is written to a temporary name, fsynced and renamed, and the manifest is rewritten the
same way after each shard (with many shards, after each 1/64 of them: :func:`manifest_due`), so a
crash never leaves a half-written store: at worst the rows after the last shard the manifest
lists are recomputed (under 1/64 of the rows; ``close()`` lists every durable shard). Shards
hold exactly ``shard_rows`` rows (the last one fewer), whatever the batch size, so a resumed run
writes the same shards as an uninterrupted one.
Each shard's SHA-256 is in the manifest and is checked on open; a manifest that cannot be parsed
or lacks a field is a :class:`StoreError` naming what is wrong. A store holds each example id
once: a batch that repeats one is refused by ``append``, and ids repeated across batches by
``finalize`` (the store stays incomplete). Scoring reads shards as memory maps: a store larger
than RAM works.

While a store is open for appending, its writer holds an exclusive advisory lock
(``flock``) on ``.writer.lock`` in its directory: a second writer (another job on the same path,
or every rank of a ``torchrun`` job featurising into one path without ``distributed=True``) is
refused instead of interleaving shards with the first. The operating system drops the lock when
the process ends, so a crash never leaves it held; forked children (DataLoader workers) let go
of their copy at once. On file systems without ``flock`` there is no lock (a RuntimeWarning
says so), on Windows neither; on NFS, Linux may emulate it per node only.

A store featurised by several ``torch.distributed`` ranks (:mod:`.distributed`) is one directory
holding a store per rank, ``part-<rank>-of-<world>/``, plus a top-level manifest that lists their
shards in rank order (:meth:`GradientStore.from_parts`): it opens and reads like any other.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import warnings
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._checks import count
from .reference import HASH_VERSION

try:
    import fcntl
except ImportError:  # Windows: no advisory lock
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WRITER_LOCK = ".writer.lock"
DTYPES = {
    "float16": np.float16,
    "bfloat16": np.uint16,
    "float32": np.float32,
    "float64": np.float64,
}
# Bytes hashed per read when checksumming a shard (bounded memory for any shard size).
_HASH_CHUNK = 1 << 24
# Per-rank part stores of a distributed featurisation: part-<rank>-of-<world>.
PART_PATTERN = re.compile(r"^part-(\d{5})-of-(\d{5})$")


def part_name(rank: int, world: int) -> str:
    """Directory name of rank ``rank``'s part of a store featurised by ``world`` ranks."""
    return f"part-{rank:05d}-of-{world:05d}"


def _unfinished_parts(path: Path) -> str:
    """A hint naming the unfinished distributed run in ``path`` ('' if there is none)."""
    worlds = sorted({int(m.group(2)) for p in path.iterdir()
                     if (m := PART_PATTERN.match(p.name))}) if path.is_dir() else []
    if not worlds:
        return ""
    return (f"; it holds the parts of an unfinished featurize by {worlds[0]} ranks: run it again "
            f"with {worlds[0]} ranks (torchrun) to resume it")


class StoreError(ValueError):
    """A store that cannot be used as asked: wrong fingerprint, corrupted or incomplete."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write via ``write(file)`` to a temporary name, fsync, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_diff(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable list of the fields that differ between two fingerprints."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: store has {_short(a)}, now {_short(b)}")
    return out


def _short(v: Any, limit: int = 120) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# The manifest's required fields and their JSON types (a store's reader indexes them unchecked,
# so a damaged manifest is refused on open, naming what is wrong, not met later as a KeyError).
_MANIFEST_FIELDS: dict[str, type] = {
    "fingerprint": dict, "dim": int, "dtype": str, "shard_rows": int, "shards": list,
    "rows": int, "complete": bool,
}
_OPTIONAL_FIELDS: dict[str, type] = {"meta": dict, "parts": list}
_SHARD_FIELDS: dict[str, type] = {
    "rows": int, "first_row": int, "phi": str, "phi_sha256": str, "ids": str, "ids_sha256": str,
}
_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", bool: "boolean"}


def _wrong_field(entry: dict, fields: dict[str, type], optional: bool = False) -> str | None:
    """What is wrong with ``entry``'s ``fields`` (missing, or not of their type), None if
    nothing. A JSON true is not an int here: it would pass for a row count of 1."""
    for key, kind in fields.items():
        if key not in entry:
            if optional:
                continue
            return f"it has no {key!r}"
        value = entry[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"its {key!r} is {_short(value, 40)}, not a JSON {_JSON_NAMES[kind]}"
    return None


def _manifest_problem(m: dict) -> str | None:
    """What makes a manifest (a JSON object of the right versions) unusable, None if nothing:
    required fields missing or wrongly typed, impossible values, or shard entries that do not
    tile the rows (readers find a row's shard by ``first_row``)."""
    wrong = _wrong_field(m, _MANIFEST_FIELDS) or _wrong_field(m, _OPTIONAL_FIELDS, True)
    if wrong:
        return wrong
    if m["dtype"] not in DTYPES:
        return f"its dtype {_short(m['dtype'], 40)} is not one of {sorted(DTYPES)}"
    for key in ("dim", "shard_rows"):
        if m[key] < 1:
            return f"its {key!r} is {m[key]}, not >= 1"
    rows = 0
    for i, sh in enumerate(m["shards"]):
        if not isinstance(sh, dict):
            return f"shard entry {i} is {_short(sh, 40)}, not a JSON object"
        wrong = _wrong_field(sh, _SHARD_FIELDS)
        if wrong is None and "stats" in sh:
            wrong = _wrong_field(sh, {"stats": str, "stats_sha256": str})
        if wrong:
            return f"shard entry {i}: {wrong}"
        if sh["rows"] < 1:
            return f"shard entry {i} holds {sh['rows']} rows, not >= 1"
        if sh["first_row"] != rows:
            return (f"shard entry {i} starts at row {sh['first_row']}, not at {rows} where the "
                    "shards before it end")
        rows += sh["rows"]
    if m["rows"] != rows:
        return f"its 'rows' is {m['rows']}, but its shards hold {rows}"
    return None


def _read_manifest(path: Path) -> dict:
    """The manifest of the store at ``path``, refused as a :class:`StoreError` naming the store
    and what is wrong when it cannot be read or parsed, or is not a JSON object of a format and
    hash version this issl_fast reads with every field a store needs."""
    mpath = path / MANIFEST
    if not mpath.exists():
        raise StoreError(f"no gradient store at {path} ({MANIFEST} missing)"
                         + _unfinished_parts(path))
    fix = f": the store cannot be read (remove {path} and featurize again)"
    try:
        manifest = json.loads(mpath.read_bytes())
    except OSError as exc:
        raise StoreError(f"store at {path}: cannot read {MANIFEST} "
                         f"({exc.strerror or exc})") from exc
    except ValueError as exc:  # (JSONDecodeError, UnicodeDecodeError: truncated or garbled)
        raise StoreError(f"store at {path}: {MANIFEST} is not valid JSON ({exc})" + fix
                         ) from None
    if not isinstance(manifest, dict):
        raise StoreError(f"store at {path}: {MANIFEST} holds {_short(manifest, 40)}, not a "
                         "JSON object" + fix)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"store at {path} has format version {manifest.get('format_version')}, "
            f"this issl_fast reads {FORMAT_VERSION}"
        )
    if manifest.get("hash_version") != HASH_VERSION:
        raise StoreError(
            f"store at {path} was sketched with hash version "
            f"{manifest.get('hash_version')}, this issl_fast uses {HASH_VERSION}"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise StoreError(f"store at {path}: {MANIFEST} is damaged ({problem})" + fix)
    return manifest


# The manifest is rewritten after a shard once the shards not yet listed in it reach 1/64 of all
# (every shard while there are fewer than 128): O(n) manifest writing in all instead of O(n^2)
# (a 2000-shard store spent 41 s rewriting it), and a crash recomputes at most ~1.6% of the rows.
MANIFEST_STRIDE = 64


def manifest_due(shards: int, listed: int) -> bool:
    """Whether a store of ``shards`` shards, whose manifest file lists ``listed``, rewrites it."""
    return shards - listed >= max(1, shards // MANIFEST_STRIDE)


def _to_numpy(phi: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return phi.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return phi.to(getattr(torch, dtype)).numpy()


class _WriterLock:
    """The exclusive lock of a store's writer (see the module docstring).

    Released by :meth:`release`, by garbage collection of the lock (a dropped store handle),
    and in forked children at once (DataLoader workers inherit every descriptor; an ``flock``
    lasts while any copy is open, so a worker would otherwise keep its parent's lock alive)."""

    def __init__(self, path: Path) -> None:
        self.fd: int | None = None
        self._closer: weakref.finalize | None = None
        if fcntl is None:
            return
        lock = path / WRITER_LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file: flock works on a read-only one
            fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"the store at {path} is being written by another writer (process {holder}): "
                "wait for it to finish, or featurise into another path. Several torchrun ranks "
                "featurising one store need InfluenceSSL(..., distributed=True)") from None
        except OSError as exc:  # a file system without flock
            os.close(fd)
            warnings.warn(f"no writer lock on {path} ({exc.strerror}): two jobs writing this "
                          "store at once would not be stopped", RuntimeWarning, stacklevel=3)
            return
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)  # named in the second writer's error
        except OSError:
            pass  # (a read-only lock file: the lock holds all the same)
        self.fd = fd
        self._closer = weakref.finalize(self, os.close, fd)
        _HELD_LOCKS.add(self)

    def release(self) -> None:
        if self._closer is not None:
            self._closer()  # closes the descriptor (dropping the lock) once
            self._closer = None
        self.fd = None

    @staticmethod
    def _drop_in_child() -> None:
        for lock in list(_HELD_LOCKS):
            if lock._closer is not None:
                lock._closer()
                lock._closer = None
                lock.fd = None


# The locks this process holds (weakly: a dropped lock is released by its finalizer).
_HELD_LOCKS: weakref.WeakSet[_WriterLock] = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WriterLock._drop_in_child)


def _as_tensor(rows: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Shard rows (a bfloat16 tensor view, or a numpy memory map) as a tensor in memory."""
    return rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.array(rows))


def _readonly_tensor(arr: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor over a read-only memory map (torch warns that it is not writable; we
    never write through it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


class GradientStore:
    """Append-only, crash-safe, memory-mapped store of gradient features."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self._m = manifest
        self._pending_phi: list[torch.Tensor] = []
        self._pending_ids: list[torch.Tensor] = []
        self._pending_stats: dict[str, torch.Tensor] = {}
        self._pending_rows = 0
        self._lock: _WriterLock | None = None  # held while open for appending
        self._closed = False
        # (rows, shard_rows) when reopen() marked it incomplete; the shard size asked for then
        self._reopened: tuple[int, int] | None = None
        self._reopen_shard_rows: int | None = None
        # shards listed in the manifest file as last written (see MANIFEST_STRIDE)
        self._manifest_shards = len(manifest["shards"])
        self._dir = str(path)
        # per shard file: (data offset, dtype, shape) of its .npy header, parsed once
        self._headers: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        # (shards then, every row's id): ids() read once per shard count, not on every scan
        self._ids: tuple[int, np.ndarray] | None = None

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def create_or_resume(
        cls,
        path: str | os.PathLike,
        fingerprint: dict,
        dim: int,
        dtype: str = "float16",
        shard_rows: int = 4096,
        *,
        reopen: bool = False,
    ) -> GradientStore:
        """Open ``path`` for appending: new if absent, resumed if it holds the same fingerprint.
        A complete store is returned as it is, or with ``reopen`` with its writer's lock held,
        ready for :meth:`reopen` (more rows after its own)."""
        if dtype not in DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        shard_rows = count(shard_rows, "shard_rows")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lock = _WriterLock(path)  # first: a second writer is refused before any work
        try:
            if (path / MANIFEST).exists():
                store = cls.open(path, fingerprint=fingerprint, require_complete=False)
                store.check_layout(dim, dtype, None if store.complete else shard_rows)
                if store.complete and not reopen:
                    lock.release()
                else:
                    store._lock = lock
                    store._reopen_shard_rows = shard_rows  # (appended rows: shards of this size)
                return store
            leftovers = [p.name for p in path.iterdir()
                         if not p.name.endswith(".tmp") and p.name != WRITER_LOCK]
            if leftovers:
                raise StoreError(
                    f"{path} is not empty and has no {MANIFEST}: refusing to write a "
                    f"store over {leftovers[:5]}" + _unfinished_parts(path)
                )
            manifest = {
                "format_version": FORMAT_VERSION,
                "hash_version": HASH_VERSION,
                "fingerprint": fingerprint,
                "dim": int(dim),
                "dtype": dtype,
                "shard_rows": shard_rows,
                "shards": [],
                "rows": 0,
                "complete": False,
            }
            store = cls(path, manifest)
            store._write_manifest()
            store._lock = lock
            return store
        except BaseException:
            lock.release()
            raise

    def reopen(self) -> None:
        """Marks a complete store incomplete, to append rows after its own (the handle must hold
        the writer's lock: ``create_or_resume(..., reopen=True)``). Until it is finalized again,
        it opens as an incomplete store, which featurize resumes."""
        self._check_writable()
        if self._lock is None:
            raise StoreError(f"the store at {self.path} is not open for writing: open it with "
                             "create_or_resume(..., reopen=True)")
        if self.complete:
            self._reopened = (self.rows, self._m["shard_rows"])
            self._m["complete"] = False
            self._m["shard_rows"] = self._reopen_shard_rows or self._m["shard_rows"]
            self._write_manifest()

    def close(self) -> None:
        """Stops appending without completing the store: rows not yet in a shard are dropped
        (a resumed run recomputes them) and the writer's lock is released; the handle can no
        longer write. A store reopened (:meth:`reopen`) that got no new shard is marked complete
        again: it is exactly the store it was."""
        self._drop_pending()
        try:
            if (self._reopened is not None and self.rows == self._reopened[0]
                    and not self._closed and self._lock is not None):
                self._m["complete"], self._m["shard_rows"] = True, self._reopened[1]
                self._write_manifest()
            elif (len(self._m["shards"]) > self._manifest_shards and not self._closed
                  and self._lock is not None):
                self._write_manifest()  # (the shards written since: a resume keeps them)
        finally:
            self._reopened = None
            self._closed = True
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _drop_pending(self) -> None:
        self._pending_phi, self._pending_ids, self._pending_stats = [], [], {}
        self._pending_rows = 0

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreError(f"this handle of the store at {self.path} was closed: open it again "
                             "with create_or_resume to append")

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        fingerprint: dict | None = None,
        *,
        verify: bool = True,
        require_complete: bool = True,
    ) -> GradientStore:
        """Open an existing store; refuse a different fingerprint or a corrupted shard."""
        path = Path(path)
        manifest = _read_manifest(path)
        store = cls(path, manifest)
        if fingerprint is not None:
            store.check_fingerprint(fingerprint)
        if require_complete and not manifest["complete"]:
            raise StoreError(
                f"store at {path} is incomplete ({manifest['rows']} rows written): "
                "run featurize again to resume it"
            )
        if verify:
            store.verify()
        return store

    def check_fingerprint(self, fingerprint: dict, what: str = "store") -> None:
        """Raises :class:`StoreError` naming every field in which the store was built
        differently from ``fingerprint``."""
        diff = fingerprint_diff(json.loads(json.dumps(self.fingerprint, default=str)),
                                json.loads(json.dumps(fingerprint, default=str)))
        if diff:
            raise StoreError(f"{what} at {self.path} was built differently: " + "; ".join(diff))

    def check_layout(self, dim: int, dtype: str, shard_rows: int | None) -> None:
        """Raises unless the store has this dim and dtype and, while it is still being written,
        ``shard_rows`` (a complete store is read the same whatever its shard size)."""
        want = {"dim": dim, "dtype": dtype}
        if not self.complete and shard_rows is not None:
            want["shard_rows"] = shard_rows
        for key, value in want.items():
            if self._m[key] != value:
                raise StoreError(f"store at {self.path} has {key}={self._m[key]!r}, asked "
                                 f"{value!r}")

    @classmethod
    def from_parts(cls, path: str | os.PathLike, parts: list[GradientStore]) -> GradientStore:
        """Make ``path`` one complete store of the rows of ``parts`` (complete stores in
        subdirectories of ``path``, one per rank) written by ranks that took turns on blocks of
        ``shard_rows`` rows (:class:`.loading.Examples`): the shards are listed in turn,
        part 0's first, part 1's first, ..., part 0's second, ..., which is the order of the
        stream. Only a manifest is written; no row is copied. The parts must agree on
        fingerprint, dim, dtype and shard size, every shard but the last in that order must be
        full, and no example id may occur in two parts."""
        path = Path(path)
        if not parts:
            raise ValueError("from_parts needs at least one part")
        first = parts[0]
        for part in parts:
            if part.path.resolve().parent != path.resolve():
                raise ValueError(f"part {part.path} must be a directory directly inside {path}")
            if not part.complete:
                raise StoreError(f"part {part.path} is incomplete ({part.rows} rows written)")
            diff = fingerprint_diff(first.fingerprint, part.fingerprint)
            if diff:
                raise StoreError(f"parts {first.path.name} and {part.path.name} were built "
                                 "differently (did every rank load the same weights?): "
                                 + "; ".join(diff))
            stream = (part.meta.get("stream"), first.meta.get("stream"))
            if None not in stream and stream[0] != stream[1]:
                raise StoreError(f"parts {first.path.name} and {part.path.name} were written "
                                 "from different data streams")
            for key in ("dim", "dtype", "shard_rows"):
                if part._m[key] != first._m[key]:
                    raise StoreError(f"parts {first.path.name} and {part.path.name} differ in "
                                     f"{key}: {first._m[key]!r} vs {part._m[key]!r}")
        ids = np.concatenate([part.ids() for part in parts])
        uniq, repeats = np.unique(ids, return_counts=True)
        if (repeats > 1).any():
            raise StoreError(
                f"example ids {uniq[repeats > 1][:5].tolist()} occur in more than one part: the "
                "ranks featurised overlapping data (each rank must see the same stream; remove "
                f"{path} and featurize again)")
        counts = [len(part._m["shards"]) for part in parts]
        turns = sum(counts)
        # Taking turns, part r holds blocks r, r + W, ...: its share of the first `turns` blocks.
        expected = [len(range(r, turns, len(parts))) for r in range(len(parts))]
        if counts != expected:
            raise StoreError(f"the parts hold {counts} shards, not the turns of {len(parts)} "
                             f"ranks over {turns} blocks ({expected}): they were not written by "
                             "ranks taking turns on one stream")
        shards, rows = [], 0
        for turn in range(turns):
            part = parts[turn % len(parts)]
            sh = part._m["shards"][turn // len(parts)]
            if turn < turns - 1 and int(sh["rows"]) != int(first._m["shard_rows"]):
                raise StoreError(f"{part.path.name}: shard {turn // len(parts)} holds "
                                 f"{sh['rows']} rows, not {first._m['shard_rows']}, though "
                                 "another block follows it in the stream")
            entry = dict(sh, first_row=rows)
            for key in ("phi", "ids", "stats"):
                if key in sh:
                    entry[key] = f"{part.path.name}/{sh[key]}"
            shards.append(entry)
            rows += int(sh["rows"])
        manifest = {key: first._m[key] for key in
                    ("format_version", "hash_version", "fingerprint", "dim", "dtype",
                     "shard_rows")}
        manifest.update(shards=shards, rows=rows, complete=True,
                        parts=[part.path.name for part in parts], meta={"rows": rows})
        store = cls(path, manifest)
        lock = _WriterLock(path)  # (no writer of a single-process store on this path may run)
        try:
            store._write_manifest()
        finally:
            lock.release()
        return store

    def verify(self, shards: Iterable[int] | None = None) -> None:
        """Check every shard file (or those numbered in ``shards``) against its SHA-256."""
        entries = self._m["shards"]
        for sh in entries if shards is None else (entries[i] for i in shards):
            for key in ("phi", "ids", "stats"):
                name = sh.get(key)
                if name is None:
                    continue
                p = self.path / name
                if not p.exists():
                    raise StoreError(f"store at {self.path}: shard file {name} is missing")
                if _sha256(p) != sh[f"{key}_sha256"]:
                    raise StoreError(
                        f"store at {self.path}: shard file {name} is corrupted (SHA-256 mismatch)"
                    )

    # -- properties -------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows durably written (excluding rows pending in memory)."""
        return int(self._m["rows"])

    @property
    def dim(self) -> int:
        return int(self._m["dim"])

    @property
    def shard_rows(self) -> int:
        return int(self._m["shard_rows"])

    @property
    def num_shards(self) -> int:
        return len(self._m["shards"])

    @property
    def dtype(self) -> str:
        return str(self._m["dtype"])

    @property
    def complete(self) -> bool:
        return bool(self._m["complete"])

    @property
    def content_key(self) -> tuple[str, tuple[str, ...]]:
        """The path and every shard's SHA-256: equal for two handles on the same rows (a
        complete store never changes), different once a store is rebuilt at that path."""
        return str(self.path.resolve()), tuple(sh["phi_sha256"] for sh in self._m["shards"])

    @property
    def fingerprint(self) -> dict:
        return self._m["fingerprint"]

    @property
    def meta(self) -> dict:
        return self._m.get("meta", {})

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return (
            f"GradientStore({str(self.path)!r}, rows={self.rows}, dim={self.dim}, "
            f"dtype={self.dtype}, shards={len(self._m['shards'])}, complete={self.complete})"
        )

    # -- writing ----------------------------------------------------------------------------------
    def append(
        self, phi: torch.Tensor, ids: torch.Tensor, stats: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Queue rows ``phi [b, dim]`` with example ids ``[b]`` and optional per-example
        statistics ``{name: [b, ...]}``; full shards are written as soon as they fill."""
        self._check_writable()
        if self.complete:
            raise StoreError(f"store at {self.path} is complete: it takes no more rows")
        if phi.dim() != 2 or phi.shape[1] != self.dim:
            raise ValueError(f"phi must be [b, {self.dim}], got {tuple(phi.shape)}")
        if ids.shape != (phi.shape[0],):
            raise ValueError(f"ids must be [{phi.shape[0]}], got {tuple(ids.shape)}")
        ids = ids.detach().to(device="cpu", dtype=torch.int64)
        # Scores and transformed copies find an example's row by its id: refused before any of
        # the batch is queued (repeats across batches: finalize).
        uniq, counts = np.unique(ids.numpy(), return_counts=True)
        if (counts > 1).any():
            raise StoreError(
                f"example ids {uniq[counts > 1][:5].tolist()} occur more than once in a batch "
                f"appended to the store at {self.path}: ids must name each example once (none "
                "of this batch was stored)")
        stats = stats or {}
        rows_left = phi.shape[0]
        start = 0
        while rows_left:
            take = min(rows_left, self._m["shard_rows"] - self._pending_rows)
            sl = slice(start, start + take)
            self._pending_phi.append(phi[sl].detach().cpu())
            self._pending_ids.append(ids[sl])
            for name, s in stats.items():
                # Summed where it was computed (a GPU's batch stays there), kept on the CPU.
                part = s[sl].sum(dim=0).to(device="cpu", dtype=torch.float64)
                self._pending_stats[name] = self._pending_stats.get(name, 0) + part
            self._pending_rows += take
            start += take
            rows_left -= take
            if self._pending_rows == self._m["shard_rows"]:
                self._write_shard()

    def finalize(self, meta: dict | None = None) -> None:
        """Write the last partial shard and mark the store complete (on success or failure, the
        writer's lock is released: a failed finalize leaves the store resumable). A store whose
        rows repeat an example id is refused and stays incomplete (one appended to after
        :meth:`reopen` goes back to the complete store it was)."""
        self._check_writable()
        rolled_back = False
        try:
            if self._pending_rows:
                self._write_shard()  # (durable first: a refusal below loses no row)
            if not self.complete:  # (a complete store took no row since it was checked)
                try:
                    self._refuse_repeated_ids()
                except StoreError:
                    if self._reopened is not None:  # appended to: back to the store it was
                        self._roll_back_to_reopened()
                        rolled_back = True
                    raise
            if meta is not None:
                self._m["meta"] = meta
            self._m["complete"] = True
            self._write_manifest()
        except BaseException:
            if not rolled_back:
                self._m["complete"] = False
            self.close()
            raise
        self._release_lock()

    def _roll_back_to_reopened(self) -> None:
        """The complete store :meth:`reopen` found, again: the shards added since are dropped
        (their files removed) and the manifest lists the old ones as complete."""
        assert self._reopened is not None
        rows, shard_rows = self._reopened
        dropped = [sh for sh in self._m["shards"] if sh["first_row"] >= rows]
        self._m["shards"] = [sh for sh in self._m["shards"] if sh["first_row"] < rows]
        self._m["rows"], self._m["shard_rows"], self._m["complete"] = rows, shard_rows, True
        self._write_manifest()
        for sh in dropped:
            for key in ("phi", "ids", "stats"):
                if key in sh:
                    (self.path / sh[key]).unlink(missing_ok=True)
        self._reopened = None

    def _refuse_repeated_ids(self) -> None:
        """Raises :class:`StoreError` naming the ids that more than one row holds, and those
        rows. One sort of all ids (no set of them: a store may hold tens of millions of rows);
        each batch was checked on its own by :meth:`append`, this finds repeats across them
        (and across the rows of a store appended to)."""
        ids = self.ids()
        uniq, counts = np.unique(ids, return_counts=True)
        repeated = uniq[counts > 1]
        if not repeated.size:
            return
        where = "; ".join(f"id {i} in rows {np.flatnonzero(ids == i)[:5].tolist()}"
                          for i in repeated[:5].tolist())
        more = f"; and {repeated.size - 5} more ids" if repeated.size > 5 else ""
        after = ("The rows appended are dropped: the store is as it was before" if
                 self._reopened is not None else "The store is left incomplete: remove it and "
                 "featurize again")
        raise StoreError(
            f"example ids occur in more than one row of the store at {self.path} ({where}{more}): "
            f"ids must name each example once. {after}")

    def _write_shard(self) -> None:
        idx = len(self._m["shards"])
        phi = torch.cat(self._pending_phi)
        ids = torch.cat(self._pending_ids).numpy()
        entry: dict[str, Any] = {"rows": int(phi.shape[0]), "first_row": self.rows}
        files = {
            "phi": (f"phi_{idx:06d}.npy", _to_numpy(phi, self.dtype)),
            "ids": (f"ids_{idx:06d}.npy", ids),
        }
        for key, (name, arr) in files.items():
            self._headers.pop(name, None)  # (a file of that name dropped before: parse anew)
            _atomic_write(self.path / name, lambda f, a=arr: np.save(f, a, allow_pickle=False))
            entry[key] = name
            entry[f"{key}_sha256"] = _sha256(self.path / name)
        if self._pending_stats:
            name = f"stats_{idx:06d}.npz"
            arrays = {k: v.numpy() for k, v in self._pending_stats.items()}
            # (numpy's stub reads **arrays as possibly holding its allow_pickle flag)
            _atomic_write(self.path / name,
                          lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
            entry["stats"] = name
            entry["stats_sha256"] = _sha256(self.path / name)
        self._m["shards"].append(entry)
        self._m["rows"] = self.rows + entry["rows"]
        if manifest_due(len(self._m["shards"]), self._manifest_shards):
            self._write_manifest()
        self._drop_pending()

    def _write_manifest(self) -> None:
        text = json.dumps(self._m, indent=1, sort_keys=True, default=str).encode()
        _atomic_write(self.path / MANIFEST, lambda f: f.write(text))
        self._manifest_shards = len(self._m["shards"])

    # -- reading ----------------------------------------------------------------------------------
    def _row_span(self, rows: tuple[int, int] | None) -> tuple[int, int]:
        if rows is None:
            return 0, self.rows
        start, stop = (int(r) for r in rows)
        if not 0 <= start <= stop <= self.rows:
            raise ValueError(f"rows must be a (start, stop) range within [0, {self.rows}], "
                             f"got {rows!r}")
        return start, stop

    def shards(
        self, rows: tuple[int, int] | None = None
    ) -> Iterator[tuple[torch.Tensor | np.ndarray, int]]:
        """``(rows, first_row)`` per shard; rows are a read-only memory map (numpy for float16 /
        float32, a zero-copy bfloat16 tensor view for bfloat16). ``rows=(start, stop)``: only
        that range of rows (shards cut to it)."""
        start, stop = self._row_span(rows)
        for sh in self._m["shards"]:
            first = int(sh["first_row"])
            lo, hi = max(start, first), min(stop, first + int(sh["rows"]))
            if lo >= hi:
                continue
            arr = self._phi_map(sh["phi"])[lo - first:hi - first]
            if self.dtype == "bfloat16":
                yield _readonly_tensor(arr.view(np.int16)).view(torch.bfloat16), lo
            else:
                yield arr, lo

    def _phi_map(self, name: str) -> np.ndarray:
        """A shard's rows as a read-only memory map; its header is parsed on first use only
        (a scan maps every shard: on a store of many small shards, parsing each header on every
        scan cost more than the scan)."""
        head = self._headers.get(name)
        if head is None:
            arr = np.load(self.path / name, mmap_mode="r")
            self._headers[name] = (arr.offset, arr.dtype, arr.shape)
            return arr
        offset, dtype, shape = head
        if not math.prod(shape):
            return np.zeros(shape, dtype=dtype)
        # (mmap directly: np.memmap resolves the path and builds Path objects, ~10x the cost)
        with open(os.path.join(self._dir, name), "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, dtype=dtype, count=math.prod(shape),
                             offset=offset).reshape(shape)

    def ids(self) -> np.ndarray:
        """Example ids of all rows, in row order (a copy: read from the shards once, and again
        only after new shards)."""
        shards = len(self._m["shards"])
        if self._ids is None or self._ids[0] != shards:
            parts = [np.load(self.path / sh["ids"]) for sh in self._m["shards"]]
            self._ids = (shards, np.concatenate(parts).astype(np.int64, copy=False) if parts
                         else np.zeros(0, dtype=np.int64))
        return self._ids[1].copy()

    def load(self, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> torch.Tensor:
        """All (or a slice of) rows as one in-memory tensor: for small stores and fitting."""
        chunks = []
        for arr, _ in self.shards():
            t = _as_tensor(arr)
            chunks.append(t.to(dtype))
        out = torch.cat(chunks) if chunks else torch.zeros(0, self.dim, dtype=dtype)
        return out if rows is None else out[rows]

    def load_to(self, device: torch.device | str, dtype: torch.dtype,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
        """All rows (or the range ``rows=(start, stop)``) as one tensor on ``device``, filled
        shard by shard (no whole copy in host memory on the way to a GPU)."""
        start, stop = self._row_span(rows)
        out = torch.empty(stop - start, self.dim, dtype=dtype, device=device)
        for part, first in self.iter_rows(dtype=dtype, rows=(start, stop)):
            out[first - start:first - start + part.shape[0]] = part
        return out

    def iter_rows(
        self, chunk: int = 65536, dtype: torch.dtype = torch.float32,
        rows: tuple[int, int] | None = None, *, fill: bool = False,
    ) -> Iterator[tuple[torch.Tensor, int]]:
        """``(rows [<=chunk, dim], first_row)`` in order, converted to ``dtype``: bounded memory.
        ``rows=(start, stop)``: only that range. A chunk ends where a shard does, unless
        ``fill``: then every chunk but the last has ``chunk`` rows, joined across shards (for
        callers whose cost is per chunk)."""
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
        if not fill:
            for arr, first in self.shards(rows):
                for s in range(0, arr.shape[0], chunk):
                    part = arr[s : s + chunk]
                    t = _as_tensor(part)
                    yield t.to(dtype), first + s
            return
        pending: list[torch.Tensor] = []
        start = held = 0
        for arr, first in self.shards(rows):
            s = 0
            while s < arr.shape[0]:
                if not pending:
                    start = first + s
                part = arr[s : s + chunk - held]
                t = _as_tensor(part)
                pending.append(t.to(dtype))
                held += t.shape[0]
                s += t.shape[0]
                if held == chunk:
                    yield (pending[0] if len(pending) == 1 else torch.cat(pending)), start
                    pending, held = [], 0
        if pending:
            yield (pending[0] if len(pending) == 1 else torch.cat(pending)), start

    def stats(self) -> dict[str, torch.Tensor]:
        """Sum over shards of the stored statistics (float64)."""
        total: dict[str, torch.Tensor] = {}
        for sh in self._m["shards"]:
            if "stats" not in sh:
                continue
            with np.load(self.path / sh["stats"]) as z:
                for k in z.files:
                    total[k] = total.get(k, 0) + torch.from_numpy(z[k])
        return total
