"""Golden values pinning hash version 1 (csrc/include/issl_fast/hash.h), in the reference and in
the kernels.

The literals below were computed once with ``issl_fast.reference`` (hash version 1) and are
hard-coded on purpose: any change of the hash, of the Rademacher bit layout, of Box-Muller or of
the sparse bucket rule makes these tests fail, because it silently invalidates every stored
sketch. Changing the hash is a format break: bump ``HASH_VERSION`` and regenerate deliberately.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from issl_fast import _backend, ops, reference
from tolerances import assert_close, dense_magnitude, kron_magnitude

U64 = 2**64 - 1
ROLES = ("dense", "sparse", "kron_in", "kron_out")
DISTS = ("rademacher", "gaussian")


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _sign_masks(R: np.ndarray) -> list[int]:
    """Column c of a Rademacher block as an int: bit j set iff R[j, c] == -1."""
    assert set(np.unique(R).tolist()) <= {-1.0, 1.0}
    return [sum(1 << j for j in range(R.shape[0]) if R[j, c] < 0) for c in range(R.shape[1])]


def _signs_from_mask(mask: int, rows: int) -> torch.Tensor:
    return torch.tensor([-1.0 if (mask >> j) & 1 else 1.0 for j in range(rows)])


# ---------------------------------------------------------------------------------------------
# reference goldens
# ---------------------------------------------------------------------------------------------
def test_mix_matches_published_splitmix64_vectors() -> None:
    # mix(0) = 0, so stream_key(0, role, dist) = mix(stream_number * PHI): the outputs of the
    # published splitmix64 generator seeded with 0 (an independent check of the finaliser).
    published = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    ours = [
        reference.stream_key(0, "dense", "rademacher"),
        reference.stream_key(0, "dense", "gaussian"),
        reference.stream_key(0, "sparse", "rademacher"),
        reference.stream_key(0, "sparse", "gaussian"),
    ]
    assert [hex(v) for v in ours] == [hex(v) for v in published]


STREAM_KEYS = {  # seed -> keys for (role, dist) in ROLES x DISTS order
    0: [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC,
        0x1B39896A51A8749B, 0x53CB9F0C747EA2EA, 0x2C829ABE1F4532E1, 0xC584133AC916AB3C],
    1: [0xBFEF8030DDC2D772, 0x5F552CE482F2AA47, 0x70335FC3DAF3D8A7, 0xF440FE3B62C79D2C,
        0x33BA2F29E7C168BB, 0x98843F48A94B7866, 0x74AD4C24D41A25F8, 0x2F9A1F13648EAB6E],
    12345: [0x7FB6FC5796D17578, 0x754815EDDC74663E, 0x89CFC8704F7E2F30, 0xFC0CE1A042542133,
            0x7DA1CCB8546CC181, 0x7B1FFAE926FC8EA6, 0xAAFA0F4BFF901EBC, 0xB270F74D8B221FCB],
    2**63: [0x690889AE19FE46B3, 0xF6BF1DB0165975F9, 0x2D651163514BBD40, 0xB9DF36D528CCEB89,
            0x4C92777EAB3032AF, 0x201B24AEC6C69B10, 0x976D01298EDA3746, 0x839D355103606A74],
    U64: [0xA577782BC52A9F5A, 0xB485244380E590BE, 0x5176985D86CFF511, 0x07508E53B617B6C7,
          0xD49900C9837B7D72, 0x0E4E5EB29DBD0321, 0x78BD794EB5A6CA63, 0xC62E5652A694833F],
}


@pytest.mark.parametrize("seed", list(STREAM_KEYS))
def test_stream_key_golden(seed: int) -> None:
    ours = [reference.stream_key(seed, role, dist) for role in ROLES for dist in DISTS]
    assert [hex(v) for v in ours] == [hex(v) for v in STREAM_KEYS[seed]]


def test_column_keys_golden_including_columns_beyond_2_32() -> None:
    key = reference.stream_key(U64 - 1, "dense")
    cols = np.array([0, 1, 2**32 - 1, 2**32, 2**32 + 7, 2**63 + 5, U64], dtype=np.uint64)
    expected = [0x0CB43E005244D077, 0x8F69825E719D4E13, 0xCDC47F0F54EC184E, 0x498DB27718758F6A,
                0xD5255B05F6889E4A, 0x1539409504E6BFAD, 0x8C48337E5F5DCB38]
    ours = reference.column_keys(key, cols)
    assert ours.dtype == np.uint64
    assert [hex(int(v)) for v in ours] == [hex(v) for v in expected]


def test_hash_words_golden() -> None:
    ck = reference.column_keys(reference.stream_key(7, "dense"), np.array([3, 2**40 + 1]))
    words = reference.hash_words(ck[:, None], np.array([0, 1, 15], dtype=np.uint64)[None, :])
    expected = [[0x32741CC7BF39F48A, 0x57CCAACA8F2FA6B8, 0x22E6B094F3EC9729],
                [0x8465E11A41F8744A, 0x3978D4ED4BBA6A88, 0xB7EE8AAE886F702F]]
    assert [[hex(int(v)) for v in row] for row in words] == [[hex(v) for v in r] for r in expected]


# Rademacher columns as sign masks (bit j set iff R[j, c] = -1); 70 rows cross a 64-bit word.
RADEMACHER_GOLDEN = [
    # (seed, role, rows, col_start, masks of columns col_start, col_start + 1, ...)
    (U64, "dense", 70, 2**33 + 3,
     [0x8D8B4512EF49F067F, 0x1DF9645FF71D78B0D5, 0x165469956B579091BF, 0x3F42E85CC63F919CED]),
    (0, "dense", 70, 0, [0x3F33FE8BD4F9C57863, 0x166246A58789053B93, 0x30127ED4BFA31A36AD]),
    (42, "kron_in", 20, 5, [0x8B9ED, 0x1AA2C, 0x37C59]),
    (42, "kron_out", 20, 5, [0xFD414, 0xB77C5, 0x2DB3A]),
]


@pytest.mark.parametrize("seed,role,rows,col_start,masks", RADEMACHER_GOLDEN)
def test_random_matrix_rademacher_golden(
    seed: int, role: str, rows: int, col_start: int, masks: list[int]
) -> None:
    R = reference.random_matrix(seed, rows, col_start, col_start + len(masks), role=role)
    assert R.shape == (rows, len(masks))
    assert [hex(m) for m in _sign_masks(R)] == [hex(m) for m in masks]


GAUSSIAN_GOLDEN = [
    # (seed, role, rows, col_start, cols, row-major values)
    (5, "dense", 3, 2**40, 2,
     [-1.1960934509392316, -0.5875741411782859, -0.7868617636941089, 1.6656226189100212,
      0.03618813585893824, 0.6966799786911884]),
    (U64, "kron_out", 2, 0, 2,
     [0.2916379585803669, 0.7785797963395188, 0.7961394481047301, 0.041618159571793475]),
]


@pytest.mark.parametrize("seed,role,rows,col_start,cols,values", GAUSSIAN_GOLDEN)
def test_random_matrix_gaussian_golden(
    seed: int, role: str, rows: int, col_start: int, cols: int, values: list[float]
) -> None:
    R = reference.random_matrix(seed, rows, col_start, col_start + cols, role=role,
                                dist="gaussian")
    # numpy's log/cos may differ in the last ulp between platforms; the hash bits may not.
    np.testing.assert_allclose(R.ravel(), values, rtol=1e-13, atol=0)


SPARSE_GOLDEN = [
    # (seed, s, k, col_start, buckets [C, s], signs [C, s])
    (U64, 3, 1000, 2**35,
     [[100, 511, 782], [269, 525, 758], [89, 554, 767], [1, 470, 851]],
     [[1, -1, -1], [-1, 1, 1], [1, -1, 1], [-1, 1, -1]]),
    (9, 1, 7, 0, [[6], [6], [0], [1], [0]], [[1], [1], [-1], [1], [-1]]),
]


@pytest.mark.parametrize("seed,s,k,col_start,buckets,signs", SPARSE_GOLDEN)
def test_sparse_buckets_golden(
    seed: int, s: int, k: int, col_start: int, buckets: list[list[int]], signs: list[list[int]]
) -> None:
    b, sg = reference.sparse_buckets(seed, s, k, col_start, col_start + len(buckets))
    assert b.tolist() == buckets
    assert sg.tolist() == [[float(v) for v in row] for row in signs]


def test_reference_rademacher_independent_of_k_and_column_blocking() -> None:
    seed = 2**64 - 17
    big = reference.random_matrix(seed, 1000, 2**32 - 5, 2**32 + 40)
    assert np.array_equal(reference.random_matrix(seed, 64, 2**32 - 5, 2**32 + 40), big[:64])
    assert np.array_equal(reference.random_matrix(seed, 65, 2**32 - 5, 2**32 + 40), big[:65])
    assert np.array_equal(reference.random_matrix(seed, 1000, 2**32 + 3, 2**32 + 9),
                          big[:, 8:14])


def test_streams_of_roles_and_seeds_differ() -> None:
    keys = {reference.stream_key(s, r, d) for s in (0, 1, U64) for r in ROLES for d in DISTS}
    assert len(keys) == 3 * len(ROLES) * len(DISTS)


# ---------------------------------------------------------------------------------------------
# the kernels produce exactly the pinned matrix
# ---------------------------------------------------------------------------------------------
def _one_hot_rows(P: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.eye(P, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_sketch_dense_one_hot_equals_golden_rademacher(
    simd: str, dtype: torch.dtype
) -> None:
    # Row p of the identity is e_p, so y[p, j] = R(seed, j, col_offset + p) / sqrt(k) exactly:
    # one nonzero term, and the scale is float32(1/sqrt(k)).
    seed, role, rows, col_start, masks = RADEMACHER_GOLDEN[0]
    assert role == "dense"
    y = ops.sketch_dense(_one_hot_rows(len(masks), dtype), rows, seed=seed, col_offset=col_start)
    scale = _f32(1 / math.sqrt(rows))
    for p, mask in enumerate(masks):
        assert torch.equal(y[p], _signs_from_mask(mask, rows) * scale), f"column {col_start + p}"


@pytest.mark.parametrize("k", [1, 5, 63, 64, 65, 129, 1000])
def test_kernel_sketch_dense_rademacher_bit_identical_to_reference(simd: str, k: int) -> None:
    # 300 columns span two KC blocks; col_offset crosses 2^32 inside the block.
    P, col_offset, seed = 300, 2**32 - 100, 2**64 - 2
    y = ops.sketch_dense(_one_hot_rows(P), k, seed=seed, col_offset=col_offset)
    R = torch.from_numpy(reference.random_matrix(seed, k, col_offset, col_offset + P))
    assert torch.equal(y, R.T.to(torch.float32) * _f32(1 / math.sqrt(k)))


def test_kernel_rademacher_entries_independent_of_k_tiling_and_simd() -> None:
    P, seed, col_offset = 77, 3, 2**40
    e = _one_hot_rows(P)
    signs: dict[tuple[str, int], torch.Tensor] = {}
    for level in _backend.supported_simd_levels():
        _backend.set_simd_level(level)
        for k in (64, 65, 1000):
            y = ops.sketch_dense(e, k, seed=seed, col_offset=col_offset)
            assert torch.equal(y.abs(), torch.full_like(y, _f32(1 / math.sqrt(k)).item()))
            signs[(level, k)] = torch.sign(y)
    base = signs[("generic", 1000)]
    for (level, k), s in signs.items():
        assert torch.equal(s, base[:, :k]), f"rows j < {k} differ at simd={level}"
    # Column tiling: the same columns sketched inside a wider block, at another offset.
    wide = ops.sketch_dense(_one_hot_rows(P + 13), 64, seed=seed, col_offset=col_offset - 13)
    assert torch.equal(torch.sign(wide[13:]), base[:, :64])


def test_kernel_sketch_dense_one_hot_equals_golden_gaussian(simd: str) -> None:
    seed, role, rows, col_start, cols, values = GAUSSIAN_GOLDEN[0]
    assert role == "dense"
    e = _one_hot_rows(cols)
    y = ops.sketch_dense(e, rows, seed=seed, dist="gaussian", col_offset=col_start)
    golden = torch.tensor(values, dtype=torch.float64).reshape(rows, cols).T / math.sqrt(rows)
    # Gaussian entries agree to float rounding only: the policy's Gaussian-entry bound.
    mag = dense_magnitude(e, rows, seed=seed, dist="gaussian", col_offset=col_start)
    assert_close(y, golden, mag, "gaussian one-hot vs golden")


@pytest.mark.parametrize("s,k", [(1, 7), (2, 5), (3, 1000), (4, 64), (5, 5), (8, 129)])
def test_kernel_sketch_sparse_one_hot_reveals_buckets_and_signs(simd: str, s: int, k: int) -> None:
    P, seed, col_offset = 40, U64, 2**35
    y = ops.sketch_sparse(_one_hot_rows(P, torch.bfloat16), k, s=s, seed=seed,
                          col_offset=col_offset)
    buckets, signs = reference.sparse_buckets(seed, s, k, col_offset, col_offset + P)
    expected = torch.zeros(P, k)
    val = _f32(1 / math.sqrt(s))
    for p in range(P):
        for r in range(s):
            expected[p, buckets[p, r]] = float(signs[p, r]) * val
    assert torch.equal(y, expected)
    assert int((y != 0).sum()) == P * s  # s distinct buckets per coordinate (one per block)


def test_kernel_sketch_sparse_one_hot_equals_golden(simd: str) -> None:
    seed, s, k, col_start, buckets, signs = SPARSE_GOLDEN[0]
    y = ops.sketch_sparse(_one_hot_rows(len(buckets)), k, s=s, seed=seed, col_offset=col_start)
    val = _f32(1 / math.sqrt(s))
    for p in range(len(buckets)):
        nz = torch.nonzero(y[p]).flatten().tolist()
        assert nz == buckets[p]
        assert torch.equal(y[p, nz], torch.tensor(signs[p], dtype=torch.float32) * val)


def _kron_one_hot(
    d_in: int, d_out: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    pairs = [(o, i) for o in range(d_out) for i in range(d_in)]
    A = torch.zeros(len(pairs), 1, d_in)
    D = torch.zeros(len(pairs), 1, d_out)
    for b, (o, i) in enumerate(pairs):
        A[b, 0, i] = 1.0
        D[b, 0, o] = 1.0
    return A, D, pairs


def test_kernel_sketch_kron_one_hot_reveals_golden_p_in_p_out(simd: str) -> None:
    # One-hot A = e_i, D = e_o: y = vec(P_out[:, o] P_in[:, i]^T), so the sign pattern is the
    # outer product of the two pinned columns and |y| = 1/sqrt(k_in k_out) (to rounding).
    _, _, k_in, c_in, masks_in = RADEMACHER_GOLDEN[2]
    _, _, k_out, c_out, masks_out = RADEMACHER_GOLDEN[3]
    assert c_in == c_out == 5
    d = 8
    A, D, pairs = _kron_one_hot(d, d)
    y = ops.sketch_kron(A, D, k_in, k_out, seed=42)
    assert y.shape == (len(pairs), k_out * k_in)
    target = 1 / math.sqrt(k_in * k_out)
    assert torch.allclose(y.abs().double(), torch.full(y.shape, target, dtype=torch.float64),
                          rtol=3e-7, atol=0)
    for b, (o, i) in enumerate(pairs):
        if o >= 5 and i >= 5:
            expected = torch.outer(_signs_from_mask(masks_out[o - 5], k_out),
                                   _signs_from_mask(masks_in[i - 5], k_in))
            assert torch.equal(torch.sign(y[b]).reshape(k_out, k_in), expected), (o, i)
    # ... and every pair against the reference matrices.
    p_in, p_out = reference.kron_matrices(42, d, d, k_in, k_out)
    for b, (o, i) in enumerate(pairs):
        expected = torch.from_numpy(np.outer(p_out[:, o], p_in[:, i])).to(torch.float32)
        assert torch.equal(torch.sign(y[b]).reshape(k_out, k_in), expected), (o, i)


def test_kernel_sketch_kron_one_hot_gaussian(simd: str) -> None:
    A, D, _ = _kron_one_hot(3, 4)
    y = ops.sketch_kron(A, D, 5, 6, seed=U64, dist="gaussian")
    ref = reference.sketch_kron(A, D, 5, 6, seed=U64, dist="gaussian", accum=torch.float64)
    mag = kron_magnitude(A, D, 5, 6, seed=U64, dist="gaussian")
    assert_close(y, ref, mag, "kron gaussian one-hot")


def test_build_reports_hash_version_1() -> None:
    assert reference.HASH_VERSION == 1
    assert _backend.build_info()["hash_version"] == reference.HASH_VERSION
