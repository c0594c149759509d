"""`lmforge distill` end to end: a student from every other teacher layer trains on the shared loop (run folder,
checkpoints, model/ that `lmforge evaluate` scores); its loss is the task's exactly when it equals the teacher;
bad input is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.compress.distill import DistillObjective, DistillSettings


def run_cli(capsys, *args: str | Path) -> subprocess.CompletedProcess:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread beats several on a shared machine (restored after each test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


QUIET = ["--train.progress=false", "--train.tensorboard=false", "--epochs", "0"]


def test_distil_into_every_other_layer(tmp_path, capsys, classifier_run, sentiment_data):
    result = run_cli(
        capsys, "distill", "--teacher", classifier_run, "--keep-every", "2", "--task", "classification",
        f"--data={sentiment_data}", "--out", tmp_path, "--max-steps=2", "--train.batch_size=16", "--hidden", "1",
        "--cosine", "1", "--attention", "1", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    record = json.loads((run_dir / "distill.json").read_text())
    assert record["soft"] == 1.0 and record["hidden"] == 1.0 and record["temperature"] == 2.0
    student = json.loads((run_dir / "model" / "config.json").read_text())["model"]
    assert student["n_layer"] == 1  # bert-tiny's 2 layers, every other kept
    assert (run_dir / "metrics.jsonl").is_file() and list((run_dir / "checkpoints").glob("step_*"))
    result = run_cli(capsys, "evaluate", run_dir, "--data", sentiment_data, "--split", "train", "--out", tmp_path / "e")
    assert result.returncode == 0, result.stderr
    assert 0 <= json.loads(result.stdout)["accuracy"] <= 1


def test_student_equal_to_teacher_pays_only_the_task_loss(classifier_run, sentiment_data):
    """Every distillation term vanishes when the student is the teacher: the objective is the task's loss."""
    from lmforge.finetune.batches import collate
    from lmforge.finetune.evaluation import load_finetuned

    model, _, task, _ = load_finetuned(classifier_run)
    records = task.read_file(sentiment_data, task.config)[:8]
    batch = collate(task.encode(records, "train"), task.pad_id)
    settings = DistillSettings(soft=1.0, hard=1.0, hidden=1.0, cosine=1.0, attention=1.0, temperature=3.0)
    with torch.no_grad():
        distilled = DistillObjective(task, model, model, settings).loss_sum(model, batch)
        torch.testing.assert_close(distilled, task.loss_sum(model, batch), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--task", "token-classification", "--keep-every", "2"], "was fine-tuned for 'classification'"),
        (["--task", "classification"], "give the student"),
        (["--task", "classification", "--student", "STUDENT"], "have different vocabularies"),
        (["--task", "classification", "--keep-every", "2", "--divergence", "l2"], "--divergence 'l2' is unknown"),
        (["--keep-every", "2"], "the following arguments are required: --task"),
        (["--task", "classification", "--keep-every", "2", "--transfer", "no-such.txt"], "neither a catalog set"),
        (["--task", "classification", "--keep-every", "2", "--transfer-sentences"], "add --transfer DATA"),
        (
            ["--task", "classification", "--keep-every", "2", "--transfer", "x", "--transfer-max", "0"],
            "must be a whole",
        ),
        (["--task", "classification", "--keep-every", "2", "--transfer", "DATA", "--max-steps=2"], "left no texts"),
        (
            ["--task", "classification", "--keep-every", "2", "--transfer", "DATA", "--task.class_weights=balanced"],
            "--transfer with task.class_weights",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, classifier_run, sentiment_data, flags, message):
    from lmforge import build_model
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.hf.save import save_model
    from lmforge.train.tokenizer import MASKED_LM, learn_tokenizer

    if "STUDENT" in flags:  # a student with a tokenizer of its own
        learn_tokenizer("bpe", ["other words entirely, in another vocabulary"] * 3, 60, tmp_path / "tok", MASKED_LM)
        tokenizer = load_tokenizer(tmp_path / "tok")
        save_model(build_model("bert-tiny", vocab_size=60), tmp_path / "student", tokenizer=tokenizer)
        flags = [str(tmp_path / "student") if f == "STUDENT" else f for f in flags]
    flags = [str(sentiment_data) if f == "DATA" else f for f in flags]  # every text already labelled
    result = run_cli(
        capsys, "distill", "--teacher", classifier_run, *flags, f"--data={sentiment_data}", "--out", tmp_path / "o",
        *QUIET,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("lmforge distill: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_resume_continues_a_distillation_exactly(tmp_path, capsys, classifier_run, sentiment_data):
    flags = [
        "--teacher", str(classifier_run), "--keep-every", "2", "--task", "classification", f"--data={sentiment_data}",
        "--optim.schedule=constant", "--optim.lr=1e-3", "--train.batch_size=8", "--train.log_every=1",
        "--eval-every=0", "--train.deterministic=true", "--hidden", "1", *QUIET,
    ]  # fmt: skip
    assert run_cli(capsys, "distill", *flags, "--out", tmp_path / "whole", "--max-steps=6").returncode == 0
    assert run_cli(capsys, "distill", *flags, "--out", tmp_path / "parts", "--max-steps=3").returncode == 0
    assert run_cli(capsys, "distill", *flags, "--out", tmp_path / "parts", "--max-steps=6", "--resume").returncode == 0

    def losses(root):
        (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]

    assert len(losses(tmp_path / "whole")) == 6
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")


def train_losses(root: Path) -> list[float]:
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


def test_narrower_student_learns_projections_that_resume_exactly(tmp_path, capsys, classifier_run, sentiment_data):
    """A student half as wide as the teacher distils its hidden states through learned Linear(64, 128) maps:
    they train (they differ between checkpoints), checkpoints keep them, so a resumed run repeats the uninterrupted
    one's losses and weights, and the saved student does not hold them."""
    from safetensors.torch import load_file

    flags = [
        "--teacher", str(classifier_run), "--student", "bert-tiny", '--model.overrides={"d_model": 64, "n_layer": 1}',
        "--task", "classification", f"--data={sentiment_data}", "--optim.schedule=constant", "--optim.lr=1e-2",
        "--optim.warmup_steps=0", "--train.batch_size=8", "--train.log_every=1", "--eval-every=0",
        "--train.deterministic=true", "--hidden", "1", "--cosine", "1", *QUIET,
    ]  # fmt: skip
    assert run_cli(capsys, "distill", *flags, "--out", tmp_path / "whole", "--max-steps=4").returncode == 0
    assert run_cli(capsys, "distill", *flags, "--out", tmp_path / "parts", "--max-steps=2").returncode == 0
    resumed = run_cli(capsys, "distill", *flags, "--out", tmp_path / "parts", "--max-steps=4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert len(train_losses(tmp_path / "whole")) == 4
    assert train_losses(tmp_path / "parts") == train_losses(tmp_path / "whole")

    def checkpoint(root: Path, step: int) -> Path:
        (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
        return run_dir / "checkpoints" / f"step_{step:08d}"

    first, last = (load_file(checkpoint(tmp_path / "parts", s) / "loss.safetensors") for s in (2, 4))
    assert first["0.weight"].shape == (128, 64)  # student layer 0 -> the teacher's width
    assert not torch.equal(first["0.weight"], last["0.weight"])  # trained by the optimizer
    whole = load_file(checkpoint(tmp_path / "whole", 4) / "loss.safetensors")
    assert all(torch.equal(whole[name], last[name]) for name in whole)
    model_dir = checkpoint(tmp_path / "whole", 4).parent.parent / "model"
    assert not (model_dir / "loss.safetensors").exists()
    assert json.loads((model_dir / "config.json").read_text())["model"]["d_model"] == 64
    saved = load_file(model_dir / "model.safetensors")
    assert set(saved) == set(load_file(checkpoint(tmp_path / "whole", 4) / "model.safetensors"))


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> tuple[Path, Path]:
    """16 distinct training conversations (two batches of 8) and 4 for validation, alpaca format."""
    import random

    rng = random.Random(0)
    words = ["red", "blue", "green", "stone", "river", "light", "night", "ship", "gold", "rain", "wind", "field"]
    folder = tmp_path_factory.mktemp("instructions")
    files = []
    for name, n in (("train", 16), ("validation", 4)):
        rows = [
            {"instruction": f"Repeat {i}: " + " ".join(rng.sample(words, 4)), "output": " ".join(rng.sample(words, 3))}
            for i in range(n)
        ]
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        files.append(path)
    return files[0], files[1]


@pytest.fixture(scope="module")
def causal_teacher(tmp_path_factory, instructions) -> Path:
    """llama-tiny (2 layers, random weights) with a byte-level BPE tokenizer learned on the conversations."""
    from lmforge import build_model
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.hf.save import save_model
    from lmforge.train.tokenizer import learn_tokenizer

    folder = tmp_path_factory.mktemp("causal-teacher")
    learn_tokenizer("bpe", [p.read_text() for p in instructions], 200, folder / "tok")
    tokenizer = load_tokenizer(folder / "tok")
    torch.manual_seed(0)
    model = build_model("llama-tiny", vocab_size=tokenizer.vocab_size, n_layer=2)
    return save_model(model, folder / "model", tokenizer=tokenizer)


def test_cached_teacher_runs_in_the_first_epoch_only(tmp_path, capsys, monkeypatch, causal_teacher, instructions):
    """--cache-topk: the teacher runs once per first-epoch batch, never in the second epoch nor in a resumed run,
    which reads the run folder's cache and repeats the uninterrupted run's losses."""
    import lmforge.hf.load

    load_model, calls = lmforge.hf.load.load_model, []

    def counting(*args, **kwargs):  # the teacher is the only model distill loads (the student is a preset)
        model = load_model(*args, **kwargs)
        model.register_forward_hook(lambda *_: calls.append(1))
        return model

    monkeypatch.setattr(lmforge.hf.load, "load_model", counting)
    train, validation = instructions
    flags = [
        "--teacher", str(causal_teacher), "--student", "llama-tiny", '--model.overrides={"n_layer": 1}', "--task",
        "sft", f"--data={train}", f"--data.validation={validation}", "--cache-topk", "8", "--train.batch_size=8",
        "--train.log_every=1", "--eval-every=0", "--train.deterministic=true", "--optim.schedule=constant",
        "--task.eval_examples=1", "--task.max_new_tokens=2", *QUIET,
    ]  # fmt: skip
    result = run_cli(capsys, "distill", *flags, "--out", tmp_path / "whole", "--max-steps=4")  # two epochs
    assert result.returncode == 0, result.stderr
    assert len(calls) == 2  # one per batch of the first epoch
    (run_dir,) = [p for p in (tmp_path / "whole").iterdir() if p.is_dir()]
    meta = json.loads((run_dir / "teacher_cache" / "meta.json").read_text())
    assert meta["k"] == 8 and meta["temperature"] == 2.0 and len(list((run_dir / "teacher_cache").glob("*.safe*"))) == 2

    calls.clear()
    assert run_cli(capsys, "distill", *flags, "--out", tmp_path / "parts", "--max-steps=2").returncode == 0
    assert len(calls) == 2
    calls.clear()
    resumed = run_cli(capsys, "distill", *flags, "--out", tmp_path / "parts", "--max-steps=4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert calls == []
    assert train_losses(tmp_path / "parts") == train_losses(tmp_path / "whole")


def test_every_fold_of_a_kfold_distillation_distils(tmp_path, capsys, monkeypatch, classifier_run, sentiment_data):
    """--kfold K runs K fine-tunings of the student: each trains on DistillObjective, not on the task's loss."""
    built, loss_sum = [], DistillObjective.loss_sum

    def spy(self, model, batch):
        built.append(self)  # kept alive, so no two share an id
        return loss_sum(self, model, batch)

    monkeypatch.setattr(DistillObjective, "loss_sum", spy)
    result = run_cli(
        capsys, "distill", "--teacher", classifier_run, "--keep-every", "2", "--task", "classification",
        f"--data={sentiment_data}", "--out", tmp_path, "--max-steps=2", "--train.batch_size=16", "--kfold=2", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(built) == 4 and len({id(o) for o in built}) == 2  # two steps in each fold, one objective each
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in run_dir.glob("fold_*")) == ["fold_01", "fold_02"]


# ------------------------------------------------------------------------------------------ transfer set


def labelled(rng, words: dict[str, list[str]], n: int) -> list[dict]:
    from tests.commands.conftest import FILLER

    rows = []
    for i in range(n):
        label = ["positive", "negative"][i % 2]
        picked = rng.sample(FILLER, 4) + rng.sample(words[label], 2)
        rng.shuffle(picked)
        rows.append({"text": " ".join(picked), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_transfer_examples_train_on_the_teacher_alone(tmp_path, classifier_run, sentiment_data):
    """A transfer example has no label: the hard-label term skips it, the soft term does not; a labelled
    example pays both. Texts already among the run's records are dropped before any is used."""
    from lmforge.compress.distill import keep_every
    from lmforge.compress.transfer import Transfer
    from lmforge.finetune.batches import collate
    from lmforge.finetune.datasets import TaskData
    from lmforge.finetune.evaluation import load_finetuned

    teacher, _, task, _ = load_finetuned(classifier_run)
    student = keep_every(teacher, 2)
    records = task.read_file(sentiment_data, task.config)
    data = TaskData(train=records[:40], validation=records[40:60], test=records[60:], source="s")
    texts = [r.text for r in records[50:70]]  # held-out (validation and test) texts, twice one of them
    texts += ["the plot was good and lovely", "the plot was good and lovely", "a dull and poor film with actors"]
    (tmp_path / "unlabelled.txt").write_text("\n".join([*texts, "  ", records[0].text.upper()]) + "\n")
    features, note = Transfer(str(tmp_path / "unlabelled.txt")).features(task, data, task.config)
    assert note == {"source": str(tmp_path / "unlabelled.txt"), "texts": 24, "overlap_or_repeat": 22, "used": 2}
    assert [f["labels"] for f in features] == [-100, -100]

    transfer, labelled_batch = collate(features, task.pad_id), collate(task.encode(records[:2], "train"), task.pad_id)

    def loss(batch, hard, soft):
        with torch.no_grad():
            objective = DistillObjective(task, student, teacher, DistillSettings(hard=hard, soft=soft or 0.0))
            return objective.loss_sum(student, batch) if hard or soft else torch.tensor(0.0)

    assert loss(transfer, 1.0, 0.0) == 0  # nothing to learn from labels it does not have
    assert loss(transfer, 0.0, 1.0) > 0
    torch.testing.assert_close(loss(transfer, 1.0, 1.0), loss(transfer, 0.0, 1.0))
    assert loss(labelled_batch, 1.0, 1.0) > loss(labelled_batch, 0.0, 1.0) > 0


def test_a_student_learns_from_texts_only_its_teacher_labelled(tmp_path, capsys):
    """The teacher knows sentiment words the student's labelled sentences never use ("superb", "dull", ...); only
    unlabelled sentences with those words (--transfer) teach them to the student, through the teacher's soft
    targets. Scored on labelled sentences of those words alone: the student distilled with the transfer set
    classifies them; the same student distilled without it cannot tell them apart."""
    import random

    from lmforge.finetune.config import FINETUNE
    from lmforge.finetune.recipe import finetune
    from lmforge.train.config import parse_args

    rng = random.Random(0)
    seen = {"positive": ["good", "great"], "negative": ["bad", "awful"]}
    unseen = {  # enough of them that random embeddings cannot sort them by luck
        "positive": ["superb", "lovely", "brilliant", "moving", "charming", "wonderful"],
        "negative": ["dull", "poor", "boring", "clumsy", "tedious", "dreadful"],
    }
    both = {k: seen[k] + unseen[k] for k in seen}
    teacher_data = write_jsonl(tmp_path / "teacher.jsonl", labelled(rng, both, 240))
    student_data = write_jsonl(tmp_path / "student.jsonl", labelled(rng, seen, 80))
    probe = write_jsonl(tmp_path / "probe.jsonl", labelled(rng, unseen, 60))
    (tmp_path / "transfer.txt").write_text("\n".join(r["text"] for r in labelled(rng, unseen, 120)) + "\n")
    teach = [
        "--task=classification", "--model=bert-tiny", f"--data={teacher_data}", "--max-steps=60",
        "--model.vocab_size=200", "--train.batch_size=16", "--optim.lr=3e-3", "--eval-every=0", f"--data.test={probe}",
        "--out", str(tmp_path / "teacher"), "--train.name=t", *QUIET,
    ]  # fmt: skip
    assert finetune(parse_args(teach, FINETUNE))["test"]["accuracy"] >= 0.9  # the teacher knows the unseen words

    def student(*extra: str) -> float:
        result = run_cli(
            capsys, "distill", "--teacher", tmp_path / "teacher" / "t", "--student", "bert-tiny", "--task",
            "classification", f"--data={student_data}", f"--data.test={probe}", "--max-steps=60",
            "--train.batch_size=16", "--optim.lr=3e-3", "--eval-every=0", "--out", tmp_path / "students",
            f"--train.name=s{len(extra)}", "--train.seed=0", *extra, *QUIET,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["accuracy"]

    without, with_transfer = student(), student("--transfer", str(tmp_path / "transfer.txt"))
    assert with_transfer >= 0.85 and with_transfer >= without + 0.2, (with_transfer, without)
    record = json.loads((tmp_path / "students" / "s2" / "distill.json").read_text())
    assert record["transfer"] == {"source": str(tmp_path / "transfer.txt"), "sentences": False, "limit": None}
