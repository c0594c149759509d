"""`prepare_for_decoding`: faster weight layouts must not change what a model computes or generates."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from lmforge import build_model
from lmforge.generate import engine, generate, prepare_for_decoding
from lmforge.hf import ADAPTERS
from lmforge.nn.kernels import kernel_fast
from lmforge.nn.quant import MatvecLinear, PackedLinear, QuantizedLinear, has_packed_bf16_kernel, quantize_int8

SMALL = {
    "gpt": {"n_layer": 2, "n_head": 4, "d_model": 64, "vocab_size": 300, "max_seq_len": 64},
    "llama": {"n_layer": 2, "n_head": 4, "n_kv_heads": 2, "d_model": 64, "d_ff": 96, "vocab_size": 300},
}


def small_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(family, **SMALL[family]).eval()
    with torch.no_grad():  # spread the logits so that greedy paths are varied
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def ids(batch: int = 3, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(SMALL))
def test_fp32_wide_weights_turn_column_major_with_values_and_state_dict_unchanged(family, monkeypatch):
    """Where lmforge's kernels cannot be built, MKL's layout is the fast one."""
    monkeypatch.setattr(engine, "kernel_fast", lambda kind: False)
    model = small_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_for_decoding(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            wide = module.out_features >= module.in_features
            assert module.weight.t().is_contiguous() == wide, module
            assert module.weight.is_contiguous() == (not wide), module
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("family", list(SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_model_gives_the_same_logits_and_greedy_tokens(family, dtype):
    plain = small_model(family).to(dtype)
    prepared = prepare_for_decoding(copy.deepcopy(plain))
    with torch.no_grad():
        expected, got = plain(ids()).logits.float(), prepared(ids()).logits.float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    plain_tokens = generate(plain, ids()[:, :4], max_new_tokens=8, eos_token_id=[]).tokens
    assert torch.equal(generate(prepared, ids()[:, :4], max_new_tokens=8, eos_token_id=[]).tokens, plain_tokens)


@pytest.mark.skipif(not (kernel_fast("fp32") and kernel_fast("bf16")), reason="no AVX2 or AVX-512 kernels")
@pytest.mark.parametrize("family", list(SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_linears_move_onto_the_matvec_kernel_keeping_their_parameters(family, dtype):
    """Every Linear becomes a MatvecLinear holding the very same Parameters: state_dict, dtype and a tied
    embedding unchanged, row-major weights (what the kernel reads)."""
    model = small_model(family).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    prepare_for_decoding(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is MatvecLinear and m.weight.is_contiguous() for m in linears)
    assert [m.weight for m in linears] == weights
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.skipif(not kernel_fast("pairs"), reason="this CPU lacks AVX512-BF16 (no pair-interleaved copy)")
def test_a_server_prepared_for_many_rows_keeps_packed_bf16_weights_and_compiles_every_step():
    """`rows` above the matvec kernel's: bf16 layers keep the pair-interleaved copy (fp32 ones do not), and a
    `BatchedDecoder` sends every step, of any rows, through the compiled graph, which reads that copy."""
    from lmforge.generate.batching import BatchedDecoder
    from lmforge.generate.compiled import model_key

    single = prepare_for_decoding(small_model("llama").to(torch.bfloat16))
    served = prepare_for_decoding(small_model("llama").to(torch.bfloat16), rows=8)
    fp32 = prepare_for_decoding(small_model("llama"), rows=8)
    layers = lambda model: [m for m in model.modules() if isinstance(m, MatvecLinear)]  # noqa: E731
    assert all(m.packed is None for m in layers(single)) and all(m.packed is not None for m in layers(served))
    assert all(m.packed is None for m in layers(fp32))
    assert model_key(served) != model_key(single)
    decoder = BatchedDecoder(served, 8, 64, compile=True)
    calls = []
    decoder._decode_fixed = lambda slots, lengths, tokens: calls.append(len(slots)) or torch.zeros(len(slots), 300)
    for slots in ([0], [0, 1, 2], list(range(8))):
        for slot in slots:
            decoder.prefill(slot, [5, 6, 7], 0)
        decoder.decode(slots, [3] * len(slots), [9] * len(slots))
    assert calls == [1, 3, 8]


def test_bf16_linears_are_packed_and_preparing_twice_changes_nothing(monkeypatch):
    """Without lmforge's kernels, bf16 Linears go to oneDNN's packed layout."""
    monkeypatch.setattr(engine, "kernel_fast", lambda kind: False)
    model = prepare_for_decoding(small_model("llama").to(torch.bfloat16))
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))]
    expected_kind = PackedLinear if has_packed_bf16_kernel() else torch.nn.Linear
    assert linears and all(isinstance(m, expected_kind) for m in linears)
    with torch.no_grad():
        once = model(ids()).logits
        assert torch.equal(prepare_for_decoding(model)(ids()).logits, once)


def test_a_bf16_server_without_the_pair_kernel_keeps_onednn_packing_and_one_row_takes_the_matvec_kernel(monkeypatch):
    """A CPU with lmforge's bf16 matvec kernel but not its pair-interleaved one (AVX2, no AVX512-BF16): prepared
    for one row, bf16 Linears run the matvec kernel; prepared for a server's 8 rows, whose steps the matvec kernel
    does not take, they keep oneDNN's packed layout rather than fall to F.linear (where PyTorch has that layout
    on this CPU; else the kernel's one to four rows are still worth it). fp32 ones take the kernel either way.
    The logits are those of the unprepared model."""
    monkeypatch.setattr(engine, "kernel_fast", lambda kind: kind != "pairs")
    kinds = lambda model: {type(m) for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))}  # noqa: E731
    plain = small_model("llama").to(torch.bfloat16)
    assert kinds(prepare_for_decoding(copy.deepcopy(plain))) == {MatvecLinear}
    served = prepare_for_decoding(copy.deepcopy(plain), rows=8)
    assert kinds(served) == ({PackedLinear} if has_packed_bf16_kernel() else {MatvecLinear})
    assert kinds(prepare_for_decoding(small_model("llama"), rows=8)) == {MatvecLinear}
    with torch.no_grad():
        expected = plain(ids()).logits.float()
        torch.testing.assert_close(served(ids()).logits.float(), expected, rtol=2e-2, atol=2e-2)


def test_int8_model_keeps_its_weights_and_decodes_on_lmforges_int8_kernel():
    """prepare_for_decoding moves int8 layers onto lmforge's kernel (activations rounded to int8 per 32 inputs
    where `_weight_int8pack_mm` rounds them to bf16) without touching their buffers: the same state_dict, and
    logits within activation rounding of the unprepared model, for a decoding step (1 row per sequence) and a
    prefill (27 rows: a bf16 GEMM on the exact int8 codes)."""
    model = quantize_int8(small_model("gpt"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        step, prompt = model(ids(length=1)).logits, model(ids()).logits
        prepare_for_decoding(model)
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert all(m.matvec for m in layers) == kernel_fast("int8")
        for before, after in ((step, model(ids(length=1)).logits), (prompt, model(ids()).logits)):
            assert (after - before).norm() / before.norm() < 2e-2
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_prepared_gpt_still_matches_transformers_greedy_generate():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    ours_config = ADAPTERS["gpt"].config_from_hf(hf.config.to_dict(), head="causal_lm")
    ours = build_model(ours_config).eval()
    ours.load_state_dict(ADAPTERS["gpt"].state_dict_from_hf(hf.state_dict(), ours_config))
    prepare_for_decoding(ours)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    got = generate(ours, prompt, max_new_tokens=12, eos_token_id=[]).tokens
    assert torch.equal(got, expected[:, prompt.shape[1] :])


@pytest.mark.skipif(not kernel_fast("pairs"), reason="this CPU lacks AVX512-BF16 (no pair-interleaved copy)")
def test_generate_with_many_prompts_decodes_bf16_on_the_pair_copy(monkeypatch, capsys):
    """`lmforge generate` with six prompts (six rows a step, more than the matrix-vector kernel takes) lays the
    bf16 weights out for six rows, so its steps take the pair-interleaved copy instead of F.linear; one prompt
    keeps a single copy of the weights. The printed continuations are those of `generate` on the same model."""
    import lmforge.generate as generation
    from lmforge.cli import main
    from lmforge.commands.generate import ByteTokenizer

    prepared = []
    real = generation.prepare_for_decoding
    monkeypatch.setattr(generation, "prepare_for_decoding", lambda m, rows=1: prepared.append(real(m, rows)) or m)
    prompts = ["one", "two words", "a third", "4", "fifth prompt", "six"]
    flags = ["--dtype", "bfloat16", "--greedy", "--max-new-tokens", "5", "--seed", "0"]
    assert main(["generate", "llama-tiny", *[a for p in prompts for a in ("--prompt", p)], *flags]) == 0
    printed = capsys.readouterr().out
    assert main(["generate", "llama-tiny", "--prompt", "one", *flags]) == 0
    capsys.readouterr()
    many, single = ([m for m in model.modules() if isinstance(m, MatvecLinear)] for model in prepared)
    assert many and all(m.packed is not None for m in many)
    assert single and all(m.packed is None for m in single)
    tokenizer = ByteTokenizer()
    input_ids, attention_mask = generation.encode_prompts(tokenizer, prompts)
    out = generate(prepared[0], input_ids, attention_mask, max_new_tokens=5, tokenizer=tokenizer)
    assert printed == "".join(f"{p}{t}\n\n" for p, t in zip(prompts, out.texts, strict=True))
