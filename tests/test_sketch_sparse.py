"""ops.sketch_sparse (sparse JL / CountSketch) against the reference, plus its properties."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from inputs import DTYPE_NAMES, DTYPES, dyadic, randn
from issl_fast import ops, reference
from tolerances import RTOL, assert_close, sparse_magnitude

# (B, P, k, s, col_offset): CountSketch (s=1), s not dividing k, s = k, P over the 1024-column
# block of the kernel, empty shapes.
CASES = [
    (1, 1, 1, 1, 0),
    (3, 7, 5, 2, 11),
    (13, 257, 63, 4, 0),
    (67, 1031, 64, 8, 1000),
    (3, 1031, 65, 1, 0),
    (13, 7, 129, 3, 2**32 + 5),  # columns beyond 2^32 (small P)
    (1, 257, 1000, 4, 3),
    (5, 2100, 129, 5, 2**62),
    (4, 50, 5, 5, 0),  # s = k: every bucket of every coordinate is hit
    (3, 2500, 200, 200, 2**32 - 1300),  # large s: blocks shorter than 1024, across 2^32
    (2, 1100, 37, 37, 0),  # s = k over a partial block
    (0, 7, 5, 2, 0),
    (3, 0, 5, 2, 0),
]


@functools.cache
def _case(
    B: int, P: int, k: int, s: int, col_offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = dyadic((B, P), seed=B * 7919 + P + s)
    if B == 0:  # the reference cannot do B = 0 (see test_reference_empty_batch)
        empty = torch.zeros(0, k, dtype=torch.float64)
        return g, empty, empty
    ref = reference.sketch_sparse(g, k, s=s, seed=31, col_offset=col_offset, accum=torch.float64)
    return g, ref, sparse_magnitude(g, k, s=s, seed=31, col_offset=col_offset)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("B,P,k,s,col_offset", CASES)
def test_matches_reference(
    simd: str, B: int, P: int, k: int, s: int, col_offset: int, dtype: str
) -> None:
    g, ref, mag = _case(B, P, k, s, col_offset)
    y = ops.sketch_sparse(g.to(DTYPES[dtype]), k, s=s, seed=31, col_offset=col_offset)
    assert y.shape == (B, k) and y.dtype == torch.float32
    assert_close(y, ref, mag, f"sketch_sparse {dtype} B={B} P={P} k={k} s={s}")


def test_large_seed(simd: str) -> None:
    g = randn((3, 300), seed=1)
    seed = 2**64 - 1
    y = ops.sketch_sparse(g, 64, s=4, seed=seed, col_offset=2**40)
    ref = reference.sketch_sparse(g, 64, s=4, seed=seed, col_offset=2**40, accum=torch.float64)
    assert_close(y, ref, sparse_magnitude(g, 64, s=4, seed=seed, col_offset=2**40), "seed 2^64-1")


def test_accumulate_and_out_reuse(simd: str) -> None:
    g, ref, mag = _case(13, 257, 63, 4, 0)
    out0 = randn((13, 63), seed=2)
    out = out0.clone()
    y = ops.sketch_sparse(g.to(torch.bfloat16), 63, s=4, seed=31, out=out, accumulate=True)
    assert y is out
    assert_close(out, out0.double() + ref, mag + out0.double().abs(), "accumulate")
    fresh = ops.sketch_sparse(g, 63, s=4, seed=31)
    out = torch.full((13, 63), math.nan)
    for _ in range(2):
        assert ops.sketch_sparse(g, 63, s=4, seed=31, out=out) is out
        assert torch.equal(out, fresh)


def test_empty_shapes(simd: str) -> None:
    assert ops.sketch_sparse(torch.zeros(0, 7), 5, s=2).shape == (0, 5)
    out = torch.full((3, 5), math.nan)
    ops.sketch_sparse(torch.zeros(3, 0, dtype=torch.float16), 5, s=2, out=out)
    assert torch.equal(out, torch.zeros(3, 5))
    before = randn((3, 5), seed=3)
    out = before.clone()
    ops.sketch_sparse(torch.zeros(3, 0), 5, s=2, out=out, accumulate=True)
    assert torch.equal(out, before)


@pytest.mark.parametrize("s", [1, 4])
def test_column_chunks_with_offsets_sum_to_whole(simd: str, s: int) -> None:
    B, P, k, base = 6, 2500, 129, 2**32 - 700
    g = randn((B, P), seed=4)
    acc = torch.zeros(B, k)
    bounds = [0, 1, 700, 1024, 1025, 2049, P]
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        ops.sketch_sparse(g[:, c0:c1].contiguous(), k, s=s, seed=5, col_offset=base + c0,
                          out=acc, accumulate=True)
    ref = reference.sketch_sparse(g, k, s=s, seed=5, col_offset=base, accum=torch.float64)
    mag = sparse_magnitude(g, k, s=s, seed=5, col_offset=base)
    assert_close(acc, ref, mag, "sum of column chunks")


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_batch_split_is_bit_identical(simd: str, dtype: str) -> None:
    g = dyadic((67, 1500), seed=6, dtype=DTYPES[dtype])
    whole = ops.sketch_sparse(g, 129, s=4, seed=7, col_offset=3)
    for r0, r1 in [(0, 1), (1, 4), (4, 21), (21, 67)]:
        part = ops.sketch_sparse(g[r0:r1].contiguous(), 129, s=4, seed=7, col_offset=3)
        assert torch.equal(part, whole[r0:r1]), (r0, r1)


@pytest.mark.parametrize("s", [1, 3, 4])
def test_thread_count_invariance_and_determinism(simd: str, s: int) -> None:
    # No float atomics: the result does not depend on the thread count, run to run.
    # 40 rows: several 16-row lane groups, split differently among 1, 2 and 3 threads.
    g = randn((40, 3000), seed=8)
    runs = [ops.sketch_sparse(g, 64, s=s, seed=9, num_threads=t) for t in (1, 2, 3, 2)]
    for r in runs[1:]:
        assert torch.equal(runs[0], r)
    assert not torch.equal(runs[0], ops.sketch_sparse(g, 64, s=s, seed=10))


def test_linearity(simd: str) -> None:
    a = -1.5
    g1, g2 = randn((5, 1031), seed=11), randn((5, 1031), seed=12)
    h = a * g1 + g2
    lhs = ops.sketch_sparse(h, 65, s=4)
    rhs = a * ops.sketch_sparse(g1, 65, s=4).double() + ops.sketch_sparse(g2, 65, s=4)
    mag = (abs(a) * sparse_magnitude(g1, 65, s=4, seed=0) + sparse_magnitude(g2, 65, s=4, seed=0)
           + sparse_magnitude(h, 65, s=4, seed=0))
    assert_close(lhs, rhs, 2 * mag, "linearity")
    assert lhs.abs().max() > 100 * RTOL * mag.max()


def test_s_equals_one_is_countsketch(simd: str) -> None:
    # CountSketch: each coordinate lands in exactly one bucket with weight +-1 (no 1/sqrt(s)).
    g = randn((2, 500), seed=13)
    y = ops.sketch_sparse(g, 17, s=1, seed=14)
    buckets, signs = reference.sparse_buckets(14, 1, 17, 0, 500)
    expected = torch.zeros(2, 17, dtype=torch.float64)
    expected.index_add_(1, torch.from_numpy(buckets[:, 0]),
                        g.double() * torch.from_numpy(signs[:, 0])[None])
    assert_close(y, expected, sparse_magnitude(g, 17, s=1, seed=14), "countsketch")


def test_reference_backend_through_ops() -> None:
    g = randn((2, 9), seed=15).to(torch.bfloat16)
    y = ops.sketch_sparse(g, 7, s=3, seed=4, col_offset=3, backend="reference")
    assert torch.equal(y, reference.sketch_sparse(g, 7, s=3, seed=4, col_offset=3))


def test_reference_empty_batch() -> None:
    g = torch.zeros(0, 9)
    assert reference.sketch_sparse(g, 7, s=3).shape == (0, 7)
    assert ops.sketch_sparse(g, 7, s=3, backend="reference").shape == (0, 7)


def test_same_bits_at_every_simd_level() -> None:
    # Every ISA builds the same bucket table (integer hashing) and adds in the same order.
    from conftest import SIMD_LEVELS
    from issl_fast import _backend

    g = randn((21, 3100), seed=17)
    start = _backend.simd_level()
    try:
        runs = {}
        for level in SIMD_LEVELS:
            _backend.set_simd_level(level)
            runs[level] = ops.sketch_sparse(g, 97, s=3, seed=4, col_offset=2**32 - 2000)
    finally:
        _backend.set_simd_level(start)
    first = next(iter(runs.values()))
    for level, y in runs.items():
        assert torch.equal(y, first), level
