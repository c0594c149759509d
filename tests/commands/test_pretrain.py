"""`lmforge pretrain`: help from the config dataclasses, errors as one line and exit code 2."""

from __future__ import annotations

from lmforge.cli import main


def test_help_lists_the_settings(capsys):
    assert main(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--max-steps" in out and "--train.grad_accum" in out and "--optim.schedule" in out


def test_bad_flag_fails_before_training(capsys):
    assert main(["pretrain", "--max-step=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge pretrain: error: unknown flag --max-step; did you mean --max-steps")
