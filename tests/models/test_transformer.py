"""The original encoder-decoder Transformer against PyTorch's own post-norm layers.

No Hugging Face class implements Vaswani et al. (2017) as published, so the oracle is a stack of
`torch.nn.TransformerEncoderLayer` / `TransformerDecoderLayer` (post-norm, ReLU, no final norms) with our
weights copied in, fed embeddings and sinusoids computed here from the paper's formulas.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.heads import shift_right
from lmforge.models.transformer import Transformer, TransformerConfig
from lmforge.nn.attention import Attention, reference_attention

SMALL = dict(vocab_size=61, max_seq_len=32, n_layer=2, n_head=4, d_model=32, d_ff=64, dropout=0.0, norm_eps=1e-5)


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(**{**SMALL, **overrides})).eval()


def paper_sinusoids(n_positions: int, d: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), element by element."""
    pe = torch.zeros(n_positions, d, dtype=torch.float64)
    for pos in range(n_positions):
        for i in range(0, d, 2):
            pe[pos, i] = math.sin(pos / 10000 ** (i / d))
            pe[pos, i + 1] = math.cos(pos / 10000 ** (i / d))
    return pe.float()


def copy_linear(dst: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    dst.weight.data.copy_(weight)
    dst.bias.data.copy_(bias)


def torch_reference(model: Transformer) -> tuple[list[nn.Module], list[nn.Module]]:
    """PyTorch layers holding our weights. in_proj_weight stacks W_q, W_k, W_v by rows, as our qkv does."""
    c = model.config
    kwargs = dict(
        d_model=c.d_model,
        nhead=c.n_head,
        dim_feedforward=c.d_ff,
        dropout=0.0,
        activation="relu",
        layer_norm_eps=c.norm_eps,
        batch_first=True,
        norm_first=False,
    )
    encoder = []
    for ours in model.encoder:
        ref = nn.TransformerEncoderLayer(**kwargs)
        ref.self_attn.in_proj_weight.data.copy_(ours.attn.qkv.weight)
        ref.self_attn.in_proj_bias.data.copy_(ours.attn.qkv.bias)
        copy_linear(ref.self_attn.out_proj, ours.attn.out.weight, ours.attn.out.bias)
        copy_linear(ref.linear1, ours.ffn.fc.weight, ours.ffn.fc.bias)
        copy_linear(ref.linear2, ours.ffn.proj.weight, ours.ffn.proj.bias)
        copy_linear(ref.norm1, ours.attn_norm.weight, ours.attn_norm.bias)
        copy_linear(ref.norm2, ours.ffn_norm.weight, ours.ffn_norm.bias)
        encoder.append(ref.eval())
    decoder = []
    for ours in model.decoder:
        ref = nn.TransformerDecoderLayer(**kwargs)
        ref.self_attn.in_proj_weight.data.copy_(ours.attn.qkv.weight)
        ref.self_attn.in_proj_bias.data.copy_(ours.attn.qkv.bias)
        copy_linear(ref.self_attn.out_proj, ours.attn.out.weight, ours.attn.out.bias)
        cross = ours.cross_attn
        ref.multihead_attn.in_proj_weight.data.copy_(torch.cat([cross.q.weight, cross.kv.weight]))
        ref.multihead_attn.in_proj_bias.data.copy_(torch.cat([cross.q.bias, cross.kv.bias]))
        copy_linear(ref.multihead_attn.out_proj, cross.out.weight, cross.out.bias)
        copy_linear(ref.linear1, ours.ffn.fc.weight, ours.ffn.fc.bias)
        copy_linear(ref.linear2, ours.ffn.proj.weight, ours.ffn.proj.bias)
        copy_linear(ref.norm1, ours.attn_norm.weight, ours.attn_norm.bias)
        copy_linear(ref.norm2, ours.cross_norm.weight, ours.cross_norm.bias)
        copy_linear(ref.norm3, ours.ffn_norm.weight, ours.ffn_norm.bias)
        decoder.append(ref.eval())
    return encoder, decoder


def reference_logits(model, src, src_mask, tgt, tgt_mask) -> torch.Tensor:
    """logits = y_N W_out^T, y from PyTorch's layers; embeddings sqrt(d) E[ids] + PE. Runs with autograd on,
    which keeps PyTorch off its inference fast path (that one zeroes padded rows)."""
    encoder, decoder = torch_reference(model)
    d = model.config.d_model
    pe = paper_sinusoids(max(src.shape[1], tgt.shape[1]), d)
    x = model.src_emb.weight[src] * math.sqrt(d) + pe[: src.shape[1]]
    for layer in encoder:
        x = layer(x, src_key_padding_mask=~src_mask.bool())
    y = model.tgt_emb.weight[tgt] * math.sqrt(d) + pe[: tgt.shape[1]]
    causal = torch.ones(tgt.shape[1], tgt.shape[1], dtype=torch.bool).triu(1)  # True = hidden
    for layer in decoder:
        y = layer(
            y,
            x,
            tgt_mask=causal,
            tgt_key_padding_mask=~tgt_mask.bool(),
            memory_key_padding_mask=~src_mask.bool(),
        )
    return y @ model.lm_head.weight.T


def padded_batch(vocab: int, lengths: list[int], seed: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, max(lengths)) with real tokens drawn from [3, vocab) and the matching mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask


def max_diff_on_real(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b).abs()[mask.bool()].max().item()


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # shared vocabulary, tied output
        {"attention": "reference"},
        {"tgt_vocab_size": 45, "share_embeddings": False},  # tied to the target embedding only
        {"tgt_vocab_size": 45, "share_embeddings": False, "tie_embeddings": False, "n_decoder_layer": 3},
        {"share_embeddings": False, "n_layer": 1, "n_head": 2, "d_model": 24, "d_ff": 40, "norm_eps": 1e-6},
    ],
    ids=["shared-tied", "reference-attention", "unshared-tied", "unshared-untied-3dec", "other-shapes"],
)
def test_matches_pytorch_transformer_layers(overrides):
    model = make_model(**overrides)
    c = model.config
    src, src_mask = padded_batch(c.vocab_size, [9, 5, 7], seed=1)
    tgt, tgt_mask = padded_batch(c.target_vocab_size, [6, 8, 3], seed=2)
    out = model(src, src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
    expected = reference_logits(model, src, src_mask, tgt, tgt_mask)
    assert out.logits.shape == (3, 8, c.target_vocab_size)
    assert max_diff_on_real(out.logits, expected, tgt_mask) <= 1e-5


def test_positions_are_the_papers_sinusoids():
    model = make_model()
    assert torch.allclose(model.pos_emb.table, paper_sinusoids(32, 32), atol=1e-6)
    assert not list(model.pos_emb.parameters()) and "pos_emb.table" not in model.state_dict()


def test_base_parameter_count_matches_hand_formula():
    """Base model, d = 512, d_ff = 2048, N = 6 + 6 layers, shared vocabulary V = 37000, tied output:

    shared embedding (also the pre-softmax linear):   V d                          = 18,944,000
    attention (W_q, W_k, W_v, W_o and their biases):   A = 4 (d^2 + d)              =  1,050,624
    feed-forward:                                      F = 2 d d_ff + d_ff + d      =  2,099,712
    LayerNorm (gain and bias):                         L = 2 d                      =      1,024
    encoder layer: A + F + 2L = 3,152,384;  x 6                                    = 18,914,304
    decoder layer: 2A + F + 3L = 4,204,032 (self- and cross-attention);  x 6       = 25,224,192
    total                                                                          = 63,082,496

    Table 3 of the paper reports 65M. The 44.1M in the layers do not depend on the vocabulary, so the
    remaining 20.9M would be an embedding matrix of about 40,800 rows: the paper's "about 37000 tokens"
    is rounded, and its exact vocabulary (tensor2tensor's subword vocabulary, not published with the
    count) is the likely difference. Untying the output projection would give 82M, so the paper did tie.
    Sinusoidal positions are a fixed buffer and add nothing.
    """
    with torch.device("meta"):
        model = Transformer(TransformerConfig())
    V, d, d_ff, N = 37000, 512, 2048, 6
    A, F_, L = 4 * (d * d + d), 2 * d * d_ff + d_ff + d, 2 * d
    expected = V * d + N * (A + F_ + 2 * L) + N * (2 * A + F_ + 3 * L)
    assert expected == 63_082_496
    assert sum(p.numel() for p in model.parameters()) == expected
    with torch.device("meta"):
        untied = Transformer(TransformerConfig(tie_embeddings=False))
    assert sum(p.numel() for p in untied.parameters()) == expected + V * d


def test_kv_cache_decoding_matches_full_forward():
    model = make_model(n_decoder_layer=3)
    src, src_mask = padded_batch(61, [9, 4], seed=3)
    tgt, _ = padded_batch(61, [7, 7], seed=4)
    full = model(src, src_mask, decoder_input_ids=tgt).logits

    first = model(src, src_mask, decoder_input_ids=tgt[:, :3], use_cache=True)  # prefill 3 tokens
    cache, memory = first.past_key_values, first.encoder_last_hidden_state
    assert len(cache) == 3 and sorted(cache.cross_kv) == [0, 1, 2]
    steps = [first.logits]
    for t in range(3, 7):
        out = model(
            attention_mask=src_mask,
            encoder_outputs=memory,
            decoder_input_ids=tgt[:, t : t + 1],
            past_key_values=cache,
        )
        steps.append(out.logits)
    assert len(cache) == 7
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_kv_cache_with_padded_decoder_batch():
    """Rows of different target lengths: the decoder mask covers cached and new positions."""
    model = make_model()
    src, src_mask = padded_batch(61, [6, 8], seed=5)
    tgt, tgt_mask = padded_batch(61, [5, 3], seed=6)
    full = model(src, src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask).logits
    first = model(src, src_mask, tgt[:, :2], tgt_mask[:, :2], use_cache=True)
    steps = [first.logits]
    for t in range(2, 5):
        out = model(
            attention_mask=src_mask,
            encoder_outputs=first.encoder_last_hidden_state,
            decoder_input_ids=tgt[:, t : t + 1],
            decoder_attention_mask=tgt_mask[:, : t + 1],
            past_key_values=first.past_key_values,
        )
        steps.append(out.logits)
    assert max_diff_on_real(torch.cat(steps, dim=1), full, tgt_mask) <= 1e-5


def test_padded_source_batch_matches_each_sequence_alone():
    model = make_model()
    lengths = [9, 4, 6]
    src, src_mask = padded_batch(61, lengths, seed=7)
    tgt, tgt_mask = padded_batch(61, [5, 7, 2], seed=8)
    batch = model(src, src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
    for i, (n, m) in enumerate(zip(lengths, tgt_mask.sum(1).tolist(), strict=True)):
        alone = model(src[i : i + 1, :n], decoder_input_ids=tgt[i : i + 1, :m])
        assert (batch.logits[i, :m] - alone.logits[0]).abs().max().item() <= 1e-5
        assert (batch.encoder_last_hidden_state[i, :n] - alone.encoder_last_hidden_state[0]).abs().max() <= 1e-5


def test_unshared_vocabularies():
    model = make_model(tgt_vocab_size=45, share_embeddings=False)
    assert model.src_emb.weight.shape == (61, 32) and model.tgt_emb.weight.shape == (45, 32)
    assert model.src_emb is not model.tgt_emb and model.lm_head.weight is model.tgt_emb.weight
    src = torch.tensor([[60, 5, 7]])  # id 60 exists in the source vocabulary only
    assert model(src, decoder_input_ids=torch.tensor([[1, 44]])).logits.shape == (1, 2, 45)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(src, decoder_input_ids=torch.tensor([[1, 50]]))
    shared = make_model()
    assert shared.src_emb is shared.tgt_emb and shared.lm_head.weight is shared.src_emb.weight
    assert make_model(tgt_vocab_size=61).tgt_emb is not None  # an explicit, equal target vocabulary is fine


def test_share_embeddings_with_different_vocab_sizes_raises():
    with pytest.raises(ValueError, match=r"share_embeddings=True needs one vocabulary.*tgt_vocab_size=45"):
        TransformerConfig(**SMALL, tgt_vocab_size=45)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_head": 5}, "n_head=5 does not divide d_model=32"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_decoder_layer": 0}, "n_decoder_layer"),
        ({"activation": "tanh"}, "activation"),
        ({"head": "causal_lm"}, "head"),
        ({"bos_token_id": 61}, r"bos_token_id=61 must be a token id in \[0, tgt_vocab_size=61\)"),
        ({"pad_token_id": 50, "tgt_vocab_size": 45, "share_embeddings": False}, "pad_token_id=50"),
    ],
)
def test_invalid_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**SMALL, **overrides})


def test_labels_are_shifted_right_into_decoder_inputs():
    labels = torch.tensor([[7, 8, 9, 2], [5, 2, -100, -100]])
    assert shift_right(labels, 1, 0).tolist() == [[1, 7, 8, 9], [1, 5, 2, 0]]
    model = make_model()
    src, src_mask = padded_batch(61, [5, 3], seed=9)
    out = model(src, src_mask, labels=labels)
    same = model(src, src_mask, decoder_input_ids=shift_right(labels, 1, 0))
    assert torch.equal(out.logits, same.logits)
    expected = F.cross_entropy(same.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.allclose(out.loss, expected)


def test_head_none_returns_decoder_states():
    model = make_model(head="none")
    assert model.lm_head is None
    out = model(torch.tensor([[4, 5, 6]]), decoder_input_ids=torch.tensor([[1, 9]]))
    assert out.logits is None and out.loss is None and out.last_hidden_state.shape == (1, 2, 32)
    assert out.encoder_last_hidden_state.shape == (1, 3, 32)


def test_encoder_outputs_are_reused():
    model = make_model()
    src, tgt = torch.tensor([[4, 5, 6, 7]]), torch.tensor([[1, 9, 10]])
    memory = model.encode(src)
    assert torch.equal(model(encoder_outputs=memory, decoder_input_ids=tgt).logits, model(src, None, tgt).logits)
    with pytest.raises(ValueError, match="input_ids or a precomputed encoder_outputs"):
        model(decoder_input_ids=tgt)
    with pytest.raises(ValueError, match="decoder_input_ids, or labels"):
        model(src)


def test_reference_attention_is_used_everywhere():
    model = make_model(attention="reference")
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attentions) == 2 + 2 * 2 and all(a.attend is reference_attention for a in attentions)


def test_init_is_glorot_per_projection_and_scaled_normal_embeddings():
    d = 256
    model = make_model(vocab_size=4000, d_model=d, d_ff=1024, n_layer=1)
    emb = model.src_emb.weight
    assert abs(emb.std().item() - d**-0.5) < 0.02 * d**-0.5
    glorot = math.sqrt(6 / (d + d))  # one d x d projection
    for attn in (model.encoder[0].attn, model.decoder[0].cross_attn):
        for linear in (attn.q, attn.kv) if attn.cross else (attn.qkv,):
            for w in linear.weight.split(d):
                assert w.abs().max() <= glorot and abs(w.std().item() - glorot / math.sqrt(3)) < 0.05 * glorot
            assert not linear.bias.any()
    fc = model.encoder[0].ffn.fc.weight
    assert abs(fc.std().item() - math.sqrt(6 / (d + 1024)) / math.sqrt(3)) < 0.02 * fc.std().item()
    assert torch.equal(model.encoder[0].attn_norm.weight, torch.ones(d))


def test_dropout_is_applied_in_training_only():
    model = make_model(dropout=0.3)
    src, tgt = torch.tensor([[4, 5, 6, 7]]), torch.tensor([[1, 9, 10]])
    eval_logits = model(src, None, tgt).logits
    model.train()
    assert not torch.allclose(model(src, None, tgt).logits, eval_logits)
    model.eval()
    assert torch.equal(model(src, None, tgt).logits, eval_logits)


def test_config_json_round_trip():
    config = TransformerConfig(**SMALL, tgt_vocab_size=45, share_embeddings=False, n_decoder_layer=3)
    values = json.loads(config.to_json())
    assert values["family"] == "transformer"
    assert TransformerConfig.from_dict(values) == config
