"""Edges of the user API: batches a filtering collate left empty or short, checks that hold for
a batch of queries as for many, numpy integers as counts, and the messages for the degenerate
cases (an empty EK-FAC store, k as large as the store)."""

from __future__ import annotations

from pathlib import Path

import issl_fast as issl
import numpy as np
import pytest
import torch
from engine_models import cnn_attribution, images
from issl_fast.store import StoreError
from torch.utils.data import DataLoader, Dataset, TensorDataset

N = 10


class _Tagged(Dataset):
    """Examples carrying their own ids; ``bad`` ones are dropped by :func:`_drop_bad`."""

    def __init__(self, n: int, bad: set[int]) -> None:
        self.x, self.bad = images(n), bad

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "ids": i, "bad": i in self.bad}


def _drop_bad(items: list[dict]) -> dict:
    kept = [it for it in items if not it["bad"]]
    return {"x": torch.stack([it["x"] for it in kept]) if kept else torch.zeros(0, 3, 16, 16),
            "ids": torch.tensor([it["ids"] for it in kept], dtype=torch.int64)}


def test_a_collate_that_drops_rows_at_the_end_gives_the_same_store_again(tmp_path: Path) -> None:
    attr = cnn_attribution()
    loader = DataLoader(_Tagged(N, {N - 1}), batch_size=4, collate_fn=_drop_bad)
    store = attr.featurize(loader, tmp_path / "s", progress=False)
    assert store.rows == N - 1
    again = attr.featurize(loader, tmp_path / "s", progress=False)
    assert again.rows == N - 1 and torch.equal(again.load(), store.load())
    # the data grew by examples it keeps: refused, as without ids
    grown = DataLoader(_Tagged(N + 3, {N - 1}), batch_size=4, collate_fn=_drop_bad)
    with pytest.raises(StoreError, match="pass append=True"):
        attr.featurize(grown, tmp_path / "s", progress=False)


def test_a_batch_left_empty_is_skipped_and_empty_queries_give_empty_results(
        tmp_path: Path) -> None:
    attr = cnn_attribution("block")
    whole = attr.featurize(DataLoader(_Tagged(N, set()), batch_size=4, collate_fn=_drop_bad),
                           tmp_path / "whole", progress=False)
    # examples 4..7 (a whole batch) dropped
    loader = DataLoader(_Tagged(N, {4, 5, 6, 7}), batch_size=4, collate_fn=_drop_bad)
    store = attr.featurize(loader, tmp_path / "s", progress=False)
    assert store.ids().tolist() == [0, 1, 2, 3, 8, 9]
    torch.testing.assert_close(store.load(), whole.load()[[0, 1, 2, 3, 8, 9]], rtol=2e-3,
                               atol=1e-6)
    attr.fit(store)
    top = attr.score(images(1)[:0], topk=3)
    assert top.values.shape == (0, 3) and top.ids.shape == (0, 3)


def test_exclude_rows_of_a_query_batch_are_checked_like_many_queries(tmp_path: Path) -> None:
    attr = cnn_attribution("block")
    x = images(6)
    attr.fit(attr.featurize([(x,)], tmp_path / "s", progress=False))
    with pytest.raises(ValueError, match=r"store rows in \[0, 6\) or -1, got values in \[-5, 100"):
        attr.score(x[:2], topk=3, exclude_rows=torch.tensor([100, -5]))
    with pytest.raises(ValueError, match=r"a row per query \(2\), got shape \(3, 1\)"):
        attr.score(x[:2], topk=3, exclude_rows=torch.tensor([0, 1, 2]))
    top = attr.score(x[:2], ids=torch.arange(2), topk=3, exclude_rows=torch.tensor([0, 1]))
    assert 0 not in top.rows[0].tolist() and 1 not in top.rows[1].tolist()


def test_counts_may_be_numpy_integers_and_k_must_leave_a_neighbour(tmp_path: Path) -> None:
    attr = cnn_attribution("block")
    attr.fit(attr.featurize([(images(6),)], tmp_path / "s", progress=False))
    k = np.int64(3)
    assert attr.neighbours(k)[0].shape == (6, 3)
    assert attr.find_outliers("neighbours", k=k).order.shape == (6,)
    attr.find_duplicates(0.99, topk=k)
    for bad in (6, 0, 2.0, True):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\]"):
            attr.find_outliers("neighbours", k=bad)


def test_fitting_an_empty_ekfac_store_says_it_is_empty(tmp_path: Path) -> None:
    attr = cnn_attribution("ekfac")
    store = attr.featurize([], tmp_path / "s", progress=False)
    assert store.rows == 0
    with pytest.raises(ValueError, match="has no rows: featurize examples into it before fit"):
        attr.fit(store)


def test_a_query_batch_of_one_view_and_one_example(tmp_path: Path) -> None:
    # (the batch probe's forward on one row fewer would be on one row: it takes one more)
    loss = issl.AugmentationStability(views=1, seed=0, augment=issl.SSLAugment.light(seed=0))
    attr = issl.InfluenceSSL(cnn_attribution().encoder, loss, issl.Projection("kron", k=16),
                             "block")
    assert attr.features(images(1)).shape == (1, attr.dim)


def _dense_store(tmp_path: Path, x: torch.Tensor):
    from issl_fast.store import GradientStore

    store = GradientStore.create_or_resume(tmp_path / "dense", {"test": 1}, x.shape[1], "float32",
                                           shard_rows=64)
    store.append(x, torch.arange(x.shape[0]))
    store.finalize()
    return store


def test_threshold_one_keeps_exact_duplicates_despite_float32_rounding(tmp_path: Path) -> None:
    from issl_fast.apps import find_duplicates
    from issl_fast.projection import Block
    from issl_fast.solver import Solver

    store = _dense_store(tmp_path, torch.randn(4, 8))
    solver = Solver("identity", [Block("all", 0, 8, "dense")]).fit(store)
    # rows 0-1 at one float32 unit below 1 (how an exact copy can come out), rows 2-3 at 0.9999
    sim = np.array([[0.99999994], [0.99999994], [0.9999], [0.9999]], dtype=np.float32)
    rows = np.array([[1], [0], [3], [2]])
    pairs = find_duplicates(store, solver, threshold=1.0, topk=1, neighbours=(sim, rows))
    assert pairs.rows.tolist() == [[0, 1]]


def test_damping_must_be_positive_and_a_singular_curvature_is_named(tmp_path: Path) -> None:
    from issl_fast.projection import Block
    from issl_fast.solver import Solver

    blocks = [Block("all", 0, 8, "dense")]
    for kwargs in ({"damping": 0.0}, {"absolute_damping": 0.0}, {"absolute_damping": -1.0}):
        with pytest.raises(ValueError, match="damping must be > 0"):
            Solver("gauss_newton", blocks, **kwargs)
    x = torch.randn(5, 8)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="not positive definite.*NaN/Inf"):
        Solver("gauss_newton", blocks).fit(_dense_store(tmp_path, x))


def test_counts_from_numpy_are_ints_everywhere(tmp_path: Path) -> None:
    import json

    from issl_fast.apps import ClusteredSearch, shifts, translations

    proj = issl.Projection("kron", k=np.int64(16), k_in=np.int32(4))
    assert type(proj.k) is int and type(proj.k_in) is int
    json.dumps(proj.config())  # (stores keep it as JSON)
    assert ClusteredSearch(probes=np.int64(4)).probes == 4
    assert len(translations(np.int64(1))) == 4 and len(shifts(np.int16(2))) == 4
    attr = cnn_attribution("block")
    attr.fit(attr.featurize([(images(6),)], tmp_path / "s", progress=False))
    groups = np.array([0, 1, 0, 1, 0, 1])
    result = attr.group_influence(groups, n_boot=np.int64(20))
    assert result.counts.tolist() == [3, 3]


def _every_scan(attr: issl.InfluenceSSL, x: torch.Tensor, root: Path) -> dict[str, np.ndarray]:
    """featurize -> fit -> every scan of the API, as arrays."""
    store = attr.featurize(DataLoader(TensorDataset(x), batch_size=5), root, progress=False)
    attr.fit(store)
    top = attr.score(x[:3], ids=torch.arange(3), topk=4)
    pairs = attr.find_duplicates(threshold=-1.0, topk=2)
    clustered = attr.neighbours(3, search=issl.apps.ClusteredSearch(clusters=3, probes=3))
    groups = attr.group_influence(np.arange(len(x)) % 2, x[:4], np.zeros(4), n_boot=20)
    return {"score": top.values, "score_ids": top.ids, "pairs": pairs.similarity,
            "outliers": attr.find_outliers().scores, "self": attr.self_influence(),
            "clustered": clustered[0], "cross": groups.cross}


def _float64_cnn() -> issl.InfluenceSSL:
    attr = cnn_attribution("gauss_newton")
    attr.encoder.double()
    return attr


def test_a_float64_default_dtype_changes_no_result(tmp_path: Path) -> None:
    # every buffer the scans allocate is float32 whatever torch's default dtype (a float64
    # default made score, find_duplicates, find_outliers and the clustered search fail)
    x = images(12).double()
    # (both made under the float32 default: a float64 default draws other initial weights)
    ours, theirs = _float64_cnn(), _float64_cnn()
    want = _every_scan(ours, x, tmp_path / "f32")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = _every_scan(theirs, x, tmp_path / "f64")
    finally:
        torch.set_default_dtype(before)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5,
                                   atol=1e-6, err_msg=key)
