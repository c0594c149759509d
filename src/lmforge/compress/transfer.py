"""A transfer set for distillation: unlabelled in-domain texts that the teacher alone labels.

Hinton et al. (2015, section 3) train the student on a *transfer set*, which need not carry labels: the
teacher's soft targets are the signal. With a small labelled set and few classes, soft targets on the labelled
examples themselves add little (the teacher has nearly memorised them, so its distribution is close to the
one-hot label); what a teacher knows and the labels do not is how it answers on text nobody labelled. TinyBERT
(Jiao et al., 2020) and the self-training literature (Xie et al., 2020, "noisy student") draw their gains from
exactly this: many more inputs than labels, all labelled by the teacher.

`--transfer DATA` adds such texts to the training stream of a classification distillation: a catalog set
(every split, labels ignored) or a file of unlabelled inputs (`lmforge predict`'s formats: JSONL, CSV/TSV with a
header, or one text a line). Their label is IGNORE_INDEX, so the hard-label loss skips them and only the
teacher's terms (soft targets, hidden states, attention) train on them; the loss of a batch is still the sum
over its examples divided by their number. Texts that also occur in the run's validation or test records (or
among its labelled training records) are dropped first, so no held-out sentence is ever seen, even unlabelled.
`--transfer-sentences` splits each text into sentences (full reviews into review sentences, for a sentence
classifier); `--transfer-max N` keeps a seeded sample of N.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.nn.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.finetune.datasets import TaskData
    from lmforge.finetune.tasks.base import Task

TASKS = ("classification",)  # the tasks whose examples have one label the hard loss can skip
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
MIN_WORDS = 3  # shorter fragments ("ok .", "* * *") carry no sentiment and no sentence


def sentences(text: str) -> list[str]:
    """The sentences of `text`: split after . ! or ? (and any closing quotes or brackets) before whitespace,
    fragments of fewer than MIN_WORDS words dropped."""
    parts = (part.strip() for part in SENTENCE_END.split(text.strip()))
    return [part for part in parts if len(part.split()) >= MIN_WORDS]


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class Transfer:
    """Where the transfer texts come from and how they are cut (see the module docstring)."""

    source: str
    sentences: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--transfer-max {self.limit} must be a whole number >= 1")

    def check(self, config: FinetuneConfig) -> None:
        """Refuse, before the run starts, what the transfer set cannot serve."""
        if config.task.task not in TASKS:
            raise ValueError(
                f"--transfer adds unlabelled examples that only the teacher labels, which task {config.task.task!r} "
                f"cannot hold; it works for {', '.join(TASKS)} (for a causal LM, pass the text itself as --data)"
            )
        if config.data.multi_label:
            raise ValueError("--transfer with data.multi_label: a multi-hot target cannot be left out; drop one")
        if config.task.class_weights:
            raise ValueError(
                "--transfer with task.class_weights: class weights count examples by their label, and transfer "
                "examples have none; drop one"
            )
        if config.privacy.epsilon is not None:
            raise ValueError("--transfer with privacy.epsilon: the transfer texts would be trained on without "
                             "the privacy accounting's sampling; drop one")  # fmt: skip
        from lmforge.finetune.datasets import catalog_dataset

        if catalog_dataset(self.source) is None and not Path(self.source).is_file():
            raise FileNotFoundError(
                f"--transfer {self.source}: neither a catalog set (lmforge data list) nor a file; pass a file of "
                "unlabelled texts (JSONL, CSV with a header, or one text a line)"
            )

    def texts(self, task: Task) -> list[str]:
        """Every text of the source, in its order (split into sentences with `sentences`)."""
        from lmforge.finetune.datasets import catalog_dataset

        dataset = catalog_dataset(self.source)
        if dataset is not None:
            rows = [row for split in dataset.splits.values() for row in split]
            found = [row["text"] for row in rows if isinstance(row, dict) and isinstance(row.get("text"), str)]
            if rows and not found:
                raise ValueError(f"--transfer {self.source}: a {dataset.kind} set without a text field per record")
        else:
            found = [record.text for record in task.read_inputs(self.source)]
        if self.sentences:
            found = [s for text in found for s in sentences(text)]
        return [text.strip() for text in found if text.strip()]

    def features(self, task: Task, data: TaskData, config: FinetuneConfig) -> tuple[list[dict], dict[str, Any]]:
        """(the encoded transfer examples with their label ignored, a note of what was kept and dropped)."""
        texts = self.texts(task)
        taken = {normalise(r.text) for split in (data.train, data.validation, data.test or []) for r in split}
        seen: set[str] = set()
        kept = []
        for text in texts:
            key = normalise(text)
            if key not in taken and key not in seen:
                seen.add(key)
                kept.append(text)
        note: dict[str, Any] = {"source": self.source, "texts": len(texts), "overlap_or_repeat": len(texts) - len(kept)}
        if self.limit is not None and len(kept) > self.limit:
            kept = random.Random(config.train.seed).sample(kept, self.limit)
        if not kept:
            raise ValueError(
                f"--transfer {self.source} left no texts: {len(texts)} read, all of them repeated or also in the "
                "run's own records; pass other texts"
            )
        records = [task.input_record(text, i + 1) for i, text in enumerate(kept)]
        features = task.encode(records, "transfer")
        for feature in features:
            feature["labels"] = IGNORE_INDEX
        note["used"] = len(features)
        return features, note
