"""`lmforge export --to onnx` on a small causal LM, with onnxruntime as the runtime and the eager model as the oracle:
logits within 1e-4 at two batch/sequence sizes (the axes are dynamic), decoding steps through the KV-cache inputs
and outputs equal to eager's cached steps, greedy and beam-search tokens of lmforge's decoding loop (and of
`lmforge generate DIR`) equal to eager's, int8 graphs from onnxruntime's quantiser, and the bad inputs: one line,
exit 2, nothing half-written. Every family and head is exported in test_onnx_families.py (slow)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from lmforge.cli import main
from lmforge.export.onnx import export_onnx, quantize_graph
from lmforge.export.onnx_runtime import load_onnx_model
from lmforge.generate import generate
from lmforge.hf.load import load_model
from lmforge.hf.save import save_model
from lmforge.models import build_model
from lmforge.nn import KVCache

TOLERANCE = 1e-4


def small_gpt() -> nn.Module:
    """A one-layer GPT whose weights are large enough that each next token wins by a clear margin (greedy
    search is then decided by the model, not by float rounding)."""
    torch.manual_seed(0)
    model = build_model("gpt-tiny", n_layer=1, d_model=64, n_head=2, d_ff=128, vocab_size=300, max_seq_len=64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(lmforge folder, its ONNX export made by the command, the eager model loaded from the folder)."""
    tmp = tmp_path_factory.mktemp("onnx")
    save_model(small_gpt(), tmp / "gpt")
    assert main(["export", str(tmp / "gpt"), "--to", "onnx", "--out", str(tmp / "gpt-onnx")]) == 0
    return tmp / "gpt", tmp / "gpt-onnx", load_model(tmp / "gpt")


def random_batch(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (rows, columns), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, : columns // 2] = 0  # a left-padded row
    return ids, mask


def test_folder_holds_graph_manifest_and_config(exported):
    _, out, _ = exported
    manifest = json.loads((out / "onnx.json").read_text())
    assert manifest["family"] == "gpt" and manifest["head"] == "causal_lm" and manifest["kind"] == "decoder"
    assert list(manifest["graphs"]["model"]["inputs"]) == [
        "input_ids",
        "attention_mask",
        "past_key_values.0.key",
        "past_key_values.0.value",
    ]
    assert list(manifest["graphs"]["model"]["outputs"]) == ["logits", "present.0.key", "present.0.value"]
    graph = onnx.load(str(out / "model.onnx")).graph
    onnx.checker.check_model(str(out / "model.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert isinstance(dims["input_ids"][0], str) and isinstance(dims["input_ids"][1], str)  # batch, sequence: symbolic
    assert isinstance(dims["past_key_values.0.key"][2], str) and dims["past_key_values.0.key"][1] == 2  # heads fixed
    assert json.loads((out / "config.json").read_text())["model"]["family"] == "gpt"


@pytest.mark.parametrize("rows, columns", [(1, 7), (4, 3)])
def test_logits_match_eager_at_any_batch_and_length(exported, rows, columns):
    _, out, eager = exported
    runtime = load_onnx_model(out)
    ids, mask = random_batch(rows, columns, seed=rows)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask).logits
    got = runtime(ids, attention_mask=mask).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_cached_decoding_steps_match_eager(exported):
    _, out, eager = exported
    runtime = load_onnx_model(out)
    ids, mask = random_batch(3, 5, seed=7)
    eager_cache, onnx_cache = KVCache(), KVCache()
    step_ids, step_mask = ids, mask
    with torch.no_grad():
        for _ in range(4):
            expected = eager(step_ids, attention_mask=step_mask, past_key_values=eager_cache, use_cache=True).logits
            got = runtime(step_ids, attention_mask=step_mask, past_key_values=onnx_cache, use_cache=True).logits
            torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
            for layer, (k, v) in eager_cache.self_kv.items():  # the presents are the cache eager builds
                torch.testing.assert_close(onnx_cache.self_kv[layer][0], k, atol=TOLERANCE, rtol=0)
                torch.testing.assert_close(onnx_cache.self_kv[layer][1], v, atol=TOLERANCE, rtol=0)
            step_ids = expected[:, -1].argmax(-1, keepdim=True)  # one new token per row
            step_mask = torch.cat([step_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    assert onnx_cache.seq_len() == 5 + 3


@pytest.mark.parametrize("options", [{}, {"num_beams": 3}, {"do_sample": True, "seed": 0}], ids=str)
def test_decoding_loop_gives_eager_tokens(exported, options):
    """Greedy, beam search (which reorders the cache's rows) and seeded sampling (varied tokens, each drawn from
    the whole distribution) through lmforge's decoding loop: the same tokens from the export as from eager."""
    _, out, eager = exported
    ids, mask = random_batch(2, 4, seed=3)
    expected = generate(eager, ids, mask, max_new_tokens=10, **options).tokens
    got = generate(load_onnx_model(out), ids, mask, max_new_tokens=10, **options).tokens
    if options.get("do_sample"):
        assert len(set(expected[0].tolist())) > 2
    assert torch.equal(got, expected)


def test_generate_command_runs_the_export(exported, capsys):
    _, out, eager = exported
    prompt = "onnx"
    ids = torch.tensor([list(prompt.encode())])
    expected = generate(eager, ids, max_new_tokens=12).tokens[0].tolist()
    assert main(["generate", str(out), "--prompt", prompt, "--greedy", "--max-new-tokens", "12"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text == bytes(i for i in expected if i < 256).decode("utf-8", errors="replace")  # the byte tokenizer


def test_attention_is_one_onnx_attention_node_per_layer(exported):
    """Opset 23's Attention operator, which onnxruntime runs as one kernel (not MatMul, Softmax, MatMul)."""
    _, out, eager = exported
    graph = onnx.load(str(out / "model.onnx"))
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("Attention") == eager.config.n_layer and "Softmax" not in ops
    assert {o.domain: o.version for o in graph.opset_import}[""] == 23


def test_int8_graph_quantises_the_weights_and_stays_close(exported, tmp_path):
    _, out, eager = exported
    quantized = tmp_path / "q"
    shutil.copytree(out, quantized)
    quantize_graph(out / "model.onnx", quantized / "model.onnx")
    ops = {node.op_type for node in onnx.load(str(quantized / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops  # onnxruntime's dynamic int8 matmuls
    ids, mask = random_batch(2, 6, seed=5)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask).logits
    got = load_onnx_model(quantized)(ids, attention_mask=mask).logits
    error = (got - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.1  # changed by the rounding of int8 weights, not broken by it


def test_existing_output_without_overwrite_is_refused(exported, capsys):
    folder, out, _ = exported
    before = sorted(p.name for p in out.iterdir())
    assert main(["export", str(folder), "--to", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_unsupported_head_names_the_supported_ones(tmp_path):
    model = build_model("t5-tiny", head="none")
    with pytest.raises(ValueError, match="supports the heads seq2seq_lm"):
        export_onnx(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_one_line_and_exit_2(exported, tmp_path, capsys):
    folder, out, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.onnx").unlink()
    cases = [
        (["generate", str(broken), "--prompt", "x"], "lacks model.onnx"),
        (["export", str(out), "--to", "onnx", "--out", str(tmp_path / "again")], "already an ONNX export"),
        (["export", str(folder), "--to", "onnx", "--out", str(tmp_path / "q"), "--quantize", "int4"], "choose int8"),
        (["generate", str(out), "--prompt", "x", "--dtype", "bfloat16"], "runs as exported"),
        (["evaluate", str(out), "--data", "x.jsonl"], "not a fine-tuned model folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "again").exists() and not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="is an ONNX export"):
        load_model(out)


def test_failed_export_leaves_nothing(monkeypatch, tmp_path):
    import lmforge.export.onnx as onnx_export

    def fail(graph, path):
        path.write_bytes(b"partial")
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(onnx_export, "export_graph", fail)
    with pytest.raises(RuntimeError, match="tracing failed"):
        export_onnx(small_gpt(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_runtime_keeps_the_eager_interface(exported):
    """What lmforge's tasks and decoding loop read from a model: eval(), a config, a parameter's device."""
    _, out, eager = exported
    runtime = load_onnx_model(out)
    assert runtime.config == eager.config and next(runtime.parameters()).device.type == "cpu"
    assert np.isfinite(runtime(torch.tensor([[1, 2, 3]])).logits.numpy()).all()
