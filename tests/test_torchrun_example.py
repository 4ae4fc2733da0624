"""examples/torchrun_attribution.py's arguments: --examples too small for the planted copies and
the queries (or larger than the digits) is a parser error naming the range, not an index error;
the smallest accepted size runs and finds the copies. (The torchrun run itself is tested in
test_distributed.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from example_scripts import load_example


@pytest.mark.parametrize("examples", ["10", "402", "405", "1798"])
def test_examples_out_of_range_is_a_parser_error(tmp_path: Path, capsys, examples: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        load_example("torchrun_attribution").main([str(tmp_path), "--examples", examples])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "argument --examples: must be between 406 " in err and f"got {examples}" in err
    assert not (tmp_path / "store").exists()


def test_the_fewest_examples_run_and_find_the_copies(tmp_path: Path, capsys) -> None:
    example = load_example("torchrun_attribution")
    assert example.MIN_EXAMPLES == 406
    example.main([str(tmp_path), "--examples", "406"])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["ranks"] == 1
    assert result["duplicate_ids"] == [[3, 200], [10, 301], [42, 402]]
    assert len(result["top_ids"]) == example.QUERIES
