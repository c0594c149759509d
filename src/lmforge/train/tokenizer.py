"""A run's tokenizer: learned once by process 0, saved in the run folder, read back by everyone else.

Recipes that train a model from random weights learn a tokenizer on their training text. Which kind and
which special tokens follow the model family's conventions (`TokenizerPlan`): BERT's WordPiece with
[PAD] [UNK] [CLS] [SEP] [MASK]; T5's unigram with <pad> </s> <unk> and 100 sentinels <extra_id_N> for span
corruption; the original Transformer's (and any decoder fine-tuned from a preset) byte-level BPE with
<pad> <s> </s> <unk>. Special tokens take the first ids in order, so pad is 0 for all three.

Saving the tokenizer in `run_dir/tokenizer/` makes a resumed run and every DDP process use the very same
ids: the `tokenizers` trainers break ties differently across processes, so learning it twice could not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.data.tokenizers.tokenizer import Tokenizer, gpt2_tokenizer, load_tokenizer
from lmforge.train.distributed import DistInfo, barrier


@dataclass(frozen=True)
class TokenizerPlan:
    """How to learn a tokenizer for a model family: `kind` replaces "bpe" when the recipe asks to learn a
    subword tokenizer (data.tokenizer=train); `specials` are the special tokens (None: the kind's defaults);
    `extra_ids` sentinels are added at the top of the vocabulary (T5)."""

    kind: str = "bpe"
    specials: tuple[str, ...] | None = None
    extra_ids: int = 0


PLAIN = TokenizerPlan()
MASKED_LM = TokenizerPlan("wordpiece", ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))
SPAN_CORRUPTION = TokenizerPlan("unigram", ("<pad>", "</s>", "<unk>"), extra_ids=100)
SEQ2SEQ = TokenizerPlan("bpe", ("<pad>", "<s>", "</s>", "<unk>"))
FAMILY_PLANS = {"bert": MASKED_LM, "roberta": MASKED_LM, "t5": SPAN_CORRUPTION}


def plan_for_family(family: str) -> TokenizerPlan:
    """The plan of a family learning a tokenizer for fine-tuning: its own for BERT-style and T5 models, else
    pad/bos/eos/unk (decoders and the original Transformer need all four to pad, start and stop)."""
    return FAMILY_PLANS.get(family, SEQ2SEQ)


def learn_tokenizer(kind: str, texts: list[str], vocab_size: int, folder: Path, plan: TokenizerPlan = PLAIN) -> None:
    """Learn a `kind` tokenizer ("char", or "bpe" meaning the plan's subword kind) on `texts`, save to `folder`."""
    from lmforge.data.tokenizers.train import DEFAULT_SPECIAL_TOKENS, save_tokenizer, train_tokenizer

    if kind == "bpe":
        kind = plan.kind
    specials = list(plan.specials) if plan.specials is not None else DEFAULT_SPECIAL_TOKENS[kind]
    backend = train_tokenizer(
        texts, kind=kind, vocab_size=vocab_size, special_tokens=specials, extra_ids=plan.extra_ids
    )
    save_tokenizer(backend, folder, kind, specials)


def run_tokenizer(
    spec: str,
    texts: list[str],
    run_dir: Path,
    info: DistInfo,
    plan: TokenizerPlan,
    vocab_size: int,
    reuse: bool,
) -> Tokenizer:
    """The run's tokenizer for `spec` ("char", "train", "gpt2" or a path). "char" and "train" are learned by
    process 0 into run_dir/tokenizer unless a resumed run (`reuse`) finds it there; every process then reads
    that folder back."""
    folder = run_dir / "tokenizer"
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec not in ("char", "train"):
        return load_tokenizer(spec)
    if info.is_main and not (reuse and (folder / "tokenizer.json").is_file()):
        learn_tokenizer("char" if spec == "char" else "bpe", texts, vocab_size, folder, plan)
    barrier(info)  # every process, always: the others read what process 0 wrote
    return load_tokenizer(folder)
