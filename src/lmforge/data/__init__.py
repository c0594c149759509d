"""Data: corpora and their catalog, cleaning, tokenizers, shards and loaders, and readers for labelled task data."""
