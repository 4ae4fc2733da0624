"""The demo pipeline: data with planted problems -> SSL training -> featurize -> fit -> scores,
self-influence, duplicates, outliers, group influence -> measured quality vs the planted truth and
vs a representation-space baseline -> report."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..apps import translations
from ..capture import build_layout
from ..influence import InfluenceSSL
from ..loss import AugmentationStability
from ..projection import Projection
from ..store import MANIFEST, WRITER_LOCK, StoreError, _WriterLock
from . import baseline, metrics
from .data import DemoData, load_demo_data
from .train import digits_augment, make_backbone, train_ssl


@dataclass
class DemoConfig:
    out: str = "issl_demo"
    ssl: str = "simclr"
    epochs: int = 40
    seed: int = 0
    views: int = 8
    k: int = 256  # kron features per layer
    solver: str = "ekfac"
    n_train: int | None = None  # None: the whole training split (1,500 + planted)
    n_exact: int = 20
    n_near: int = 20
    n_outliers: int = 30
    # Normalised influence above which a pair is reported. With 1-px matching, planted copies
    # score >= ~0.92 (noisy ones lowest) and only a couple of natural near-twins reach it
    # (precision 0.95 on seed 0, 0.91 on seed 1); the threshold-free "recall at precision >= 0.9"
    # is reported as well.
    dup_threshold: float = 0.92
    # Duplicates are matched up to shifts of this many pixels (0: aligned images only): every
    # image is also featurised shifted by 1..dup_shifts px along each axis (4 featurisation
    # passes per pixel of distance) and a pair keeps its best similarity. The baseline gets the
    # same matching.
    dup_shifts: int = 1
    neighbours: int = 5  # k of the outlier score and candidates kept per example
    n_queries: int = 8
    topk: int = 8
    n_boot: int = 500
    progress: bool = True
    # Where the encoder trains and the engine runs ("cpu", "cuda", "cuda:1", ...); the data stay
    # on the CPU and are moved per batch.
    device: str = "cpu"


# The store the demo writes, inside its output directory. A run retrains the encoder, so a store
# left there by an earlier run is stale and is deleted, but only when it is the demo's own.
STORE = "store"
# The files a gradient store is made of (store.py's layout; ".tmp": a write a crash interrupted).
_STORE_FILE = re.compile(r"^(?:manifest\.json|(?:phi|ids)_\d{6}\.npy|stats_\d{6}\.npz)(?:\.tmp)?$")


class DemoOutputError(ValueError):
    """An output directory the demo will not write into: not a directory, not creatable, or
    holding a ``store`` the demo did not write (the demo deletes only its own store)."""


def _demo_layout() -> dict:
    """The gradient layout of the demo's encoder (its architecture: the weights do not enter)."""
    with torch.random.fork_rng(devices=[]):  # (make_backbone seeds torch: leave the caller's RNG)
        return build_layout(make_backbone()).describe()


def _stale_store_files(store: Path) -> list[Path]:
    """The files of the demo's own store at ``store`` (to delete before writing a new one), [] if
    there is none; raises :class:`DemoOutputError` naming the path if it holds anything else."""
    if not store.exists() and not store.is_symlink():
        return []
    refuse = (f"{store} holds something the demo did not write, so it is left as it is: "
              "delete or move it yourself, or choose another output directory (--out)")
    if store.is_symlink() or not store.is_dir():
        raise DemoOutputError(f"{refuse} (it is not a directory)")
    entries = list(store.iterdir())
    foreign = [p.name for p in entries if p.name != WRITER_LOCK and not _STORE_FILE.match(p.name)]
    if foreign:
        raise DemoOutputError(f"{refuse} (not gradient-store files: {sorted(foreign)[:5]})")
    manifest = store / MANIFEST
    if not manifest.exists():
        # Only a writer's lock and interrupted writes: a store whose first shard never landed.
        if any(not p.name.endswith(".tmp") and p.name != WRITER_LOCK for p in entries):
            raise DemoOutputError(f"{refuse} (store files without a {MANIFEST})")
        return entries
    try:
        layout = json.loads(manifest.read_text())["fingerprint"]["layout"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DemoOutputError(f"{refuse} (its {MANIFEST} cannot be read: {exc!r})") from None
    # A gradient store of another encoder is someone's work: the layout names the encoder's
    # layers and shapes, which are the demo's own for every demo setting.
    if layout != _demo_layout():
        raise DemoOutputError(f"{refuse} (a gradient store of another encoder)")
    return entries


def check_output(out: str | os.PathLike) -> None:
    """Raises :class:`DemoOutputError` naming the path if the demo cannot write its report to
    ``out``: a path through a file, a directory it may not create or write, or a ``store`` in it
    that the demo did not write. Creates and deletes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DemoOutputError(f"{out} is not a directory")
    existing = out
    while not existing.exists():  # the nearest existing ancestor is where mkdir starts
        if existing.is_symlink():
            raise DemoOutputError(f"cannot create {out}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise DemoOutputError(f"cannot create {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write into" if existing == out else f"create {out} in"
        raise DemoOutputError(f"cannot {what} {existing}: permission denied")
    _stale_store_files(out / STORE)


def _prepare_output(out: Path) -> Path:
    """Makes ``out`` and clears the demo's own store left in it by an earlier run (file by file,
    never a tree: whatever else is there stays); returns the store's path."""
    check_output(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoOutputError(f"cannot create {out}: {exc.strerror or exc}") from None
    store = out / STORE
    stale = _stale_store_files(store)
    if stale or store.is_dir():
        # The store's writer lock first: another demo still featurising into it is refused,
        # not wiped. The lock file goes last, while held.
        try:
            lock = _WriterLock(store)
        except StoreError:
            raise DemoOutputError(f"{store} is being written by another process (a demo still "
                                  "running?): wait for it, or choose another output directory "
                                  "(--out)") from None
        try:
            for f in sorted(stale, key=lambda p: p.name == WRITER_LOCK):
                f.unlink(missing_ok=True)
            (store / WRITER_LOCK).unlink(missing_ok=True)
        finally:
            lock.release()
        store.rmdir()  # (fails, deleting nothing more, if a file appeared in the meantime)
    return store


def _batches(x: torch.Tensor, size: int = 128) -> list[dict[str, torch.Tensor]]:
    return [{"x": x[i:i + size], "ids": torch.arange(i, min(i + size, len(x)))}
            for i in range(0, len(x), size)]


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the whole demo; writes figures, ``report.md`` and ``summary.json`` to ``cfg.out``
    and returns the summary. A store an earlier run left in ``cfg.out/store`` is deleted (the
    encoder is retrained: it is stale); anything else there is a :class:`DemoOutputError`,
    raised before any work."""
    out = Path(cfg.out)
    # (before minutes of training: a path the demo may not use is refused first)
    store_path = _prepare_output(out)
    timings: dict[str, float] = {}

    def stage(name: str):
        timings[name] = time.perf_counter()
        log(f"[{name}]")

    def done(name: str) -> None:
        timings[name] = time.perf_counter() - timings[name]

    stage("data")
    data: DemoData = load_demo_data(cfg.seed, n_train=cfg.n_train, n_exact=cfg.n_exact,
                                    n_near=cfg.n_near, n_outliers=cfg.n_outliers)
    log(f"  {len(data.train_x)} training images ({cfg.n_exact} exact + {cfg.n_near} near "
        f"duplicates, {cfg.n_outliers} outliers planted), {len(data.test_x)} test images")
    done("data")

    stage("train")
    backbone = make_backbone(cfg.seed).to(cfg.device)
    history, _ = train_ssl(backbone, data.train_x, method=cfg.ssl, epochs=cfg.epochs,
                           seed=cfg.seed, progress=cfg.progress, log=log)
    done("train")

    stage("featurize")
    # Shared views: every image gets the same K transforms, so the loss depends on content only
    # (exact duplicates get identical features) and examples are compared under common draws.
    loss = AugmentationStability(views=cfg.views, augment=digits_augment(cfg.seed + 7, True))
    # The engine runs where the backbone is (cfg.device).
    attr = InfluenceSSL(backbone, loss, Projection("kron", k=cfg.k, seed=cfg.seed), cfg.solver)
    store = attr.featurize(_batches(data.train_x), store_path, progress=cfg.progress)
    log(f"  store: {store.rows} rows x {store.dim} features ({store.dtype}) at {store_path}")
    done("featurize")

    stage("fit")
    attr.fit(store)
    lam = attr.solver.damping_used
    log(f"  solver {cfg.solver}: absolute damping per block "
        + ", ".join(f"{k}={v:.3g}" for k, v in lam.items()))
    done("fit")

    stage("scores")
    q_rows = _pick_queries(data, cfg.n_queries, cfg.seed)
    q_ids = torch.from_numpy(q_rows + 10**6)  # test ids: disjoint from training ids
    pro = attr.score(data.test_x[q_rows], topk=cfg.topk, ids=q_ids)
    opp = attr.score(data.test_x[q_rows], topk=cfg.topk, ids=q_ids, opponents=True)
    self_inf = attr.self_influence()
    done("scores")

    stage("neighbours")
    neigh = attr.neighbours(topk=cfg.neighbours)  # streaming top-k over the store
    shifts = translations(cfg.dup_shifts) if cfg.dup_shifts else []
    # Shift-tolerant matching for duplicates only: an outlier is judged by how alike its
    # aligned neighbourhood is.
    neigh_dup = (attr.neighbours(topk=cfg.neighbours, data=_batches(data.train_x),
                                 transforms=shifts) if shifts else neigh)
    dups = attr.find_duplicates(threshold=-1.0, neighbours=neigh_dup)  # every candidate, ranked
    dups_aligned = attr.find_duplicates(threshold=-1.0, neighbours=neigh)
    outl = attr.find_outliers("neighbours", k=cfg.neighbours, neighbours=neigh)
    outl_self = attr.find_outliers("self_influence")
    done("neighbours")
    stage("groups")
    all_test_ids = torch.arange(len(data.test_x)) + 10**6
    groups = attr.group_influence(data.train_groups, data.test_x, data.test_groups,
                                  ids=all_test_ids, n_boot=cfg.n_boot, seed=cfg.seed)
    done("groups")

    stage("baseline")
    rep_train = baseline.representations(backbone, data.train_x)
    rep_shifted = [baseline.representations(backbone, t(data.train_x)) for t in shifts]
    base_pairs, base_sim = baseline.knn_pairs(rep_train, topk=cfg.neighbours, shifted=rep_shifted)
    base_pairs_aligned, base_sim_aligned = baseline.knn_pairs(rep_train, topk=cfg.neighbours)
    base_outlier = baseline.knn_distance(rep_train, k=cfg.neighbours)
    done("baseline")

    truth_pairs = {tuple(p) for p in data.dup_pairs.tolist()}
    is_outlier = data.train_kind == "outlier"
    quality = {
        "duplicates_influence": metrics.pair_quality(dups.rows, dups.similarity, truth_pairs,
                                                     cfg.dup_threshold),
        "duplicates_baseline": metrics.pair_quality(base_pairs, base_sim, truth_pairs,
                                                    cfg.dup_threshold),
        # The same two searches without the shift-tolerant matching.
        "duplicates_influence_aligned": metrics.pair_quality(
            dups_aligned.rows, dups_aligned.similarity, truth_pairs, cfg.dup_threshold),
        "duplicates_baseline_aligned": metrics.pair_quality(
            base_pairs_aligned, base_sim_aligned, truth_pairs, cfg.dup_threshold),
        "duplicates_by_kind_influence": metrics.pair_recall_by_kind(
            dups.rows, dups.similarity, data, cfg.dup_threshold),
        "duplicates_by_kind_baseline": metrics.pair_recall_by_kind(
            base_pairs, base_sim, data, cfg.dup_threshold),
        "outliers_influence": metrics.outlier_quality(outl.scores, is_outlier),
        "outliers_self_influence": metrics.outlier_quality(outl_self.scores, is_outlier),
        "outliers_baseline": metrics.outlier_quality(base_outlier, is_outlier),
        "outliers_by_kind_influence": metrics.outlier_quality_by_kind(
            outl.scores, is_outlier, data),
        "outliers_by_kind_self_influence": metrics.outlier_quality_by_kind(
            outl_self.scores, is_outlier, data),
        "outliers_by_kind_baseline": metrics.outlier_quality_by_kind(
            base_outlier, is_outlier, data),
    }

    from . import report

    figures = report.write_figures(out, data, q_rows, pro, opp, self_inf, dups, outl, groups,
                                   cfg, quality)
    summary = {
        "config": asdict(cfg),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "train_loss": [round(h, 4) for h in history],
        "store": {"rows": store.rows, "dim": store.dim, "dtype": store.dtype},
        "damping": lam,
        "quality": quality,
        "groups": {
            "train_groups": groups.groups,
            "self_influence_mean": groups.self_mean.tolist(),
            "self_influence_ci": groups.self_ci.tolist(),
            "counts": groups.counts.tolist(),
            "test_groups": groups.test_groups,
            "cross": None if groups.cross is None else groups.cross.tolist(),
        },
        "figures": figures,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    report.write_markdown(out, summary)
    return summary


def _pick_queries(data: DemoData, n: int, seed: int) -> np.ndarray:
    """One test image of each of the first n digit classes (a readable grid)."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    for c in range(10):
        cand = np.flatnonzero(data.test_labels == c)
        if len(cand):
            rows.append(int(rng.choice(cand)))
        if len(rows) == n:
            break
    return np.array(rows)
