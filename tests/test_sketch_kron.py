"""ops.sketch_kron (factored LoGra-style sketch) against the reference and against the dense
sketch with matrix kron(P_out, P_in) applied to vec(G), plus its properties."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from inputs import DISTS, DTYPE_NAMES, DTYPES, dyadic, randn
from issl_fast import ops, reference
from tolerances import RTOL, assert_close, kron_magnitude

# (B, T, d_in, d_out, k_in, k_out)
CASES = [
    (1, 1, 1, 1, 1, 1),
    (3, 3, 7, 5, 5, 63),
    (13, 17, 257, 7, 65, 5),
    (3, 1, 1031, 1, 64, 1),
    (3, 3, 7, 257, 1, 129),
    (67, 3, 31, 17, 63, 64),
    (1, 17, 300, 260, 65, 65),  # d_in, d_out over KC = 256
    (2, 3, 7, 5, 1000, 3),  # k_in over the random panel width NC = 512
    (0, 3, 7, 5, 5, 5),
    (3, 0, 7, 5, 5, 5),  # T = 0: exactly zero
    (150, 1, 33, 21, 19, 5),  # T = 1: many examples per projection GEMM, chunks over MR tiles
    (41, 2, 9, 10, 7, 3),  # odd T: examples straddle micro-tile rows
    (40, 1, 50, 20, 16, 8),  # k at the narrow tile's width (16 on AVX-512, 8 on AVX2)
    (30, 2, 70, 300, 17, 16),  # one side narrow, the other not; d_out > d_in
]


@functools.cache
def _case(
    B: int, T: int, d_in: int, d_out: int, k_in: int, k_out: int, dist: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    A = dyadic((B, T, d_in), seed=B * 1000 + T * 10 + d_in)
    D = dyadic((B, T, d_out), seed=B * 1000 + T * 10 + d_out + 1)
    if B == 0:  # the reference cannot do B = 0 (see test_reference_empty_batch)
        empty = torch.zeros(0, k_in * k_out, dtype=torch.float64)
        return A, D, empty, empty
    ref = reference.sketch_kron(A, D, k_in, k_out, seed=55, dist=dist, accum=torch.float64)
    return A, D, ref, kron_magnitude(A, D, k_in, k_out, seed=55, dist=dist)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("B,T,d_in,d_out,k_in,k_out", CASES)
def test_matches_reference(
    simd: str, B: int, T: int, d_in: int, d_out: int, k_in: int, k_out: int, dtype: str,
    dist: str,
) -> None:
    A, D, ref, mag = _case(B, T, d_in, d_out, k_in, k_out, dist)
    dt = DTYPES[dtype]
    y = ops.sketch_kron(A.to(dt), D.to(dt), k_in, k_out, seed=55, dist=dist)
    assert y.shape == (B, k_out * k_in) and y.dtype == torch.float32
    assert_close(y, ref, mag, f"sketch_kron {dtype} {dist} B={B} T={T} {d_in}x{d_out} "
                              f"k_in={k_in} k_out={k_out}")


@pytest.mark.parametrize("dist", DISTS)
def test_equals_dense_sketch_with_kronecker_matrix(simd: str, dist: str) -> None:
    B, T, d_in, d_out, k_in, k_out = 4, 5, 13, 11, 6, 7
    seed = 2**64 - 5
    A, D = randn((B, T, d_in), seed=1), randn((B, T, d_out), seed=2)
    p_in, p_out = reference.kron_matrices(seed, d_in, d_out, k_in, k_out, dist)
    # kron(P_out, P_in)[a * k_in + c, o * d_in + i] = P_out[a, o] P_in[c, i]: the same row-major
    # flattening as vec(G) (o * d_in + i) and as the output (a * k_in + c).
    S = torch.from_numpy(np.kron(p_out, p_in)) / math.sqrt(k_in * k_out)
    G = reference.per_example_linear_grad(A, D, accum=torch.float64)
    expected = G @ S.T
    y = ops.sketch_kron(A, D, k_in, k_out, seed=seed, dist=dist)
    mag = kron_magnitude(A, D, k_in, k_out, seed=seed, dist=dist)
    assert_close(y, expected, mag, "kron vs dense kron(P_out, P_in) vec(G)")
    assert y.abs().max() > 100 * RTOL * mag.max()


@pytest.mark.parametrize("dist", DISTS)
def test_accumulate_and_out_reuse(simd: str, dist: str) -> None:
    A, D, ref, mag = _case(3, 3, 7, 5, 5, 63, dist)
    out0 = randn((3, 5 * 63), seed=3)
    out = out0.clone()
    y = ops.sketch_kron(A.to(torch.bfloat16), D.to(torch.bfloat16), 5, 63, seed=55, dist=dist,
                        out=out, accumulate=True)
    assert y is out
    assert_close(out, out0.double() + ref, mag + out0.double().abs(), "accumulate")
    fresh = ops.sketch_kron(A, D, 5, 63, seed=55, dist=dist)
    out = torch.full((3, 5 * 63), math.nan)
    for _ in range(2):
        assert ops.sketch_kron(A, D, 5, 63, seed=55, dist=dist, out=out) is out
        assert torch.equal(out, fresh)


@pytest.mark.parametrize("dist", DISTS)
def test_empty_shapes(simd: str, dist: str) -> None:
    y = ops.sketch_kron(torch.zeros(0, 3, 7), torch.zeros(0, 3, 5), 4, 3, dist=dist)
    assert y.shape == (0, 12)
    out = torch.full((2, 12), math.nan)
    ops.sketch_kron(torch.zeros(2, 0, 7), torch.zeros(2, 0, 5), 4, 3, dist=dist, out=out)
    assert torch.equal(out, torch.zeros(2, 12))
    before = randn((2, 12), seed=4)
    out = before.clone()
    ops.sketch_kron(torch.zeros(2, 0, 7), torch.zeros(2, 0, 5), 4, 3, dist=dist, out=out,
                    accumulate=True)
    assert torch.equal(out, before)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("dist", DISTS)
def test_batch_split_is_bit_identical(simd: str, dist: str, dtype: str) -> None:
    dt = DTYPES[dtype]
    A, D = dyadic((13, 17, 40), seed=5, dtype=dt), dyadic((13, 17, 30), seed=6, dtype=dt)
    whole = ops.sketch_kron(A, D, 9, 17, seed=7, dist=dist)
    for r0, r1 in [(0, 1), (1, 8), (8, 13)]:
        part = ops.sketch_kron(A[r0:r1].contiguous(), D[r0:r1].contiguous(), 9, 17, seed=7,
                               dist=dist)
        assert torch.equal(part, whole[r0:r1]), (r0, r1)


@pytest.mark.parametrize("T", [1, 3])
def test_small_t_chunking_is_bit_identical(simd: str, T: int) -> None:
    # Small T packs several examples into one projection GEMM; an example's result must not
    # depend on which examples share its chunk, nor on the thread count.
    A, D = randn((131, T, 37), seed=15), randn((131, T, 23), seed=16)
    whole = ops.sketch_kron(A, D, 11, 6, seed=9, num_threads=1)
    for t in (2, 3):
        assert torch.equal(ops.sketch_kron(A, D, 11, 6, seed=9, num_threads=t), whole), t
    for r0, r1 in [(0, 1), (1, 64), (64, 131), (5, 6)]:
        part = ops.sketch_kron(A[r0:r1].contiguous(), D[r0:r1].contiguous(), 11, 6, seed=9)
        assert torch.equal(part, whole[r0:r1]), (r0, r1)


@pytest.mark.parametrize("k_in,k_out", [(8, 9), (16, 17), (9, 16), (17, 8)])
def test_narrow_and_wide_tiles_agree_bit_for_bit(k_in: int, k_out: int) -> None:
    # AVX-512 projects k <= 16 with its narrow tile, AVX2 k <= 8 with its own: same KC, so the
    # same FMA sequence per element as the wide tiles (generic rounds differently by design).
    from conftest import SIMD_LEVELS
    from issl_fast import _backend

    levels = [lv for lv in ("avx2", "avx512") if lv in SIMD_LEVELS]
    if len(levels) < 2:
        pytest.skip(f"needs AVX2 and AVX-512, this CPU has {SIMD_LEVELS}")
    A, D = randn((23, 5, 300), seed=21), randn((23, 5, 70), seed=22)
    start = _backend.simd_level()
    try:
        runs = []
        for level in levels:
            _backend.set_simd_level(level)
            runs.append(ops.sketch_kron(A, D, k_in, k_out, seed=3))
    finally:
        _backend.set_simd_level(start)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("dist", DISTS)
def test_thread_count_invariance_and_determinism(simd: str, dist: str) -> None:
    A, D = randn((7, 17, 40), seed=8), randn((7, 17, 30), seed=9)
    runs = [ops.sketch_kron(A, D, 16, 33, seed=2, dist=dist, num_threads=t) for t in (1, 2, 3, 2)]
    for r in runs[1:]:
        assert torch.equal(runs[0], r)
    assert not torch.equal(runs[0], ops.sketch_kron(A, D, 16, 33, seed=3, dist=dist))


@pytest.mark.parametrize("dist", DISTS)
def test_linearity_in_inputs(simd: str, dist: str) -> None:
    a = 0.75
    A1, A2, D = randn((4, 5, 20), seed=10), randn((4, 5, 20), seed=11), randn((4, 5, 9), seed=12)
    A = a * A1 + A2
    lhs = ops.sketch_kron(A, D, 8, 8, dist=dist)
    rhs = a * ops.sketch_kron(A1, D, 8, 8, dist=dist).double() + ops.sketch_kron(A2, D, 8, 8,
                                                                                 dist=dist)
    mag = (a * kron_magnitude(A1, D, 8, 8, seed=0, dist=dist)
           + kron_magnitude(A2, D, 8, 8, seed=0, dist=dist)
           + kron_magnitude(A, D, 8, 8, seed=0, dist=dist))
    assert_close(lhs, rhs, 2 * mag, "linearity in A")


def test_reference_backend_through_ops() -> None:
    A, D = randn((2, 3, 4), seed=13), randn((2, 3, 5), seed=14)
    y = ops.sketch_kron(A, D, 3, 2, seed=4, dist="gaussian", backend="reference")
    assert torch.equal(y, reference.sketch_kron(A, D, 3, 2, seed=4, dist="gaussian"))


def test_reference_empty_batch() -> None:
    A, D = torch.zeros(0, 3, 7), torch.zeros(0, 3, 5)
    assert reference.sketch_kron(A, D, 4, 3).shape == (0, 12)
    assert ops.sketch_kron(A, D, 4, 3, backend="reference").shape == (0, 12)
