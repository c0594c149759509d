"""DP-SGD through Opacus: per-example gradients of our layers equal separate backward passes; ε is accounted,
logged and capped; bad settings are one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmforge import build_model
from lmforge.train.privacy import PrivacySettings, PrivateTraining, check_per_example, register_grad_samplers


def per_example_loss(model, ids, labels):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return out.loss


@pytest.mark.parametrize(
    ("preset", "head"),
    [
        pytest.param("gpt-tiny", "causal_lm", marks=pytest.mark.slow),  # LayerNorm, positions: bert covers them too
        ("llama-tiny", "sequence_classification"),
        ("bert-tiny", "token_classification"),
    ],
)
def test_opacus_per_example_gradients_equal_separate_backward_passes(preset, head):
    """Every layer type we train (TokenEmbedding, positions, LayerNorm, RMSNorm incl. tied weights) through
    Opacus's hooks, against the gradient of each example's loss alone."""
    from opacus import GradSampleModule

    register_grad_samplers()
    torch.manual_seed(0)
    extra = {"attention_dropout": 0.0} if preset == "bert-tiny" else {}
    model = build_model(preset, head=head, n_layer=1, vocab_size=50, max_seq_len=16, num_labels=3, dropout=0.0, **extra)
    model = model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    B, T = 3, 6
    ids = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))
    labels = ids if head == "causal_lm" else torch.randint(0, 3, (B,) if head == "sequence_classification" else (B, T))
    expected = []
    for b in range(B):
        model.zero_grad()
        per_example_loss(model, ids[b : b + 1], labels[b : b + 1]).backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    wrapped = GradSampleModule(model, loss_reduction="sum")
    # the batch loss is the sum of the examples' own losses, so each example's gradient is its own
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    losses = torch.stack([per_example_out_loss(model, out[b : b + 1], labels[b : b + 1]) for b in range(B)])
    losses.sum().backward()
    checked = 0
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, f"{name} has no per-example gradient"
        for b in range(B):
            assert (p.grad_sample[b] - expected[b][name]).abs().max() < 1e-5, f"{name}, example {b}"
        checked += 1
    assert checked == len(list(model.parameters()))
    wrapped._close()


def per_example_out_loss(model, logits, labels):
    from lmforge.models.heads import head_loss

    return head_loss(model.config.head, logits, labels)


def tiny_private(steps: int, epsilon: float = 8.0, delta: float = 1e-3, n: int = 40) -> PrivateTraining:
    from functools import partial

    from lmforge.finetune.batches import collate

    model = build_model("bert-tiny", head="sequence_classification", n_layer=1, vocab_size=50, max_seq_len=16)
    features = [{"input_ids": [2, 5 + i % 9, 3], "labels": i % 2} for i in range(n)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = PrivacySettings(epsilon, delta, 1.0, "rdp", epsilon_tolerance=0.5)  # a coarse, faster search
    return PrivateTraining(model, optimizer, features, partial(collate, pad_id=0), 8, steps, settings)


@pytest.mark.slow  # Opacus's noise calibration alone takes ~10 s on two loaded cores
def test_noise_is_calibrated_to_the_budget_and_a_step_beyond_it_is_refused():
    from opacus.accountants import RDPAccountant

    private = tiny_private(steps=3)
    assert private.epsilon() == 0.0 and private.sample_rate == pytest.approx(1 / 5)
    assert private.before_step(0) is None and private.before_step(2) is None  # the planned steps fit
    for _ in range(3):  # what the optimizer records at each of the 3 planned steps
        private.engine.accountant.step(noise_multiplier=private.noise_multiplier, sample_rate=private.sample_rate)
    assert 7.5 <= private.epsilon() <= 8.0 * 1.01
    reason = private.before_step(3)  # a fourth step would spend more than ε = 8
    assert reason is not None and reason.startswith("privacy budget: one more step would spend ε=")
    accountant = RDPAccountant()  # the oracle: Opacus's accountant after the 3 planned steps
    for _ in range(3):
        accountant.step(noise_multiplier=private.noise_multiplier, sample_rate=private.sample_rate)
    assert 7.5 <= accountant.get_epsilon(delta=1e-3) <= 8.0 * 1.01


def test_bad_privacy_settings_are_one_clear_error():
    with pytest.raises(ValueError, match=r"privacy.epsilon=0 must be > 0"):
        tiny_private(steps=3, epsilon=0)
    with pytest.raises(ValueError, match=r"privacy.delta=0.05 must be in \(0, 1/N\) = \(0, 0.025\) for N=40"):
        tiny_private(steps=3, delta=0.05)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="BatchNorm"):
        check_per_example(net)
    t5 = build_model("t5-tiny", n_layer=1)
    with pytest.raises(ValueError, match=r"layer encoder.position_bias \(a relative position bias"):
        check_per_example(t5)


@pytest.mark.slow  # a whole run (~25 s here); the pieces are covered by the fast tests above
def test_private_finetune_logs_epsilon_and_stays_within_budget(sentiment_file, tmp_path, capsys):
    from lmforge.cli import main

    sentiment_file(tmp_path / "train.jsonl", 48, seed=0)
    argv = ["finetune", "--model", "bert-tiny", "--data", str(tmp_path / "train.jsonl"), "--max-steps", "4",
            "--train.batch_size", "8", "--out", str(tmp_path), "--train.name", "dp", "--eval-every", "0",
            "--model.vocab_size", "120", "--model.overrides", '{"n_layer": 1}', "--train.log_every", "2",
            "--privacy.epsilon", "8", "--privacy.delta", "1e-3", "--privacy.accountant", "rdp"]  # fmt: skip
    assert main(argv) == 0
    logged = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    epsilons = [row["epsilon"] for row in logged if row.get("split") == "train"]
    assert len(epsilons) == 2 and 0 < epsilons[0] < epsilons[1] <= 8 * 1.01
    assert f"'epsilon_spent': {epsilons[-1]}" in (tmp_path / "dp" / "report.md").read_text()
    assert "DP-SGD: ε=" in capsys.readouterr().err
    assert main([*argv[:-6], "--privacy.epsilon", "-1", "--train.name", "bad"]) == 2
    assert "privacy.epsilon=-1.0 must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data.augment", "eda"], "does not go with data.augment"),
        (["--optim.l1", "0.001"], "does not go with optim.l1"),
    ],
)
def test_settings_that_would_break_the_guarantee_are_refused(sentiment_file, tmp_path, capsys, flags, message):
    from lmforge.cli import main

    sentiment_file(tmp_path / "train.jsonl", 48, seed=0)
    argv = ["finetune", "--model", "bert-tiny", "--data", str(tmp_path / "train.jsonl"), "--max-steps", "2",
            "--out", str(tmp_path), "--model.vocab_size", "120", "--privacy.epsilon", "8", "--privacy.delta", "1e-3",
            *flags]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lmforge finetune: error:") and message in err


def test_poisson_batches_split_between_processes_and_resume_with_the_same_batches_and_budget():
    """The sampler every private run uses: each process keeps its share of one global Poisson draw, and a
    resumed sampler continues with the same batches and the accountant's history (Opacus's RDP accountant)."""
    from functools import partial

    from opacus.accountants import RDPAccountant

    from lmforge.finetune.batches import collate
    from lmforge.train.batches import Endless
    from lmforge.train.privacy import PoissonBatches

    features = [{"input_ids": [2, i, 3], "labels": i % 2} for i in range(40)]
    make = partial(PoissonBatches, features, partial(collate, pad_id=0), 0.2, 7)

    def ids(batch):
        return batch["input_ids"][:, 1].tolist()

    whole = make(RDPAccountant())
    batches = [ids(b) for _ in range(3) for b in whole]  # 3 passes of 5 batches
    assert sum(map(len, batches)) == pytest.approx(0.2 * 40 * 15, rel=0.25)  # 8 examples a batch on average
    assert len({tuple(b) for b in batches}) == len(batches)  # independent draws, not a reshuffled epoch
    ranks = [make(RDPAccountant(), rank=r, world_size=2) for r in (0, 1)]
    shares = [[ids(b) for b in ranks[r]] for r in (0, 1)]
    for global_batch, first, second in zip(batches[:5], *shares, strict=True):
        assert sorted(first + second) == global_batch and not set(first) & set(second)
        assert abs(len(first) - len(second)) <= 1

    accountant = RDPAccountant()
    interrupted = Endless(make(accountant))  # as the loop reads it: batches by step, across passes
    for _ in range(7):
        next(interrupted)
        accountant.step(noise_multiplier=1.1, sample_rate=0.2)  # what the optimizer's hook records
    state = json.loads(json.dumps(interrupted.state_dict()))  # the checkpoint keeps it as JSON
    resumed_accountant = RDPAccountant()
    resumed = make(resumed_accountant)
    resumed.load_state_dict(state)
    assert resumed_accountant.get_epsilon(1e-3) == accountant.get_epsilon(1e-3) > 0
    rest = [ids(b) for b in resumed]
    assert rest[:3] == batches[7:10]  # the draws continue where they stopped
    with pytest.raises(ValueError, match="train.seed is 7, not 8"):
        PoissonBatches(features, partial(collate, pad_id=0), 0.2, 8, RDPAccountant()).load_state_dict(state)
    with pytest.raises(ValueError, match="saved by a run without privacy.epsilon"):
        resumed.load_state_dict({"loader": "FeatureBatches", "position": 3})


def test_an_empty_poisson_draw_is_a_batch_of_zero_rows():
    from functools import partial
    from itertools import islice

    from opacus.accountants import RDPAccountant

    from lmforge.finetune.batches import collate
    from lmforge.train.privacy import PoissonBatches

    features = [{"input_ids": [2, 5, 3], "labels": 1}]
    batches = list(islice(PoissonBatches(features, partial(collate, pad_id=0), 1e-9, 0, RDPAccountant()), 3))
    assert len(batches) == 3 and all(b["input_ids"].shape == (0, 3) and b["labels"].shape == (0,) for b in batches)


PRIVATE_RUN = [
    "--task=classification", "--model=bert-tiny", "--epochs=0", "--train.batch_size=8", "--train.log_every=1",
    "--eval-every=0", "--model.vocab_size=120", '--model.overrides={"n_layer": 1}', "--model.dropout=0",
    "--train.progress=false", "--train.tensorboard=false", "--optim.schedule=constant", "--optim.lr=1e-3",
    "--privacy.epsilon=8", "--privacy.delta=1e-3", "--privacy.accountant=rdp",
]  # fmt: skip


def _train_rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "train"]


@pytest.mark.slow  # two private runs (~30 s): Opacus calibrates the noise in each
def test_a_private_run_resumes_exactly(sentiment_file, tmp_path):
    """A run killed after its step-3 checkpoint (its later checkpoint removed) resumes to the same losses and ε
    as the uninterrupted run: the same Poisson batches, noise and accountant history."""
    import shutil

    from lmforge.cli import main

    sentiment_file(tmp_path / "train.jsonl", 64, seed=0)
    run = [*PRIVATE_RUN, f"--data={tmp_path / 'train.jsonl'}", "--train.deterministic=true", "--max-steps=6"]
    run += [f"--out={tmp_path}", "--train.save_every=3"]
    assert main(["finetune", *run, "--train.name=whole"]) == 0
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "step_00000006")
    assert main(["finetune", *run, "--train.name=killed", "--resume"]) == 0
    whole, resumed = _train_rows(tmp_path / "whole"), _train_rows(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["epsilon"]) for r in resumed] == [(r["loss"], r["epsilon"]) for r in whole]


@pytest.mark.slow  # two processes and one, each calibrating the noise (~60 s)
def test_two_private_processes_take_the_single_process_steps(sentiment_file, tmp_path):
    """DP-SGD with DDP (Opacus's DPDDP): one global Poisson batch split between two processes, each clipping
    its examples, the noise added once; the losses and ε equal a single process's with the same global batch."""
    import subprocess
    import sys

    sentiment_file(tmp_path / "train.jsonl", 64, seed=0)
    common = [*PRIVATE_RUN, f"--data={tmp_path / 'train.jsonl'}", "--max-steps=4", f"--out={tmp_path}"]
    finetune = [sys.executable, "-m", "lmforge.commands.finetune"]
    done = subprocess.run([*finetune, *common, "--train.name=one"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tokenizer = f"--model.tokenizer={tmp_path / 'one' / 'tokenizer'}"
    two = [*common, tokenizer, "--train.name=two", "--train.batch_size=4"]  # 2 x 4: the same expected batch
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, *finetune[1:], *two], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["epsilon"] == pytest.approx(a["epsilon"])


def test_a_private_linear_probe_trains_only_the_head_of_a_mean_pooled_encoder(sentiment_file, tmp_path, capsys):
    """The recipe that works with little data (README, Trust): the encoder frozen, its mean-pooled sentence vector
    read by a linear head, the head trained by DP-SGD. Only the head's weights change, ε stays in budget, and
    the saved model keeps its pooling."""
    from safetensors.torch import load_file

    from lmforge.cli import main
    from lmforge.hf.load import load_model

    sentiment_file(tmp_path / "train.jsonl", 64, seed=0)
    run = [*PRIVATE_RUN, f"--data={tmp_path / 'train.jsonl'}", "--max-steps=3", f"--out={tmp_path}"]
    run += ['--model.overrides={"n_layer": 1, "pooling": "mean"}', "--task.freeze_embeddings", "--task.freeze_layers=1"]
    assert main(["finetune", *run, "--train.name=probe", "--train.save_every=1", "--train.keep_last=3"]) == 0
    assert "(258 of " in capsys.readouterr().err  # a 128-wide head with 2 labels: 128 x 2 + 2
    first = load_file(tmp_path / "probe" / "checkpoints" / "step_00000001" / "model.safetensors")
    final = load_model(tmp_path / "probe" / "model")
    assert final.config.pooling == "mean" and final.pooler is None
    for name, tensor in final.state_dict().items():
        moved = not torch.equal(tensor, first[name])
        assert moved == name.startswith("classifier."), name
    rows = _train_rows(tmp_path / "probe")
    assert 0 < rows[-1]["epsilon"] <= 8 * 1.01
