"""Tokenizer training: every kind learns from Shakespeare, saves a tokenizer.json that `tokenizers` and
lmforge load, gives its special tokens the documented ids and decodes back to the text."""

import errno
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from lmforge.cli import main
from lmforge.data.tokenizers import train
from lmforge.data.tokenizers.tokenizer import load_tokenizer
from lmforge.data.tokenizers.train import (
    DEFAULT_SPECIAL_TOKENS,
    VocabularyShortfallWarning,
    save_tokenizer,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_path) -> Path:
    """The first ~200 kB of tiny Shakespeare (cut at a line), as a file: enough to learn a vocabulary."""
    text = shakespeare_path.read_text()[:200_000]
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(text[: text.rfind("\n") + 1])
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict[str, Path]:
    """Each kind trained through the CLI, as a user would: kind -> output folder."""
    folders = {}
    for kind, size in (("bpe", 1000), ("wordpiece", 1000), ("unigram", 800), ("char", 0)):
        out = tmp_path_factory.mktemp(kind)
        args = ["tokenizer", "train", "--kind", kind, "--out", str(out), str(corpus)]
        assert main(args + (["--vocab-size", str(size)] if size else [])) == 0
        folders[kind] = out
    return folders


def test_special_tokens_take_the_first_ids_in_the_documented_order(trained):
    for kind, folder in trained.items():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        for i, token in enumerate(DEFAULT_SPECIAL_TOKENS[kind]):
            assert tok.token_to_id(token) == i, (kind, token)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["kind"] == kind and config["vocab_size"] == tok.get_vocab_size()
    wordpiece = json.loads((trained["wordpiece"] / "tokenizer_config.json").read_text())
    assert (wordpiece["pad_token_id"], wordpiece["unk_token_id"], wordpiece["mask_token_id"]) == (0, 1, 4)
    assert (wordpiece["cls_token"], wordpiece["sep_token"]) == ("[CLS]", "[SEP]")
    unigram = json.loads((trained["unigram"] / "tokenizer_config.json").read_text())
    assert (unigram["pad_token_id"], unigram["eos_token_id"], unigram["unk_token_id"]) == (0, 1, 2)
    assert json.loads((trained["bpe"] / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


def test_vocabulary_sizes_are_the_requested_ones(trained):
    sizes = {k: Tokenizer.from_file(str(f / "tokenizer.json")).get_vocab_size() for k, f in trained.items()}
    assert sizes["bpe"] == 1000 and sizes["wordpiece"] == 1000 and sizes["unigram"] == 800


def test_byte_level_bpe_decodes_exactly_any_text(trained, corpus):
    tok = Tokenizer.from_file(str(trained["bpe"] / "tokenizer.json"))
    text = corpus.read_text()
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # the merges compress Shakespeare
    unseen = "Zürich — naïve café 東京 🙂\t\r\n  x"  # bytes never seen in training still round-trip
    assert tok.decode(tok.encode(unseen).ids) == unseen
    assert tok.encode("the end<|endoftext|>").ids[-1] == 0


def test_char_tokenizer_is_the_sorted_characters_of_the_corpus(trained, corpus):
    tok = Tokenizer.from_file(str(trained["char"] / "tokenizer.json"))
    text = corpus.read_text()
    chars = sorted(set(text))  # nanoGPT's shakespeare_char mapping, after the two specials
    stoi = {c: i + 2 for i, c in enumerate(chars)}
    assert tok.get_vocab_size() == len(chars) + 2
    ids = tok.encode(text).ids
    assert ids == [stoi[c] for c in text]
    assert tok.decode(ids) == text
    assert tok.encode("a€").ids == [stoi["a"], 1]  # unseen characters are <unk>


def test_wordpiece_splits_bert_style_and_wraps_with_cls_sep(trained, corpus):
    tok = Tokenizer.from_file(str(trained["wordpiece"] / "tokenizer.json"))
    text = corpus.read_text()[:5000]
    encoding = tok.encode(text)
    assert encoding.ids[0] == 2 and encoding.ids[-1] == 3  # [CLS] ... [SEP]
    assert 1 not in encoding.ids  # no [UNK]: every training character is in the alphabet
    words = []
    for token in encoding.tokens[1:-1]:  # glue ## continuations back onto their words
        if token.startswith("##"):
            words[-1] += token[2:]
        else:
            words.append(token)
    expected = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))]
    assert words == expected and all(w == w.lower() for w in words)
    pair = tok.encode("hear me", "speak")
    assert pair.tokens[-1] == "[SEP]" and pair.type_ids[-1] == 1 and pair.type_ids[0] == 0


def test_unigram_decodes_to_its_normalized_text_and_appends_eos(trained, corpus):
    tok = Tokenizer.from_file(str(trained["unigram"] / "tokenizer.json"))
    text = corpus.read_text()[:5000]
    ids = tok.encode(text).ids
    assert ids[-1] == 1 and 2 not in ids  # </s> last, no <unk>
    assert tok.decode(ids) == tok.normalizer.normalize_str(text)


def test_extra_ids_are_t5_sentinels_at_the_top_of_the_vocabulary(corpus, tmp_path):
    tok = train_tokenizer([corpus.read_text()[:40_000]], kind="unigram", vocab_size=500, extra_ids=10)
    assert tok.get_vocab_size() == 510
    assert tok.token_to_id("<extra_id_0>") == 509 and tok.token_to_id("<extra_id_9>") == 500
    save_tokenizer(tok, tmp_path, "unigram", DEFAULT_SPECIAL_TOKENS["unigram"])
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["extra_ids"] == 10


def test_lmforge_load_tokenizer_reads_the_roles(trained):
    wordpiece = load_tokenizer(trained["wordpiece"])
    assert (wordpiece.cls_token_id, wordpiece.sep_token_id, wordpiece.mask_token_id) == (2, 3, 4)
    bpe = load_tokenizer(trained["bpe"])
    assert bpe.eos_token_id == 0 and bpe.decode(bpe.encode("Hear me speak.")) == "Hear me speak."


def test_saving_leaves_only_the_two_files(trained):
    assert sorted(p.name for p in trained["bpe"].iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_empty_or_missing_input_is_a_clear_error_with_no_output(kind, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--kind", kind, "--out", str(out), str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err and not out.exists()
    assert main(["tokenizer", "train", "--out", str(out), str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()


def test_binary_input_and_bad_settings_are_refused(tmp_path, capsys):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--out", str(out), str(binary)]) == 2
    assert "looks binary" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="leaves no room"):
        train_tokenizer(["some text"], kind="bpe", vocab_size=1)
    with pytest.raises(ValueError, match="unknown token"):
        train_tokenizer(["some text"], kind="char", special_tokens=["<|endoftext|>"])
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer(["some text"], kind="sentencepiece")


def test_a_vocabulary_the_corpus_cannot_fill_is_a_warning_and_in_the_config(corpus, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text(corpus.read_text()[:20_000])
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "8192", "--out", str(out), str(small)]) == 0
    reached = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    err = capsys.readouterr().err
    assert err.startswith(f"lmforge tokenizer train: warning: vocabulary of {reached:,} tokens, not the 8,192 asked")
    assert "--min-frequency 2" in err and err.count("\n") == 1 and reached < 8192
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["vocab_size"], config["requested_vocab_size"]) == (reached, 8192)
    for kind in ("wordpiece", "unigram"):
        with pytest.warns(VocabularyShortfallWarning, match="not the 8,192 asked"):
            train_tokenizer([small.read_text()], kind=kind, vocab_size=8192)


def test_a_filled_vocabulary_says_nothing(trained, capsys):
    config = json.loads((trained["bpe"] / "tokenizer_config.json").read_text())
    assert config["vocab_size"] == config["requested_vocab_size"] == 1000
    assert "requested_vocab_size" not in json.loads((trained["char"] / "tokenizer_config.json").read_text())


def test_out_that_is_a_file_is_refused_before_training(corpus, tmp_path, capsys):
    taken = tmp_path / "tok"
    taken.write_text("not a folder")
    assert main(["tokenizer", "train", "--out", str(taken), str(corpus)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tok is a file" in err and taken.read_text() == "not a folder"


def test_disk_full_while_saving_is_a_one_line_error(corpus, tmp_path, capsys, monkeypatch):
    def full(path, text, encoding="utf-8"):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train, "write_text_atomic", full)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--kind", "char", "--out", str(out), str(corpus)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk full (or not writable) while writing" in err
    assert not (out / "tokenizer.json").exists()


@pytest.mark.slow
def test_every_kind_trains_on_all_of_tiny_shakespeare(shakespeare_path):
    text = shakespeare_path.read_text()
    for kind in ("bpe", "wordpiece", "unigram", "char"):
        tok = train_tokenizer([text], kind=kind, vocab_size=4096)
        ids = tok.encode(text[:20000]).ids
        if kind in ("bpe", "char"):
            assert tok.decode(ids) == text[:20000]
        assert len(ids) > 0
