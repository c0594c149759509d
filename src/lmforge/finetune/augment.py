"""Training-set augmentation for fine-tuning: `--data.augment eda|backtranslate --data.augment_factor K`.

Augmentation adds label-preserving variants of the training records only, after the validation (and test)
records are split off, and in K-fold after each fold is split off, so no variant of a held-out sentence is
ever trained on (which would inflate held-out scores). The training set grows K-fold: each record is kept and
K - 1 variants of it are added (fewer when a text is too short to give K - 1 distinct ones). K = 1 changes
nothing; K < 1 would shrink the set and is refused.

One object per method (`AUGMENTERS`), each naming the tasks it keeps labels valid for:
- eda (Wei & Zou, 2019; `lmforge.data.readers.augment`): random replacement, insertion, swap and deletion of
  words, n_aug = K - 1 variants per sentence (the paper uses 16 for < 500 sentences, 4 above), words drawn
  from the training texts. Classification only: moving words would misalign a tagged sentence's tags.
- backtranslate (Sennrich et al., 2016; Xie et al., 2020): each text translated to a pivot language and back
  by two lmforge seq2seq models (beam search), one paraphrase per text, so K must be 2; paraphrases equal to
  the text are dropped. data.augment_model translates source -> pivot, data.augment_back_model pivot ->
  source (default: the same model, for one trained on both directions).
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.finetune.datasets import TaskData


class Augmenter(ABC):
    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]

    def check(self, config: FinetuneConfig) -> None:  # noqa: B027 (optional: most need no check)
        """Refuse, before anything is read or trained, settings this method cannot serve."""

    @abstractmethod
    def variants(self, records: list, n: int, config: FinetuneConfig) -> list:
        """Up to `n` new records per record of `records` (the originals not included)."""


class EDAAugmenter(Augmenter):
    name = "eda"
    tasks = ("classification",)

    def variants(self, records: list, n: int, config: FinetuneConfig) -> list:
        from lmforge.data.readers.augment import AugmentVocab, EDAConfig, augment_classification

        return augment_classification(
            records, EDAConfig(n_aug=n), seed=config.train.seed, vocab=AugmentVocab.build(records)
        )


def seq2seq_model_folder(value: str, field: str) -> Path:
    """The model folder of a fine-tuned seq2seq run given as `data.<field>`; one line naming what is wrong."""
    from lmforge.finetune.recipe import TASK_FILE
    from lmforge.finetune.tasks import TASKS

    folder = Path(value)
    if (folder / "model" / TASK_FILE).is_file():
        folder = folder / "model"
    if not (folder / TASK_FILE).is_file():
        raise FileNotFoundError(
            f"data.{field}={value!r} is not a fine-tuned model folder (no {TASK_FILE}); pass the run or model "
            "folder of `lmforge finetune --task seq2seq`"
        )
    task = json.loads((folder / TASK_FILE).read_text(encoding="utf-8")).get("task")
    if task not in TASKS or TASKS[task].head != "seq2seq_lm":
        raise ValueError(
            f"data.{field}={value!r} is a {task} model, not a seq2seq one; back-translation needs a model "
            "fine-tuned with --task seq2seq"
        )
    return folder


class BackTranslationAugmenter(Augmenter):
    name = "backtranslate"
    tasks = ("classification",)

    def check(self, config: FinetuneConfig) -> None:
        data = config.data
        if not data.augment_model:
            raise ValueError("data.augment=backtranslate needs data.augment_model=FOLDER (a seq2seq fine-tuned model)")
        if data.augment_factor != 2:
            raise ValueError(
                f"data.augment_factor={data.augment_factor}: back-translation makes one paraphrase per text "
                "(one round trip); set data.augment_factor=2"
            )
        seq2seq_model_folder(data.augment_model, "augment_model")
        if data.augment_back_model:
            seq2seq_model_folder(data.augment_back_model, "augment_back_model")

    def variants(self, records: list, n: int, config: FinetuneConfig) -> list:
        from lmforge.data.readers.augment import back_translate_examples
        from lmforge.finetune.evaluation import load_finetuned

        data = config.data
        there = load_finetuned(seq2seq_model_folder(data.augment_model, "augment_model"))
        back = there
        if data.augment_back_model:
            back = load_finetuned(seq2seq_model_folder(data.augment_back_model, "augment_back_model"))

        def translate(texts: list[str], source: str, target: str) -> list[str]:
            model, _, task, saved = there if source == "source" else back
            return task.generate(model, [(saved.data.prefix + text, "") for text in texts])

        return back_translate_examples(records, translate, source="source", pivots=("pivot",))


AUGMENTERS: dict[str, Augmenter] = {a.name: a for a in (EDAAugmenter(), BackTranslationAugmenter())}


def check_augment(config: FinetuneConfig) -> None:
    """Refuse an augmentation that does not exist for the task or cannot run, before the run starts."""
    name = config.data.augment
    if not name:
        return
    augmenter = AUGMENTERS[name]
    if config.task.task not in augmenter.tasks:
        raise ValueError(
            f"data.augment={name!r} keeps labels valid for {', '.join(augmenter.tasks)} only, not "
            f"{config.task.task!r}; drop data.augment"
        )
    augmenter.check(config)


def augment_training(config: FinetuneConfig, data: TaskData) -> tuple[TaskData, dict[str, Any] | None]:
    """(data with variants of its training records added, a note of what was done), validation and test left
    as they are; (data, None) without augmentation."""
    name, factor = config.data.augment, config.data.augment_factor
    if not name or factor == 1:
        return data, None
    added = AUGMENTERS[name].variants(data.train, factor - 1, config)
    note = {"method": name, "factor": factor, "original": len(data.train), "added": len(added)}
    return dataclasses.replace(data, train=data.train + added), note
