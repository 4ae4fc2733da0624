"""Deterministic test inputs.

``dyadic`` values (multiples of 1/32 with at most 8 significant bits, |x| <= 255/32) are exactly
representable in float32, float16 and bfloat16, so one float64 reference serves all three input
dtypes and a dtype test checks the kernel's half-precision paths (strides, conversion) rather
than the rounding of the data. Full-range conversions are tested exhaustively in
``test_sketch_dense.py::test_half_precision_inputs_convert_exactly``.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = tuple(DTYPES)
DISTS = ("rademacher", "gaussian")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal float32 tensor from a fixed seed."""
    return torch.randn(shape, generator=generator(seed), dtype=torch.float32)


def dyadic(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random values exact in every input dtype (see the module docstring), as ``dtype``."""
    x = (randn(shape, seed) * 32).round().clamp(-255, 255) / 32
    y = x.to(dtype)
    assert torch.equal(y.to(torch.float32), x), "dyadic inputs must convert exactly"
    return y
