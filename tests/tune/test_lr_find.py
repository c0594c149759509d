"""`lmforge lr-find`: the sweep runs the real recipe with an exponentially growing learning rate, and the
suggestions read the loss curve as the range test prescribes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.cli import main as cli_main
from lmforge.tune.lr_find import LRFindSettings, lr_find, suggest


def test_suggestions_on_a_known_curve():
    lrs = np.logspace(-6, 1, 120)
    x = np.log10(lrs)
    losses = 3.0 - 1.0 / (1.0 + np.exp(-3.0 * (x + 3.0))) + np.exp(3.0 * x)  # falls fastest at 1e-3, blows up past 1
    found = suggest(lrs, losses + np.random.default_rng(0).normal(0, 0.01, len(lrs)))
    assert 10**-3.5 < found["steepest_lr"] < 10**-2.4  # the smoothing lags a little behind the true 1e-3
    assert found["min_loss_lr"] < found["diverged_at_lr"] <= 10.0
    assert found["suggested_lr"] == pytest.approx(found["min_loss_lr"] / 10)


def test_a_loss_that_is_never_finite_long_enough_is_one_clear_error():
    with pytest.raises(ValueError, match="lower --start-lr"):
        suggest(np.logspace(-3, 1, 20), np.array([1.0, 2.0, float("nan")] + [1.0] * 17))


def test_the_sweep_runs_the_recipe_with_an_exponential_lr(tmp_path, pretrain_flags):
    settings = LRFindSettings("pretrain", str(tmp_path / "out"), tuple(pretrain_flags), 1e-4, 30.0, steps=30)
    summary = lr_find(settings)
    curve = json.loads((tmp_path / "out" / "lr_find.json").read_text(encoding="utf-8"))["curve"]
    expected = 1e-4 * (30.0 / 1e-4) ** (np.arange(30) / 29)
    logged = np.array(curve["lr"])
    assert len(logged) >= 20  # steps that overflowed are skipped, not logged
    assert np.isin(np.round(np.log(logged), 6), np.round(np.log(expected), 6)).all()
    assert logged[0] == pytest.approx(1e-4) and np.all(np.diff(logged) > 0)
    assert 1e-4 <= summary["suggested_lr"] < summary["min_loss_lr"] <= 30.0
    assert (tmp_path / "out" / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    lr_find(settings)  # a second sweep into the same folder replaces the first


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--recipe", "distill"], "--recipe 'distill' is not one of"),
        (["--recipe", "pretrain", "--start-lr", "1", "--end-lr", "0.1"], "need 0 < start < end"),
        (["--recipe", "pretrain", "--steps", "3"], "--steps 3 is too few"),
        (["--recipe", "pretrain", "--optim.lrr=1"], "did you mean optim.lr"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, flags, message):
    assert cli_main(["lr-find", "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge lr-find: error:") and message in err and "\n" not in err
