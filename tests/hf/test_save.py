"""`save_pretrained` (Hugging Face folders that transformers loads with the same outputs) and `save_model`
(lmforge's own format, an exact round trip), both written atomically."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from lmforge import build_model
from lmforge.hf.load import load_model
from lmforge.hf.save import save_model, save_pretrained

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

AUTO_CLASSES = {
    "none": transformers.AutoModel,
    "causal_lm": transformers.AutoModelForCausalLM,
    "masked_lm": transformers.AutoModelForMaskedLM,
    "seq2seq_lm": transformers.AutoModelForSeq2SeqLM,
    "sequence_classification": transformers.AutoModelForSequenceClassification,
    "token_classification": transformers.AutoModelForTokenClassification,
    "question_answering": transformers.AutoModelForQuestionAnswering,
}
SMALL = {
    "gpt": dict(n_layer=2, d_model=64, n_head=4, vocab_size=97, max_seq_len=32),
    "llama": dict(n_layer=2, d_model=64, n_head=4, vocab_size=97, max_seq_len=64, d_ff=96, pad_token_id=0),
    "bert": dict(n_layer=2, d_model=64, n_head=4, vocab_size=99, max_seq_len=40, d_ff=128),
    "roberta": dict(n_layer=2, d_model=64, n_head=4, vocab_size=99, max_seq_len=42, d_ff=128),
    "t5": dict(n_layer=2, d_model=32, n_head=4, head_dim=8, d_ff=64, vocab_size=99),
    "transformer": dict(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=99, max_seq_len=32),
}
CASES = {  # id: (family, overrides)
    "gpt-lm-tied": ("gpt", {}),
    "gpt-lm-untied": ("gpt", {"tie_embeddings": False}),
    "gpt-seq-cls": ("gpt", {"head": "sequence_classification", "num_labels": 3, "pad_token_id": 0}),
    "llama-gqa-tied": ("llama", {"n_kv_heads": 2, "tie_embeddings": True, "rope_theta": 500000.0}),
    "llama-bias-untied": ("llama", {"attention_bias": True, "attention_out_bias": True, "mlp_bias": True}),
    "qwen2": ("llama", {"attention_bias": True, "n_kv_heads": 1}),
    "qwen3": ("llama", {"qk_norm": True, "head_dim": 32, "n_kv_heads": 2}),
    "llama-token-cls": ("llama", {"head": "token_classification", "num_labels": 4}),
    "llama-qa": ("llama", {"head": "question_answering"}),
    "bert-base": ("bert", {}),
    "bert-mlm": ("bert", {"head": "masked_lm"}),
    "bert-seq-cls": ("bert", {"head": "sequence_classification", "num_labels": 3}),
    "roberta-mlm": ("roberta", {"head": "masked_lm"}),
    "roberta-seq-cls": ("roberta", {"head": "sequence_classification"}),
    "t5-v1.0": ("t5", {}),
    "t5-v1.1": ("t5", {"ffn": "geglu", "activation": "gelu_tanh", "tie_embeddings": False, "n_decoder_layer": 3}),
}


def make_ours(case: str) -> torch.nn.Module:
    family, overrides = CASES[case]
    torch.manual_seed(0)
    model = build_model(family, **{**SMALL[family], "dropout": 0.0, **overrides}).eval()
    with torch.no_grad():  # biases and gains start at 0 and 1; move them so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    c = model.config
    pad = c.pad_token_id if c.pad_token_id is not None else 0
    ids = torch.randint(3, c.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(9)[None, :] < torch.tensor([[9], [6], [2]])).long()
    inputs = {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}
    if c.family == "t5":
        inputs.update(decoder_input_ids=ids[:, :5], decoder_attention_mask=torch.ones(3, 5, dtype=torch.long))
    return inputs


def head_output(out, mask: torch.Tensor, hf: bool) -> torch.Tensor:
    """Logits (pad positions zeroed), QA start/end logits stacked as ours are, or the last hidden state."""
    if hf and hasattr(out, "start_logits"):
        value = torch.stack([out.start_logits, out.end_logits], dim=-1)
    else:
        value = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return value if value.dim() == 2 else value * mask[:, : value.shape[1], None]


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_saved_folder_with_identical_outputs(case, tmp_path):
    ours = make_ours(case)
    save_pretrained(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] and config["model_type"]
    theirs = AUTO_CLASSES[ours.config.head].from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == config["architectures"][0]
    inputs = batch(ours)
    mask = inputs.get("decoder_attention_mask", inputs["attention_mask"])
    with torch.no_grad():
        got, expected = head_output(ours(**inputs), mask, False), head_output(theirs(**inputs), mask, True)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    reloaded = load_model(tmp_path)  # and back: exactly the same tensors
    state = ours.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in reloaded.state_dict().items())


@pytest.mark.parametrize("case", [*CASES, "transformer"])
def test_lmforge_format_round_trip_is_exact(case, tmp_path):
    if case == "transformer":
        torch.manual_seed(0)
        model = build_model("transformer", **SMALL["transformer"]).eval()
    else:
        model = make_ours(case)
    save_model(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["format"] == "lmforge" and config["model"] == model.config.to_dict()
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(t, expected[n]) for n, t in loaded.state_dict().items())
    with torch.no_grad():
        inputs = batch(model) if case != "transformer" else {"input_ids": torch.randint(3, 99, (2, 7))}
        if case == "transformer":
            inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
        a, b = loaded(**inputs), model(**inputs)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state)
        assert (a.logits is None and b.logits is None) or torch.equal(a.logits, b.logits)


def test_tied_weights_are_stored_once_and_re_tied(tmp_path):
    model = make_ours("llama-gqa-tied")
    save_model(model, tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "tok_emb.weight" in names and "lm_head.weight" not in names
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    assert sum(1 for _ in loaded.parameters()) == sum(1 for _ in model.parameters())


def test_lmforge_folder_loads_with_a_new_head(tmp_path):
    save_model(make_ours("bert-mlm"), tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="classifier.out.weight"):
        model = load_model(tmp_path / "ckpt", head="token_classification", num_labels=5)
    assert model.classifier.out.weight.shape == (5, 64)


def test_lmforge_folder_missing_a_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(make_ours("gpt-lm-untied"), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(path)
    del state["lm_head.weight"]  # not an alias here: the head is untied
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        load_model(tmp_path / "ckpt")


def test_original_transformer_has_no_hf_twin(tmp_path):
    model = build_model("transformer", **SMALL["transformer"])
    with pytest.raises(ValueError, match=r"no Hugging Face equivalent.*save_model"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_save_leaves_nothing_behind(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(make_ours("gpt-lm-tied"), tmp_path / "out", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_existing_folders_are_replaced_only_when_asked_and_only_checkpoints(tmp_path):
    model = make_ours("gpt-lm-tied")
    save_model(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="exists and is not empty"):
        save_model(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "stale.txt").write_text("old")
    save_model(model, tmp_path / "ckpt", overwrite=True)
    assert not (tmp_path / "ckpt" / "stale.txt").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        save_pretrained(model, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes"]  # no temporary folders left


def test_tokenizer_files_are_saved_with_the_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    save_pretrained(make_ours("gpt-lm-tied"), tmp_path / "out", tokenizer=tokenizer)
    reloaded = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert reloaded.encode("hello world again").ids == [2, 3, 0]
