"""``issl-fast bench``: a quick check of this build's CPU kernels on this machine.

Times three kernels (sketch_linear in two shapes: one position per example, and many, as
in a convolution) against the pure-PyTorch code a user would write instead
(:mod:`.baselines`), after checking the kernels' results (against the reference, and for whole
sketches against another kernel or the baseline), and reports each as a
speed-up over its baseline and as a fraction of this machine's limits, measured in the same
run: the fp32 ``torch.mm`` rate and the memory bandwidth of a ``c = a + b`` triad. Times are
medians of a few rounds. A kernel timed above 100% of a limit did not beat the machine: the
limit or its own time was disturbed (other work on the machine, a clock change between the two
measurements); such a case is flagged (``above_limit``) and the table marks it instead of
printing it as a fact. The full suite, with the targets and memory figures, is
``python -m pytest bench/`` in the source tree (``bench/README.md``); the GPU one is
``bench/gpu/run.sh``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import baselines, ops, reference

# Columns of a k-column sketch checked against the reference (they depend on k only through
# 1/sqrt(k), so a k=CHECK_COLS reference checks them without building the whole matrix); all
# k columns are then checked against the dense sketch of the materialised gradient (the same
# matrix, another kernel).
CHECK_COLS = 64
# Worst relative error (of a row's norm) accepted between a kernel and its check (float32
# kernels: ~5e-7 measured on AVX-512, AVX2 and generic code).
CHECK_RTOL = 1e-4
# The table's mark on a case above 100% of its limit (a disturbed measurement, not a rate).
ABOVE_LIMIT_MARK = "!"


@dataclass
class Case:
    """One kernel against its baseline: median seconds, speed-up, and the fraction of the
    machine limit the kernel reached (``limit``: "gemm" or "bandwidth"); ``above_limit``: that
    fraction is over 1, which no kernel reaches: the measurement was disturbed."""

    op: str
    shape: str
    ours_s: float
    baseline: str
    baseline_s: float
    speedup: float
    limit: str
    fraction_of_limit: float
    max_rel_err: float
    above_limit: bool = field(init=False)

    def __post_init__(self) -> None:
        self.above_limit = bool(self.fraction_of_limit > 1.0)


def median_time(fn: Callable[[], Any], rounds: int, warmup: int = 1) -> float:
    """Median wall time (seconds) of ``rounds`` (>= 1) calls after ``warmup`` calls."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_limits(rounds: int, quick: bool) -> dict[str, float]:
    """fp32 ``torch.mm`` rate (FLOP/s) and triad bandwidth (bytes/s), measured now."""
    n = 512 if quick else 1536
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm = 2 * n**3 / median_time(lambda: torch.mm(a, b), rounds)
    size = (1 << 22) if quick else (1 << 25)  # floats per array (16 MiB / 128 MiB)
    x, y, z = (torch.randn(size, dtype=torch.float32), torch.randn(size, dtype=torch.float32),
               torch.empty(size, dtype=torch.float32))
    bandwidth = 3 * 4 * size / median_time(lambda: torch.add(x, y, out=z), rounds)
    return {"gemm_flops": gemm, "bandwidth_bytes": bandwidth}


def _row_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    err = (ours.double() - ref.double()).norm(dim=1) / ref.double().norm(dim=1).clamp(min=1e-30)
    return float(err.max())


def _leading_cols(y: torch.Tensor, k: int) -> torch.Tensor:
    """The first CHECK_COLS sketch columns, at the scale of a CHECK_COLS-column sketch."""
    return y[:, :CHECK_COLS].double() * math.sqrt(k / CHECK_COLS)


def _linear_case(B: int, T: int, d_in: int, d_out: int, k: int, shape: str, rounds: int,
                 threads: int, limits: dict) -> Case:
    gen = torch.Generator().manual_seed(0)
    A, D = torch.randn(B, T, d_in, generator=gen), torch.randn(B, T, d_out, generator=gen)
    ours = ops.sketch_linear(A, D, k, seed=0, backend="cpu", num_threads=threads)
    ref = reference.sketch_linear(A.double(), D.double(), CHECK_COLS, seed=0,
                                  accum=torch.float64)
    G = torch.einsum("bto,bti->boi", D, A).reshape(B, -1)
    dense = ops.sketch_dense(G, k, seed=0, backend="cpu", num_threads=threads)
    err = max(_row_rel_err(_leading_cols(ours, k), ref), _row_rel_err(ours, dense))
    blocks = baselines.TorchRademacherBlocks(d_in * d_out, baselines.DENSE_BLOCK)
    t_ours = median_time(lambda: ops.sketch_linear(A, D, k, seed=0, backend="cpu",
                                                   num_threads=threads), rounds)
    t_base = median_time(lambda: baselines.linear_baseline(A, D, k, blocks), rounds)
    flops = 2 * B * d_in * d_out * (k + T)  # (+ forming G: 2 B T d_in d_out)
    return Case("sketch_linear", shape, t_ours, "einsum G + torch RNG blocks", t_base,
                t_base / t_ours, "gemm", flops / t_ours / limits["gemm_flops"], err)


def bench_linear(rounds: int, quick: bool, threads: int, limits: dict) -> Case:
    B, d, k = (8, 128, 1024) if quick else (32, 256, 2048)
    return _linear_case(B, 1, d, d, k, f"B={B} {d}x{d} k={k} fp32", rounds, threads, limits)


def bench_linear_positions(rounds: int, quick: bool, threads: int, limits: dict) -> Case:
    """Many positions per example (a convolution's output pixels): forming G dominates."""
    B, T, d_in, d_out, k = (4, 256, 256, 64, 512) if quick else (8, 2048, 512, 128, 1024)
    return _linear_case(B, T, d_in, d_out, k, f"B={B} T={T} {d_out}x{d_in} k={k} fp32",
                        rounds, threads, limits)


def bench_kron(rounds: int, quick: bool, threads: int, limits: dict) -> Case:
    B, T, d, kk = (16, 16, 128, 16) if quick else (64, 64, 512, 64)
    gen = torch.Generator().manual_seed(1)
    A, D = torch.randn(B, T, d, generator=gen), torch.randn(B, T, d, generator=gen)
    p_in, p_out = (torch.from_numpy(p).float()
                   for p in reference.kron_matrices(0, d, d, kk, kk))
    ours = ops.sketch_kron(A, D, kk, kk, seed=0, backend="cpu", num_threads=threads)
    err = _row_rel_err(ours, reference.sketch_kron(A.double(), D.double(), kk, kk, seed=0,
                                                   accum=torch.float64))
    t_ours = median_time(lambda: ops.sketch_kron(A, D, kk, kk, seed=0, backend="cpu",
                                                 num_threads=threads), rounds)
    t_base = median_time(lambda: baselines.kron_baseline(A, D, p_in, p_out), rounds)
    flops = 2 * B * T * (d * kk + d * kk + kk * kk)
    return Case("sketch_kron", f"B={B} T={T} {d}x{d} k={kk}x{kk} fp32", t_ours,
                "2 mm + einsum (matrices cached)", t_base, t_base / t_ours, "gemm",
                flops / t_ours / limits["gemm_flops"], err)


def bench_score_topk(rounds: int, quick: bool, threads: int, limits: dict) -> Case:
    n, k, m, topk = ((1 << 16), 256, 1, 10) if quick else ((1 << 18), 512, 1, 10)
    gen = torch.Generator().manual_seed(2)
    G = torch.empty(n, k, dtype=torch.float16)
    for r in range(0, n, 1 << 14):  # (no float32 copy of the whole store)
        G[r:r + (1 << 14)] = torch.randn(min(1 << 14, n - r), k, generator=gen)
    Q = torch.randn(m, k, generator=gen)
    values, rows = ops.score_topk(Q, G, topk, backend="cpu", num_threads=threads)
    # the same top rows as the float32 products of the fp16 store (no ties in random data)
    want, want_rows = baselines.topk_baseline(Q, G, topk)
    err = _row_rel_err(values, want) if torch.equal(rows, want_rows) else math.inf
    t_ours = median_time(lambda: ops.score_topk(Q, G, topk, backend="cpu",
                                                num_threads=threads), rounds)
    t_base = median_time(lambda: baselines.topk_baseline(Q, G, topk), rounds)
    return Case("score_topk", f"n={n} k={k} fp16 store, m={m} top{topk}", t_ours,
                "upcast chunks + mm + topk", t_base, t_base / t_ours, "bandwidth",
                n * k * 2 / t_ours / limits["bandwidth_bytes"], err)


def run(rounds: int = 5, quick: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Measures the machine's limits, then each kernel against its baseline; raises
    ``RuntimeError`` if a kernel disagrees with the reference."""
    if threads is None:
        threads = torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    # (the other work on the machine as the run starts: what a fraction above 1 is read against)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the baselines get the same threads as the kernels
    try:
        limits = machine_limits(rounds, quick)
        cases = [bench(rounds, quick, threads, limits)
                 for bench in (bench_linear, bench_linear_positions, bench_kron,
                               bench_score_topk)]
    finally:
        torch.set_num_threads(previous)
    wrong = [c for c in cases if not c.max_rel_err <= CHECK_RTOL]
    if wrong:
        raise RuntimeError("kernel results disagree with the reference: " + ", ".join(
            f"{c.op} (max row error {c.max_rel_err:.2e})" for c in wrong))
    return {"threads": threads, "rounds": rounds, "quick": quick, "limits": limits,
            "load_average_1min": load, "cpus": os.cpu_count(),
            "above_limit": any(c.above_limit for c in cases),
            "cases": [asdict(c) for c in cases]}


def format_table(result: dict[str, Any]) -> str:
    lim = result["limits"]
    lines = [f"issl-fast bench: {result['threads']} threads, median of {result['rounds']}; "
             f"this machine now: fp32 mm {lim['gemm_flops'] / 1e9:.0f} GFLOP/s, "
             f"triad {lim['bandwidth_bytes'] / 1e9:.1f} GB/s"
             + ("" if result.get("load_average_1min") is None else
                f"; load average {result['load_average_1min']:.1f} on {result.get('cpus')} CPUs"),
             f"{'op':<14}{'shape':<38}{'ours ms':>9}{'base ms':>10}{'speed-up':>10}"
             f"{'of limit':>10}  baseline"]
    if result["quick"]:
        lines.insert(1, "(--quick: sizes small enough to sit in cache; the fractions of the "
                        "limits are indicative only)")
    # (results saved before the flag existed carry no "above_limit": read it off the fraction)
    above = [c.get("above_limit", c["fraction_of_limit"] > 1) for c in result["cases"]]
    for c, flagged in zip(result["cases"], above):
        mark = ABOVE_LIMIT_MARK if flagged else " "
        lines.append(f"{c['op']:<14}{c['shape']:<38}{c['ours_s'] * 1e3:>9.1f}"
                     f"{c['baseline_s'] * 1e3:>10.1f}{c['speedup']:>9.1f}x"
                     f"{c['fraction_of_limit']:>9.0%}{mark} {c['limit'][:4]}  {c['baseline']}")
    if any(above):
        load = result.get("load_average_1min")
        busy = ("" if load is None else
                f" (load average {load:.1f} on {result.get('cpus')} CPUs as the run started)")
        lines.append(f"{ABOVE_LIMIT_MARK} above 100% of the limit measured in this run: not a "
                     "real rate but a disturbed measurement; the machine was busy" + busy
                     + " or its clock changed between the limit and the kernel's timing"
                     + (", or the --quick data sat in cache" if result["quick"] else "")
                     + ". Rerun on an idle machine.")
    return "\n".join(lines)
