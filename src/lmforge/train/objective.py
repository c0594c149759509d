"""What one batch's training loss is: the `Objective` protocol every recipe hands to `train_loop`.

The loop needs two numbers per micro-batch to normalise gradient accumulation exactly (see
`lmforge.train.loop`): `count(batch)`, the units the loss averages over (target tokens, examples, label
weights), and `loss_sum(model, batch)`, the loss summed over those units. A pretraining objective
(`lmforge.pretrain.objectives`) and a fine-tuning task (`lmforge.finetune.tasks`) each implement it.

A loss may own trainable parameters of its own (`Objective.loss_module`: distillation's projections from the
student's width to the teacher's): the recipe gives them to the optimizer beside the model's
(`lmforge.train.optim.add_loss_groups`), the loop clips and, under DDP, averages their gradients with the model's,
and every checkpoint keeps their weights (`loss.safetensors`), so a resumed run continues them exactly. They are
not part of the model: the saved model never holds them.

`summed_token_loss` is the token-level cross-entropy both recipes share: for an encoder-decoder the decoder
reads the targets shifted right after its start token (teacher forcing, `models.heads.shift_right`).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.heads import shift_right
from lmforge.nn.loss import IGNORE_INDEX, cross_entropy
from lmforge.train.distributed import unwrap_model


class Objective:
    """What a batch's loss is. `count(batch)`: the units the loss averages over (target tokens, examples);
    `loss_sum(model, batch)`: the loss summed over those units; `tokens(micro)`: tokens an optimizer step
    processed, for tokens/s; `loss_module`: the loss's own trainable parameters, or None (see the module
    docstring)."""

    name = "objective"
    loss_module: nn.Module | None = None

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def tokens(self, micro: list[dict[str, torch.Tensor]]) -> int:
        return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro)


def is_seq2seq(model: nn.Module) -> bool:
    return getattr(unwrap_model(model).config, "head", "") == "seq2seq_lm"


def summed_token_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Sum over the batch's target tokens of -log p(target): the mean cross-entropy times the token count
    (with `label_smoothing`, against the smoothed targets of `lmforge.nn.loss`).

    `targets` (B, T) holds the token each position predicts, IGNORE_INDEX where none. An encoder-decoder's
    decoder reads `batch["labels"]` shifted right after its start token: T5 starts from its
    decoder_start_token_id (= pad), the original Transformer from bos."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if is_seq2seq(model):
        config = unwrap_model(model).config
        start = getattr(config, "decoder_start_token_id", getattr(config, "bos_token_id", 0))
        inputs["decoder_input_ids"] = shift_right(batch["labels"], start, config.pad_token_id)
    logits = model(**inputs).logits  # (B, T, vocab)
    count = (targets != IGNORE_INDEX).sum()
    return cross_entropy(logits.flatten(0, 1), targets.flatten(), IGNORE_INDEX, label_smoothing) * count
