"""The pretraining recipe: gradient accumulation, the run folder, evaluation, NaN handling, MLM, config checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.models import build_model
from lmforge.train import trainer
from lmforge.train.config import parse_args
from lmforge.train.distributed import DistInfo
from lmforge.train.trainer import backward_accumulated, enable_activation_checkpointing, pretrain

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


def _tiny_gpt():
    torch.manual_seed(0)
    return build_model("gpt", head="causal_lm", n_layer=1, n_head=2, d_model=32, vocab_size=50, max_seq_len=16)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_matches_the_concatenated_batch():
    """Two micro-batches with 3 and 16 target tokens give exactly the gradient of the mean over all 19."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (4, 9), generator=g)
    labels = ids.clone()
    labels[:2, 3:] = -100  # first micro-batch: 2 rows x 2 targets... (positions 1, 2 of each row)
    labels[0, 2] = -100  # ...minus one: 3 targets; second micro-batch: 2 rows x 8 = 16 targets
    micro = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    config = parse_args([])

    model = _tiny_gpt()
    loss = backward_accumulated(model, micro, "causal_lm", config, CPU)
    accumulated = _grads(model)

    oracle = _tiny_gpt()
    reference = oracle(input_ids=ids, labels=labels).loss  # the model's own mean over the concatenated batch
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-6)
    for name, grad in _grads(oracle).items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    naive = _tiny_gpt()  # the shipped bug: mean per micro-batch / number of micro-batches
    for batch in micro:
        (naive(**batch).loss / len(micro)).backward()
    assert not torch.allclose(_grads(naive)["tok_emb.weight"], _grads(oracle)["tok_emb.weight"], rtol=1e-3)


def test_activation_checkpointing_keeps_gradients_and_names():
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    plain, checkpointed = _tiny_gpt(), _tiny_gpt()
    assert enable_activation_checkpointing(checkpointed) == 1
    plain(input_ids=ids, labels=ids).loss.backward()
    checkpointed(input_ids=ids, labels=ids).loss.backward()
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    for name, grad in _grads(plain).items():
        torch.testing.assert_close(_grads(checkpointed)[name], grad, msg=name)


def test_pretrain_writes_the_run_folder(tiny_flags):
    summary = pretrain(parse_args(tiny_flags(train__max_steps=30, train__sample_tokens=40, optim__lr=0.02)))
    run = parse_args(tiny_flags()).run_dir
    for name in ("metrics.jsonl", "loss.png", "summary.json", "summary.md", "samples.txt", "tokenizer/tokenizer.json"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert len(train) == 30 and [r["step"] for r in val] == [10, 20, 30]
    assert train[-1] < train[0] - 0.5  # it learns
    final = summary["final_val"]
    assert final["perplexity"] == pytest.approx(math.exp(final["loss"]))
    assert final["bits_per_byte"] == pytest.approx(final["loss"] / math.log(2))  # ASCII text: 1 token per byte
    assert summary["best_val_loss"] == min(r["loss"] for r in val)
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 30
    assert (run / "checkpoints" / latest["path"] / "tokenizer.json").is_file()
    samples = (run / "samples.txt").read_text()
    assert "=== greedy ===" in samples and "=== temperature 0.8 ===" in samples

    from lmforge import load_model

    model = load_model(run / "checkpoints" / latest["path"])  # a checkpoint is a loadable model folder
    assert model.config.n_layer == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_flags, monkeypatch):
    real = trainer.summed_loss
    calls = {"n": 0}

    def poisoned(model, batch, targets):  # an injected fault: the 15th training forward returns NaN
        loss = real(model, batch, targets)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 15:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer, "summed_loss", poisoned)
    with pytest.raises(RuntimeError, match=r"loss became nan at step 15; the last good checkpoint is .*step_00000010"):
        pretrain(parse_args(tiny_flags()))

    calls["n"] = 0
    summary = pretrain(parse_args(tiny_flags(train__nan_policy="skip", train__name="skip")))
    assert summary["skipped_steps"] == 1 and summary["steps"] == 20
    assert math.isfinite(summary["final_val"]["loss"])


def test_resume_refuses_a_run_with_another_config(tiny_flags):
    pretrain(parse_args(tiny_flags(train__max_steps=10)))
    with pytest.raises(ValueError, match=r"already holds checkpoints \(latest: step_00000010\); pass --resume"):
        pretrain(parse_args(tiny_flags(train__max_steps=20)))
    other = tiny_flags(train__max_steps=20, train__resume="true", data__block_size=16)
    with pytest.raises(ValueError, match=r"cannot resume .*data.block_size: 32 -> 16"):
        pretrain(parse_args(other))
    other = tiny_flags(train__resume="true", model__overrides='{"n_layer": 2, "n_head": 2, "d_model": 32}')
    with pytest.raises(ValueError, match=r"model.overrides"):
        pretrain(parse_args(other))


@pytest.mark.parametrize(
    ("family", "objective", "overrides"),
    [
        ("bert", "masked_lm", '{"n_layer": 1, "n_head": 2, "d_model": 32}'),
        ("t5", "span_corruption", '{"n_layer": 1, "n_head": 2, "d_model": 32, "head_dim": 16, "d_ff": 64}'),
    ],
)
def test_encoder_objectives_learn(tiny_flags, family, objective, overrides):
    flags = tiny_flags(model__name=family, model__overrides=overrides, train__name=family, train__max_steps=30)
    summary = pretrain(parse_args(flags))
    assert summary["objective"] == objective
    run = parse_args(flags).run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # it learns
    assert math.isfinite(summary["final_val"]["loss"])


def test_missing_data_file_names_the_path(tiny_flags, tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="nothing.txt"):
        pretrain(parse_args(tiny_flags(data__dataset=str(tmp_path / "nothing.txt"))))
