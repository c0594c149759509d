"""The pretraining objectives: one object each, owning its tokenizer, batches, targets, model head and samples.

    objective        families          batches                          each position predicts
    causal LM        gpt, llama        random windows of the stream     the next token
    masked LM        bert, roberta     packed blocks, 15% masked        the original token, at masked positions
    span corruption  t5                packed blocks, spans dropped     the dropped spans, sentinel-delimited
    translation      transformer       padded (source, target) pairs   the next target token

A new objective is one class in this file: the registry (`OBJECTIVES`, `objective_for`) finds it by its
`name` and `families`. The loss is always the mean cross-entropy over predicted tokens (`count` = tokens with
a target), so loss, perplexity and bits per byte count only what is predicted. Encoder-decoders are fed the
targets shifted right (teacher forcing, `lmforge.train.objective.summed_token_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.pipeline.loaders import (
    MLMBatches,
    MLMMasker,
    RandomWindows,
    Seq2SeqBatches,
    SpanCorruptionBatches,
    SpanCorruptor,
)
from lmforge.io import write_text_atomic
from lmforge.nn.loss import IGNORE_INDEX
from lmforge.pretrain.config import RunConfig
from lmforge.pretrain.data import TrainData, Windows, prepare_pairs, prepare_text, stack_windows
from lmforge.train.batches import Endless
from lmforge.train.distributed import DistInfo
from lmforge.train.objective import Objective, summed_token_loss
from lmforge.train.tokenizer import MASKED_LM, PLAIN, SEQ2SEQ, SPAN_CORRUPTION, TokenizerPlan

OBJECTIVES: dict[str, type[PretrainObjective]] = {}


class PretrainObjective(Objective):
    """The parts every objective has; subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = ""
    head: ClassVar[str] = ""
    families: ClassVar[tuple[str, ...]] = ()
    tokenizer_plan: ClassVar[TokenizerPlan] = PLAIN

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        OBJECTIVES[cls.name] = cls

    # ---- data
    def prepare(self, config: RunConfig, run_dir: Path, info: DistInfo, reuse_tokenizer: bool) -> TrainData:
        """Tokenizer and train/validation data of the run (text streams; translation overrides)."""
        return prepare_text(config, run_dir, info, self, reuse_tokenizer)

    def loader(self, data: TrainData, stream: Any, batch_size: int, seed: int):
        """An infinite, resumable iterator of training (or validation) batches of `batch_size` rows."""
        raise NotImplementedError

    def private_examples(self, data: TrainData) -> tuple[Sequence[Any], Callable]:
        """The fixed examples DP-SGD samples, clips and accounts for (privacy.epsilon), and their collate."""
        raise ValueError(
            f"privacy.epsilon: DP-SGD pretraining takes a causal LM (gpt, llama), whose examples are fixed "
            f"windows of the text; the {self.name} objective has none: drop privacy.epsilon, or fine-tune privately"
        )

    # ---- model
    def model_values(self, config: RunConfig, tokenizer) -> dict[str, Any]:
        """Config values the fresh model needs for this objective: its head and context length."""
        return {"head": self.head, "max_seq_len": config.data.block_size}

    # ---- loss
    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The (B, T) token ids each position predicts, IGNORE_INDEX where nothing is predicted."""
        return batch["labels"]

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.targets(batch) != IGNORE_INDEX).sum()

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_token_loss(model, batch, self.targets(batch))

    def tokens_per_step(self, config: RunConfig, world_size: int) -> int | None:
        """Tokens one optimizer step reads when fixed (windows, blocks); None: count them per step."""
        tc = config.train
        return tc.batch_size * world_size * tc.grad_accum * config.data.block_size

    # ---- samples
    def write_samples(self, model: nn.Module, data: TrainData, config: RunConfig, run_dir: Path) -> str | None:
        """What the trained model produces, written to run_dir/samples.txt (None: nothing to show)."""
        return None


class CausalLM(PretrainObjective):
    """Next-token prediction on random windows of the token stream (GPT-2, Llama)."""

    name = "causal_lm"
    head = "causal_lm"
    families = ("gpt", "llama")

    def loader(self, data: TrainData, stream: Any, batch_size: int, seed: int):
        return RandomWindows(stream, batch_size, data.config.data.block_size, seed=seed)

    def private_examples(self, data: TrainData) -> tuple[Sequence[Any], Callable]:
        """Consecutive block_size windows of the training stream: every window holds the same number of targets,
        so the loop's token mean is the mean of the windows' own losses, which Opacus's per-example gradients
        expect."""
        windows = Windows(data.train, data.config.data.block_size)
        if len(windows) < 2:
            raise ValueError(
                f"privacy.epsilon: the training text holds {len(windows)} window(s) of data.block_size="
                f"{data.config.data.block_size} tokens; DP-SGD needs many examples: use more text or a smaller block"
            )
        return windows, stack_windows

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts labels[t + 1]

    def write_samples(self, model: nn.Module, data: TrainData, config: RunConfig, run_dir: Path) -> str:
        tc, parts = config.train, []
        for label, temperature in (("greedy", 0.0), ("temperature 0.8", 0.8)):
            text = sample_text(
                model, data.tokenizer, tc.sample_prompt, tc.sample_tokens, config.data.block_size, temperature, tc.seed
            )
            parts.append(f"=== {label} ===\n{text}\n")
        body = "\n".join(parts)
        write_text_atomic(run_dir / "samples.txt", body)
        return body


class MaskedLM(PretrainObjective):
    """BERT's masked LM on packed [CLS] ... [SEP] blocks: 15% of tokens chosen, of those 80% [MASK], 10% random,
    10% kept (Devlin et al., 2019, 3.1); the loss counts the chosen positions."""

    name = "masked_lm"
    head = "masked_lm"
    families = ("bert", "roberta")
    tokenizer_plan = MASKED_LM

    def loader(self, data: TrainData, stream: Any, batch_size: int, seed: int):
        tok, dc = data.tokenizer, data.config.data
        masker = MLMMasker(tok.vocab_size, tok.mask_token_id, tok.all_special_ids, dc.mlm_probability)
        return Endless(
            MLMBatches(
                stream,
                batch_size,
                dc.block_size,
                masker,
                seed=seed,
                cls_id=tok.cls_token_id,
                sep_id=tok.sep_token_id,
                pad_id=tok.pad_token_id or 0,
            )
        )

    def model_values(self, config: RunConfig, tokenizer) -> dict[str, Any]:
        return {"head": self.head, "max_seq_len": config.data.block_size + 2}  # + [CLS] and [SEP]


class SpanCorruption(PretrainObjective):
    """T5's span corruption (Raffel et al., 2020, 3.1.4): spans of the block replaced by sentinels in the
    encoder input; the decoder writes each sentinel followed by the span it replaced."""

    name = "span_corruption"
    head = "seq2seq_lm"
    families = ("t5",)
    tokenizer_plan = SPAN_CORRUPTION

    def loader(self, data: TrainData, stream: Any, batch_size: int, seed: int):
        tok, dc = data.tokenizer, data.config.data
        sentinel_start = tok.token_to_id("<extra_id_0>")
        if sentinel_start is None:
            raise ValueError(
                "span corruption needs a tokenizer with T5's sentinels (<extra_id_0>, ...); "
                "use data.tokenizer=char or data.tokenizer=train"
            )
        corruptor = SpanCorruptor(tok.eos_token_id, sentinel_start, dc.noise_density)
        return Endless(
            SpanCorruptionBatches(stream, batch_size, dc.block_size, corruptor, seed=seed, pad_id=tok.pad_token_id or 0)
        )

    def model_values(self, config: RunConfig, tokenizer) -> dict[str, Any]:
        return {"head": self.head}  # T5's relative positions have no maximum length


class Translation(PretrainObjective):
    """The original Transformer on (source, target) sentence pairs, the decoder started at bos (Vaswani et
    al., 2017); greedy translations of held-out sources are its samples."""

    name = "translation"
    head = "seq2seq_lm"
    families = ("transformer",)
    tokenizer_plan = SEQ2SEQ

    def prepare(self, config: RunConfig, run_dir: Path, info: DistInfo, reuse_tokenizer: bool) -> TrainData:
        return prepare_pairs(config, run_dir, info, self, reuse_tokenizer)

    def loader(self, data: TrainData, stream: Any, batch_size: int, seed: int):
        pad = data.tokenizer.pad_token_id  # full batches only, so every DDP process gets its rows
        return Endless(Seq2SeqBatches(stream, batch_size, pad, seed=seed, drop_last=True))

    def model_values(self, config: RunConfig, tokenizer) -> dict[str, Any]:
        # the decoder starts at bos, stops at eos and pads with pad: the tokenizer's
        return {
            **super().model_values(config, tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }

    def tokens(self, micro: list[dict[str, torch.Tensor]]) -> int:
        """Source plus target tokens of padded batches (padding not counted)."""
        return sum(int(b["attention_mask"].sum()) + int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)

    def tokens_per_step(self, config: RunConfig, world_size: int) -> int | None:
        return None

    def write_samples(self, model: nn.Module, data: TrainData, config: RunConfig, run_dir: Path) -> str:
        sources = [source for source, _ in data.sample_pairs]
        outputs = translate(model, data.tokenizer, sources, min(config.train.sample_tokens, config.data.block_size))
        body = "\n".join(
            f"=== source ===\n{source}\n=== reference ===\n{reference}\n=== greedy ===\n{output}\n"
            for (source, reference), output in zip(data.sample_pairs, outputs, strict=True)
        )
        write_text_atomic(run_dir / "samples.txt", body)
        return body


def objective_for(family: str) -> PretrainObjective:
    """The objective that pretrains `family`; a family nobody pretrains is an error naming those that are."""
    for cls in OBJECTIVES.values():
        if family in cls.families:
            return cls()
    known = ", ".join(sorted(f for cls in OBJECTIVES.values() for f in cls.families))
    raise ValueError(
        f"pretraining {family!r} models is not supported; model.name must be a preset (lmforge models) or a "
        f"saved model of family {known}"
    )


# ------------------------------------------------------------------------------------------ samples


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, n_tokens: int, context: int, temperature: float, seed: int) -> str:
    """`n_tokens` tokens after `prompt`, in segments that fit the trained context: each segment starts from the
    last half-context of text so far (positions beyond `context` were never trained)."""
    from lmforge.generate import generate

    ids = tokenizer.encode(prompt, add_special_tokens=False) or [0]
    start = len(ids)
    model.eval()
    while len(ids) - start < n_tokens:
        window = ids[-(context // 2) :]
        steps = min(n_tokens - (len(ids) - start), context - len(window))
        options = {"do_sample": True, "temperature": temperature, "seed": seed} if temperature > 0 else {}
        out = generate(
            model, torch.tensor([window], device=next(model.parameters()).device), max_new_tokens=steps, **options
        )
        ids += out.tokens[0].tolist()
        seed += 1
    model.train()
    return tokenizer.decode(ids)


@torch.no_grad()
def translate(model, tokenizer, sources: list[str], max_len: int) -> list[str]:
    """Greedy translations of `sources` (each cut to `max_len` tokens with its EOS, as in training), of at
    most `max_len` tokens: the decoder's trained positions."""
    from lmforge.generate import generate

    eos = tokenizer.eos_token_id
    rows = [
        row[: max_len - 1] + [eos] for row in tokenizer.encode_batch(sources, add_special_tokens=False)["input_ids"]
    ]
    device = next(model.parameters()).device
    input_ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for r, row in enumerate(rows):  # the encoder is bidirectional: right padding, masked out
        input_ids[r, : len(row)] = torch.tensor(row)
        attention_mask[r, : len(row)] = 1
    model.eval()
    out = generate(model, input_ids, attention_mask, max_new_tokens=max_len)
    model.train()
    return [tokenizer.decode([t for t in row.tolist() if t not in (eos, tokenizer.pad_token_id)]) for row in out.tokens]
