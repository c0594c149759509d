"""`resolve_model`: every kind of model name the commands accept, resolved to what loads, and one clear line
for a name that is none of them."""

from __future__ import annotations

import gguf
import pytest
import torch

from lmforge.hf import real_weights
from lmforge.hf.load import load_model
from lmforge.hf.resolve import resolve_model
from lmforge.hf.save import save_model, save_pretrained
from lmforge.models import build_model
from lmforge.train.checkpoint import save_checkpoint

TINY_GPT = dict(n_layer=1, n_head=2, d_model=32, vocab_size=64, max_seq_len=32)


def tiny_gpt(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("gpt", **TINY_GPT)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    other = b.state_dict()
    return all(torch.equal(t, other[n]) for n, t in a.state_dict().items())


def test_a_preset_builds_random_weights_only_where_the_command_allows_it():
    source = resolve_model("gpt-tiny")
    assert (source.kind, source.path) == ("preset", None)
    with pytest.raises(ValueError, match=r"'gpt-tiny' is a preset \(random weights\)"):
        resolve_model("gpt-tiny", presets=False)


def test_a_real_model_name_is_fetched_and_matched_without_case(tmp_path, monkeypatch):
    folder = tmp_path / "minilm"
    save_pretrained(tiny_gpt(), folder)
    monkeypatch.setitem(real_weights.REAL_MODELS, "all-MiniLM-L6-v2", lambda: folder)
    source = resolve_model("all-minilm-l6-v2", presets=False)
    assert (source.kind, source.path) == ("real", folder)
    assert same_weights(load_model("all-MiniLM-L6-v2"), load_model(folder))


def test_hugging_face_lmforge_and_checkpoint_folders_resolve_to_themselves(tmp_path):
    model = tiny_gpt()
    save_pretrained(model, tmp_path / "hf")
    save_model(model, tmp_path / "ours")
    step = save_checkpoint(tmp_path / "run", 5, model, None, None, {})
    assert resolve_model(tmp_path / "hf").kind == "huggingface"
    assert resolve_model(str(tmp_path / "ours")).kind == "lmforge"
    source = resolve_model(step)
    assert (source.kind, source.path) == ("checkpoint", step)
    for folder in (tmp_path / "hf", tmp_path / "ours", step):
        assert same_weights(load_model(folder), model)


def test_a_run_folder_gives_its_best_checkpoint_else_its_latest(tmp_path):
    run = tmp_path / "run"
    models = {}
    for step, is_best in ((10, True), (20, False)):
        models[step] = tiny_gpt(seed=step)
        save_checkpoint(run, step, models[step], None, None, {}, is_best=is_best)
    source = resolve_model(run)
    assert (source.kind, source.path.name) == ("run", "step_00000010")
    assert same_weights(load_model(run), models[10])
    assert resolve_model(run / "checkpoints").path.name == "step_00000010"  # the checkpoints folder is its run's
    (run / "checkpoints" / "best.json").unlink()
    assert resolve_model(str(run)).path.name == "step_00000020"


def test_a_fine_tuning_run_folder_gives_its_model_folder(tmp_path):
    run = tmp_path / "ft"
    model = tiny_gpt()
    save_checkpoint(run, 3, model, None, None, {}, is_best=True)
    save_model(model, run / "model")
    assert resolve_model(run).path == run / "model"


def test_a_gguf_file_resolves_to_itself(tmp_path):
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    source = resolve_model(path)
    assert (source.kind, source.path) == ("gguf", path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: "SmolLM2-135M-Instrukt", r"closest: SmolLM2-135M-Instruct"),
        (lambda tmp: "gpt-tinny", r"neither a preset.*closest: gpt-tiny"),
        (lambda tmp: tmp / "nowhere", r"nowhere not found"),
        (lambda tmp: tmp / "nowhere.gguf", r"nowhere.gguf not found"),
        (lambda tmp: tmp, r"config\.json not found; .* is not a model folder"),
        (lambda tmp: (tmp / "notes.txt").write_text("x") and tmp / "notes.txt", r"notes\.txt is a file"),
    ],
)
def test_anything_else_is_one_line_saying_what_is_accepted(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        resolve_model(make(tmp_path))
    assert "\n" not in str(error.value)


def test_an_unknown_name_lists_every_kind_accepted():
    with pytest.raises(FileNotFoundError) as error:
        resolve_model("no-such-model")
    text = str(error.value)
    for kind in ("gpt-tiny", "all-MiniLM-L6-v2", "SmolLM2-135M-Instruct", "Hugging Face", "lmforge", "step_N",
                 "run folder", ".gguf"):  # fmt: skip
        assert kind in text, kind


def test_a_run_folder_without_a_checkpoint_says_so(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"run folder .*run has no complete checkpoint"):
        resolve_model(tmp_path / "run")
