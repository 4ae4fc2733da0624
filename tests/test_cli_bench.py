"""``issl-fast bench``: the quick self-check of the CPU kernels against pure PyTorch."""

from __future__ import annotations

import json

import pytest
import torch
from issl_fast import benchmark, cli, ops


def test_bench_json_reports_every_kernel_checked_against_the_reference(capsys) -> None:
    threads = torch.get_num_threads()
    assert cli.main(["bench", "--quick", "--json", "--rounds", "1", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # restored after the run
    result = json.loads(capsys.readouterr().out)
    assert result["threads"] == 1 and result["quick"] is True
    assert result["limits"]["gemm_flops"] > 0 and result["limits"]["bandwidth_bytes"] > 0
    cases = result["cases"]
    assert [c["op"] for c in cases] == ["sketch_linear", "sketch_linear", "sketch_kron",
                                        "score_topk"]
    assert " T=" not in cases[0]["shape"] and " T=256 " in cases[1]["shape"]
    for c in cases:
        assert c["ours_s"] > 0 and c["baseline_s"] > 0
        assert c["speedup"] == pytest.approx(c["baseline_s"] / c["ours_s"])
        assert 0 <= c["max_rel_err"] <= benchmark.CHECK_RTOL
        assert c["limit"] in ("gemm", "bandwidth") and c["fraction_of_limit"] > 0


def test_bench_refuses_a_kernel_that_disagrees(monkeypatch) -> None:
    real = ops.sketch_kron
    monkeypatch.setattr(ops, "sketch_kron", lambda *a, **kw: real(*a, **kw) * 1.01)
    with pytest.raises(RuntimeError, match=r"sketch_kron \(max row error 1.00e-02\)"):
        benchmark.run(rounds=1, quick=True, threads=1)


@pytest.mark.parametrize("broken", ["linear_tail", "topk_rows"])
def test_bench_checks_whole_results(monkeypatch, broken: str) -> None:
    """A sketch wrong past its first columns, or top-k rows that are not the top rows, fail."""
    if broken == "linear_tail":
        real_linear = ops.sketch_linear

        def linear(*a, **kw):
            y = real_linear(*a, **kw)
            y[:, benchmark.CHECK_COLS:] = 0
            return y

        monkeypatch.setattr(ops, "sketch_linear", linear)
        match = "sketch_linear"
    else:
        real_topk = ops.score_topk
        monkeypatch.setattr(ops, "score_topk", lambda *a, **kw: (
            real_topk(*a, **kw)[0], torch.zeros_like(real_topk(*a, **kw)[1])))
        match = r"score_topk \(max row error inf\)"
    with pytest.raises(RuntimeError, match=match):
        benchmark.run(rounds=1, quick=True, threads=1)


def test_bench_refuses_bad_rounds_and_threads(capsys) -> None:
    for argv in (["--rounds", "0"], ["--threads", "-1"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--quick", *argv])
        assert "must be >= 1" in capsys.readouterr().err


def test_bench_table_names_the_baselines(capsys) -> None:
    assert cli.main(["bench", "--quick", "--rounds", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "fp32 mm" in out and "triad" in out
    for op in ("sketch_linear", "sketch_kron", "score_topk"):
        assert op in out


def _case(op: str, fraction: float) -> dict:
    return {"op": op, "shape": "s", "ours_s": 1e-3, "baseline": "b", "baseline_s": 2e-3,
            "speedup": 2.0, "limit": "gemm", "fraction_of_limit": fraction,
            "max_rel_err": 0.0, "above_limit": fraction > 1}


def test_fractions_above_the_limit_are_flagged_not_printed_as_facts(monkeypatch,
                                                                    capsys) -> None:
    """A kernel "faster than the machine" (the limit measured low on a busy machine) is flagged
    in the JSON and marked in the table with a note, not printed as a plain 214%."""
    monkeypatch.setattr(benchmark, "machine_limits",
                        lambda rounds, quick: {"gemm_flops": 1e3, "bandwidth_bytes": 1e3})
    assert cli.main(["bench", "--quick", "--json", "--rounds", "1", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["above_limit"] is True
    assert all(c["above_limit"] is True and c["fraction_of_limit"] > 1 for c in result["cases"])
    table = benchmark.format_table(result)
    for line in table.splitlines()[3:7]:
        assert f"%{benchmark.ABOVE_LIMIT_MARK} " in line, line
    assert table.splitlines()[-1].startswith(f"{benchmark.ABOVE_LIMIT_MARK} above 100% of the "
                                             "limit measured in this run")
    assert "Rerun on an idle machine." in table


def test_only_the_cases_above_the_limit_are_marked() -> None:
    result = {"threads": 2, "rounds": 5, "quick": False, "load_average_1min": 3.5, "cpus": 2,
              "limits": {"gemm_flops": 2e11, "bandwidth_bytes": 2.5e10},
              "cases": [_case("fine", 0.62), _case("busy", 2.14), _case("edge", 1.0)]}
    lines = benchmark.format_table(result).splitlines()
    assert "load average 3.5 on 2 CPUs" in lines[0]
    fine, busy, edge = lines[2:5]
    assert "62%  gemm" in fine and "214%! gemm" in busy and "100%  gemm" in edge
    assert lines[-1].startswith("! above 100%") and "(load average 3.5 on 2 CPUs" in lines[-1]
    result["cases"] = [_case("fine", 0.62)]
    assert "above 100%" not in benchmark.format_table(result)


def test_json_flags_each_case(capsys) -> None:
    assert cli.main(["bench", "--quick", "--json", "--rounds", "1", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["above_limit"] == any(c["above_limit"] for c in result["cases"])
    for c in result["cases"]:
        assert c["above_limit"] == (c["fraction_of_limit"] > 1)
    assert result["cpus"] >= 1
