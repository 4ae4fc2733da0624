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


def test_a_store_of_queries_equals_one_batch(fitted, small_blocks, tmp_path,
                                            monkeypatch) -> None:
    attr, train = fitted
    q = images(M, seed=7)
    # shards of 3 rows: the blocks of 4 queries are gathered across them (3 passes, not 4)
    test_store = attr.featurize(batches(q, 5), tmp_path / "test", shard_rows=3, progress=False)
    passes = []
    scan = attr.topk_from_preconditioned
    monkeypatch.setattr(attr, "topk_from_preconditioned",
                        lambda q, *a, **kw: passes.append(q.shape[0]) or scan(q, *a, **kw))
    got = attr.score(test_store, topk=5)  # scans still default to the store fit used
    assert passes == [4, 4, 3] and got.n == N
    monkeypatch.undo()
    _assert_same_top(got, attr.score(q, topk=5))
    assert got.query_ids.tolist() == list(range(M))
    assert attr.self_influence().shape == (N,)  # the training store, not the test one


def test_the_training_set_against_itself_excluding_each_row(fitted, small_blocks) -> None:
    attr, train = fitted
    got = attr.score(train, topk=3, store=train, exclude_rows=torch.arange(N))
    assert got.values.shape == (N, 3)
    assert not (got.rows == torch.arange(N)[:, None]).any()  # never its own row
    # the best other row is what a plain scan without exclusion ranks second or first
    plain = attr.score(train, topk=4, store=train)
    for i in range(N):
        assert got.rows[i, 0] == [r for r in plain.rows[i].tolist() if r != i][0]


def test_exclude_rows_of_several_rows_per_query(fitted, small_blocks) -> None:
    attr, train = fitted
    plain = attr.score(train, topk=3)
    two = torch.stack([torch.arange(N), plain.rows[:, 1]], dim=1)  # itself and its runner-up
    got = attr.score(train, topk=3, exclude_rows=two)
    for i in range(N):
        assert not set(got.rows[i].tolist()) & set(two[i].tolist())
    # the same as one batch of the same queries with the same [m, 2] exclusions
    q = train.load(torch.float64)
    want = attr.topk_from_preconditioned(attr.solver.precondition(q).float(), 3,
                                         exclude_rows=two)
    np.testing.assert_array_equal(got.rows.numpy(), want.rows.numpy())


def test_bad_many_query_arguments_are_refused(fitted, small_blocks, tmp_path) -> None:
    attr, train = fitted
    q = images(M, seed=7)
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        attr.score([], topk=0)
    with pytest.raises(ValueError, match="exclude_rows must have one row per query: it has 5, "
                                         "the query store 30"):
        attr.score(train, topk=3, exclude_rows=torch.arange(5))
    partial = issl.GradientStore.create_or_resume(tmp_path / "partial", attr.fingerprint(),
                                                  attr.dim, "float32")
    partial.append(torch.zeros(2, attr.dim), torch.arange(2))
    with pytest.raises(issl.StoreError, match="query store .* is incomplete"):
        attr.score(partial, topk=3)
    with pytest.raises(ValueError, match="ids= is for a batch tensor"):
        attr.score(batches(q, 3), topk=3, ids=torch.arange(M))
    with pytest.raises(ValueError, match="exclude_rows must have one row per query"):
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


def test_fit_without_a_store_refuses_to_guess(tmp_path) -> None:
    attr = cnn_attribution("block", store_dtype="float32")
    train = attr.featurize(batches(images(N), 6), tmp_path / "train", progress=False)
    attr.fit()  # one store: no doubt
    attr.featurize(batches(images(M, seed=7), 6), tmp_path / "test", progress=False)
    with pytest.raises(ValueError, match="fit\\(\\) has 2 stores to choose from"):
        attr.fit()  # the test set, or a refit of the training set?
    attr.fit(train)
    assert attr.self_influence().shape == (N,)  # scans stay on the store fit used


def test_many_query_exclusions_are_checked(fitted, small_blocks) -> None:
    attr, train = fitted
    with pytest.raises(TypeError, match="exclude_rows must hold integer store rows"):
        attr.score(train, topk=3, exclude_rows=torch.zeros(N))
    with pytest.raises(ValueError, match=r"exclude_rows must be store rows in \[0, 30\) or -1"):
        attr.score(train, topk=3, exclude_rows=torch.full((N,), N))
    got = attr.score(train, topk=np.int64(2), exclude_rows=torch.full((N,), -1))
    assert got.values.shape == (N, 2)
