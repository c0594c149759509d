import json
import random

import numpy as np
import pytest
import torch

import lmforge
from lmforge import build_model
from lmforge.hf.runs import latest_checkpoint, list_checkpoints
from lmforge.train.checkpoint import (
    check_writable,
    checkpoint_bytes,
    load_checkpoint,
    save_checkpoint,
)
from lmforge.train.optim import OptimConfig, build_optimizer, build_scheduler

SMALL = dict(n_layer=1, d_model=32, n_head=2, vocab_size=64, d_ff=48, max_seq_len=16)
CFG = OptimConfig(name="muon", warmup_steps=2)


def setup(seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model("gpt-tiny", **{**SMALL, **overrides})
    opt = build_optimizer(model, CFG)
    return model, opt, build_scheduler(opt, CFG, max_steps=20)


def train(model, opt, sched, steps):
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 16))  # drawn from the global RNG: resuming must restore it
        model(x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_resume_continues_bit_identically_and_load_model_reads_the_checkpoint(tmp_path):
    model, opt, sched = setup()
    train(model, opt, sched, 3)
    path = save_checkpoint(tmp_path, 3, model, opt, sched, {"loader": {"position": 96}, "best_val": 2.5})
    assert path == tmp_path / "checkpoints" / "step_00000003"
    train(model, opt, sched, 3)  # the uninterrupted run

    resumed, resumed_opt, resumed_sched = setup(seed=123)  # different init and RNG position
    state = load_checkpoint(path, resumed, resumed_opt, resumed_sched)
    assert state == {"loader": {"position": 96}, "best_val": 2.5, "step": 3}
    train(resumed, resumed_opt, resumed_sched, 3)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)

    loaded = lmforge.load_model(path)  # the checkpoint is also an ordinary lmforge model folder
    assert loaded.config == model.config
    x = torch.randint(0, 64, (1, 16))
    reference_model, _, _ = setup()
    load_checkpoint(path, reference_model, restore_rng=False)
    torch.testing.assert_close(loaded(x).logits, reference_model.eval()(x).logits)


def test_rng_streams_after_restore_equal_the_uninterrupted_draws(tmp_path):
    model, opt, sched = setup()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)  # move off the seeded start
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {})
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(4).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    load_checkpoint(path, model)
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(4).tolist()) == expected


def test_keeps_last_k_plus_best_and_points_latest(tmp_path):
    model, opt, sched = setup()
    for step in range(1, 7):
        save_checkpoint(tmp_path, step, model, opt, sched, {"step_seen": step}, keep_last=2, is_best=step == 2)
    folder = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000005", "step_00000006"]
    assert json.loads((folder / "latest.json").read_text())["path"] == "step_00000006"
    assert json.loads((folder / "best.json").read_text())["path"] == "step_00000002"
    assert latest_checkpoint(tmp_path) == folder / "step_00000006"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary folders left

    # latest.json missing or stale: fall back to the newest complete folder, skipping incomplete ones
    (folder / "latest.json").unlink()
    (folder / "step_00000009").mkdir()  # a folder without trainer_state.json is not a checkpoint
    assert latest_checkpoint(tmp_path) == folder / "step_00000006"
    (folder / "latest.json").write_text('{"step": 8, "path": "step_00000008"}')
    assert latest_checkpoint(tmp_path) == folder / "step_00000006"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_failed_save_leaves_previous_checkpoint_and_no_partial_folder(tmp_path):
    model, opt, sched = setup()
    save_checkpoint(tmp_path, 1, model, opt, sched, {})

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {}, tokenizer=BrokenTokenizer())
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step_00000001"]
    assert latest_checkpoint(tmp_path) == folder / "step_00000001"
    with pytest.raises(ValueError, match="trainer_state must hold JSON values"):
        save_checkpoint(tmp_path, 3, model, opt, sched, {"loss": float("nan")})
    assert not (folder / "step_00000003").exists()


def test_refuses_a_different_model_config_naming_the_fields(tmp_path):
    model, opt, sched = setup()
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {})
    other, _, _ = setup(n_layer=2, dropout=0.1)
    with pytest.raises(ValueError, match=r"different model config \(dropout: checkpoint 0.0, model 0.1; n_layer"):
        load_checkpoint(path, other)
    same_shapes, _, _ = setup(dropout=0.1)
    load_checkpoint(path, same_shapes, allow_config_changes=("dropout",))


def test_corrupt_or_incomplete_checkpoints_give_clear_errors(tmp_path):
    model, opt, sched = setup()
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {})
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is not a valid safetensors file .*truncated or corrupt"):
        load_checkpoint(path, model)

    path = save_checkpoint(tmp_path, 2, model, opt, sched, {})
    (path / "optimizer.pt").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"optimizer.pt could not be read as a optimizer state"):
        load_checkpoint(path, model, opt)

    path = save_checkpoint(tmp_path, 3, model, opt, sched, {})
    (path / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"step_00000003 is incomplete \(no trainer_state.json"):
        load_checkpoint(path, model)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "checkpoints" / "step_00000042", model)


def test_pickled_python_objects_are_refused(tmp_path):
    model, opt, sched = setup()
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {})
    torch.save({"state": {}, "param_groups": [], "payload": OptimConfig()}, path / "optimizer.pt")
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_checkpoint(path, model, opt)


def test_optimizer_of_another_kind_is_refused(tmp_path):
    model, opt, sched = setup()
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {})
    adamw = build_optimizer(model, OptimConfig(name="adamw"))
    with pytest.raises(ValueError, match="does not fit this optimizer"):
        load_checkpoint(path, model, adamw)


def test_check_writable_fails_before_training(tmp_path):
    check_writable(tmp_path / "run", min_free_bytes=1)
    assert (tmp_path / "run").is_dir() and not list((tmp_path / "run").iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RuntimeError, match="cannot write to run directory"):
        check_writable(blocker / "run", min_free_bytes=1)
    with pytest.raises(RuntimeError, match="GB free under"):
        check_writable(tmp_path / "run", min_free_bytes=10**18)
    model, _, _ = setup()
    n = sum(p.numel() for p in model.parameters())
    assert checkpoint_bytes(model) == 3 * 4 * n


def test_a_kill_while_pruning_never_leaves_a_checkpoint_that_cannot_resume(tmp_path, monkeypatch):
    """keep_last=1: the process dies while deleting the old checkpoint (after its weights went). The newest
    complete checkpoint must be the one resume picks, and it must load."""
    from pathlib import Path

    from lmforge.train import checkpoint

    model, opt, sched = setup()
    save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep_last=1)

    def killed(path, *args, **kwargs):  # deletes the weights of the pruned folder, then the process "dies"
        (Path(path) / "model.safetensors").unlink(missing_ok=True)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, 2, model, opt, sched, {}, keep_last=1)

    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000002"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]  # the half-deleted one is hidden
    other, other_opt, other_sched = setup(seed=1)
    assert load_checkpoint(latest, other, other_opt, other_sched)["step"] == 2
    save_checkpoint(tmp_path, 3, model, opt, sched, {}, keep_last=1)  # the next prune sweeps the leftover
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step_00000003"]


def test_a_half_deleted_checkpoint_under_a_step_name_is_not_complete(tmp_path):
    """What an interrupted prune of an older lmforge left: trainer_state.json without the weights. Resume
    falls back to the newest complete checkpoint even when latest.json names the broken one."""
    model, opt, sched = setup()
    save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep_last=5)
    save_checkpoint(tmp_path, 2, model, opt, sched, {}, keep_last=5)
    (tmp_path / "checkpoints" / "step_00000002" / "model.safetensors").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_a_full_disk_mid_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    from lmforge.train import checkpoint

    model, opt, sched = setup()
    save_checkpoint(tmp_path, 1, model, opt, sched, {})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(RuntimeError, match=r"disk full .*step_00000002 .*last complete checkpoint is .*step_00000001"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step_00000001"]
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_the_loss_module_trains_with_the_model_and_resumes_bit_identically(tmp_path):
    """A loss's own weights (`Objective.loss_module`, e.g. distillation's width projections) join the optimizer
    (AdamW groups inside Muon), live in loss.safetensors, and a resumed run continues them exactly."""
    from lmforge.train.optim import add_loss_groups

    def build(seed):
        torch.manual_seed(seed)
        model, head = build_model("gpt-tiny", **SMALL), torch.nn.Linear(32, 8)
        opt = build_optimizer(model, CFG)
        add_loss_groups(opt, head, CFG)
        return model, head, opt, build_scheduler(opt, CFG, max_steps=20)

    def steps(model, head, opt, sched, n):
        for _ in range(n):
            x = torch.randint(0, 64, (2, 16))
            hidden = model(x).logits[..., :32]
            (model(x, labels=x).loss + head(hidden).square().mean()).backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    model, head, opt, sched = build(0)
    assert [g["role"] for g in opt.param_groups][-2:] == ["loss/decay", "loss/no_decay"]
    assert not opt.param_groups[-2]["use_muon"] and opt.param_groups[-1]["weight_decay"] == 0.0
    before = head.weight.detach().clone()
    steps(model, head, opt, sched, 2)
    assert not torch.equal(head.weight, before)
    path = save_checkpoint(tmp_path, 2, model, opt, sched, {}, loss_module=head)
    steps(model, head, opt, sched, 2)

    model2, head2, opt2, sched2 = build(7)
    load_checkpoint(path, model2, opt2, sched2, loss_module=head2)
    steps(model2, head2, opt2, sched2, 2)
    assert torch.equal(head2.weight, head.weight) and torch.equal(head2.bias, head.bias)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters(), strict=True))

    plain = save_checkpoint(tmp_path, 3, model, opt, sched, {})
    with pytest.raises(FileNotFoundError, match="loss.safetensors not found"):
        load_checkpoint(plain, model2, opt2, sched2, loss_module=head2)
    with pytest.raises(ValueError, match="resume with the loss settings the run used"):
        load_checkpoint(path, model2, opt2, sched2, loss_module=torch.nn.Linear(32, 4))
