"""Shared fixtures: SIMD-level parametrisation, fixed seeds, the ``cuda`` marker's skip."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings
from issl_fast import _backend

SIMD_LEVELS: tuple[str, ...] = _backend.supported_simd_levels()
# The level in use at start: the best the CPU supports, unless ISSL_FAST_SIMD forced another.
START_SIMD: str = _backend.simd_level()

# Hypothesis runs the same examples every time (fixed seeds everywhere in this suite).
settings.register_profile("issl_fast", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("issl_fast")


@pytest.fixture(params=SIMD_LEVELS)
def simd(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test on each SIMD code path this CPU supports (generic, avx2, avx512), restoring
    the starting (best) level afterwards."""
    level: str = request.param
    _backend.set_simd_level(level)
    assert _backend.simd_level() == level
    try:
        yield level
    finally:
        _backend.set_simd_level(START_SIMD)


@pytest.fixture(autouse=True)
def _fixed_seed_and_best_simd() -> Iterator[None]:
    torch.manual_seed(0)
    yield
    if _backend.simd_level() != START_SIMD:  # a test that switched levels by itself
        _backend.set_simd_level(START_SIMD)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU: torch.cuda.is_available() is False "
        f"(issl_fast cuda_compiled={_backend.cuda_compiled()})"
    )
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
