"""Canary for GPU runs: with ISSL_FAST_REQUIRE_CUDA=1 (bench/gpu/run.sh sets it) a missing CUDA
backend or device FAILS the run instead of letting every ``cuda`` test skip silently.

Not marked ``cuda``, so it runs everywhere: it checks the build and a device when either the
variable asks for them or a GPU is present, and is skipped (with the reason shown by ``-rs``)
only when neither is the case.
"""

from __future__ import annotations

import math
import os

import issl_fast
import pytest
import torch
from issl_fast import ops, reference


def test_cuda_backend_present_when_required_or_gpu_visible() -> None:
    required = os.environ.get("ISSL_FAST_REQUIRE_CUDA") == "1"
    gpu = torch.cuda.is_available()
    info = issl_fast.build_info()
    if not required and not gpu:
        pytest.skip("no GPU visible and ISSL_FAST_REQUIRE_CUDA is unset: nothing to check "
                    f"(cuda_compiled={info['cuda_compiled']}, cuda_error={info['cuda_error']})")
    if not required and not info["cuda_compiled"]:
        pytest.skip("a GPU is visible but this build has no CUDA kernels (built with "
                    "ISSL_FAST_CUDA=OFF or without nvcc); set ISSL_FAST_REQUIRE_CUDA=1 to fail")
    why = "ISSL_FAST_REQUIRE_CUDA=1" if required else "a GPU is visible"
    assert info["cuda_compiled"], f"{why}, but issl_fast was built without CUDA kernels: {info}"
    assert gpu, f"{why}, but torch sees no CUDA device (torch {torch.__version__}): {info}"
    assert info["cuda_devices"] >= 1 and issl_fast.has_cuda(), (
        f"{why}, but issl_fast's CUDA runtime finds no usable device: {info}"
    )
    # A real op on the device: one-hot rows reveal the random matrix exactly.
    k = 70
    y = ops.sketch_dense(torch.eye(5, device="cuda"), k, seed=3, col_offset=2**33)
    assert y.device.type == "cuda"
    R = torch.from_numpy(reference.random_matrix(3, k, 2**33, 2**33 + 5)).T.to(torch.float32)
    assert torch.equal(y.cpu(), R * torch.tensor(1 / math.sqrt(k), dtype=torch.float32))
