"""Tokenizers: one `Tokenizer` interface over the files models ship with, and training new ones.

`tokenizer` loads tokenizer.json, WordPiece vocab.txt, tiktoken files and GGUF vocabularies behind one
interface (encode, decode, special tokens, chat template); `train` trains byte-level BPE, WordPiece,
Unigram or character tokenizers on text files and saves them in the same tokenizer.json layout, so a
trained tokenizer loads like a downloaded one.
"""

from lmforge.data.tokenizers.tokenizer import Tokenizer, gpt2_tokenizer, load_tokenizer
from lmforge.data.tokenizers.train import save_tokenizer, train_tokenizer

__all__ = ["Tokenizer", "gpt2_tokenizer", "load_tokenizer", "save_tokenizer", "train_tokenizer"]
