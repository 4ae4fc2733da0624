"""sketch_kron (factored LoGra-style projection) vs the same math in plain torch.

Issue-2 target: B=64, T=64, d_in=d_out=512, k_in=k_out=64, fp32: >= 2x plain torch.
Baseline: ``U = A @ P_in.T; V = D @ P_out.T; einsum('bta,btc->bac', V, U)`` (two batched GEMMs
and one bmm), reported two ways: P_in/P_out drawn with torch's RNG on every call (on the fly, like
ours) and P_in/P_out cached. The target is judged against both; the cached one is the stronger.
Machine-limit column: GEMM rate at the op's flops 2BT(d_in k_in + d_out k_out + k_in k_out).
"""

from __future__ import annotations

import _baselines as bl
import pytest
import torch
from _bench import NUM_THREADS, Target, assert_rows_close, get_case, ops, record, reference, timed

B, T, D_IN, D_OUT, K_IN, K_OUT = 64, 64, 512, 512, 64, 64
SEED = 0
ROUNDS = {"ours": 30, "baseline_cached": 30, "baseline_onthefly": 30, "reference": 5}

_state: dict = {}


def _case():
    flops = 2.0 * B * T * (D_IN * K_IN + D_OUT * K_OUT + K_IN * K_OUT)
    return get_case(
        "sketch_kron", f"B{B} T{T} {D_OUT}x{D_IN} k{K_OUT}x{K_IN} fp32", limit="gemm", work=flops,
        targets=[Target(">=2x torch (cached P)", "speedup", 2.0, vs="baseline_cached"),
                 Target(">=2x torch (on-the-fly P)", "speedup", 2.0, vs="baseline_onthefly")])


def _ours(A, D):
    return ops.sketch_kron(A, D, K_IN, K_OUT, seed=SEED, backend="cpu", num_threads=NUM_THREADS)


def _setup() -> dict:
    if _state:
        return _state
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(B, T, D_IN, generator=gen)
    D = torch.randn(B, T, D_OUT, generator=gen)
    P_in, P_out = bl.kron_hash_matrices(SEED, D_IN, D_OUT, K_IN, K_OUT)
    c = _case()
    ref = reference.sketch_kron(A, D, K_IN, K_OUT, seed=SEED, accum=torch.float64)
    c.info["ours_vs_ref_relerr"] = assert_rows_close("ours vs reference", _ours(A, D), ref)
    c.info["baseline_math_vs_ref_relerr"] = assert_rows_close(
        "baseline (hash matrices) vs reference", bl.kron_baseline(A, D, P_in, P_out), ref)
    _state.update(A=A, D=D, P_in=P_in, P_out=P_out)
    return _state


@pytest.mark.parametrize("role", list(ROUNDS))
def bench_sketch_kron(benchmark, role):
    st = _setup()
    c = _case()
    benchmark.group = f"sketch_kron {c.case}"
    A, D = st["A"], st["D"]
    gen = torch.Generator().manual_seed(SEED)

    def onthefly():
        P_in = bl.torch_rademacher(K_IN, D_IN, gen)
        P_out = bl.torch_rademacher(K_OUT, D_OUT, gen)
        return bl.kron_baseline(A, D, P_in, P_out)

    fns = {
        "ours": ("issl_fast cpu sketch_kron", lambda: _ours(A, D)),
        "baseline_cached": ("torch, P_in/P_out cached",
                            lambda: bl.kron_baseline(A, D, st["P_in"], st["P_out"])),
        "baseline_onthefly": ("torch, P_in/P_out from torch RNG per call", onthefly),
        "reference": ("issl_fast.reference (numpy hash per call)",
                      lambda: reference.sketch_kron(A, D, K_IN, K_OUT, seed=SEED)),
    }
    name, fn = fns[role]
    _, med = timed(benchmark, fn, rounds=ROUNDS[role])
    record(benchmark, c, role, name, med, ROUNDS[role])
