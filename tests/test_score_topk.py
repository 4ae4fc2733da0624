"""ops.score_topk (streaming top-k of Q G^T) against the reference: exact indices and tie order,
values to the policy's tolerance, every store kind (tensors, numpy arrays, a real memmap),
exclusion, padding, NaN rows, index offsets, shard merging and batch/thread invariance."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Union

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from inputs import dyadic, randn
from issl_fast import _backend, ops, reference
from tolerances import assert_topk_close

Store = Union[torch.Tensor, np.ndarray]
STORE_KINDS = ("torch-float32", "torch-float16", "torch-bfloat16", "numpy-float32",
               "numpy-float16")
NEG_INF = -math.inf


def _store(G: torch.Tensor, kind: str) -> Store:
    """G (float32, exact in every dtype) as the given store kind."""
    lib, dtype = kind.split("-")
    t = G.to(getattr(torch, dtype))
    return t.numpy() if lib == "numpy" else t


def assert_sorted_with_ties_by_lower_index(v: torch.Tensor, i: torch.Tensor) -> None:
    for row_v, row_i in zip(v.tolist(), i.tolist()):
        pairs = [(a, b) for a, b in zip(row_v, row_i) if b >= 0]
        assert pairs == sorted(pairs, key=lambda p: (-p[0], p[1])), row_i
        assert all(b < 0 for b in row_i[len(pairs):])  # empty slots come last


# (m, n, k, topk): tiles are 256 KiB of float32 rows (1024 rows at k = 64), so n = 5000 spans
# several tiles and both threads; topk > n pads; n = 0 and m = 0 are empty.
CASES = [
    (1, 1, 1, 1),
    (5, 7, 5, 3),
    (17, 257, 63, 10),
    (5, 1031, 64, 1),
    (1, 5000, 64, 17),
    (17, 3000, 129, 50),
    (5, 7, 5, 20),
    (3, 100, 4099, 5),  # wide rows: the smallest tile (16 rows), many tiles
    (300, 1100, 16, 4),  # more queries than one query block (256)
    (3, 0, 5, 4),
    (0, 7, 5, 3),
]


@functools.cache
def _case(
    m: int, n: int, k: int, topk: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    Q = randn((m, k), seed=m * 31 + k)
    G = dyadic((n, k), seed=n * 7 + k)
    return Q, G, reference.score_topk(Q, G, topk, accum=torch.float64)


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("m,n,k,topk", CASES)
def test_matches_reference(simd: str, m: int, n: int, k: int, topk: int, kind: str) -> None:
    Q, G, ref = _case(m, n, k, topk)
    got = ops.score_topk(Q, _store(G, kind), topk)
    assert_topk_close(got, ref, Q, G, what=f"{kind} m={m} n={n} k={k} topk={topk}")
    assert_sorted_with_ties_by_lower_index(*got)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_memmap_store(simd: str, tmp_path: Path, dtype: type) -> None:
    n, k = 3000, 65
    G = dyadic((n, k), seed=1)
    path = tmp_path / "store.bin"
    mm = np.memmap(path, dtype=dtype, mode="w+", shape=(n, k))
    mm[:] = G.numpy().astype(dtype)
    mm.flush()
    del mm
    store = np.memmap(path, dtype=dtype, mode="r", shape=(n, k))
    assert isinstance(store, np.memmap)
    Q = randn((5, k), seed=2)
    got = ops.score_topk(Q, store, 25)
    assert_topk_close(got, reference.score_topk(Q, G, 25, accum=torch.float64), Q, G,
                        what="memmap")
    # The same bytes as an in-memory tensor give bit-identical results.
    in_memory = ops.score_topk(Q, torch.from_numpy(np.asarray(store).copy()), 25)
    assert torch.equal(got[0], in_memory[0]) and torch.equal(got[1], in_memory[1])


def test_bfloat16_store_via_numpy_bits_view(simd: str) -> None:
    # A bfloat16 store kept as uint16 bits (numpy has no bfloat16), viewed by torch.
    G = dyadic((300, 33), seed=3)
    bits = G.to(torch.bfloat16).view(torch.int16).numpy()
    store = torch.from_numpy(bits).view(torch.bfloat16)
    Q = randn((4, 33), seed=4)
    assert_topk_close(ops.score_topk(Q, store, 7),
                        reference.score_topk(Q, G, 7, accum=torch.float64), Q, G, what="bf16")


def test_bfloat16_query_is_scored_as_its_float32_value() -> None:
    Qb = randn((5, 48), seed=21).to(torch.bfloat16)
    G = dyadic((700, 48), seed=22).to(torch.bfloat16)
    got = ops.score_topk(Qb, G, 11)
    want = ops.score_topk(Qb.float(), G, 11)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # ... and those are the scores of the bf16 values (not of a further-rounded query).
    Qf, Gf = Qb.float(), G.float()
    ref = reference.score_topk(Qf, Gf, 11, accum=torch.float64)
    assert_topk_close(got, ref, Qf, Gf, what="bf16 query")


@pytest.mark.parametrize("n", [40, 4100])
def test_exact_ties_broken_by_lower_index(simd: str, n: int) -> None:
    # Rows repeat with period 3 (G[j] = base[j % 3]), so every score occurs ~n/3 times exactly.
    # With n = 4100 the copies span several tiles and both threads.
    k, topk = 64, 17
    base = randn((3, k), seed=5)
    G = base.repeat((n + 2) // 3, 1)[:n].contiguous()
    Q = randn((6, k), seed=6)
    got = ops.score_topk(Q, G, topk)
    ref = reference.score_topk(Q, G, topk, accum=torch.float64)
    assert_topk_close(got, ref, Q, G, what="ties")
    v, i = got
    order = (Q.double() @ base.double().T).argsort(1, descending=True)  # base rows, best first
    for q in range(Q.shape[0]):
        # All copies of the best base row in index order, then those of the second best, ...
        expected = torch.cat([torch.arange(int(r), n, 3) for r in order[q]])[:topk]
        assert torch.equal(i[q], expected), f"query {q}: {i[q].tolist()}"
        copies = (n - int(order[q, 0]) + 2) // 3
        assert torch.equal(v[q, :copies], v[q, :1].expand(min(copies, topk)))  # exact ties


def test_ties_across_the_whole_order(simd: str) -> None:
    # All copies of all base rows, topk = n: sorted by value, then index, and bit-identical ties.
    G = randn((4, 9), seed=7).repeat(5, 1)
    Q = randn((3, 9), seed=8)
    v, i = ops.score_topk(Q, G, 20)
    assert_sorted_with_ties_by_lower_index(v, i)
    assert torch.equal(i, reference.score_topk(Q, G, 20, accum=torch.float64)[1])
    for q in range(3):
        by_row = dict(zip(i[q].tolist(), v[q].tolist()))
        for j in range(4, 20):
            assert by_row[j] == by_row[j % 4]


@pytest.mark.parametrize("index_offset", [0, 1000, 2**40])
def test_exclude_1d_and_2d_with_padding(simd: str, index_offset: int) -> None:
    m, n, k, topk = 5, 1500, 17, 6
    Q, G = randn((m, k), seed=9), dyadic((n, k), seed=10)
    plain = ops.score_topk(Q, G, topk, index_offset=index_offset)[1]
    # [m]: each query excludes its own best match.
    ex1 = plain[:, 0].clone()
    got1 = ops.score_topk(Q, G, topk, exclude=ex1, index_offset=index_offset)
    ref1 = reference.score_topk(Q, G, topk, exclude=ex1, index_offset=index_offset,
                                accum=torch.float64)
    assert_topk_close(got1, ref1, Q, G, index_offset, "exclude [m]")
    assert not (got1[1] == ex1[:, None]).any()
    assert torch.equal(got1[1][:, : topk - 1], plain[:, 1:])
    # [m, e] with -1 padding, as a numpy array, excluding a varying number of the top ids.
    ex2 = np.full((m, 4), -1, dtype=np.int64)
    for q in range(m):
        ex2[q, : q % 5] = plain[q, [0, 2, 3, 5][: q % 5]].numpy()
    got2 = ops.score_topk(Q, G, topk, exclude=ex2, index_offset=index_offset)
    ref2 = reference.score_topk(Q, G, topk, exclude=torch.from_numpy(ex2),
                                index_offset=index_offset, accum=torch.float64)
    assert_topk_close(got2, ref2, Q, G, index_offset, "exclude [m, e]")
    for q in range(m):
        assert not set(got2[1][q].tolist()) & set(ex2[q][ex2[q] >= 0].tolist())
    if index_offset < 2**31:  # int32 ids are accepted too
        got3 = ops.score_topk(Q, G, topk, exclude=torch.from_numpy(ex2).to(torch.int32),
                              index_offset=index_offset)
        assert torch.equal(got3[1], got2[1])


def test_exclude_everything_leaves_empty_slots(simd: str) -> None:
    Q, G = randn((2, 8), seed=11), randn((3, 8), seed=12)
    v, i = ops.score_topk(Q, G, 4, exclude=torch.tensor([[0, 1, 2], [2, -1, -1]]))
    assert torch.equal(i[0], torch.tensor([-1, -1, -1, -1]))
    assert torch.equal(v[0], torch.full((4,), NEG_INF))
    assert sorted(i[1, :2].tolist()) == [0, 1] and torch.equal(i[1, 2:], torch.tensor([-1, -1]))


@pytest.mark.parametrize("kind", ["torch-float32", "torch-bfloat16", "numpy-float16"])
def test_topk_larger_than_n_pads_with_neg_inf_and_minus_one(simd: str, kind: str) -> None:
    n, topk = 6, 11
    Q, G = randn((3, 5), seed=13), dyadic((n, 5), seed=14)
    v, i = ops.score_topk(Q, _store(G, kind), topk)
    assert torch.equal(i[:, n:], torch.full((3, topk - n), -1))
    assert torch.equal(v[:, n:], torch.full((3, topk - n), NEG_INF))
    assert torch.equal(i[:, :n].sort(1).values, torch.arange(n).expand(3, n))  # all rows present
    assert_topk_close((v, i), reference.score_topk(Q, G, topk, accum=torch.float64), Q, G,
                        what="padding")


@pytest.mark.parametrize("kind", ["torch-float32", "torch-float16", "numpy-float32"])
def test_nan_rows_and_neg_inf_scores_are_never_returned(simd: str, kind: str) -> None:
    n, k = 2100, 16
    G = dyadic((n, k), seed=15)
    nan_rows = [0, 5, 1023, 1024, 2099]
    G[nan_rows] = math.nan
    G[7, 3] = NEG_INF  # with q[3] > 0 and the rest finite: score -inf
    Q = randn((4, k), seed=16).abs() + 0.1
    v, i = ops.score_topk(Q, _store(G, kind), n)
    returned = set(i[i >= 0].tolist())
    assert not returned & set(nan_rows) and 7 not in returned
    assert (i >= 0).sum(1).tolist() == [n - len(nan_rows) - 1] * 4
    assert not torch.isnan(v).any()
    assert_topk_close((v[:, :50], i[:, :50]),
                        reference.score_topk(Q, G, 50, accum=torch.float64), Q,
                        G.nan_to_num(0.0, 0.0, 0.0), what="nan rows")


@pytest.mark.parametrize("index_offset", [1, 2**33 + 7])
def test_index_offset(simd: str, index_offset: int) -> None:
    Q, G = randn((5, 20), seed=17), dyadic((777, 20), seed=18)
    v0, i0 = ops.score_topk(Q, G, 9)
    v, i = ops.score_topk(Q, G, 9, index_offset=index_offset)
    assert torch.equal(v, v0) and torch.equal(i, i0 + index_offset)
    assert_topk_close((v, i), reference.score_topk(Q, G, 9, index_offset=index_offset,
                                                     accum=torch.float64),
                        Q, G, index_offset, "index_offset")


@pytest.mark.parametrize("topk", [1, 7, 40])
def test_merging_shards_equals_scoring_the_concatenation(simd: str, topk: int) -> None:
    # Three shards (the middle one smaller than topk, and one as a float16 numpy array), merged
    # with out=(v, i), accumulate=True and each shard's index_offset.
    k = 33
    shards = [dyadic((1500, k), seed=19), dyadic((5, k), seed=20), dyadic((900, k), seed=21)]
    # Row 3 (doubled: the clear best match of query 0) is duplicated in the last shard as row
    # 1515: an exact tie that the lower (earlier-shard) index must win.
    shards[0][3] *= 2
    shards[2][10] = shards[0][3]
    G = torch.cat(shards)
    Q = randn((6, k), seed=22)
    Q[0] = G[3]
    ex = torch.tensor([[-1], [2], [1501], [1505 + 899], [-1], [0]])
    v, i = ops.score_topk(Q, shards[0], topk, exclude=ex)
    offset = shards[0].shape[0]
    for shard in (shards[1].numpy().astype(np.float16), shards[2]):
        ops.score_topk(Q, shard, topk, exclude=ex, index_offset=offset, out=(v, i),
                       accumulate=True)
        offset += shard.shape[0]
    whole = ops.score_topk(Q, G, topk, exclude=ex)
    assert torch.equal(i, whole[1]) and torch.equal(v, whole[0])
    assert_topk_close((v, i), reference.score_topk(Q, G, topk, exclude=ex,
                                                     accum=torch.float64), Q, G, what="merge")
    if topk >= 2:
        assert i[0, :2].tolist() == [3, 1515]


def test_out_reuse_overwrites(simd: str) -> None:
    Q, G, _ = _case(17, 257, 63, 10)
    fresh = ops.score_topk(Q, G, 10)
    v, i = torch.full((17, 10), math.nan), torch.full((17, 10), 123, dtype=torch.int64)
    for _ in range(2):  # reused: the earlier content is ignored without accumulate
        rv, ri = ops.score_topk(Q, G, 10, out=(v, i))
        assert rv is v and ri is i
        assert torch.equal(v, fresh[0]) and torch.equal(i, fresh[1])


def test_accumulate_keeps_a_better_earlier_result(simd: str) -> None:
    Q, G = randn((2, 8), seed=23), randn((50, 8), seed=24)
    v = torch.tensor([[1e30, NEG_INF, NEG_INF], [NEG_INF, NEG_INF, NEG_INF]])
    i = torch.tensor([[10**12, -1, -1], [-1, -1, -1]])
    ops.score_topk(Q, G, 3, out=(v, i), accumulate=True)
    fresh = ops.score_topk(Q, G, 3)
    assert i[0].tolist() == [10**12, *fresh[1][0, :2].tolist()]
    assert v[0, 0] == torch.tensor(1e30) and torch.equal(v[0, 1:], fresh[0][0, :2])
    assert torch.equal(i[1], fresh[1][1]) and torch.equal(v[1], fresh[0][1])


@pytest.mark.parametrize("kind", ["torch-float32", "torch-bfloat16"])
def test_values_bit_identical_whatever_the_query_batch(simd: str, kind: str) -> None:
    k = 65
    Q, G = randn((17, k), seed=25), _store(dyadic((2500, k), seed=26), kind)
    v17, i17 = ops.score_topk(Q, G, 12)
    for q0, q1 in [(0, 5), (5, 10), (12, 17)]:
        v5, i5 = ops.score_topk(Q[q0:q1].contiguous(), G, 12)
        assert torch.equal(v5, v17[q0:q1]) and torch.equal(i5, i17[q0:q1])
    for q in (0, 6, 16):
        v1, i1 = ops.score_topk(Q[q : q + 1].contiguous(), G, 12)
        assert torch.equal(v1[0], v17[q]) and torch.equal(i1[0], i17[q])


@pytest.mark.parametrize("kind", ["torch-float32", "torch-float16", "torch-bfloat16"])
def test_all_three_scoring_paths_agree_bit_for_bit(simd: str, kind: str) -> None:
    # k = 1024: 8 queries fit the L1 budget (micro-staged path, the next rows widened during the
    # dot), 9 do not (whole tiles staged; a float32 store is read in place), 1 is scored straight
    # from the store (fused path).
    k = 1024
    G32 = dyadic((1031, k), seed=42)
    Q, G = randn((9, k), seed=41), _store(G32, kind)
    v9, i9 = ops.score_topk(Q, G, 7, num_threads=2)
    v8, i8 = ops.score_topk(Q[:8].contiguous(), G, 7, num_threads=2)
    v1, i1 = ops.score_topk(Q[3:4].contiguous(), G, 7, num_threads=3)
    assert torch.equal(v8, v9[:8]) and torch.equal(i8, i9[:8])
    assert torch.equal(v1[0], v9[3]) and torch.equal(i1[0], i9[3])
    assert_topk_close((v9, i9), reference.score_topk(Q, G32, 7, accum=torch.float64), Q, G32,
                      what=f"three paths {kind}")


def test_thread_count_invariance_and_determinism(simd: str) -> None:
    Q, G = randn((9, 64), seed=27), dyadic((5000, 64), seed=28).to(torch.float16)
    runs = [ops.score_topk(Q, G, 30, num_threads=t) for t in (1, 2, 3, 2)]
    for v, i in runs[1:]:
        assert torch.equal(v, runs[0][0]) and torch.equal(i, runs[0][1])


def test_reference_backend_through_ops() -> None:
    Q, G = randn((3, 6), seed=29), randn((20, 6), seed=30)
    ex = torch.tensor([4, -1, 7])
    v, i = ops.score_topk(Q, G, 5, exclude=ex, index_offset=3, backend="reference")
    rv, ri = reference.score_topk(Q, G, 5, exclude=ex[:, None], index_offset=3)
    assert torch.equal(v, rv) and torch.equal(i, ri)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(0, 9),
    n=st.integers(0, 1200),
    k=st.integers(1, 70),
    topk=st.integers(1, 30),
    kind=st.sampled_from(STORE_KINDS),
    n_exclude=st.integers(0, 3),
    index_offset=st.sampled_from([0, 5, 2**35]),
    level=st.sampled_from(_backend.supported_simd_levels()),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_matches_reference(
    m: int, n: int, k: int, topk: int, kind: str, n_exclude: int, index_offset: int, level: str,
    seed: int,
) -> None:
    Q, G = randn((m, k), seed=seed), dyadic((n, k), seed=seed + 1)
    gen = torch.Generator().manual_seed(seed)
    exclude = None
    if n_exclude:
        exclude = torch.randint(-1, max(n, 1), (m, n_exclude), generator=gen)
        exclude = torch.where(exclude >= 0, exclude + index_offset, exclude)
    _backend.set_simd_level(level)  # restored by the autouse fixture
    got = ops.score_topk(Q, _store(G, kind), topk, exclude=exclude, index_offset=index_offset)
    ref = reference.score_topk(Q, G, topk, exclude=exclude, index_offset=index_offset,
                               accum=torch.float64)
    assert_topk_close(got, ref, Q, G, index_offset, f"hypothesis {kind} level={level}")
    assert_sorted_with_ties_by_lower_index(*got)


@pytest.mark.parametrize("topk", [1, 7, 16, 17, 100])
def test_rising_scores_make_every_row_a_candidate(simd: str, topk: int) -> None:
    """Scores that rise with the row (each row beats every earlier one) put every row into a
    query's candidate list, so it is cut back to the best topk many times; with plateaus of
    exact ties the kept rows must still be the lowest of each tied value."""
    n, k = 3001, 8
    level = torch.arange(n, dtype=torch.float32) // 3  # plateaus of 3 equal scores
    G = torch.zeros(n, k)
    G[:, 0] = level
    Q = torch.zeros(2, k)
    Q[0, 0], Q[1, 0] = 1.0, -1.0  # rising, and falling (only the first rows are ever kept)
    for threads in (1, 2):
        v, i = ops.score_topk(Q, G, topk, num_threads=threads)
        want = reference.score_topk(Q, G, topk, accum=torch.float64)
        assert torch.equal(i, want[1]), f"threads={threads}: {i[:, :8].tolist()}"
        assert torch.equal(v, want[0].float())
        best = sorted(range(n), key=lambda r: (-float(level[r]), r))  # plateaus, lower row first
        assert i[0].tolist() == best[:topk] and v[0, 0] == level[-1]
        assert i[1].tolist() == list(range(topk))
