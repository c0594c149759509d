"""SQuAD v1.1 / v2.0 reader and writer: real-format samples, offset checks, bad input."""

import json

import pytest

from lmforge.data.readers.records import DataFormatError
from lmforge.data.readers.squad import Answer, QAExample, read_squad, write_squad

CONTEXT = "Architecturally, the school has a Catholic character. Atop the Main Building's gold dome is a golden statue."


def squad_file(tmp_path, qas, version="1.1", name="dev.json"):
    path = tmp_path / name
    root = {"version": version, "data": [{"title": "University", "paragraphs": [{"context": CONTEXT, "qas": qas}]}]}
    path.write_text(json.dumps(root, indent=2))
    return path


def test_v11_with_several_reference_answers(tmp_path):
    start = CONTEXT.index("golden statue")
    qas = [
        {
            "id": "5733be284776f41900661182",
            "question": "What is atop the Main Building?",
            "answers": [
                {"text": "golden statue", "answer_start": start},
                {"text": "a golden statue", "answer_start": start - 2},
            ],
        }
    ]
    data = read_squad(squad_file(tmp_path, qas))
    assert data.version == "1.1" and data.n_skipped == 0
    (example,) = data.examples
    assert example.title == "University" and not example.is_impossible
    assert [example.context[a.answer_start : a.answer_end] for a in example.answers] == [
        "golden statue",
        "a golden statue",
    ]


def test_v20_is_impossible_questions(tmp_path):
    start = CONTEXT.index("Catholic")
    qas = [
        {"id": "q1", "question": "What character?", "answers": [{"text": "Catholic", "answer_start": start}]},
        {
            "id": "q2",
            "question": "What is atop the Science Building?",
            "answers": [],
            "plausible_answers": [{"text": "golden statue", "answer_start": CONTEXT.index("golden statue")}],
            "is_impossible": True,
        },
    ]
    data = read_squad(squad_file(tmp_path, qas, version="v2.0"))
    assert data.version == "v2.0"
    assert [(ex.id, ex.is_impossible, len(ex.answers)) for ex in data.examples] == [("q1", False, 1), ("q2", True, 0)]


def test_wrong_answer_start_is_an_error_with_the_question_id_or_a_counted_skip(tmp_path):
    good = {"id": "ok", "question": "?", "answers": [{"text": "school", "answer_start": CONTEXT.index("school")}]}
    bad = {
        "id": "off-by-one",
        "question": "?",
        "answers": [{"text": "school", "answer_start": CONTEXT.index("school") + 1}],
    }
    path = squad_file(tmp_path, [good, bad])
    with pytest.raises(
        DataFormatError, match=r"dev\.json: question 'off-by-one': answer 'school' is not at answer_start 22"
    ):
        read_squad(path)
    data = read_squad(path, on_error="skip")
    assert [ex.id for ex in data.examples] == ["ok"]
    assert data.skipped_ids == ["off-by-one"] and data.n_skipped == 1


@pytest.mark.parametrize(
    ("qas", "message"),
    [
        ([{"id": "a", "answers": []}], r"data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing 'question'"),
        ([{"id": "a", "question": "?", "answers": []}], "question 'a' has no answers and is not marked is_impossible"),
        (
            [{"id": "a", "question": "?", "is_impossible": True, "answers": [{"text": "the", "answer_start": 17}]}],
            "question 'a' is_impossible but has answers",
        ),
        (
            [{"id": "a", "question": "?", "answers": [{"text": "the", "answer_start": "17"}]}],
            r"answers\[0\]\.answer_start: expected int",
        ),
        (
            [
                {"id": "a", "question": "?", "answers": [{"text": "the", "answer_start": 17}]},
                {"id": "a", "question": "?", "answers": [{"text": "the", "answer_start": 17}]},
            ],
            "question id 'a' appears twice",
        ),
    ],
)
def test_malformed_squad_structure(tmp_path, qas, message):
    with pytest.raises(DataFormatError, match=message):
        read_squad(squad_file(tmp_path, qas))


def test_invalid_json_empty_and_wrong_top_level(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": [\n  {"title": "x",\n  "paragraphs": oops}\n]}')
    with pytest.raises(DataFormatError, match=r"broken\.json:3: not valid JSON"):
        read_squad(path)
    path.write_text("")
    with pytest.raises(DataFormatError, match=r"broken\.json: file is empty"):
        read_squad(path)
    path.write_text('{"articles": []}')
    with pytest.raises(DataFormatError, match=r"top level: missing 'data'"):
        read_squad(path)


def test_write_then_read_round_trips_and_groups_paragraphs(tmp_path):
    other = "Paris is the capital of France."
    examples = [
        QAExample("q1", "Which school?", CONTEXT, (Answer("school", CONTEXT.index("school")),), False, "U"),
        QAExample("q2", "What dome?", CONTEXT, (Answer("gold", CONTEXT.index("gold")),), False, "U"),
        QAExample("q3", "Capital of Spain?", other, (), True, "Cities"),
    ]
    assert write_squad(examples, tmp_path / "out.json") == 3
    root = json.loads((tmp_path / "out.json").read_text())
    assert root["version"] == "v2.0"
    assert [len(article["paragraphs"][0]["qas"]) for article in root["data"]] == [2, 1]
    assert read_squad(tmp_path / "out.json").examples == examples
    wrong = [QAExample("q4", "?", other, (Answer("Paris", 1),))]
    with pytest.raises(ValueError, match="question 'q4': answer 'Paris' is not at answer_start 1"):
        write_squad(wrong, tmp_path / "wrong.json")
    assert not (tmp_path / "wrong.json").exists()
