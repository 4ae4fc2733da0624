"""The GPU benchmark's experimental step (bench/gpu/bench_gpu.py) run on the CPU with tiny shapes:
device time on a lent GPU is scarce (minutes per session), so a Python slip in that step must show
up here, not there. The CUDA-only pieces (CUDA-event timing, the profiler, the experimental
switch and its launch counters) are replaced by CPU stand-ins; the ops, the agreement checks and
the table rows are the real ones."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "bench_gpu.py"
NAMES = ("gemm_async_ring", "kron_fused", "linear_wgmma", "score_wgmma")


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _fake_switch(launches: dict[str, int], idle: set[str]) -> SimpleNamespace:
    """experimental_kernels / experimental_launches as the step uses them: every kernel switched
    on "launches" on each call of the block, except those in ``idle``."""

    @contextlib.contextmanager
    def experimental_kernels(names: Iterable[str]) -> Iterator[None]:
        for n in names:
            if n not in idle:
                launches[n] += 1
        yield

    return SimpleNamespace(
        experimental_kernel_names=lambda: NAMES,
        experimental_kernels=experimental_kernels,
        experimental_launches=lambda n: launches[n],
    )


def _cpu_times(fn: Callable[[], object], rounds: int, warmup: int = 1) -> list[float]:
    fn()
    out = []
    for _ in range(max(1, rounds)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _one_call(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


TINY = {"kron": (3, 70, 40, 24, 16, 16), "linear": (20, 32, 96), "score": (500, 64, 5, 1, 20)}


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    mod = _load_bench()
    monkeypatch.setattr(mod, "DEV", torch.device("cpu"))
    monkeypatch.setattr(mod, "cuda_times", _cpu_times)
    monkeypatch.setattr(mod, "kernel_breakdown", lambda name, fn, calls=3: _one_call(fn))
    monkeypatch.setattr(mod, "free", lambda: None)
    mod.RESULTS["copy_bandwidth_Bps"] = 1e11
    mod.RESULTS["cases"]["sketch_kron"] = {"two_mm_outer_s": [1e-3, 2e-3],
                                           "two_mm_outer_device_s": 1e-3}
    return mod


def test_experimental_step_produces_every_row(bench: ModuleType) -> None:
    launches = dict.fromkeys(NAMES, 0)
    bench._cuda_ops = _fake_switch(launches, idle=set())
    bench.bench_experimental(mm_rate=1e11, rounds=1, sizes=TINY)
    rows = {r[0]: r for r in bench.ROWS}
    expected = [
        "exp kron_fused kron (wall)", "exp kron_fused kron (device)",
        "exp kron_fused kron vs default (wall)", "exp gemm_async_ring kron (wall)",
        "exp linear_wgmma linear", "exp gemm_async_ring linear",
        "exp score_wgmma m=1 f32 Q", "exp score_wgmma m=1 bf16 Q",
        "exp score_wgmma m=20 f32 Q", "exp score_wgmma m=20 bf16 Q",
    ]
    for name in expected:
        assert name in rows, (name, sorted(rows))
    assert not [r for r in bench.ROWS if "FAILED" in r[5]], bench.ROWS
    # m <= 64 is judged against the copy bandwidth, larger m against the mm rate (the m=20 row
    # here is <= 64; the m=1024 row takes the other branch).
    assert rows["exp score_wgmma m=1 f32 Q"][6] == ">= 80% copy"
    exp = bench.RESULTS["experimental"]
    key = "sketch_kron B3 T70 40x24 k16x16 [kron_fused]"
    assert exp[key]["rel_err_vs_default"] < 1e-4 and exp[key]["experimental_s"] > 0


def test_a_kernel_that_never_launches_is_a_failed_row(bench: ModuleType) -> None:
    launches = dict.fromkeys(NAMES, 0)
    bench._cuda_ops = _fake_switch(launches, idle={"linear_wgmma"})
    bench.bench_experimental(mm_rate=1e11, rounds=1, sizes=TINY)
    failed = [r for r in bench.ROWS if "FAILED" in r[5]]
    assert [r[0] for r in failed] == ["exp sketch_linear B20 32x32 k96 [linear_wgmma]"]
    assert "never launched" in bench.RESULTS["experimental"][
        "sketch_linear B20 32x32 k96 [linear_wgmma]"]["error"]
