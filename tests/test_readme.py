"""Every README snippet works as written: the Python blocks run, and every `lmforge` command line names a real
subcommand whose flags the parser accepts.

The Python blocks run in a scratch folder where the placeholder paths they use exist (`path/to/hf_folder`: a
tiny GPT saved as a Hugging Face folder with a tokenizer), so a reader who substitutes their own folder runs
exactly the code shown.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    """A scratch working folder holding what the README's placeholder paths point at."""
    from lmforge import build_model, save_pretrained
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.data.tokenizers.train import save_tokenizer, train_tokenizer

    specials = ["<pad>", "<|endoftext|>", "<unk>"]  # with a pad token: the snippet pads a batch
    backend = train_tokenizer(["Hello world", "Hi there, how are you?"], kind="char", special_tokens=specials)
    save_tokenizer(backend, tmp_path / "tok", "char", specials)
    tokenizer = load_tokenizer(tmp_path / "tok")
    model = build_model("gpt-tiny", vocab_size=tokenizer.vocab_size)
    save_pretrained(model, tmp_path / "path" / "to" / "hf_folder", tokenizer=tokenizer)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs_as_written(index, readme_folder, capsys):
    code = _blocks("python")[index]
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})


def _command_lines() -> list[list[str]]:
    lines = []
    for block in _blocks("sh"):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            words = shlex.split(line) if line else []
            if words and words[0].endswith("lmforge"):
                lines.append(words[1:])
    return lines


@pytest.mark.parametrize("argv", _command_lines(), ids=lambda a: " ".join(a[:2]))
def test_command_lines_name_real_subcommands(argv):
    from lmforge.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits (SystemExit) on an unknown subcommand or flag
    assert callable(args.func)
    if argv[0] in ("pretrain", "finetune") and "--help" not in argv:  # flags of the config schema: parse them
        from lmforge.finetune.config import FINETUNE
        from lmforge.pretrain.config import PRETRAIN
        from lmforge.train.config import parse_args

        parse_args(argv[1:], PRETRAIN if argv[0] == "pretrain" else FINETUNE)


def test_the_readme_opens_with_the_two_commands():
    first = _blocks("sh")[0].splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]
