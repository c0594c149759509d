"""`lmforge export --to gguf`: files that lmforge's reader, the `gguf` package and llama.cpp load back as the
same model, with the tokenizer and chat template inside."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge import build_model
from lmforge.cli import main
from lmforge.data.tokenizers.tokenizer import Tokenizer, load_tokenizer
from lmforge.hf.load import load_model
from lmforge.hf.save import save_model

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
TEXT = [
    "the quick brown fox jumps over the lazy dog 123",
    "a stitch in time saves nine, said the old tailor.",
    "GGUF files carry their tokenizer: tokens, merges and the chat template!",
] * 20


def tiny_tokenizer() -> Tokenizer:
    """A 300-id byte-level BPE (GPT-2's splitting) with two special tokens and a chat template."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TEXT, trainer)
    return Tokenizer(backend, {"bos": "<s>", "eos": "</s>"}, chat_template=CHAT_TEMPLATE)


def saved_model(folder: Path, family: str, **overrides) -> torch.nn.Module:
    """A small random model of `family` with the tiny tokenizer, saved in lmforge's format at `folder`; norm
    gains and biases are drawn away from 1 and 0 so a mapping mix-up shows in the logits."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = build_model(
        f"{family}-tiny", n_layer=2, vocab_size=tokenizer.vocab_size + 4, max_seq_len=64, **overrides
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.2, 0.2)
    save_model(model, folder, tokenizer=tokenizer)
    return model


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
QTYPES = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}  # fmt: skip


def rounded_like_gguf(model: torch.nn.Module, gguf_type: str) -> torch.nn.Module:
    """`model` with every 2-D weight (but GPT-2's position table) rounded by the `gguf` package's reference
    quantiser and dequantiser: what a file of that type holds, computed without our writer or reader."""
    qtype = QTYPES[gguf_type]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.startswith("pos_emb"):
                stored = gguf.quants.quantize(p.numpy(), qtype)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(stored, qtype).reshape(p.shape)))
    return model


DEFAULT_CASES = {
    ("llama", "f32"),
    ("llama", "q4_0"),
    ("gpt", "q8_0"),
    ("gpt", "f16"),
    ("llama", "bf16"),
}
SLOW = pytest.mark.slow
CASES = [  # every family and type in `make test-all`; each type once in the default suite (gpt f32: transformers)
    pytest.param(family, gguf_type, marks=[] if (family, gguf_type) in DEFAULT_CASES else [SLOW])
    for family in ("llama", "gpt")
    for gguf_type in ("f32", *QTYPES)
]


@pytest.mark.parametrize(("family", "gguf_type"), CASES)
def test_exported_file_loads_back_with_the_same_logits(tmp_path, capsys, family, gguf_type):
    extra = {"tie_embeddings": False} if family == "llama" else {}
    model = saved_model(tmp_path / "model", family, **extra)
    out = tmp_path / f"model-{gguf_type}.gguf"
    code, stdout, err = run_cli(capsys, "export", tmp_path / "model", "--to", "gguf", "--type", gguf_type, "--out", out)
    assert code == 0, err
    assert f"GGUF {gguf_type}" in stdout
    back = load_model(out)
    assert back.config.norm_eps == pytest.approx(model.config.norm_eps, rel=1e-6)  # GGUF keeps a float32
    stored = {"pad_token_id": None, "norm_eps": back.config.norm_eps, "d_ff": model.config.ffn_dim}
    assert back.config == model.config.replace(**stored)
    got = logits(back, IDS)
    if gguf_type == "f32":  # every weight kept: exact
        torch.testing.assert_close(got, logits(model, IDS), atol=1e-5, rtol=0)
    else:  # exactly the rounding of gguf's reference quantiser, no more
        assert (got - logits(model, IDS)).abs().max() > 1e-4
        torch.testing.assert_close(got, logits(rounded_like_gguf(model, gguf_type), IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("family", "overrides"),
    # transformers' GGUF reader keeps GPT-2's default 1024 positions whatever gpt2.context_length says
    [("gpt", {"max_seq_len": 1024}), ("llama", {"tie_embeddings": False})],
    ids=["gpt", "llama"],
)
def test_transformers_gguf_reader_loads_our_file_as_the_same_model(tmp_path, family, overrides):
    """`transformers`' own GGUF loader (written to llama.cpp's conventions, independent of ours) is the peer."""
    import transformers

    transformers.logging.set_verbosity_error()
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = build_model(f"{family}-tiny", n_layer=2, vocab_size=tokenizer.vocab_size, **overrides).eval()
    save_model(model, tmp_path / "model", tokenizer=tokenizer)
    assert (
        main(["export", str(tmp_path / "model"), "--to", "gguf", "--type", "f32", "--out", str(tmp_path / "m.gguf")])
        == 0
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(IDS).logits, logits(model, IDS), atol=1e-5, rtol=0)


def test_tensor_names_types_and_metadata_follow_llama_cpp(tmp_path):
    saved_model(tmp_path / "model", "llama")  # llama-tiny ties its embeddings: no output.weight
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "model"), "--to", "gguf", "--type", "q4_0", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types
    assert types["blk.1.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.1.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens[-4:] == [f"[PAD{i}]" for i in range(300, 304)]  # the model has 4 rows past the tokenizer


def test_the_tokenizer_travels_in_the_file(tmp_path):
    saved_model(tmp_path / "model", "gpt")
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "model"), "--to", "gguf", "--type", "f32", "--out", str(out)]) == 0
    original, back = load_tokenizer(tmp_path / "model"), load_tokenizer(out)
    text = "the lazy tailor jumps: 2024 stitches!"
    assert back.encode(text) == original.encode(text)
    assert back.decode(back.encode(text)) == text
    assert (back.bos_token, back.eos_token) == ("<s>", "</s>")
    messages = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(messages) == original.apply_chat_template(messages)


def test_bad_input_is_one_line_and_nothing_written(tmp_path, capsys):
    saved_model(tmp_path / "model", "llama")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "export", tmp_path / "model", "--to", "gguf", "--out", out)
    assert code == 2 and "exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == b"keep me"

    bert = build_model("bert-tiny", n_layer=1)
    save_model(bert, tmp_path / "bert")
    code, _, err = run_cli(capsys, "export", tmp_path / "bert", "--to", "gguf", "--out", tmp_path / "b.gguf")
    assert code == 2 and "'bert' cannot be exported to GGUF" in err and "['gpt', 'llama']" in err
    assert not (tmp_path / "b.gguf").exists()

    code, _, err = run_cli(capsys, "export", tmp_path / "model", "--to", "gguf", "--out", tmp_path / "m.bin")
    assert code == 2 and "must end in .gguf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "m.gguf", "model"]  # no temporary left


@pytest.fixture(scope="module")
def smollm2_files(tmp_path_factory) -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct (the real weights, by name) exported to an f32 and an f16 GGUF file."""
    folder = tmp_path_factory.mktemp("smollm2")
    for gguf_type in ("f32", "f16"):
        command = ["export", "SmolLM2-135M-Instruct", "--to", "gguf", "--type", gguf_type]
        assert main([*command, "--out", str(folder / f"smollm2-{gguf_type}.gguf")]) == 0
    return folder / "smollm2-f32.gguf", folder / "smollm2-f16.gguf"


@pytest.mark.slow
def test_smollm2_exported_f32_gives_the_same_logits_and_tokens(smollm2_files):
    original = load_model("SmolLM2-135M-Instruct", dtype=torch.float32)
    ids = load_tokenizer(smollm2_files[0]).encode("The capital of France is")
    assert ids == load_tokenizer(original_path()).encode("The capital of France is")
    prompt = torch.tensor([ids])
    want = logits(original, prompt)
    torch.testing.assert_close(logits(load_model(smollm2_files[0]), prompt), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(load_model(smollm2_files[1]), prompt), want, atol=0.05, rtol=0)


def original_path() -> Path:
    from lmforge.hf.real_weights import smollm2_instruct_gguf

    return smollm2_instruct_gguf()


def llama_cpp_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens of llama.cpp (through llama-cpp-python) after the prompt `ids`, in a fresh process."""
    script = (
        "import sys, json, llama_cpp\n"
        "path, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])\n"
        "llm = llama_cpp.Llama(path, n_ctx=256, n_threads=2, verbose=False, seed=0)\n"
        "out = []\n"
        "for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):\n"
        "    out.append(token)\n"
        "    if len(out) == n:\n"
        "        break\n"
        "print(json.dumps(out))\n"
    )
    import json

    result = subprocess.run(
        [sys.executable, "-c", script, str(path), json.dumps(ids), str(n)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def lmforge_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens of lmforge's decoder (the KV cache, argmax each step), not stopping at an end token."""
    model = load_model(path, dtype=torch.float32)
    out, prompt = [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            token = int(model(prompt).logits[0, -1].argmax())
            out.append(token)
            prompt = torch.cat([prompt, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1], ids=["f32", "f16"])
def test_llama_cpp_runs_the_exported_smollm2_to_the_same_64_greedy_tokens(smollm2_files, index):
    pytest.importorskip("llama_cpp", reason="the llama.cpp oracle: pip install 'lmforge[oracles]'")
    path = smollm2_files[index]
    tokenizer = load_tokenizer(path)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
    assert lmforge_greedy(path, ids, 64) == llama_cpp_greedy(path, ids, 64)


@pytest.mark.slow
def test_llama_cpp_runs_an_exported_gpt2_to_the_same_greedy_tokens(tmp_path):
    pytest.importorskip("llama_cpp", reason="the llama.cpp oracle: pip install 'lmforge[oracles]'")
    saved_model(tmp_path / "model", "gpt")
    out = tmp_path / "gpt.gguf"
    assert main(["export", str(tmp_path / "model"), "--to", "gguf", "--type", "f32", "--out", str(out)]) == 0
    ids = load_tokenizer(out).encode("the quick brown fox")
    assert lmforge_greedy(out, ids, 32) == llama_cpp_greedy(out, ids, 32)


def test_gguf_reference_dequantisation_agrees_with_the_file(tmp_path):
    """The bytes written for a q8_0 weight are gguf.quants' own quantisation of our (permuted) weight."""
    model = saved_model(tmp_path / "model", "gpt")
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "model"), "--to", "gguf", "--type", "q8_0", "--out", str(out)]) == 0
    tensor = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.ffn_up.weight")
    weight = model.blocks[0].ffn.fc.weight.detach().numpy()  # nn.Linear (out, in), GGUF's own layout
    expected = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(np.asarray(tensor.data).reshape(expected.shape), expected)
