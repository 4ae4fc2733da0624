"""The CUDA sketches (sketch_dense, sketch_linear, sketch_sparse, sketch_kron) against the reference
and the CPU kernels: the Rademacher matrix bit-identical on the device, both kernel families
(float32 SIMT and tensor cores, forced through ``_cuda_ops._CUDA_ALGO``), every input dtype, awkward
shapes (1, primes, not multiples of any tile, empty, more than one tile and one split), column
offsets past 2^32, accumulation, determinism and a non-default stream.

Inputs are ``dyadic`` (exact in every dtype, few significant bits), so every partial sum of a
Rademacher sketch is exact in float32 whatever the summation order: GPU and CPU must then agree
to the one rounding of the final scale, and the policy's tolerance (tolerances.py) has margin.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator

import pytest
import torch
from inputs import DISTS, DTYPE_NAMES, DTYPES, dyadic, randn
from issl_fast import _backend, _cuda_ops, ops, reference
from issl_fast._backend import _C
from tolerances import (
    RTOL,
    assert_close,
    dense_magnitude,
    kron_magnitude,
    linear_magnitude,
    sparse_magnitude,
)

pytestmark = pytest.mark.cuda

AUTO, SIMT, TENSOR_CORES = 0, 1, 2
ALGOS = {"auto": AUTO, "simt": SIMT, "tc": TENSOR_CORES}


@pytest.fixture(autouse=True)
def _cuda_kernels() -> None:
    if not hasattr(_C, "sketch_dense_cuda"):
        msg = f"this build has no CUDA kernels (build_info: {_backend.build_info()})"
        if os.environ.get("ISSL_FAST_REQUIRE_CUDA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(params=list(ALGOS))
def algo(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test with each kernel family (auto, SIMT, tensor cores)."""
    monkeypatch.setattr(_cuda_ops, "_CUDA_ALGO", ALGOS[request.param])
    yield request.param


def _skip_unsupported(algo: str, dist: str) -> None:
    if algo == "tc" and dist == "gaussian":
        pytest.skip("the tensor-core path is Rademacher only (Gaussian entries are not exact in 16 "
                    "bits); forcing it is a ValueError, tested in test_cuda_host.py")


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


DEV = torch.device("cuda")


# ---------------------------------------------------------------------------------------------
# the random matrix on the device
# ---------------------------------------------------------------------------------------------
def test_device_hash_matches_reference() -> None:
    key = reference.stream_key(2**64 - 2, "dense")
    cols = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**40 + 3, 2**63 - 1], dtype=torch.int64)
    words = torch.tensor([0, 1, 63, 64, 2**20, 2**62], dtype=torch.int64)
    n = cols.numel()
    cd, wd = cols.to(DEV), words.to(DEV)
    out = torch.empty(n, dtype=torch.int64, device=DEV)
    _C.cuda_hash_words(key, cd.data_ptr(), wd.data_ptr(), out.data_ptr(), n,
                       torch.cuda.current_stream().cuda_stream)
    ck = reference.column_keys(key, cols.numpy().astype("uint64"))
    expected = reference.hash_words(ck, words.numpy().astype("uint64"))
    assert out.cpu().numpy().view("uint64").tolist() == expected.tolist()


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("k", [1, 5, 63, 64, 65, 129, 1000])
def test_dense_rademacher_bit_identical_to_reference(algo: str, dtype: str, k: int) -> None:
    # One-hot rows: y[p, j] = R(seed, j, col_offset + p) / sqrt(k) exactly (one nonzero term).
    # 300 rows span three 128-row tiles; the columns cross 2^32 inside the block.
    P, col_offset, seed = 300, 2**32 - 100, 2**64 - 2
    e = torch.eye(P, dtype=DTYPES[dtype], device=DEV)
    y = ops.sketch_dense(e, k, seed=seed, col_offset=col_offset)
    R = torch.from_numpy(reference.random_matrix(seed, k, col_offset, col_offset + P))
    assert torch.equal(y.cpu(), R.T.to(torch.float32) * _f32(1 / math.sqrt(k)))


def test_dense_rademacher_equals_cpu_kernel_bit_for_bit(algo: str) -> None:
    P, k = 257, 1000
    e = torch.eye(P)
    cpu = ops.sketch_dense(e, k, seed=9, col_offset=2**40)
    gpu = ops.sketch_dense(e.to(DEV), k, seed=9, col_offset=2**40)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("k", [5, 64, 200])
def test_dense_gaussian_one_hot_close_to_reference(k: int) -> None:
    P, seed, col_offset = 70, 5, 2**40
    e = torch.eye(P)
    y = ops.sketch_dense(e.to(DEV), k, seed=seed, dist="gaussian", col_offset=col_offset)
    R = reference.random_matrix(seed, k, col_offset, col_offset + P, dist="gaussian")
    ref = torch.from_numpy(R).T / math.sqrt(k)
    mag = dense_magnitude(e, k, seed=seed, dist="gaussian", col_offset=col_offset)
    assert_close(y.cpu(), ref, mag, "gaussian one-hot")


# ---------------------------------------------------------------------------------------------
# sketch_dense
# ---------------------------------------------------------------------------------------------
# (B, P, k, col_offset): single elements, primes, P not a multiple of 8 (unaligned rows), more
# than one 128-row / 128-column tile, long P (split-K partials), columns past 2^32, empty.
DENSE_CASES = [
    (1, 1, 1, 0),
    (3, 7, 5, 11),
    (17, 257, 65, 0),
    (130, 300, 129, 2**32 - 100),
    (5, 1031, 1000, 3),
    (40, 4099, 257, 0),
    (64, 4096, 256, 2**62),
    (8, 20000, 64, 0),
    (0, 7, 5, 0),
    (4, 0, 5, 0),
]


@functools.cache
def _dense_case(
    B: int, P: int, k: int, col_offset: int, dist: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = dyadic((B, P), seed=B * 131 + P)
    if B == 0:
        empty = torch.zeros(0, k, dtype=torch.float64)
        return g, empty, empty
    ref = reference.sketch_dense(g, k, seed=21, dist=dist, col_offset=col_offset,
                                 accum=torch.float64)
    return g, ref, dense_magnitude(g, k, seed=21, dist=dist, col_offset=col_offset)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("B,P,k,col_offset", DENSE_CASES)
def test_dense_matches_reference_and_cpu(
    algo: str, B: int, P: int, k: int, col_offset: int, dtype: str, dist: str
) -> None:
    _skip_unsupported(algo, dist)
    g, ref, mag = _dense_case(B, P, k, col_offset, dist)
    gd = g.to(DTYPES[dtype])
    y = ops.sketch_dense(gd.to(DEV), k, seed=21, dist=dist, col_offset=col_offset)
    assert y.device.type == "cuda" and y.shape == (B, k) and y.dtype == torch.float32
    what = f"sketch_dense cuda/{algo} {dtype} {dist} B={B} P={P} k={k}"
    assert_close(y.cpu(), ref, mag, what)
    cpu = ops.sketch_dense(gd, k, seed=21, dist=dist, col_offset=col_offset)
    assert_close(y.cpu(), cpu.double(), 2 * mag, what + " vs cpu")


def test_dense_float32_random_inputs(algo: str) -> None:
    # Full-precision float32 inputs: the tensor-core path splits them in three bf16 terms.
    g = randn((70, 3001), seed=3)
    ref = reference.sketch_dense(g, 300, seed=4, accum=torch.float64)
    mag = dense_magnitude(g, 300, seed=4, dist="rademacher")
    assert_close(ops.sketch_dense(g.to(DEV), 300, seed=4).cpu(), ref, mag, f"float32 {algo}")


@pytest.mark.parametrize("dist", DISTS)
def test_dense_accumulate_and_overwrite(algo: str, dist: str) -> None:
    _skip_unsupported(algo, dist)
    g = dyadic((33, 500), seed=8).to(DEV)
    base = torch.full((33, 70), 0.5, device=DEV)
    y = ops.sketch_dense(g, 70, seed=1, dist=dist)
    acc = ops.sketch_dense(g, 70, seed=1, dist=dist, out=base.clone(), accumulate=True)
    assert_close(acc.cpu(), (y + 0.5).double().cpu(), torch.full((33, 70), 1.0), "accumulate")
    over = ops.sketch_dense(g, 70, seed=1, dist=dist, out=torch.full_like(base, float("nan")))
    assert torch.equal(over, y)


@pytest.mark.parametrize("dist", DISTS)
def test_dense_deterministic_and_stream_invariant(algo: str, dist: str) -> None:
    _skip_unsupported(algo, dist)
    g = randn((8, 40000), seed=2).to(DEV)  # few tiles, long rows: split-K partials
    a = ops.sketch_dense(g, 64, seed=3, dist=dist)
    b = ops.sketch_dense(g, 64, seed=3, dist=dist)
    assert torch.equal(a, b)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        c = ops.sketch_dense(g, 64, seed=3, dist=dist)
    s.synchronize()
    assert torch.equal(a, c)


def test_dense_column_chunks_sum_to_whole(algo: str) -> None:
    g = dyadic((20, 700), seed=5).to(DEV)
    whole = ops.sketch_dense(g, 64, seed=2, col_offset=10)
    parts = ops.sketch_dense(g[:, :300].contiguous(), 64, seed=2, col_offset=10)
    ops.sketch_dense(g[:, 300:].contiguous(), 64, seed=2, col_offset=310, out=parts,
                     accumulate=True)
    # Dyadic inputs and scale 1/8: every partial sum and product is exact.
    assert torch.equal(whole, parts)


def test_dense_on_a_second_device_when_present() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("one CUDA device")
    g = dyadic((9, 100), seed=1)
    y = ops.sketch_dense(g.to("cuda:1"), 17, seed=3)
    assert y.device == torch.device("cuda:1")
    assert torch.equal(y.cpu(), ops.sketch_dense(g.to("cuda:0"), 17, seed=3).cpu())


# ---------------------------------------------------------------------------------------------
# sketch_linear
# ---------------------------------------------------------------------------------------------
# (B, T, d_in, d_out, k, col_offset). The direct tensor-core route needs float16/bfloat16,
# T <= 3, d_in >= 32 (and B >= 16 under auto): cases on both sides of each bound.
LINEAR_CASES = [
    (1, 1, 1, 1, 1, 0),
    (3, 3, 7, 5, 5, 11),
    (3, 17, 257, 7, 65, 0),
    (20, 1, 64, 33, 200, 0),  # direct route: T = 1, aligned d_in
    (20, 3, 37, 5, 129, 2**32 + 5),  # direct route: T = 3, unaligned d_in, columns past 2^32
    (20, 4, 40, 5, 64, 0),  # T = 4: forms G
    (5, 40, 130, 70, 96, 3),  # T >= 8: G by the tiled kernel (3 x 2 tiles, T not a multiple of 16)
    (130, 2, 100, 3, 300, 0),  # two row tiles
    (67, 1, 1031, 1, 1000, 0),
    (0, 3, 7, 5, 5, 0),
    (3, 0, 7, 5, 5, 0),
]


@functools.cache
def _linear_case(
    B: int, T: int, d_in: int, d_out: int, k: int, col_offset: int, dist: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    A = dyadic((B, T, d_in), seed=B * 100 + T * 10 + d_in)
    D = dyadic((B, T, d_out), seed=B * 100 + T * 10 + d_out + 7)
    if B == 0:
        empty = torch.zeros(0, k, dtype=torch.float64)
        return A, D, empty, empty
    ref = reference.sketch_linear(A, D, k, seed=77, dist=dist, col_offset=col_offset,
                                  accum=torch.float64)
    return A, D, ref, linear_magnitude(A, D, k, seed=77, dist=dist, col_offset=col_offset)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("B,T,d_in,d_out,k,col_offset", LINEAR_CASES)
def test_linear_matches_reference_and_cpu(
    algo: str, B: int, T: int, d_in: int, d_out: int, k: int, col_offset: int, dtype: str,
    dist: str,
) -> None:
    _skip_unsupported(algo, dist)
    A, D, ref, mag = _linear_case(B, T, d_in, d_out, k, col_offset, dist)
    dt = DTYPES[dtype]
    y = ops.sketch_linear(A.to(dt).to(DEV), D.to(dt).to(DEV), k, seed=77, dist=dist,
                          col_offset=col_offset)
    assert y.shape == (B, k) and y.dtype == torch.float32
    what = f"sketch_linear cuda/{algo} {dtype} {dist} B={B} T={T} {d_in}x{d_out} k={k}"
    assert_close(y.cpu(), ref, mag, what)
    cpu = ops.sketch_linear(A.to(dt), D.to(dt), k, seed=77, dist=dist, col_offset=col_offset)
    assert_close(y.cpu(), cpu.double(), 2 * mag, what + " vs cpu")


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_linear_equals_dense_of_materialised_gradient(algo: str, dtype: str) -> None:
    # bf16/fp16 T = 1 goes through the direct route: no G at all, the same matrix.
    A = dyadic((24, 1, 96), seed=1, dtype=DTYPES[dtype]).to(DEV)
    D = dyadic((24, 1, 10), seed=2, dtype=DTYPES[dtype]).to(DEV)
    G = reference.per_example_linear_grad(A.cpu(), D.cpu())
    fused = ops.sketch_linear(A, D, 257, seed=3, col_offset=2**33)
    dense = ops.sketch_dense(G.to(DEV), 257, seed=3, col_offset=2**33)
    mag = linear_magnitude(A.cpu(), D.cpu(), 257, seed=3, dist="rademacher", col_offset=2**33)
    assert_close(fused.cpu(), dense.cpu().double(), 2 * mag, f"fused vs dense {dtype}")
    assert fused.abs().max() > 100 * RTOL * mag.max()


def test_linear_deterministic_accumulate_and_stream(algo: str) -> None:
    A = randn((40, 2, 64), seed=4).to(torch.bfloat16).to(DEV)
    D = randn((40, 2, 300), seed=5).to(torch.bfloat16).to(DEV)
    a = ops.sketch_linear(A, D, 96, seed=1)
    assert torch.equal(a, ops.sketch_linear(A, D, 96, seed=1))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        b = ops.sketch_linear(A, D, 96, seed=1, out=torch.ones(40, 96, device=DEV),
                              accumulate=True)
    s.synchronize()
    assert_close(b.cpu(), (a + 1).cpu().double(), torch.full((40, 96), 1.0), "accumulate")


# ---------------------------------------------------------------------------------------------
# sketch_sparse
# ---------------------------------------------------------------------------------------------
SPARSE_CASES = [
    (1, 1, 1, 1, 0),
    (3, 7, 5, 2, 11),
    (13, 257, 63, 4, 0),
    (67, 1031, 64, 8, 1000),
    (33, 1031, 700, 1, 0),  # two row groups of 32, two bucket ranges of 512
    (13, 7, 129, 3, 2**32 + 5),
    (5, 2100, 129, 5, 2**62),
    (4, 50, 5, 5, 0),  # s = k
    (3, 600, 1100, 1100, 0),  # s = k, many replicas per bucket range
    (2, 40000, 64, 4, 0),  # long P: split partials
    (0, 7, 5, 2, 0),
    (3, 0, 5, 2, 0),
]


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("B,P,k,s,col_offset", SPARSE_CASES)
def test_sparse_matches_reference_and_cpu(
    B: int, P: int, k: int, s: int, col_offset: int, dtype: str
) -> None:
    g = dyadic((B, P), seed=B * 7919 + P + s).to(DTYPES[dtype])
    y = ops.sketch_sparse(g.to(DEV), k, s=s, seed=31, col_offset=col_offset)
    assert y.shape == (B, k) and y.dtype == torch.float32
    cpu = ops.sketch_sparse(g, k, s=s, seed=31, col_offset=col_offset)
    if B == 0:
        assert y.numel() == 0
        return
    ref = reference.sketch_sparse(g, k, s=s, seed=31, col_offset=col_offset, accum=torch.float64)
    mag = sparse_magnitude(g, k, s=s, seed=31, col_offset=col_offset)
    what = f"sketch_sparse cuda {dtype} B={B} P={P} k={k} s={s}"
    assert_close(y.cpu(), ref, mag, what)
    assert_close(y.cpu(), cpu.double(), 2 * mag, what + " vs cpu")
    if s in (1, 4):
        # 1/sqrt(s) is a power of two: with dyadic inputs every partial sum is exact, so the CPU
        # and GPU agree bit for bit whatever the split of the input columns.
        assert torch.equal(y.cpu(), cpu), what + " vs cpu, bit for bit"


@pytest.mark.parametrize("s,k", [(1, 7), (2, 5), (3, 1000), (4, 64), (5, 5), (8, 129)])
def test_sparse_one_hot_reveals_buckets_and_signs(s: int, k: int) -> None:
    P, seed, col_offset = 40, 2**64 - 1, 2**35
    y = ops.sketch_sparse(torch.eye(P, dtype=torch.bfloat16, device=DEV), k, s=s, seed=seed,
                          col_offset=col_offset).cpu()
    buckets, signs = reference.sparse_buckets(seed, s, k, col_offset, col_offset + P)
    expected = torch.zeros(P, k)
    val = _f32(1 / math.sqrt(s))
    for p in range(P):
        for r in range(s):
            expected[p, buckets[p, r]] = float(signs[p, r]) * val
    assert torch.equal(y, expected)


def test_sparse_random_float32_bit_identical_to_cpu_and_deterministic() -> None:
    # One split (P within one 128-column chunk): the GPU adds in exactly the CPU's order.
    g = randn((70, 100), seed=9)
    y = ops.sketch_sparse(g.to(DEV), 300, s=3, seed=4)
    assert torch.equal(y.cpu(), ops.sketch_sparse(g, 300, s=3, seed=4))
    big = randn((5, 50000), seed=10).to(DEV)  # split partials
    a = ops.sketch_sparse(big, 64, s=4, seed=1)
    assert torch.equal(a, ops.sketch_sparse(big, 64, s=4, seed=1))
    acc = ops.sketch_sparse(big, 64, s=4, seed=1, out=torch.ones(5, 64, device=DEV),
                            accumulate=True)
    assert torch.equal(acc, a + 1)


# ---------------------------------------------------------------------------------------------
# sketch_kron
# ---------------------------------------------------------------------------------------------
KRON_CASES = [
    (1, 1, 1, 1, 1, 1),
    (3, 3, 7, 5, 5, 63),
    (13, 17, 257, 7, 65, 5),
    (3, 1, 1031, 1, 64, 1),
    (67, 3, 31, 17, 63, 64),
    (1, 17, 300, 260, 65, 65),
    (2, 3, 7, 5, 1000, 3),
    (0, 3, 7, 5, 5, 5),
    (3, 0, 7, 5, 5, 5),
]


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("B,T,d_in,d_out,k_in,k_out", KRON_CASES)
def test_kron_matches_reference_and_cpu(
    algo: str, B: int, T: int, d_in: int, d_out: int, k_in: int, k_out: int, dtype: str,
    dist: str,
) -> None:
    _skip_unsupported(algo, dist)
    A = dyadic((B, T, d_in), seed=B * 1000 + T * 10 + d_in).to(DTYPES[dtype])
    D = dyadic((B, T, d_out), seed=B * 1000 + T * 10 + d_out + 1).to(DTYPES[dtype])
    y = ops.sketch_kron(A.to(DEV), D.to(DEV), k_in, k_out, seed=55, dist=dist)
    assert y.shape == (B, k_out * k_in) and y.dtype == torch.float32
    if B == 0:
        return
    ref = reference.sketch_kron(A, D, k_in, k_out, seed=55, dist=dist, accum=torch.float64)
    mag = kron_magnitude(A, D, k_in, k_out, seed=55, dist=dist)
    what = f"sketch_kron cuda/{algo} {dtype} {dist} B={B} T={T} {d_in}x{d_out} {k_in}x{k_out}"
    assert_close(y.cpu(), ref, mag, what)
    cpu = ops.sketch_kron(A, D, k_in, k_out, seed=55, dist=dist)
    assert_close(y.cpu(), cpu.double(), 2 * mag, what + " vs cpu")


def test_kron_one_hot_signs_are_the_reference_matrices(algo: str) -> None:
    d, k_in, k_out = 6, 20, 9
    pairs = [(o, i) for o in range(d) for i in range(d)]
    A = torch.zeros(len(pairs), 1, d)
    D = torch.zeros(len(pairs), 1, d)
    for b, (o, i) in enumerate(pairs):
        A[b, 0, i] = 1.0
        D[b, 0, o] = 1.0
    y = ops.sketch_kron(A.to(DEV), D.to(DEV), k_in, k_out, seed=42).cpu()
    p_in, p_out = reference.kron_matrices(42, d, d, k_in, k_out)
    for b, (o, i) in enumerate(pairs):
        expected = torch.outer(torch.from_numpy(p_out[:, o]), torch.from_numpy(p_in[:, i]))
        assert torch.equal(torch.sign(y[b]).reshape(k_out, k_in), expected.float()), (o, i)


def test_kron_deterministic_and_accumulate(algo: str) -> None:
    A = randn((6, 40, 96), seed=1).to(DEV)
    D = randn((6, 40, 50), seed=2).to(DEV)
    a = ops.sketch_kron(A, D, 33, 17, seed=5)
    assert torch.equal(a, ops.sketch_kron(A, D, 33, 17, seed=5))
    acc = ops.sketch_kron(A, D, 33, 17, seed=5, out=torch.ones_like(a), accumulate=True)
    assert torch.equal(acc, a + 1)
