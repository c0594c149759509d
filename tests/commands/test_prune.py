"""`lmforge prune` as a user runs it: the pruned folder loads through the normal resolver, records its sparsity
per layer, scores with `lmforge evaluate`, and bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch

from lmforge import build_model
from lmforge.cli import main
from lmforge.hf.load import load_model

WORDS = [
    "the",
    "a",
    "king",
    "queen",
    "sword",
    "crown",
    "river",
    "stone",
    "light",
    "night",
    "day",
    "sea",
    "ship",
    "field",
    "horse",
    "rain",
    "wind",
    "gold",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread beats several on a shared machine (restored after each test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(capsys, *args: str | Path) -> subprocess.CompletedProcess:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(500)]
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, calibration_file) -> Path:
    """llama-tiny (random weights, 2 layers) with a byte-level BPE tokenizer learned on the calibration text."""
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.hf.save import save_model
    from lmforge.train.tokenizer import learn_tokenizer

    folder = tmp_path_factory.mktemp("tiny-lm")
    learn_tokenizer("bpe", [calibration_file.read_text()], 300, folder / "tok")
    tokenizer = load_tokenizer(folder / "tok")
    torch.manual_seed(0)
    model = build_model("llama-tiny", vocab_size=tokenizer.vocab_size, n_layer=2)
    return save_model(model, folder / "model", tokenizer=tokenizer)


def test_prune_writes_a_sparse_model_that_loads_back(tmp_path, capsys, tiny_lm, calibration_file):
    out = tmp_path / "pruned"
    result = run_cli(
        capsys, "prune", tiny_lm, "--method", "sparsegpt", "--sparsity", "0.5",
        "--calibration", calibration_file, "--samples", "4", "--seq-len", "32", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "sparsity.json").read_text())
    assert record["method"] == "sparsegpt" and record["target"] == "0.5"
    assert len(record["layers"]) == 10  # 2 blocks x (qkv, out, gate, up, down)
    model = load_model(out)  # through the resolver, as every command loads it
    for name, fraction in record["layers"].items():
        weight = model.get_submodule(name).weight
        assert float((weight == 0).float().mean()) == pytest.approx(fraction) == pytest.approx(0.5, abs=0.01)
    assert record["perplexity"] > 1 and record["dense_perplexity"] > 1
    assert json.loads(result.stdout)["overall"] == pytest.approx(0.5, abs=0.01)
    assert (out / "tokenizer.json").is_file()


def test_dense_targets_and_block_refinement_are_recorded(tmp_path, capsys, tiny_lm, calibration_file):
    out = tmp_path / "refined"
    result = run_cli(
        capsys, "prune", tiny_lm, "--method", "sparsegpt", "--sparsity", "0.5", "--dense-targets",
        "--refine-epochs", "2", "--refine-lr", "1e-3",
        "--calibration", calibration_file, "--samples", "8", "--seq-len", "32", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "sparsity.json").read_text())
    assert record["dense_targets"] is True and record["refine"] == {"epochs": 2, "lr": 1e-3}
    model = load_model(out)
    for name, fraction in record["layers"].items():
        weight = model.get_submodule(name).weight
        assert float((weight == 0).float().mean()) == pytest.approx(fraction) == pytest.approx(0.5, abs=0.01)
    assert record["perplexity"] > 1


def test_structured_prune_with_block_refinement(tmp_path, capsys, tiny_lm, calibration_file):
    out = tmp_path / "smaller"
    result = run_cli(
        capsys, "prune", tiny_lm, "--structured", "ffn", "--amount", "0.25", "--importance", "activation",
        "--refine-epochs", "1", "--calibration", calibration_file, "--samples", "8", "--seq-len", "32", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "sparsity.json").read_text())
    assert record["refine"] == {"epochs": 1, "lr": 3e-4} and load_model(out).config.d_ff == 264
    # a decoding step reads every weight once (llama-tiny ties its output layer to the embedding table)
    dense = load_model(tiny_lm)
    assert dense.lm_head.weight is dense.tok_emb.weight
    bound = record["parameters_before"] / record["parameters"]
    assert record["decode_speedup_bound"] == pytest.approx(bound) and bound > 1
    assert f"reads {bound:.3f}x fewer weights" in result.stderr


def test_pruned_classifier_scores_with_lmforge_evaluate(tmp_path, capsys, classifier_run, sentiment_data):
    run_dir, data = classifier_run, sentiment_data
    out = tmp_path / "pruned"
    result = run_cli(capsys, "prune", run_dir, "--method", "magnitude", "--pattern", "2:4", "--out", out)
    assert result.returncode == 0, result.stderr
    result = run_cli(capsys, "evaluate", out, "--data", data, "--split", "train", "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    assert 0 <= json.loads(result.stdout)["accuracy"] <= 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sparsity", "1.5"], "--sparsity 1.5 must be a fraction in [0, 1)"),
        (["--pattern", "4:2"], "--pattern '4:2' is not N:M"),
        (["--pattern", "2:4", "--sparsity", "0.5"], "give one of --sparsity"),
        (["--method", "wanda", "--sparsity", "0.5"], "--method wanda needs calibration text"),
        (["--structured", "heads", "--amount", "0.9", "--calibration", "CAL"], "would remove every head of a layer"),
        (["--method", "wanda", "--sparsity", "0.5", "--seq-len", "100000", "--calibration", "CAL"],
         "too little calibration data"),
        (["--sparsity", "0.5", "--importance", "taylor"], "it goes with --structured heads|ffn"),
        (["--structured", "ffn", "--amount", "0.25", "--importance", "reconstruction", "--calibration", "CAL",
          "--samples", "4", "--seq-len", "32"], "re-fits each layer's 352 inputs on the calibration tokens, and 128"),
        (["--sparsity", "0.5", "--refine-epochs", "0"], "--refine-epochs 0 must be at least 1"),
        (["--sparsity", "0.5", "--refine-epochs", "2", "--calibration", "CAL", "--samples", "4", "--seq-len", "32"],
         "(not --method magnitude)"),
        (["--method", "wanda", "--sparsity", "0.5", "--dense-targets", "--calibration", "CAL", "--samples", "4",
          "--seq-len", "32"], "--dense-targets re-fits the weights kept"),
        (["--structured", "ffn", "--amount", "0.25", "--dense-targets", "--calibration", "CAL"],
         "--dense-targets goes with --method sparsegpt, not --structured"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, tiny_lm, calibration_file, flags, message):
    out = tmp_path / "pruned"
    flags = [str(calibration_file) if f == "CAL" else f for f in flags]
    result = run_cli(capsys, "prune", tiny_lm, *flags, "--out", out)
    assert result.returncode == 2
    assert result.stderr.startswith("lmforge prune: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".pruned*"))


def test_structured_prune_writes_a_smaller_model(tmp_path, capsys, tiny_lm, calibration_file):
    out = tmp_path / "smaller"
    result = run_cli(
        capsys, "prune", tiny_lm, "--structured", "heads", "--amount", "0.5",
        "--calibration", calibration_file, "--samples", "16", "--seq-len", "32", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "sparsity.json").read_text())
    model = load_model(out)
    assert model.config.n_head == 2 and model.config.n_kv_heads == 2
    assert record["parameters"] == sum(p.numel() for p in model.parameters()) < record["parameters_before"]
    assert all(len(kept) == 2 for kept in record["kept"].values())
    assert record["importance"] == "reconstruction"  # the default


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_structured_prune_by_another_importance(tmp_path, capsys, tiny_lm, calibration_file, importance):
    out = tmp_path / "smaller"
    result = run_cli(
        capsys, "prune", tiny_lm, "--structured", "ffn", "--amount", "0.25", "--importance", importance,
        "--calibration", calibration_file, "--samples", "16", "--seq-len", "32", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "sparsity.json").read_text())
    assert record["importance"] == importance and load_model(out).config.d_ff == 264
    assert record["perplexity"] > 0


def test_one_pass_wanda_with_a_pattern(tmp_path, capsys, tiny_lm, calibration_file):
    out = tmp_path / "two-four"
    result = run_cli(
        capsys, "prune", tiny_lm, "--method", "wanda", "--pattern", "2:4", "--one-pass",
        "--calibration", calibration_file, "--samples", "4", "--seq-len", "32", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    model = load_model(out)
    for name in json.loads((out / "sparsity.json").read_text())["layers"]:
        weight = model.get_submodule(name).weight
        assert int((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1).max()) <= 2, name


@pytest.fixture(scope="module")
def sparse_lm(tmp_path_factory, tiny_lm, calibration_file) -> Path:
    """tiny_lm pruned to 50% by SparseGPT, through the CLI."""
    out = tmp_path_factory.mktemp("sparse") / "pruned"
    code = main([
        "prune", str(tiny_lm), "--method", "sparsegpt", "--sparsity", "0.5", "--calibration", str(calibration_file),
        "--samples", "4", "--seq-len", "32", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    return out


def plain_text(calibration_file: Path, out: Path) -> Path:
    """Documents of ten lines of the calibration text each, next to `out`."""
    lines = calibration_file.read_text().splitlines()
    documents = out.parent / f"{out.name}-documents.jsonl"
    documents.write_text("".join(json.dumps({"text": " ".join(lines[i : i + 10])}) + "\n" for i in range(0, 500, 10)))
    return documents


def recover(capsys, sparse_lm: Path, calibration_file: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """A short, deliberately large-lr fine-tune of the pruned model on plain text (`--task lm`)."""
    documents = plain_text(calibration_file, out)
    return run_cli(
        capsys, "finetune", "--task", "lm", "--model", sparse_lm, "--data", documents, "--out", out,
        "--max-steps", "4", "--epochs", "0", "--train.batch_size", "4", "--data.max_length", "32", "--optim.lr", "1e-2",
        "--optim.warmup_steps", "0", "--train.progress=false", "--train.tensorboard=false", "--train.threads=1",
        "--train.name", "recovered", *flags,
    )  # fmt: skip


def test_recovery_fine_tuning_keeps_the_pruned_zeros(tmp_path, capsys, sparse_lm, calibration_file):
    """The zeros after fine-tuning are exactly the pruned folder's, the other weights did train, and the saved
    model carries a sparsity.json measured again; with task.keep_sparsity=false the same run refills them."""
    result = recover(capsys, sparse_lm, calibration_file, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "keeping the model's zeros: 50.0% of its pruned layers' weights" in result.stderr + result.stdout
    pruned, tuned = load_model(sparse_lm), load_model(tmp_path / "recovered" / "model")
    record = json.loads((sparse_lm / "sparsity.json").read_text())
    for name in record["layers"]:
        before, after = pruned.get_submodule(name).weight, tuned.get_submodule(name).weight
        assert torch.equal(before == 0, after == 0), name
        assert not torch.allclose(before[before != 0], after[after != 0]), name  # the live weights trained
    saved = json.loads((tmp_path / "recovered" / "model" / "sparsity.json").read_text())
    assert saved["method"] == "sparsegpt" and saved["fine_tuned"] == str(tmp_path / "recovered")
    assert saved["layers"] == pytest.approx(record["layers"]) and saved["overall"] == pytest.approx(0.5, abs=0.01)

    result = recover(capsys, sparse_lm, calibration_file, tmp_path / "free", "--task.keep_sparsity=false")
    assert result.returncode == 0, result.stderr
    free = load_model(tmp_path / "free" / "recovered" / "model")
    zeros = [float((free.get_submodule(name).weight == 0).float().mean()) for name in record["layers"]]
    assert max(zeros) < 0.01  # without the masks the first step refills them
    assert not (tmp_path / "free" / "recovered" / "model" / "sparsity.json").exists()


def test_distilling_into_a_pruned_student_keeps_its_zeros(tmp_path, capsys, tiny_lm, sparse_lm, calibration_file):
    """Recovery by distillation (`lmforge distill --teacher DENSE --student PRUNED`, soft targets only): the zeros
    stay where the pruning put them, and the student's next-token distributions move towards the dense model's
    (forward KL summed over a 128-token window of the training text falls, 0.29 to 0.21 here, at lr 1e-4 without
    dropout; Adam's first steps at 1e-3 overshoot on a random model this small)."""
    from lmforge.data.tokenizers.tokenizer import load_tokenizer

    documents = plain_text(calibration_file, tmp_path)
    result = run_cli(
        capsys, "distill", "--teacher", tiny_lm, "--student", sparse_lm, "--task", "lm", "--data", documents,
        "--soft", "1", "--hard", "0", "--temperature", "1", "--out", tmp_path, "--max-steps", "6", "--epochs", "0",
        "--train.batch_size", "4", "--data.max_length", "32", "--optim.lr", "1e-4", "--model.dropout", "0",
        "--optim.warmup_steps", "0", "--train.progress=false", "--train.tensorboard=false", "--train.threads=1",
        "--train.name", "distilled",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "keeping the model's zeros: 50.0% of its pruned layers' weights" in result.stderr + result.stdout
    dense, pruned = load_model(tiny_lm).eval(), load_model(sparse_lm).eval()
    distilled = load_model(tmp_path / "distilled" / "model").eval()
    for name in json.loads((sparse_lm / "sparsity.json").read_text())["layers"]:
        before, after = pruned.get_submodule(name).weight, distilled.get_submodule(name).weight
        assert torch.equal(before == 0, after == 0), name
        assert not torch.allclose(before[before != 0], after[after != 0]), name
    text = " ".join(calibration_file.read_text().splitlines()[:40])
    ids = torch.tensor([load_tokenizer(tiny_lm).encode(text, add_special_tokens=False)[:128]])

    def kl_to_dense(model: torch.nn.Module) -> float:
        with torch.no_grad():
            p, q = dense(ids).logits.log_softmax(-1), model(ids).logits.log_softmax(-1)
        return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))

    assert kl_to_dense(distilled) < 0.85 * kl_to_dense(pruned)


def test_masked_recovery_resumes_exactly(tmp_path, capsys, sparse_lm, calibration_file):
    """Recovery fine-tuning stopped at step 4 and resumed to step 8 logs the losses and reaches the weights of
    the uninterrupted 8 steps, zeros included: the masks are rebuilt from the pruned model and the optimizer's
    post-step hook is back on the resumed optimizer."""
    flags = ("--train.deterministic=true", "--train.log_every=1", "--train.save_every=4", "--optim.schedule=constant")
    whole = recover(capsys, sparse_lm, calibration_file, tmp_path / "whole", *flags, "--max-steps", "8")
    assert whole.returncode == 0, whole.stderr
    first = recover(capsys, sparse_lm, calibration_file, tmp_path / "parts", *flags, "--max-steps", "4")
    assert first.returncode == 0, first.stderr
    resumed = recover(capsys, sparse_lm, calibration_file, tmp_path / "parts", *flags, "--max-steps", "8", "--resume")
    assert resumed.returncode == 0, resumed.stderr

    def losses(root: Path) -> list[float]:
        lines = (root / "recovered" / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]

    assert len(losses(tmp_path / "whole")) == 8
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    # the step-8 checkpoints (model/ is the best evaluated one, and the first part also evaluated at its end)
    a = load_model(tmp_path / "whole" / "recovered" / "checkpoints" / "step_00000008")
    b = load_model(tmp_path / "parts" / "recovered" / "checkpoints" / "step_00000008")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    record = json.loads((sparse_lm / "sparsity.json").read_text())
    pruned = load_model(sparse_lm)
    for name in record["layers"]:
        assert torch.equal(pruned.get_submodule(name).weight == 0, b.get_submodule(name).weight == 0), name


def test_private_recovery_keeps_the_pruned_zeros_and_spends_its_budget(tmp_path, capsys, sparse_lm, calibration_file):
    """DP-SGD (Opacus) on a pruned model: Opacus writes the noisy clipped gradient itself, so the zeros must be kept
    by the post-step mask, whatever the noise put on them; epsilon is logged within the budget."""
    privacy = ("--privacy.epsilon=8", "--privacy.delta=1e-3", "--privacy.accountant=rdp", "--train.log_every=2")
    result = recover(capsys, sparse_lm, calibration_file, tmp_path, *privacy)
    assert result.returncode == 0, result.stderr
    pruned, tuned = load_model(sparse_lm), load_model(tmp_path / "recovered" / "model")
    record = json.loads((sparse_lm / "sparsity.json").read_text())
    for name in record["layers"]:
        before, after = pruned.get_submodule(name).weight, tuned.get_submodule(name).weight
        assert torch.equal(before == 0, after == 0), name
        assert not torch.allclose(before[before != 0], after[after != 0]), name
    rows = [json.loads(line) for line in (tmp_path / "recovered" / "metrics.jsonl").read_text().splitlines()]
    epsilons = [r["epsilon"] for r in rows if r.get("split") == "train"]
    assert epsilons and 0 < epsilons[-1] <= 8 * 1.01


def test_lora_on_a_pruned_model_is_one_line(tmp_path, capsys, sparse_lm, calibration_file):
    result = recover(capsys, sparse_lm, calibration_file, tmp_path, "--task.method=lora")
    assert result.returncode == 2
    assert "LoRA's merged update B A is dense" in result.stderr and "task.method=full" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
