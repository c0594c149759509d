"""T5 against Hugging Face `transformers` (random small configs, fp32); cache, size and mapping checks."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from lmforge.hf import ADAPTERS
from lmforge.models.heads import shift_right
from lmforge.models.t5 import T5, T5Config

ADAPTER = ADAPTERS["t5"]

VOCAB = 99
# v1.0 (ReLU, tied, scaled output), v1.1 (GeGLU, separate lm_head) and one with few, short buckets;
# n_head * d_kv != d_model and n_decoder_layer != n_layer throughout.
HF_CONFIGS = {
    "v1.0": dict(d_model=32, d_kv=12, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4),
    "v1.1": dict(
        d_model=48,
        d_kv=8,
        d_ff=56,
        num_layers=3,
        num_decoder_layers=2,
        num_heads=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    ),
    "v1.0-short-buckets": dict(
        d_model=32,
        d_kv=8,
        d_ff=40,
        num_layers=1,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=10,
    ),
}
HF_CLASSES = {"seq2seq_lm": transformers.T5ForConditionalGeneration, "none": transformers.T5Model}


def make_pair(variant: str, head: str, attention: str = "sdpa") -> tuple[nn.Module, T5]:
    """A random HF model and ours holding the same weights."""
    torch.manual_seed(0)
    arch = HF_CLASSES[head].__name__
    hf_cfg = transformers.T5Config(
        vocab_size=VOCAB, architectures=[arch], decoder_start_token_id=0, **HF_CONFIGS[variant]
    )
    hf = HF_CLASSES[head](hf_cfg).eval()
    if head == "seq2seq_lm" and not hf_cfg.scale_decoder_outputs:
        # Transformers 5 ties lm_head to `shared` even for v1.1; untie it, as in v1.1 checkpoints.
        hf.lm_head.weight = nn.Parameter(torch.randn(VOCAB, hf_cfg.d_model))
    config = ADAPTER.config_from_hf(hf_cfg.to_dict()).replace(attention=attention)
    assert config.head == head
    model = T5(config).eval()
    model.load_state_dict(ADAPTER.state_dict_from_hf(hf.state_dict(), config), strict=True)
    return hf, model


def right_padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # pad id 0


@pytest.mark.parametrize(
    ("variant", "head", "attention"),
    [
        ("v1.0", "seq2seq_lm", "sdpa"),
        ("v1.1", "seq2seq_lm", "sdpa"),
        ("v1.1", "seq2seq_lm", "reference"),
        ("v1.0-short-buckets", "seq2seq_lm", "sdpa"),
        ("v1.0", "none", "sdpa"),
        ("v1.1", "none", "sdpa"),
    ],
)
def test_matches_transformers_on_padded_batches(variant: str, head: str, attention: str) -> None:
    hf, model = make_pair(variant, head, attention)
    input_ids, attention_mask = right_padded([24, 17, 5], seed=1)  # longer than max_distance=20 / 10
    decoder_input_ids, decoder_attention_mask = right_padded([12, 8, 3], seed=2)
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=decoder_attention_mask,
    )
    with torch.no_grad():
        ref, ours = hf(**inputs), model(**inputs)
    enc, dec = attention_mask.bool(), decoder_attention_mask.bool()
    assert (ours.encoder_last_hidden_state - ref.encoder_last_hidden_state)[enc].abs().max() <= 1e-4
    if head == "none":
        assert ours.logits is None
        assert (ours.last_hidden_state - ref.last_hidden_state)[dec].abs().max() <= 1e-4
    else:
        assert ours.logits.shape == (3, 12, VOCAB)
        assert (ours.logits - ref.logits)[dec].abs().max() <= 1e-4


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_loss_from_labels_matches_transformers(variant: str) -> None:
    hf, model = make_pair(variant, "seq2seq_lm")
    input_ids, attention_mask = right_padded([15, 9, 4], seed=3)
    targets, target_mask = right_padded([10, 6, 2], seed=4)
    labels = targets.masked_fill(target_mask == 0, -100)  # decoder inputs are built by shifting these
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        ours = model(input_ids, attention_mask, labels=labels)
    assert (ours.logits - ref.logits).abs().max() <= 1e-4
    assert abs(ours.loss.item() - ref.loss.item()) <= 1e-5


def test_shift_right_starts_with_decoder_start_and_replaces_ignored_labels() -> None:
    labels = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])
    assert shift_right(labels, 0, 0).tolist() == [[0, 5, 6, 7], [0, 8, 0, 0]]


@pytest.mark.parametrize(("variant", "attention"), [("v1.0", "sdpa"), ("v1.1", "sdpa"), ("v1.1", "reference")])
def test_kv_cache_matches_full_forward(variant: str, attention: str) -> None:
    _, model = make_pair(variant, "seq2seq_lm", attention)
    input_ids, attention_mask = right_padded([22, 13, 6], seed=5)
    decoder_input_ids = torch.randint(2, VOCAB, (3, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids).logits
        memory = model.encode(input_ids, attention_mask)
        out = model(
            attention_mask=attention_mask,
            encoder_outputs=memory,
            decoder_input_ids=decoder_input_ids[:, :4],
            use_cache=True,
        )
        steps, cache = [out.logits], out.past_key_values
        for t in range(4, 9):  # one token at a time, with a decoder mask over cached + new positions
            out = model(
                attention_mask=attention_mask,
                encoder_outputs=memory,
                decoder_input_ids=decoder_input_ids[:, t : t + 1],
                decoder_attention_mask=torch.ones(3, t + 1, dtype=torch.long),
                past_key_values=cache,
            )
            steps.append(out.logits)
    assert len(cache) == 9 and len(cache.cross_kv) == model.config.decoder_layers
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (dict(d_model=512, d_ff=2048, n_layer=6, n_head=8), 60_506_624),  # t5-small
        (dict(d_model=768, d_ff=3072, n_layer=12, n_head=12), None),  # t5-base
    ],
)
def test_parameter_counts_match_transformers(size: dict, expected: int | None) -> None:
    config = T5Config(**size)
    with torch.device("meta"):
        ours = count(T5(config))
        hf = count(transformers.T5ForConditionalGeneration(transformers.T5Config(**ADAPTER.config_to_hf(config))))
    assert ours == hf
    if expected is not None:
        assert ours == expected


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_round_trip_to_transformers(variant: str, tmp_path) -> None:
    torch.manual_seed(7)
    config = ADAPTER.config_from_hf(transformers.T5Config(vocab_size=VOCAB, **HF_CONFIGS[variant]).to_dict())
    model = T5(config).eval()
    assert ADAPTER.config_from_hf(ADAPTER.config_to_hf(config)) == config
    (tmp_path / "config.json").write_text(json.dumps(ADAPTER.config_to_hf(config)))
    save_file(ADAPTER.state_dict_to_hf(model.state_dict(), config), str(tmp_path / "model.safetensors"))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    input_ids, attention_mask = right_padded([11, 7], seed=8)
    decoder_input_ids, decoder_attention_mask = right_padded([6, 4], seed=9)
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=decoder_attention_mask,
    )
    with torch.no_grad():
        diff = (model(**inputs).logits - hf(**inputs).logits)[decoder_attention_mask.bool()]
    assert diff.abs().max() <= 1e-4


def test_state_dict_mapping_names_missing_and_unexpected_tensors() -> None:
    hf, model = make_pair("v1.0", "seq2seq_lm")
    state = dict(hf.state_dict())
    del state["decoder.block.1.layer.1.EncDecAttention.k.weight"]
    state["encoder.block.9.layer.0.SelfAttention.q.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"EncDecAttention\.k\.weight.*block\.9"):
        ADAPTER.state_dict_from_hf(state, model.config)
    ours = model.state_dict()
    del ours["encoder.norm.weight"]
    with pytest.raises(ValueError, match=r"encoder\.norm\.weight"):
        ADAPTER.state_dict_to_hf(ours, model.config)


def test_init_follows_mesh_tf_scaling() -> None:
    torch.manual_seed(0)
    c = T5Config(
        vocab_size=512,
        d_model=256,
        head_dim=32,
        n_head=4,
        d_ff=1024,
        n_layer=1,
        ffn="geglu",
        activation="gelu_tanh",
        tie_embeddings=False,
    )
    model = T5(c)
    inner = c.n_head * c.head_dim
    block = model.decoder.blocks[0]
    expected = {
        "q": (block.attn.qkv.weight[:inner], (c.d_model * c.head_dim) ** -0.5),
        "k, v": (block.attn.qkv.weight[inner:], c.d_model**-0.5),
        "cross q": (block.cross_attn.q.weight, (c.d_model * c.head_dim) ** -0.5),
        "cross k, v": (block.cross_attn.kv.weight, c.d_model**-0.5),
        "o": (block.attn.out.weight, inner**-0.5),
        "wi": (block.ffn.gate.weight, c.d_model**-0.5),
        "wo": (block.ffn.down.weight, c.d_ff**-0.5),
        "embedding": (model.shared.weight, 1.0),
        "lm_head": (model.lm_head.weight, 1.0),
    }
    for name, (weight, std) in expected.items():
        assert abs(weight.std().item() / std - 1) < 0.05, name
    assert torch.equal(block.attn_norm.weight, torch.ones(c.d_model))


def test_tied_output_shares_the_embedding() -> None:
    model = T5(T5Config(vocab_size=VOCAB, d_model=16, head_dim=4, n_head=2, d_ff=32, n_layer=1))
    assert model.lm_head.weight is model.shared.weight


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(ffn="geglu"), "activation"),
        (dict(ffn="swiglu"), "ffn"),
        (dict(relative_attention_num_buckets=2), "relative_attention_num_buckets"),
        (dict(relative_attention_max_distance=16), "relative_attention_max_distance"),
        (dict(n_decoder_layer=0), "n_decoder_layer"),
        (dict(dropout=1.0), "dropout"),
        (dict(head="causal_lm"), "head"),
        (dict(pad_token_id=32128), "pad_token_id"),
    ],
)
def test_invalid_config_names_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        T5Config(**changes)


def test_config_from_hf_reads_both_tying_conventions() -> None:
    old_v11 = {"model_type": "t5", "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    new_v11 = {
        "model_type": "t5",
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": True,
        "scale_decoder_outputs": False,
    }
    for hf_config in (old_v11, new_v11):
        config = ADAPTER.config_from_hf(hf_config)
        assert (config.tie_embeddings, config.ffn, config.activation) == (False, "geglu", "gelu_tanh")
    assert ADAPTER.config_from_hf({"model_type": "t5"}).tie_embeddings
    assert ADAPTER.config_from_hf({"architectures": ["T5Model"]}).head == "none"
    with pytest.raises(ValueError, match="T5EncoderModel"):
        ADAPTER.config_from_hf({"architectures": ["T5EncoderModel"]})
