"""The pretraining recipe: the run folder, evaluation, NaN handling, MLM, config checks."""

from __future__ import annotations

import json
import math

import pytest

from lmforge.pretrain import objectives
from lmforge.pretrain.config import parse_args
from lmforge.pretrain.trainer import pretrain


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
    real = objectives.CausalLM.loss_sum
    calls = {"n": 0}

    def poisoned(self, model, batch):  # an injected fault: the 15th training forward returns NaN
        loss = real(self, model, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 15:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(objectives.CausalLM, "loss_sum", poisoned)
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


def test_pretraining_refuses_a_folder_another_run_is_writing(tiny_flags):
    from lmforge.train.runlock import run_lock

    config = parse_args(tiny_flags(train__max_steps=2))
    with run_lock(config.run_dir), pytest.raises(RuntimeError, match="in use by another process"):
        pretrain(config)
    assert pretrain(config)["steps"] == 2


def test_a_run_name_cannot_leave_the_output_folder(tiny_flags):
    with pytest.raises(ValueError, match=r"train.name='../../x' must be a plain folder name"):
        parse_args(tiny_flags(train__name="../../x"))


def test_sigint_at_any_moment_is_one_line_and_status_130(tiny_flags, tmp_path):
    """Ctrl-C during start-up (imports, data, model) or training: no traceback, exit status 130. The child
    touches a marker once `lmforge.cli` is imported (before that the interpreter itself is starting), and the
    signal follows it after a delay."""
    import signal
    import subprocess
    import sys
    import time

    for delay in (0.0, 2.0):
        marker = tmp_path / f"started-{delay}"
        code = (
            "import pathlib, sys; from lmforge.cli import main; "
            f"pathlib.Path({str(marker)!r}).touch(); sys.exit(main(sys.argv[1:]))"
        )
        flags = tiny_flags(train__max_steps=10**5, train__name=f"i{delay}")
        process = subprocess.Popen(
            [sys.executable, "-c", code, "pretrain", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 130, stderr
        assert "Traceback" not in stderr, stderr


def test_a_ctrl_c_inside_a_finaliser_is_recorded_without_a_traceback(monkeypatch):
    """CI saw "Exception ignored in: <function _get_module_lock.<locals>.cb ...>" and a traceback when the
    signal landed in importlib's weakref callback: Python cannot raise there. The latch records the signal,
    drops exactly that unraisable KeyboardInterrupt and still reports any other one."""
    import gc
    import os
    import signal
    import sys
    import time

    from lmforge import interrupts

    reported: list[BaseException] = []

    def report(unraisable) -> None:
        reported.append(unraisable.exc_value)

    monkeypatch.setattr(sys, "unraisablehook", report)

    class InterruptedWhileCollected:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs at the next bytecode boundary, inside __del__

    class FailsWhileCollected:
        def __del__(self) -> None:
            raise ValueError("a real bug in a finaliser")

    before = signal.getsignal(signal.SIGINT)
    with interrupts.latched():
        InterruptedWhileCollected()
        gc.collect()
        assert interrupts.pending == signal.SIGINT
        FailsWhileCollected()
        gc.collect()
    assert [type(e) for e in reported] == [ValueError], reported
    assert interrupts.pending is None and signal.getsignal(signal.SIGINT) == before
    assert sys.unraisablehook is report  # the caller's hook is back


def test_a_ctrl_c_that_start_up_swallows_still_stops_the_run(tiny_flags, tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt caught by something during start-up (a library's finaliser, a broad except) used to
    be lost: the run trained on. The CLI remembers the signal and the loop stops at its first step."""
    import os
    import signal
    import time

    from lmforge.cli import main
    from lmforge.pretrain import trainer

    build = trainer.build_pretrain_model

    def build_then_swallow_a_ctrl_c(*args, **kwargs):
        model = build(*args, **kwargs)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode boundary
        except KeyboardInterrupt:
            pass  # swallowed
        return model

    monkeypatch.setattr(trainer, "build_pretrain_model", build_then_swallow_a_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # Python's handler, or SIG_IGN under nohup
    assert main(["pretrain", *tiny_flags(train__max_steps=10**5, train__name="swallowed")]) == 130
    assert "interrupted by SIGINT at step 1: continue with --resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) == before  # the CLI put the caller's handler back


def test_a_block_size_whose_activations_cannot_fit_is_refused_before_training(tiny_flags):
    """--data.block_size=100000 on a small GPT drove a 24 GB machine into swap; now it is one line, naming
    the settings and the memory they would take, before the first step."""
    with pytest.raises(ValueError, match=r"data.block_size=50000 x train.batch_size=64 needs about \d+\.\d GiB"):
        pretrain(
            parse_args(
                tiny_flags(
                    data__dataset="shakespeare-small",
                    data__block_size=50000,
                    train__batch_size=64,
                    model__overrides='{"n_layer": 12, "n_head": 8, "d_model": 512}',
                )
            )
        )


def test_mfu_is_never_reported_above_100_percent(tiny_flags, monkeypatch):
    """A peak measured while other processes load the machine is too low; the MFU it gives is not shown."""
    from lmforge.train import logging as train_logging

    monkeypatch.setattr(train_logging, "measure_peak_flops", lambda *args, **kwargs: 1.0)  # an absurdly low peak
    pretrain(parse_args(tiny_flags(train__progress=True, train__max_steps=3)))
    run = parse_args(tiny_flags()).run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r.get("mfu") is None for r in records)


def test_pretraining_continues_from_a_run_folder_through_the_shared_resolver(tiny_flags):
    """model.name accepts what every command accepts: here a run folder (its best, else latest, checkpoint)."""
    first = parse_args(tiny_flags(train__max_steps=10))
    pretrain(first)
    tokenizer = str(first.run_dir / "tokenizer")
    summary = pretrain(
        parse_args(
            tiny_flags(
                model__name=str(first.run_dir),
                model__overrides="{}",
                data__tokenizer=tokenizer,
                train__name="continued",
                train__max_steps=2,
            )
        )
    )
    assert summary["steps"] == 2 and summary["objective"] == "causal_lm"


@pytest.mark.parametrize("reuse", [True, False])
def test_training_steps_reuse_freed_memory_unless_told_not_to(tiny_flags, monkeypatch, reuse):
    """The steps run inside `retained_heap` as train.reuse_freed_memory says (on by default); with it on, a large
    tensor freed in one step is reused by the next without fresh page faults (tests/train/test_memory.py checks
    glibc's defaults before and after in a fresh process)."""
    import contextlib
    import resource

    import torch

    from lmforge.train import loop, memory

    if memory._glibc() is None:
        pytest.skip("mallopt is glibc's (Linux)")
    pages = 64 * 2**20 // 4096

    def faults() -> int:  # minor page faults of a fresh 64 MiB tensor, filled and freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.ones(16 * 2**20)
        del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    asked, seen, step = [], [], loop.backward_accumulated

    @contextlib.contextmanager
    def recorded(device, enabled=True):
        asked.append(enabled)
        with memory.retained_heap(device, enabled) as on:
            yield on

    def observed(*args, **kwargs):
        seen.append(faults())
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "retained_heap", recorded)
    monkeypatch.setattr(loop, "backward_accumulated", observed)
    pretrain(parse_args(tiny_flags(train__max_steps=6, train__eval_every=0, train__reuse_freed_memory=reuse)))
    assert asked == [reuse]
    if reuse:
        assert max(seen[3:]) < pages // 10, seen  # after the heap has grown: no fresh pages
