"""ops.sketch_dense against reference.sketch_dense (float64), plus its properties: chunking and
batch-split invariance, thread-count invariance, determinism, linearity, out=/accumulate."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from inputs import DISTS, DTYPE_NAMES, DTYPES, dyadic, generator, randn
from issl_fast import _backend, ops, reference
from tolerances import RTOL, assert_close, dense_magnitude

# (B, P, k, col_offset): 1, primes, around tile sizes (MR in {4, 6, 8}, NR in {8, 16, 32},
# KC = 256), empty.
CASES = [
    (1, 1, 1, 0),
    (3, 7, 5, 11),
    (13, 257, 63, 0),
    (67, 1031, 64, 1000),
    (3, 1031, 65, 0),
    (13, 7, 129, 2**32 + 5),  # columns beyond 2^32 (small P)
    (1, 257, 1000, 3),
    (67, 257, 129, 2**62),
    (0, 7, 5, 0),  # empty batch
    (3, 0, 5, 0),  # no columns: the sketch is exactly zero
]


@functools.cache
def _case(
    B: int, P: int, k: int, col_offset: int, dist: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g float32 dyadic, float64 reference, magnitude); g is exact in every input dtype."""
    g = dyadic((B, P), seed=B * 7919 + P)
    ref = reference.sketch_dense(g, k, seed=seed, dist=dist, col_offset=col_offset,
                                 accum=torch.float64)
    return g, ref, dense_magnitude(g, k, seed=seed, dist=dist, col_offset=col_offset)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("B,P,k,col_offset", CASES)
def test_matches_reference(
    simd: str, B: int, P: int, k: int, col_offset: int, dtype: str, dist: str
) -> None:
    seed = 2**64 - 1 if k == 5 else 1234
    g, ref, mag = _case(B, P, k, col_offset, dist, seed)
    g_in = g.to(DTYPES[dtype])
    # The reference fed the half-precision tensor itself agrees exactly with the cached one.
    if B * P and P <= 7:
        assert torch.equal(reference.sketch_dense(g_in, k, seed=seed, dist=dist,
                                                  col_offset=col_offset, accum=torch.float64), ref)
    y = ops.sketch_dense(g_in, k, seed=seed, dist=dist, col_offset=col_offset)
    assert y.shape == (B, k) and y.dtype == torch.float32
    assert_close(y, ref, mag, f"sketch_dense {dtype} {dist} B={B} P={P} k={k}")


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_half_precision_inputs_convert_exactly(simd: str, dtype: str) -> None:
    # Every 16-bit pattern (float16 / bfloat16: subnormals, extremes, +-0, +-inf; NaN excluded)
    # or 65536 random float32 bit patterns. With k = 1 (scale 1) and a single nonzero per row,
    # y[b] = R(0, p_b) * float32(g[b, p_b]) exactly. Rows of 37 columns put the nonzero in every
    # lane position of the vectorised conversion and its tail.
    if dtype == "float32":
        bits = torch.randint(-(2**31), 2**31, (65536,), dtype=torch.int64, generator=generator(0))
        vals = bits.to(torch.int32).view(torch.float32)
    else:
        bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
        vals = bits.view(DTYPES[dtype])
    vals = vals[~torch.isnan(vals)]
    n, P = vals.numel(), 37
    g = torch.zeros(n, P, dtype=vals.dtype)
    cols = torch.arange(n) % P
    g[torch.arange(n), cols] = vals
    y = ops.sketch_dense(g, 1, seed=9)
    r = torch.from_numpy(reference.random_matrix(9, 1, 0, P)[0]).to(torch.float32)
    assert torch.equal(y[:, 0], r[cols] * vals.to(torch.float32))


@pytest.mark.parametrize("dist", DISTS)
def test_empty_shapes(simd: str, dist: str) -> None:
    y = ops.sketch_dense(torch.zeros(0, 7), 5, dist=dist)
    assert y.shape == (0, 5) and y.dtype == torch.float32
    # P = 0: the sketch of an empty gradient is exactly zero, overwriting garbage in out ...
    out = torch.full((3, 5), math.nan)
    y = ops.sketch_dense(torch.zeros(3, 0, dtype=torch.bfloat16), 5, dist=dist, out=out)
    assert y is out and torch.equal(out, torch.zeros(3, 5))
    # ... and adding nothing when accumulating.
    out = randn((3, 5), seed=1)
    before = out.clone()
    ops.sketch_dense(torch.zeros(3, 0), 5, dist=dist, out=out, accumulate=True)
    assert torch.equal(out, before)


@pytest.mark.parametrize("dist", DISTS)
def test_accumulate_adds_into_out(simd: str, dist: str) -> None:
    g, ref, mag = _case(13, 257, 63, 0, dist)
    out0 = randn((13, 63), seed=2) * 10
    out = out0.clone()
    y = ops.sketch_dense(g.to(torch.float16), 63, dist=dist, out=out, accumulate=True)
    assert y is out
    assert_close(out, out0.double() + ref, mag + out0.double().abs(), "accumulate")


@pytest.mark.parametrize("dist", DISTS)
def test_out_reuse_overwrites(simd: str, dist: str) -> None:
    g, _, _ = _case(67, 257, 129, 2**62, dist)
    fresh = ops.sketch_dense(g, 129, dist=dist, col_offset=2**62)
    out = torch.full((67, 129), math.nan)
    for _ in range(2):  # reused twice: never adds to the previous content
        y = ops.sketch_dense(g, 129, dist=dist, col_offset=2**62, out=out)
        assert y is out and torch.equal(out, fresh)


@pytest.mark.parametrize("dist", DISTS)
def test_column_chunks_with_offsets_sum_to_whole(simd: str, dist: str) -> None:
    B, P, k, base = 5, 1031, 65, 2**32 - 300
    g = randn((B, P), seed=3)
    whole = ops.sketch_dense(g, k, dist=dist, col_offset=base)
    acc = torch.zeros(B, k)
    bounds = [0, 1, 100, 356, 357, 900, P]  # blocks not aligned to KC = 256, one of width 1
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        ops.sketch_dense(g[:, c0:c1].contiguous(), k, dist=dist, col_offset=base + c0, out=acc,
                         accumulate=True)
    ref = reference.sketch_dense(g, k, dist=dist, col_offset=base, accum=torch.float64)
    mag = dense_magnitude(g, k, seed=0, dist=dist, col_offset=base)
    assert_close(acc, ref, mag, "sum of column chunks")
    assert_close(whole, ref, mag, "whole")


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("dist", DISTS)
def test_batch_split_is_bit_identical(simd: str, dist: str, dtype: str) -> None:
    g = dyadic((67, 300), seed=4, dtype=DTYPES[dtype])
    whole = ops.sketch_dense(g, 129, seed=5, dist=dist, col_offset=77)
    for r0, r1 in [(0, 1), (1, 4), (4, 21), (21, 67)]:
        part = ops.sketch_dense(g[r0:r1].contiguous(), 129, seed=5, dist=dist, col_offset=77)
        assert torch.equal(part, whole[r0:r1]), (r0, r1)


@pytest.mark.parametrize("k", [129, 1000])
@pytest.mark.parametrize("dist", DISTS)
def test_thread_count_invariance(simd: str, dist: str, k: int) -> None:
    g = randn((13, 1031), seed=6).to(torch.bfloat16)
    runs = [ops.sketch_dense(g, k, seed=7, dist=dist, num_threads=t) for t in (1, 2, 3)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("dist", DISTS)
def test_deterministic_run_to_run(dist: str) -> None:
    g = randn((13, 1031), seed=8)
    a = ops.sketch_dense(g, 1000, seed=9, dist=dist)
    b = ops.sketch_dense(g, 1000, seed=9, dist=dist)
    assert torch.equal(a, b)
    # ... and the seed matters.
    assert not torch.equal(a, ops.sketch_dense(g, 1000, seed=10, dist=dist))


@pytest.mark.parametrize("dist", DISTS)
def test_linearity(simd: str, dist: str) -> None:
    B, P, k, a = 7, 1031, 64, -2.5
    g1, g2 = randn((B, P), seed=10), randn((B, P), seed=11)
    h = a * g1 + g2  # formed in float32: its rounding (<= u |h|) is inside RTOL * M(h)
    lhs = ops.sketch_dense(h, k, dist=dist)
    rhs = a * ops.sketch_dense(g1, k, dist=dist).double() + ops.sketch_dense(g2, k, dist=dist)
    mag = (abs(a) * dense_magnitude(g1, k, seed=0, dist=dist)
           + dense_magnitude(g2, k, seed=0, dist=dist) + dense_magnitude(h, k, seed=0, dist=dist))
    assert_close(lhs, rhs, 2 * mag, "linearity")  # both sides carry a kernel error
    # Not vacuous: the sketch is not identically zero.
    assert lhs.abs().max() > 100 * RTOL * mag.max()


def test_rademacher_matches_closed_form_magnitude() -> None:
    # For Rademacher, M[b, j] = sum_p |g[b, p]| / sqrt(k) for every j (the policy's formula).
    g = randn((3, 50), seed=12)
    mag = dense_magnitude(g, 9, seed=1, dist="rademacher")
    expected = g.double().abs().sum(1, keepdim=True).expand(3, 9) / 3.0
    assert torch.allclose(mag, expected, rtol=1e-14, atol=0)


def test_reference_backend_through_ops() -> None:
    g = randn((3, 7), seed=13).to(torch.float16)
    ref32 = reference.sketch_dense(g, 5, seed=2, dist="gaussian", col_offset=9)
    y = ops.sketch_dense(g, 5, seed=2, dist="gaussian", col_offset=9, backend="reference")
    assert y.dtype == torch.float32 and torch.equal(y, ref32)
    out = torch.ones(3, 5)
    ops.sketch_dense(g, 5, seed=2, dist="gaussian", col_offset=9, backend="reference", out=out,
                     accumulate=True)
    assert torch.equal(out, 1 + ref32)


def test_requires_grad_input_is_accepted() -> None:
    g = randn((3, 7), seed=14).requires_grad_()
    y = ops.sketch_dense(g, 5)
    assert not y.requires_grad
    assert torch.equal(y, ops.sketch_dense(g.detach(), 5))


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(0, 20),
    P=st.integers(0, 600),
    k=st.integers(1, 140),
    dtype=st.sampled_from(DTYPE_NAMES),
    dist=st.sampled_from(DISTS),
    col_offset=st.sampled_from([0, 1, 255, 2**31 - 3, 2**32 + 1, 2**50]),
    seed=st.integers(0, 2**64 - 1),
    level=st.sampled_from(_backend.supported_simd_levels()),
)
def test_hypothesis_matches_reference(
    B: int, P: int, k: int, dtype: str, dist: str, col_offset: int, seed: int, level: str
) -> None:
    g = dyadic((B, P), seed=seed & 0xFFFFFFFF, dtype=DTYPES[dtype])
    _backend.set_simd_level(level)  # restored by the autouse fixture
    y = ops.sketch_dense(g, k, seed=seed, dist=dist, col_offset=col_offset)
    ref = reference.sketch_dense(g, k, seed=seed, dist=dist, col_offset=col_offset,
                                 accum=torch.float64)
    mag = dense_magnitude(g, k, seed=seed, dist=dist, col_offset=col_offset)
    assert_close(y, ref, mag, f"hypothesis B={B} P={P} k={k} {dtype} {dist} level={level}")
