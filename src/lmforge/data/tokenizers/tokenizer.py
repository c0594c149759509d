"""Tokenizers from the files models ship with, behind one interface.

`load_tokenizer(path)` reads any of:
  - a Hugging Face `tokenizer.json`, or a folder holding one (its `tokenizer_config.json` /
    `special_tokens_map.json` / `chat_template.jinja` give the special tokens and the chat template);
    this is also what `Tokenizer.save` and lmforge's tokenizer training write;
  - a BERT `vocab.txt` (WordPiece; lowercasing per the folder's `tokenizer_config.json`, default on);
  - a tiktoken BPE file (`*.tiktoken`: base64 token and rank per line), read with GPT-2's split regex and
    `<|endoftext|>` as the id after the last rank, as GPT-2's `gpt2.tiktoken` needs;
  - a `.gguf` model file, whose `tokenizer.ggml.*` metadata (tokens, merges, token types, special ids,
    chat template) is rebuilt as a byte-level BPE.

Every source answers the same calls: `encode`, `decode`, `encode_batch` (padding, truncation, tensors),
`vocab_size`, the special tokens and their ids, `apply_chat_template` and `save`.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from lmforge.io import write_text_atomic

SPECIAL_NAMES = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_END_OF_TEXT = "<|endoftext|>"
GPT2_TIKTOKEN = ("openai-whisper", "20250625", "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96")
GPT2_TIKTOKEN_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"
# `tokenizer.ggml.pre` -> split regex applied before byte-level BPE (None: GPT-2's own, inside ByteLevel).
# Llama 3's and Qwen2's patterns are those published with their tokenizers; SmolLM2 splits single digits.
GGUF_SPLITS = {
    "default": None,
    "gpt-2": None,  # llama.cpp's name for GPT-2's own split
    "gpt2": None,  # what lmforge wrote before it checked against llama.cpp: still read
    "smollm": None,
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
CHAT_TEMPLATE_SECONDS = 5.0
"""Wall-clock budget for rendering one chat template. Real templates take milliseconds; one that loops for
billions of steps must fail rather than hold a thread (a server's, a chat's) forever."""
CHAT_TEMPLATE_MAX_CHARS = 10_000_000
"""Most characters a rendered chat template, or one string or list built by `*` or `+` inside it, may hold."""


class Tokenizer:
    """Text <-> token ids, over a `tokenizers.Tokenizer` or a `tiktoken.Encoding` (`backend`).

    Special tokens are strings or None: `bos_token`, `eos_token`, `pad_token`, `unk_token`, `cls_token`,
    `sep_token`, `mask_token` (assignable, e.g. `tok.pad_token = tok.eos_token`); `*_token_id` give ids.
    """

    def __init__(
        self,
        backend: Any,
        special_tokens: dict[str, str | None] | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        for name in SPECIAL_NAMES:
            setattr(self, f"{name}_token", (special_tokens or {}).get(name))
        if isinstance(backend, tokenizers.Tokenizer):
            backend.no_padding()  # padding and truncation are ours, per call (tokenizer.json may carry them)
            backend.no_truncation()

    # --- vocabulary -------------------------------------------------------------------------------------
    @property
    def is_tiktoken(self) -> bool:
        return not isinstance(self.backend, tokenizers.Tokenizer)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added and special tokens included."""
        if self.is_tiktoken:
            return self.backend.n_vocab
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if self.is_tiktoken:
            try:
                return self.backend.encode_single_token(token)
            except KeyError:
                return None
        return self.backend.token_to_id(token)

    @property
    def special_tokens(self) -> dict[str, str]:
        """{"bos": "<s>", ...} for the special tokens this tokenizer has."""
        return {name: getattr(self, f"{name}_token") for name in SPECIAL_NAMES if getattr(self, f"{name}_token")}

    @property
    def all_special_ids(self) -> list[int]:
        if self.is_tiktoken:
            return sorted(self.backend.encode_single_token(t) for t in self.backend.special_tokens_set)
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    # --- encoding ---------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the source's template adds ([CLS] ... [SEP])."""
        return self._encode_many([_check_text(text)], add_special_tokens, None)[0]

    def _encode_many(self, texts: list[str], add_special_tokens: bool, max_length: int | None) -> list[list[int]]:
        if self.is_tiktoken:
            ids = self.backend.encode_batch(texts, allowed_special="all")
            return [row[:max_length] if max_length is not None else row for row in ids]
        if max_length is None:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        n_special = self.backend.num_special_tokens_to_add(False) if add_special_tokens else 0
        out = []
        for encoding in self.backend.encode_batch(texts, add_special_tokens=False):
            encoding.truncate(max(max_length - n_special, 0))  # keep room for [CLS]/[SEP], as HF does
            out.append(self.backend.post_process(encoding, add_special_tokens=add_special_tokens).ids[:max_length])
        return out

    def encode_batch(
        self,
        texts: Sequence[str],
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        padding_side: str = "right",
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> dict[str, Any]:
        """{"input_ids", "attention_mask"} (1 = real token) for a list of texts.

        padding: False, True / "longest" (to the longest row), "max_length" (to `max_length`);
        truncation=True cuts rows to `max_length` (default `model_max_length`), keeping the special tokens;
        padding_side "right" or "left" (left for batched generation); return_tensors None (lists) or "pt"."""
        if isinstance(texts, str):
            raise ValueError("encode_batch takes a list of texts; use encode for a single text")
        texts = [_check_text(t) for t in texts]
        padding = "longest" if padding is True else padding
        if padding not in (False, "longest", "max_length"):
            raise ValueError(f"padding={padding!r} is not supported; choose False, True, 'longest' or 'max_length'")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r} is not supported; choose 'right' or 'left'")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; choose None or 'pt'")
        limit = max_length if max_length is not None else self.model_max_length
        if (truncation or padding == "max_length") and limit is None:
            raise ValueError("truncation and padding='max_length' need max_length (this tokenizer sets no default)")
        ids = self._encode_many(texts, add_special_tokens, limit if truncation else None)
        mask = [[1] * len(row) for row in ids]
        if padding:
            width = limit if padding == "max_length" else max((len(row) for row in ids), default=0)
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError("this tokenizer has no pad token; set one first, e.g. tok.pad_token = tok.eos_token")
            for row, row_mask in zip(ids, mask, strict=True):
                n = max(width - len(row), 0)  # a longer row (padding="max_length" without truncation) stays
                if padding_side == "right":
                    row.extend([pad_id] * n)
                    row_mask.extend([0] * n)
                else:
                    row[:0] = [pad_id] * n
                    row_mask[:0] = [0] * n
        if return_tensors == "pt":
            import torch

            if len({len(row) for row in ids}) > 1:
                raise ValueError("rows have different lengths; pass padding=True to return tensors")
            return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask)}
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or a 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if any(not isinstance(i, int) or not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"ids must be integers in [0, {self.vocab_size}); got {ids[:20]}")
        if self.is_tiktoken:
            if skip_special_tokens:
                special = set(self.all_special_ids)
                ids = [i for i in ids if i not in special]
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # --- chat ---------------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """The prompt text for `messages` ([{"role": "user", "content": "..."}, ...]), rendered from the
        source's Jinja chat template in a sandbox (as transformers does: trim_blocks, lstrip_blocks) within
        CHAT_TEMPLATE_SECONDS and CHAT_TEMPLATE_MAX_CHARS (see `budgeted_sandbox`). Every failure is a
        one-line ValueError; running past the budget is its subclass `ChatTemplateBudgetError`."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; its source (tokenizer_config.json or GGUF) had none")
        env = budgeted_sandbox()(CHAT_TEMPLATE_SECONDS, CHAT_TEMPLATE_MAX_CHARS)
        tokens = {f"{name}_token": token for name, token in self.special_tokens.items()}
        try:
            template = env.from_string(self.chat_template)
            chunks = template.generate(
                messages=messages, add_generation_prompt=add_generation_prompt, **tokens, **variables
            )
            return env.join(chunks)
        except ChatTemplateBudgetError:
            raise
        except RecursionError:
            raise ValueError("chat template failed: recursion too deep (a macro that calls itself forever?)") from None
        except Exception as exc:  # the template's bug (TemplateError, TypeError, ...): one line, not a traceback
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise ValueError(f"chat template failed on these messages: {message}") from exc

    # --- saving -----------------------------------------------------------------------------------------
    def to_tokenizers(self) -> tokenizers.Tokenizer:
        """The `tokenizers.Tokenizer` equivalent of this tokenizer (tiktoken files are converted)."""
        if self.is_tiktoken:
            return tiktoken_to_tokenizers(self.backend)
        return self.backend

    def save(self, folder: str | Path) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template) to `folder`,
        each atomically; `load_tokenizer(folder)` and transformers' `AutoTokenizer` read them back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({f"{name}_token": token for name, token in self.special_tokens.items()})
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        write_text_atomic(folder / "tokenizer.json", self.to_tokenizers().to_str(pretty=False))
        write_text_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        return folder


class ChatTemplateBudgetError(ValueError):
    """A chat template ran past CHAT_TEMPLATE_SECONDS or CHAT_TEMPLATE_MAX_CHARS while rendering."""


class TickingRange(Sequence):
    """`range` inside templates: every step of a loop over it calls `tick` (the clock check), so nested loops
    with empty bodies, which call nothing else, cannot run unchecked."""

    def __init__(self, items: range, tick) -> None:
        self._items, self._tick = items, tick  # private: the sandbox hides underscored attributes

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        return self._items[index]

    def __iter__(self) -> Iterator[int]:
        for i in self._items:
            self._tick()
            yield i


@functools.cache
def budgeted_sandbox() -> type:
    """Jinja's immutable sandbox with a time and a size budget (the class, built on first use so that only
    code rendering templates imports jinja2).

    A template is a program: a loop of 10^10 steps holds its thread for hours and `'x' * 10**10` takes 10 GB
    in one step. So the clock is checked at every call, attribute or item lookup, step of a loop over
    `range` (at most MAX_RANGE = 100000 items, Jinja's sandbox limit) and output chunk (rendering runs as
    `template.generate()`); `*`, `+` and `**` may not build a value over the size budget, and the output may
    not grow past it. (Filters such as `center(10**9)` are not bounded in size.)"""
    from jinja2 import TemplateError
    from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class BudgetedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**"})

        def __init__(self, seconds: float, max_chars: int) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            self.seconds, self.max_chars = seconds, max_chars
            self.deadline = time.monotonic() + seconds
            self.filters["tojson"] = tojson
            self.globals.update(range=self.range, raise_exception=raise_exception, strftime_now=strftime_now)

        def tick(self) -> None:
            if time.monotonic() > self.deadline:
                raise ChatTemplateBudgetError(
                    f"chat template rendering exceeded {self.seconds:g} s; the template loops too long, fix it"
                )

        def too_big(self, size: float) -> ChatTemplateBudgetError:
            return ChatTemplateBudgetError(
                f"chat template rendering exceeded {self.max_chars} characters (a value of {size:.3g}); "
                "the template or the messages are too large"
            )

        def range(self, *args: int) -> TickingRange:
            items = range(*args)
            if len(items) > MAX_RANGE:
                raise ChatTemplateBudgetError(
                    f"chat template asked for a range of {len(items)} items; the sandbox allows {MAX_RANGE}"
                )
            return TickingRange(items, self.tick)

        def call(self, context, obj, /, *args, **kwargs):
            self.tick()
            return super().call(context, obj, *args, **kwargs)

        def getattr(self, obj, attribute):
            self.tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            self.tick()
            return super().getitem(obj, argument)

        def call_binop(self, context, operator: str, left, right):
            """Refuse, before computing it, a sequence or a power larger than the size budget."""
            self.tick()
            sequences = (str, list, tuple)
            if operator == "*" and isinstance(right, sequences) and isinstance(left, int):
                left, right = right, left
            if operator == "*" and isinstance(left, sequences) and isinstance(right, int):
                size = len(left) * max(right, 0)
            elif operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
                size = len(left) + len(right)
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                size = max(right, 0) * math.log10(abs(left))  # decimal digits of the result
            else:
                size = 0
            if size > self.max_chars:
                raise self.too_big(size)
            return super().call_binop(context, operator, left, right)

        def join(self, chunks: Iterable[str]) -> str:
            """The rendered text; its size and the clock are checked at every chunk."""
            out, size = [], 0
            for chunk in chunks:
                size += len(chunk)
                if size > self.max_chars:
                    raise self.too_big(size)
                self.tick()
                out.append(chunk)
            return "".join(out)

    return BudgetedSandbox


def _special_id_property(name: str) -> property:
    return property(lambda self: self.token_to_id(getattr(self, f"{name}_token")), doc=f"id of the {name} token")


for _name in SPECIAL_NAMES:
    setattr(Tokenizer, f"{_name}_token_id", _special_id_property(_name))


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError(f"expected text (str), got {type(text).__name__}")
    return text


# --- loading ----------------------------------------------------------------------------------------------
def load_tokenizer(path: str | Path) -> Tokenizer:
    """A Tokenizer from a tokenizer.json (file or folder), a BERT vocab.txt, a *.tiktoken file or a .gguf."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        found = sorted(path.glob("*.tiktoken")) or sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return load_tokenizer(found[0])
        raise ValueError(
            f"{path} holds no tokenizer.json, vocab.txt, single *.tiktoken or single *.gguf file; "
            "point load_tokenizer at one of those"
        )
    if path.suffix == ".json":
        return from_tokenizer_json(path)
    if path.suffix == ".txt":
        return from_wordpiece_vocab(path)
    if path.suffix == ".tiktoken":
        return from_tiktoken_file(path)
    if path.suffix == ".gguf":
        return from_gguf(path)
    raise ValueError(
        f"{path.name} is not a known tokenizer format; load a tokenizer.json, a vocab.txt (WordPiece), "
        "a *.tiktoken file, a .gguf model, or a folder holding one"
    )


def folder_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json merged over special_tokens_map.json, plus chat_template.jinja, of a folder."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            config.update(read_json(folder / name))
    if (folder / "chat_template.jinja").is_file():
        config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return config


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid UTF-8 JSON ({exc}); restore or regenerate it") from exc


def special_tokens_from_config(config: dict[str, Any]) -> dict[str, str | None]:
    """{"bos": "<s>", ...} from a tokenizer_config dict (values are strings or {"content": ...} dicts)."""
    out = {}
    for name in SPECIAL_NAMES:
        value = config.get(f"{name}_token")
        out[name] = value.get("content") if isinstance(value, dict) else value
    return out


def chat_template_from_config(config: dict[str, Any], source: Path) -> str | None:
    """The template string: `chat_template` is one, or a list of named ones ([{"name": "default", "template":
    ...}, {"name": "tool_use", ...}]) of which the default is taken. Any other shape is an error naming
    `source` (the file the field came from), raised when the tokenizer loads rather than at the first chat."""
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template
    ):
        return {t["name"]: t["template"] for t in template}.get("default")
    raise ValueError(
        f"{source}: chat_template must be a Jinja template (a string) or a list of "
        f'{{"name": ..., "template": ...}} objects, got {json.dumps(template)[:80]}; fix or remove the field'
    )


def model_max_length_from_config(config: dict[str, Any]) -> int | None:
    value = config.get("model_max_length")
    return value if isinstance(value, int) and value < 10**9 else None  # HF writes 1e30 for "no limit"


def from_tokenizer_json(path: Path) -> Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON or unknown fields
        raise ValueError(f"{path} is not a valid tokenizer.json ({exc}); regenerate it or pick the right file") from exc
    config = folder_config(path.parent)
    return Tokenizer(
        backend,
        special_tokens_from_config(config),
        chat_template_from_config(config, path.parent / "tokenizer_config.json"),
        model_max_length_from_config(config),
    )


def from_wordpiece_vocab(path: Path) -> Tokenizer:
    """BERT's WordPiece: BERT normalizer (lowercase per `do_lower_case`), BERT pre-tokenizer, ##-continuations,
    [CLS] text [SEP] (pairs: [CLS] a [SEP] b [SEP])."""
    try:
        tokens = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text; a WordPiece vocab.txt has one token per line") from exc
    vocab = {token: i for i, token in enumerate(tokens) if token}
    config = folder_config(path.parent)
    special = {"unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]"}
    special.update({k: v for k, v in special_tokens_from_config(config).items() if v})
    missing = [t for t in (special["unk"], special["cls"], special["sep"]) if t not in vocab]
    if missing:
        raise ValueError(f"{path} lacks the BERT special tokens {missing}; it is not a BERT WordPiece vocab.txt")
    lowercase = config.get("do_lower_case", True)
    backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=special["unk"], max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=config.get("strip_accents"), lowercase=lowercase
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = special["cls"], special["sep"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([t for t in special.values() if t in vocab])
    template = chat_template_from_config(config, path.parent / "tokenizer_config.json")
    return Tokenizer(backend, special, template, model_max_length_from_config(config))


def from_tiktoken_file(path: Path) -> Tokenizer:
    """A tiktoken BPE file (lines `base64(token) rank`) with GPT-2's split regex and <|endoftext|> after it."""
    import tiktoken

    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise ValueError(
                f"{path}:{number} is not a tiktoken line ('<base64 token> <rank>'); the file is not tiktoken BPE"
            ) from exc
    if not ranks:
        raise ValueError(f"{path} is empty; a tiktoken BPE file has one '<base64 token> <rank>' line per token")
    end = max(ranks.values()) + 1
    encoding = tiktoken.Encoding(
        name=path.stem, pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={GPT2_END_OF_TEXT: end}
    )
    special = {"bos": GPT2_END_OF_TEXT, "eos": GPT2_END_OF_TEXT, "unk": GPT2_END_OF_TEXT}
    return Tokenizer(encoding, special, model_max_length=1024 if path.stem == "gpt2" else None)


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's BPE (50,257 ids), from `gpt2.tiktoken` inside the openai-whisper sdist, fetched once."""
    from lmforge.fetch import extract, fetch_package

    name, version, sha256 = GPT2_TIKTOKEN
    folder = extract(fetch_package(name, version, sha256), GPT2_TIKTOKEN_MEMBER)
    return from_tiktoken_file(folder / GPT2_TIKTOKEN_MEMBER)


def from_gguf(path: Path) -> Tokenizer:
    """The byte-level BPE described by a GGUF file's `tokenizer.ggml.*` metadata (`model` "gpt2")."""
    from lmforge.hf.gguf import open_gguf, read_metadata

    meta = read_metadata(open_gguf(path))
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported; lmforge rebuilds 'gpt2' (byte-level BPE) tokenizers"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_SPLITS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; lmforge knows {sorted(GGUF_SPLITS)}")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges", [])
    if not tokens:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens; the file carries no tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path} lists {len(tokens)} tokens but {len(types)} token types; the file is corrupt")
    kinds = dict(zip(tokens, types, strict=True))
    backend = tokenizers.Tokenizer(
        models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=GGUF_SPLITS[pre] is None)
    if pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif GGUF_SPLITS[pre] is not None:
        split = pre_tokenizers.Split(tokenizers.Regex(GGUF_SPLITS[pre]), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t, k in kinds.items() if k == GGUF_CONTROL]
    )
    backend.add_tokens([tokenizers.AddedToken(t, normalized=False) for t, k in kinds.items() if k == GGUF_USER_DEFINED])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    special = {"bos": token("bos"), "eos": token("eos"), "pad": token("padding"), "unk": token("unknown")}
    add = [special[k] for k in ("bos", "eos") if meta.get(f"tokenizer.ggml.add_{k}_token") and special[k]]
    if add:  # e.g. Llama 3 starts every text with <|begin_of_text|>
        bos = [special["bos"]] if meta.get("tokenizer.ggml.add_bos_token") else []
        eos = [special["eos"]] if meta.get("tokenizer.ggml.add_eos_token") else []
        backend.post_processor = processors.TemplateProcessing(
            single=[*bos, "$A", *eos],
            pair=[*bos, "$A", *eos, "$B:1", *eos],
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(add)],
        )
    return Tokenizer(backend, special, meta.get("tokenizer.chat_template"), meta.get("llama.context_length"))


# --- tiktoken -> tokenizers ---------------------------------------------------------------------------------
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes map to
    the code points from 256 on, so every byte sequence is a printable string (Radford et al., 2019)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """`token` split by byte-pair encoding with only merges of rank < `below` (tiktoken's algorithm):
    repeatedly join the adjacent pair whose join has the lowest rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        joins = [(ranks.get(parts[i] + parts[i + 1], below), i) for i in range(len(parts) - 1)]
        rank, i = min(joins)
        if rank >= below:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tiktoken_to_tokenizers(encoding: Any) -> tokenizers.Tokenizer:
    """The byte-level BPE equal to a GPT-2-regex tiktoken encoding: each multi-byte token of rank r is the
    merge of the two parts BPE leaves when only ranks below r are allowed; merges are listed in rank order."""
    ranks: dict[bytes, int] = encoding._mergeable_ranks
    alphabet = byte_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = bpe_parts(token, ranks, rank)
            if len(parts) != 2:
                raise ValueError(f"tiktoken token {token!r} (rank {rank}) is not one merge of earlier tokens")
            merges.append((spell(parts[0]), spell(parts[1])))
    backend = tokenizers.Tokenizer(models.BPE({spell(t): r for t, r in ranks.items()}, merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in encoding._special_tokens]
    )
    return backend
