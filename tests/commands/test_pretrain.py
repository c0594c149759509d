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


def test_a_model_too_large_for_memory_is_refused_before_it_is_built(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be " * 200, encoding="utf-8")
    argv = ["pretrain", "--model.name=gpt-tiny", '--model.overrides={"n_layer": 100000000}',
            f"--data.dataset={corpus}", "--data.block_size=16", f"--train.out={tmp_path / 'runs'}",
            "--train.device=cpu", "--train.progress=false", "--train.tensorboard=false"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "n_layer=100000000" in err and "of memory available" in err
