"""`lmforge generate`: presets with the byte fallback tokenizer, sampling options, beams, dtypes; the
sampling defaults every generating command shows in its help."""

from __future__ import annotations

import argparse

import pytest

from lmforge.cli import build_parser
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


@pytest.mark.parametrize(
    "command, temperature, top_p, max_new_tokens",
    [("generate", "1", "1", "64"), ("chat", "0.7", "0.95", "256"), ("serve", "1", "1", None)],
)
def test_help_shows_every_sampling_default_and_where_defaults_come_from(command, temperature, top_p, max_new_tokens):
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subcommands.choices[command]
    helps = {a.option_strings[0]: a.help for a in sub._actions if a.option_strings}
    expected = {"--temperature": temperature, "--top-p": top_p, "--top-k": "0", "--min-p": "0"}
    expected["--repetition-penalty"] = "1"
    if max_new_tokens is not None:
        expected["--max-new-tokens"] = max_new_tokens
    for flag, value in expected.items():
        assert helps.get(flag) and helps[flag].endswith(f"(default: the model's, else {value})"), (
            flag,
            helps.get(flag),
        )
    assert "generation_config.json" in sub.epilog and "general.sampling" in sub.epilog
    assert ("a request's own fields" in sub.epilog) == (command == "serve")


def test_generate_compile_switch_gives_eager_greedy_text(monkeypatch, capsys):
    """--compile runs the fixed-shape step (here without inductor, to stay fast: tests/generate/test_compiled.py
    compiles it) and prints eager decoding's greedy text; --no-compile never builds the compiled step."""
    from lmforge.generate import compiled

    argv = ["generate", "llama-tiny", "--prompt", "Hello", "--max-new-tokens", "10", "--seed", "0", "--greedy"]
    monkeypatch.setattr(compiled, "_compiled_step", (compiled._decode_step, compiled._decode_step))
    run([*argv, "--compile"])
    fixed = capsys.readouterr().out

    def refuse():
        raise AssertionError("--no-compile must decode eagerly")

    monkeypatch.setattr(compiled, "compiled_decode_step", refuse)
    run([*argv, "--no-compile"])
    assert capsys.readouterr().out == fixed and fixed.strip()
    with pytest.raises(ValueError, match="beam search decodes eagerly"):
        run([*argv, "--compile", "--num-beams", "2", "--prompt", "Hi"])
