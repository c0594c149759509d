"""The recurrent family: padding never changes a sentence's output, pooling means what it says, presets and
saving work like every other family's."""

from __future__ import annotations

import pytest
import torch

from lmforge.hf.load import load_model
from lmforge.hf.save import save_model
from lmforge.models import build_model


def padded_batch(lengths: list[int], vocab: int = 1000, pad: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths) + 3  # extra padding beyond the longest row too
    ids = torch.randint(4, vocab, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("lstm-tiny", {"pooling": "last"}),
        ("lstm-tiny", {"pooling": "max", "bidirectional": True}),
        ("gru-tiny", {"pooling": "last", "bidirectional": True}),
    ],
)
def test_padding_does_not_change_a_sentences_output(preset, overrides):
    model = build_model(preset, head="sequence_classification", num_labels=3, **overrides).eval()
    ids, mask = padded_batch([7, 3, 1, 5])
    batch = model(ids, mask)
    for i, n in enumerate(mask.sum(-1).tolist()):
        alone = model(ids[i : i + 1, :n])  # the sentence by itself, no padding, no mask
        torch.testing.assert_close(batch.logits[i : i + 1], alone.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch.last_hidden_state[i, :n], alone.last_hidden_state[0], rtol=1e-5, atol=1e-6)
        assert batch.last_hidden_state[i, n:].abs().max() == 0  # no state is computed at a pad


def test_token_classification_logits_of_real_tokens_ignore_padding():
    model = build_model("lstm-tiny", head="token_classification", num_labels=5, bidirectional=True).eval()
    ids, mask = padded_batch([6, 2])
    logits = model(ids, mask).logits
    assert logits.shape == (2, ids.shape[1], 5)
    for i, n in enumerate(mask.sum(-1).tolist()):
        torch.testing.assert_close(logits[i, :n], model(ids[i : i + 1, :n]).logits[0], rtol=1e-5, atol=1e-6)


def test_pooling_reads_the_right_states():
    """last (bidirectional) = [forward state at the last real token ; backward state at the first token];
    mean and max run over the real tokens only."""
    ids, mask = padded_batch([5, 2], seed=1)
    pooled = {}
    for pooling in ("last", "mean", "max"):
        torch.manual_seed(0)
        model = build_model("lstm-tiny", bidirectional=True, pooling=pooling).eval()
        out = model(ids, mask)
        pooled[pooling], h = out.pooler_output, out.last_hidden_state
    H = h.shape[-1] // 2
    for i, n in enumerate(mask.sum(-1).tolist()):
        real = h[i, :n]  # (n, 2H)
        torch.testing.assert_close(pooled["last"][i], torch.cat([real[-1, :H], real[0, H:]]))
        torch.testing.assert_close(pooled["mean"][i], real.mean(0))
        torch.testing.assert_close(pooled["max"][i], real.max(0).values)


def test_lstm_seed_mirrors_the_seeds_keras_shapes():
    """Embedding(128) -> LSTM(64, return_sequences) -> LSTM(64) -> a two-way classifier; each layer holds
    Keras' 4 (h (d + h) + h) weights plus torch's second bias vector, 4h."""
    model = build_model("lstm-seed", vocab_size=5000, head="sequence_classification")
    rnn = model.rnn
    assert isinstance(rnn, torch.nn.LSTM) and rnn.num_layers == 2 and not rnn.bidirectional
    assert (rnn.input_size, rnn.hidden_size) == (128, 64)
    per_layer = [4 * (64 * (d + 64) + 64) + 4 * 64 for d in (128, 64)]
    assert sum(p.numel() for p in rnn.parameters()) == sum(per_layer)
    assert model.classifier.out.out_features == 2


def test_saved_model_reloads_with_the_same_outputs(tmp_path):
    model = build_model("gru-tiny", head="sequence_classification", pooling="mean").eval()
    ids, mask = padded_batch([4, 6])
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.config == model.config
    torch.testing.assert_close(again(ids, mask).logits, model(ids, mask).logits)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="pooling='first'.*last"):
        build_model("lstm-tiny", pooling="first")
    with pytest.raises(ValueError, match="head='causal_lm'"):
        build_model("lstm-tiny", head="causal_lm")


def test_gradients_reach_every_parameter():
    model = build_model("lstm-tiny", head="token_classification", num_labels=4, bidirectional=True, dropout=0.0)
    ids, mask = padded_batch([6, 4])
    labels = torch.randint(0, 4, ids.shape).masked_fill(mask == 0, -100)
    model(ids, mask, labels=labels).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []


def test_token_ids_outside_the_vocabulary_are_refused():
    model = build_model("gru-tiny")
    with pytest.raises(ValueError, match="token id 1024 is outside the vocabulary"):
        model(torch.tensor([[5, 1024]]))
