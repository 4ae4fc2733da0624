"""The CUDA kernel variants (``issl_fast._cuda_ops.variants``) against the portable kernels they
replace and the reference, each switched on alone (with what it builds on), so a failure names the
kernel. The other ``cuda`` tests run the default set; ``bench/gpu/run.sh`` reruns them with none
and with all variants on.

* The GEMM's cp.async ring (16-bit inputs with 16-byte aligned rows; not a variant) changes only
  how input tiles reach shared memory, never the order of the MMAs: aligned inputs must give the
  bits that an unaligned copy of them gives through the register-staged pipeline.
* ``linear_wgmma`` and ``linear_ws`` (compute capability 9.0 only) sum the same exact products in
  another order: each must match the float64 reference within the tolerance policy and the
  portable route within twice that, on awkward batch and sketch sizes (partial 256 x 64 and
  128 x 256 tiles, splits, T up to 3).
* ``score_wgmma`` (compute capability 9.0 only) scores score_topk's 16- and 64-query blocks on
  wgmma, and ``score_tma`` feeds the same kernel's ring with TMA copies: the top-k
  must match the float64 reference under the tolerance policy (``assert_topk_close``), with exact
  ties by lower index, exclusion, and bfloat16 queries giving the same bits in one pass as in
  three; how the ring is filled must not change a bit.
* ``kron_fused`` sums in another order (per 64-row chunk, unscaled until the end): it must match
  the float64 reference within the tolerance policy on awkward shapes (several sketch-row blocks,
  T across chunks and splits, unaligned rows), and the unfused path bit for bit where every
  product and partial sum is exact (quarter-integer inputs, k_in and k_out powers of four, so
  both scales are powers of two).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from inputs import dyadic, randn
from issl_fast import _backend, _cuda_ops, ops, reference
from issl_fast._backend import _C
from tolerances import assert_close, assert_topk_close, kron_magnitude, linear_magnitude

pytestmark = pytest.mark.cuda

DEV = torch.device("cuda")
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(autouse=True)
def _cuda_kernels() -> Iterator[None]:
    if not hasattr(_C, "sketch_dense_cuda"):
        msg = f"this build has no CUDA kernels (build_info: {_backend.build_info()})"
        if os.environ.get("ISSL_FAST_REQUIRE_CUDA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    with _cuda_ops.variants(()):  # the portable kernels; each test switches its own on
        yield


@contextmanager
def _running(*names: str) -> Iterator[None]:
    """``names`` switched on, each launched at least once inside the block (so the test checks
    the variant's kernel, not a fallback)."""
    before = {n: _cuda_ops.variant_launches(n) for n in names}
    with _cuda_ops.variants(names):
        yield
    for n in names:
        assert _cuda_ops.variant_launches(n) > before[n], f"{n} never launched"


# ---------------------------------------------------------------------------------------------
# the GEMM's cp.async ring: bit-identical to the register-staged pipeline
# ---------------------------------------------------------------------------------------------
def _unaligned_copy(x: torch.Tensor) -> torch.Tensor:
    """The same values, contiguous, starting one element past a 16-byte boundary."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    y = flat[1:].view(x.shape)
    y.copy_(x)
    assert y.is_contiguous() and y.data_ptr() % 16 != 0
    return y


@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("B,P,k", [(16, 8, 1), (37, 1000, 129), (130, 4096, 300), (16, 40, 4096)])
def test_ring_dense_equals_register_pipeline_bit_for_bit(dtype: str, B: int, P: int,
                                                         k: int) -> None:
    g = randn((B, P), seed=B + P).to(HALF[dtype]).to(DEV)
    assert g.data_ptr() % 16 == 0 and P % 8 == 0  # aligned rows: the ring
    plan = _C.sketch_gemm_cuda_plan(2 if dtype == "bfloat16" else 1, B, P, k, 0, 0,
                                    torch.cuda.get_device_properties(0).multi_processor_count)
    assert plan["tensor_cores"], plan
    ring = ops.sketch_dense(g, k, seed=3, col_offset=2**33 + 1)
    staged = ops.sketch_dense(_unaligned_copy(g), k, seed=3, col_offset=2**33 + 1)
    assert torch.equal(ring, staged), f"ring {dtype} B={B} P={P} k={k}"


@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("B,T,d_in,d_out,k", [(20, 1, 64, 33, 200), (40, 2, 96, 7, 96),
                                               (130, 1, 256, 3, 129)])
def test_ring_linear_direct_equals_register_pipeline_bit_for_bit(
    dtype: str, B: int, T: int, d_in: int, d_out: int, k: int
) -> None:
    A = randn((B, T, d_in), seed=1).to(HALF[dtype]).to(DEV)
    D = randn((B, T, d_out), seed=2).to(HALF[dtype]).to(DEV)
    ring = ops.sketch_linear(A, D, k, seed=8)
    acc = ops.sketch_linear(A, D, k, seed=8, out=torch.ones_like(ring), accumulate=True)
    Au = _unaligned_copy(A)
    assert torch.equal(ops.sketch_linear(Au, D, k, seed=8), ring)
    assert torch.equal(ops.sketch_linear(Au, D, k, seed=8, out=torch.ones_like(ring),
                                         accumulate=True), acc)


# ---------------------------------------------------------------------------------------------
# linear_wgmma: the direct sketch_linear route on wgmma (sm_90a code, compute capability 9.0)
# ---------------------------------------------------------------------------------------------
def _require_hopper() -> None:
    if torch.cuda.get_device_capability(0) != (9, 0):
        pytest.skip(f"wgmma needs compute capability 9.0, this GPU is "
                    f"{torch.cuda.get_device_capability(0)} (the default route runs there)")
    if not _C.CUDA_SM90A:  # test_cuda_host checks that builds listing 90 have it
        archs = _backend.build_info()["cuda_architectures"]
        pytest.skip(f"this build has no sm_90a code (architectures {archs})")


@pytest.mark.parametrize("mode,n", [(0, 64), (1, 16), (2, 64), (3, 256), (4, 48), (5, 192)])
def test_wgmma_probe_layouts(mode: int, n: int) -> None:
    # One tile through the wgmma kernels' helpers (swizzled placement, descriptors, register-A
    # fragments from sign bits, accumulator mapping): small integers, so C is exact. If the
    # linear/score wgmma tests fail while this passes, the fault is in their pipelines.
    _require_hopper()
    g = torch.Generator().manual_seed(mode)
    A = torch.randint(-8, 9, (64, 64), generator=g).to(torch.bfloat16)
    B = torch.randint(-8, 9, (n, 64), generator=g).to(torch.bfloat16)
    signs = torch.randint(-(2**62), 2**62, (64,), generator=g, dtype=torch.int64)
    if mode == 2:  # S[j, c] = -1 where bit j of signs[c] is set
        bits = (signs[None, :] >> torch.arange(64)[:, None]) & 1
        A = (1 - 2 * bits).to(torch.bfloat16)
    C = torch.full((64, n), float("nan"), device=DEV)
    Ad, Bd, Sd = A.to(DEV), B.to(DEV), signs.to(DEV)
    _C.cuda_wgmma_probe(mode, Ad.data_ptr(), Bd.data_ptr(), Sd.data_ptr(), C.data_ptr(),
                        torch.cuda.current_stream().cuda_stream)
    expect = A.double() @ B.double().T
    assert torch.equal(C.cpu().double(), expect), f"mode {mode}: {(C.cpu() - expect).abs().max()}"


# (B, T, d_in, d_out, k): partial tiles along both block dimensions, one and several splits of
# d_out, T up to 3 (the direct route), d_in from one 8-column chunk to several 64-column steps.
LINEAR_WGMMA_CASES = [
    (16, 1, 32, 1, 1),  # the direct route needs B >= 16, d_in >= 32, T <= 3
    (20, 1, 64, 33, 200),
    (37, 2, 136, 3, 257),
    (130, 3, 40, 5, 300),
    (300, 1, 96, 2, 64),
    (64, 1, 1024, 16, 4096),
]
# linear_ws (B >= 128): 128 sketch rows x 256 examples per block, so partial example tiles above
# and below 256, one input chunk narrower than a TMA box, many splits of d_out, T up to 3.
LINEAR_WS_CASES = [
    (128, 1, 32, 1, 1),
    (130, 3, 40, 5, 300),
    (256, 2, 200, 9, 384),
    (300, 1, 96, 2, 64),
    (200, 1, 1024, 4, 4096),
    (513, 1, 64, 40, 129),
]
# linear_ws_pair: an even number of 128-row tiles (or an odd one of at least 7, rounded up).
LINEAR_WS_PAIR_CASES = [
    (128, 1, 32, 1, 129),
    (130, 3, 40, 5, 256),
    (256, 2, 200, 9, 512),
    (300, 1, 96, 2, 850),
    (200, 1, 1024, 4, 4096),
    (513, 1, 64, 40, 200),
]
# Routes: variant names joined by "+", all switched on and each launched.
LINEAR_ROUTES = ([("linear_wgmma", *c) for c in LINEAR_WGMMA_CASES]
                 + [(v, *c) for v in ("linear_ws", "linear_ws_regs") for c in LINEAR_WS_CASES]
                 + [(v, *c) for v in ("linear_ws_pair", "linear_ws_pair+linear_ws_regs")
                    for c in LINEAR_WS_PAIR_CASES])


@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("variant,B,T,d_in,d_out,k", LINEAR_ROUTES)
def test_linear_wgmma_matches_reference_and_default(
    variant: str, dtype: str, B: int, T: int, d_in: int, d_out: int, k: int
) -> None:
    # linear_ws (experimental) is the same product with warp specialisation: 128 sketch rows x
    # 256 examples per block, the +-1 tile made by a producer warpgroup, A brought by TMA;
    # linear_ws_pair runs it in clusters of two blocks that share each A tile (TMA multicast),
    # linear_ws_regs with part of Y in registers (setmaxnreg) and three ring slots.
    _require_hopper()
    A = dyadic((B, T, d_in), seed=B + T + d_in).to(HALF[dtype])
    D = dyadic((B, T, d_out), seed=B + T + d_out + 1).to(HALF[dtype])
    Ad, Dd = A.to(DEV), D.to(DEV)
    base = ops.sketch_linear(Ad, Dd, k, seed=9, col_offset=2**32 + 3).cpu()
    with _running(*variant.split("+")):
        y = ops.sketch_linear(Ad, Dd, k, seed=9, col_offset=2**32 + 3)
        assert torch.equal(y, ops.sketch_linear(Ad, Dd, k, seed=9, col_offset=2**32 + 3))
        acc = ops.sketch_linear(Ad, Dd, k, seed=9, col_offset=2**32 + 3,
                                out=torch.ones_like(y), accumulate=True)
    ref = reference.sketch_linear(A, D, k, seed=9, col_offset=2**32 + 3, accum=torch.float64)
    mag = linear_magnitude(A, D, k, seed=9, dist="rademacher", col_offset=2**32 + 3)
    what = f"{variant} {dtype} B={B} T={T} {d_in}x{d_out} k={k}"
    assert_close(y.cpu(), ref, mag, what)
    assert_close(y.cpu(), base.double(), 2 * mag, what + " vs default route")
    assert_close(acc.cpu(), ref + 1, mag + 1, what + " accumulate")


@pytest.mark.parametrize("B,k,expect", [(127, 200, "linear_wgmma"), (128, 200, "linear_ws_pair"),
                                        (128, 300, "linear_ws"), (128, 850, "linear_ws_pair")])
def test_linear_ws_routing(B: int, k: int, expect: str) -> None:
    # With all direct wgmma routes on: linear_ws_pair where the 128-row tiles pair up (an even
    # count, or an odd one of at least 7), linear_ws for the other B >= 128, linear_wgmma for
    # smaller batches; the results agree within the tolerance policy.
    _require_hopper()
    A = dyadic((B, 1, 64), seed=B).to(torch.bfloat16)
    D = dyadic((B, 1, 3), seed=B + 1).to(torch.bfloat16)
    names = ("linear_wgmma", "linear_ws", "linear_ws_pair")
    before = {n: _cuda_ops.variant_launches(n) for n in names}
    with _cuda_ops.variants(names):
        y = ops.sketch_linear(A.to(DEV), D.to(DEV), k, seed=4)
    ran = [n for n in names if _cuda_ops.variant_launches(n) > before[n]]
    assert ran == [expect], f"B={B} k={k}: launched {ran}"
    ref = reference.sketch_linear(A, D, k, seed=4, accum=torch.float64)
    assert_close(y.cpu(), ref, linear_magnitude(A, D, k, seed=4, dist="rademacher"),
                 f"{expect} B={B} k={k}")


# ---------------------------------------------------------------------------------------------
# score_wgmma: score_topk's 16- and 64-query blocks on wgmma (compute capability 9.0)
# ---------------------------------------------------------------------------------------------
# (m, n, k, topk): m <= 16 (16-query blocks: wgmma N = 16) and m > 16 (64-query blocks, one
# partial, several); n across tiles and partitions, not a multiple of 128; k a multiple of 8 but
# not of 64 (zero-padded steps), one step, many; topk above the candidate buffers (32 / 128).
SCORE_WGMMA_CASES = [
    (1, 5000, 64, 17),
    (5, 1031, 40, 1),
    (16, 3000, 136, 200),
    (17, 257, 64, 10),
    (65, 2000, 96, 7),
    (130, 1100, 16, 4),
    (64, 5000, 1024, 100),
    (20, 3000, 136, 300),
]


# How the ring is filled (cp.async or TMA) and, with float32 queries, whether the three bf16
# terms are scored by one stacked wgmma (score_stack, experimental) or three.
SCORE_RINGS = {"cp.async": ("score_wgmma",), "tma": ("score_wgmma", "score_tma"),
               "cp.async+stack": ("score_wgmma", "score_stack"),
               "tma+stack": ("score_wgmma", "score_tma", "score_stack")}
# The ring each must match bit for bit (the same MMAs in the same order). Stacking sums the
# terms in another order, so it has its own reference ring.
SAME_BITS = {"tma": "cp.async", "tma+stack": "cp.async+stack"}


@contextmanager
def _ring(ring: str, query: str) -> Iterator[None]:
    """The ring's variants on; each must launch, except score_stack with bfloat16 queries (one
    term: nothing to stack)."""
    names = SCORE_RINGS[ring]
    must = [n for n in names if not (n == "score_stack" and query == "bfloat16")]
    before = {n: _cuda_ops.variant_launches(n) for n in must}
    with _cuda_ops.variants(names):
        yield
    for n in must:
        assert _cuda_ops.variant_launches(n) > before[n], f"{n} never launched"


@pytest.mark.parametrize("ring", list(SCORE_RINGS))
@pytest.mark.parametrize("query", ["float32", "bfloat16"])
@pytest.mark.parametrize("m,n,k,topk", SCORE_WGMMA_CASES)
def test_score_wgmma_matches_reference(ring: str, query: str, m: int, n: int, k: int,
                                       topk: int) -> None:
    _require_hopper()
    Q = randn((m, k), seed=m * 31 + k)
    if query == "bfloat16":
        Q = Q.to(torch.bfloat16).float()  # the reference sees the same (bf16) values
    G = dyadic((n, k), seed=n * 7 + k)
    Qd = Q.to(DEV).to(torch.bfloat16) if query == "bfloat16" else Q.to(DEV)
    Gd = G.to(torch.bfloat16).to(DEV)
    with _ring(ring, query):
        v, i = ops.score_topk(Qd, Gd, topk)
        v2, i2 = ops.score_topk(Qd, Gd, topk)
    assert torch.equal(v, v2) and torch.equal(i, i2), "deterministic"
    # The same MMAs in the same order give the same bits (bfloat16 queries: nothing to stack).
    same = SAME_BITS.get(ring)
    if query == "bfloat16" and ring.endswith("+stack"):
        same = ring.removesuffix("+stack")
    if same is not None:
        with _ring(same, query):
            v3, i3 = ops.score_topk(Qd, Gd, topk)
        assert torch.equal(v, v3) and torch.equal(i, i3), f"{ring} vs {same}"
    ref = reference.score_topk(Q, G, topk, accum=torch.float64)
    what = f"score_wgmma {ring} {query} m={m} n={n} k={k}"
    assert_topk_close((v.cpu(), i.cpu()), ref, Q, G, what=what)
    base = ops.score_topk(Qd, Gd, topk)  # the mma.sync scorer
    assert_topk_close((base[0].cpu(), base[1].cpu()), (v.cpu().double(), i.cpu()), Q, G,
                      what="mma.sync scorer vs " + what)


@pytest.mark.parametrize("ring", list(SCORE_RINGS))
def test_score_wgmma_bf16_one_pass_ties_and_exclusion(ring: str) -> None:
    _require_hopper()
    m, n, k = 70, 4100, 96
    Qb = randn((m, k), seed=3).to(torch.bfloat16).to(DEV)
    G = dyadic((n, k), seed=4)
    G[2000:2010] = G[17]  # exact ties with row 17: broken by lower index
    Gd = G.to(torch.bfloat16).to(DEV)
    ex = torch.tensor([[17, 2001]] * m, device=DEV)
    with _ring(ring, "float32"):  # the float32 call below launches every variant of the ring
        one = ops.score_topk(Qb, Gd, 13, exclude=ex)
        three = ops.score_topk(Qb.float(), Gd, 13, exclude=ex)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    assert not bool(((one[1] == 17) | (one[1] == 2001)).any()), "excluded rows"
    ref = reference.score_topk(Qb.float().cpu(), G, 13, exclude=ex.cpu(), accum=torch.float64)
    assert_topk_close((one[0].cpu(), one[1].cpu()), ref, Qb.float().cpu(), G, what="ties")


# ---------------------------------------------------------------------------------------------
# kron_fused
# ---------------------------------------------------------------------------------------------
# (B, T, d_in, d_out, k_in, k_out): one block and several along each factor, T within one chunk,
# across chunks and across splits, d not a multiple of 8 (element loads), large d.
KRON_FUSED_CASES = [
    (1, 1, 1, 1, 1, 1),
    (3, 3, 7, 5, 5, 63),
    (13, 17, 257, 7, 65, 5),
    (67, 3, 31, 17, 63, 64),
    (1, 130, 300, 260, 65, 65),
    (2, 200, 64, 72, 129, 64),
    (4, 1000, 40, 24, 16, 16),
    (150, 200, 40, 24, 16, 16),  # two row chunks per split
    (300, 2, 1024, 8, 64, 64),
    (300, 150, 200, 130, 64, 64),  # one split (B >= 2 blocks per SM): 3 chunks of 4 + 3 K steps
]


@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("B,T,d_in,d_out,k_in,k_out", KRON_FUSED_CASES)
def test_kron_fused_matches_reference(
    dtype: str, B: int, T: int, d_in: int, d_out: int, k_in: int, k_out: int
) -> None:
    A = dyadic((B, T, d_in), seed=B * 7 + T).to(HALF[dtype])
    D = dyadic((B, T, d_out), seed=B * 7 + T + 1).to(HALF[dtype])
    with _running("kron_fused"):
        plan = _C.sketch_kron_cuda_plan(2 if dtype == "bfloat16" else 1, B, T, k_in, k_out, 0, 0,
                                        torch.cuda.get_device_properties(0).multi_processor_count)
        assert plan["fused"], plan
        y = ops.sketch_kron(A.to(DEV), D.to(DEV), k_in, k_out, seed=55)
        acc = ops.sketch_kron(A.to(DEV), D.to(DEV), k_in, k_out, seed=55,
                              out=torch.full_like(y, 0.5), accumulate=True).cpu()
    ref = reference.sketch_kron(A, D, k_in, k_out, seed=55, accum=torch.float64)
    mag = kron_magnitude(A, D, k_in, k_out, seed=55, dist="rademacher")
    what = f"kron_fused {dtype} B={B} T={T} {d_in}x{d_out} {k_in}x{k_out} splits={plan['splits']}"
    assert_close(y.cpu(), ref, mag, what)
    assert_close(acc, ref + 0.5, mag + 0.5, what + " accumulate")


def _quarters(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values in {-1/2, -1/4, 0, 1/4, 1/2}: with d <= 96 and T <= 256 every product and partial
    sum of sketch_kron (and every power-of-two scaling of one) is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=g).to(torch.bfloat16) / 4


@pytest.mark.parametrize("k", [4, 16, 64])
@pytest.mark.parametrize("T", [1, 64, 65, 256])
def test_kron_fused_equals_unfused_where_sums_are_exact(k: int, T: int) -> None:
    A = _quarters((9, T, 96), seed=T).to(DEV)
    D = _quarters((9, T, 40), seed=T + 1).to(DEV)
    base = ops.sketch_kron(A, D, k, k, seed=3)
    with _running("kron_fused"):
        fused = ops.sketch_kron(A, D, k, k, seed=3)
    assert torch.equal(fused, base), f"T={T} k={k}"


def test_kron_fused_unaligned_rows_accumulate_and_determinism() -> None:
    # Element loads instead of cp.async: A's rows are 97 long (not a multiple of 8), D's rows are
    # 48 long but start one element past a 16-byte boundary (a contiguous view at offset 1).
    A = randn((6, 70, 97), seed=1).to(torch.float16).to(DEV)
    flat = randn((6 * 70 * 48 + 1,), seed=2).to(torch.float16).to(DEV)
    D = flat[1:].view(6, 70, 48)
    assert D.is_contiguous() and D.data_ptr() % 16 != 0
    with _running("kron_fused"):
        a = ops.sketch_kron(A, D, 33, 17, seed=5)
        assert torch.equal(a, ops.sketch_kron(A, D, 33, 17, seed=5))
        acc = ops.sketch_kron(A, D, 33, 17, seed=5, out=torch.ones_like(a), accumulate=True)
    # out + scale * sum is one fused multiply-add: within an ulp of a + 1.
    assert_close(acc.cpu(), (a + 1).cpu().double(), (a.abs() + 1).cpu().double(), "accumulate")
    base = ops.sketch_kron(A, D, 33, 17, seed=5)
    mag = kron_magnitude(A.cpu(), D.cpu(), 33, 17, seed=5, dist="rademacher")
    assert_close(a.cpu(), base.cpu().double(), 2 * mag, "fused vs unfused")


# ---------------------------------------------------------------------------------------------
# score_prepass (experimental): bars from the exact k-th value of a pre-pass over ~32K rows
# ---------------------------------------------------------------------------------------------
PREPASS_BASES = {"portable": (), "default": tuple(_cuda_ops.default_variants())}


def _prepass_store(m: int, k: int, topk: int, seed: int) -> tuple[torch.Tensor, int]:
    """A bf16 store just over the pre-pass threshold of this GPU (whatever its SM count), whose
    pre-pass rows score 1.25x the others: the final cut-off then falls near the pre-pass's
    k-th value (about a third of the top-k comes from each side), so a bar even a few ranks too
    high would drop rows of the result. Returns (store, pre_rows)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with _cuda_ops.variants(["score_prepass"]):  # a host-only plan (fake aligned address)
        big = _C.score_topk_cuda_plan(m, 1 << 20, 2, 10**8, k, topk, sms, 0)
    pre = int(big["pre_rows"])
    assert pre > 0, big
    n = 8 * pre + 37
    G = dyadic((n, k), seed=seed).to(torch.bfloat16)
    G[:pre] = (G[:pre].float() * 1.25).to(torch.bfloat16)
    G[pre + 3] = G[pre // 2]  # an exact tie across the boundary: the lower index ranks first
    return G, pre


@contextmanager
def _prepass(base: str) -> Iterator[None]:
    """``base`` plus score_prepass switched on; the pre-pass must run inside the block."""
    before = _cuda_ops.variant_launches("score_prepass")
    with _cuda_ops.variants((*PREPASS_BASES[base], "score_prepass")):
        yield
    assert _cuda_ops.variant_launches("score_prepass") > before, "the pre-pass never ran"


# (m, k, topk): one and several query blocks; topk of 1, of the candidate buffers and above.
@pytest.mark.parametrize("base", list(PREPASS_BASES))
@pytest.mark.parametrize("query", ["float32", "bfloat16"])
@pytest.mark.parametrize("m,k,topk", [(1, 64, 1), (20, 40, 100), (70, 16, 300)])
def test_score_prepass_equals_one_pass_and_matches_reference(
    base: str, query: str, m: int, k: int, topk: int
) -> None:
    # The pre-pass only raises the bars (a row below one is beaten by topk sampled rows), and the
    # scores come from the same kernel: the top-k must be the one-pass result bit for bit.
    G, pre = _prepass_store(m, k, topk, seed=m + k)
    n = G.shape[0]
    Q = randn((m, k), seed=m * 3 + k)
    if query == "bfloat16":
        Q = Q.to(torch.bfloat16).float()
    Qd = Q.to(DEV).to(torch.bfloat16) if query == "bfloat16" else Q.to(DEV)
    Gd = G.to(DEV)
    with _cuda_ops.variants(PREPASS_BASES[base]):
        one = ops.score_topk(Qd, Gd, topk)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with _prepass(base):
        plan = _C.score_topk_cuda_plan(m, Gd.data_ptr(), 2, n, k, topk, sms, 0)
        assert plan["pre_rows"] == pre, plan
        v, i = ops.score_topk(Qd, Gd, topk)
    what = f"score_prepass {base} {query} m={m} n={n} k={k} topk={topk}"
    assert torch.equal(i, one[1]) and torch.equal(v, one[0]), what
    if m * topk >= 100:  # both sides of the boundary reach the result (a wrong bar would show)
        assert bool((i < pre).any()) and bool((i >= pre).any()), what
    ref = reference.score_topk(Q, G.float(), topk, accum=torch.float64)
    assert_topk_close((v.cpu(), i.cpu()), ref, Q, G.float(), what=what)


def test_score_prepass_exclusion_offset_and_accumulate() -> None:
    # Excluded rows inside the sample must not count towards its k-th value; index_offset and an
    # earlier result merge as in one pass.
    m, k, topk = 3, 32, 50
    G, _ = _prepass_store(m, k, topk, seed=8)
    Gd = G.to(DEV)
    Q = randn((m, k), seed=7).to(DEV)
    with _cuda_ops.variants(()):
        one_pass = ops.score_topk(Q, Gd, topk)
        ex = (one_pass[1][:, :40] + 5).contiguous()  # each query's 40 best rows, as ids
        prev = ops.score_topk(Q, Gd[:1000], topk, index_offset=10**9)
        want = ops.score_topk(Q, Gd, topk, exclude=ex, index_offset=5)
        want_acc = ops.score_topk(Q, Gd, topk, out=(prev[0].clone(), prev[1].clone()),
                                  accumulate=True)
    with _prepass("portable"):
        got = ops.score_topk(Q, Gd, topk, exclude=ex, index_offset=5)
        got_acc = ops.score_topk(Q, Gd, topk, out=(prev[0].clone(), prev[1].clone()),
                                 accumulate=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for q in range(m):
        assert not bool(torch.isin(got[1][q], ex[q]).any()), f"query {q}: an excluded row"
    assert torch.equal(got_acc[0], want_acc[0]) and torch.equal(got_acc[1], want_acc[1])


@pytest.mark.parametrize("dtype,topk", [(torch.float16, 30), (torch.float32, 7),
                                        (torch.bfloat16, 2100)])
def test_score_prepass_simt_stores_and_pairwise_merges(dtype: torch.dtype, topk: int) -> None:
    # float16 / float32 stores take the SIMT scorer; topk over 2048 merges pairwise from global
    # memory. Both behind the pre-pass, bit for bit as in one pass.
    m, k = 2, 16
    G, pre = _prepass_store(m, k, topk, seed=topk)
    Gd = G.to(dtype).to(DEV)
    Q = randn((m, k), seed=topk + 1).to(DEV)
    with _cuda_ops.variants(()):
        one = ops.score_topk(Q, Gd, topk)
    with _prepass("portable"):
        got = ops.score_topk(Q, Gd, topk)
    assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1]), f"{dtype} topk={topk}"


# ---------------------------------------------------------------------------------------------
# score_pace (experimental): the query blocks of a partition kept within a few tiles of each other
# ---------------------------------------------------------------------------------------------
# Bases: the portable tensor-core scorer, the default set (wgmma + TMA on CC 9.0), and the SIMT
# scorer (a float16 store). (m, n, k, topk): two query blocks, several (with a partial one), and
# many partitions of a few tiles each.
PACE_BASES = {"portable": ((), torch.bfloat16),
              "default": (tuple(_cuda_ops.default_variants()), torch.bfloat16),
              "simt": ((), torch.float16)}


@pytest.mark.parametrize("base", list(PACE_BASES))
@pytest.mark.parametrize("m,n,k,topk", [(65, 40_000, 64, 10), (300, 20_011, 40, 37),
                                        (130, 300_000, 16, 1)])
def test_score_pace_equals_unpaced_and_matches_reference(
    base: str, m: int, n: int, k: int, topk: int
) -> None:
    # Pacing only delays blocks; every result is exact top-k with ties by lower index, so the
    # paced result must be the unpaced one bit for bit. bfloat16 queries: those blocks are small
    # enough for two per SM, so these grids fit on the GPU at once (pacing runs only then).
    variants, dtype = PACE_BASES[base]
    G = dyadic((n, k), seed=n + k).to(dtype)
    Q = randn((m, k), seed=m + k).to(torch.bfloat16).float()
    Gd, Qd = G.to(DEV), Q.to(DEV).to(torch.bfloat16)
    with _cuda_ops.variants(variants):
        want = ops.score_topk(Qd, Gd, topk)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    code = {torch.bfloat16: 2, torch.float16: 1}[dtype]
    before = _cuda_ops.variant_launches("score_pace")
    with _cuda_ops.variants((*variants, "score_pace")):
        plan = _C.score_topk_cuda_plan(m, Gd.data_ptr(), code, n, k, topk, sms, 0)
        assert plan["query_blocks"] > 1 and plan["pace_window"] >= 1, plan
        got = ops.score_topk(Qd, Gd, topk)
        assert torch.equal(ops.score_topk(Qd, Gd, topk)[1], got[1])
    assert _cuda_ops.variant_launches("score_pace") > before, "pacing never ran"
    what = f"score_pace {base} m={m} n={n} k={k} topk={topk}"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), what
    ref = reference.score_topk(Q, G.float(), topk, accum=torch.float64)
    assert_topk_close((got[0].cpu(), got[1].cpu()), ref, Q, G.float(), what=what)
