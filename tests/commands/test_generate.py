"""`lmforge generate`: presets with the byte fallback tokenizer, sampling options, beams, dtypes."""

from __future__ import annotations

import argparse

import pytest

from lmforge.commands.generate import register


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lmforge")
    register(parser.add_subparsers(dest="command", required=True), {})
    args = parser.parse_args(argv)
    args.func(args)


def test_generate_streams_seeded_samples_reproducibly(capsys):
    argv = ["generate", "gpt-tiny", "--prompt", "Hello", "--max-new-tokens", "12", "--seed", "3", "--top-k", "20"]
    run(argv)
    first = capsys.readouterr()
    run(argv)
    second = capsys.readouterr()
    assert first.out == second.out and first.out.strip()
    assert "12 tokens" in first.err and "['length']" in first.err


@pytest.mark.parametrize(
    "extra",
    [
        ["--greedy", "--num-beams", "2"],
        ["--greedy", "--dtype", "bfloat16"],
        ["--temperature", "0", "--quantize", "int8", "--repetition-penalty", "1.2"],
    ],
)
def test_generate_runs_beams_bf16_and_int8_on_a_batch(extra, capsys):
    run(["generate", "llama-tiny", "--prompt", "Hi", "--prompt", "Hello there", "--max-new-tokens", "4", *extra])
    out = capsys.readouterr().out
    assert out.startswith("Hi") and "\nHello there" in out


def test_generate_rejects_an_unknown_model():
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        run(["generate", "no-such-model", "--prompt", "x"])
