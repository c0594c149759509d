"""StaticKVCache: in-place buffers give the same results as the growing KVCache."""

from __future__ import annotations

import pytest
import torch

from lmforge import build_model
from lmforge.nn.attention import KVCache, StaticKVCache


@torch.no_grad()
def test_static_cache_decoding_matches_the_concatenating_cache():
    torch.manual_seed(0)
    model = build_model("llama", n_layer=2, n_head=4, n_kv_heads=2, d_model=32, vocab_size=50, max_seq_len=32).eval()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    static, dynamic = StaticKVCache(max_len=9), KVCache()
    for end in (6, 7, 8, 9):  # prefill 6 tokens, then one at a time
        start = 0 if end == 6 else end - 1
        a = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=static, use_cache=True)
        b = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=dynamic, use_cache=True)
        assert torch.allclose(a.logits, b.logits, atol=1e-6)
        assert len(static) == len(dynamic) == end


def test_static_cache_reorders_rows_and_refuses_to_overflow():
    cache = StaticKVCache(max_len=3)
    k = torch.arange(2 * 1 * 2 * 1.0).view(2, 1, 2, 1)
    cache.append(0, k, -k)
    cache.reorder(torch.tensor([1, 1]))
    keys, values = cache.self_kv[0]
    assert torch.equal(keys, k[[1, 1]]) and torch.equal(values, -k[[1, 1]])
    with pytest.raises(ValueError, match="holds 3 positions"):
        cache.append(0, k, k)
