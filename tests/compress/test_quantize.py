"""`lmforge quantize`: int8 / int4 weight-only quantisation by round-to-nearest and GPTQ, PyTorch's packed int4
kernel against the dequantised matmul, and quantised checkpoints that load back with identical outputs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import tokenizers
import torch
import torch.nn.functional as F
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge import build_model
from lmforge.cli import main
from lmforge.data.tokenizers.tokenizer import Tokenizer
from lmforge.data.tokenizers.tokenizer import load_tokenizer as load_tokenizer_of
from lmforge.generate import generate
from lmforge.hf.load import load_model
from lmforge.hf.save import save_model
from lmforge.nn.quant import (
    Int4Linear,
    QuantizedLinear,
    has_int4pack_kernel,
    int4_clipped_group_params,
    int4_codes,
    int4_group_params,
)
from lmforge.quantize import quantize_model
from lmforge.quantize.gptq import HessianAccumulator, gptq, round_to_nearest
from lmforge.quantize.methods import Int4Grouped, Int8PerChannel

TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine, said the old tailor. " * 40


def correlated_inputs(n: int, width: int, seed: int) -> torch.Tensor:
    """n rows whose features are strongly correlated (a rank-8 signal plus a little noise), like activations."""
    basis = torch.randn(8, width, generator=torch.Generator().manual_seed(0))  # one distribution for all draws
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) @ basis + 0.05 * torch.randn(n, width, generator=g)


@pytest.mark.parametrize(
    ("method", "act_order"),
    [(Int4Grouped(32), False), (Int4Grouped(128), True), (Int8PerChannel(), False)],
    ids=["int4-g32", "int4-g128-act-order", "int8"],
)
def test_gptq_has_lower_layer_output_error_than_round_to_nearest(method, act_order):
    torch.manual_seed(0)
    weight = torch.randn(32, 128)
    x_train, x_test = correlated_inputs(1024, 128, seed=1), correlated_inputs(256, 128, seed=2)
    acc = HessianAccumulator(128)
    acc.add(x_train[:300])
    acc.add(x_train[300:])  # the running mean over two batches is the Hessian of all rows
    torch.testing.assert_close(acc.hessian, 2 * x_train.double().t() @ x_train.double() / 1024)
    rtn = round_to_nearest(weight, copy.deepcopy(method))
    ours = gptq(weight, acc.hessian, method, act_order=act_order)

    def error(q: torch.Tensor) -> float:
        return (x_test @ (weight - q).t()).pow(2).mean().item()

    assert error(ours) < 0.5 * error(rtn)  # GPTQ's point: the output error, not the weight error, is minimised
    assert (weight - ours).abs().max() > (weight - rtn).abs().max()  # it trades weight error for it
    module = method.module(torch.nn.Linear(128, 32, bias=False))
    torch.testing.assert_close(module.dequantized_weight(), ours)  # the stored codes are the returned weight


def test_int4_kernel_output_equals_the_dequantised_reference_matmul():
    assert has_int4pack_kernel(), "PyTorch's CPU int4 kernel is missing: int4 decoding would fall back"
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 96)
    method = Int4Grouped(64)
    round_to_nearest(linear.weight, method)
    layer = method.module(linear)
    for rows in (1, 7):
        x = torch.randn(rows, 192)
        want = F.linear(x, layer.dequantized_weight(), linear.bias)
        torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-5)
    assert layer._kernel_weight is not None  # the packed kernel ran (not the dequantising fallback)


def test_int4_grid_holds_the_extremes_and_zero():
    w = torch.tensor([[-1.5, 0.0, 0.3, 3.0]])
    scale, zero = int4_group_params(w)
    q = torch.round((w - zero[:, None]) / scale[:, None]) + 8
    assert q.min() == 0 and q.max() == 15
    torch.testing.assert_close((q - 8) * scale[:, None] + zero[:, None], w, atol=scale.item() / 2, rtol=0)


def test_mse_grid_never_rounds_worse_than_min_max_and_mostly_better():
    torch.manual_seed(0)
    w = torch.randn(256, 64)  # Gaussian groups: their extremes are rare, a narrower grid pays for most

    def squared_error(scale, zero):
        q = int4_codes(w, scale[:, None], zero[:, None])
        return ((q - 8) * scale[:, None] + zero[:, None] - w).pow(2).sum(dim=1)

    minmax, mse = int4_group_params(w), int4_clipped_group_params(w)
    assert (squared_error(*mse) <= squared_error(*minmax) + 1e-5).all()
    assert squared_error(*mse).sum() < 0.95 * squared_error(*minmax).sum()
    assert (mse[0] < minmax[0]).float().mean() > 0.5  # most groups chose a finer step than min-max's
    zero_code = int4_codes(torch.zeros(256, 1), mse[0][:, None], mse[1][:, None])
    torch.testing.assert_close((zero_code[:, 0] - 8) * mse[0] + mse[1], torch.zeros(256), atol=mse[0].max() / 2, rtol=0)


def tiny_tokenizer() -> Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT], trainer)
    return Tokenizer(backend, {"eos": "."})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A 1-layer random Llama (d_model 128) saved with its tokenizer, and a calibration text file."""
    folder = tmp_path_factory.mktemp("quantize")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = build_model("llama-tiny", n_layer=1, vocab_size=tokenizer.vocab_size)
    save_model(model, folder / "model", tokenizer=tokenizer)
    (folder / "model" / "task.json").write_text('{"task": "a fine-tuned model records its task here"}')
    (folder / "calibration.txt").write_text(TEXT)
    return folder / "model", folder / "calibration.txt"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "int8"],
        ["--method", "int4", "--group-size", "32"],
        ["--method", "int4", "--group-size", "32", "--gptq", "--act-order"],
    ],
    ids=["int8", "int4-rtn", "int4-gptq"],
)
def test_quantised_checkpoint_loads_back_with_identical_logits(tiny, tmp_path, capsys, flags):
    folder, calibration = tiny
    extra = ["--calibration", calibration, "--samples", "2", "--seq-len", "16"] if "--gptq" in flags else []
    code, out, err = run_cli(capsys, "quantize", folder, *flags, *extra, "--out", tmp_path / "q")
    assert code == 0, err
    assert "2 x 16 tokens, act-order" in out if "--gptq" in flags else "round-to-nearest" in out
    if "int4" in flags:  # GPTQ's default grid is the MSE one, round-to-nearest's min-max: the measured better
        assert ("mse grid" if "--gptq" in flags else "minmax grid") in out
    back = load_model(tmp_path / "q")
    assert (tmp_path / "q" / "task.json").read_text() == (folder / "task.json").read_text()  # for evaluate
    layer = back.blocks[0].ffn.down
    assert isinstance(layer, QuantizedLinear if "int8" in flags else Int4Linear)
    assert isinstance(back.lm_head, torch.nn.Linear) and back.lm_head.weight is back.tok_emb.weight

    original = load_model(folder)
    with torch.no_grad():
        if "--gptq" in flags:  # the same calibration windows, in memory
            from lmforge.data.tokenizers.tokenizer import load_tokenizer
            from lmforge.quantize.recipe import calibration_sequences

            sequences = calibration_sequences(load_tokenizer(folder), calibration, 2, 16)
            quantize_model(original, "int4", 32, sequences, act_order=True)
        else:
            quantize_model(original, flags[1], 32 if "int4" in flags else None)
        want = original(IDS).logits
        got = back(IDS).logits
        full = load_model(folder)(IDS).logits
    assert torch.equal(got, want)  # the saved codes and grids are the quantised model's, bit for bit
    assert 0 < (got - full).abs().max() < 0.5 * full.abs().max()
    if "int4" in flags and "--gptq" not in flags:  # `lmforge generate` on the folder: the in-memory model's text
        tokenizer = load_tokenizer_of(folder)
        prompt = torch.tensor([tokenizer.encode("the quick")])
        with torch.no_grad():
            ids = generate(original, prompt, max_new_tokens=8, eos_token_id=[]).tokens[0].tolist()
        code, out, err = run_cli(
            capsys, "generate", tmp_path / "q", "--prompt", "the quick", "--greedy", "--max-new-tokens", "8"
        )
        assert code == 0, err
        assert len(ids) == 8 and tokenizer.decode(ids) and tokenizer.decode(ids) in out


@pytest.mark.slow
def test_gptq_model_is_closer_to_the_float_model_than_round_to_nearest(tiny):
    folder, calibration = tiny
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.quantize.recipe import calibration_sequences

    sequences = calibration_sequences(load_tokenizer(folder), calibration, 8, 64)
    full, rtn, ours = load_model(folder), load_model(folder), load_model(folder)
    quantize_model(rtn, "int4", 32)
    quantize_model(ours, "int4", 32, sequences)
    test = calibration_sequences(load_tokenizer(folder), calibration, 4, 64, seed=1)
    with torch.no_grad():
        want = torch.cat([full(ids).logits for ids in test])
        error_rtn = (torch.cat([rtn(ids).logits for ids in test]) - want).pow(2).mean()
        error_gptq = (torch.cat([ours(ids).logits for ids in test]) - want).pow(2).mean()
    assert error_gptq < error_rtn


def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny, tmp_path, capsys):
    folder, calibration = tiny
    out = tmp_path / "q"
    cases = [
        (["--method", "int4", "--group-size", "48"], "--group-size 48 is not supported; choose one of [32, 64, 128]"),
        (["--method", "int4", "--gptq"], "--gptq needs calibration text"),
        (["--method", "int4", "--gptq", "--calibration", tmp_path / "none.txt"], "none.txt not found"),
        (["--method", "int8", "--grid", "mse"], "--grid applies to int4 only"),
    ]
    for flags, message in cases:
        code, _, err = run_cli(capsys, "quantize", folder, *flags, "--out", out)
        assert code == 2 and message in err and err.count("\n") == 1, err
    wide = build_model("gpt-tiny", n_layer=1, d_model=96, n_head=4, d_ff=192, vocab_size=300)  # 96 = 3 x 32
    save_model(wide, tmp_path / "wide", tokenizer=tiny_tokenizer())
    flags = ["--method", "int4", "--group-size", "64"]
    code, _, err = run_cli(capsys, "quantize", tmp_path / "wide", *flags, "--out", out)
    assert code == 2 and "--group-size 64 does not divide the width 96 of blocks.0." in err and "[32]" in err
    assert not out.exists()
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "quantize", folder, "--method", "int8", "--out", out)
    assert code == 2 and "--overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "wide"]
