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
        ["--greedy", "--quantize", "int4", "--dtype", "bfloat16"],
    ],
)
def test_generate_runs_beams_bf16_int8_and_int4_on_a_batch(extra, capsys):
    run(["generate", "llama-tiny", "--prompt", "Hi", "--prompt", "Hello there", "--max-new-tokens", "4", *extra])
    out = capsys.readouterr().out
    assert out.startswith("Hi") and "\nHello there" in out


def test_quantize_int4_puts_the_blocks_in_4_bits_and_the_output_projection_in_int8():
    """--quantize int4: every block Linear becomes an Int4Linear with groups of 32, the output projection an int8
    QuantizedLinear, the logits stay close to fp32's, and blocks already in int4 (a `lmforge quantize` folder)
    keep their codes."""
    import copy

    import torch

    from lmforge import build_model
    from lmforge.commands.generate import quantize_for_decoding
    from lmforge.generate import prepare_for_decoding
    from lmforge.nn.quant import Int4Linear, QuantizedLinear
    from lmforge.quantize.recipe import quantize_model

    torch.manual_seed(0)
    dense = build_model("llama-tiny").eval()
    model = quantize_for_decoding(copy.deepcopy(dense), "int4")
    blocks = [m for m in model.blocks.modules() if isinstance(m, (Int4Linear, QuantizedLinear, torch.nn.Linear))]
    assert len(blocks) == 5 * dense.config.n_layer and all(isinstance(m, Int4Linear) for m in blocks)
    assert {m.group_size for m in blocks} == {32}
    assert isinstance(model.lm_head, QuantizedLinear)
    # the oracle: the float model carrying the dequantised weights. The decoding kernels round activations (int4:
    # to int8 per 32 inputs, llama.cpp's Q8 blocks, ~0.5% each; int8: to bf16), which compounds through the 16
    # kernel layers of this random model to 3.5% relative RMS (0.3% on the prefill path); a wrong layout is ~100%
    oracle = copy.deepcopy(dense)
    for name, layer in model.named_modules():
        if isinstance(layer, (Int4Linear, QuantizedLinear)):
            oracle.get_submodule(name).weight = torch.nn.Parameter(layer.dequantized_weight())
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, got = oracle(ids).logits, prepare_for_decoding(model)(ids[:, :1]).logits
        ref = ref[:, :1]
    assert ((got - ref).pow(2).mean() / ref.pow(2).mean()).sqrt() < 0.05

    folder = copy.deepcopy(dense)
    quantize_model(folder, "int4", group_size=32, grid="mse")  # what `lmforge quantize --method int4` saves
    codes = folder.blocks[0].attn.qkv.weight.clone()
    quantize_for_decoding(folder, "int4")
    assert torch.equal(folder.blocks[0].attn.qkv.weight, codes)  # not rounded again on the min-max grid
    assert isinstance(folder.lm_head, QuantizedLinear)


@pytest.mark.parametrize(
    "model, message",
    [
        ("t5-tiny", "--quantize int4 quantises Transformer blocks, and T5 has none; use --quantize int8"),
        ("gpt-tiny:d_model=48", "--quantize int4 takes groups of 32 inputs, and blocks.0.attn.qkv has 48"),
    ],
)
def test_quantize_int4_refuses_models_it_cannot_group_in_one_line(model, message):
    from lmforge import build_model
    from lmforge.commands.generate import quantize_for_decoding

    name, _, override = model.partition(":")
    options = {override.split("=")[0]: int(override.split("=")[1])} if override else {}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        quantize_for_decoding(build_model(name, **options).eval(), "int4")


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
