"""Task records for fine-tuning: from the catalog, from sets derived from it, or from the user's files.

`load_task_data(config)` returns train / validation / test lists of the task's record type; the task
(`lmforge.finetune.tasks`) says which catalog sets can feed it and reads its splits and the user's files.

Validation comes from `data.validation`, else the catalog's "validation" split, else a seeded
`data.val_fraction` of train (stratified as the task says: by label for classification). Test comes from
`data.test`, else the catalog's "test" split, else there is none.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.finetune.tasks import TASKS

if TYPE_CHECKING:
    from lmforge.finetune.config import FinetuneConfig

DERIVED = ("wsj-ner-derived", "squad-derived")  # built from wsj-pos by `lmforge.data.corpora.derived`


@dataclass
class TaskData:
    """The records of one run and where they came from."""

    train: list
    validation: list
    test: list | None
    source: str
    labels: tuple[str, ...] = ()


def catalog_dataset(name: str) -> Any:
    """The catalog set `name` (a derived set: the set it is derived from), or None when it is no catalog name."""
    from lmforge.data.corpora.catalog import CATALOG, load_dataset

    if name in CATALOG:
        return load_dataset(name)
    if name in DERIVED:
        return load_dataset("wsj-pos")
    return None


def catalog_splits(name: str, dataset: Any, config: FinetuneConfig) -> dict[str, list]:
    """{split: records} of a catalog (or derived) set for the task."""
    task = TASKS[config.task.task]
    if not task.reads_catalog(name, dataset.kind):
        raise ValueError(
            f"data.dataset={name!r} is a {dataset.kind} set; it cannot feed task {task.name!r}. "
            f"See `lmforge data list` for sets of each kind, or pass a file"
        )
    return {split: task.catalog_records(name, dataset, split, rows, config) for split, rows in dataset.splits.items()}


def read_task_file(path: str | Path, config: FinetuneConfig) -> list:
    """The records of a user's file for `config.task.task`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} not found; pass a catalog name (lmforge data list) or a file")
    return TASKS[config.task.task].read_file(path, config)


def split_off(records: list, fraction: float, seed: int, strata: list[str] | None = None) -> tuple[list, list]:
    """(train, held out): a seeded `fraction` of the records, stratified by `strata` when given (each stratum
    keeps its share, at least one example when it has two or more)."""
    rng = random.Random(seed)
    groups: dict[str | None, list[int]] = {}
    for i, stratum in enumerate(strata or [None] * len(records)):
        groups.setdefault(stratum, []).append(i)
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


def load_task_data(config: FinetuneConfig) -> TaskData:
    """Train, validation and (if any) test records for the run; see the module docstring."""
    data = config.data
    name = data.dataset
    task = TASKS[config.task.task]
    dataset = catalog_dataset(name)
    if dataset is not None:
        splits = catalog_splits(name, dataset, config)
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
        train, validation = split_off(train, data.val_fraction, config.train.seed, task.strata(train))
    test = read_task_file(data.test, config) if data.test else splits.get("test")
    if not validation:
        raise ValueError(f"the validation set of {name} is empty; pass data.validation=FILE")
    return TaskData(train=train, validation=validation, test=test, source=source, labels=labels)
