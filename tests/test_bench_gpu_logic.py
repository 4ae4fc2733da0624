"""The GPU benchmark's kernel-variants step (bench/gpu/bench_gpu.py) run on the CPU with tiny
shapes: device time on a lent GPU is scarce (minutes per session), so a Python slip in that step
must show up here, not there. The CUDA-only pieces (CUDA-event timing, the profiler, the variant
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
# A stand-in build with experimental variants (score_tma_deep, a name of the stand-in only;
# score_pace, which acts on several query blocks only; score_stack, on float32 queries only), so
# the experimental branch runs too.
NAMES = ("kron_fused", "linear_wgmma", "score_pace", "score_stack", "score_tma", "score_tma_deep",
         "score_wgmma")
DEFAULT = ("kron_fused", "linear_wgmma", "score_tma", "score_wgmma")


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _fake_switch(launches: dict[str, int], idle: set[str], sets: list[tuple[str, ...]]
                 ) -> SimpleNamespace:
    """variants / variant_launches as the step uses them: every variant switched on "launches" on
    each call of the block, except those in ``idle``; each block's set is appended to ``sets``."""

    @contextlib.contextmanager
    def variants(names: Iterable[str]) -> Iterator[None]:
        names = tuple(names)
        sets.append(names)
        for n in names:
            if n not in idle:
                launches[n] += 1
        yield

    return SimpleNamespace(
        variant_names=lambda: NAMES,
        default_variants=lambda: DEFAULT,
        experimental_variants=lambda: ("score_pace", "score_stack", "score_tma_deep"),
        variants=variants,
        variant_launches=lambda n: launches[n],
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


TINY = {"kron": (3, 70, 40, 24, 16, 16), "linear": (20, 32, 96),
        "score": (500, 64, 5, 1, 20, 80)}


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


def test_variants_step_produces_every_row(bench: ModuleType) -> None:
    launches = dict.fromkeys(NAMES, 0)
    sets: list[tuple[str, ...]] = []
    bench._cuda_ops = _fake_switch(launches, idle=set(), sets=sets)
    bench.bench_variants(mm_rate=1e11, rounds=1, sizes=TINY)
    rows = {r[0]: r for r in bench.ROWS}
    expected = ["var kron_fused kron (wall)", "var kron_fused kron (device)",
                "var linear_wgmma linear"]
    expected += [f"{tag} {name} m={m} {q} Q" for tag, name in (("var", "score_wgmma"),
                                                               ("var", "score_tma"),
                                                               ("exp", "score_tma_deep"))
                 for m in (1, 20, 80) for q in ("f32", "bf16")]
    expected += ["exp score_pace m=80 bf16 Q"]
    expected += [f"exp score_stack m={m} f32 Q" for m in (1, 20, 80)]
    for name in expected:
        assert name in rows, (name, sorted(rows))
    # score_pace paces several query blocks: nothing to time for m <= 64 (one block), nor for
    # float32 queries (their grid at m = 1024 takes two waves on an H200: never paced);
    # score_stack stacks the terms of float32 queries: nothing with bfloat16 queries.
    assert not [r for r in rows if "score_pace m=1 " in r or "score_pace m=20 " in r], rows
    assert not [r for r in rows if "score_pace" in r and "f32" in r], rows
    assert not [r for r in rows if "score_stack" in r and "bf16" in r], rows
    assert not [r for r in bench.ROWS if "FAILED" in r[5]], bench.ROWS
    # A default variant is timed against the default set without it (the portable kernel), an
    # experimental one against the default set.
    assert ("linear_wgmma", "score_tma", "score_wgmma") in sets  # without kron_fused
    assert ("kron_fused", "linear_wgmma", "score_tma") in sets  # without score_wgmma
    assert DEFAULT in sets and (*DEFAULT, "score_tma_deep") in sets
    assert rows["var score_wgmma m=1 f32 Q"][4] == "portable kernels"
    assert rows["exp score_tma_deep m=1 f32 Q"][4] == "default kernels"
    # m <= 64 is judged against the copy bandwidth, larger m against the mm rate (the m=20 row
    # here is <= 64; the m=1024 row takes the other branch).
    assert rows["exp score_tma_deep m=1 f32 Q"][6] == ">= 80% copy"
    res = bench.RESULTS["variants"]
    key = "sketch_kron B3 T70 40x24 k16x16 [kron_fused]"
    assert res[key]["rel_err"] < 1e-4 and res[key]["with_s"] > 0


def test_a_variant_that_never_launches_is_a_failed_row(bench: ModuleType) -> None:
    launches = dict.fromkeys(NAMES, 0)
    bench._cuda_ops = _fake_switch(launches, idle={"linear_wgmma"}, sets=[])
    bench.bench_variants(mm_rate=1e11, rounds=1, sizes=TINY)
    failed = [r for r in bench.ROWS if "FAILED" in r[5]]
    assert [r[0] for r in failed] == ["var sketch_linear B20 32x32 k96 [linear_wgmma]"]
    assert "never launched" in bench.RESULTS["variants"][
        "sketch_linear B20 32x32 k96 [linear_wgmma]"]["error"]


def test_dense_step_checks_and_reports_against_the_mm_rate(bench: ModuleType) -> None:
    bench.bench_dense(mm_rate=1e11, rounds=1, size=(3, 1000, 96))
    (r,) = [r for r in bench.ROWS if r[0].startswith("sketch_dense")]
    assert r[0] == "sketch_dense B3 P1000 k96" and "mm" in r[5] and r[4] == "mm + RNG blocks"
    case = bench.RESULTS["cases"]["sketch_dense"]
    assert case["check_rel_err"] < 1e-4 and case["flops"] == 2 * 3 * 1000 * 96


def test_featurize_step_checks_the_engine_and_reports_both_comparisons(
        bench: ModuleType) -> None:
    calls: list[int] = []

    def peak(fn: Callable[[], object]) -> int:
        fn()
        calls.append(1)
        return 1000 * len(calls)  # ours 1000, baseline 2000

    bench.bench_featurize(rounds=1, size=(2, 16, 32), peak_bytes=peak)
    rows = {r[0]: r for r in bench.ROWS}
    main = rows["featurize CNN 1M B2 K2 kron k16"]
    assert main[4] == "torch.func + RNG blocks" and main[5] == "mem 0.50x base"
    assert rows["  (vs one fwd+bwd of the loss)"][5].startswith("ours/floor ")
    case = bench.RESULTS["cases"]["featurize"]
    assert case["check_rel_err"] < 1e-3 and case["shape"]["dim"] > 0 and len(calls) == 2
