"""Behaviour every model family must have, checked on each family's tiny preset."""

import json

import pytest
import torch

from lmforge import PRESETS, build_config, build_model, config_from_dict, model_stats

DECODERS = ["gpt-tiny", "llama-tiny"]
ENCODERS = ["bert-tiny", "roberta-tiny"]
ENCODER_DECODERS = ["t5-tiny", "transformer-tiny"]
LM_HEAD = {
    "gpt": "causal_lm",
    "llama": "causal_lm",
    "bert": "masked_lm",
    "roberta": "masked_lm",
    "t5": "seq2seq_lm",
    "transformer": "seq2seq_lm",
}
# the language-model families; the recurrent classifiers (lstm, gru) have no LM head: tests/models/test_lstm.py
TINY = [name for name in PRESETS if name.endswith("-tiny") and PRESETS[name][0] in LM_HEAD]


def tiny(name, **overrides):
    torch.manual_seed(0)
    family = PRESETS[name][0]
    overrides.setdefault("head", LM_HEAD[family])
    return build_model(name, dropout=0.0, **overrides).eval()


def ids(B, T, seed=0, low=5, high=1000):
    return torch.randint(low, high, (B, T), generator=torch.Generator().manual_seed(seed))


def run(model, input_ids, attention_mask=None, **kw):
    """Forward any family; encoder-decoders get the same fixed decoder input on every row (unless labels)."""
    if model.config.family in ("t5", "transformer") and "labels" not in kw:
        kw["decoder_input_ids"] = ids(1, 5, seed=9).expand(input_ids.shape[0], -1)
    return model(input_ids, attention_mask=attention_mask, **kw)


@pytest.mark.parametrize("name", DECODERS)
def test_changing_later_tokens_never_changes_earlier_logits(name):
    model = tiny(name)
    x = ids(2, 12)
    y = x.clone()
    y[:, 7:] = ids(2, 5, seed=1)
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("name", ENCODER_DECODERS)
def test_decoder_side_is_causal(name):
    model = tiny(name)
    src, dec = ids(2, 8), ids(2, 10, seed=2)
    dec2 = dec.clone()
    dec2[:, 6:] = ids(2, 4, seed=3)
    with torch.no_grad():
        a = model(src, decoder_input_ids=dec).logits
        b = model(src, decoder_input_ids=dec2).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", DECODERS + ENCODERS + ENCODER_DECODERS)
def test_right_padded_batch_equals_each_sequence_alone(name):
    model = tiny(name)
    lengths = [9, 5, 7]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batch = torch.full((3, 9), pad)
    mask = torch.zeros(3, 9, dtype=torch.long)
    rows = [ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    for i, row in enumerate(rows):
        batch[i, : row.shape[1]], mask[i, : row.shape[1]] = row[0], 1
    with torch.no_grad():
        padded = run(model, batch, mask).logits
        for i, row in enumerate(rows):
            alone = run(model, row).logits
            n = row.shape[1]
            got = padded[i] if model.config.family in ("t5", "transformer") else padded[i, :n]
            torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("gpt-tiny", {}),
        ("llama-tiny", {}),
        ("llama-tiny", {"n_kv_heads": 1}),
        ("llama-tiny", {"n_kv_heads": 4}),
    ],
)
def test_kv_cache_decoding_matches_full_forward(name, overrides):
    model = tiny(name, **overrides)
    x = ids(3, 11)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, 11):
            out = model(x[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_kv_cache_with_left_padding_matches_full_forward(name):
    model = tiny(name)
    x = ids(2, 8)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        full = model(x, attention_mask=mask).logits
        out = model(x[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 8):
            out = model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1)[:, 3:], full[:, 3:], atol=1e-5, rtol=0)
    # Left padding must not change a row's result: row 0 equals its real tokens run alone.
    with torch.no_grad():
        alone = model(x[:1, 3:]).logits
    torch.testing.assert_close(full[0, 3:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_left_padded_batch_stays_finite_under_bf16_autocast(name):
    model = tiny(name)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids(2, 6), attention_mask=mask).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ENCODER_DECODERS)
def test_encoder_decoder_kv_cache_matches_full_forward(name):
    model = tiny(name)
    src, dec = ids(2, 7), ids(2, 6, seed=4)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    with torch.no_grad():
        full = model(src, attention_mask=mask, decoder_input_ids=dec).logits
        out = model(src, attention_mask=mask, decoder_input_ids=dec[:, :1], use_cache=True)
        steps = [out.logits]
        for t in range(1, 6):
            out = model(
                attention_mask=mask,
                decoder_input_ids=dec[:, t : t + 1],
                encoder_outputs=out.encoder_last_hidden_state,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_sdpa_model_equals_reference_attention_model(name):
    model = tiny(name)
    reference = tiny(name, attention="reference")
    reference.load_state_dict(model.state_dict())
    x = ids(2, 9)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    with torch.no_grad():
        a, b = run(model, x, mask).logits, run(reference, x, mask).logits
    real = mask.bool() if model.config.family not in ("t5", "transformer") else slice(None)
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_every_parameter(name):
    model = tiny(name)
    model.train()
    x = ids(2, 10)
    labels = x if model.config.family not in ("t5", "transformer") else ids(2, 6, seed=5)
    run(model, x, labels=labels).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_overfits_one_batch(name):
    model = tiny(name)
    model.train()
    x = ids(2, 16)
    family = model.config.family
    labels = x.flip(-1)[:, :8] if family in ("t5", "transformer") else x
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        loss = model(x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"{name} did not overfit: final loss {loss.item():.3f}"


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_round_trips_through_json_exactly(name):
    config = build_config(name)
    again = config_from_dict(json.loads(config.to_json()))
    assert again == config and type(again) is type(config)


PUBLISHED_PARAMETERS = {
    "gpt2": 124_439_808,  # GPT2Model
    "gpt2-medium": 354_823_168,
    "bert-base": 109_482_240,  # BertModel with pooler
    "roberta-base": 124_645_632,  # RobertaModel with pooler
    "t5-small": 60_506_624,
    "t5-base": 222_903_552,
    "llama-135m": 134_515_008,  # SmolLM2-135M
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_parameter_counts_equal_published_ones(name):
    assert model_stats(build_config(name))["parameters"] == PUBLISHED_PARAMETERS[name]


def test_flops_per_token_is_6n_plus_attention_for_gpt2():
    stats = model_stats(build_config("gpt2"), seq_len=1024)
    n_matmul = 124_439_808 - 1024 * 768 - (2 * 768) * (2 * 12 + 1) - (2304 + 768 + 3072 + 768) * 12
    assert stats["flops_per_token"] == 6 * n_matmul + 12 * 12 * 768 * 1024


# Bad input: clear ValueErrors that name the field and what is allowed.


def test_unknown_preset_or_family_names_the_options():
    with pytest.raises(ValueError, match="unknown model 'gpt5'.*presets:.*gpt2.*families:.*llama"):
        build_model("gpt5")


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("gpt", {"d_model": 100, "n_head": 3}, "n_head=3 does not divide d_model=100"),
        ("llama", {"n_head": 8, "n_kv_heads": 3}, "n_kv_heads=3 must divide n_head=8"),
        ("gpt", {"n_layer": 0}, "n_layer=0 must be a positive integer"),
        ("bert", {"vocab_size": -5}, "vocab_size=-5 must be a positive integer"),
        ("gpt", {"n_layers": 2}, r"unknown config key\(s\) \['n_layers'\].*valid keys"),
        ("gpt", {"dropout": 1.5}, r"dropout=1.5 must be a probability"),
        ("gpt", {"head": "masked_lm"}, "head='masked_lm' is not allowed for family 'gpt'"),
        ("gpt", {"attention": "flash"}, "attention='flash' is not allowed"),
    ],
)
def test_invalid_configs_raise_value_error_naming_the_field(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, **overrides)


@pytest.mark.parametrize("name", TINY)
def test_token_ids_outside_vocabulary_raise_before_indexing(name):
    model = tiny(name)
    x = ids(1, 4)
    x[0, 2] = model.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {model.config.vocab_size} is outside the vocabulary"):
        run(model, x)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "bert-tiny", "roberta-tiny", "transformer-tiny"])
def test_sequence_longer_than_positions_raises(name):
    model = tiny(name)
    x = ids(1, model.config.max_seq_len + 1)
    with pytest.raises(ValueError, match="longer than the model's max_seq_len"):
        run(model, x)
