"""How faithful token scores are: the deletion curve and its area, ERASER's comprehensiveness (DeYoung et al., 2020).

For a sequence classifier with predicted-class probability p(x), delete the top k% of the content tokens ranked by
an explanation's scores (special tokens stay) and measure the drop:

    comprehensiveness_k = p(x) - p(x without its top-k% tokens)
    AOPC = mean over k in {1, 5, 10, 20, 50}% of comprehensiveness_k       (their eq. 2, "area over the curve")

A faithful ranking removes the evidence first, so its probability falls fastest: a higher AOPC is better, and a
random ranking is the floor to beat. Tokens are deleted (the sequence gets shorter), not masked, as ERASER does.
"""

from __future__ import annotations

import torch

from lmforge.explain.subject import Subject

FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)


def sequence_probability(subject: Subject, ids: torch.Tensor) -> float:
    """p(target | ids) of a sequence classifier (its logits do not depend on a read-out index we would shift)."""
    with torch.no_grad():
        logits = subject.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return float(torch.softmax(logits.float(), dim=-1)[0, subject.target])


def deletion_curve(subject: Subject, scores: list[float], fractions: tuple[float, ...] = FRACTIONS) -> list[float]:
    """comprehensiveness_k for each fraction k: p(x) - p(x without the k highest-scored content tokens)."""
    if subject.kind != "sequence_classification":
        raise ValueError("deletion curves are defined here for sequence classifiers (a deletion moves other read-outs)")
    ids = subject.input_ids[0]
    content = (~subject.special_mask()).nonzero().flatten()
    ranked = content[torch.tensor([scores[int(i)] for i in content]).argsort(descending=True)]
    full = sequence_probability(subject, subject.input_ids)
    drops = []
    for fraction in fractions:
        k = max(1, round(fraction * len(content)))
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[ranked[:k]] = False
        drops.append(full - sequence_probability(subject, ids[keep][None]))
    return drops


def aopc(subject: Subject, scores: list[float], fractions: tuple[float, ...] = FRACTIONS) -> float:
    """Area over the perturbation curve: the mean comprehensiveness over `fractions`."""
    curve = deletion_curve(subject, scores, fractions)
    return sum(curve) / len(curve)
