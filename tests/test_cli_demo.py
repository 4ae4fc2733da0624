"""``issl-fast demo``'s options: an explicit --epochs wins over --quick's, and a device this
machine lacks is refused by the parser (before minutes of work), not by a traceback."""

from __future__ import annotations

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
