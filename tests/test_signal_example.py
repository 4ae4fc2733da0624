"""examples/signal_attribution.py end to end (a Conv1d encoder trained with SimCLR on generated
signals, SignalAugment views, EK-FAC): it finds the planted copies, shifted copies and noise; too
few signals for what it plants is a parser error naming the minimum, and the minimum runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from example_scripts import load_example


def test_the_signal_example_finds_what_was_planted(tmp_path: Path) -> None:
    example = load_example("signal_attribution")
    result = example.main([str(tmp_path), "--signals", "240", "--epochs", "4"])
    assert result == json.loads((tmp_path / "result.json").read_text())
    assert result["copies_found"] == example.COPIES  # identical features: similarity 1
    assert result["shifted_found"] == example.SHIFTED  # found through apps.shifts
    # every planted pair, and few others, above the threshold
    assert result["pairs_found"] <= example.COPIES + example.SHIFTED + 4
    assert result["noise_in_top_outliers"] >= example.NOISE - 1


@pytest.mark.parametrize("argv, message", [
    (["--signals", "10"], "argument --signals: must be at least 30, got 10"),
    (["--signals", "29"], "argument --signals: must be at least 30, got 29"),
    (["--epochs", "-1"], "argument --epochs: must be at least 0, got -1"),
])
def test_too_few_signals_is_a_parser_error(tmp_path: Path, capsys, argv: list[str],
                                           message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        load_example("signal_attribution").main([str(tmp_path), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_the_fewest_signals_run(tmp_path: Path) -> None:
    example = load_example("signal_attribution")
    assert example.MIN_SIGNALS == 30
    result = example.main([str(tmp_path), "--signals", "30", "--epochs", "1"])
    planted = result["planted"]
    assert len(planted["copies"]) == example.COPIES and len(planted["shifted"]) == example.SHIFTED
    assert planted["noise"] == list(range(30 - example.NOISE, 30))
    assert result["copies_found"] == example.COPIES  # (identical features whatever the weights)
