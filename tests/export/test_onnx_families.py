"""Every family and head through `export_onnx` and onnxruntime (slow: each export traces for tens of seconds):
logits within 1e-4 of the eager model at two batch/sequence sizes; for the generating heads, cached decoding steps
and greedy tokens of lmforge's decoding loop equal to eager's; and a fine-tuned classifier's `lmforge evaluate` and
`lmforge predict` on its export (fp32: the same predictions; int8: accuracy within a point)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmforge.cli import main
from lmforge.export.onnx import export_onnx
from lmforge.export.onnx_runtime import load_onnx_model
from lmforge.generate import generate
from lmforge.models import build_model
from lmforge.nn import KVCache

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
SIZES = [(1, 7), (3, 4)]

CASES = [
    ("bert-tiny", "sequence_classification"),
    ("bert-tiny", "token_classification"),
    ("bert-tiny", "question_answering"),
    ("bert-tiny", "masked_lm"),
    ("bert-tiny", "none"),
    ("roberta-tiny", "sequence_classification"),
    ("gpt-tiny", "causal_lm"),
    ("gpt-tiny", "sequence_classification"),
    ("llama-tiny", "causal_lm"),
    ("llama-tiny", "token_classification"),
    ("t5-tiny", "seq2seq_lm"),
    ("transformer-tiny", "seq2seq_lm"),
]


def batch(vocab: int, rows: int, columns: int, seed: int, pad_left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, columns), generator=generator)
    mask = torch.ones_like(ids)
    if pad_left:
        mask[0, : columns // 2] = 0
    else:
        mask[0, columns // 2 :] = 0
    return ids, mask


@pytest.fixture(scope="module", params=CASES, ids=lambda case: f"{case[0]}-{case[1]}")
def exported(request, tmp_path_factory):
    preset, head = request.param
    torch.manual_seed(0)
    model = build_model(preset, n_layer=2, head=head).eval()
    out = tmp_path_factory.mktemp("onnx") / f"{preset}-{head}"
    export_onnx(model, out)
    return model, load_onnx_model(out)


def test_export_matches_eager(exported):
    """Logits at two batch/sequence sizes; for the generating heads also the cached steps and greedy tokens."""
    eager, runtime = exported
    c = eager.config
    for rows, columns in SIZES:
        ids, mask = batch(c.vocab_size, rows, columns, seed=rows, pad_left=c.head == "causal_lm")
        with torch.no_grad():
            if c.head == "seq2seq_lm":
                vocab = getattr(c, "target_vocab_size", c.vocab_size)
                target, _ = batch(vocab, rows, columns + 1, seed=9, pad_left=False)
                expected = eager(ids, attention_mask=mask, decoder_input_ids=target).logits
                got = runtime(ids, attention_mask=mask, decoder_input_ids=target).logits
            else:
                out = eager(ids, attention_mask=mask)
                expected = out.logits if c.head != "none" else out.last_hidden_state
                out = runtime(ids, attention_mask=mask)
                got = out.logits if c.head != "none" else out.last_hidden_state
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    if c.head in ("causal_lm", "seq2seq_lm"):
        check_decoding(eager, runtime)


def check_decoding(eager, runtime) -> None:
    c = eager.config
    ids, mask = batch(c.vocab_size, 2, 5, seed=4, pad_left=True)
    if c.head == "causal_lm":
        eager_cache, onnx_cache, step, step_mask = KVCache(), KVCache(), ids, mask
        with torch.no_grad():
            for _ in range(3):
                expected = eager(step, attention_mask=step_mask, past_key_values=eager_cache, use_cache=True).logits
                got = runtime(step, attention_mask=step_mask, past_key_values=onnx_cache, use_cache=True).logits
                torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
                step = expected[:, -1:].argmax(-1)
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    expected = generate(eager, ids, mask, max_new_tokens=8).tokens
    assert torch.equal(generate(runtime, ids, mask, max_new_tokens=8).tokens, expected)


def sentiment_rows(n: int, seed: int) -> list[dict]:
    words = {"positive": ["good", "great", "superb", "lovely"], "negative": ["bad", "awful", "dull", "poor"]}
    filler = ["the", "film", "was", "a", "story", "with", "actors", "and", "plot", "this"]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        text = rng.sample(filler, 4) + rng.sample(words[label], 2)
        rng.shuffle(text)
        rows.append({"text": " ".join(text), "label": label})
    return rows


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_fine_tuned_classifier_export_evaluates_and_predicts_like_eager(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(200, seed=0))
    test_rows = sentiment_rows(60, seed=1)
    write_jsonl(tmp_path / "test.jsonl", test_rows)
    write_jsonl(tmp_path / "inputs.jsonl", [{"text": r["text"]} for r in test_rows])
    quiet = ["--train.progress=false", "--train.tensorboard=false", "--epochs", "0"]
    argv = ["finetune", *quiet, "--out", str(tmp_path / "runs"), "--task=classification", "--model=bert-tiny"]
    argv += [f"--data={tmp_path / 'train.jsonl'}", "--max-steps=40", "--optim.lr=3e-3", "--model.vocab_size=200"]
    assert main(argv) == 0
    model_dir = next((tmp_path / "runs").glob("*/model"))
    for flags, name in (([], "fp32"), (["--quantize", "int8"], "int8")):
        assert main(["export", str(model_dir), "--to", "onnx", "--out", str(tmp_path / name), *flags]) == 0

    scores = {}
    for name, model in (("eager", model_dir), ("fp32", tmp_path / "fp32"), ("int8", tmp_path / "int8")):
        report = tmp_path / f"e-{name}"
        assert main(["evaluate", str(model), "--data", str(tmp_path / "test.jsonl"), "--out", str(report)]) == 0
        scores[name] = json.loads((report / "metrics.json").read_text())
        output = tmp_path / f"{name}.jsonl"
        assert main(["predict", str(model), "--input", str(tmp_path / "inputs.jsonl"), "--output", str(output)]) == 0
    assert scores["fp32"]["accuracy"] == scores["eager"]["accuracy"] > 0.8
    assert abs(scores["int8"]["accuracy"] - scores["eager"]["accuracy"]) <= 0.05  # 3 of 60; the benchmark measures
    # the pang-lee test split (benchmarks/bench_export.py)
    eager = [json.loads(line) for line in (tmp_path / "eager.jsonl").read_text().splitlines()]
    onnx = [json.loads(line) for line in (tmp_path / "fp32.jsonl").read_text().splitlines()]
    assert [p["label"] for p in onnx] == [p["label"] for p in eager]
    for a, b in zip(onnx, eager, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
