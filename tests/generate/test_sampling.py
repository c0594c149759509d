"""Logits processors against hand computations and against transformers' own processors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge.generate.sampling import (
    SamplingParams,
    apply_frequency_presence_penalty,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    choose_next_token,
    process_logits,
)

INF = float("-inf")


def kept(logits: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(logits[0])).flatten().tolist()


def test_top_k_keeps_the_k_largest_and_ties_with_the_kth():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0]])
    assert kept(apply_top_k(logits, 2)) == [3, 4]
    assert torch.equal(apply_top_k(logits, 2)[0, 3:], logits[0, 3:])  # kept logits are unchanged
    assert kept(apply_top_k(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), 1)) == [1, 2]
    assert kept(apply_top_k(logits, 0)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("p", "expected"), [(0.5, [0]), (0.7, [0, 1]), (0.71, [0, 1, 2]), (0.99, [0, 1, 2, 3, 4])])
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(p, expected):
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    permutation = torch.tensor([3, 0, 4, 2, 1])  # shuffled, so the code must sort
    logits = probs.log()[:, permutation]
    assert sorted(permutation[kept(apply_top_p(logits, p))].tolist()) == expected


def test_min_p_keeps_tokens_with_probability_above_a_fraction_of_the_top_one():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert kept(apply_min_p(probs.log(), 0.2)) == [0, 1, 2]  # threshold 0.2 * 0.5 = 0.1
    assert kept(apply_min_p(probs.log(), 0.7)) == [0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -4.0, 1.0, -1.0]]))


def test_frequency_and_presence_penalties_follow_openais_formula():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    counts = torch.tensor([[2.0, 0.0, 1.0]])
    got = apply_frequency_presence_penalty(logits, counts, frequency=0.5, presence=1.0)
    assert torch.allclose(got, torch.tensor([[1.0 - 2 * 0.5 - 1.0, 1.0, 1.0 - 0.5 - 1.0]]))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda x: apply_top_k(x, 7), TopKLogitsWarper(7)),
        (lambda x: apply_top_p(x, 0.8), TopPLogitsWarper(0.8)),
        (lambda x: apply_min_p(x, 0.05), MinPLogitsWarper(0.05)),
    ],
)
def test_truncation_matches_transformers_warpers(ours, theirs):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 2
    ids = torch.zeros(4, 1, dtype=torch.long)
    assert torch.equal(torch.isfinite(ours(logits)), torch.isfinite(theirs(ids, logits.clone())))


def test_repetition_penalty_matches_transformers():
    g = torch.Generator().manual_seed(0)
    logits, history = torch.randn(3, 40, generator=g), torch.randint(0, 40, (3, 12), generator=g)
    seen = torch.zeros(3, 40, dtype=torch.bool).scatter(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_temperature_scales_logits_before_truncation():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    params = SamplingParams(do_sample=True, temperature=0.5)
    assert torch.equal(process_logits(logits, params), logits / 0.5)


def test_sampling_with_a_seeded_generator_is_reproducible_and_follows_the_probabilities():
    logits = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.1)]]).repeat(20000, 1)
    params = SamplingParams(do_sample=True)
    draws = choose_next_token(logits, params, torch.Generator().manual_seed(0))
    again = choose_next_token(logits, params, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    frequencies = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(frequencies, torch.tensor([0.6, 0.3, 0.1]), atol=0.015)


def test_greedy_takes_the_argmax_and_penalties_still_apply():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = SamplingParams(repetition_penalty=2.0)
    assert choose_next_token(logits, SamplingParams()).item() == 0
    assert choose_next_token(process_logits(logits, params, seen=torch.tensor([[True, False, False]])), params) == 1


@pytest.mark.parametrize(
    "bad",
    [{"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1}, {"top_k": -1}, {"repetition_penalty": 0}],
)
def test_invalid_sampling_parameters_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad).validate()
