"""ops.sketch_linear (fused per-example linear-layer gradient sketch) against the reference, and
against sketch_dense of the materialised gradient (same random matrix), plus its properties."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from inputs import DISTS, DTYPE_NAMES, DTYPES, dyadic, randn
from issl_fast import ops, reference
from tolerances import RTOL, assert_close, dense_magnitude, linear_magnitude

# (B, T, d_in, d_out, k, col_offset); P = d_in * d_out.
CASES = [
    (1, 1, 1, 1, 1, 0),
    (3, 3, 7, 5, 5, 11),
    (3, 17, 257, 7, 65, 0),  # P = 1799: several KC blocks, each spanning partial rows of G
    (13, 3, 7, 257, 64, 0),  # d_in < KC: blocks cover whole rows of G
    (2, 3, 600, 3, 65, 0),  # d_in > 2 KC: blocks convert row segments of A
    (13, 3, 7, 1, 129, 2**32 + 5),  # columns beyond 2^32 (small P)
    (67, 1, 1031, 1, 1000, 0),
    (1, 17, 1, 257, 1000, 3),
    (67, 3, 7, 7, 63, 2**62),
    (0, 3, 7, 5, 5, 0),  # empty batch
    (3, 0, 7, 5, 5, 0),  # T = 0: G = 0, the sketch is exactly zero
    # T >= 4: G formed in slabs of rows by GEMM over t (sketch_linear.cpp, LinearGradSlabs)
    (2, 4, 9, 5, 33, 0),  # the smallest T of the route; one slab
    (3, 300, 1031, 70, 65, 7),  # T > KC: several GEMM steps; one slab (1 MiB from T = KC on)
    (2, 300, 4099, 70, 17, 0),  # and slabs of 56-60 rows, then the rest; column blocks of 4096, 3
    (5, 19, 70000, 2, 17, 0),  # d_in above a slab: one row of G per slab, column blocks
    (3, 9, 3, 600, 40, 0),  # a slab taller than a row block (256)
    (300, 4, 600, 200, 17, 0),  # B > 256: slabs thinned to the batch's budget
]


def _inputs(B: int, T: int, d_in: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return dyadic((B, T, d_in), seed=seed), dyadic((B, T, d_out), seed=seed + 1)


@functools.cache
def _case(
    B: int, T: int, d_in: int, d_out: int, k: int, col_offset: int, dist: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    A, D = _inputs(B, T, d_in, d_out, seed=B * 1000 + T * 100 + d_in)
    if B == 0:  # the reference cannot do B = 0 (see test_reference_empty_batch)
        empty = torch.zeros(0, k, dtype=torch.float64)
        return A, D, empty, empty
    ref = reference.sketch_linear(A, D, k, seed=77, dist=dist, col_offset=col_offset,
                                  accum=torch.float64)
    mag = linear_magnitude(A, D, k, seed=77, dist=dist, col_offset=col_offset)
    return A, D, ref, mag


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("B,T,d_in,d_out,k,col_offset", CASES)
def test_matches_reference(
    simd: str, B: int, T: int, d_in: int, d_out: int, k: int, col_offset: int, dtype: str,
    dist: str,
) -> None:
    A, D, ref, mag = _case(B, T, d_in, d_out, k, col_offset, dist)
    dt = DTYPES[dtype]
    y = ops.sketch_linear(A.to(dt), D.to(dt), k, seed=77, dist=dist, col_offset=col_offset)
    assert y.shape == (B, k) and y.dtype == torch.float32
    assert_close(y, ref, mag, f"sketch_linear {dtype} {dist} B={B} T={T} {d_in}x{d_out} k={k}")


@pytest.mark.parametrize("dist", DISTS)
def test_equals_sketch_dense_of_materialised_gradient(simd: str, dist: str) -> None:
    B, T, d_in, d_out, k = 5, 17, 31, 37, 129
    A, D = randn((B, T, d_in), seed=1), randn((B, T, d_out), seed=2)
    G = reference.per_example_linear_grad(A, D)  # [B, d_out * d_in] float32, index o*d_in + i
    assert G.shape == (B, d_out * d_in)
    fused = ops.sketch_linear(A, D, k, seed=3, dist=dist, col_offset=2**33)
    dense = ops.sketch_dense(G, k, seed=3, dist=dist, col_offset=2**33)
    # Both are within RTOL * M of the exact value (M bounds the float32 G too).
    mag = linear_magnitude(A, D, k, seed=3, dist=dist, col_offset=2**33)
    assert_close(fused, dense.double(), 2 * mag, "fused vs dense of materialised G")
    assert fused.abs().max() > 100 * RTOL * mag.max()


def test_layers_at_column_offsets_sum_to_dense_sketch_of_concatenated_gradient(simd: str) -> None:
    # Two linear layers and one "fallback" layer fed to sketch_dense, each at its column offset:
    # the sum is the dense sketch of the concatenated per-example gradient.
    B, k = 4, 65
    A1, D1 = randn((B, 3, 11), seed=3), randn((B, 3, 13), seed=4)
    A2 = randn((B, 5, 300), seed=5).to(torch.bfloat16)
    D2 = randn((B, 5, 2), seed=6).to(torch.bfloat16)
    g3 = randn((B, 17), seed=7)
    G1, G2 = reference.per_example_linear_grad(A1, D1), reference.per_example_linear_grad(A2, D2)
    full = torch.cat([G1, G2, g3], 1)
    out = torch.zeros(B, k)
    ops.sketch_linear(A1, D1, k, seed=8, col_offset=0, out=out, accumulate=True)
    ops.sketch_linear(A2, D2, k, seed=8, col_offset=G1.shape[1], out=out, accumulate=True)
    ops.sketch_dense(g3, k, seed=8, col_offset=G1.shape[1] + G2.shape[1], out=out, accumulate=True)
    ref = reference.sketch_dense(full.double(), k, seed=8, accum=torch.float64)
    mag = dense_magnitude(torch.cat([reference.per_example_linear_grad(A1.abs(), D1.abs()),
                                     reference.per_example_linear_grad(A2.abs(), D2.abs()),
                                     g3], 1), k, seed=8, dist="rademacher")
    assert_close(out, ref, mag, "layers summed at offsets")


@pytest.mark.parametrize("dist", DISTS)
def test_accumulate_and_out_reuse(simd: str, dist: str) -> None:
    A, D, ref, mag = _case(3, 17, 257, 7, 65, 0, dist)
    out0 = randn((3, 65), seed=9)
    out = out0.clone()
    y = ops.sketch_linear(A.to(torch.float16), D.to(torch.float16), 65, seed=77, dist=dist,
                          out=out, accumulate=True)
    assert y is out
    assert_close(out, out0.double() + ref, mag + out0.double().abs(), "accumulate")
    fresh = ops.sketch_linear(A, D, 65, seed=77, dist=dist)
    out = torch.full((3, 65), math.nan)
    for _ in range(2):
        assert ops.sketch_linear(A, D, 65, seed=77, dist=dist, out=out) is out
        assert torch.equal(out, fresh)


@pytest.mark.parametrize("dist", DISTS)
def test_empty_shapes(simd: str, dist: str) -> None:
    y = ops.sketch_linear(torch.zeros(0, 3, 7), torch.zeros(0, 3, 5), 5, dist=dist)
    assert y.shape == (0, 5)
    out = torch.full((3, 5), math.nan)
    ops.sketch_linear(torch.zeros(3, 0, 7), torch.zeros(3, 0, 5), 5, dist=dist, out=out)
    assert torch.equal(out, torch.zeros(3, 5))
    before = randn((3, 5), seed=10)
    out = before.clone()
    ops.sketch_linear(torch.zeros(3, 0, 7), torch.zeros(3, 0, 5), 5, dist=dist, out=out,
                      accumulate=True)
    assert torch.equal(out, before)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("dist", DISTS)
def test_batch_split_is_bit_identical(simd: str, dist: str, dtype: str) -> None:
    dt = DTYPES[dtype]
    for T in (3, 20):  # per-row and slab routes of the CPU kernel
        A, D = dyadic((13, T, 30), seed=11, dtype=dt), dyadic((13, T, 9), seed=12, dtype=dt)
        whole = ops.sketch_linear(A, D, 65, seed=1, dist=dist)
        for r0, r1 in [(0, 1), (1, 8), (8, 13)]:
            part = ops.sketch_linear(A[r0:r1].contiguous(), D[r0:r1].contiguous(), 65, seed=1,
                                     dist=dist)
            assert torch.equal(part, whole[r0:r1]), (T, r0, r1)


@pytest.mark.parametrize("dist", DISTS)
def test_thread_count_invariance_and_determinism(simd: str, dist: str) -> None:
    A, D = randn((7, 17, 40), seed=13), randn((7, 17, 30), seed=14)
    runs = [ops.sketch_linear(A, D, 129, seed=2, dist=dist, num_threads=t) for t in (1, 2, 3, 2)]
    for r in runs[1:]:
        assert torch.equal(runs[0], r)


@pytest.mark.parametrize("dist", DISTS)
def test_linearity_in_output_gradients(simd: str, dist: str) -> None:
    a = 3.0
    A, D1, D2 = randn((4, 5, 20), seed=15), randn((4, 5, 9), seed=16), randn((4, 5, 9), seed=17)
    D = a * D1 + D2
    lhs = ops.sketch_linear(A, D, 64, dist=dist)
    rhs = a * ops.sketch_linear(A, D1, 64, dist=dist).double() + ops.sketch_linear(A, D2, 64,
                                                                                   dist=dist)
    mag = (a * linear_magnitude(A, D1, 64, seed=0, dist=dist)
           + linear_magnitude(A, D2, 64, seed=0, dist=dist)
           + linear_magnitude(A, D, 64, seed=0, dist=dist))
    assert_close(lhs, rhs, 2 * mag, "linearity in D")


def test_reference_empty_batch() -> None:
    A, D = torch.zeros(0, 3, 7), torch.zeros(0, 3, 5)
    y = reference.sketch_linear(A, D, 4)
    assert y.shape == (0, 4)
    assert ops.sketch_linear(A, D, 4, backend="reference").shape == (0, 4)


def test_reference_backend_through_ops() -> None:
    A, D = randn((2, 3, 4), seed=18), randn((2, 3, 5), seed=19)
    y = ops.sketch_linear(A, D, 7, seed=4, col_offset=3, backend="reference")
    assert torch.equal(y, reference.sketch_linear(A, D, 7, seed=4, col_offset=3))
