"""Task records for fine-tuning: from the catalog, from sets derived from it, or from the user's files.

`load_task_data(config)` returns train / validation / test lists of one record type per task:

    classification        ClassificationExample       catalog classification sets; CSV/TSV/JSONL files
    token-classification  TaggedSentence              wsj-pos, wsj-ner-derived; CoNLL column files
    qa                    QAExample                   squad-derived; SQuAD JSON (v1.1 or v2.0)
    seq2seq               (source, target) pairs      kjv-spanish; TSV or JSONL with source/target fields
    sft                   InstructionExample          JSONL (alpaca or chat); catalog classification and
                                                      translation sets turned into instructions (below)

Validation comes from `data.validation`, else the catalog's "validation" split, else a seeded
`data.val_fraction` of train (stratified by label for classification). Test comes from `data.test`, else the
catalog's "test" split, else there is none.

Instruction sets derived from the catalog (for `sft`): a classification set becomes "Classify the sentiment
of this text as positive or negative. Text: ... -> <label>", a translation set becomes "Translate to Spanish:
... -> <target>", so a chat model can be taught a new behaviour from real data and scored on held-out items.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.conll import TaggedSentence
from lmforge.data.tasks import ClassificationExample, InstructionExample, Message

DERIVED = ("wsj-ner-derived", "squad-derived")
LANGUAGES = {"en": "English", "es": "Spanish"}


@dataclass
class TaskData:
    """The records of one run and where they came from."""

    train: list
    validation: list
    test: list | None
    source: str
    labels: tuple[str, ...] = ()


def _catalog(name: str):
    from lmforge.data.catalog import CATALOG, load_dataset

    if name in CATALOG:
        return load_dataset(name)
    if name == "wsj-ner-derived" or name == "squad-derived":
        return load_dataset("wsj-pos")
    return None


def _classification_records(records: list[dict]) -> list[ClassificationExample]:
    return [ClassificationExample(r["text"].strip(), (str(r["label"]),)) for r in records]


def _tagged(records: list[dict]) -> list[TaggedSentence]:
    return [TaggedSentence(tuple(r["tokens"]), tuple(r["tags"])) for r in records]


def _from_catalog(name: str, dataset, config) -> dict[str, list]:
    """{split: records} of a catalog (or derived) set for the task."""
    task, data = config.task.task, config.data
    kind = dataset.kind
    splits: dict[str, list] = {}
    for split, records in dataset.splits.items():
        if task == "classification" and kind == "classification":
            splits[split] = _classification_records(records)
        elif task == "token-classification" and kind == "token-classification":
            sentences = _tagged(records)
            if name == "wsj-ner-derived":
                from lmforge.data.derived import wsj_ner_derived

                sentences = wsj_ner_derived(sentences)
            splits[split] = sentences
        elif task == "qa" and name == "squad-derived":
            from lmforge.data.derived import cloze_qa_from_tagged

            splits[split] = cloze_qa_from_tagged(
                _tagged(records),
                seed=config.train.seed,
                unanswerable_fraction=0.25 if data.version_2 else 0.0,
                id_prefix=f"squad-derived-{split}",
            )
        elif task == "seq2seq" and kind == "translation":
            splits[split] = [(data.prefix + r[data.source_field], r[data.target_field]) for r in records]
        elif task == "sft" and kind in ("classification", "translation"):
            splits[split] = instructions_from_records(records, kind, dataset.labels, data)
        else:
            raise ValueError(
                f"data.dataset={name!r} is a {kind} set; it cannot feed task {task!r}. "
                f"See `lmforge data list` for sets of each kind, or pass a file"
            )
    return splits


def instructions_from_records(records: list[dict], kind: str, labels: tuple[str, ...], data) -> list:
    """Instruction conversations over a catalog set: classification -> answer with the label; translation ->
    answer with the target sentence."""
    conversations = []
    if kind == "classification":
        choices = " or ".join(labels)
        for r in records:
            prompt = (
                f"Classify the sentiment of this text as {choices}. Answer with one word.\n\nText: {r['text'].strip()}"
            )
            conversations.append(_conversation(prompt, str(r["label"])))
    else:
        source = LANGUAGES.get(data.source_field, data.source_field)
        target = LANGUAGES.get(data.target_field, data.target_field)
        for r in records:
            prompt = f"Translate from {source} to {target}: {r[data.source_field]}"
            conversations.append(_conversation(prompt, r[data.target_field]))
    return conversations


def _conversation(prompt: str, answer: str) -> InstructionExample:
    return InstructionExample((Message("user", prompt), Message("assistant", answer)))


def read_task_file(path: str | Path, config, labels: Any = None) -> list:
    """The records of a user's file for `config.task.task`."""
    task, data = config.task.task, config.data
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} not found; pass a catalog name (lmforge data list) or a file")
    if task == "classification":
        from lmforge.data.tasks import load_classification

        loaded = load_classification(
            path,
            label_vocab=labels,
            text_field=data.text_field,
            label_field=data.label_field,
            text_pair_field=data.text_pair_field or None,
            multi_label=data.multi_label,
        )
        return loaded.examples
    if task == "token-classification":
        from lmforge.data.conll import read_conll

        return list(read_conll(path))
    if task == "qa":
        from lmforge.data.squad import read_squad

        return read_squad(path).examples
    if task == "seq2seq":
        if path.suffix in (".tsv", ".txt"):
            from lmforge.data.tasks import read_parallel_tsv

            return [(data.prefix + p.source, p.target) for p in read_parallel_tsv(path)]
        from lmforge.data.tasks import iter_jsonl

        pairs = []
        for line, record in iter_jsonl(path):
            if data.source_field not in record or data.target_field not in record:
                raise ValueError(
                    f"{path}:{line}: needs fields {data.source_field!r} and {data.target_field!r} "
                    "(set data.source_field / data.target_field)"
                )
            pairs.append((data.prefix + str(record[data.source_field]), str(record[data.target_field])))
        return pairs
    from lmforge.data.tasks import read_instructions

    return list(read_instructions(path))


def _label_of(record: Any) -> str | None:
    if isinstance(record, ClassificationExample):
        return "|".join(record.labels)
    return None


def split_off(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded `fraction` of the records, stratified by label for classification (each
    label keeps its share, at least one example when it has two or more)."""
    rng = random.Random(seed)
    groups: dict[str | None, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(_label_of(record), []).append(i)
    held: set[int] = set()
    for indices in groups.values():
        indices = indices[:]
        rng.shuffle(indices)
        n = round(len(indices) * fraction)
        n = max(n, 1) if len(indices) >= 2 else 0
        held.update(indices[:n])
    if not held or len(held) == len(records):
        raise ValueError(f"cannot hold out {fraction:.0%} of {len(records)} examples; give data.validation a file")
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def load_task_data(config) -> TaskData:
    """Train, validation and (if any) test records for the run; see the module docstring."""
    data = config.data
    name = data.dataset
    dataset = _catalog(name)
    if dataset is not None:
        splits = _from_catalog(name, dataset, config)
        source = f"{name} ({dataset.source})"
        labels = tuple(dataset.labels)
    else:
        splits = {"train": read_task_file(name, config)}
        source = name
        labels = ()
    train = splits.get("train") or []
    if not train:
        raise ValueError(f"{name}: the training set is empty; check the file and the data.* field names")
    if data.max_examples:
        rng = random.Random(config.train.seed)
        train = train[:]
        rng.shuffle(train)
        train = train[: data.max_examples]
    if data.validation:
        validation = read_task_file(data.validation, config)
    elif splits.get("validation"):
        validation = splits["validation"]
    else:
        train, validation = split_off(train, data.val_fraction, config.train.seed)
    test = read_task_file(data.test, config) if data.test else splits.get("test")
    if not validation:
        raise ValueError(f"the validation set of {name} is empty; pass data.validation=FILE")
    return TaskData(train=train, validation=validation, test=test, source=source, labels=labels)
