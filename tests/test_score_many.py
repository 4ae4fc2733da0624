"""score() of many queries: a data loader / iterable of batches, or a store of query features,
scored in blocks of QUERY_BLOCK; equal to scoring the same queries as one batch."""

from __future__ import annotations

import issl_fast as issl
import numpy as np
import pytest
import torch
from engine_models import batches, cnn_attribution, images
from issl_fast import influence

N, M = 30, 11


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[issl.InfluenceSSL, object]:
    attr = cnn_attribution(store_dtype="float32")
    store = attr.featurize(batches(images(N), 4), tmp_path_factory.mktemp("s") / "train",
                           progress=False)
    attr.fit(store)
    return attr, store


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(influence, "QUERY_BLOCK", 4)  # 11 queries: blocks of 4, 4 and 3


def _assert_same_top(got: issl.TopInfluence, want: issl.TopInfluence) -> None:
    # The same queries, featurised in other batches (float rounding of the convolutions).
    np.testing.assert_array_equal(got.rows.numpy(), want.rows.numpy())
    np.testing.assert_array_equal(got.ids.numpy(), want.ids.numpy())
    torch.testing.assert_close(got.values, want.values, rtol=1e-4, atol=1e-6)
    assert got.n == want.n == N


@pytest.mark.parametrize("opponents", [False, True])
def test_a_loader_of_queries_equals_one_batch(fitted, small_blocks, opponents: bool) -> None:
    attr, _ = fitted
    q = images(M, seed=7)
    want = attr.score(q, topk=5, opponents=opponents)
    got = attr.score(batches(q, 3), topk=5, opponents=opponents)
    _assert_same_top(got, want)
    assert got.query_ids.tolist() == want.query_ids.tolist() == list(range(M))
    if opponents:
        assert (got.values[:, :-1] <= got.values[:, 1:]).all()  # most negative first


def test_query_ids_come_from_the_data(fitted, small_blocks) -> None:
    attr, _ = fitted
    q = images(M, seed=7)
    ids = torch.arange(M) * 5 + 100
    data = [{"x": q[i:i + 3], "ids": ids[i:i + 3]} for i in range(0, M, 3)]
    got = attr.score(data, topk=4)
    assert got.query_ids.tolist() == ids.tolist()
    # the ids seed the queries' augmentations: the same as one batch with those ids
    _assert_same_top(got, attr.score(q, topk=4, ids=ids))


def test_a_store_of_queries_equals_one_batch(fitted, small_blocks, tmp_path) -> None:
    attr, train = fitted
    q = images(M, seed=7)
    test_store = attr.featurize(batches(q, 5), tmp_path / "test", progress=False)
    attr.store = train  # (featurize made the test store the default one)
    got = attr.score(test_store, topk=5, store=train)
    _assert_same_top(got, attr.score(q, topk=5, store=train))
    assert got.query_ids.tolist() == list(range(M))


def test_the_training_set_against_itself_excluding_each_row(fitted, small_blocks) -> None:
    attr, train = fitted
    got = attr.score(train, topk=3, store=train, exclude_rows=torch.arange(N))
    assert got.values.shape == (N, 3)
    assert not (got.rows == torch.arange(N)[:, None]).any()  # never its own row
    # the best other row is what a plain scan without exclusion ranks second or first
    plain = attr.score(train, topk=4, store=train)
    for i in range(N):
        assert got.rows[i, 0] == [r for r in plain.rows[i].tolist() if r != i][0]


def test_bad_many_query_arguments_are_refused(fitted, small_blocks, tmp_path) -> None:
    attr, train = fitted
    q = images(M, seed=7)
    with pytest.raises(ValueError, match="ids= is for a batch tensor"):
        attr.score(batches(q, 3), topk=3, ids=torch.arange(M))
    with pytest.raises(ValueError, match="exclude_rows must have one entry per query"):
        attr.score(batches(q, 3), topk=3, exclude_rows=torch.arange(5))
    with pytest.raises(ValueError, match="it has 12, there are 11 queries"):
        attr.score(batches(q, 3), topk=3, exclude_rows=torch.arange(12))
    other = cnn_attribution(store_dtype="float32", solver="block")
    other.encoder[0].weight.data += 1.0
    foreign = other.featurize(batches(q, 5), tmp_path / "foreign", progress=False)
    with pytest.raises(issl.StoreError, match="query store .* was built differently"):
        attr.score(foreign, topk=3, store=train)
    empty = attr.score([], topk=3, store=train)
    assert empty.values.shape == (0, 3) and empty.query_ids.shape == (0,)
