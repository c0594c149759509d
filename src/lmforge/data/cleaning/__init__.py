"""Cleaning: the pipeline that normalises, filters, deduplicates and scrubs documents (`lmforge data clean`).

`clean` chains the steps and runs them over a file; each step lives in its own module (`normalize`,
`quality` for Gopher's heuristic filters, `dedup` for exact and MinHash near-duplicates, `pii`), and
`clean_io` reads the inputs and opens the (compressed) output. The steps are separate so that each can be
tested, benchmarked and reused on its own.
"""

from lmforge.data.cleaning.clean import CleanConfig, CleanReport, clean_file, clean_texts

__all__ = ["CleanConfig", "CleanReport", "clean_file", "clean_texts"]
