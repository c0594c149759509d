"""The task registry: every task implements the whole `Task` surface, a task that does not is refused when it is
defined, the config offers exactly the registered tasks, and a task rebuilds itself from its saved record."""

from __future__ import annotations

import inspect
import json

import pytest

from lmforge.data.readers.conll import TaggedSentence
from lmforge.data.readers.records import ClassificationExample, InstructionExample
from lmforge.data.readers.squad import QAExample
from lmforge.finetune.config import FINETUNE, FinetuneConfig, TaskSection
from lmforge.finetune.datasets import TaskData
from lmforge.finetune.tasks import TASKS, Task, build_task
from lmforge.models.config import HEADS
from lmforge.train.config import parse_args

SURFACE = (
    "reads_catalog", "catalog_records", "read_file", "texts", "strata", "from_data", "from_saved", "saved_fields",
    "model_overrides", "saved_tokenizer", "encode", "count", "loss_sum", "evaluate", "predict", "input_record",
    "read_inputs",
)  # fmt: skip


def test_every_registered_task_implements_the_whole_surface():
    assert list(TASKS) == ["classification", "token-classification", "qa", "seq2seq", "sft", "lm"]
    for name, cls in TASKS.items():
        assert cls.name == name and cls.head in HEADS, name
        assert not cls.__abstractmethods__, (name, sorted(cls.__abstractmethods__))
        for part in SURFACE:
            assert callable(getattr(cls, part)), (name, part)
        parameters = list(inspect.signature(cls.evaluate).parameters)
        assert parameters == ["self", "model", "records", "features", "final"], name  # one signature for all


def test_a_task_missing_a_part_is_refused_when_defined():
    with pytest.raises(TypeError, match=r"'half'.*does not implement .*evaluate.*input_record"):

        class Half(Task):
            name = "half"
            head = "causal_lm"

            def encode(self, records: list, split: str) -> list[dict]:
                return []

    qa = TASKS["qa"]
    with pytest.raises(TypeError, match="does not implement head"):
        type("Headless", (qa,), {"name": "headless", "head": ""})
    with pytest.raises(TypeError, match="two tasks are named 'qa'"):
        type("Again", (qa,), {"name": "qa"})
    assert list(TASKS) == ["classification", "token-classification", "qa", "seq2seq", "sft", "lm"]  # none registered


def test_config_offers_exactly_the_registered_tasks():
    assert TaskSection.__dataclass_fields__["task"].metadata["help"] == " | ".join(TASKS)
    for name in TASKS:
        assert parse_args([f"--task={name}"], FINETUNE).task.task == name
    with pytest.raises(ValueError, match="task.task='ner' is not one of classification, token-classification, qa"):
        TaskSection(task="ner")


def _config(task: str, **data) -> FinetuneConfig:
    flags = [f"--task={task}", *(f"--data.{k}={v}" for k, v in data.items())]
    return parse_args(flags, FINETUNE)


def test_labelled_tasks_rebuild_from_their_saved_record():
    config = _config("classification")
    train = [ClassificationExample("a", ("pos",)), ClassificationExample("b", ("neg",))]
    task = build_task(config, None, TaskData(train=train, validation=[], test=None, source="", labels=("pos", "neg")))
    record = json.loads(json.dumps({"task": task.name, "config": config.to_dict(), **task.saved_fields()}))
    assert record["labels"] == ["pos", "neg"]  # the catalog's order, as task.json has always kept it
    again = TASKS["classification"].from_saved(config, None, record)
    assert again.vocab == task.vocab and again.model_overrides() == {"num_labels": 2}

    config = _config("token-classification")
    train = [TaggedSentence(("John", "ran"), ("B-PER", "O"))]
    test = [TaggedSentence(("Paris",), ("B-LOC",))]
    task = build_task(config, None, TaskData(train=train, validation=train, test=test, source=""))
    assert task.saved_fields() == {"labels": ["O", "B-LOC", "B-PER"]} and task.train_tags == {"B-PER", "O"}
    again = TASKS["token-classification"].from_saved(config, None, task.saved_fields())
    assert again.tags == task.tags and again.train_tags == set(task.tags)
    for name in ("qa", "seq2seq", "sft"):
        assert TASKS[name].from_saved(_config(name), None, {}).saved_fields() == {}


def test_only_classification_is_stratified():
    records = [ClassificationExample("a", ("x", "y")), ClassificationExample("b", ("z",))]
    assert TASKS["classification"].strata(records) == ["x|y", "z"]
    assert all(TASKS[name].strata([]) is None for name in TASKS if name != "classification")


@pytest.mark.parametrize(
    ("name", "good", "bad", "kind", "message"),
    [
        ("classification", '{"text": "fine", "text_pair": "ok"}', '{"txt": "x"}', ClassificationExample, "'text'"),
        ("token-classification", '{"tokens": ["a", "b"]}', '{"tokens": []}', TaggedSentence, "'tokens'"),
        ("qa", '{"question": "q", "context": "c"}', '{"question": "q"}', QAExample, "'question' and 'context'"),
        ("seq2seq", '{"source": "hola"}', '{"src": "x"}', tuple, "'source'"),
        ("sft", '{"prompt": "hi"}', '{"text": "x"}', InstructionExample, "'prompt'"),
    ],
)
def test_prediction_inputs_per_task(tmp_path, name, good, bad, kind, message):
    config = _config(name, prefix="translate: ")
    task = TASKS[name].from_saved(config, None, {"labels": ["O", "B-X"]})
    path = tmp_path / "inputs.jsonl"
    path.write_text(good + "\n", encoding="utf-8")
    (record,) = task.read_inputs(path)
    assert isinstance(record, kind)
    if name == "qa":
        assert record.id == "1"  # the input's number when it has no id
    if name == "seq2seq":
        assert record == ("translate: hola", "")
    path.write_text(good + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:2: needs .*{message}"):
        task.read_inputs(path)


def test_prediction_inputs_use_the_field_names_the_model_was_trained_with(tmp_path):
    path = tmp_path / "inputs.jsonl"
    config = _config("classification", text_field="review", text_pair_field="other")
    task = TASKS["classification"].from_saved(config, None, {"labels": ["a", "b"]})
    path.write_text('{"review": "fine", "other": "ok"}\n{"text": "plain", "text_pair": "too"}\n', encoding="utf-8")
    assert task.read_inputs(path) == [
        ClassificationExample("fine", ("a",), "ok"),
        ClassificationExample("plain", ("a",), "too"),
    ]
    path.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:1: needs a 'review' or 'text' string"):
        task.read_inputs(path)

    task = TASKS["seq2seq"].from_saved(_config("seq2seq", source_field="de", target_field="en"), None, {})
    path.write_text('{"de": "hallo"}\n{"source": "welt"}\n', encoding="utf-8")
    assert task.read_inputs(path) == [("hallo", ""), ("welt", "")]
    assert task.shown_input(("hallo", "")) == {"de": "hallo"}
