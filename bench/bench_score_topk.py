"""score_topk (streaming top-k of Q @ G^T over a store) vs chunked upcast + torch.mm + torch.topk.

Issue-2 targets: n=1,000,000, k=512, fp16 store (1.02 GB), topk=10:
  m=1  at >= 70% of the memory bandwidth (bytes = n*k*2, read once) and >= 3x the baseline;
  m=16 at >= 50% of the fp32 GEMM rate (2*m*n*k flops);
  memory independent of n (store as a numpy.memmap file; measured at n=1M and n=250k).
Baseline: upcast 65536-row chunks into one reused fp32 buffer, Q @ chunk.T, torch.topk per chunk,
merge with the running best (cat + topk + gather).
The memmap timings are with the file in the page cache (written just before), not a cold disk.
"""

from __future__ import annotations

import _baselines as bl
import numpy as np
import pytest
import torch
from _bench import NUM_THREADS, Target, get_case, ops, peak_rss_delta, record, reference, timed

N, K, TOPK = 1_000_000, 512, 10
N_SMALL = 250_000  # second store size for the memory-vs-n comparison
GEN_CHUNK = 65536
SEED = 0
ROUNDS = {"ours": 7, "baseline": 5, "reference": 1}

_checked: dict = {}


def _case(kind: str):
    base = f"n{N // 1000}k k{K} fp16 top{TOPK}"
    if kind == "m1":
        return get_case("score_topk", f"{base} m1", limit="bw", work=2.0 * N * K, targets=[
            Target(">=70% BW", "limit", 0.70), Target(">=3x baseline", "speedup", 3.0,
                                                       vs="baseline")])
    if kind == "m16":
        return get_case("score_topk", f"{base} m16", limit="gemm", work=2.0 * 16 * N * K,
                        targets=[Target(">=50% GEMM", "limit", 0.50)])
    return get_case("score_topk", f"{base} m1 memmap", limit="bw", work=2.0 * N * K, targets=[
        Target("anon mem growth 250k->1M <=16MiB", "info_le", 16 * 2**20,
               key="ours_anon_growth_bytes")])


@pytest.fixture(scope="module")
def store() -> torch.Tensor:
    """The 1.02 GB fp16 store, filled with torch.randn in chunks (once per session)."""
    G = torch.empty(N, K, dtype=torch.float16)
    gen = torch.Generator().manual_seed(4)
    for r0 in range(0, N, GEN_CHUNK):
        r1 = min(N, r0 + GEN_CHUNK)
        G[r0:r1] = torch.randn(r1 - r0, K, generator=gen)
    yield G
    del G


@pytest.fixture(scope="module")
def store_file(store, tmp_path_factory) -> str:
    """The same store written to a raw fp16 file in a temp dir (for numpy.memmap)."""
    path = str(tmp_path_factory.mktemp("score_topk") / "store_fp16.bin")
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(N, K))
    for r0 in range(0, N, GEN_CHUNK):
        mm[r0 : r0 + GEN_CHUNK] = store[r0 : r0 + GEN_CHUNK].numpy()
    mm.flush()
    del mm
    return path


def _open(path: str, n: int = N) -> np.memmap:
    return np.memmap(path, dtype=np.float16, mode="r", shape=(n, K))


@pytest.fixture(scope="module")
def queries() -> torch.Tensor:
    return torch.randn(16, K, generator=torch.Generator().manual_seed(5))


def _ours(Q, G):
    return ops.score_topk(Q, G, TOPK, backend="cpu", num_threads=NUM_THREADS)


def _check(store: torch.Tensor, Q16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference top-k for all 16 queries (m=1 uses row 0), computed once."""
    if "ref" not in _checked:
        _checked["ref"] = reference.score_topk(Q16, store, TOPK, accum=torch.float64)
    return _checked["ref"]


def _assert_topk(what: str, got, ref_v: torch.Tensor, ref_i: torch.Tensor) -> None:
    v, i = got
    assert torch.equal(i, ref_i), f"{what}: top-k indices differ from the float64 reference"
    atol = 1e-5 * float(ref_v.abs().max())
    torch.testing.assert_close(v.double(), ref_v, rtol=1e-5, atol=atol, msg=f"{what}: values")


PARAMS = [("m1", "ours"), ("m1", "baseline"), ("m1", "reference"), ("m16", "ours"),
          ("m16", "baseline"), ("memmap", "ours"), ("memmap", "baseline")]


@pytest.mark.parametrize("kind,role", PARAMS, ids=[f"{k}-{r}" for k, r in PARAMS])
def bench_score_topk(benchmark, kind, role, store, queries, request):
    c = _case(kind)
    benchmark.group = f"score_topk {c.case}"
    ref_v, ref_i = _check(store, queries)
    m = 16 if kind == "m16" else 1
    Q = queries[:m].contiguous()
    ref_v, ref_i = ref_v[:m], ref_i[:m]
    G = store
    if kind == "memmap":
        path = request.getfixturevalue("store_file")
        G = _open(path)
    fns = {
        "ours": ("issl_fast cpu score_topk", lambda: _ours(Q, G)),
        "baseline": (f"chunked upcast+mm+topk ({bl.TOPK_CHUNK} rows)",
                     lambda: bl.topk_baseline(Q, G, TOPK)),
        "reference": ("issl_fast.reference (fp32; sort-merge)",
                      lambda: reference.score_topk(Q, G, TOPK)),
    }
    name, fn = fns[role]
    _assert_topk(f"{kind} {role}", fn(), ref_v, ref_i)
    if role == "reference":
        c.info.setdefault("checked_vs_float64_reference", "indices exact, values rtol 1e-5")
    # the checked call above already warmed the reference (one call takes seconds)
    _, med = timed(benchmark, fn, rounds=ROUNDS[role], warmup=0 if role == "reference" else 1)
    record(benchmark, c, role, name, med, ROUNDS[role])
    if kind == "memmap":
        # Memory vs n: fresh mappings each time, so file-backed pages touched are counted too.
        anon = {}
        for n in (N_SMALL, N):
            call = (lambda Gm: (lambda: _ours(Q, Gm))) if role == "ours" else \
                   (lambda Gm: (lambda: bl.topk_baseline(Q, Gm, TOPK)))
            mem = peak_rss_delta(call(_open(path, n)))
            anon[n] = mem["anon_peak_delta"]
            c.info[f"{role}_anon_peak_n{n // 1000}k_bytes"] = mem["anon_peak_delta"]
            c.info[f"{role}_filemap_peak_n{n // 1000}k_bytes"] = mem["file_peak_delta"]
        c.info[f"{role}_anon_growth_bytes"] = anon[N] - anon[N_SMALL]
        benchmark.extra_info["peak_rss"] = {k: v for k, v in c.info.items() if k.startswith(role)}
