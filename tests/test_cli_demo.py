"""``issl-fast demo``'s options: an explicit --epochs wins over --quick's, and a device this
machine lacks, or an output directory the demo cannot or must not write (a file, a store it did
not write), is refused by the parser (before minutes of work), not by a traceback."""

from __future__ import annotations

from pathlib import Path

import issl_fast.demo
import pytest
import torch
from issl_fast import cli


class _Ran(Exception):
    """Stops the demo where it would start, with the configuration it was given."""


def _config(monkeypatch: pytest.MonkeyPatch, *argv: str):
    def capture(cfg):
        raise _Ran(cfg)

    monkeypatch.setattr(issl_fast.demo, "run_demo", capture)
    with pytest.raises(_Ran) as ran:
        cli.main(["demo", *argv])
    return ran.value.args[0]


def test_epochs_default_quick_and_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _config(monkeypatch).epochs == 40
    assert _config(monkeypatch, "--quick").epochs == 8
    quick = _config(monkeypatch, "--quick", "--epochs", "3")
    assert quick.epochs == 3 and quick.n_train == 400
    assert _config(monkeypatch, "--epochs", "5").epochs == 5


@pytest.mark.parametrize("argv, message", [
    (["--device", "foo"], "not a torch device: 'foo'"),
    (["--device", "mps"], "the demo runs on cpu or cuda"),
    (["--epochs", "0"], "must be >= 1, got 0"),
    (["--views", "-2"], "must be >= 1, got -2"),
])
def test_bad_options_are_parser_errors(monkeypatch: pytest.MonkeyPatch, capsys, argv,
                                       message) -> None:
    monkeypatch.setattr(issl_fast.demo, "run_demo", lambda cfg: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_cuda_device_is_refused(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(issl_fast.demo, "run_demo", lambda cfg: pytest.fail("ran"))
    with pytest.raises(SystemExit):
        cli.main(["demo", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


# -- the output directory (--out) -----------------------------------------------------------------


def _refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
             *argv: str) -> str:
    """The parser's error for ``demo argv`` (the demo must not start)."""
    monkeypatch.setattr(issl_fast.demo, "run_demo", lambda cfg: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_out_that_is_a_file_or_under_one_is_a_parser_error(
        monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    assert f"{afile} is not a directory" in _refused(monkeypatch, capsys, "--out", str(afile))
    err = _refused(monkeypatch, capsys, "--out", str(afile / "sub" / "dir"))
    assert f"cannot create {afile / 'sub' / 'dir'}: {afile} is not a directory" in err
    assert afile.read_text() == "not a directory"


def test_out_whose_store_holds_a_users_files_is_refused_and_kept(
        monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    notes = tmp_path / "store" / "precious" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("my data")
    err = _refused(monkeypatch, capsys, "--out", str(tmp_path))
    assert f"{tmp_path / 'store'} holds something the demo did not write" in err
    assert "['precious']" in err
    assert notes.read_text() == "my data"


def test_out_that_does_not_exist_yet_is_accepted(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "new" / "report"
    assert _config(monkeypatch, "--out", str(out)).out == str(out)
    assert not out.exists()  # (the parser creates nothing)
