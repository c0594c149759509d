"""Shared by the decoding tests: small gpt / llama models whose greedy paths are varied."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lmforge import build_model

SMALL = {"n_layer": 2, "n_head": 4, "d_model": 64, "vocab_size": 300}
MODELS = {
    "gpt": dict(SMALL, tie_embeddings=False),
    "llama": dict(SMALL, n_kv_heads=2, d_ff=128),  # grouped-query attention
}


def make_small_model(family: str, max_seq_len: int = 96) -> torch.nn.Module:
    """A 2-layer, 64-wide `family` model (seed 0) with its matrices scaled by 3: the logits spread out, so greedy
    decoding walks a varied path instead of repeating one token."""
    torch.manual_seed(0)
    model = build_model(family, **MODELS[family], max_seq_len=max_seq_len).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


@pytest.fixture
def small_model() -> Callable[..., torch.nn.Module]:
    """`small_model(family, max_seq_len=96)`: see `make_small_model`."""
    return make_small_model
