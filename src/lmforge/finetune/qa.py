"""Extractive QA features (question + context windows) and span decoding (Devlin et al., 2019, 4.2-4.3).

A context longer than the model's window is read in overlapping windows, as in BERT's SQuAD recipe: each
feature holds the (possibly shortened) question, then up to `max_length - len(question) - specials` context
tokens; consecutive windows share `doc_stride` tokens (HF's `stride`), so an answer near a window's edge
lies whole inside a neighbouring window.

Training target per window: the token indices of the answer's first and last token when the answer lies
entirely inside the window, else index 0 (the [CLS] position, "no answer here"); SQuAD 2.0's unanswerable
questions always point at 0.

Decoding (`decode_qa`): a span (s, e) of one window scores start_logit[s] + end_logit[e]; among the top
`n_best` starts and ends of every window of an example, the best valid span (both in the context,
s <= e, e - s + 1 <= max_answer_length) wins and its text is cut from the context by the tokens' character
offsets. With version_2 the null score start_logit[0] + end_logit[0] (the smallest over the windows)
competes: the answer is "" when null > best span + null_threshold (Rajpurkar et al., 2018; HF's
`postprocess_qa_predictions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lmforge.data.readers.squad import QAExample
from lmforge.data.tokenizers.tokenizer import Tokenizer
from lmforge.finetune.features import Feature, has_token_types, join_pair, pair_separator, pair_special_count


def _trim(offset: tuple[int, int], context: str) -> tuple[int, int]:
    """A token's character span without its surrounding whitespace (byte-level BPE tokens carry their leading
    space: " Paris" spans 6 characters), unless the token is only whitespace."""
    a, b = offset
    text = context[a:b]
    if not text.strip():
        return a, b
    return a + len(text) - len(text.lstrip()), b - len(text) + len(text.rstrip())


def _answer_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """First and last context token overlapping the characters [start, end), or None if no token does."""
    inside = [t for t, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
    return (inside[0], inside[-1]) if inside else None


def encode_qa(
    tokenizer: Tokenizer,
    examples: Sequence[QAExample],
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> tuple[list[Feature], dict[str, int]]:
    """Features {"input_ids", ("token_type_ids"), "start_positions", "end_positions", "example_index",
    "offsets"}: one or more windows per example. `offsets[t]` is the (start, end) character span of token t
    in the context (surrounding whitespace trimmed) for context tokens, None for question and special tokens.

    The first answer is the training target. stats: total, features, questions_truncated (questions cut to
    max_query_length tokens), unmapped_answers (answers no token covers, e.g. only whitespace: trained as
    no-answer), inexact_answers (answers starting or ending inside a token: the target is the covering
    tokens, whose text is longer than the answer)."""
    backend = tokenizer.to_tokenizers()
    separator = pair_separator(tokenizer, backend)
    types = has_token_types(backend)
    questions = backend.encode_batch([example.question.strip() for example in examples], add_special_tokens=False)
    contexts = backend.encode_batch([example.context for example in examples], add_special_tokens=False)
    stats = {"total": len(examples), "features": 0, "questions_truncated": 0, "unmapped_answers": 0}
    stats["inexact_answers"] = 0
    features = []
    for index, (example, question, context) in enumerate(zip(examples, questions, contexts, strict=True)):
        if len(question.ids) > max_query_length:
            question.truncate(max_query_length)
            stats["questions_truncated"] += 1
        budget = max_length - len(question.ids) - pair_special_count(backend, separator)
        if budget <= doc_stride:
            raise ValueError(
                f"max_length={max_length} leaves {budget} context tokens per window after the question, not more "
                f"than doc_stride={doc_stride}; raise max_length or lower doc_stride / max_query_length"
            )
        target = None  # (first token, last token) of the answer in the whole context
        if not example.is_impossible and example.answers:
            answer = example.answers[0]
            trimmed = [_trim(o, example.context) for o in context.offsets]
            target = _answer_tokens(trimmed, answer.answer_start, answer.answer_end)
            if target is None:
                stats["unmapped_answers"] += 1
            elif trimmed[target[0]][0] != answer.answer_start or trimmed[target[1]][1] != answer.answer_end:
                stats["inexact_answers"] += 1
        context.truncate(budget, stride=doc_stride)  # windows start every budget - doc_stride tokens
        for k, window in enumerate([context, *context.overflowing]):
            first = k * (budget - doc_stride)  # context token index of the window's first token
            ids, type_ids, sequence_ids, offsets = join_pair(backend, question, window, separator)
            context_at = sequence_ids.index(1) if 1 in sequence_ids else len(ids)
            start = end = 0
            if target is not None and first <= target[0] and target[1] < first + len(window.ids):
                start, end = context_at + target[0] - first, context_at + target[1] - first
            feature: Feature = {"input_ids": ids}
            if types:
                feature["token_type_ids"] = type_ids
            feature.update(start_positions=start, end_positions=end, example_index=index)
            feature["offsets"] = [
                _trim(o, example.context) if s == 1 else None for s, o in zip(sequence_ids, offsets, strict=True)
            ]
            features.append(feature)
    stats["features"] = len(features)
    return features, stats


def _rows(logits: Any, features: Sequence[Feature], name: str) -> list[np.ndarray]:
    """Per-feature logit vectors (a padded (N, T) tensor/array or a list of rows), cut to each feature."""
    if len(logits) != len(features):
        raise ValueError(f"{name} has {len(logits)} rows for {len(features)} features; pass one row per feature")
    rows = []
    for row, feature in zip(logits, features, strict=True):
        row = np.asarray(row.float().cpu() if hasattr(row, "float") else row, dtype=np.float64)
        if len(row) < len(feature["input_ids"]):
            raise ValueError(f"a {name} row has {len(row)} values for a feature of {len(feature['input_ids'])} tokens")
        rows.append(row[: len(feature["input_ids"])])
    return rows


def decode_qa(
    examples: Sequence[QAExample],
    features: Sequence[Feature],
    start_logits: Any,
    end_logits: Any,
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
    """(answers, n_best_lists): {example id: predicted text} and {example id: the n_best candidates
    [{"text", "score", "start", "end"}] best first, start/end being character offsets in the context}.
    With version_2 the list also holds the null answer {"text": "", "score": null score} wherever it ranks
    (as in HF's `postprocess_qa_predictions`). An example with no valid span predicts ""."""
    if n_best < 1 or max_answer_length < 1:
        raise ValueError(f"n_best={n_best} and max_answer_length={max_answer_length} must be at least 1")
    starts, ends = _rows(start_logits, features, "start_logits"), _rows(end_logits, features, "end_logits")
    by_example: dict[int, list[int]] = {}
    for f, feature in enumerate(features):
        by_example.setdefault(feature["example_index"], []).append(f)
    answers, n_best_lists = {}, {}
    for index, example in enumerate(examples):
        candidates, null_score = [], None
        for f in by_example.get(index, []):
            offsets, start, end = features[f]["offsets"], starts[f], ends[f]
            score = start[0] + end[0]
            null_score = score if null_score is None else min(null_score, score)
            top_starts = np.argsort(-start, kind="stable")[:n_best]
            top_ends = np.argsort(-end, kind="stable")[:n_best]
            for s in top_starts:
                for e in top_ends:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    a, b = offsets[s][0], offsets[e][1]
                    candidates.append(
                        {"text": example.context[a:b], "score": float(start[s] + end[e]), "start": a, "end": b}
                    )
        candidates = sorted(candidates, key=lambda c: -c["score"])[:n_best]
        best = candidates[0] if candidates else None
        answer = best["text"] if best else ""
        if version_2 and null_score is not None:
            candidates.append({"text": "", "score": float(null_score), "start": 0, "end": 0})
            candidates.sort(key=lambda c: -c["score"])
            if best is None or null_score > best["score"] + null_threshold:
                answer = ""
        answers[example.id] = answer
        n_best_lists[example.id] = candidates
    return answers, n_best_lists
