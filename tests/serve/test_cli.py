"""`lmforge chat` driven through a pipe (replies equal in-process greedy generation over the same
conversation; /reset forgets it; /exit stops reading), the sampling defaults `chat` and `generate` take from
a model's generation_config.json, one-line errors for broken chat templates, and `lmforge serve`'s
command-line errors.

(These live next to the serving tests, not under tests/commands/, to share the checkpoint fixture.)"""

from __future__ import annotations

import io
import socket
import subprocess
import sys

import pytest
import torch

from lmforge.cli import main
from lmforge.commands.generate import ByteTokenizer
from lmforge.data.tokenizers.tokenizer import load_tokenizer
from lmforge.generate import generate
from lmforge.hf.load import load_model
from lmforge.models import build_model


def reply_in_process(model, tokenizer, ids: list[int], max_new_tokens: int, **options) -> str:
    eos = getattr(tokenizer, "eos_token_id", None)
    out = generate(
        model, torch.tensor([ids]), max_new_tokens=max_new_tokens, tokenizer=tokenizer, eos_token_id=eos, **options
    )
    return out.texts[0]


def test_piped_chat_streams_replies_with_the_chat_template_and_resets(checkpoint):
    """Sampled at the chat's defaults (temperature 0.7, top_p 0.95) with seed 3 for every turn."""
    model, tok = load_model(checkpoint), load_tokenizer(checkpoint)

    def reply(messages):
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        return reply_in_process(model, tok, ids, 8, do_sample=True, temperature=0.7, top_p=0.95, seed=3)

    first = reply([{"role": "user", "content": "hello"}])
    second = reply(
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "how are you"},
        ]
    )
    command = [sys.executable, "-m", "lmforge", "chat", str(checkpoint), "--seed", "3", "--max-new-tokens", "8"]
    stdin = "hello\n/reset\nhello\nhow are you\n/exit\nnever read\n"
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert first.strip() and second.strip() and first != second
    assert result.stdout == f"{first}\n(conversation cleared)\n{first}\n{second}\n"


def test_chat_and_generate_decode_as_the_models_generation_config_says(variant, monkeypatch, capsys):
    """SmolLM2-Instruct's generation_config.json holds only token ids: transformers then decodes greedily, and
    so do `chat` and `generate` (before, they sampled at their own temperatures, 0.7 and 1.0). A flag still
    overrides the model."""
    folder = variant(generation_config={"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0})
    model, tok = load_model(folder), load_tokenizer(folder)
    messages = [{"role": "user", "content": "hello"}]
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    greedy = reply_in_process(model, tok, ids, 8)
    sampled = reply_in_process(model, tok, ids, 8, do_sample=True, temperature=0.7, top_p=0.95, seed=3)
    assert greedy != sampled  # the defaults matter for this seed
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", str(folder), "--seed", "3", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == greedy + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", str(folder), "--seed", "3", "--max-new-tokens", "8", "--temperature", "0.7"]) == 0
    assert capsys.readouterr().out == sampled + "\n"
    prompt_ids = tok.encode("The model")
    assert main(["generate", str(folder), "--prompt", "The model", "--seed", "3", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == reply_in_process(model, tok, prompt_ids, 8) + "\n"


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for i in range(10000000000) %}x{% endfor %}", "chat template asked for a range of 10000000000 items"),
        (5, "tokenizer_config.json: chat_template must be a Jinja template"),
        ([{"name": "default"}], "tokenizer_config.json: chat_template must be a Jinja template"),
    ],
    ids=["huge loop", "number", "named template without its text"],
)
def test_chat_and_generate_fail_in_one_line_on_a_broken_chat_template(template, message, variant, monkeypatch, capsys):
    folder = str(variant(chat_template=template))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n"))
    assert main(["chat", folder, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge chat: error: ") and message in err and err.count("\n") == 1, err
    assert main(["generate", folder, "--prompt", "hi", "--chat", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge generate: error: ") and message in err and err.count("\n") == 1, err


def test_chat_without_a_template_uses_a_plain_transcript(monkeypatch, capsys):
    torch.manual_seed(0)
    model = build_model("gpt-tiny").eval()
    ids = list(b"System: Be terse.\nUser: hello\nAssistant:")
    expected = reply_in_process(model, ByteTokenizer(), ids, 6, stop_strings=["\nUser:"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    argv = ["chat", "gpt-tiny", "--seed", "0", "--temperature", "0", "--max-new-tokens", "6", "--system", "Be terse."]
    assert main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_with_compile_replies_as_eager_decoding(monkeypatch, capsys):
    """--compile runs the fixed-shape decode step (here without inductor, to stay fast; tests/generate/
    test_compiled.py compiles it): the reply is eager decoding's greedy reply."""
    from lmforge.generate import compiled

    monkeypatch.setattr(compiled, "_compiled_step", (compiled._decode_step, compiled._decode_step))
    torch.manual_seed(0)
    model = build_model("gpt-tiny").eval()
    ids = list(b"User: hello\nAssistant:")
    expected = reply_in_process(model, ByteTokenizer(), ids, 6, stop_strings=["\nUser:"], compile=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "gpt-tiny", "--seed", "0", "--temperature", "0", "--max-new-tokens", "6", "--compile"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_runs_in_bfloat16_and_int8(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
    argv = ["chat", "llama-tiny", "--dtype", "bfloat16", "--quantize", "int8", "--max-new-tokens", "4", "--seed", "1"]
    assert main(argv) == 0
    assert capsys.readouterr().out.count("\n") >= 1


def test_serve_reports_a_taken_port(capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "gpt-tiny", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--concurrency", "0"], "--concurrency 0 must be >= 1"),
        (["--kv-slots", "0"], "--kv-slots 0 must be >= 1"),
        (["--prefill-chunk", "0"], "--prefill-chunk 0 must be >= 1"),
        (["--prefix-cache-tokens", "-1"], "--prefix-cache-tokens -1 must be >= 0"),
        (["--compile-warmup", "-5"], "--compile-warmup -5 must be >= 0"),
        (["--max-tokens-per-slot", "999999"], "--max-tokens-per-slot 999999 is more than the model's context"),
        (["--queue-size", "-1"], "--queue-size -1 must be >= 0"),
        (["--port", "70000"], "--port 70000 is not a TCP port"),
        (["--max-prompt-tokens", "0"], "max_prompt_tokens=0 must be >= 1"),
        (["--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
    ],
)
def test_serve_rejects_bad_settings(argv, message, capsys):
    assert main(["serve", "gpt-tiny", "--port", "0", *argv]) == 2
    assert message in capsys.readouterr().err


def test_serve_rejects_models_that_cannot_generate(capsys):
    assert main(["serve", "no-such-model", "--port", "0"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["serve", "bert-tiny", "--port", "0"]) == 2
    assert "cannot generate text" in capsys.readouterr().err
    assert main(["serve", "t5-tiny", "--port", "0", "--compile"]) == 2  # an encoder-decoder decodes eagerly
    assert "has no compiled decode step" in capsys.readouterr().err


def test_serve_loads_the_model_on_a_thread_of_its_own_and_reports_its_errors(monkeypatch, capsys):
    """The main thread must not build an OpenMP team the engine thread would compete with
    (`load_off_the_main_thread`); an error while loading is still the command's one-line error."""
    import threading

    from lmforge.commands import serve

    seen = []

    def failing_load(args, rows):
        seen.append((threading.current_thread(), rows))
        raise ValueError("model.safetensors is truncated; download it again")

    monkeypatch.setattr(serve, "load_for_generation", failing_load)
    assert main(["serve", "gpt-tiny", "--port", "0", "--concurrency", "6"]) == 2
    assert "model.safetensors is truncated" in capsys.readouterr().err
    assert len(seen) == 1 and seen[0][0] is not threading.main_thread()
    assert seen[0][1] == 6  # weights laid out for decoding steps of up to --concurrency rows
