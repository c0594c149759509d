"""The one return type of every model's forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.nn.attention import KVCache


@dataclass
class ModelOutput:
    """logits: the head's output (None for head="none"); loss: when labels were given.

    last_hidden_state: the final (normed) hidden states (B, T, d_model); pooler_output: BERT's pooled [CLS]
    vector when the model has a pooler; past_key_values: the KV cache when use_cache=True;
    encoder_last_hidden_state: the encoder output of encoder-decoder models (reuse it while decoding).
    """

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    encoder_last_hidden_state: torch.Tensor | None = None

    @property
    def start_logits(self) -> torch.Tensor:
        """Question answering: logits of each token being the answer's first token (B, T)."""
        return self.logits[..., 0]

    @property
    def end_logits(self) -> torch.Tensor:
        """Question answering: logits of each token being the answer's last token (B, T)."""
        return self.logits[..., 1]
