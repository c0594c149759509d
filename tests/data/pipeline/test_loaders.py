"""Loaders: windows and labels line up with the model's shift, packed epochs cover every token once, BERT
masking has its published statistics, T5 span corruption has its structure, and every loader resumes from
`state_dict` onto exactly the batches an uninterrupted run sees."""

from itertools import islice

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge import build_model
from lmforge.data.pipeline.loaders import (
    MLMBatches,
    MLMMasker,
    PackedBatches,
    RandomWindows,
    Seq2SeqBatches,
    SpanCorruptionBatches,
    SpanCorruptor,
    TokenStream,
    continuation_table,
    span_corruption_lengths,
    word_starts_from_word_ids,
)
from lmforge.data.pipeline.shards import prepare
from lmforge.data.tokenizers.train import save_tokenizer, train_tokenizer


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def test_random_windows_line_up_with_the_models_shifted_labels():
    tokens = np.random.default_rng(0).integers(0, 1024, size=5000).astype(np.uint16)
    loader = RandomWindows(tokens, batch_size=4, seq_len=32, seed=1)
    batch = next(loader)
    starts = loader.starts(0)
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.int64
    for row, start in zip(batch["input_ids"], starts, strict=True):
        assert row.tolist() == tokens[start : start + 32].tolist()
    assert torch.equal(batch["labels"], batch["input_ids"])
    model = build_model("gpt-tiny").eval()
    with torch.no_grad():
        out = model(batch["input_ids"], labels=batch["labels"])
    targets = torch.tensor(np.stack([tokens[s + 1 : s + 32] for s in starts]).astype(np.int64))  # next tokens
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 1024), targets.reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_token_stream_reads_across_shards():
    tokens = np.arange(1000, dtype=np.uint16)
    stream = TokenStream([tokens[:300], tokens[300:310], tokens[310:]])
    for start, length in ((0, 1000), (295, 20), (305, 10), (990, 50)):
        assert stream.read(start, length).tolist() == tokens[start : start + length].tolist()
    sharded = RandomWindows([tokens[:300], tokens[300:]], 8, 16, seed=3)
    whole = RandomWindows(tokens, 8, 16, seed=3)
    assert same_batches(list(islice(sharded, 5)), list(islice(whole, 5)))


def test_loaders_read_a_prepared_folder(tmp_path, shakespeare_path):
    char = tmp_path / "char"
    save_tokenizer(
        train_tokenizer([shakespeare_path.read_text()], kind="char"), char, "char", ["<|endoftext|>", "<unk>"]
    )
    (tmp_path / "text.txt").write_text(shakespeare_path.read_text()[:100_000])
    prepare([str(tmp_path / "text.txt")], str(char), tmp_path / "data", log=lambda *a: None)
    batch = next(RandomWindows(tmp_path / "data", 2, 64, split="validation"))
    assert batch["input_ids"].shape == (2, 64) and int(batch["input_ids"].max()) < 67


def test_packed_batches_cover_every_token_once_per_epoch():
    tokens = np.arange(1003)  # unique values: each token is identifiable
    loader = PackedBatches(tokens, batch_size=4, seq_len=10, seed=0)
    assert len(loader) == 26  # 101 blocks (the last has 3 tokens), 4 per batch
    epochs = []
    for _ in range(2):
        seen = []
        for batch in loader:
            labels = batch["labels"]
            seen += labels[labels != -100].tolist()
            assert torch.equal(batch["input_ids"][labels != -100], labels[labels != -100])
        assert sorted(seen) == list(range(1003))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    last = [b for b in PackedBatches(tokens, 101, 10, shuffle=False)][0]
    assert last["input_ids"][-1].tolist() == [1000, 1001, 1002] + [0] * 7
    assert last["labels"][-1].tolist() == [1000, 1001, 1002] + [-100] * 7


@pytest.mark.parametrize("make", ["random", "packed", "mlm", "span", "seq2seq"])
def test_state_dict_resumes_onto_the_uninterrupted_sequence(make):
    tokens = np.random.default_rng(0).integers(10, 1000, size=20_000)
    pairs = [(list(range(i % 7 + 1)), list(range(i % 5 + 1))) for i in range(45)]

    def build(seed=5):
        if make == "random":
            return RandomWindows(tokens, 4, 64, seed=seed)
        if make == "packed":
            return PackedBatches(tokens, 32, 64, seed=seed)
        if make == "mlm":
            return MLMBatches(tokens, 32, 64, MLMMasker(1000, 3, [0, 1, 2]), seed=seed, cls_id=1, sep_id=2)
        if make == "span":
            return SpanCorruptionBatches(tokens, 32, 64, SpanCorruptor(eos_id=1, sentinel_start=999), seed=seed)
        return Seq2SeqBatches(pairs, 4, seed=seed)

    def take(loader, n):  # n batches, crossing epoch boundaries as a training loop does
        out = []
        while len(out) < n:
            out += list(islice(iter(loader), n - len(out)))
        return out

    reference = take(build(), 16)
    loader = build()
    first = take(loader, 7)
    state = loader.state_dict()
    restored = build()
    restored.load_state_dict(state)
    assert same_batches(first + take(restored, 9), reference)
    assert not same_batches(take(build(seed=6), 16), reference)  # the seed matters
    other = build(seed=6)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_mlm_masking_follows_bert_statistics_and_spares_special_tokens():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, size=(256, 512))
    specials = rng.random(ids.shape) < 0.05
    ids[specials] = rng.integers(0, 3, size=int(specials.sum()))  # [PAD]=0, [CLS]=1, [SEP]=2 sprinkled in
    masker = MLMMasker(vocab_size=1000, mask_id=3, special_ids=[0, 1, 2, 4])
    inputs, labels = masker(ids, np.random.default_rng(1))
    selected = labels != -100
    candidates = ~np.isin(ids, [0, 1, 2, 3, 4])
    assert not (selected & ~candidates).any()  # special tokens are never selected
    assert np.array_equal(inputs[~selected], ids[~selected]) and np.array_equal(labels[selected], ids[selected])
    assert abs(selected.sum() / candidates.sum() - 0.15) < 0.003
    masked = (inputs == 3) & selected
    kept = (inputs == ids) & selected
    replaced = selected & ~masked & ~kept
    n = selected.sum()
    assert abs(masked.sum() / n - 0.8) < 0.01 and abs(kept.sum() / n - 0.1) < 0.01
    assert abs(replaced.sum() / n - 0.1) < 0.01
    assert not np.isin(inputs[replaced], [0, 1, 2, 3, 4]).any()  # replacements are ordinary tokens
    padding = np.zeros_like(ids)
    padding[:, :256] = 1
    _, labels = masker(ids, np.random.default_rng(1), attention_mask=padding)
    assert (labels[:, 256:] == -100).all()


def test_whole_word_masking_selects_every_piece_of_a_word(tmp_path, shakespeare_path):
    text = shakespeare_path.read_text()[:100_000]
    tok = train_tokenizer([text], kind="wordpiece", vocab_size=600)
    table = continuation_table(tok.get_vocab(), tok.get_vocab_size())
    assert table[tok.token_to_id("##s")] and not table[tok.token_to_id("the")]
    encodings = tok.encode_batch([line for line in text.splitlines() if len(line) > 40][:200])
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    attention = np.zeros_like(ids)
    for r, e in enumerate(encodings):
        ids[r, : len(e.ids)], attention[r, : len(e.ids)] = e.ids, 1
    masker = MLMMasker(tok.get_vocab_size(), mask_id=4, special_ids=[0, 1, 2, 3], continuation=table)
    _, labels = masker(ids, np.random.default_rng(0), attention_mask=attention)
    for r, e in enumerate(encodings):  # word ids from the tokenizer's offsets are the oracle
        words = {}
        for t, word in enumerate(e.word_ids):
            if word is not None:
                words.setdefault(word, set()).add(bool(labels[r, t] != -100))
        assert all(len(flags) == 1 for flags in words.values())
    by_offsets = [word_starts_from_word_ids(e.word_ids) for e in encodings[:5]]
    by_table = [~table[np.array(e.ids)] for e in encodings[:5]]
    for a, b, e in zip(by_offsets, by_table, encodings[:5], strict=True):
        assert np.array_equal(a[1:-1], b[1:-1]), e.tokens  # same words either way (specials aside)
    bpe = train_tokenizer([text], kind="bpe", vocab_size=600)
    bpe_table = continuation_table(bpe.get_vocab())
    assert not bpe_table[bpe.token_to_id("Ġthe")] and not bpe_table[bpe.token_to_id("Ċ")]
    assert not bpe_table[bpe.token_to_id(",")]


def test_mlm_batches_wrap_blocks_in_cls_and_sep():
    tokens = np.arange(5, 1000)
    loader = MLMBatches(tokens, 8, 16, MLMMasker(1000, 3, [0, 1, 2]), cls_id=1, sep_id=2, shuffle=False)
    batches = list(loader)
    assert batches[0]["input_ids"].shape == (8, 16)
    original = torch.where(batches[0]["labels"] != -100, batches[0]["labels"], batches[0]["input_ids"])
    assert original[0].tolist()[:3] == [1, 5, 6] and original[0, -1] == 2
    last = batches[-1]
    n = int(last["attention_mask"][-1].sum())
    assert last["input_ids"][-1, n - 1] == 2 and (last["input_ids"][-1, n:] == 0).all()


def test_span_corruption_lengths_match_t5():
    assert span_corruption_lengths(512) == (568, 114)  # T5's random_spans_helper for its 512-token inputs
    assert span_corruption_lengths(64)[0] > 64


def test_span_corruption_structure_and_noise_density():
    corruptor = SpanCorruptor(eos_id=1, sentinel_start=32099)
    rng = np.random.default_rng(0)
    noise, spans, total = 0, 0, 0
    for _ in range(300):
        tokens = rng.integers(2, 32000, size=568)
        inputs, targets = corruptor(tokens, rng)
        assert inputs[-1] == 1 and targets[-1] == 1 and len(inputs) == 512
        in_sentinels = inputs[inputs >= 32000]
        assert in_sentinels.tolist() == list(range(32099, 32099 - len(in_sentinels), -1))  # <extra_id_0>, 1, ...
        assert targets[0] == 32099 and targets[targets >= 32000].tolist() == in_sentinels.tolist()
        fills = np.split(targets[:-1], np.flatnonzero(targets[:-1] >= 32000)[1:])  # [sentinel, span...] each
        rebuilt = []
        for token in inputs[:-1]:
            rebuilt += fills[32099 - token][1:].tolist() if token >= 32000 else [token]
        assert rebuilt == tokens.tolist()
        noise += len(targets) - 1 - len(in_sentinels)
        spans += len(in_sentinels)
        total += len(tokens)
    assert abs(noise / total - 0.15) < 0.002 and abs(noise / spans - 3.0) < 0.1


def test_span_corruption_batches_are_padded_to_fixed_shapes_and_train_t5():
    tokens = np.random.default_rng(0).integers(2, 1000, size=3000)
    loader = SpanCorruptionBatches(tokens, 4, 64, SpanCorruptor(eos_id=1, sentinel_start=1023), pad_id=0)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 64) and batch["labels"].shape == (4, loader.targets_length)
    model = build_model("t5-tiny")
    assert torch.isfinite(model(**batch).loss)


def test_seq2seq_batches_pad_sources_and_ignore_padded_labels():
    pairs = [([5, 6, 7], [8, 9]), ([5], [8, 9, 10, 11]), ([5, 6], [8])]
    loader = Seq2SeqBatches(pairs, batch_size=2, pad_id=0, shuffle=False)
    first, second = list(loader)
    assert first["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert first["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert first["labels"].tolist() == [[8, 9, -100, -100], [8, 9, 10, 11]]
    assert second["input_ids"].tolist() == [[5, 6]] and second["labels"].tolist() == [[8]]
    seen = []
    for batch in Seq2SeqBatches(pairs, 2, seed=1):
        seen += [
            tuple(row[mask == 1].tolist())
            for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
    assert sorted(seen) == sorted(tuple(s) for s, _ in pairs)
