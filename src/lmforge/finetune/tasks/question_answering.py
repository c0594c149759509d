"""Extractive question answering: the answer is a span of the context (SQuAD v1.1, or v2.0 with
`data.version_2`, where a question may have none).

Records are `QAExample`s: the catalog's squad-derived set (cloze questions over WSJ sentences, built with the
run's seed) or a user's SQuAD JSON file. Prediction inputs are {"question": ..., "context": ..., ["id": ...]}
objects, or a SQuAD JSON file. Long contexts are split into overlapping windows (`lmforge.finetune.qa`).

Loss: (CE(start) + CE(end)) / 2 per window, the BERT SQuAD loss (Devlin et al., 2019, section 4.2). Metrics:
SQuAD exact match and token F1 (x 100) of the best span over a question's windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.readers.squad import QAExample
from lmforge.finetune.tasks.base import Task, model_inputs
from lmforge.finetune.tasks.tagging import tagged_sentences

if TYPE_CHECKING:
    from lmforge.finetune.config import FinetuneConfig


class QATask(Task):
    name = "qa"
    head = "question_answering"
    default_model = "all-MiniLM-L6-v2"
    feature_unit = "windows"  # a long context gives several features

    @classmethod
    def reads_catalog(cls, name: str, kind: str) -> bool:
        return name == "squad-derived"

    @classmethod
    def catalog_records(cls, name: str, dataset: Any, split: str, rows: list, config: FinetuneConfig) -> list:
        from lmforge.data.corpora.derived import cloze_qa_from_tagged

        return cloze_qa_from_tagged(
            tagged_sentences(rows),
            seed=config.train.seed,
            unanswerable_fraction=0.25 if config.data.version_2 else 0.0,
            id_prefix=f"squad-derived-{split}",
        )

    @classmethod
    def read_file(cls, path: Path, config: FinetuneConfig) -> list:
        from lmforge.data.readers.squad import read_squad

        return read_squad(path).examples

    @classmethod
    def texts(cls, records: list) -> list[str]:
        return [r.question + " " + r.context for r in records]

    def encode(self, records: list, split: str) -> list[dict]:
        from lmforge.finetune.qa import encode_qa

        d = self.config.data
        features, stats = encode_qa(
            self.tokenizer,
            records,
            max_length=d.max_length,
            doc_stride=d.doc_stride,
            max_query_length=d.max_query_length,
        )
        for key, value in stats.items():
            if isinstance(value, int):
                self.stats[f"{split}_{key}"] = value
        return features

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(float(batch["input_ids"].shape[0]), device=batch["input_ids"].device)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**model_inputs(model, batch)).logits.float()  # (B, T, 2)
        smoothing = self.smoothing(model)
        start = F.cross_entropy(logits[..., 0], batch["start_positions"], reduction="sum", label_smoothing=smoothing)
        end = F.cross_entropy(logits[..., 1], batch["end_positions"], reduction="sum", label_smoothing=smoothing)
        return (start + end) / 2

    def answers(self, model: nn.Module, records: list, features: list[dict]) -> dict[str, str]:
        """{question id: answer text}, decoded from the start/end logits of every window."""
        from lmforge.finetune.qa import decode_qa

        starts, ends = [], []
        for _, batch, logits in self.forward_batches(model, features):
            mask = batch["attention_mask"].bool()
            for row in range(logits.shape[0]):
                n = int(mask[row].sum())
                starts.append(logits[row, :n, 0].cpu().numpy())
                ends.append(logits[row, :n, 1].cpu().numpy())
        d = self.config.data
        decoded = decode_qa(
            records,
            features,
            starts,
            ends,
            n_best=d.n_best,
            max_answer_length=d.max_answer_length,
            version_2=d.version_2,
        )
        return decoded[0] if isinstance(decoded, tuple) else decoded

    def evaluate(self, model: nn.Module, records: list, features: list[dict], final: bool = True) -> tuple[dict, dict]:
        from lmforge.eval import squad_exact_match, squad_f1

        answers = self.answers(model, records, features)
        predicted = [answers.get(r.id, "") for r in records]
        gold = [[a.text for a in r.answers] for r in records]
        metrics = {"exact_match": 100.0 * squad_exact_match(predicted, gold), "f1": 100.0 * squad_f1(predicted, gold)}
        metrics["loss"] = self.eval_loss(model, features)
        return metrics, {}

    def predict(self, model: nn.Module, records: list, features: list[dict]) -> list[dict]:
        answers = self.answers(model, records, features)
        return [{"id": r.id, "question": r.question, "answer": answers.get(r.id, "")} for r in records]

    def read_inputs(self, path: str | Path) -> list:
        """A SQuAD JSON file's questions, or inputs one a line (`input_record`)."""
        path = Path(path)
        if path.suffix == ".json" and path.is_file():
            from lmforge.data.readers.squad import read_squad

            return read_squad(path).examples
        return super().read_inputs(path)

    def input_record(self, row: dict | str, number: int) -> QAExample:
        """{"question": ..., "context": ..., ["id": ...]}; the id defaults to the input's number."""
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("question", "context")):
            raise ValueError("needs 'question' and 'context' strings")
        return QAExample(str(row.get("id", number)), row["question"], row["context"], (), is_impossible=True)
