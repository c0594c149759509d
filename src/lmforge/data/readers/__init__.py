"""Readers for labelled task data: the small frozen records fine-tuning and evaluation consume.

`records` reads classification, parallel-text and instruction (chat) data and holds the shared pieces
(`DataFormatError`, `LabelVocab`, line and JSONL iterators); `conll` reads token-tagging data (CoNLL
columns, word/TAG text, BIO checks); `squad` reads extractive QA in the SQuAD layout; `augment` makes
more classification examples (EDA, back-translation). Each reader refuses bad input with the file, line
and fix, so a recipe never trains on a silently misread set.
"""

from lmforge.data.readers.conll import TaggedSentence, read_conll
from lmforge.data.readers.records import (
    ClassificationExample,
    DataFormatError,
    InstructionExample,
    LabelVocab,
    Message,
    ParallelExample,
    read_classification,
    read_instructions,
    read_parallel_tsv,
)
from lmforge.data.readers.squad import QAExample, read_squad

__all__ = [
    "ClassificationExample",
    "DataFormatError",
    "InstructionExample",
    "LabelVocab",
    "Message",
    "ParallelExample",
    "QAExample",
    "TaggedSentence",
    "read_classification",
    "read_conll",
    "read_instructions",
    "read_parallel_tsv",
    "read_squad",
]
