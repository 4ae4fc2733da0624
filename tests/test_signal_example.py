"""examples/signal_attribution.py end to end (a Conv1d encoder trained with SimCLR on generated
signals, SignalAugment views, EK-FAC): it finds the planted copies, shifted copies and noise."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "signal_attribution.py"


def test_the_signal_example_finds_what_was_planted(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("signal_attribution", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main([str(tmp_path), "--signals", "240", "--epochs", "4"])
    assert result == json.loads((tmp_path / "result.json").read_text())
    assert result["copies_found"] == example.COPIES  # identical features: similarity 1
    assert result["shifted_found"] == example.SHIFTED  # found through apps.shifts
    # every planted pair, and few others, above the threshold
    assert result["pairs_found"] <= example.COPIES + example.SHIFTED + 4
    assert result["noise_in_top_outliers"] >= example.NOISE - 1
