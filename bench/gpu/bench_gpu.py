"""GPU benchmarks of issl_fast's CUDA ops against the issue-5 targets, with the device's limits
measured in the same run. Run by bench/gpu/run.sh; standalone: ``python bench/gpu/bench_gpu.py
--out DIR``. Writes DIR/bench.json (every figure) and DIR/table.txt (the summary, also printed).

Limits (measured here, on random data, never zeros): device-to-device copy bandwidth (bytes read
plus written per second, ``y.copy_(x)`` of 2 GiB) and the dense bf16 matrix rate (``torch.mm`` of
8192^3). Every op is checked against an exact computation before it is timed. Times are medians of
CUDA-event timings after warm-up.

Targets (issue 5): sketch_linear (B=256, T=1, 1024x1024, k=4096, bf16) >= 50% of the bf16 rate,
counting 2 B P k flops; sketch_kron <= 1.5x the time of the two torch.mm calls plus their outer
product; score_topk (n=4e6, k=1024, bf16 resident, topk=100) >= 80% of the copy bandwidth for
m <= 64 (counting the n k 2 bytes of the store) and >= 50% of the bf16 rate for m=1024.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import issl_fast
import numpy as np
import torch
from issl_fast import _cuda_ops, ops, reference

DEV = torch.device("cuda")
RESULTS: dict[str, Any] = {"cases": {}}
ROWS: list[list[str]] = []


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# A benchmark repeats a call at most this long in total (slow kernels get fewer rounds, so the
# whole run stays inside run.sh's time limit).
MAX_CASE_SECONDS = 25.0


def cuda_times(fn: Callable[[], object], rounds: int, warmup: int = 1) -> list[float]:
    """Seconds per call, one CUDA-event pair around each call."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) / max(1, warmup)
    rounds = max(1, min(rounds, int(MAX_CASE_SECONDS / max(first, 1e-9))))
    out = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def kernel_breakdown(name: str, fn: Callable[[], object], calls: int = 3) -> float:
    """Logs (and records) the device time of each kernel one call of ``fn`` launches: where the
    time goes, without hardware counters (torch.profiler's CUDA activity, mean of ``calls``).
    Returns the summed kernel time of one call in seconds (launch gaps excluded)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0.0)
        if t > 0:
            per[ev.key] = [t / calls / 1e3, ev.count / calls]
    top = sorted(per.items(), key=lambda kv: -kv[1][0])[:8]
    RESULTS.setdefault("kernels", {})[name] = {k: v for k, v in top}
    parts = ", ".join(f"{k[:60]} {v[0]:.3f} ms x{v[1]:g}" for k, v in top)
    log(f"{name} kernels per call: {parts}")
    return sum(v[0] for v in per.values()) / 1e3


def free() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def row(
    case: str,
    ours: float,
    base: float | None,
    base_name: str,
    metric: str,
    target: str,
    ok: bool | None,
) -> None:
    ROWS.append(
        [
            case,
            f"{ours * 1e3:.3f}",
            "-" if base is None else f"{base * 1e3:.3f}",
            "-" if base is None else f"{base / ours:.2f}",
            base_name,
            metric,
            target,
            "-" if ok is None else ("PASS" if ok else "FAIL"),
        ]
    )


def table() -> str:
    head = ["case", "ours ms", "base ms", "base/ours", "baseline", "metric", "target", ""]
    rows = [head] + ROWS
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows of ||ours - ref|| / ||ref||."""
    ours, ref = ours.double(), ref.double()
    num = (ours - ref).norm(dim=-1)
    den = ref.norm(dim=-1).clamp_min(1e-300)
    return float((num / den).max())


# ---------------------------------------------------------------------------------------------
# machine limits
# ---------------------------------------------------------------------------------------------
def limits(rounds: int) -> tuple[float, float]:
    x = torch.randn(512 * 2**20, device=DEV)  # 2 GiB of float32
    y = torch.empty_like(x)
    t = med(cuda_times(lambda: y.copy_(x), rounds, warmup=2))
    copy_bw = 2 * x.numel() * 4 / t
    x = y = None  # noqa: F841 (frees the buffers)
    free()
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=DEV, dtype=torch.bfloat16)
    t = med(cuda_times(lambda: torch.mm(a, b, out=c), rounds, warmup=3))
    mm_rate = 2 * n**3 / t
    a = b = c = None  # noqa: F841
    free()
    log(
        f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write), bf16 mm "
        f"{mm_rate / 1e12:.0f} TFLOP/s"
    )
    RESULTS["copy_bandwidth_Bps"] = copy_bw
    RESULTS["bf16_mm_flops"] = mm_rate
    return copy_bw, mm_rate


# ---------------------------------------------------------------------------------------------
# sketch_linear
# ---------------------------------------------------------------------------------------------
def check_linear(A: torch.Tensor, D: torch.Tensor, y: torch.Tensor, k: int, what: str
                 ) -> tuple[float, torch.Tensor]:
    """Rows j < 64 of the sketch ``y`` against an explicit 64-row matrix (they come from hash
    word 0 alone, so it pins them); returns the error and the float32 G ``[B, P]``."""
    B, P = A.shape[0], A.shape[2] * D.shape[2]
    G = torch.einsum("bto,bti->boi", D.float(), A.float()).reshape(B, P)
    R64 = torch.from_numpy(reference.random_matrix(1, 64, 0, P)).to(DEV, torch.float32)
    err = rel_err(y[:, :64], (G @ R64.T) / math.sqrt(k))
    log(f"{what} check: max row rel err {err:.2e} (first 64 sketch rows)")
    assert err < 1e-4, f"{what} disagrees with the explicit matrix: {err}"
    return err, G


def torch_linear(A: torch.Tensor, D: torch.Tensor, k: int) -> torch.Tensor:
    """The pure-PyTorch baseline: materialise G, regenerate R per call in column blocks of
    65536 (TRAK-style)."""
    B, P = A.shape[0], A.shape[2] * D.shape[2]
    g = torch.einsum("bto,bti->boi", D, A).reshape(B, P)
    acc = torch.zeros(B, k, device=DEV)
    cb = 1 << 16
    for c0 in range(0, P, cb):
        r = torch.empty(k, min(cb, P - c0), device=DEV, dtype=torch.bfloat16).bernoulli_(0.5)
        r.mul_(2).sub_(1)
        acc += (g[:, c0 : c0 + cb] @ r.T).float()
    return acc / math.sqrt(k)


def bench_linear(mm_rate: float, rounds: int) -> None:
    B, T, d, k = 256, 1, 1024, 4096
    P = d * d
    flops = 2 * B * P * k
    A = torch.randn(B, T, d, device=DEV, dtype=torch.bfloat16)
    D = torch.randn(B, T, d, device=DEV, dtype=torch.bfloat16)
    y = ops.sketch_linear(A, D, k, seed=1)
    err, G = check_linear(A, D, y, k, "sketch_linear")
    free()
    t_ours = cuda_times(lambda: ops.sketch_linear(A, D, k, seed=1, out=y), rounds)
    kernel_breakdown("sketch_linear", lambda: ops.sketch_linear(A, D, k, seed=1, out=y), 1)
    # torch.mm of the same shape with the whole random matrix stored (8 GiB of bf16).
    Gb = G.to(torch.bfloat16)
    G = None  # noqa: F841
    free()
    Rt = torch.empty(P, k, device=DEV, dtype=torch.bfloat16).bernoulli_(0.5).mul_(2).sub_(1)
    out = torch.empty(B, k, device=DEV, dtype=torch.bfloat16)
    t_mm = cuda_times(lambda: torch.mm(Gb, Rt, out=out), rounds)
    Rt = out = None  # noqa: F841 (8 GiB back before the baseline)
    free()

    t_base = cuda_times(lambda: torch_linear(A, D, k), max(2, rounds - 1))
    to, tm, tb = med(t_ours), med(t_mm), med(t_base)
    frac = flops / to / mm_rate
    RESULTS["cases"]["sketch_linear"] = {
        "shape": dict(B=B, T=T, d_in=d, d_out=d, k=k, dtype="bfloat16"),
        "flops": flops,
        "ours_s": t_ours,
        "mm_same_shape_s": t_mm,
        "baseline_s": t_base,
        "check_rel_err": err,
        "ours_flops": flops / to,
        "fraction_of_mm_rate": frac,
        "mm_same_shape_flops": flops / tm,
    }
    log(
        f"sketch_linear: ours {to:.3f} s = {flops / to / 1e12:.0f} TFLOP/s ({frac:.0%} of mm), "
        f"torch.mm same shape {tm:.3f} s, pure-PyTorch {tb:.3f} s"
    )
    row(
        "sketch_linear B256 1024x1024 k4096",
        to,
        tb,
        "einsum+RNG blocks",
        f"{flops / to / 1e12:.0f} TF/s = {frac:.0%} mm",
        ">= 50% mm",
        frac >= 0.5,
    )
    row("  (torch.mm, R stored 8 GiB)", tm, None, "-", f"{flops / tm / 1e12:.0f} TF/s", "-", None)
    free()


def bench_linear_positions(mm_rate: float, rounds: int) -> None:
    """Many positions per example (a 1-D conv layer over one second of 16 kHz audio, bf16): the
    chunked route, G formed by the tiled kernel (T >= 8), then the dense sketch. No target:
    reported against the pure-PyTorch pipeline and as a fraction of the bf16 mm rate."""
    B, T, d_in, d_out, k = 8, 4797, 768, 256, 1024
    P = d_in * d_out
    flops = 2 * B * T * P + 2 * B * P * k
    A = torch.randn(B, T, d_in, device=DEV, dtype=torch.bfloat16)
    D = torch.randn(B, T, d_out, device=DEV, dtype=torch.bfloat16)
    y = ops.sketch_linear(A, D, k, seed=1)
    err, _ = check_linear(A, D, y, k, f"sketch_linear (T={T})")
    free()
    t_ours = cuda_times(lambda: ops.sketch_linear(A, D, k, seed=1, out=y), rounds)
    kernel_breakdown("sketch_linear T4797", lambda: ops.sketch_linear(A, D, k, seed=1, out=y), 1)

    t_base = cuda_times(lambda: torch_linear(A, D, k), max(2, rounds - 1))
    to, tb = med(t_ours), med(t_base)
    RESULTS["cases"]["sketch_linear_positions"] = {
        "shape": dict(B=B, T=T, d_in=d_in, d_out=d_out, k=k, dtype="bfloat16"),
        "flops": flops, "ours_s": t_ours, "baseline_s": t_base, "check_rel_err": err,
        "fraction_of_mm_rate": flops / to / mm_rate}
    log(f"sketch_linear T={T}: ours {to:.4f} s ({flops / to / mm_rate:.1%} of mm), "
        f"pure-PyTorch {tb:.4f} s")
    row(f"sketch_linear B{B} T{T} {d_out}x{d_in} k{k}", to, tb, "einsum+RNG blocks",
        f"{flops / to / 1e12:.1f} TF/s = {flops / to / mm_rate:.0%} mm", "-", None)
    free()


# ---------------------------------------------------------------------------------------------
# sketch_kron
# ---------------------------------------------------------------------------------------------
def bench_kron(rounds: int) -> None:
    B, T, d_in, d_out, k_in, k_out = 64, 256, 1024, 1024, 64, 64
    A = torch.randn(B, T, d_in, device=DEV, dtype=torch.bfloat16)
    D = torch.randn(B, T, d_out, device=DEV, dtype=torch.bfloat16)
    y = ops.sketch_kron(A, D, k_in, k_out, seed=2)
    ref = reference.sketch_kron(A[:2].cpu(), D[:2].cpu(), k_in, k_out, seed=2, accum=torch.float64)
    err = rel_err(y[:2].cpu(), ref)
    log(f"sketch_kron check: max row rel err {err:.2e}")
    assert err < 1e-4, f"sketch_kron disagrees with the reference: {err}"
    p_in, p_out = reference.kron_matrices(2, d_in, d_out, k_in, k_out)
    Pin = (torch.from_numpy(p_in) / math.sqrt(k_in)).to(DEV, torch.bfloat16)
    Pout = (torch.from_numpy(p_out) / math.sqrt(k_out)).to(DEV, torch.bfloat16)

    def two_mm_and_outer() -> torch.Tensor:
        U = torch.mm(A.view(-1, d_in), Pin.T).view(B, T, k_in)
        V = torch.mm(D.view(-1, d_out), Pout.T).view(B, T, k_out)
        return torch.bmm(V.transpose(1, 2), U)

    def baseline_rng() -> torch.Tensor:  # the same with the projections drawn per call
        pi = torch.empty(k_in, d_in, device=DEV, dtype=torch.bfloat16).bernoulli_(0.5)
        po = torch.empty(k_out, d_out, device=DEV, dtype=torch.bfloat16).bernoulli_(0.5)
        U = torch.mm(A.view(-1, d_in), pi.mul_(2).sub_(1).T).view(B, T, k_in)
        V = torch.mm(D.view(-1, d_out), po.mul_(2).sub_(1).T).view(B, T, k_out)
        return torch.bmm(V.transpose(1, 2).float(), U.float())

    t_ours = cuda_times(lambda: ops.sketch_kron(A, D, k_in, k_out, seed=2, out=y), rounds * 5)
    # The baseline is three short kernels whose wall time is mostly launch gaps (it varied from
    # 0.07 to 0.14 ms between runs): the kernels' device time is compared too.
    dev_ours = kernel_breakdown(
        "sketch_kron", lambda: ops.sketch_kron(A, D, k_in, k_out, seed=2, out=y)
    )
    dev_mm = max(kernel_breakdown("sketch_kron torch", two_mm_and_outer), 1e-9)
    t_mm = cuda_times(two_mm_and_outer, rounds * 5)
    t_rng = cuda_times(baseline_rng, rounds * 5)
    to, tm, tr = med(t_ours), med(t_mm), med(t_rng)
    ratio = to / tm
    RESULTS["cases"]["sketch_kron"] = {
        "shape": dict(B=B, T=T, d_in=d_in, d_out=d_out, k_in=k_in, k_out=k_out, dtype="bfloat16"),
        "ours_s": t_ours,
        "two_mm_outer_s": t_mm,
        "baseline_rng_s": t_rng,
        "check_rel_err": err,
        "ours_over_two_mm_outer": ratio,
    }
    log(
        f"sketch_kron: ours {to * 1e3:.3f} ms, 2 mm + outer {tm * 1e3:.3f} ms "
        f"(ours/that {ratio:.2f}), with RNG {tr * 1e3:.3f} ms"
    )
    row(
        f"sketch_kron B{B} T{T} {d_in}x{d_out} k{k_in}x{k_out}",
        to,
        tm,
        "2 mm + bmm (P cached)",
        f"ours/base {ratio:.2f}",
        "<= 1.5",
        ratio <= 1.5,
    )
    row(
        "  (device time of the kernels)",
        dev_ours,
        dev_mm,
        "2 mm + bmm kernels",
        f"ours/base {dev_ours / dev_mm:.2f}",
        "<= 1.5",
        dev_ours / dev_mm <= 1.5,
    )
    RESULTS["cases"]["sketch_kron"]["device_time_ratio"] = dev_ours / dev_mm
    RESULTS["cases"]["sketch_kron"]["two_mm_outer_device_s"] = dev_mm
    row("  (pure PyTorch, P drawn per call)", to, tr, "2 mm + bmm + RNG", "-", "-", None)
    free()


# ---------------------------------------------------------------------------------------------
# kernel variants (issl_fast._cuda_ops.variants): each against the kernel it replaces in the same
# step, after the main benchmarks (a broken experimental one cannot spoil those). The default
# variants are timed against the portable kernels (what GPUs without them run); the experimental
# ones against the default set, with the targets.
# ---------------------------------------------------------------------------------------------
def timed_variant(
    label: str, names: list[str], must_launch: list[str], fn: Callable[[], torch.Tensor],
    rounds: int,
) -> tuple[float, float, torch.Tensor]:
    """(median wall s, device s per call, result) of ``fn`` with exactly ``names`` switched on;
    raises if one of ``must_launch`` never launched (the call fell back to another kernel)."""
    before = {n: _cuda_ops.variant_launches(n) for n in must_launch}
    with _cuda_ops.variants(names):
        got = fn().clone()
        t = med(cuda_times(fn, rounds))
        dev = kernel_breakdown(f"{label} [{'+'.join(names) or 'portable'}]", fn)
    idle = [n for n in must_launch if _cuda_ops.variant_launches(n) == before[n]]
    if idle:
        raise RuntimeError(f"kernel variant(s) {idle} never launched for {label}")
    return t, dev, got


def compare_variant(
    label: str, name: str, fn: Callable[[], torch.Tensor], rounds: int
) -> tuple[float, float, float, float] | None:
    """The kernel ``name`` replaces vs ``name``: (base wall, base device, variant wall, variant
    device) seconds, or None when the variant fails or disagrees (logged and recorded). A default
    variant's base is the default set without it; an experimental one's, the default set."""
    default = list(_cuda_ops.default_variants())
    if name in default:
        base = [n for n in default if n != name]
        test = default
    else:
        base = default
        test = default + [name]
    key = f"{label} [{name}]"
    try:
        t0, d0, y0 = timed_variant(label, base, [], fn, rounds)
        t1, d1, y1 = timed_variant(label, test, [name], fn, rounds)
        err = rel_err(y1, y0)
        log(f"{key}: without {t0 * 1e3:.3f} ms (device {d0 * 1e3:.3f}), with {t1 * 1e3:.3f} ms "
            f"(device {d1 * 1e3:.3f}), rel err {err:.1e}")
        if not err < 1e-4:
            raise AssertionError(f"result differs from the replaced kernel's: rel err {err:.2e}")
    except Exception as exc:  # record and go on: the main rows are already in the table
        log(f"{key} FAILED: {exc!r}")
        RESULTS.setdefault("variants", {})[key] = {"error": repr(exc)}
        row(f"{_tag(name)} {key}", float("nan"), None, "-", f"FAILED: {type(exc).__name__}", "-",
            False)
        return None
    RESULTS.setdefault("variants", {})[key] = {
        "without_s": t0, "without_device_s": d0, "with_s": t1, "with_device_s": d1,
        "rel_err": err}
    return t0, d0, t1, d1


def _acts_on(name: str, m: int, qname: str) -> bool:
    """Whether score variant ``name`` changes anything for m queries of this kind (score_pace
    paces the query blocks of a partition: none with one block, m <= 64, and only when the whole
    grid is resident at once: float32 queries at m = 1024 take two waves on an H200, so only
    bfloat16 queries; score_stack stacks the three terms of float32 queries: one term with
    bfloat16 queries)."""
    if name == "score_pace":
        return m > 64 and qname == "bf16 Q"
    if name == "score_stack":
        return qname == "f32 Q"
    return True


def _tag(name: str) -> str:
    """Row prefix: ``var`` for a default variant (vs the portable kernel), ``exp`` for an
    experimental one (vs the default set)."""
    return "var" if name in _cuda_ops.default_variants() else "exp"


def _base(name: str) -> str:
    return "portable kernels" if name in _cuda_ops.default_variants() else "default kernels"


# The benchmark shapes; tests pass tiny ones to check this step's logic on the CPU.
VARIANT_SIZES: dict[str, tuple[int, ...]] = {
    "kron": (64, 256, 1024, 1024, 64, 64),  # B, T, d_in, d_out, k_in, k_out
    "linear": (256, 1024, 4096),  # B, d (= d_in = d_out), k
    "score": (4_000_000, 1024, 100, 1, 16, 64, 1024),  # n, k, topk, then the m values
}


def _of_op(op: str) -> list[str]:
    """The variants of one op (named ``<op>_...``), default ones first."""
    default = _cuda_ops.default_variants()
    names = [n for n in _cuda_ops.variant_names() if n.startswith(op + "_")]
    return sorted(names, key=lambda n: (n not in default, n))


def bench_variants(
    mm_rate: float, rounds: int, sizes: dict[str, tuple[int, ...]] = VARIANT_SIZES
) -> None:
    log(f"kernel variants in this build: default {_cuda_ops.default_variants()}, "
        f"experimental {_cuda_ops.experimental_variants()}")
    B, T, d_in, d_out, k_in, k_out = sizes["kron"]
    A = torch.randn(B, T, d_in, device=DEV, dtype=torch.bfloat16)
    D = torch.randn(B, T, d_out, device=DEV, dtype=torch.bfloat16)
    y = torch.empty(B, k_in * k_out, device=DEV)
    case = f"sketch_kron B{B} T{T} {d_in}x{d_out} k{k_in}x{k_out}"
    for name in _of_op("kron"):
        r = compare_variant(case, name,
                            lambda: ops.sketch_kron(A, D, k_in, k_out, seed=2, out=y), rounds * 5)
        if r is not None:
            t0, d0, t1, d1 = r
            row(f"{_tag(name)} {name} kron (wall)", t1, t0, _base(name),
                f"speedup {t0 / t1:.2f}", "-", None)
            row(f"{_tag(name)} {name} kron (device)", d1, d0, _base(name),
                f"speedup {d0 / d1:.2f}", "-", None)
    A = D = y = None  # noqa: F841
    free()

    B, d, k = sizes["linear"]
    flops = 2 * B * d * d * k
    A = torch.randn(B, 1, d, device=DEV, dtype=torch.bfloat16)
    D = torch.randn(B, 1, d, device=DEV, dtype=torch.bfloat16)
    y = torch.empty(B, k, device=DEV)
    for name in _of_op("linear"):
        r = compare_variant(f"sketch_linear B{B} {d}x{d} k{k}", name,
                            lambda: ops.sketch_linear(A, D, k, seed=1, out=y), rounds)
        if r is not None:
            t0, _, t1, _ = r
            frac = flops / t1 / mm_rate
            row(f"{_tag(name)} {name} linear", t1, t0, _base(name),
                f"{flops / t1 / 1e12:.0f} TF/s = {frac:.0%} mm", ">= 50% mm", frac >= 0.5)
    A = D = y = None  # noqa: F841
    free()

    # score_topk: m <= 64 against the copy bandwidth, m = 1024 against the bf16 mm rate, float32
    # and bfloat16 queries (the values of the top-k are compared).
    n, k, topk, *ms = sizes["score"]
    G = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
    copy_bw = RESULTS["copy_bandwidth_Bps"]
    for m in ms:
        Q = torch.randn(m, k, device=DEV)
        for qname, Qx in (("f32 Q", Q), ("bf16 Q", Q.to(torch.bfloat16))):
            for name in (v for v in _of_op("score") if _acts_on(v, m, qname)):
                r = compare_variant(f"score_topk m={m} {qname}", name,
                                    lambda Qx=Qx: ops.score_topk(Qx, G, topk)[0],
                                    rounds * 3 if m <= 64 else rounds)
                if r is None:
                    continue
                t0, _, t1, _ = r
                label = f"{_tag(name)} {name} m={m} {qname}"
                if m <= 64:
                    bw = n * k * 2 / t1
                    row(label, t1, t0, _base(name),
                        f"{bw / 1e12:.2f} TB/s = {bw / copy_bw:.0%} copy", ">= 80% copy",
                        bw / copy_bw >= 0.8)
                else:
                    frac = 2 * m * n * k / t1 / mm_rate
                    row(label, t1, t0, _base(name),
                        f"{2 * m * n * k / t1 / 1e12:.0f} TF/s = {frac:.0%} mm", ">= 50% mm",
                        frac >= 0.5)
    G = None  # noqa: F841
    free()


# ---------------------------------------------------------------------------------------------
# score_topk
# ---------------------------------------------------------------------------------------------
def torch_topk(Q: torch.Tensor, G: torch.Tensor, topk: int, chunk: int = 1 << 18):
    """Pure PyTorch: bf16 matmul per chunk, torch.topk, merge with the running best."""
    best_v = torch.empty(Q.shape[0], 0, device=DEV)
    best_i = torch.empty(Q.shape[0], 0, device=DEV, dtype=torch.int64)
    qb = Q.to(torch.bfloat16)
    for r0 in range(0, G.shape[0], chunk):
        s = (qb @ G[r0 : r0 + chunk].T).float()
        v, i = s.topk(min(topk, s.shape[1]), dim=1)
        best_v, pos = torch.cat([best_v, v], 1).topk(min(topk, best_v.shape[1] + v.shape[1]), 1)
        best_i = torch.cat([best_i, i + r0], 1).gather(1, pos)
    return best_v, best_i


def bench_score(copy_bw: float, mm_rate: float, rounds: int) -> None:
    n, k, topk = 4_000_000, 1024, 100
    G = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
    store_bytes = n * k * 2
    for m in (1, 16, 64, 1024):
        Q = torch.randn(m, k, device=DEV)
        v, i = ops.score_topk(Q, G, topk)
        # Check against float32 scores of the same rows (exact products of the bf16 store).
        mc = min(m, 16)
        sv, si = torch.empty(mc, 0, device=DEV), torch.empty(mc, 0, device=DEV, dtype=torch.int64)
        for r0 in range(0, n, 1 << 18):
            s = Q[:mc] @ G[r0 : r0 + (1 << 18)].float().T
            tv, ti = s.topk(topk, dim=1)
            sv, pos = torch.cat([sv, tv], 1).topk(topk, 1)
            si = torch.cat([si, ti + r0], 1).gather(1, pos)
        verr = float(((v[:mc] - sv).abs() / sv.abs().clamp_min(1e-6)).max())
        overlap = float(
            np.mean([len(set(i[q].tolist()) & set(si[q].tolist())) / topk for q in range(mc)])
        )
        log(f"score_topk m={m} check: max rel value err {verr:.2e}, index overlap {overlap:.3f}")
        assert verr < 1e-4 and overlap > 0.98, f"score_topk m={m} disagrees: {verr}, {overlap}"
        r = rounds * 3 if m <= 64 else rounds
        t_ours = cuda_times(lambda Q=Q: ops.score_topk(Q, G, topk), r)
        kernel_breakdown(f"score_topk m={m}", lambda Q=Q: ops.score_topk(Q, G, topk), 1)
        t_base = cuda_times(lambda Q=Q: torch_topk(Q, G, topk), max(2, r // 3))
        to, tb = med(t_ours), med(t_base)
        bw = store_bytes / to
        flops = 2 * m * n * k
        case = {
            "m": m,
            "n": n,
            "k": k,
            "topk": topk,
            "ours_s": t_ours,
            "baseline_s": t_base,
            "check_value_rel_err": verr,
            "check_index_overlap": overlap,
            "store_read_Bps": bw,
            "fraction_of_copy_bw": bw / copy_bw,
            "flops": flops / to,
            "fraction_of_mm_rate": flops / to / mm_rate,
        }
        RESULTS["cases"][f"score_topk_m{m}"] = case
        log(
            f"score_topk m={m}: ours {to * 1e3:.3f} ms ({bw / 1e12:.2f} TB/s = "
            f"{bw / copy_bw:.0%} of copy, {flops / to / 1e12:.0f} TFLOP/s), "
            f"pure PyTorch {tb * 1e3:.3f} ms"
        )
        # bfloat16 queries (what the baseline uses): one MMA pass, the same scores as their
        # float32 values.
        Qb = Q.to(torch.bfloat16)
        vb, ib = ops.score_topk(Qb, G, topk)
        vf, i_f = ops.score_topk(Qb.float(), G, topk)
        assert torch.equal(vb, vf) and torch.equal(ib, i_f), "bf16 queries: one pass != three"
        t_b16 = cuda_times(lambda Qb=Qb: ops.score_topk(Qb, G, topk), r)
        kernel_breakdown(f"score_topk m={m} bf16 Q", lambda Qb=Qb: ops.score_topk(Qb, G, topk), 1)
        tq = med(t_b16)
        case["bf16_query_s"] = t_b16
        log(f"score_topk m={m} bf16 queries: {tq * 1e3:.3f} ms, {store_bytes / tq / 1e12:.2f} TB/s")
        for label, t in ((f"m={m}", to), (f"m={m} bf16 Q", tq)):
            if m <= 64:
                bw_t = store_bytes / t
                row(
                    f"score_topk n4M k1024 bf16 {label}",
                    t,
                    tb,
                    "bf16 mm + topk chunks",
                    f"{bw_t / 1e12:.2f} TB/s = {bw_t / copy_bw:.0%} copy",
                    ">= 80% copy",
                    bw_t / copy_bw >= 0.8,
                )
            else:
                frac = flops / t / mm_rate
                row(
                    f"score_topk n4M k1024 bf16 {label}",
                    t,
                    tb,
                    "bf16 mm + topk chunks",
                    f"{flops / t / 1e12:.0f} TF/s = {frac:.0%} mm",
                    ">= 50% mm",
                    frac >= 0.5,
                )
        free()
    G = None  # noqa: F841
    free()


# ---------------------------------------------------------------------------------------------
# sketch_sparse (no target: reported against the bandwidth of reading g)
# ---------------------------------------------------------------------------------------------
def bench_sparse(copy_bw: float, rounds: int) -> None:
    B, P, k, s = 64, 1 << 22, 4096, 4
    g = torch.randn(B, P, device=DEV, dtype=torch.bfloat16)
    y = ops.sketch_sparse(g, k, s=s, seed=3)
    ref = reference.sketch_sparse(g[:2, : 1 << 16].cpu(), k, s=s, seed=3, accum=torch.float64)
    part = ops.sketch_sparse(g[:2, : 1 << 16].contiguous(), k, s=s, seed=3)
    err = rel_err(part.cpu(), ref)
    assert err < 1e-4, f"sketch_sparse disagrees with the reference: {err}"

    def baseline() -> torch.Tensor:  # index_add_ scatter with the hash tables cached
        acc = torch.zeros(B, k, device=DEV)
        for c0 in range(0, P, 1 << 20):
            idx, sg = tables[c0]
            contrib = (g[:, c0 : c0 + (1 << 20), None].float() * sg[None]).reshape(B, -1)
            acc.index_add_(1, idx, contrib)
        return acc / math.sqrt(s)

    tables = {}
    for c0 in range(0, P, 1 << 20):
        b, sg = reference.sparse_buckets(3, s, k, c0, c0 + (1 << 20))
        tables[c0] = (torch.from_numpy(b).reshape(-1).to(DEV), torch.from_numpy(sg).float().to(DEV))
    t_ours = cuda_times(lambda: ops.sketch_sparse(g, k, s=s, seed=3, out=y), rounds * 2)
    kernel_breakdown("sketch_sparse", lambda: ops.sketch_sparse(g, k, s=s, seed=3, out=y), 1)
    t_base = cuda_times(baseline, rounds)
    to, tb = med(t_ours), med(t_base)
    bw = B * P * 2 / to
    RESULTS["cases"]["sketch_sparse"] = {
        "shape": dict(B=B, P=P, k=k, s=s, dtype="bfloat16"),
        "ours_s": t_ours,
        "baseline_s": t_base,
        "check_rel_err": err,
        "g_read_Bps": bw,
        "fraction_of_copy_bw": bw / copy_bw,
    }
    log(
        f"sketch_sparse: ours {to * 1e3:.3f} ms ({bw / copy_bw:.0%} of copy bandwidth), "
        f"index_add_ {tb * 1e3:.3f} ms"
    )
    row(
        f"sketch_sparse B{B} P4M k{k} s{s}",
        to,
        tb,
        "index_add_ (tables cached)",
        f"{bw / 1e12:.2f} TB/s = {bw / copy_bw:.0%} copy",
        "-",
        None,
    )
    free()


# ---------------------------------------------------------------------------------------------
# sketch_dense (no target: the CPU suite's comparison, on the GPU)
# ---------------------------------------------------------------------------------------------
DENSE_SIZE = (64, 1 << 22, 4096)  # B, P, k


def bench_dense(mm_rate: float, rounds: int, size: tuple[int, int, int] = DENSE_SIZE) -> None:
    B, P, k = size
    flops = 2 * B * P * k
    g = torch.randn(B, P, device=DEV, dtype=torch.bfloat16)
    y = ops.sketch_dense(g, k, seed=4)
    # Check: the first 64 sketch rows of two examples against the CPU kernel at k = 64 (a row
    # depends on k only through the 1/sqrt(k) scale; an explicit 64 x P matrix would take the
    # reference tens of seconds at this P).
    rows = min(64, k)
    ref = ops.sketch_dense(g[:2].cpu(), rows, seed=4) * math.sqrt(rows / k)
    err = rel_err(y[:2, :rows].cpu(), ref)
    log(f"sketch_dense check: max row rel err {err:.2e} (first {rows} sketch rows, CPU kernel)")
    assert err < 1e-4, f"sketch_dense disagrees with the CPU kernel: {err}"
    t_ours = cuda_times(lambda: ops.sketch_dense(g, k, seed=4, out=y), rounds)
    kernel_breakdown("sketch_dense", lambda: ops.sketch_dense(g, k, seed=4, out=y), 1)
    cb = min(P, 1 << 16)

    def baseline() -> torch.Tensor:  # R regenerated per call in blocks of columns (TRAK-style)
        acc = torch.zeros(B, k, device=DEV)
        for c0 in range(0, P, cb):
            c1 = min(P, c0 + cb)
            r = torch.empty(k, c1 - c0, device=DEV, dtype=torch.bfloat16).bernoulli_(0.5)
            acc += (g[:, c0:c1] @ r.mul_(2).sub_(1).T).float()
        return acc / math.sqrt(k)

    t_base = cuda_times(baseline, max(2, rounds - 1))
    to, tb = med(t_ours), med(t_base)
    frac = flops / to / mm_rate
    RESULTS["cases"]["sketch_dense"] = {
        "shape": dict(B=B, P=P, k=k, dtype="bfloat16"),
        "flops": flops,
        "ours_s": t_ours,
        "baseline_s": t_base,
        "check_rel_err": err,
        "fraction_of_mm_rate": frac,
    }
    log(f"sketch_dense: ours {to * 1e3:.3f} ms ({frac:.0%} of mm), RNG blocks {tb * 1e3:.3f} ms")
    row(f"sketch_dense B{B} P{P} k{k}", to, tb, "mm + RNG blocks",
        f"{flops / to / 1e12:.0f} TF/s = {frac:.0%} mm", "-", None)
    g = y = None  # noqa: F841
    free()


# ---------------------------------------------------------------------------------------------
# featurize: the engine on the GPU (the CPU suite's bench_featurize.py, same model and loss)
# ---------------------------------------------------------------------------------------------
FEATURIZE_SIZE = (256, 256, 512)  # batch, kron k per layer, baseline's projection block


def _peak_bytes(fn: Callable[[], object]) -> int:
    """Peak device memory one call allocates beyond what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def bench_featurize(rounds: int, size: tuple[int, int, int] = FEATURIZE_SIZE,
                    peak_bytes: Callable[[Callable[[], object]], int] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _featurize_model import baseline_pipeline, build

    batch, k, block = size
    model, loss, x, ids = build(torch.get_num_threads(), batch)
    cpu_model = copy.deepcopy(model)
    model, x = model.to(DEV), x.to(DEV)
    attr = issl_fast.InfluenceSSL(model, loss, issl_fast.Projection("kron", k=k), "block")
    cpu_attr = issl_fast.InfluenceSSL(cpu_model, loss, issl_fast.Projection("kron", k=k), "block")
    # Check (TF32 off: cuDNN would use it for the convolutions): the GPU engine's features are
    # the CPU engine's on a few examples.
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        err = rel_err(attr.features(x[:4], ids[:4]).cpu(), cpu_attr.features(x[:4].cpu(), ids[:4]))
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    log(f"featurize check: max row rel err {err:.2e} (GPU engine vs CPU engine)")
    assert err < 1e-3, f"featurize on the GPU disagrees with the CPU: {err}"
    views = loss.encoder_inputs(x, ids)

    def ours() -> object:
        return attr.featurizer(x, ids)

    def floor() -> None:  # one plain forward+backward of the loss, views precomputed
        model.zero_grad(set_to_none=True)
        loss.from_outputs(model(views), batch).sum().backward()

    gen = torch.Generator(device=DEV).manual_seed(0)

    def baseline() -> torch.Tensor:
        return baseline_pipeline(model, loss, x, ids, attr.dim, gen, block)

    t_ours = cuda_times(ours, rounds * 3)
    t_aug = cuda_times(lambda: loss.encoder_inputs(x, ids), rounds)  # part of ours
    kernel_breakdown("featurize", ours, 1)
    t_floor = cuda_times(floor, rounds * 3)
    t_base = cuda_times(baseline, max(2, rounds - 1))
    measure = peak_bytes or _peak_bytes
    mem_ours, mem_base = measure(ours), measure(baseline)
    to, tf, tb = med(t_ours), med(t_floor), med(t_base)
    RESULTS["cases"]["featurize"] = {
        "shape": dict(batch=batch, views=loss.views, kron_k=k, dim=attr.dim,
                      params=sum(p.numel() for p in model.parameters())),
        "ours_s": t_ours,
        "floor_s": t_floor,
        "augment_s": t_aug,
        "baseline_s": t_base,
        "check_rel_err": err,
        "peak_bytes_ours": mem_ours,
        "peak_bytes_baseline": mem_base,
    }
    log(f"featurize: ours {to * 1e3:.2f} ms (augmentation {med(t_aug) * 1e3:.2f} ms), fwd+bwd "
        f"{tf * 1e3:.2f} ms, torch.func + RNG {tb * 1e3:.2f} ms; peak memory "
        f"{mem_ours / 2**20:.0f} MiB vs {mem_base / 2**20:.0f} MiB")
    label = f"featurize CNN 1M B{batch} K{loss.views} kron k{k}"
    row(label, to, tb, "torch.func + RNG blocks",
        f"mem {mem_ours / max(mem_base, 1):.2f}x base", "-", None)
    row("  (vs one fwd+bwd of the loss)", to, tf, "fwd+bwd, views given",
        f"ours/floor {to / tf:.2f}", "-", None)
    model = x = attr = views = None  # noqa: F841
    free()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/gpu/out"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None,
                    help="subset of: linear kron score sparse dense featurize variants")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available() or not issl_fast.has_cuda():
        print(f"no usable CUDA device / kernels: {issl_fast.build_info()}", file=sys.stderr)
        return 2
    RESULTS["device"] = torch.cuda.get_device_name(0)
    RESULTS["build_info"] = issl_fast.build_info()
    RESULTS["torch"] = torch.__version__
    log(f"device {RESULTS['device']}, issl_fast {issl_fast.__version__}, torch {torch.__version__}")
    torch.manual_seed(0)
    which = set(args.only or ["linear", "kron", "score", "sparse", "dense", "featurize",
                              "variants"])
    failed: list[str] = []
    copy_bw, mm_rate = limits(max(5, args.rounds * 3))
    steps = [
        ("kron", lambda: bench_kron(args.rounds)),
        ("sparse", lambda: bench_sparse(copy_bw, args.rounds)),
        ("score", lambda: bench_score(copy_bw, mm_rate, args.rounds)),
        ("linear", lambda: bench_linear(mm_rate, args.rounds)),
        ("linear", lambda: bench_linear_positions(mm_rate, args.rounds)),
        ("dense", lambda: bench_dense(mm_rate, args.rounds)),
        ("featurize", lambda: bench_featurize(args.rounds)),
        # Last: each kernel variant against the kernel it replaces, so a faulting experimental
        # one cannot spoil the rows above.
        ("variants", lambda: bench_variants(mm_rate, args.rounds)),
    ]

    def save(final: bool) -> str:
        (args.out / "bench.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        text = table()
        if failed:
            text += f"\nbenchmarks that failed: {', '.join(failed)} (see bench.log)"
        end = RESULTS.get("bf16_mm_flops_end")
        text += (
            f"\n{RESULTS['device']}: copy {copy_bw / 1e12:.2f} TB/s, bf16 mm "
            f"{mm_rate / 1e12:.0f}"
            + (f" (end of run: {end / 1e12:.0f})" if end else "")
            + " TFLOP/s"
        )
        if not final:
            text += "\n(partial: the run stopped before the last benchmark)"
        (args.out / "table.txt").write_text(text + "\n")
        return text

    for name, fn in steps:
        if name not in which:
            continue
        try:
            fn()
        except Exception as exc:  # keep going: one op's failure must not hide the others
            log(f"{name} FAILED: {exc!r}")
            failed.append(name)
            RESULTS["cases"][f"{name}_error"] = repr(exc)
            free()
        save(final=False)  # partial results survive a timeout
    _, RESULTS["bf16_mm_flops_end"] = limits(max(5, args.rounds * 3))  # limits again, at the end
    print(save(final=True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
