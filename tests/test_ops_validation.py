"""The kernel layer's argument checks: an out= that overlaps an input (the kernels write it while
they read), the same out=/accumulate checks on every backend, thread counts and flags of the
wrong type, sparse layouts; and a failed scratch allocation inside a kernel's parallel region
is a MemoryError, not an aborted process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import issl_fast as issl
import numpy as np
import pytest
import torch

B, P, K = 4, 64, 16


def _ops(g: torch.Tensor, A: torch.Tensor, D: torch.Tensor):
    return {
        "sketch_dense": lambda **kw: issl.sketch_dense(g, K, **kw),
        "sketch_sparse": lambda **kw: issl.sketch_sparse(g, K, s=2, **kw),
        "sketch_linear": lambda **kw: issl.sketch_linear(A, D, K, **kw),
        "sketch_kron": lambda **kw: issl.sketch_kron(A, D, 4, 4, **kw),
    }


@pytest.mark.parametrize("op", ["sketch_dense", "sketch_sparse", "sketch_linear", "sketch_kron"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_out_overlapping_an_input_is_refused(op: str, backend: str) -> None:
    g = torch.randn(B, P)
    A, D = torch.randn(B, 2, 8), torch.randn(B, 2, 8)
    inputs = {"sketch_dense": g, "sketch_sparse": g, "sketch_linear": A, "sketch_kron": D}
    run = _ops(g, A, D)[op]
    want = run(backend=backend).clone()
    alias = inputs[op].view(-1)[:B * K].view(B, K)
    before = inputs[op].clone()
    with pytest.raises(ValueError, match="out shares memory with an input"):
        run(out=alias, backend=backend)
    assert torch.equal(inputs[op], before)  # nothing was written
    separate = torch.empty(B, K)
    assert torch.equal(run(out=separate, backend=backend), want)


def test_score_topk_out_overlapping_the_queries_is_refused() -> None:
    Q, G = torch.randn(2, 8), torch.randn(20, 8)
    values = Q.view(-1)[:6].view(2, 3)
    with pytest.raises(ValueError, match="out values shares memory with an input"):
        issl.score_topk(Q, G, 3, out=(values, torch.empty(2, 3, dtype=torch.int64)))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_out_and_accumulate_are_checked_alike_on_every_backend(backend: str) -> None:
    g = torch.randn(B, P)
    with pytest.raises(ValueError, match="accumulate=True needs an out= tensor"):
        issl.sketch_dense(g, K, accumulate=True, backend=backend)
    with pytest.raises(TypeError, match="out must be float32, got torch.float64"):
        issl.sketch_dense(g, K, out=torch.empty(B, K, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match=r"out must have shape \(4, 16\), got \(4, 17\)"):
        issl.sketch_dense(g, K, out=torch.empty(B, K + 1), backend=backend)
    with pytest.raises(TypeError, match="accumulate must be True or False, got 'yes'"):
        issl.sketch_dense(g, K, out=torch.zeros(B, K), accumulate="yes", backend=backend)
    out = torch.ones(B, K)  # accumulate adds on every backend
    issl.sketch_dense(g, K, out=out, accumulate=True, backend=backend)
    torch.testing.assert_close(out, 1 + issl.sketch_dense(g, K, backend="reference"))


def test_thread_counts_flags_and_layouts_name_the_field() -> None:
    g = torch.randn(B, P)
    with pytest.raises(ValueError, match=r"num_threads must be >= 1 and <= 4096, got 2147483648"):
        issl.sketch_dense(g, K, num_threads=2**31)
    with pytest.raises(TypeError, match="accumulate must be True or False"):
        issl.score_topk(torch.randn(1, P), g, 2, accumulate=1)
    with pytest.raises(ValueError, match="g must be a dense \\(strided\\) tensor .*sparse_csr"):
        issl.sketch_dense(g.to_sparse_csr(), K)
    with pytest.raises(ValueError, match="G must be a dense \\(strided\\) tensor .*sparse_coo"):
        issl.score_topk(torch.randn(1, P), g.to_sparse(), 2)


def test_a_topk_far_above_n_reserves_nothing_for_it() -> None:
    values, indices = issl.score_topk(torch.randn(1, 4), torch.randn(3, 4), 100_000)
    assert indices[0, :3].sort().values.tolist() == [0, 1, 2]
    assert (indices[0, 3:] == -1).all() and torch.isneginf(values[0, 3:]).all()


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS caps memory on Linux")
def test_a_failed_allocation_in_a_parallel_region_is_a_memory_error() -> None:
    import resource

    code = textwrap.dedent("""
        import torch, issl_fast as issl
        try:  # one row, k = 2**24: each thread's transposed output is 16 k floats (1 GiB)
            issl.sketch_sparse(torch.randn(1, 8), 2**24, s=1, num_threads=1)
        except MemoryError:
            print("MemoryError")
    """)
    cap = 1_500_000_000  # (bytes of address space: torch imports in ~1 GB)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, preexec_fn=limit)
    assert run.returncode == 0, run.stderr[-500:]  # (an abort is -6)
    assert run.stdout.strip() == "MemoryError"


def test_numpy_store_out_checks_are_unchanged() -> None:
    G = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    values, indices = issl.score_topk(torch.randn(2, 4), G, 3)
    assert values.shape == (2, 3) and indices.shape == (2, 3)


def test_accumulating_into_a_non_canonical_result_agrees_across_backends() -> None:
    # an earlier result holding a NaN, and finite values at index -1 (empty slots): neither is a
    # candidate on any backend ("NaN is never selected")
    torch.manual_seed(0)
    Q, G = torch.randn(1, 8), torch.randn(50, 8)
    results = {}
    for backend in ("cpu", "reference"):
        values = torch.tensor([[float("nan"), 50.0, 0.0]])
        indices = torch.tensor([[1000, -1, -1]])
        issl.score_topk(Q, G, 3, out=(values, indices), accumulate=True, backend=backend)
        results[backend] = (values, indices)
    assert torch.equal(results["cpu"][1], results["reference"][1])
    torch.testing.assert_close(results["cpu"][0], results["reference"][0])
    assert torch.isfinite(results["cpu"][0]).all() and (results["cpu"][1] >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_score_topk_over_parts_equals_one_call_over_the_joined_rows(dtype) -> None:
    torch.manual_seed(1)
    Q, G = torch.randn(3, 16), torch.randn(101, 16).to(dtype)
    exclude = torch.tensor([[5, -1], [99, 17], [-1, -1]])
    want = issl.score_topk(Q, G, 7, exclude=exclude)
    cuts = [0, 1, 40, 40, 77, 101]  # (an empty part too)
    parts = [(G[a:b] if i % 2 or dtype == torch.bfloat16 else G[a:b].numpy(), a)
             for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    got = issl.ops.score_topk_parts(Q, parts, 7, exclude=exclude)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    empty = issl.ops.score_topk_parts(Q, [], 2)
    assert (empty[1] == -1).all() and torch.isneginf(empty[0]).all()
    with pytest.raises(ValueError, match="a part of the store is"):
        issl.ops.score_topk_parts(Q, [(G[:5], 0), (G[:5, :8].contiguous(), 5)], 2)


def test_out_sharing_memory_through_another_storage_is_refused() -> None:
    buffer = np.random.default_rng(0).standard_normal((B, P)).astype(np.float32)
    g = torch.from_numpy(buffer)
    out = torch.from_numpy(buffer.reshape(-1)[:B * K].reshape(B, K))  # (its own storage)
    with pytest.raises(ValueError, match="out shares memory with an input"):
        issl.sketch_dense(g, K, out=out)


def test_accumulate_may_be_a_numpy_bool() -> None:
    g = torch.randn(B, P)
    out = torch.ones(B, K)
    issl.sketch_dense(g, K, out=out, accumulate=np.int64(3) > 0)  # (np.bool_)
    torch.testing.assert_close(out, 1 + issl.sketch_dense(g, K))
