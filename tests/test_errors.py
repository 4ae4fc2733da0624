"""Bad inputs raise the documented errors (TypeError / ValueError / BackendUnavailableError)
with messages that name the offending dtype, shape or value."""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import pytest
import torch
from issl_fast import ops

g = torch.zeros(3, 7)
A, D = torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)
Q, G = torch.zeros(2, 6), torch.zeros(10, 6)

# op name -> (function of the "g-like" argument, a valid call's other arguments)
SKETCHES: dict[str, Callable[..., Any]] = {
    "sketch_dense": lambda x=g, **kw: ops.sketch_dense(x, kw.pop("k", 5), **kw),
    "sketch_sparse": lambda x=g, **kw: ops.sketch_sparse(x, kw.pop("k", 5), s=kw.pop("s", 2),
                                                         **kw),
    "sketch_linear": lambda x=A, **kw: ops.sketch_linear(x, kw.pop("D", D), kw.pop("k", 5), **kw),
    "sketch_kron": lambda x=A, **kw: ops.sketch_kron(x, kw.pop("D", D), kw.pop("k", 3), 4, **kw),
}
OUT_SHAPES = {"sketch_dense": (3, 5), "sketch_sparse": (3, 5), "sketch_linear": (2, 5),
              "sketch_kron": (2, 12)}
DIST_OPS = ("sketch_dense", "sketch_linear", "sketch_kron")


def _bad_like(op: str, dtype: torch.dtype) -> torch.Tensor:
    x = g if op in ("sketch_dense", "sketch_sparse") else A
    return x.to(dtype)


@pytest.mark.parametrize("op", SKETCHES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int32])
def test_wrong_dtype_is_a_type_error_naming_it(op: str, dtype: torch.dtype) -> None:
    x = _bad_like(op, dtype)
    kw = {"D": D.to(dtype)} if op in ("sketch_linear", "sketch_kron") else {}
    with pytest.raises(TypeError, match=re.escape(str(dtype))):
        SKETCHES[op](x, **kw)


@pytest.mark.parametrize("op", SKETCHES)
def test_wrong_ndim_is_a_value_error_naming_the_shape(op: str) -> None:
    x = torch.zeros(2, 3, 4, 5)
    with pytest.raises(ValueError, match=re.escape("(2, 3, 4, 5)")):
        SKETCHES[op](x)


@pytest.mark.parametrize("op", SKETCHES)
def test_non_contiguous_is_a_value_error(op: str) -> None:
    x = torch.zeros(7, 3).T if op in ("sketch_dense", "sketch_sparse") else A.transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        SKETCHES[op](x)


def test_non_tensor_input() -> None:
    with pytest.raises(TypeError, match="ndarray"):
        ops.sketch_dense(np.zeros((3, 7), dtype=np.float32), 5)


@pytest.mark.parametrize("op", ["sketch_linear", "sketch_kron"])
def test_a_d_mismatch(op: str) -> None:
    with pytest.raises(ValueError, match=re.escape("(2, 4, 5)")):
        SKETCHES[op](A, D=torch.zeros(2, 4, 5))  # T differs
    with pytest.raises(ValueError, match=re.escape("(3, 3, 5)")):
        SKETCHES[op](A, D=torch.zeros(3, 3, 5))  # B differs
    with pytest.raises(TypeError, match="same dtype"):
        SKETCHES[op](A, D=D.to(torch.float16))
    with pytest.raises(ValueError, match="d_in"):
        SKETCHES[op](torch.zeros(2, 3, 0), D=D)
    with pytest.raises(ValueError, match="contiguous"):
        SKETCHES[op](A, D=torch.zeros(2, 5, 3).transpose(1, 2))


@pytest.mark.parametrize("op", SKETCHES)
def test_bad_k_and_seed(op: str) -> None:
    with pytest.raises(ValueError, match=r"k(_in)? must be >= 1\b.*got 0"):
        SKETCHES[op](k=0)
    with pytest.raises(ValueError, match="seed must be >= 0.*got -1"):
        SKETCHES[op](seed=-1)
    with pytest.raises(ValueError, match=f"seed.*got {2**64}"):
        SKETCHES[op](seed=2**64)
    with pytest.raises(TypeError, match="seed must be an int"):
        SKETCHES[op](seed=1.5)
    SKETCHES[op](seed=2**64 - 1)  # the largest seed is fine


def test_sparse_s_out_of_range() -> None:
    with pytest.raises(ValueError, match="s must be >= 1 and <= 5, got 6"):
        ops.sketch_sparse(g, 5, s=6)
    with pytest.raises(ValueError, match="s must be >= 1"):
        ops.sketch_sparse(g, 5, s=0)


def test_negative_col_offset() -> None:
    with pytest.raises(ValueError, match="col_offset must be >= 0, got -3"):
        ops.sketch_dense(g, 5, col_offset=-3)


@pytest.mark.parametrize("op", DIST_OPS)
def test_bad_dist(op: str) -> None:
    with pytest.raises(ValueError, match="'normal'"):
        SKETCHES[op](dist="normal")


@pytest.mark.parametrize("op", SKETCHES)
def test_bad_backend(op: str) -> None:
    with pytest.raises(ValueError, match="'tpu'"):
        SKETCHES[op](backend="tpu")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        SKETCHES[op](backend="cuda")


@pytest.mark.parametrize("op", SKETCHES)
def test_out_and_accumulate(op: str) -> None:
    shape = OUT_SHAPES[op]
    with pytest.raises(ValueError, match="accumulate=True needs an out="):
        SKETCHES[op](accumulate=True)
    with pytest.raises(ValueError, match=re.escape(f"out must have shape {shape}")):
        SKETCHES[op](out=torch.zeros(shape[0], shape[1] + 1))
    with pytest.raises(TypeError, match="out must be float32, got torch.float64"):
        SKETCHES[op](out=torch.zeros(shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be contiguous"):
        SKETCHES[op](out=torch.zeros(shape[::-1]).T)
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        SKETCHES[op](out=np.zeros(shape, dtype=np.float32))


def test_num_threads() -> None:
    with pytest.raises(ValueError, match="num_threads must be >= 1 and <= 4096, got 0"):
        ops.sketch_dense(g, 5, num_threads=0)


# ---------------------------------------------------------------------------------------------
# score_topk
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int32])
def test_score_topk_q_must_be_float32_or_bfloat16(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=f"Q must be float32 or bfloat16.*{re.escape(str(dtype))}"):
        ops.score_topk(Q.to(dtype), G, 3)


def test_score_topk_store_errors() -> None:
    with pytest.raises(ValueError, match="k differs"):
        ops.score_topk(Q, torch.zeros(10, 7), 3)
    with pytest.raises(TypeError, match="float64"):
        ops.score_topk(Q, G.double(), 3)
    with pytest.raises(TypeError, match="float64"):
        ops.score_topk(Q, np.zeros((10, 6)), 3)
    with pytest.raises(ValueError, match=re.escape("(10, 6, 1)")):
        ops.score_topk(Q, np.zeros((10, 6, 1), dtype=np.float32), 3)
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.score_topk(Q, np.zeros((6, 10), dtype=np.float32).T, 3)
    with pytest.raises(ValueError, match="contiguous"):
        ops.score_topk(Q, torch.zeros(6, 10).T, 3)
    with pytest.raises(ValueError, match=re.escape("(2, 6, 1)")):
        ops.score_topk(Q[..., None], G, 3)


def test_score_topk_argument_errors() -> None:
    with pytest.raises(ValueError, match="topk must be >= 1, got 0"):
        ops.score_topk(Q, G, 0)
    with pytest.raises(ValueError, match="index_offset must be >= 0"):
        ops.score_topk(Q, G, 3, index_offset=-1)
    with pytest.raises(ValueError, match="accumulate=True needs out="):
        ops.score_topk(Q, G, 3, accumulate=True)
    with pytest.raises(TypeError, match="exclude must hold integer ids"):
        ops.score_topk(Q, G, 3, exclude=torch.zeros(2))
    with pytest.raises(ValueError, match=re.escape("m=2, got shape (3")):
        ops.score_topk(Q, G, 3, exclude=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="'nope'"):
        ops.score_topk(Q, G, 3, backend="nope")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        ops.score_topk(Q, G, 3, backend="cuda")


def test_score_topk_out_errors() -> None:
    v, i = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="out values must be a torch.float32 tensor"):
        ops.score_topk(Q, G, 3, out=(v.double(), i))
    with pytest.raises(ValueError, match=re.escape("out indices must be a torch.int64 tensor of "
                                                   "shape (2, 3)")):
        ops.score_topk(Q, G, 3, out=(v, i[:, :2]))
    with pytest.raises(ValueError, match="contiguous"):
        ops.score_topk(Q, G, 3, out=(torch.zeros(3, 2).T, i))


@pytest.mark.cuda
def test_cuda_tensor_without_cuda_kernels_names_build_info() -> None:
    # No silent fallback: a CUDA tensor needs a CUDA kernel, or the error says how to find out.
    x = torch.zeros(3, 7, device="cuda")
    try:
        y = ops.sketch_dense(x, 5)
    except ops.BackendUnavailableError as e:
        assert "build_info" in str(e)
        with pytest.raises(ops.BackendUnavailableError, match="build_info"):
            ops.score_topk(torch.zeros(2, 5, device="cuda"), torch.zeros(4, 5, device="cuda"), 2)
    else:  # a build with CUDA kernels must then agree with the CPU
        assert torch.equal(y.cpu(), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        ops.sketch_dense(x, 5, backend="cpu")


# ---------------------------------------------------------------------------------------------
# 64-bit edges: offsets whose last column / id would overflow int64 are rejected
# ---------------------------------------------------------------------------------------------
def test_col_offset_beyond_int64_is_rejected_or_correct() -> None:
    x = torch.eye(3)
    try:
        y = ops.sketch_dense(x, 4, col_offset=2**63)
    except ValueError as e:
        assert "col_offset" in str(e)
    else:
        from issl_fast import reference

        assert torch.equal(y, reference.sketch_dense(x, 4, col_offset=2**63))


def test_index_offset_overflow_is_rejected() -> None:
    with pytest.raises(ValueError, match="index_offset"):
        v, i = ops.score_topk(torch.ones(1, 3), torch.ones(4, 3), 4, index_offset=2**63 - 2)
        assert bool((i >= 0).all()), i
