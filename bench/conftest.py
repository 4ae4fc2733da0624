"""Session fixtures of the CPU benchmark suite: this machine's limits measured in the same run,
build info in the header, contention tracking, and the summary table (pytest_terminal_summary).
"""

from __future__ import annotations

import hashlib
import os
import platform
import time

import _bench
import pytest
import torch
from _bench import CASES, NUM_THREADS, contended, cpu_snapshot, issl_fast, other_cpu

_SESSION: dict = {}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _module_identity() -> str:
    """Path, mtime and sha256 prefix of the compiled module this process loaded."""
    path = issl_fast._backend._C.__file__
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))
    except OSError as exc:
        return f"{path} (unreadable: {exc})"
    return f"{path} (mtime {mtime}, sha256 {digest})"


def pytest_sessionstart(session):
    _SESSION["module_at_start"] = _module_identity()


def pytest_report_header(config):
    return [
        f"issl_fast.build_info(): {issl_fast.build_info()}",
        f"issl_fast._C: {_SESSION.get('module_at_start') or _module_identity()}",
        f"cpu: {_cpu_model()} x {os.cpu_count()}; bench threads: {NUM_THREADS} "
        f"(torch.get_num_threads()={torch.get_num_threads()}); loadavg at start: "
        f"{tuple(round(x, 2) for x in os.getloadavg())}; wait for quiet: "
        f"{_bench.QUIET_WAIT_S:g} s per round (ISSL_BENCH_WAIT_QUIET)",
    ]


@pytest.fixture(scope="session", autouse=True)
def machine():
    """Measure the memory bandwidth (triad) before any benchmark and again after the last one;
    GEMM rates are measured on first use for each op's flop count, and again at the end."""
    _SESSION["cpu0"] = cpu_snapshot()
    _SESSION["build_info"] = issl_fast.build_info()
    m = _bench.machine()
    yield m
    m.remeasure()
    _SESSION["cpu1"] = cpu_snapshot()


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.2f} ms" if v < 1 else f"{v:.3f} s"


def _limit_str(c: _bench.Case) -> str:
    frac, lim = c.fraction(), c.limit_value()
    if frac is None:
        return "-"
    rate = c.work / c.times["ours"]
    if c.limit == "gemm":
        return f"{100 * frac:.0f}% of GEMM {lim / 1e9:.0f}GF/s ({rate / 1e9:.0f}GF/s)"
    return f"{100 * frac:.0f}% of BW {lim / 1e9:.1f}GB/s ({rate / 1e9:.1f}GB/s)"


def _target_str(c: _bench.Case, t: _bench.Target) -> str:
    v, ok = c.evaluate(t)
    if ok is None:
        return f"{t.label}: n/a"
    if t.metric == "limit":
        shown = f"{100 * v:.0f}%"
    elif t.metric == "speedup":
        shown = f"{v:.1f}x"
    else:
        shown = f"{v / 2**20:.1f} MiB" if abs(v) >= 1024 else f"{v:.3g}"
    return f"{t.label}: {'PASS' if ok else 'FAIL'} ({shown})"


def _share(c: _bench.Case, role: str) -> str:
    v = c.contention.get(role)
    if v is None:
        return "?"
    return f"{100 * v['other_frac']:.0f}%{'!' if contended(v) else ''}"


def _contention_str(c: _bench.Case, role: str | None) -> str:
    """Share of the CPUs other processes used during the timed rounds of ours / this baseline."""
    return f"{_share(c, 'ours')}/{_share(c, role)}" if role else ""


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    if not CASES and _bench.MACHINE is None:
        return
    m = _bench.MACHINE
    tr.write_sep("=", "issl_fast CPU benchmarks: summary (medians)")
    info = _SESSION.get("build_info") or issl_fast.build_info()
    tr.write_line(f"build_info: {info}")
    tr.write_line(f"cpu: {_cpu_model()} x {os.cpu_count()}, threads={NUM_THREADS}")
    if m is not None:
        per = ", ".join(f"{t['when']}: numpy {float(t['numpy']) / 1e9:.1f} / torch "
                        f"{float(t['torch']) / 1e9:.1f}" for t in m.triads)
        tr.write_line(
            f"memory bandwidth, triad c=a+b over 3 x {m.triad_bytes / 3 / 2**20:.0f} MiB fp32, "
            f"median of {_bench.TRIAD_ROUNDS} (GB/s; {per}): numpy.add (1 thread) "
            f"{m.bw_numpy / 1e9:.1f}, torch.add ({NUM_THREADS} threads) {m.bw_torch / 1e9:.1f} "
            f"-> limit used = {m.bandwidth / 1e9:.1f} GB/s = the higher ({m.bandwidth_source}), "
            "best of start/end")
        for flops, runs in sorted(m.gemm_runs.items()):
            g = runs[0]
            tr.write_line(
                f"fp32 GEMM rate at {flops / 1e9:.3g} GFLOP (torch.mm {g['m']}x{g['k']} @ "
                f"{g['k']}x{g['n']}, median of {g['rounds']}): "
                + " / ".join(f"{r['rate'] / 1e9:.1f}" for r in runs)
                + f" GFLOP/s (first use / end) -> limit used = {m.gemm_rate(flops) / 1e9:.1f}")
    hdr = ("op", "case", "ours", "baseline", "base", "base/ours", "ours vs machine limit",
           "issue-2 target", "other-CPU ours/base")
    rows = []
    for c in CASES.values():
        roles = [r for r in c.times if r != "ours"]
        roles.sort(key=lambda r: (r != "baseline", r))
        targets = list(c.targets)
        n_lines = max(1, len(roles), len(targets))
        for i in range(n_lines):
            role = roles[i] if i < len(roles) else None
            rows.append((
                c.op if i == 0 else "",
                c.case if i == 0 else "",
                _fmt_s(c.times.get("ours")) if i == 0 else "",
                c.names.get(role, "") if role else "",
                _fmt_s(c.times[role]) if role else "",
                (f"{c.times[role] / c.times['ours']:.2f}x" if role and "ours" in c.times else ""),
                _limit_str(c) if i == 0 else "",
                _target_str(c, targets[i]) if i < len(targets) else "",
                _contention_str(c, role),
            ))
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h)
              for j, h in enumerate(hdr)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    tr.write_line("")
    tr.write_line(line(hdr))
    tr.write_line(line(tuple("-" * w for w in widths)))
    prev_op = None
    for r in rows:
        if r[0] and prev_op is not None:
            tr.write_line("")
        prev_op = r[0] or prev_op
        tr.write_line(line(r))
    # extra facts (memory, accuracy, JL) recorded by the bench files
    tr.write_line("")
    for c in CASES.values():
        if c.info:
            facts = []
            for key, v in c.info.items():
                if isinstance(v, float) and key.endswith("bytes"):
                    facts.append(f"{key}={v / 2**20:.1f}MiB")
                elif isinstance(v, float):
                    facts.append(f"{key}={v:.3g}")
                else:
                    facts.append(f"{key}={v}")
            tr.write_line(f"{c.op} [{c.case}]: " + "; ".join(facts))
    # contention and runtime
    tr.write_line("")
    at_end = _module_identity()
    tr.write_line(f"issl_fast._C loaded: {_SESSION.get('module_at_start')}")
    if at_end != _SESSION.get("module_at_start"):
        tr.write_line(f"  WARNING: the installed module changed during the run (now {at_end}); "
                      "this process kept the one loaded at start")
    if "cpu0" in _SESSION:
        end = _SESSION.get("cpu1") or cpu_snapshot()
        oc = other_cpu(_SESSION["cpu0"], end)
        tr.write_line(
            f"suite wall time {oc['wall_s']:.0f} s (of which {_bench.WAITED_S[0]:.0f} s waiting "
            f"for other processes to go idle); other processes used {oc['other_cpu_s']:.1f} CPU-s "
            f"({100 * oc['other_frac']:.1f}% of the machine), hypervisor steal "
            f"{oc['steal_s']:.1f} s; loadavg at end {tuple(round(x, 2) for x in os.getloadavg())}")
    flagged = [(c, r, v) for c in CASES.values() for r, v in c.contention.items() if contended(v)]
    for c, r, v in flagged:
        tr.write_line(f"  CONTENDED: {c.op} [{c.case}] {r}: other processes used "
                      f"{100 * v['other_frac']:.0f}% of the CPUs during its timed rounds "
                      f"({v['other_cpu_s']:.1f} CPU-s in {v['wall_s']:.1f} s): not trustworthy")
    if not flagged:
        share = 100 * _bench.CONTENTION_FLAG
        tr.write_line(f"no timed round saw other processes use > {share:.0f}% of the CPUs")
