"""The CUDA score_topk against the reference and the CPU kernel: every store dtype, both kernel
families (float32 SIMT, bf16 tensor cores with a three-term split query), awkward shapes (more
queries than a block, topk beyond the candidate buffers, n not a multiple of the tile), exact ties
by lower index, exclusion, NaN rows, shard merging, CPU-resident stores streamed to the GPU
(tensors, pinned tensors, numpy memmaps) and a non-default stream."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from inputs import dyadic, randn
from issl_fast import _backend, _cuda_ops, ops, reference
from issl_fast._backend import _C
from tolerances import assert_topk_close

pytestmark = pytest.mark.cuda

DEV = torch.device("cuda")
ALGOS = {"auto": 0, "simt": 1, "tc": 2}
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _cuda_kernels() -> None:
    if not hasattr(_C, "score_topk_cuda"):
        msg = f"this build has no CUDA kernels (build_info: {_backend.build_info()})"
        if os.environ.get("ISSL_FAST_REQUIRE_CUDA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(params=list(ALGOS))
def algo(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(_cuda_ops, "_CUDA_ALGO", ALGOS[request.param])
    yield request.param


def _skip_unsupported(algo: str, dtype: str, k: int) -> None:
    if algo == "tc" and (dtype != "bfloat16" or k % 8 != 0):
        pytest.skip("the tensor-core scorer needs a bfloat16 store with k % 8 == 0 (forcing it "
                    "otherwise is a ValueError, tested in test_cuda_host.py)")


def assert_sorted_with_ties_by_lower_index(v: torch.Tensor, i: torch.Tensor) -> None:
    for row_v, row_i in zip(v.tolist(), i.tolist()):
        pairs = [(a, b) for a, b in zip(row_v, row_i) if b >= 0]
        assert pairs == sorted(pairs, key=lambda p: (-p[0], p[1])), row_i
        assert all(b < 0 for b in row_i[len(pairs):])


# (m, n, k, topk): one element; primes; n across many 128-row tiles and partitions; k not a
# multiple of 8 (SIMT only) and of 32 (zero-padded k chunks); m above 16 and 64 (query blocks);
# topk above the candidate buffers (32 / 128 entries) and above n; empty shapes.
CASES = [
    (1, 1, 8, 1),
    (5, 7, 5, 3),
    (17, 257, 64, 10),
    (5, 1031, 40, 1),
    (1, 5000, 64, 17),
    (17, 3000, 129, 50),
    (65, 2000, 96, 7),
    (3, 100, 4104, 5),
    (130, 1100, 16, 4),
    (4, 3000, 32, 300),
    (5, 7, 8, 20),
    (3, 0, 8, 4),
    (0, 7, 8, 3),
]


@functools.cache
def _case(m: int, n: int, k: int, topk: int):
    Q = randn((m, k), seed=m * 31 + k)
    G = dyadic((n, k), seed=n * 7 + k)
    return Q, G, reference.score_topk(Q, G, topk, accum=torch.float64)


@pytest.mark.parametrize("dtype", list(STORE_DTYPES))
@pytest.mark.parametrize("m,n,k,topk", CASES)
def test_matches_reference_and_cpu(algo: str, m: int, n: int, k: int, topk: int,
                                   dtype: str) -> None:
    _skip_unsupported(algo, dtype, k)
    Q, G, ref = _case(m, n, k, topk)
    Gs = G.to(STORE_DTYPES[dtype])
    v, i = ops.score_topk(Q.to(DEV), Gs.to(DEV), topk)
    assert v.device.type == "cuda" and i.device.type == "cuda"
    got = (v.cpu(), i.cpu())
    what = f"score_topk cuda/{algo} {dtype} m={m} n={n} k={k} topk={topk}"
    assert_topk_close(got, ref, Q, G, what=what)
    assert_sorted_with_ties_by_lower_index(*got)
    cpu = ops.score_topk(Q, Gs, topk)
    assert_topk_close(got, (cpu[0].double(), cpu[1]), Q, G, what=what + " vs cpu")


@pytest.mark.parametrize("n,topk", [(300_000, 20), (40_000, 5000)])
def test_merge_tree_levels_and_large_topk(algo: str, n: int, topk: int) -> None:
    # 300k rows: hundreds of partitions, so the 16-way shared-memory merge runs several levels
    # (and late partitions are filtered by the bars others published); topk = 5000 does not fit
    # the merge's shared memory and merges pairwise from global memory.
    _skip_unsupported(algo, "bfloat16", 32)
    m, k = 2, 32
    Q, G = randn((m, k), seed=n + 1), dyadic((n, k), seed=n + 2)
    v, i = ops.score_topk(Q.to(DEV), G.to(torch.bfloat16).to(DEV), topk)
    got = (v.cpu(), i.cpu())
    ref = reference.score_topk(Q, G, topk, accum=torch.float64)
    assert_topk_close(got, ref, Q, G, what=f"score_topk cuda/{algo} n={n} topk={topk}")
    assert_sorted_with_ties_by_lower_index(*got)


@pytest.mark.parametrize("m,n,k", [(1, 5000, 64), (5, 1031, 40), (17, 3000, 136), (70, 2000, 96)])
def test_bfloat16_queries_one_pass_equals_three(algo: str, m: int, n: int, k: int) -> None:
    # bf16 queries take the one-pass tensor-core kernels (16- and 64-query blocks); the two lower
    # terms of the three-pass split are zero for them, so both give the same bits.
    _skip_unsupported(algo, "bfloat16", k)
    Qb = randn((m, k), seed=m + k).to(torch.bfloat16).to(DEV)
    G = dyadic((n, k), seed=n + k).to(torch.bfloat16).to(DEV)
    got = ops.score_topk(Qb, G, 13)
    three = ops.score_topk(Qb.float(), G, 13)
    assert torch.equal(got[0], three[0]) and torch.equal(got[1], three[1])
    ref = reference.score_topk(Qb.float().cpu(), G.float().cpu(), 13, accum=torch.float64)
    assert_topk_close((got[0].cpu(), got[1].cpu()), ref, Qb.float().cpu(), G.float().cpu(),
                      what=f"bf16 queries cuda/{algo} m={m}")


@pytest.mark.parametrize("n", [40, 4100])
def test_exact_ties_broken_by_lower_index(algo: str, n: int) -> None:
    _skip_unsupported(algo, "bfloat16", 64)
    k, topk = 64, 17
    base = dyadic((3, k), seed=5)
    G = base.repeat((n + 2) // 3, 1)[:n].contiguous()
    Q = randn((6, k), seed=6)
    v, i = ops.score_topk(Q.to(DEV), G.to(torch.bfloat16).to(DEV), topk)
    got = (v.cpu(), i.cpu())
    assert_topk_close(got, reference.score_topk(Q, G, topk, accum=torch.float64), Q, G,
                      what="ties")
    order = (Q.double() @ base.double().T).argsort(1, descending=True)
    for q in range(Q.shape[0]):
        expected = [j for b in order[q].tolist() for j in range(b, n, 3)][:topk]
        assert got[1][q].tolist() == expected


@pytest.mark.parametrize("index_offset", [0, 2**40])
def test_exclude_index_offset_and_nan_rows(algo: str, index_offset: int) -> None:
    _skip_unsupported(algo, "bfloat16", 32)
    m, n, k, topk = 4, 900, 32, 6
    Q = randn((m, k), seed=1)
    G = dyadic((n, k), seed=2)
    G[5] = float("nan")  # NaN scores are never selected
    G[17, 3] = float("nan")
    ex = torch.tensor([[index_offset + 3, -1], [index_offset + 899, index_offset + 0],
                       [-1, -1], [index_offset + 17, index_offset + 40]])
    v, i = ops.score_topk(Q.to(DEV), G.to(torch.bfloat16).to(DEV), topk, exclude=ex.to(DEV),
                          index_offset=index_offset)
    got = (v.cpu(), i.cpu())
    ref = reference.score_topk(Q, G, topk, exclude=ex, index_offset=index_offset,
                               accum=torch.float64)
    assert_topk_close(got, ref, Q, G, index_offset=index_offset, what="exclude / nan")
    for q in range(m):
        banned = {x for x in ex[q].tolist() if x >= 0} | {index_offset + 5, index_offset + 17}
        assert not set(got[1][q].tolist()) & banned


def test_exclude_everything_leaves_empty_slots(algo: str) -> None:
    _skip_unsupported(algo, "bfloat16", 8)
    G = dyadic((3, 8), seed=1).to(torch.bfloat16).to(DEV)
    v, i = ops.score_topk(randn((2, 8), seed=2).to(DEV), G, 4,
                          exclude=torch.tensor([[0, 1, 2], [1, -1, -1]]))
    assert i.cpu()[0].tolist() == [-1, -1, -1, -1]
    assert torch.isinf(v.cpu()[0]).all() and (v.cpu()[0] < 0).all()
    assert sorted(i.cpu()[1].tolist()[:2]) == [0, 2] and i.cpu()[1].tolist()[2:] == [-1, -1]


@pytest.mark.parametrize("topk", [5, 40, 600])
def test_merging_shards_equals_scoring_the_concatenation(algo: str, topk: int) -> None:
    _skip_unsupported(algo, "bfloat16", 64)
    m, k = 7, 64
    Q = randn((m, k), seed=3).to(DEV)
    G = dyadic((2500, k), seed=4).to(torch.bfloat16)
    whole = ops.score_topk(Q, G.to(DEV), topk)
    for out_dev in (DEV, torch.device("cpu")):
        values = torch.full((m, topk), -math.inf, device=out_dev)
        indices = torch.full((m, topk), -1, dtype=torch.int64, device=out_dev)
        for j, r0 in enumerate(range(0, 2500, 700)):
            ops.score_topk(Q, G[r0:r0 + 700].to(DEV), topk, index_offset=r0,
                           out=(values, indices), accumulate=j > 0)
        assert values.device.type == out_dev.type  # torch.device('cuda') != 'cuda:0'
        assert torch.equal(values.cpu(), whole[0].cpu()) and torch.equal(indices.cpu(),
                                                                          whole[1].cpu())


def test_accumulate_sanitises_and_sorts_an_earlier_result() -> None:
    Q = randn((2, 16), seed=1).to(DEV)
    G = dyadic((50, 16), seed=2).to(DEV)
    v = torch.tensor([[1e9, float("nan"), -math.inf, 5.0], [2.0, 3.0, 1e9, -1.0]], device=DEV)
    i = torch.tensor([[1000, 1001, 1002, -1], [2000, 2001, 2002, 2003]], device=DEV)
    ops.score_topk(Q, G, 4, out=(v, i), accumulate=True)
    # Entry (1e9, id) always wins; NaN / -inf / index -1 entries are dropped.
    assert v[0, 0].item() == 1e9 and i[0, 0].item() == 1000
    assert v[1, 0].item() == 1e9 and i[1, 0].item() == 2002
    assert not set(i[0].tolist()) & {1001, 1002}
    ref = reference.score_topk(Q.cpu(), G.cpu(), 4, accum=torch.float64)
    assert i[0, 1:].tolist() == ref[1][0, :3].tolist()


@pytest.mark.parametrize("kind", ["tensor", "pinned", "numpy", "memmap"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cpu_store_streamed_equals_resident(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, dtype: str
) -> None:
    n, k, m, topk = 5000, 48, 9, 30
    G = dyadic((n, k), seed=11).to(STORE_DTYPES[dtype])
    Q = randn((m, k), seed=12).to(DEV)
    resident = ops.score_topk(Q, G.to(DEV), topk)
    if kind == "tensor":
        store = G
    elif kind == "pinned":
        store = G.pin_memory()
    elif kind == "numpy":
        store = G.numpy()
    else:
        path = tmp_path / "store.bin"
        mm = np.memmap(path, dtype=G.numpy().dtype, mode="w+", shape=(n, k))
        mm[:] = G.numpy()
        mm.flush()
        del mm
        store = np.memmap(path, dtype=G.numpy().dtype, mode="r", shape=(n, k))
    # Small steps: many double-buffered H2D copies, each merged like a shard.
    monkeypatch.setattr(_cuda_ops, "_CUDA_STREAM_CHUNK_BYTES", 333 * k * G.element_size())
    v, i = ops.score_topk(Q, store, topk)
    assert torch.equal(v, resident[0]) and torch.equal(i, resident[1]), kind
    # ... and in one step.
    monkeypatch.setattr(_cuda_ops, "_CUDA_STREAM_CHUNK_BYTES", 1 << 30)
    v1, i1 = ops.score_topk(Q, store, topk)
    assert torch.equal(v1, resident[0]) and torch.equal(i1, resident[1]), kind


def test_bfloat16_cpu_tensor_streamed() -> None:
    G = dyadic((1000, 64), seed=3).to(torch.bfloat16)
    Q = randn((3, 64), seed=4).to(DEV)
    got = ops.score_topk(Q, G, 12)
    ref = ops.score_topk(Q, G.to(DEV), 12)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_deterministic_and_stream_invariant(algo: str) -> None:
    _skip_unsupported(algo, "bfloat16", 256)
    Q = randn((40, 256), seed=1).to(DEV)
    G = randn((20000, 256), seed=2).to(torch.bfloat16).to(DEV)
    a = ops.score_topk(Q, G, 25)
    b = ops.score_topk(Q, G, 25)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        c = ops.score_topk(Q, G, 25)
    s.synchronize()
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


def test_score_of_a_pair_independent_of_query_batch(algo: str) -> None:
    # A query scored alone or inside a block of 64 (or 16) gets the same values.
    _skip_unsupported(algo, "bfloat16", 64)
    Q = randn((70, 64), seed=5).to(DEV)
    G = randn((3000, 64), seed=6).to(torch.bfloat16).to(DEV)
    full = ops.score_topk(Q, G, 9)
    # With the wgmma scorer on (the default on compute capability 9.0), blocks of 64 queries
    # (m > 16) and of 16 (m <= 16) run different instructions (wgmma m64n64 / m64n16): equal
    # within float rounding, and bit for bit within each block size, which a 20-query batch of
    # the same query checks.
    wgmma = ("score_wgmma" in _cuda_ops.enabled_variants()
             and torch.cuda.get_device_capability(0) == (9, 0) and bool(_C.CUDA_SM90A))
    for q in (0, 33, 69):
        one = ops.score_topk(Q[q:q + 1].contiguous(), G, 9)
        if wgmma:
            assert_topk_close((one[0].cpu(), one[1].cpu()),
                              (full[0][q:q + 1].cpu().double(), full[1][q:q + 1].cpu()),
                              Q[q:q + 1].cpu(), G.float().cpu(), what="16- vs 64-query blocks")
            rep = ops.score_topk(Q[q:q + 1].repeat(20, 1).contiguous(), G, 9)
            one = (rep[0][:1], rep[1][:1])
        assert torch.equal(one[1], full[1][q:q + 1])
        assert torch.equal(one[0], full[0][q:q + 1])
