"""Logits processors and the choice of the next token.

Each processor maps next-token logits (B, V) to new logits; tokens a processor rules out get -inf, so
they keep zero probability under the softmax. Applied in this order (the order Hugging Face uses):

- repetition penalty (Keskar et al., 2019, CTRL, section 4.1): for every token already in the row (prompt
  or generated), a positive logit is divided by r and a negative one multiplied by r. r > 1 discourages
  repeats whatever the logit's sign (CTRL divides only; multiplying negatives is the usual fix, since
  dividing a negative logit would raise it).
- frequency and presence penalties (OpenAI API reference): l_j <- l_j - c_j * alpha_freq - [c_j > 0] * alpha_pres,
  c_j = how often token j was generated so far (the prompt does not count).
- temperature: l <- l / T. T < 1 sharpens the distribution, T > 1 flattens it.
- top-k (Fan et al., 2018): keep the k largest logits (ties with the k-th are kept).
- top-p, nucleus (Holtzman et al., 2020): keep the smallest set of most likely tokens whose probability
  mass is >= p; the most likely token always stays.
- min-p (Nguyen et al., 2024): keep tokens with probability >= min_p * (probability of the most likely one),
  a cut-off that scales with the model's confidence.

Greedy decoding takes the argmax; sampling draws from softmax(l) with a `torch.Generator`, so a fixed
seed reproduces the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. The defaults are greedy decoding with no penalties."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0; use greedy decoding for temperature 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 turns it off)")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1] (0 turns it off)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 turns it off)")

    @property
    def uses_token_history(self) -> bool:
        """Whether the processors need counts of the tokens seen so far."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on tokens with seen (B, V) True: positive logits / penalty, negative ones * penalty."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence_penalty(
    logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI's l_j - c_j * frequency - [c_j > 0] * presence, with counts c (B, V) of generated tokens."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p.

    Sorted by probability, token i is dropped when the mass of the tokens before it already reaches p,
    so the kept set is the shortest prefix with mass >= p (the first token is always kept).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with probability >= min_p * max probability, i.e. logit >= max logit + log(min_p)."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """All processors of `params`, in order, on fp32 logits (B, V). `seen` (B, V) marks tokens in the prompt
    or generated so far (repetition penalty); `counts` (B, V) counts generated tokens (frequency/presence)."""
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        logits = apply_frequency_presence_penalty(logits, counts, params.frequency_penalty, params.presence_penalty)
    if not params.do_sample:
        return logits  # greedy: temperature and truncation do not change the argmax
    if params.temperature != 1.0:
        logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


def choose_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Processed logits (B, V) -> next token ids (B,): the argmax, or a draw from softmax(logits)."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
