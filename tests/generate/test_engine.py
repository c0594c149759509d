"""The decoding loop against full-forward decoding by hand, against itself (batched vs alone, streamed vs
not) and against transformers' `generate` on identical weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge import build_model
from lmforge.commands.generate import ByteTokenizer
from lmforge.generate import beam_search, encode_prompts, generate, stream
from lmforge.generate.engine import _IncrementalText
from lmforge.hf import ADAPTERS
from lmforge.nn.quant import quantize_int8

NEW = 8
SMALL = {"n_layer": 2, "n_head": 4, "d_model": 64, "vocab_size": 300}
MODELS = {
    "gpt": dict(SMALL, max_seq_len=64, tie_embeddings=False),
    "llama": dict(SMALL, n_kv_heads=2, d_ff=128, max_seq_len=64),  # grouped-query attention
    "t5": dict(SMALL, head_dim=16, d_ff=128, dropout=0.0, tie_embeddings=False),
    "transformer": dict(SMALL, d_ff=128, max_seq_len=64, dropout=0.0, tie_embeddings=False),
}


WEIGHT_SCALE = {"gpt": 3.0, "llama": 3.0, "t5": 3.0, "transformer": 1.0}


def small_model(family: str, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(family, **{**MODELS[family], **changes}).eval()
    with torch.no_grad():  # spread the logits so that greedy paths are varied, not one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(WEIGHT_SCALE[family])
    return model


def is_encoder_decoder(model) -> bool:
    return model.config.head == "seq2seq_lm"


@torch.no_grad()
def greedy_by_hand(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Argmax of a full forward pass over everything so far, no cache, one row at a time."""
    if is_encoder_decoder(model):
        start = getattr(model.config, "decoder_start_token_id", getattr(model.config, "bos_token_id", 0))
        seq = torch.full((ids.shape[0], 1), start)
        for _ in range(n):
            nxt = model(input_ids=ids, decoder_input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        return seq[:, 1:]
    seq = ids
    for _ in range(n):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, ids.shape[1] :]


def prompts(n: int = 3, vocab: int = 300) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (1, length), generator=g) for length in (7, 4, 1)[:n]]


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[1] for r in rows)
    ids = torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0), value=pad) for r in rows])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(r), (width - r.shape[1], 0)) for r in rows])
    return ids, mask


@pytest.mark.parametrize("family", list(MODELS))
def test_greedy_equals_argmax_of_full_forward_passes(family):
    model = small_model(family)
    seen = set()
    for ids in prompts():
        got = generate(model, ids, max_new_tokens=NEW, eos_token_id=[]).tokens
        assert torch.equal(got, greedy_by_hand(model, ids, NEW))
        seen |= set(got.flatten().tolist())
    assert len(seen) > 5  # varied paths, not one repeated token


@pytest.mark.parametrize("family", list(MODELS))
def test_left_padded_batch_equals_each_prompt_alone(family):
    model = small_model(family)
    rows = prompts()
    ids, mask = left_pad(rows)
    batched = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[]).tokens
    for i, row in enumerate(rows):
        assert torch.equal(batched[i], generate(model, row, max_new_tokens=NEW, eos_token_id=[]).tokens[0])


def test_sampling_with_a_seed_is_reproducible_and_seeds_differ():
    model = small_model("llama")
    ids, mask = left_pad(prompts())
    options = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, top_p=0.95, eos_token_id=[])
    a = generate(model, ids, mask, seed=7, **options).tokens
    b = generate(model, ids, mask, seed=torch.Generator().manual_seed(7), **options).tokens
    c = generate(model, ids, mask, seed=8, **options).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_each_row_independently_and_pads_it():
    model = small_model("gpt")
    ids, mask = left_pad(prompts())
    free = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[]).tokens
    eos = free[0, 3].item()  # row 0 reaches this token at step 3 (or earlier)
    stop_at = [(row == eos).nonzero()[0].item() if (row == eos).any() else None for row in free]
    out = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=299)
    for i, at in enumerate(stop_at):
        if at is None:
            assert out.finish_reasons[i] == "length" and torch.equal(out.tokens[i], free[i])
        else:
            assert out.finish_reasons[i] == "stop"
            assert torch.equal(out.tokens[i, : at + 1], free[i, : at + 1])  # the EOS itself is kept
            assert (out.tokens[i, at + 1 :] == 299).all()


def ascii_model():
    """A GPT over 128 byte values: every generated token is an ASCII character for `ByteTokenizer`."""
    return small_model("gpt", vocab_size=128)


def test_stop_string_cuts_the_text_exactly_before_it():
    model, tokenizer = ascii_model(), ByteTokenizer()
    ids, mask = encode_prompts(tokenizer, ["Hello", "Hi"])
    free = generate(model, ids, mask, max_new_tokens=20, tokenizer=tokenizer, eos_token_id=[])
    stop = free.texts[0][5:7]
    cut = free.texts[0].index(stop)
    out = generate(
        model, ids, mask, max_new_tokens=20, tokenizer=tokenizer, eos_token_id=[], pad_token_id=0, stop_strings=[stop]
    )
    assert out.texts[0] == free.texts[0][:cut] and out.finish_reasons[0] == "stop"
    last = cut + len(stop) - 1  # one byte per token: the token that completed the stop string
    assert torch.equal(out.tokens[0, : last + 1], free.tokens[0, : last + 1])
    assert (out.tokens[0, last + 1 :] == 0).all()
    if stop not in free.texts[1]:
        assert out.texts[1] == free.texts[1] and out.finish_reasons[1] == "length"


def test_stop_strings_need_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        generate(ascii_model(), torch.tensor([[1, 2]]), stop_strings=["x"])


def test_streaming_yields_the_same_tokens_and_text_as_generate():
    model, tokenizer = ascii_model(), ByteTokenizer()
    ids, mask = encode_prompts(tokenizer, ["Once upon", "A"])
    options = dict(max_new_tokens=16, tokenizer=tokenizer, do_sample=True, seed=3, eos_token_id=[], stop_strings=["e"])
    chunks = list(stream(model, ids, mask, **options))
    out = generate(model, ids, mask, **options)
    assert torch.equal(torch.stack([c.token_ids for c in chunks], 1), out.tokens)
    assert ["".join(c.text_deltas[i] for c in chunks) for i in range(2)] == out.texts
    assert chunks[-1].finish_reasons == out.finish_reasons


def test_incremental_text_reassembles_multibyte_characters_split_across_tokens():
    text = "naïve café → 東京 😀!"
    tracker = _IncrementalText(ByteTokenizer(), stop_strings=[])
    deltas = [tracker.push(b) for b in text.encode("utf-8")] + [tracker.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[text.encode().index("😀".encode()) : text.encode().index("😀".encode()) + 3] == ["", "", ""]


def test_incremental_text_holds_back_a_possible_stop_string_prefix():
    tracker = _IncrementalText(ByteTokenizer(), stop_strings=["END"])
    deltas = [tracker.push(b) for b in b"abEN"]
    assert "".join(deltas) == "ab"  # "EN" might begin "END"
    assert tracker.push(ord("x")) == "ENx"  # it did not
    assert tracker.push(ord("E")) + tracker.push(ord("N")) + tracker.push(ord("D")) == ""
    assert tracker.stopped and tracker.text == "abENx"


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_beam_search_with_one_beam_equals_greedy(family):
    model = small_model(family)
    ids, mask = left_pad(prompts())
    beams = beam_search(model, ids, mask, num_beams=1, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(beams.tokens, generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[]).tokens)


@torch.no_grad()
def sequence_logprob(model, prompt: torch.Tensor, new: torch.Tensor) -> float:
    if is_encoder_decoder(model):
        dec = torch.cat([torch.tensor([[model.config.decoder_start_token_id]]), new[None]], 1)
        logits = model(input_ids=prompt, decoder_input_ids=dec[:, :-1]).logits[0]
    else:
        logits = model(torch.cat([prompt, new[None]], 1)).logits[0, prompt.shape[1] - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, new[:, None]).sum().item()


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_beam_search_finds_sequences_at_least_as_likely_as_greedy(family):
    """Scored by the summed log-probability (length_penalty=0), recomputed with full forward passes."""
    model = small_model(family, vocab_size=40)  # few tokens: close calls between paths are common
    g = torch.Generator().manual_seed(5)
    strictly_better = 0
    for _ in range(4):
        prompt = torch.randint(3, 40, (1, 3), generator=g)
        greedy = generate(model, prompt, max_new_tokens=5, eos_token_id=[]).tokens[0]
        beams = beam_search(model, prompt, num_beams=4, max_new_tokens=5, length_penalty=0.0, eos_token_id=[])
        beam_score, greedy_score = (
            sequence_logprob(model, prompt, beams.tokens[0]),
            sequence_logprob(model, prompt, greedy),
        )
        assert beams.scores[0].item() == pytest.approx(beam_score, abs=1e-4)
        assert beam_score >= greedy_score - 1e-5
        strictly_better += beam_score > greedy_score + 1e-3
    assert strictly_better >= 1


def test_beam_search_batched_rows_equal_each_row_alone_and_stop_at_eos():
    model = small_model("gpt")
    rows = prompts()
    ids, mask = left_pad(rows)
    batched = beam_search(model, ids, mask, num_beams=3, max_new_tokens=8, eos_token_id=[5])
    for i, row in enumerate(rows):
        alone = beam_search(model, row, num_beams=3, max_new_tokens=8, eos_token_id=[5])
        width = alone.tokens.shape[1]
        assert torch.equal(batched.tokens[i, :width], alone.tokens[0])
        assert batched.finish_reasons[i] == alone.finish_reasons[0]


def hf_pair(kind: str):
    torch.manual_seed(0)
    if kind == "gpt":
        config = transformers.GPT2Config(
            vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None
        )
        hf, adapter = transformers.GPT2LMHeadModel(config).eval(), ADAPTERS["gpt"]
    else:
        config = transformers.LlamaConfig(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=None,
            eos_token_id=None,
        )
        hf, adapter = transformers.LlamaForCausalLM(config).eval(), ADAPTERS["llama"]
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    ours_config = adapter.config_from_hf(hf.config.to_dict(), head="causal_lm")
    ours = build_model(ours_config).eval()
    ours.load_state_dict(adapter.state_dict_from_hf(hf.state_dict(), ours_config))
    return hf, ours


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_greedy_matches_transformers_generate_on_a_left_padded_batch(kind):
    hf, ours = hf_pair(kind)
    ids, mask = left_pad(prompts(vocab=97))
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    got = generate(ours, ids, mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(got.tokens, expected[:, ids.shape[1] :])


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("variant", ["bf16", "int8"])
def test_bf16_and_int8_weights_stay_close_to_fp32(variant):
    model = small_model("llama", vocab_size=300)
    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(2))
    fast = small_model("llama", vocab_size=300)
    fast = fast.to(torch.bfloat16) if variant == "bf16" else quantize_int8(fast)
    with torch.no_grad():
        reference, logits = model(ids).logits, fast(ids).logits
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    greedy = generate(model, ids[:, :4], max_new_tokens=NEW, eos_token_id=[]).tokens
    agreement = (generate(fast, ids[:, :4], max_new_tokens=NEW, eos_token_id=[]).tokens == greedy).float().mean()
    print(
        f"{variant}: relative logit RMS error {relative_rms(logits, reference):.4f}, next-token top-1 {top1:.3f}, "
        f"greedy agreement {agreement:.3f}"
    )
    assert relative_rms(logits, reference) < 0.03
    assert top1 >= 0.9
