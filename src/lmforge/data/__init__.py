"""Data: corpora and their catalog, cleaning, tokenizers, the token pipeline, and readers for labelled task data.

Sub-packages: `corpora` (the catalog of real corpora and their builders), `cleaning` (normalise, filter,
deduplicate, scrub), `tokenizers` (load and train), `pipeline` (files -> token shards -> batches) and
`readers` (classification, tagging, QA and instruction records).
"""

from lmforge.data.corpora.catalog import Dataset, load_dataset
from lmforge.data.pipeline.files import iter_documents

__all__ = ["Dataset", "iter_documents", "load_dataset"]
