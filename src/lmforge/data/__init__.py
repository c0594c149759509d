"""Data: corpora and their catalog, cleaning, tokenizers, shards and loaders, and readers for labelled task data."""

from lmforge.data.catalog import Dataset, load_dataset
from lmforge.data.files import iter_documents

__all__ = ["Dataset", "iter_documents", "load_dataset"]
