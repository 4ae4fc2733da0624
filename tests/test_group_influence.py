"""Group (fairness) influence at scale: bootstrap counts drawn a window of rows at a time are a
multinomial resample of each group, do not depend on how rows arrive, and many queries (blocks,
a loader, a query store) give the answer of one query tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from engine_models import cnn_attribution, images
from issl_fast.apps import fairness
from issl_fast.store import GradientStore
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

# Replicates of the distribution test: its checks sit at 5 standard errors, so a correct
# sampler fails one of the 4 checks with probability ~2e-6 (and the seed is fixed).
REPLICATES = 20000
SIGMAS = 5.0


def _counts(gid: np.ndarray, n_boot: int, chunk: int, splits: list[int], seed: int = 0
            ) -> np.ndarray:
    sizes = np.bincount(gid)
    bc = fairness.BootstrapCounts(gid, sizes, n_boot, np.random.default_rng(seed), chunk)
    parts, first = [], 0
    for b in splits:
        parts.append(bc.weights(first, b))
        first += b
    assert first == len(gid)
    w = np.concatenate(parts, axis=1)
    return w[1:] * sizes[gid]  # the integer counts of each resample


def test_bootstrap_counts_resample_each_group_and_ignore_how_rows_arrive() -> None:
    rng = np.random.default_rng(3)
    gid = rng.integers(0, 3, 101)
    counts = _counts(gid, 50, chunk=16, splits=[101])
    assert np.allclose(counts, np.round(counts)) and (counts >= 0).all()
    for g in range(3):  # each resample draws exactly the group's size
        np.testing.assert_array_equal(counts[:, gid == g].sum(axis=1), (gid == g).sum())
    for splits in ([1] * 101, [7, 40, 3, 51], [16, 16, 69]):
        np.testing.assert_array_equal(_counts(gid, 50, chunk=16, splits=splits), counts)
    sizes = np.bincount(gid)
    bc = fairness.BootstrapCounts(gid, sizes, 4, np.random.default_rng(0), 16)
    np.testing.assert_array_equal(bc.weights(0, 101)[0], 1.0 / sizes[gid])
    with pytest.raises(ValueError, match="row order"):
        bc.weights(3, 2)  # window 0 again, after window 6


def test_bootstrap_counts_have_the_multinomial_distribution() -> None:
    """Members of a group of n spread over several windows: each count has mean 1, variance
    1 - 1/n, two members covary by -1/n, and a member is missed with probability (1-1/n)^n."""
    n = 30
    gid = np.array([0, 1, 1] * n)  # group 0's members sit in every window of 7 rows
    counts = _counts(gid, REPLICATES, chunk=7, splits=[len(gid)], seed=11)[:, gid == 0]
    se = 1.0 / np.sqrt(REPLICATES)
    first, last = counts[:, 0], counts[:, -1]
    assert abs(first.mean() - 1.0) < SIGMAS * np.sqrt(1 - 1 / n) * se
    assert abs(last.var() - (1 - 1 / n)) < SIGMAS * 1.5 * se  # (sd of a variance estimate)
    cov = np.mean((first - 1) * (last - 1))
    assert abs(cov + 1 / n) < SIGMAS * se
    p0 = (1 - 1 / n) ** n
    assert abs((last == 0).mean() - p0) < SIGMAS * np.sqrt(p0 * (1 - p0)) * se


def test_query_blocks_give_the_answer_of_one_tensor(tmp_path: Path) -> None:
    attr = cnn_attribution()
    store = attr.featurize(DataLoader(TensorDataset(images(40)), batch_size=8),
                           tmp_path / "train", shard_rows=16, progress=False)
    attr.fit(store)
    test = images(13, seed=5)
    tl = np.array(["a", "b", "b", "c"] * 3 + ["a"])
    train_groups = np.arange(40) % 4
    q = attr.preconditioned(test)
    whole = fairness.group_influence(store, attr.self_influence(), train_groups,
                                     preconditioned_queries=q, test_groups=tl, n_boot=64)
    pieces = fairness.group_influence(store, attr.self_influence(), train_groups,
                                      preconditioned_queries=iter([q[:5], q[5:6], q[6:]]),
                                      test_groups=tl, n_boot=64)
    np.testing.assert_allclose(pieces.cross, whole.cross, rtol=1e-12)
    np.testing.assert_allclose(pieces.cross_ci, whole.cross_ci, rtol=1e-12)
    # through the object: a test loader (read in dataset order) and a query store
    loader = DataLoader(TensorDataset(test), batch_size=4, shuffle=True)
    direct = attr.group_influence(train_groups, test, tl, n_boot=64)
    np.testing.assert_allclose(direct.cross, whole.cross, rtol=1e-9)
    many = attr.group_influence(train_groups, loader, tl, n_boot=64)
    query_store = attr.featurize(loader, tmp_path / "test", progress=False)
    stored = attr.group_influence(train_groups, query_store, tl, n_boot=64)
    scale = np.abs(whole.cross).max()
    for got in (many, stored):  # other batches and a float16 store: rounding only
        np.testing.assert_allclose(got.cross, whole.cross, rtol=0, atol=2e-3 * scale)
        np.testing.assert_allclose(got.cross_ci, whole.cross_ci, rtol=0, atol=2e-3 * scale)
    with pytest.raises(ValueError, match=r"test_groups must be \[13\]"):
        attr.group_influence(train_groups, loader, tl[:-1].tolist() + ["a", "a"], n_boot=8)
    with pytest.raises(ValueError, match="there are more queries"):
        attr.group_influence(train_groups, loader, tl[:-1], n_boot=8)
    with pytest.raises(ValueError, match="ids= is for a batch tensor"):
        attr.group_influence(train_groups, loader, tl, ids=torch.arange(13), n_boot=8)
    # a sampler that draws a random set: the order test_groups must follow is unknowable
    drawn = DataLoader(TensorDataset(test), batch_size=4,
                       sampler=RandomSampler(TensorDataset(test), replacement=True))
    with pytest.raises(ValueError, match="draws with replacement, so test_groups cannot"):
        attr.group_influence(train_groups, drawn, tl, n_boot=8)


def test_resampled_means_too_large_are_refused_with_an_n_boot_that_fits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attr = cnn_attribution()
    store = attr.featurize(DataLoader(TensorDataset(images(12)), batch_size=4),
                           tmp_path / "train", progress=False)
    attr.fit(store)
    monkeypatch.setattr(fairness, "MAX_MEANS_BYTES", 3 * 101 * (store.dim + 1) * 8)
    groups = np.arange(12) % 3
    with pytest.raises(ValueError, match="training groups.*use n_boot <= 100"):
        attr.group_influence(groups, images(4, seed=2), np.zeros(4), n_boot=101)
    ok = attr.group_influence(groups, images(4, seed=2), np.zeros(4), n_boot=100)
    assert ok.cross is not None and ok.cross.shape == (1, 3)
    # the cross-group matrix too (4 x 12 groups, twice), in a budget that fits the means
    tiny = GradientStore.create_or_resume(tmp_path / "tiny", {"tiny": 1}, 2, "float32")
    tiny.append(torch.randn(12, 2), torch.arange(12))
    tiny.finalize()
    monkeypatch.setattr(fairness, "MAX_MEANS_BYTES", 4 * 11 * 2 * 12 * 8 - 1)
    with pytest.raises(ValueError, match=r"4 x 12 cross-group matrix.*use n_boot <= 9"):
        fairness.group_influence(tiny, np.ones(12), np.arange(12), n_boot=10,
                                 preconditioned_queries=torch.randn(4, 2),
                                 test_groups=np.arange(4))
    monkeypatch.setattr(fairness, "MAX_MEANS_BYTES", 3 * 101 * (store.dim + 1) * 8)
    with pytest.raises(ValueError, match="train_groups contain NaN"):
        attr.group_influence(np.where(groups == 1, np.nan, groups), n_boot=8)
    # the self-influence intervals do not depend on whether queries are given (the same
    # resamples; their sums are taken in other blocks, so equal to float64 rounding)
    alone = attr.group_influence(groups, n_boot=50, seed=3)
    with_queries = attr.group_influence(groups, images(4, seed=2), np.zeros(4), n_boot=50,
                                        seed=3)
    np.testing.assert_allclose(alone.self_ci, with_queries.self_ci, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="n_boot must be an int >= 1"):
        attr.group_influence(groups, n_boot=0)
