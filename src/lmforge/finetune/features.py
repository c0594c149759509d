"""Task records -> token features for fine-tuning: classification, token tagging, seq2seq and SFT.

Every encoder takes a `Tokenizer`, the records and length limits, and returns `(features, stats)`:
`features` is one dict per example (`input_ids`, `labels`, and what the task needs to map predictions
back), `stats` counts what a user must hear about, `total` and `truncated` (inputs cut to the length
limit) always. Nothing is cut silently. `lmforge.finetune.batches` pads the features into tensors.

Labels follow the Hugging Face convention: IGNORE_INDEX (-100) marks positions without a target.

- classification: [CLS] a [SEP] (b [SEP]) as the tokenizer's post-processor builds it, or a (sep b) for
  tokenizers without one; a pair too long is cut longest-first (one token from the longer text at a time,
  as HF's `truncation="longest_first"`). The label is a class id, or a multi-hot vector (sigmoid head).
- tagging: one label per word on its first subword, -100 on the other subwords and on special tokens
  (Devlin et al., 2019, 5.3; HF's `run_ner`). `word_ids` stay in the feature so `word_predictions` can
  map token predictions back to words.
- seq2seq: source ids + eos, target ids + eos (the layout `lmforge.train.data.encode_pairs` uses).
- SFT: the conversation rendered with the tokenizer's chat template; labels are the ids of the assistant
  responses (and the eos that ends each), -100 on everything the user or the template wrote.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

import tokenizers

from lmforge.data.readers.conll import TaggedSentence
from lmforge.data.readers.records import ClassificationExample, InstructionExample, LabelVocab, ParallelExample
from lmforge.data.tokenizers.tokenizer import Tokenizer
from lmforge.nn.loss import IGNORE_INDEX

Feature = dict[str, Any]

# Used when a tokenizer has no chat template of its own (Alpaca-like headers). Every assistant turn ends with
# eos so the model learns to stop; save this template with the fine-tuned tokenizer so prompts match.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------ shared pieces


def pair_separator(tokenizer: Tokenizer, backend: tokenizers.Tokenizer) -> int | None:
    """The id put between the two texts of a pair when the tokenizer (`backend`: its `to_tokenizers()`) adds
    no special tokens to pairs itself (GPT-2; a byte-level post-processor only fixes offsets): its sep token,
    else its eos token. None when its post-processor builds pairs ([CLS] a [SEP] b [SEP])."""
    if backend.num_special_tokens_to_add(True) > 0:
        return None
    separator = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if separator is None:
        raise ValueError("text pairs need a separator; this tokenizer has no sep or eos token: set tokenizer.sep_token")
    return separator


def join_pair(
    backend: tokenizers.Tokenizer, first: tokenizers.Encoding, second: tokenizers.Encoding, separator: int | None
) -> tuple[list[int], list[int] | None, list[int | None], list[tuple[int, int]]]:
    """(ids, type ids or None, sequence ids, offsets) of a text pair with the tokenizer's special tokens.
    Sequence ids are 0 / 1 for tokens of the first / second text, None for special tokens; offsets index
    into each token's own text. With a `separator` (see `pair_separator`) the pair is first, separator, second."""
    if separator is None:
        joined = backend.post_process(first, second, add_special_tokens=True)
        return joined.ids, joined.type_ids, joined.sequence_ids, joined.offsets
    ids = first.ids + [separator] + second.ids
    sequence_ids = [0] * len(first.ids) + [None] + [1] * len(second.ids)
    return ids, None, sequence_ids, first.offsets + [(0, 0)] + second.offsets


def pair_special_count(backend: tokenizers.Tokenizer, separator: int | None) -> int:
    """How many tokens `join_pair` adds to a pair."""
    return 1 if separator is not None else backend.num_special_tokens_to_add(True)


def has_token_types(backend: tokenizers.Tokenizer) -> bool:
    """Whether the tokenizer marks the second text of a pair with type id 1 (BERT's segment embeddings);
    only then do features carry `token_type_ids`."""
    if backend.num_special_tokens_to_add(True) == 0:
        return False
    a, b = backend.encode_batch(["a", "b"], add_special_tokens=False)
    return 1 in backend.post_process(a, b, add_special_tokens=True).type_ids


def _truncate_longest_first(first: tokenizers.Encoding, second: tokenizers.Encoding, budget: int) -> bool:
    """Cuts a pair to `budget` tokens as HF's "longest_first" does (tokenizers' LongestFirst): the shorter
    text stays whole while it fits in half the budget, else both keep half, the longer one (the second on a
    tie) the odd token. Returns whether anything was cut."""
    n_first, n_second = len(first.ids), len(second.ids)
    if n_first + n_second <= budget:
        return False
    longer_keeps = max(budget - min(n_first, n_second), (budget + 1) // 2)
    if n_first > n_second:
        first.truncate(longer_keeps)
        second.truncate(budget - longer_keeps)
    else:
        first.truncate(budget - longer_keeps)
        second.truncate(longer_keeps)
    return True


def _check_length(max_length: int, name: str = "max_length", least: int = 1) -> None:
    if max_length < least:
        raise ValueError(f"{name}={max_length} must be at least {least}")


# ------------------------------------------------------------------------------------------ classification


def encode_classification(
    tokenizer: Tokenizer,
    examples: Sequence[ClassificationExample],
    vocab: LabelVocab,
    max_length: int,
    *,
    multi_label: bool = False,
    split: str = "train",
) -> tuple[list[Feature], dict[str, int]]:
    """Features {"input_ids", "labels"} (+ "token_type_ids" for BERT-style tokenizers), one per example.

    `labels` is the class id, or with `multi_label` a multi-hot list of floats (BCE target). A label the
    vocabulary lacks is an error naming it and `split`. stats: total, truncated, pairs."""
    backend = tokenizer.to_tokenizers()
    has_pairs = any(example.text_pair is not None for example in examples)
    separator = pair_separator(tokenizer, backend) if has_pairs else None
    types = has_token_types(backend)
    _check_length(max_length, least=backend.num_special_tokens_to_add(has_pairs) + 2)
    firsts = backend.encode_batch([example.text for example in examples], add_special_tokens=False)
    pair_texts = [example.text_pair or "" for example in examples]
    seconds = backend.encode_batch(pair_texts, add_special_tokens=False) if has_pairs else [None] * len(examples)
    features, truncated, pairs = [], 0, 0
    for example, first, second in zip(examples, firsts, seconds, strict=True):
        unknown = [label for label in example.labels if label not in vocab]
        if unknown:
            raise ValueError(
                f"label {unknown[0]!r} of the {split} split is not in the training labels {list(vocab.labels)}; "
                "fix the data or train with a label vocabulary that includes it"
            )
        if not multi_label and len(example.labels) != 1:
            raise ValueError(
                f"a {split} example has {len(example.labels)} labels {list(example.labels)}; pass multi_label=True"
            )
        if example.text_pair is None:
            budget = max_length - backend.num_special_tokens_to_add(False)
            cut = len(first.ids) > budget
            first.truncate(budget)
            encoding = backend.post_process(first, None, add_special_tokens=True)
            ids, type_ids = encoding.ids, encoding.type_ids
        else:
            pairs += 1
            cut = _truncate_longest_first(first, second, max_length - pair_special_count(backend, separator))
            ids, type_ids, _, _ = join_pair(backend, first, second, separator)
        truncated += cut
        feature: Feature = {"input_ids": ids}
        if types:
            feature["token_type_ids"] = type_ids
        feature["labels"] = vocab.multi_hot(example.labels) if multi_label else vocab.id(example.label)
        features.append(feature)
    return features, {"total": len(examples), "truncated": truncated, "pairs": pairs}


# ------------------------------------------------------------------------------------------ token tagging


def _adds_word_space(backend: tokenizers.Tokenizer) -> bool:
    """True for byte-level BPE without add_prefix_space (GPT-2): there " word" and "word" are different
    tokens, and words inside a sentence are the spaced form, so words after the first get a leading space."""

    def byte_level(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return not node.get("add_prefix_space", False)
            return any(byte_level(value) for value in node.values())
        if isinstance(node, list):
            return any(byte_level(value) for value in node)
        return False

    pre_tokenizer = backend.pre_tokenizer
    return pre_tokenizer is not None and byte_level(json.loads(pre_tokenizer.__getstate__()))


def _continuation_label(tag: str, tag_to_id: dict[str, int]) -> int:
    """The label of a word's later subwords with `label_all_subwords`: B-X continues as I-X when the tag set
    has it (a subword after the first is inside the entity, not its start), any other tag as itself."""
    if tag.startswith("B-") and f"I-{tag[2:]}" in tag_to_id:
        return tag_to_id[f"I-{tag[2:]}"]
    return tag_to_id[tag]


def encode_tagging(
    tokenizer: Tokenizer,
    sentences: Sequence[TaggedSentence],
    tag_to_id: dict[str, int],
    max_length: int,
    *,
    label_all_subwords: bool = False,
) -> tuple[list[Feature], dict[str, int]]:
    """Features {"input_ids", "labels", "word_ids", "n_words"}, one per sentence.

    Each word's tag id sits on its first subword; later subwords get -100 (or, with `label_all_subwords`,
    the tag, B-X turned into I-X), special tokens -100. `word_ids[t]` is the word of token t (None for
    special tokens). stats: total, truncated (sentences cut to max_length), words_cut (words lost to
    truncation), words_without_tokens (words the tokenizer turns into nothing, e.g. a lone control
    character); `word_predictions` predicts the default tag for both."""
    backend = tokenizer.to_tokenizers()
    n_special = backend.num_special_tokens_to_add(False)
    _check_length(max_length, least=n_special + 1)
    space = _adds_word_space(backend)
    features, truncated, words_cut, words_without_tokens = [], 0, 0, 0
    for index, sentence in enumerate(sentences):
        unknown = [tag for tag in sentence.tags if tag not in tag_to_id]
        if unknown:
            raise ValueError(
                f"sentence {index} has tag {unknown[0]!r}, not in the tag set {sorted(tag_to_id)}; "
                "build the tag set from the training data and every split's tags"
            )
        words = [(" " + word if space and i else word) for i, word in enumerate(sentence.tokens)]
        encoding = backend.encode(words, is_pretokenized=True, add_special_tokens=False)
        represented = {w for w in encoding.word_ids if w is not None}
        words_without_tokens += len(words) - len(represented)
        if len(encoding.ids) > max_length - n_special:
            encoding.truncate(max_length - n_special)
            truncated += 1
            words_cut += len(represented - {w for w in encoding.word_ids if w is not None})
        encoding = backend.post_process(encoding, None, add_special_tokens=True)
        labels, previous = [], None
        for word in encoding.word_ids:
            if word is None:
                labels.append(IGNORE_INDEX)
            elif word != previous:
                labels.append(tag_to_id[sentence.tags[word]])
            elif label_all_subwords:
                labels.append(_continuation_label(sentence.tags[word], tag_to_id))
            else:
                labels.append(IGNORE_INDEX)
            previous = word
        features.append(
            {"input_ids": encoding.ids, "labels": labels, "word_ids": encoding.word_ids, "n_words": len(words)}
        )
    stats = {"total": len(sentences), "truncated": truncated, "words_cut": words_cut}
    stats["words_without_tokens"] = words_without_tokens
    return features, stats


def word_predictions(
    token_predictions: Sequence[int] | Any,
    word_ids: Sequence[int | None],
    n_words: int | None = None,
    *,
    default: int = 0,
) -> list[int]:
    """One predicted tag id per word: the prediction at the word's first subword (the position trained).
    `token_predictions` may be a padded row (list or tensor). Pass the feature's `n_words`: words without
    a token (cut by truncation, or empty after normalisation) then get `default`, normally the id of "O"
    (without it the list ends at the last word that has a token)."""
    values = token_predictions.tolist() if hasattr(token_predictions, "tolist") else list(token_predictions)
    if len(values) < len(word_ids):
        raise ValueError(f"{len(values)} token predictions for a feature of {len(word_ids)} tokens")
    if n_words is None:
        n_words = max((w + 1 for w in word_ids if w is not None), default=0)
    words = [default] * n_words
    seen = set()
    for word, prediction in zip(word_ids, values, strict=False):
        if word is not None and word not in seen:
            seen.add(word)
            words[word] = int(prediction)
    return words


# ------------------------------------------------------------------------------------------ seq2seq


def encode_seq2seq(
    tokenizer: Tokenizer,
    pairs: Sequence[ParallelExample | tuple[str, str]],
    max_source_length: int,
    max_target_length: int,
    *,
    prefix: str = "",
) -> tuple[list[Feature], dict[str, int]]:
    """Features {"input_ids": prefix + source ids + eos, "labels": target ids + eos}, each side cut to its
    limit with eos kept (T5 writes the task into `prefix`, e.g. "translate English to German: ").
    stats: total, truncated (pairs with either side cut), sources_truncated, targets_truncated."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("seq2seq features end each side with eos; this tokenizer has none: set tokenizer.eos_token")
    _check_length(max_source_length, "max_source_length", 2)
    _check_length(max_target_length, "max_target_length", 2)
    pairs = [pair if isinstance(pair, ParallelExample) else ParallelExample(*pair) for pair in pairs]
    backend = tokenizer.to_tokenizers()
    sources = backend.encode_batch([prefix + pair.source for pair in pairs], add_special_tokens=False)
    targets = backend.encode_batch([pair.target for pair in pairs], add_special_tokens=False)
    features, truncated, sources_cut, targets_cut = [], 0, 0, 0
    for source, target in zip(sources, targets, strict=True):
        source_cut, target_cut = len(source.ids) >= max_source_length, len(target.ids) >= max_target_length
        sources_cut += source_cut
        targets_cut += target_cut
        truncated += source_cut or target_cut
        features.append(
            {
                "input_ids": source.ids[: max_source_length - 1] + [eos],
                "labels": target.ids[: max_target_length - 1] + [eos],
            }
        )
    stats = {"total": len(pairs), "truncated": truncated}
    stats.update(sources_truncated=sources_cut, targets_truncated=targets_cut)
    return features, stats


# ------------------------------------------------------------------------------------------ SFT


def chat_renderer(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` itself when it has a chat template, else a shallow copy using DEFAULT_CHAT_TEMPLATE."""
    if tokenizer.eos_token is None:
        raise ValueError("SFT needs an eos token to end each response (so the model learns to stop); set one")
    if tokenizer.chat_template:
        return tokenizer
    renderer = copy.copy(tokenizer)
    renderer.chat_template = DEFAULT_CHAT_TEMPLATE
    return renderer


def _is_prefix(short: Sequence, long: Sequence) -> bool:
    return len(short) <= len(long) and list(long[: len(short)]) == list(short)


def _common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of `a` and `b`."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _response_spans(
    renderer: Tokenizer, backend: tokenizers.Tokenizer, messages: list[dict[str, str]], ids: list[int], text: str
) -> tuple[list[tuple[int, int]], bool]:
    """Token spans [start, end) of the assistant turns in the rendered conversation `text` (ids `ids`), and
    whether character offsets had to be used.

    Turn k's response is what the conversation up to it adds after the generation prompt: render the prefix
    with add_generation_prompt=True (P) and the prefix including the turn (Q); the response is Q minus P.
    Token level first: P's ids a prefix of the whole conversation's, and Q's too up to the response's eos
    (whitespace after a turn may tokenise differently at the end of Q than inside the whole). When the
    tokenisation merges across a boundary, the same difference in characters picks the tokens that overlap it."""
    eos = renderer.eos_token_id
    spans, by_offsets = [], False
    offsets = None
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = renderer.apply_chat_template(messages[:k], add_generation_prompt=True)
        turn = renderer.apply_chat_template(messages[: k + 1], add_generation_prompt=False)
        prompt_ids = backend.encode(prompt, add_special_tokens=False).ids
        turn_ids = backend.encode(turn, add_special_tokens=False).ids
        common = _common_prefix(turn_ids, ids)  # the turn's last tokens may merge with what follows it
        if _is_prefix(prompt_ids, ids[:common]) and (common == len(turn_ids) or eos in ids[len(prompt_ids) : common]):
            spans.append((len(prompt_ids), common))
            continue
        if not (text.startswith(turn) and turn.startswith(prompt)):
            raise ValueError(
                f"the chat template renders turn {k} differently inside the whole conversation than on its own, "
                "so the response cannot be located; use a template whose earlier turns do not depend on later ones"
            )
        by_offsets = True
        if offsets is None:
            offsets = backend.encode(text, add_special_tokens=False).offsets
        inside = [t for t, (a, b) in enumerate(offsets) if a < len(turn) and b > len(prompt)]
        if inside:
            spans.append((inside[0], inside[-1] + 1))
    return spans, by_offsets


def encode_sft(
    tokenizer: Tokenizer, conversations: Sequence[InstructionExample], max_length: int
) -> tuple[list[Feature], dict[str, int]]:
    """Features {"input_ids", "labels"} for supervised fine-tuning of a causal LM (labels are not shifted:
    the model shifts, see `lmforge.models.heads`).

    The conversation is rendered with the tokenizer's chat template (DEFAULT_CHAT_TEMPLATE when it has none)
    and encoded without extra special tokens (the template writes them, as in HF's apply_chat_template).
    Labels are the ids of every assistant response, cut after its last eos (the template's line break after
    the end-of-turn token is not a target); -100 elsewhere. Sequences longer than max_length are cut at the
    right; one left with no response token is dropped. stats: total, truncated, dropped, kept, by_offsets
    (conversations whose response spans came from character offsets)."""
    _check_length(max_length, least=2)
    renderer = chat_renderer(tokenizer)
    backend = tokenizer.to_tokenizers()
    eos = tokenizer.eos_token_id
    features, truncated, dropped, by_offsets = [], 0, 0, 0
    for conversation in conversations:
        messages = [{"role": m.role, "content": m.content} for m in conversation.messages]
        text = renderer.apply_chat_template(messages, add_generation_prompt=False)
        ids = backend.encode(text, add_special_tokens=False).ids
        spans, used_offsets = _response_spans(renderer, backend, messages, ids, text)
        by_offsets += used_offsets
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            span = ids[start:end]
            if eos in span:
                end = start + len(span) - span[::-1].index(eos)
            labels[start:end] = ids[start:end]
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        features.append({"input_ids": ids, "labels": labels})
    stats = {"total": len(conversations), "truncated": truncated, "dropped": dropped, "kept": len(features)}
    stats["by_offsets"] = by_offsets
    return features, stats
