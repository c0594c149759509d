"""Padding and resumable, seeded epochs of fine-tuning feature batches."""

import itertools

import pytest
import torch

from lmforge.data.readers.records import ClassificationExample, LabelVocab
from lmforge.data.tokenizers.tokenizer import load_tokenizer
from lmforge.finetune.batches import FeatureBatches, collate
from lmforge.finetune.features import encode_classification
from lmforge.hf.real_weights import minilm_folder
from lmforge.models import build_model
from lmforge.nn.loss import IGNORE_INDEX
from lmforge.train.batches import Endless

PAD = 0


def tagged_features(n: int) -> list[dict]:
    """Feature i has i % 5 + 1 tokens, all of id i + 1, so a batch row says which feature it came from."""
    features = []
    for i in range(n):
        length = i % 5 + 1
        features.append({"input_ids": [i + 1] * length, "labels": [i % 3] * length, "word_ids": list(range(length))})
    return features


def rows_of(batch: dict) -> list[int]:
    return [int(row[0]) - 1 for row in batch["input_ids"]]


def test_collate_pads_sequences_and_stacks_scalars():
    sequence = collate([{"input_ids": [5, 6, 7], "labels": [1, -100, 2]}, {"input_ids": [8], "labels": [3]}], PAD)
    assert sequence["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert sequence["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert sequence["labels"].tolist() == [[1, -100, 2], [3, IGNORE_INDEX, IGNORE_INDEX]]
    pair, single = (
        {"input_ids": [5, 6], "token_type_ids": [0, 1], "labels": 2},
        {"input_ids": [7], "token_type_ids": [0]},
    )
    classes = collate([pair, {**single, "labels": 0}], 9)
    assert classes["input_ids"].tolist() == [[5, 6], [7, 9]] and classes["token_type_ids"].tolist() == [[0, 1], [0, 0]]
    assert classes["labels"].dtype == torch.long and classes["labels"].tolist() == [2, 0]
    multi = collate([{"input_ids": [1], "labels": [1.0, 0.0]}, {"input_ids": [2, 3], "labels": [0.0, 0.0]}], PAD)
    assert multi["labels"].dtype == torch.float32 and multi["labels"].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    qa = {"input_ids": [1, 2], "start_positions": 1, "end_positions": 1, "offsets": [None, (0, 3)], "example_index": 0}
    batch = collate([qa, {**qa, "start_positions": 0, "end_positions": 0}], PAD)
    assert sorted(batch) == ["attention_mask", "end_positions", "input_ids", "start_positions"]
    assert batch["start_positions"].tolist() == [1, 0]


def test_collate_refuses_mixed_features_and_a_missing_pad_id():
    with pytest.raises(ValueError, match="keys"):
        collate([{"input_ids": [1], "labels": 0}, {"input_ids": [2]}], PAD)
    with pytest.raises(ValueError, match="pad token"):
        collate([{"input_ids": [1]}], None)


def test_batches_feed_a_model_as_they_are():
    bert = load_tokenizer(minilm_folder())
    examples = [ClassificationExample("a good film", ("pos",)), ClassificationExample("bad", ("neg",), "very bad")]
    features, _ = encode_classification(bert, examples, LabelVocab.build(examples), 32)
    model = build_model("bert-tiny", vocab_size=bert.vocab_size, head="sequence_classification", num_labels=2)
    batch = next(iter(FeatureBatches(features, 2, pad_id=bert.pad_token_id, seed=0)))
    output = model(**batch)
    assert output.logits.shape == (2, 2) and torch.isfinite(output.loss)


@pytest.mark.parametrize("drop_last", [False, True])
def test_each_feature_once_per_epoch_in_a_new_seeded_order(drop_last):
    features = tagged_features(23)
    loader = FeatureBatches(features, 4, pad_id=PAD, seed=7, drop_last=drop_last)
    epochs = [[rows_of(b) for b in loader] for _ in range(3)]
    assert len(loader) == (5 if drop_last else 6) == len(epochs[0])
    for epoch in epochs:
        seen = [i for batch in epoch for i in batch]
        assert len(seen) == len(set(seen)) == (20 if drop_last else 23)
    assert epochs[0] != epochs[1] != epochs[2]
    again = FeatureBatches(features, 4, pad_id=PAD, seed=7, drop_last=drop_last)
    assert [[rows_of(b) for b in again] for _ in range(3)] == epochs
    other_seed = FeatureBatches(features, 4, pad_id=PAD, seed=8, drop_last=drop_last)
    assert [rows_of(b) for b in other_seed] != epochs[0]


def test_without_shuffle_the_order_is_the_features_order():
    loader = FeatureBatches(tagged_features(10), 4, pad_id=PAD, seed=0, shuffle=False)
    assert [rows_of(b) for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("consumed", [0, 3, 6, 8, 13])  # within epoch 0, at its end, inside epoch 1, ...
def test_resume_continues_with_exactly_the_uninterrupted_batches(consumed):
    features = tagged_features(23)
    uninterrupted = Endless(FeatureBatches(features, 4, pad_id=PAD, seed=3))
    expected = [next(uninterrupted) for _ in range(20)]
    first = Endless(FeatureBatches(features, 4, pad_id=PAD, seed=3))
    for _ in itertools.islice(first, consumed):
        pass
    state = first.state_dict()
    ended = consumed and consumed % 6 == 0  # the epoch's last batch was yielded: its position is 6 until the next
    assert (state["epoch"], state["position"]) == ((consumed // 6 - 1, 6) if ended else divmod(consumed, 6))
    resumed = Endless(FeatureBatches(features, 4, pad_id=PAD, seed=3))
    resumed.load_state_dict(state)
    for want in expected[consumed:]:
        got = next(resumed)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_state_from_a_different_loader_is_refused():
    state = FeatureBatches(tagged_features(10), 4, pad_id=PAD, seed=3).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        FeatureBatches(tagged_features(10), 2, pad_id=PAD, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="features"):
        FeatureBatches(tagged_features(11), 4, pad_id=PAD, seed=3).load_state_dict(state)


def test_too_few_features_for_a_full_batch_is_an_error():
    with pytest.raises(ValueError, match="batch"):
        FeatureBatches(tagged_features(3), 4, pad_id=PAD, seed=0, drop_last=True)
