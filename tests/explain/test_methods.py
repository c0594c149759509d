"""The explanation methods against their oracles: Captum for IG and occlusion (completeness, a manual loop),
transformers for the logit lens, a hand-computed product for rollout; and the bad inputs."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.explain import METHODS, build_subject, rollout
from lmforge.explain.methods import lens_logits

TEXT = "the film was good but dull"
CASES = [("bert-tiny", "sequence_classification"), ("gpt-tiny", "causal_lm"), ("llama-tiny", "token_classification")]


@pytest.mark.parametrize(
    ("preset", "head"),
    [
        CASES[0],
        *(pytest.param(*c, marks=pytest.mark.slow) for c in [*CASES[1:], ("roberta-tiny", "sequence_classification")]),
    ],
)
def test_integrated_gradients_are_complete_within_one_percent(tiny_models, preset, head):
    model, tokenizer, _ = tiny_models(preset, head)
    subject = build_subject(model, tokenizer, TEXT)
    result = METHODS["ig"].run(subject, steps=32)
    with torch.no_grad():
        gap = float(subject.score(subject.input_ids) - subject.score(subject.baseline_ids()))
    assert len(result.token_scores) == subject.input_ids.shape[1]
    assert abs(sum(result.token_scores) - gap) <= 0.01 * abs(gap)  # sum_i a_i = F(x) - F(x') (Prop. 1)
    assert result.values["completeness_error"] <= 0.01


def test_occlusion_is_the_score_drop_of_each_replaced_token(tiny_models):
    model, tokenizer, folder = tiny_models("bert-tiny", "sequence_classification")
    subject = build_subject(model, tokenizer, TEXT, target="neutral", folder=folder)
    scores = METHODS["occlusion"].run(subject, steps=1).token_scores
    with torch.no_grad():
        full = float(subject.score(subject.input_ids))
        for i in range(len(scores)):
            occluded = subject.input_ids.clone()
            occluded[0, i] = subject.baseline_id()
            assert scores[i] == pytest.approx(full - float(subject.score(occluded)), abs=1e-5)


def test_rollout_matches_a_product_worked_by_hand():
    # one head, two tokens; layer 1 attends fully to token 0, layer 2 uniformly
    maps = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    # A'_1 = 0.5 A_1 + 0.5 I = [[1, 0], [0.5, 0.5]];  A'_2 = [[0.75, 0.25], [0.25, 0.75]]
    expected = torch.tensor([[0.75, 0.25], [0.25, 0.75]]) @ torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert torch.allclose(rollout(maps), expected)
    assert torch.allclose(rollout(maps).sum(-1), torch.ones(2))


def test_attention_and_rollout_scores_come_from_the_readout_position(tiny_models):
    model, tokenizer, _ = tiny_models("gpt-tiny", "causal_lm")
    subject = build_subject(model, tokenizer, TEXT)
    attention = METHODS["attention"].run(subject, steps=1)
    T = subject.input_ids.shape[1]
    assert attention.attention.shape == (2, 4, T, T) and subject.position == T - 1
    assert torch.allclose(torch.tensor(attention.token_scores), attention.attention[-1, :, -1].mean(0))
    assert torch.allclose(
        torch.tensor(METHODS["rollout"].run(subject, 1).token_scores), rollout(attention.attention)[-1]
    )


def test_logit_lens_matches_transformers_hidden_states_through_ln_f():
    from lmforge.explain.subject import Subject
    from lmforge.hf import ADAPTERS
    from lmforge.models.gpt import GPT

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=3,
                                                              n_head=4)).eval()  # fmt: skip
    config = ADAPTERS["gpt"].config_from_hf(hf.config.to_dict(), head="causal_lm")
    ours = GPT(config).eval()
    ours.load_state_dict(ADAPTERS["gpt"].state_dict_from_hf(hf.state_dict(), config))
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(2))
    subject = Subject(ours, None, ids, ["x"] * 7, "causal_lm", target=5, target_name="5", position=6)
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states  # HF applies ln_f to the last one already
        expected = [hf.lm_head(hf.transformer.ln_f(h))[0] for h in hidden[:-1]] + [hf.lm_head(hidden[-1])[0]]
    lens = lens_logits(subject)
    assert lens.shape == (4, 7, 97)
    assert (lens - torch.stack(expected)).abs().max() < 1e-4
    assert (lens[-1] - ours(ids).logits[0]).abs().max() < 1e-5  # the last layer's lens is the model's output


def test_bad_inputs_are_one_clear_error(tiny_models):
    model, tokenizer, folder = tiny_models("bert-tiny", "sequence_classification")
    with pytest.raises(ValueError, match=r"'joyful' is not a label of this model; its labels are \['negative'"):
        build_subject(model, tokenizer, TEXT, target="joyful", folder=folder)
    subject = build_subject(model, tokenizer, TEXT)
    with pytest.raises(ValueError, match="logit-lens does not apply to a sequence classification model"):
        METHODS["logit-lens"].check(subject)
    long = build_subject(model, tokenizer, " ".join([TEXT] * 10))
    assert long.input_ids.shape[1] == 32
    assert long.notes and "truncated to 32" in long.notes[0] and "context of 32" in long.notes[0]
    lm, lm_tokenizer, _ = tiny_models("gpt-tiny", "causal_lm")
    with pytest.raises(ValueError, match="is 2 tokens for this tokenizer; a causal LM's target is one token"):
        build_subject(lm, lm_tokenizer, TEXT, target="pl")


def test_deletion_curve_removes_the_top_ranked_content_tokens_first(tiny_models):
    from lmforge.explain.faithfulness import aopc, deletion_curve

    model, tokenizer, folder = tiny_models("bert-tiny", "sequence_classification")
    subject = build_subject(model, tokenizer, TEXT, folder=folder)
    ids = subject.input_ids[0]
    T = len(ids)
    scores = [0.0] * T
    scores[2], scores[0] = 5.0, 9.0  # position 0 is [CLS]: special tokens are never deleted

    def p(kept):
        with torch.no_grad():
            logits = model(input_ids=kept[None], attention_mask=torch.ones(1, len(kept), dtype=torch.long)).logits
        return float(torch.softmax(logits, -1)[0, subject.target])

    curve = deletion_curve(subject, scores, fractions=(0.01,))
    assert curve[0] == pytest.approx(p(ids) - p(torch.cat([ids[:2], ids[3:]])), abs=1e-6)
    assert aopc(subject, scores, fractions=(0.01, 0.01)) == pytest.approx(curve[0], abs=1e-6)


def test_integrated_gradients_equal_a_hand_written_gauss_legendre_sum(tiny_models):
    """Captum is the engine; this holds it to the definition, written out independently: the embedding layer's
    output is moved along e' + alpha (e - e') and a_i = sum_d (e - e')_{i,d} sum_k w_k dF/de_{i,d}(alpha_k), with
    Gauss-Legendre nodes and weights mapped from [-1, 1] to [0, 1] (Captum's default rule)."""
    import numpy as np

    model, tokenizer, _ = tiny_models("bert-tiny", "sequence_classification")
    subject = build_subject(model, tokenizer, TEXT)
    steps = 32
    ours = torch.tensor(METHODS["ig"].run(subject, steps=steps).token_scores, dtype=torch.float64)

    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor(0.5 * (nodes + 1.0), dtype=torch.float32)[:, None, None]
    w = torch.tensor(0.5 * weights, dtype=torch.float32)
    embedding = subject.model.tok_emb
    with torch.no_grad():
        e, e0 = embedding(subject.input_ids), embedding(subject.baseline_ids())
    path = (e0 + alphas * (e - e0)).requires_grad_(True)  # (steps, T, d)
    hook = embedding.register_forward_hook(lambda module, args, out: path)
    try:
        scores = subject.score(subject.input_ids.expand(steps, -1))
    finally:
        hook.remove()
    (grads,) = torch.autograd.grad(scores.sum(), path)
    reference = ((e - e0)[0] * (w[:, None, None] * grads).sum(0)).sum(-1).double()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("preset", "head"), [("lstm-tiny", "sequence_classification"), ("bilstm", "token_classification")]
)
def test_a_recurrent_model_is_explained_by_gradients_and_occlusion_and_refuses_attention(tiny_models, preset, head):
    model, tokenizer, _ = tiny_models(preset, head)
    subject = build_subject(model, tokenizer, TEXT + " " + TEXT * 20)  # no context limit: nothing truncated
    assert subject.notes == []
    ig = METHODS["ig"].run(subject, steps=32)
    assert ig.values["completeness_error"] <= 0.01
    assert len(METHODS["occlusion"].run(subject, steps=1).token_scores) == subject.input_ids.shape[1]
    for name in ("attention", "rollout"):
        with pytest.raises(ValueError, match=f"--method {name} needs self-attention and the lstm model has none"):
            METHODS[name].check(subject)
