"""The `lm` task: plain text, cut into blocks, scored by perplexity; transformers is the oracle of the loss.

A run fine-tunes llama-tiny on a user's text file for a few steps; its validation loss (what the task reports
and the checkpoint is chosen by) must equal transformers' own causal-LM loss over the same blocks, computed by
`LlamaForCausalLM(labels=...)` on the run's saved weights exported as a Hugging Face folder.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main as cli_main
from lmforge.finetune.config import FINETUNE
from lmforge.finetune.evaluation import load_finetuned
from lmforge.finetune.recipe import finetune
from lmforge.finetune.tasks import TASKS
from lmforge.hf.save import save_pretrained
from lmforge.train.config import parse_args

QUIET = ["--train.progress=false", "--train.tensorboard=false", "--epochs=0", "--train.threads=1"]
TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "All that glitters is not gold; a rolling stone gathers no moss. "
) * 30


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    (tmp / "train.txt").write_text(TEXT, encoding="utf-8")
    documents = [{"text": TEXT[i : i + 400]} for i in range(0, 2000, 400)]
    (tmp / "val.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents), encoding="utf-8")
    flags = [*QUIET, "--out", str(tmp), "--task=lm", "--model=llama-tiny", f"--data={tmp / 'train.txt'}"]
    flags += [f"--data.validation={tmp / 'val.jsonl'}", "--data.max_length=48", "--max-steps=3"]
    flags += ["--model.vocab_size=300"]
    summary = finetune(parse_args(flags, FINETUNE))
    return tmp, summary, documents


def test_blocks_are_the_documents_token_streams_joined_by_end_of_text(lm_run):
    tmp, summary, documents = lm_run
    model, tokenizer, task, config = load_finetuned(summary["model_dir"])
    records = [d["text"] for d in documents]
    features = task.encode(records, "validation")
    stream = []
    for text in records:
        stream += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert [t for f in features for t in f["input_ids"]] == stream  # nothing dropped, nothing padded
    assert {len(f["input_ids"]) for f in features[:-1]} == {48} and 2 <= len(features[-1]["input_ids"]) <= 48
    assert task.stats["validation_blocks"] == len(features) and task.stats["validation_documents"] == 5


def test_validation_loss_equals_transformers_causal_lm_loss(lm_run, tmp_path):
    import transformers

    tmp, summary, documents = lm_run
    model, tokenizer, task, config = load_finetuned(summary["model_dir"])
    features = task.encode([d["text"] for d in documents], "validation")
    ours = task.evaluate(model, [], features)[0]
    save_pretrained(model, tmp_path / "hf", tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for f in features:
            ids = torch.tensor([f["input_ids"]])
            total += float(hf(ids, labels=ids).loss) * (ids.shape[1] - 1)  # HF shifts and averages per block
            tokens += ids.shape[1] - 1
    assert ours["tokens_scored"] == tokens
    assert ours["loss"] == pytest.approx(total / tokens, abs=1e-5)
    assert ours["perplexity"] == pytest.approx(torch.tensor(total / tokens).exp().item(), rel=1e-5)
    recorded = json.loads((tmp / "llama-tiny-train-lm" / "metrics.json").read_text())
    assert recorded["loss"] == pytest.approx(ours["loss"], abs=1e-6)  # the run scored the same blocks


def test_predict_continues_prompts(lm_run, tmp_path):
    tmp, summary, _ = lm_run
    (tmp_path / "prompts.txt").write_text("The quick brown\nA stitch in\n", encoding="utf-8")
    out = tmp_path / "predictions.jsonl"
    flags = ["predict", summary["model_dir"], "--input", str(tmp_path / "prompts.txt"), "--output", str(out)]
    assert cli_main(flags) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The quick brown", "A stitch in"]
    assert all(isinstance(r["output"], str) and r["output"] for r in rows)


def test_catalog_text_sets_feed_it_and_labelled_sets_do_not():
    lm = TASKS["lm"]
    assert lm.reads_catalog("wikipedia-sample", "text") and not lm.reads_catalog("pang-lee-sentences", "classification")
    flags = ["--task=lm", "--model=llama-tiny", "--data=pang-lee-sentences", "--max-steps=1"]
    with pytest.raises(ValueError, match="classification set; it cannot feed task 'lm'"):
        finetune(parse_args([*QUIET, *flags], FINETUNE))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"  \n\n", "holds no text"),
        ("binary.txt", b"abc\x00def", "binary file"),
        ("latin1.txt", "caf\xe9\n".encode("latin-1"), "not valid UTF-8"),
        ("notext.jsonl", b'{"body": "x"}\n', 'needs a "text" string'),
    ],
)
def test_bad_text_files_are_one_line_errors(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    flags = ["finetune", *QUIET, "--out", str(tmp_path / "runs"), "--task=lm", "--model=llama-tiny"]
    assert cli_main([*flags, f"--data={tmp_path / name}", "--max-steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("model"))


def test_a_text_too_short_for_one_batch_names_its_blocks(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("a few words", encoding="utf-8")
    flags = ["finetune", *QUIET, "--out", str(tmp_path), "--task=lm", "--model=llama-tiny", "--max-steps=1"]
    assert cli_main([*flags, f"--data={tmp_path / 'short.txt'}", f"--data.validation={tmp_path / 'short.txt'}"]) == 2
    assert "1 training blocks cannot fill one batch of 16; lower train.batch_size" in capsys.readouterr().err


def test_a_causal_lm_distils_on_plain_text_into_half_its_depth(lm_run, tmp_path):
    tmp, summary, _ = lm_run
    flags = ["distill", *QUIET, "--out", str(tmp_path), "--teacher", summary["model_dir"], "--keep-every=2"]
    flags += ["--task=lm", f"--data={tmp / 'train.txt'}", f"--data.validation={tmp / 'val.jsonl'}"]
    assert cli_main([*flags, "--data.max_length=48", "--max-steps=2", "--cache-topk=8"]) == 0
    (run,) = [p.parent for p in tmp_path.rglob("metrics.json")]
    teacher = load_finetuned(summary["model_dir"])[0]
    student = load_finetuned(run / "model")[0]
    assert student.config.n_layer * 2 == teacher.config.n_layer
    assert set(json.loads((run / "metrics.json").read_text())) >= {"loss", "perplexity", "tokens_scored"}
