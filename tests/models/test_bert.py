"""BERT and RoBERTa against Hugging Face `transformers`, the oracle, on small random-weight models."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.hf import ADAPTERS
from lmforge.models.bert import Bert, BertConfig, RobertaConfig

ADAPTER = ADAPTERS["bert"]

TOL = 1e-4
HEADS = ["none", "masked_lm", "sequence_classification", "token_classification", "question_answering"]
HF_SUFFIX = {
    "none": "Model",
    "masked_lm": "ForMaskedLM",
    "sequence_classification": "ForSequenceClassification",
    "token_classification": "ForTokenClassification",
    "question_answering": "ForQuestionAnswering",
}
LENGTHS = [11, 7, 4]  # right-padded batch: row 0 is full, rows 1 and 2 end in pads


def hf_classes(family: str):
    prefix = {"bert": "Bert", "roberta": "Roberta"}[family]
    config_cls = getattr(transformers, f"{prefix}Config")
    return config_cls, {head: getattr(transformers, prefix + suffix) for head, suffix in HF_SUFFIX.items()}


def small_hf_config(family: str, head: str, **overrides):
    config_cls, models = hf_classes(family)
    values = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        type_vocab_size=2 if family == "bert" else 1,
        pad_token_id=0 if family == "bert" else 1,
        layer_norm_eps=1e-12 if family == "bert" else 1e-5,
        num_labels=2 if head == "question_answering" else 3,  # HF's QA head splits its logits in two
        architectures=[models[head].__name__],
    )
    values.update(overrides)
    return config_cls(**values)


def perturb(model: torch.nn.Module) -> None:
    """Random init leaves biases at 0 and LayerNorms at 1/0; nudge every parameter so mappings are tested."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def batch(family: str, vocab_size: int, pad: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    input_ids = torch.randint(3, vocab_size, (B, T), generator=g)  # ids 0..2 are BERT/RoBERTa specials
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    token_type_ids = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        attention_mask[b, :n] = 1
        input_ids[b, n:] = pad
        if family == "bert":
            token_type_ids[b, n // 2 : n] = 1  # second segment
    return input_ids, attention_mask, token_type_ids


def hf_pair(family: str, head: str, **overrides):
    """A perturbed HF model and our model loaded from it through the hf mapping."""
    torch.manual_seed(0)
    hf_cfg = small_hf_config(family, head, **overrides)
    hf = hf_classes(family)[1][head](hf_cfg).eval()
    perturb(hf)
    cfg = ADAPTER.config_from_hf(hf_cfg.to_dict())
    ours = Bert(cfg).eval()
    ours.load_state_dict(ADAPTER.state_dict_from_hf(hf.state_dict(), cfg), strict=True)
    return hf, ours, cfg


def labels_for(head: str, cfg: BertConfig, mask: torch.Tensor):
    g = torch.Generator().manual_seed(2)
    B, T = mask.shape
    if head == "masked_lm":
        labels = torch.randint(0, cfg.vocab_size, (B, T), generator=g).masked_fill(mask == 0, -100)
        return labels, {"labels": labels}
    if head == "sequence_classification":
        labels = torch.randint(0, cfg.num_labels, (B,), generator=g)
        return labels, {"labels": labels}
    if head == "token_classification":
        labels = torch.randint(0, cfg.num_labels, (B, T), generator=g).masked_fill(mask == 0, -100)
        return labels, {"labels": labels}
    if head == "question_answering":
        labels = torch.stack([torch.tensor([1, 2, 0]), torch.tensor([3, 5, 2])], dim=-1)
        return labels, {"start_positions": labels[:, 0], "end_positions": labels[:, 1]}
    return None, {}


def assert_matches_hf(hf, ours, cfg: BertConfig, head: str) -> None:
    input_ids, mask, types = batch(cfg.family, cfg.vocab_size, cfg.pad_token_id)
    labels, hf_labels = labels_for(head, cfg, mask)
    real = mask.bool()
    with torch.no_grad():
        ref = hf(input_ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True, **hf_labels)
        out = ours(input_ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert (out.last_hidden_state[real] - ref.hidden_states[-1][real]).abs().max() <= TOL
    if head == "none":
        assert (out.pooler_output - ref.pooler_output).abs().max() <= TOL
        assert out.logits is None
        return
    if head == "question_answering":
        assert (out.start_logits[real] - ref.start_logits[real]).abs().max() <= TOL
        assert (out.end_logits[real] - ref.end_logits[real]).abs().max() <= TOL
    elif head == "sequence_classification":
        assert (out.logits - ref.logits).abs().max() <= TOL
    else:
        assert (out.logits[real] - ref.logits[real]).abs().max() <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("head", HEADS)
def test_matches_hf_for_every_head(family, head):
    hf, ours, cfg = hf_pair(family, head)
    assert cfg.family == family and cfg.head == head
    assert_matches_hf(hf, ours, cfg, head)


def test_pooler_exactly_where_hf_has_one():
    for family in ("bert", "roberta"):
        for head in HEADS:
            _, ours, _ = hf_pair(family, head)
            has_pooler = head == "none" or (head == "sequence_classification" and family == "bert")
            assert (ours.pooler is not None) == has_pooler, (family, head)


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_hidden_layers": 1, "num_attention_heads": 2},
        {"num_hidden_layers": 3, "num_attention_heads": 8},
        {"hidden_act": "gelu_pytorch_tanh"},
        {"hidden_act": "gelu_new"},
        {"hidden_act": "relu"},
        {"layer_norm_eps": 1e-5},
        {"layer_norm_eps": 1e-3, "intermediate_size": 20},
    ],
    ids=["1layer-2heads", "3layers-8heads", "gelu_tanh", "gelu_new", "relu", "eps1e-5", "eps1e-3-dff20"],
)
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_matches_hf_across_configs(family, overrides):
    hf, ours, cfg = hf_pair(family, "masked_lm", **overrides)  # the MLM head exercises the activation twice
    assert_matches_hf(hf, ours, cfg, "masked_lm")


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_reference_attention_matches_hf(family):
    hf, ours, cfg = hf_pair(family, "sequence_classification")
    ref_cfg = cfg.replace(attention="reference")
    ref = Bert(ref_cfg).eval()
    ref.load_state_dict(ours.state_dict())
    assert_matches_hf(hf, ref, ref_cfg, "sequence_classification")


def test_roberta_positions_count_real_tokens_from_pad_plus_one():
    model = Bert(RobertaConfig(vocab_size=50, max_seq_len=20, n_layer=1, n_head=2, d_model=8, d_ff=16))
    ids = torch.tensor([[5, 6, 7, 1, 1], [1, 8, 9, 1, 4]])
    expected = torch.tensor([[2, 3, 4, 1, 1], [1, 2, 3, 1, 4]])
    assert torch.equal(model.default_position_ids(ids), expected)
    bert = Bert(BertConfig(vocab_size=50, max_seq_len=20, n_layer=1, n_head=2, d_model=8, d_ff=16))
    assert torch.equal(bert.default_position_ids(ids), torch.arange(5)[None, :])


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_padded_batch_equals_each_sequence_alone(family, attention):
    config_cls = {"bert": BertConfig, "roberta": RobertaConfig}[family]
    cfg = config_cls(
        vocab_size=97,
        max_seq_len=40,
        n_layer=2,
        n_head=4,
        d_model=32,
        d_ff=48,
        attention=attention,
        head="none",
    )
    torch.manual_seed(0)
    model = Bert(cfg).eval()
    perturb(model)
    input_ids, mask, types = batch(family, cfg.vocab_size, cfg.pad_token_id)
    with torch.no_grad():
        out = model(input_ids, attention_mask=mask, token_type_ids=types)
        for b, n in enumerate(LENGTHS):
            alone = model(input_ids[b : b + 1, :n], token_type_ids=types[b : b + 1, :n])
            assert (out.last_hidden_state[b, :n] - alone.last_hidden_state[0]).abs().max() <= 1e-5
            assert (out.pooler_output[b] - alone.pooler_output[0]).abs().max() <= 1e-5


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_hf():
    with torch.device("meta"):
        bert_base = Bert(BertConfig())
        roberta_base = Bert(RobertaConfig())
        hf_bert = transformers.BertModel(transformers.BertConfig(**ADAPTER.config_to_hf(BertConfig())))
        hf_roberta = transformers.RobertaModel(transformers.RobertaConfig(**ADAPTER.config_to_hf(RobertaConfig())))
    assert count(bert_base) == count(hf_bert) == 109_482_240
    assert count(roberta_base) == count(hf_roberta) == 124_645_632
    with torch.device("meta"):
        mlm = Bert(BertConfig(head="masked_lm"))
    assert mlm.lm_head.decoder.weight is mlm.tok_emb.weight  # tied, counted once


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("head", HEADS)
def test_round_trip_to_hf(family, head):
    config_cls = {"bert": BertConfig, "roberta": RobertaConfig}[family]
    num_labels = 2 if head == "question_answering" else 3
    cfg = config_cls(
        vocab_size=97,
        max_seq_len=40,
        n_layer=2,
        n_head=4,
        d_model=32,
        d_ff=48,
        head=head,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    ours = Bert(cfg).eval()
    perturb(ours)
    hf_dict = ADAPTER.config_to_hf(cfg)
    assert ADAPTER.config_from_hf(hf_dict) == cfg
    config_cls_hf, models = hf_classes(family)
    hf = models[head](config_cls_hf(**hf_dict)).eval()
    hf_state = ADAPTER.state_dict_to_hf(ours.state_dict(), cfg)
    hf.load_state_dict(hf_state, strict=True)
    back = ADAPTER.state_dict_from_hf(hf_state, cfg)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    assert_matches_hf(hf, ours, cfg, head)


def test_released_checkpoint_extras_are_dropped():
    """bert-base-uncased style: an MLM checkpoint with a pooler, the NSP head, gamma/beta and position ids."""
    hf, ours, cfg = hf_pair("bert", "masked_lm")
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in hf.state_dict().items()}
    state["bert.pooler.dense.weight"] = torch.zeros(32, 32)
    state["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    state["bert.embeddings.position_ids"] = torch.arange(40)[None]
    del state["cls.predictions.decoder.weight"]  # tied; often not stored
    loaded = ADAPTER.state_dict_from_hf(state, cfg)
    assert all(torch.equal(loaded[k], v) for k, v in ours.state_dict().items())


def test_missing_and_unexpected_tensors_are_named():
    hf, _, cfg = hf_pair("roberta", "token_classification")
    state = hf.state_dict()
    missing = {k: v for k, v in state.items() if k != "classifier.bias"}
    with pytest.raises(ValueError, match="classifier.bias"):
        ADAPTER.state_dict_from_hf(missing, cfg)
    with pytest.raises(ValueError, match="extra.weight"):
        ADAPTER.state_dict_from_hf({**state, "extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        ADAPTER.state_dict_to_hf({}, cfg)


def test_config_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="n_head"):
        BertConfig(n_head=5)
    with pytest.raises(ValueError, match="head"):
        BertConfig(head="causal_lm")
    with pytest.raises(ValueError, match="pad_token_id"):
        RobertaConfig(vocab_size=10, pad_token_id=10)
    with pytest.raises(ValueError, match="activation"):
        BertConfig(activation="tanh")
    cfg = RobertaConfig(n_layer=3, head="masked_lm")
    assert RobertaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="family"):
        BertConfig.from_dict(cfg.to_dict())
    with pytest.raises(ValueError, match="model_type"):
        ADAPTER.config_from_hf({"model_type": "gpt2"})


def test_head_override_and_architecture_parsing():
    hf_cfg = small_hf_config("bert", "masked_lm").to_dict()
    assert ADAPTER.config_from_hf(hf_cfg).head == "masked_lm"
    assert ADAPTER.config_from_hf(hf_cfg, head="token_classification").head == "token_classification"
    assert ADAPTER.config_from_hf({**hf_cfg, "architectures": ["BertForPreTraining"]}).head == "masked_lm"
    with pytest.raises(ValueError, match="BertLMHeadModel"):
        ADAPTER.config_from_hf({**hf_cfg, "architectures": ["BertLMHeadModel"]})


def test_mlm_loss_trains_tied_embedding():
    cfg = BertConfig(vocab_size=50, max_seq_len=16, n_layer=1, n_head=2, d_model=16, d_ff=32, head="masked_lm")
    model = Bert(cfg)
    ids = torch.randint(3, 50, (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert model.tok_emb.weight.grad is not None and model.tok_emb.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_mean_pooled_classifier_reads_the_mean_of_real_tokens(family):
    """pooling="mean": the sequence classifier's input is sentence-transformers' sentence vector, the mean of
    the real tokens' last hidden states; padding leaves it unchanged; no pooler is built, and transformers has
    no such head, so a Hugging Face save is refused in one line."""
    from lmforge.hf.save import save_pretrained

    config_cls = {"bert": BertConfig, "roberta": RobertaConfig}[family]
    shape = dict(vocab_size=97, max_seq_len=40, n_layer=2, n_head=4, d_model=32, d_ff=48, dropout=0.0)
    torch.manual_seed(0)
    model = Bert(config_cls(**shape, head="sequence_classification", num_labels=3, pooling="mean")).eval()
    perturb(model)
    assert model.pooler is None
    input_ids, mask, types = batch(family, 97, model.config.pad_token_id)
    with torch.no_grad():
        out = model(input_ids, attention_mask=mask, token_type_ids=types)
        hidden = out.last_hidden_state
        for b, n in enumerate(LENGTHS):
            mean = hidden[b, :n].mean(dim=0)
            torch.testing.assert_close(out.logits[b], model.classifier(mean[None])[0], atol=1e-5, rtol=1e-5)
            alone = model(input_ids[b : b + 1, :n], token_type_ids=types[b : b + 1, :n]).logits[0]
            torch.testing.assert_close(out.logits[b], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mean-pooled sequence classifier .* has no transformers class"):
        save_pretrained(model, "unused-folder")
    with pytest.raises(ValueError, match="pooling='max' is not allowed"):
        config_cls(**shape, pooling="max")
