"""The compiled decode step against eager decoding: same greedy tokens, bounded recompiles, an off switch.

The fast tests run the fixed-shape step (`FixedKVCache`, full-length mask) without inductor, so they check the
static-shape arithmetic in seconds; the slow ones compile it with inductor (tens of seconds per model on CPU).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from lmforge import build_model
from lmforge.generate import compiled, engine, generate, prepare_for_decoding, stream
from lmforge.generate.compiled import COMPILE_MIN_PARAMETERS, bucket_length, resolve_compile, weight_count
from lmforge.nn.kernels import kernel_fast
from lmforge.nn.quant import has_packed_bf16_kernel, quantize_int8
from lmforge.quantize.recipe import quantize_model

NEW = 12
CONTEXT = 64


def left_padded_prompts(n_prompt: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    input_ids = torch.randint(1, 300, (3, n_prompt))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # one short row, left-padded
    attention_mask[2, :1] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


@pytest.fixture
def uncompiled_step(monkeypatch):
    """The fixed-shape step run as plain Python: the same code inductor compiles, minus the compile."""
    monkeypatch.setattr(compiled, "_compiled_step", (compiled._decode_step, compiled._decode_step))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_fixed_shape_step_matches_eager_greedy_tokens(family, uncompiled_step, small_model):
    model = small_model(family, CONTEXT)
    input_ids, attention_mask = left_padded_prompts()
    eager = generate(model, input_ids, attention_mask, max_new_tokens=NEW, eos_token_id=[], compile=False)
    fixed = generate(model, input_ids, attention_mask, max_new_tokens=NEW, eos_token_id=[], compile=True)
    assert len(set(eager.tokens[1].tolist())) > 3  # a varied path, not one repeated token
    assert torch.equal(fixed.tokens, eager.tokens)


def test_fixed_shape_step_fills_the_models_whole_context(uncompiled_step, small_model):
    """Prompt + new tokens - 1 = max_seq_len: the bucket is capped at the context, and the last slot is used."""
    model = small_model("llama", CONTEXT)
    input_ids, attention_mask = left_padded_prompts(n_prompt=40)
    new = CONTEXT - 40 + 1
    eager = generate(model, input_ids, attention_mask, max_new_tokens=new, eos_token_id=[], compile=False)
    fixed = generate(model, input_ids, attention_mask, max_new_tokens=new, eos_token_id=[], compile=True)
    assert torch.equal(fixed.tokens, eager.tokens)


def test_a_later_generation_of_the_same_shape_reuses_the_step_buffers_and_matches_eager(uncompiled_step, small_model):
    """A CUDA graph replays the addresses it was recorded with, so the next generation of the same shape must
    write into the same tensors; what the earlier one left there (a longer prompt) must not leak into it."""
    model = small_model("llama", CONTEXT)
    long_ids, long_mask = left_padded_prompts(n_prompt=20)
    short_ids, short_mask = left_padded_prompts(n_prompt=9)
    for ids, mask in ((long_ids, long_mask), (short_ids, short_mask)):  # both fit the 64-slot bucket
        eager = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[], compile=False)
        fixed = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[], compile=True)
        assert torch.equal(fixed.tokens, eager.tokens)
    buffers = compiled.checkout_buffers(model, 3, 64, torch.device("cpu"))
    assert buffers.layers, "the pool handed out a fresh set: the generations did not give theirs back"
    assert compiled.checkout_buffers(model, 3, 64, torch.device("cpu")) is not buffers  # one holder at a time
    compiled.release_buffers(model, buffers)


def test_overlapping_generations_each_get_their_own_step_buffers(uncompiled_step, small_model):
    model = small_model("gpt", CONTEXT)
    first_ids, first_mask = left_padded_prompts(n_prompt=9)
    second_ids = torch.randint(1, 300, (3, 11), generator=torch.Generator().manual_seed(7))
    options = {"max_new_tokens": NEW, "eos_token_id": []}
    open_stream = stream(model, first_ids, first_mask, compile=True, **options)
    head = [next(open_stream).token_ids for _ in range(3)]  # paused mid-generation, its buffers checked out
    second = generate(model, second_ids, compile=True, **options)
    first = torch.stack(head + [chunk.token_ids for chunk in open_stream], dim=1)
    assert torch.equal(first, generate(model, first_ids, first_mask, compile=False, **options).tokens)
    assert torch.equal(second.tokens, generate(model, second_ids, compile=False, **options).tokens)


def test_compile_false_never_builds_the_compiled_step(monkeypatch, small_model):
    def refuse():
        raise AssertionError("compile=False must decode eagerly")

    monkeypatch.setattr(compiled, "compiled_decode_step", refuse)
    model = small_model("gpt", CONTEXT)
    input_ids, attention_mask = left_padded_prompts()
    out = generate(model, input_ids, attention_mask, max_new_tokens=4, compile=False)
    assert out.tokens.shape == (3, 4)


def test_bucket_lengths_are_powers_of_two_capped_at_the_context():
    assert [bucket_length(n, 2048) for n in (1, 64, 65, 200, 1025, 2048)] == [64, 64, 128, 256, 2048, 2048]
    assert bucket_length(50, 48) == 48
    assert len({bucket_length(n, 2048) for n in range(1, 2049)}) == 6  # recompiles bounded per batch size


def test_auto_compiles_large_decoder_only_models_float_on_a_gpu_and_int8_or_int4_on_a_cpu(monkeypatch, small_model):
    tiny = small_model("gpt", CONTEXT)
    assert weight_count(tiny) < COMPILE_MIN_PARAMETERS
    assert not resolve_compile(tiny, "auto")
    assert resolve_compile(tiny, True)
    monkeypatch.setattr(compiled, "COMPILE_MIN_PARAMETERS", 1000)  # as if the tiny model were a real one
    assert not resolve_compile(tiny, "auto")  # float weights on CPU: nothing to gain
    int8 = quantize_int8(copy.deepcopy(tiny))
    assert weight_count(int8) == weight_count(tiny)  # int8 weights are buffers, counted as the float ones were
    assert resolve_compile(int8, "auto")  # int8 on CPU: measured 1.4x
    int4 = copy.deepcopy(tiny)
    quantize_model(int4, "int4", 32)
    assert not resolve_compile(int4, "auto")  # int4 blocks, fp32 output projection: not measured to pay
    assert resolve_compile(quantize_int8(int4), "auto")  # what --quantize int4 makes: int4 blocks, int8 output
    if kernel_fast("fp32"):  # fp32/bf16 on lmforge's matvec kernel (MatvecLinear): measured 1.4-1.7x
        assert resolve_compile(prepare_for_decoding(copy.deepcopy(tiny)), "auto")
    monkeypatch.setattr(compiled, "AUTO_COMPILE", {"cpu": (frozenset(),)})  # as if this CPU were a GPU
    assert resolve_compile(tiny, "auto")
    assert not resolve_compile(int8, "auto")
    # a one-off generation shorter than the compile can pay back decodes eagerly; a server (None) compiles
    assert not resolve_compile(tiny, "auto", new_tokens=compiled.AUTO_MIN_NEW_TOKENS - 1)
    assert resolve_compile(tiny, "auto", new_tokens=compiled.AUTO_MIN_NEW_TOKENS)
    assert resolve_compile(tiny, True, new_tokens=1)
    t5 = build_model("t5-tiny").eval()
    assert not resolve_compile(t5, "auto")
    with pytest.raises(ValueError, match="no compiled decode step"):
        resolve_compile(t5, True)
    with pytest.raises(ValueError, match="choose 'auto'"):
        resolve_compile(tiny, "yes")


@pytest.mark.skipif(not has_packed_bf16_kernel(), reason="this PyTorch build has no oneDNN bf16 weight packing")
def test_packed_bf16_weights_asked_to_compile_decode_eagerly_with_a_warning(monkeypatch, small_model):
    def refuse(*args):
        raise AssertionError("packed bf16 layers must not reach inductor (it fails to lower their op)")

    monkeypatch.setattr(compiled, "_compiled_step", (refuse, refuse))
    monkeypatch.setattr(engine, "kernel_fast", lambda kind: False)  # a machine without a C++ compiler
    model = prepare_for_decoding(small_model("llama", CONTEXT).to(torch.bfloat16))
    assert "PackedLinear" in compiled.quant_layer_kinds(model)
    input_ids, attention_mask = left_padded_prompts()
    eager = generate(model, input_ids, attention_mask, max_new_tokens=NEW, eos_token_id=[], compile=False)
    with pytest.warns(UserWarning, match="packed for oneDNN.*decoding eagerly"):
        asked = generate(model, input_ids, attention_mask, max_new_tokens=NEW, eos_token_id=[], compile=True)
    assert torch.equal(asked.tokens, eager.tokens)


def test_auto_falls_back_to_eager_decoding_when_the_step_does_not_compile(monkeypatch, small_model):
    def no_compiler(*args):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(compiled, "_compiled_step", (no_compiler, no_compiler))
    monkeypatch.setattr(compiled, "COMPILE_MIN_PARAMETERS", 1000)
    monkeypatch.setattr(compiled, "AUTO_COMPILE", {"cpu": (frozenset(),)})
    monkeypatch.setattr(compiled, "AUTO_MIN_NEW_TOKENS", 1)
    model = small_model("gpt", CONTEXT)
    input_ids, attention_mask = left_padded_prompts()
    eager = generate(model, input_ids, attention_mask, max_new_tokens=NEW, eos_token_id=[], compile=False)
    with pytest.warns(UserWarning, match="did not compile.*no C.. compiler"):
        auto = generate(model, input_ids, attention_mask, max_new_tokens=NEW, eos_token_id=[], compile="auto")
    assert torch.equal(auto.tokens, eager.tokens)
    with pytest.raises(RuntimeError, match="no C.. compiler"):  # asked for: the error is the user's to see
        generate(model, input_ids, attention_mask, max_new_tokens=NEW, compile=True)


def test_encoder_decoders_decode_eagerly_under_auto():
    model = build_model("t5-tiny").eval()
    input_ids = torch.randint(1, 100, (1, 5))
    assert generate(model, input_ids, max_new_tokens=3).tokens.shape == (1, 3)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt", "llama", "llama-int8"])
def test_inductor_compiled_step_matches_eager_greedy_tokens_without_recompiling(family, small_model):
    model = small_model(family.removesuffix("-int8"), CONTEXT)
    model = quantize_int8(model) if family.endswith("-int8") else model
    input_ids, attention_mask = left_padded_prompts()
    eager = generate(model, input_ids, attention_mask, max_new_tokens=NEW, eos_token_id=[], compile=False)
    fast = generate(model, input_ids, attention_mask, max_new_tokens=NEW, eos_token_id=[], compile=True)
    assert torch.equal(fast.tokens, eager.tokens)
    # another prompt length and token budget in the same bucket (batch 3, 64 slots) reuses the graph
    input_ids, attention_mask = left_padded_prompts(n_prompt=14)
    eager = generate(model, input_ids, attention_mask, max_new_tokens=NEW - 3, eos_token_id=[], compile=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        fast = generate(model, input_ids, attention_mask, max_new_tokens=NEW - 3, eos_token_id=[], compile=True)
    assert torch.equal(fast.tokens, eager.tokens)


SECOND_PROCESS = """
import torch
from torch._dynamo.utils import counters
from lmforge import build_model
from lmforge.generate import generate
torch.manual_seed(0)
model = build_model("gpt-tiny").eval()
generate(model, torch.randint(1, 200, (1, 5)), max_new_tokens=3, compile=True)
print("hits", counters["inductor"]["fxgraph_cache_hit"], "misses", counters["inductor"]["fxgraph_cache_miss"])
"""


def test_the_cache_dir_is_lmforges_unless_the_user_chose_one(monkeypatch, tmp_path):
    """torch writes its /tmp default into $TORCHINDUCTOR_CACHE_DIR when anything first asks (importing
    transformers does); that is not the user's choice, so lmforge's own directory wins over it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("LMFORGE_INDUCTOR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert compiled.inductor_cache_dir() == tmp_path / "lmforge" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compiled.inductor_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("LMFORGE_INDUCTOR_CACHE", str(tmp_path / "ours"))
    assert compiled.inductor_cache_dir() == tmp_path / "ours"


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_step_from_the_disk_cache(tmp_path):
    env = {**os.environ, "LMFORGE_INDUCTOR_CACHE": str(tmp_path)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    runs = [
        subprocess.run([sys.executable, "-c", SECOND_PROCESS], env=env, capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    first, second = (run.stdout.split()[-4:] for run in runs)
    assert first[1] == "0" and int(first[3]) >= 1  # compiled, and stored
    assert int(second[1]) >= 1 and second[3] == "0"  # loaded, nothing compiled again


def test_model_key_names_the_model_and_everything_a_compiled_graph_reads_from_it(small_model):
    """The compiled step skips dynamo's ~7,700 guards on the model and guards this one number instead: it must
    stay put while nothing changes, and move with anything a traced graph bakes in."""
    model = small_model("llama", CONTEXT)
    key = compiled.model_key(model)
    input_ids, attention_mask = left_padded_prompts()
    generate(model, input_ids, attention_mask, max_new_tokens=3, compile=False)
    assert compiled.model_key(model) == key != 0
    assert compiled.model_key(copy.deepcopy(model)) != key  # another object: its own graph
    changes = [
        lambda m: setattr(m.blocks[1].attn, "scale", 0.5),  # a constant the graph bakes in
        lambda m: m.blocks[0].register_forward_hook(lambda *args: None),
        lambda m: m.to(torch.bfloat16),
        lambda m: m.train(),
        quantize_int8,
        lambda m: prepare_for_decoding(quantize_int8(m)),  # the kernel's flag
    ]
    for change in changes:
        changed = copy.deepcopy(model)
        before = compiled.model_key(changed)
        change(changed)
        assert compiled.model_key(changed) != before, change


def test_the_compiled_step_recompiles_for_a_changed_model_though_it_skips_the_models_guards(small_model):
    """Traced with dynamo (the eager backend, to stay fast) and the step's own guard filter: after a change the
    model's guards would have caught, the key makes dynamo trace again, and the tokens follow the change."""
    step = torch._dynamo.optimize("eager", guard_filter_fn=compiled._model_guards_only_through_the_key)(
        compiled._decode_step
    )
    model = small_model("llama", CONTEXT)
    input_ids, attention_mask = left_padded_prompts()
    options = {"max_new_tokens": NEW, "eos_token_id": []}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiled, "_compiled_step", (step, step))
        torch._dynamo.reset()
        first = generate(model, input_ids, attention_mask, compile=True, **options)
        assert torch.equal(first.tokens, generate(model, input_ids, attention_mask, compile=False, **options).tokens)
        for block in model.blocks:
            block.attn.scale = 0.02  # baked into the traced graph as a constant
        changed = generate(model, input_ids, attention_mask, compile=True, **options)
        eager = generate(model, input_ids, attention_mask, compile=False, **options)
    assert torch.equal(changed.tokens, eager.tokens) and not torch.equal(changed.tokens, first.tokens)
