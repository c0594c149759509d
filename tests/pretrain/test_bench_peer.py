"""benchmarks/bench_pretrain.py's nanoGPT-style peer computes lmforge's gpt with bias=False and exact GELU: the
same function from the same weights, so the benchmark's speed ratio compares implementations, not models."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmforge import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_pretrain  # noqa: E402

NAMES = {"ln_1": "attn_norm", "qkv": "attn.qkv", "attn_proj": "attn.out", "ln_2": "ffn_norm", "fc": "ffn.fc"}
NAMES["mlp_proj"] = "ffn.proj"


def test_the_nanogpt_style_peer_is_lmforges_gpt_without_biases():
    torch.manual_seed(0)
    peer = bench_pretrain.PeerGPT(vocab_size=67, block=32, n_layer=2, n_head=4, d_model=64)
    ours = build_model(
        "gpt", n_layer=2, n_head=4, d_model=64, vocab_size=67, max_seq_len=32, bias=False, activation="gelu", dropout=0
    )
    renamed = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight", "norm.weight": "ln_f.weight"}
    for i in range(2):
        renamed.update({f"blocks.{i}.{b}.weight": f"blocks.{i}.{a}.weight" for a, b in NAMES.items()})
    peer_state = peer.state_dict()
    ours.load_state_dict({k: peer_state[v] for k, v in renamed.items()}, strict=False)  # lm_head: tied
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in peer.parameters())
    x = torch.randint(0, 67, (3, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(input_ids=x).logits, peer(x).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(input_ids=x, labels=x).loss, peer(x, labels=x).loss, atol=1e-6, rtol=1e-6)


def test_lmforges_rate_counts_every_window_after_the_first_as_the_peers_clock_does(tmp_path):
    """Windows of equal steps at 100 and 300 tokens/s (after a warm-up window) take 1/100 + 1/300 s per token:
    150 tokens/s over both, not their median; eval records are not training windows."""
    import json

    records = [{"split": "train", "tokens_per_s": r} for r in (5.0, 100.0, 300.0)]
    records.insert(2, {"split": "val", "tokens_per_s": 1.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rate = bench_pretrain.lmforge_tokens_per_s(tmp_path)  # arithmetic on the records above, not a timing
    assert abs(rate - 150.0) < 1e-9


def test_each_contestant_is_timed_in_a_fresh_process():
    """No contestant inherits another's allocator state, thread pools or caches: each run has a spawned process
    (a fresh interpreter), unless --same-process."""
    import os
    from types import SimpleNamespace

    assert bench_pretrain.contestant(SimpleNamespace(same_process=False), os.getpid) != os.getpid()
    assert bench_pretrain.contestant(SimpleNamespace(same_process=True), os.getpid) == os.getpid()


def _shakespeare_tokenizer(kind: str, vocab_size: int = 300):
    from lmforge.data.tokenizers.tokenizer import Tokenizer
    from lmforge.data.tokenizers.train import train_tokenizer

    text = bench_pretrain.DATA.read_text(encoding="utf-8")[:200_000]
    return Tokenizer(train_tokenizer(text.split("\n\n"), kind=kind, vocab_size=vocab_size)), text


def test_the_race_scores_every_token_after_the_first_once_whatever_the_window():
    tokens = torch.arange(1000).numpy() % 50
    for block in (2, 7, 64, 2000):
        _, count = bench_pretrain.full_split_nll(lambda x: torch.zeros(*x.shape, 50), tokens, block)
        assert count == len(tokens) - 1


def test_the_race_scores_a_bpe_model_in_nats_per_character():
    """A model that spreads each token's probability evenly over V tokens loses ln V nats a token; over the
    characters those tokens spell that is ln V * tokens / characters, below ln V by the tokens' mean length.
    A character tokenizer gives the per-token mean, the scale the race's nanoGPT baseline is measured on."""
    import math

    bpe, text = _shakespeare_tokenizer("bpe")
    val = text[150_000:170_000]
    ids = bpe.encode(val, add_special_tokens=False)
    assert len(ids) < 0.8 * len(val)  # merges span characters: the scale differs from a per-token mean
    uniform = lambda x: torch.zeros(*x.shape, 300)  # noqa: E731
    got = bench_pretrain.nats_per_char(uniform, bpe, val, block=64)
    first = len(bpe.decode(ids[:1]))
    assert math.isclose(got, math.log(300) * (len(ids) - 1) / (len(val) - first), rel_tol=1e-6)

    char, _ = _shakespeare_tokenizer("char")
    char_ids = char.encode(val, add_special_tokens=False)
    assert len(char_ids) == len(val)
    V = char.vocab_size
    logits = lambda x: torch.nn.functional.one_hot(x, V).float().roll(1, dims=-1)  # noqa: E731
    per_token = bench_pretrain.full_split_loss(logits, torch.tensor(char_ids).numpy(), 64)
    assert math.isclose(bench_pretrain.nats_per_char(logits, char, val, 64), per_token, rel_tol=1e-9)


def test_the_race_refuses_a_tokenizer_that_does_not_spell_the_text_back():
    import pytest

    char, _ = _shakespeare_tokenizer("char")
    with pytest.raises(ValueError, match="spell the validation text back"):
        bench_pretrain.nats_per_char(lambda x: torch.zeros(*x.shape, 80), char, "caf\u00e9 \u2603", 8)
