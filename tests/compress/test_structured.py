"""Structured pruning writes a genuinely smaller model whose outputs equal the original's with the removed
heads or channels zeroed, and that loads back through the normal loader."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge import build_model
from lmforge.compress.prune import Refinement, calibration_batches
from lmforge.compress.structured import IMPORTANCES, UNIT_KINDS, blocks, remove_units
from lmforge.hf.load import load_model
from lmforge.hf.save import save_model


def tiny(preset: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(preset, n_layer=2, vocab_size=256, **overrides).eval()


def batches() -> list[torch.Tensor]:
    tokens = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(1))
    return calibration_batches(tokens, 4, 24, batch_size=2)


def plenty() -> list[torch.Tensor]:
    """2048 calibration tokens: more than any tiny layer's inputs, as a least-squares re-fit needs."""
    tokens = torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(1))
    return calibration_batches(tokens, 32, 64, batch_size=8)


def masked(model: nn.Module, kind: str, kept: dict[str, list[int]]) -> nn.Module:
    """The original with the removed units' outputs zeroed: their columns of the output projection."""
    model = copy.deepcopy(model)
    unit = UNIT_KINDS[kind]
    for name, keep in kept.items():
        block = model.get_submodule(name)
        layer, width = unit.output_layer(block), unit.width(block)
        removed = [u for u in range(layer.in_features // width) if u not in keep]
        with torch.no_grad():
            for u in removed:
                layer.weight[:, u * width : (u + 1) * width] = 0
    return model


@pytest.mark.parametrize(
    ("preset", "kind", "overrides", "expect"),
    [
        ("llama-tiny", "ffn", {}, {"d_ff": 264}),  # 352 * 0.75
        ("bert-tiny", "ffn", {}, {"d_ff": 384}),
        ("llama-tiny", "heads", {}, {"n_head": 2, "n_kv_heads": 2, "head_dim": 32}),  # GQA: 1 of each pair goes
        ("llama-tiny", "heads", {"n_kv_heads": None}, {"n_head": 3, "n_kv_heads": None, "head_dim": 32}),
    ],
)
def test_smaller_model_equals_the_masked_original(tmp_path, preset, kind, overrides, expect):
    original = tiny(preset, **overrides)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    pruned = copy.deepcopy(original)
    amount = 0.5 if kind == "heads" and overrides == {} else 0.25
    removal = remove_units(pruned, kind, amount, batches())
    for key, value in expect.items():
        assert getattr(pruned.config, key) == value
    saved = load_model(save_model(pruned, tmp_path / "small"))  # a fresh model built from the new config
    assert sum(p.numel() for p in saved.parameters()) < sum(p.numel() for p in original.parameters())
    with torch.no_grad():
        reference = masked(original, kind, removal.kept)(ids)
        out = saved(ids)
    field = "logits" if reference.logits is not None else "last_hidden_state"
    torch.testing.assert_close(getattr(out, field), getattr(reference, field), rtol=1e-4, atol=1e-5)


def test_the_least_contributing_channels_go():
    model = tiny("llama-tiny")
    with torch.no_grad():  # channel 7 of block 0 writes nothing: it must be among those removed
        model.blocks[0].ffn.down.weight[:, 7] = 0
    removal = remove_units(model, "ffn", 0.25, batches())
    assert 7 not in removal.kept["blocks.0"]


@pytest.mark.parametrize(
    ("kind", "amount", "message"),
    [
        ("heads", 0.9, "would remove every head of a layer"),
        ("heads", 1.5, "must be a fraction in (0, 1)"),
        ("ffn", 0.0, "must be a fraction in (0, 1)"),
        ("layers", 0.5, "--structured 'layers' is unknown"),
    ],
)
def test_bad_structured_amounts_are_refused(kind, amount, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        remove_units(tiny("llama-tiny"), kind, amount, batches())


def test_heads_of_a_model_without_head_dim_are_refused():
    with pytest.raises(ValueError, match="use --structured ffn"):
        remove_units(tiny("gpt-tiny"), "heads", 0.25, batches())


def gate_gradients(model: nn.Module, kind: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """|dL/dg_u| with a gate g_u = 1 multiplying each unit's output activations (Molchanov et al.'s formulation),
    L the mean next-token cross-entropy, by autograd through the whole model."""
    unit = UNIT_KINDS[kind]
    gates, hooks = {}, []
    for name, block in blocks(model).items():
        layer, width = unit.output_layer(block), unit.width(block)
        gate = gates[name] = torch.ones(layer.in_features // width, requires_grad=True)

        def gated(_module, args, g=gate, w=width):
            return args[0] * g.repeat_interleave(w)  # each unit's width-long slice of the input times its gate

        hooks.append(layer.register_forward_pre_hook(gated))
    logits = model(input_ids=ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, list(gates.values()))
    for h in hooks:
        h.remove()
    return {name: g.abs() for name, g in zip(gates, grads, strict=True)}


@pytest.mark.parametrize(("kind", "overrides"), [("ffn", {}), ("heads", {}), ("heads", {"n_kv_heads": None})])
def test_taylor_scores_equal_the_gate_gradients_by_autograd(kind, overrides):
    """On one batch, |sum over a unit's output-projection columns of W dL/dW| equals |dL/dg| for a gate on the
    unit's output: two computations of the same first-order estimate."""
    model = tiny("llama-tiny", **overrides)
    ids = batches()[0]
    scores = IMPORTANCES["taylor"].scores(model, UNIT_KINDS[kind], [ids])
    expected = gate_gradients(model, kind, ids)
    assert scores.keys() == expected.keys() == {"blocks.0", "blocks.1"}
    for name in scores:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-4, atol=1e-7)
    assert all(p.requires_grad for p in model.parameters())  # the flags are given back


def test_taylor_pruning_removes_the_lowest_scored_units_and_the_model_runs(tmp_path):
    model = tiny("llama-tiny")
    calibration = batches()
    scores = IMPORTANCES["taylor"].scores(model, UNIT_KINDS["ffn"], calibration)
    removal = remove_units(model, "ffn", 0.25, calibration, importance="taylor")
    for name, kept in removal.kept.items():
        removed = sorted(set(range(352)) - set(kept))
        assert len(removed) == 88
        assert scores[name][removed].max() <= scores[name][kept].min()
        assert set(removed) == set(scores[name].argsort()[:88].tolist())
    loaded = load_model(save_model(model, tmp_path / "small"))
    assert loaded.config.d_ff == 264
    logits = loaded(torch.randint(0, 256, (1, 12))).logits
    assert logits.shape == (1, 12, 256) and torch.isfinite(logits).all()


def test_taylor_needs_a_causal_lm():
    with pytest.raises(ValueError, match="needs a causal LM; .* use --importance activation"):
        remove_units(tiny("bert-tiny"), "ffn", 0.25, batches(), importance="taylor")


def correlated_inputs(n: int, width: int, seed: int = 3) -> torch.Tensor:
    """(n, width) inputs whose columns share factors, so a removed column is partly predictable from the rest."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, width // 2, generator=g, dtype=torch.float64)
    mix = torch.randn(width // 2, width, generator=g, dtype=torch.float64)
    return factors @ mix + 0.3 * torch.randn(n, width, generator=g, dtype=torch.float64) + 0.5


def ridge_refit(weight: torch.Tensor, x: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """The kept columns' fit by torch.linalg.lstsq of min ||W X - W_K' X_K||^2 + c ||W_K - W_K'||^2 over the n
    samples, c = lambda n / 2 with lambda SparseGPT's dampening of H = (2/n) X X^T (stacked as extra rows)."""
    from lmforge.compress.prune import SPARSEGPT_DAMPENING

    n = len(x)
    lam = SPARSEGPT_DAMPENING * float((2 / n) * x.square().sum(0).mean())
    c = lam * n / 2
    a = torch.cat([x[:, kept], c**0.5 * torch.eye(len(kept), dtype=x.dtype)])
    target = torch.cat([x @ weight.T, c**0.5 * weight[:, kept].T])
    return torch.linalg.lstsq(a, target).solution.T


@pytest.mark.parametrize("width", [1, 3])
def test_reconstruction_refits_the_kept_columns_and_bias_as_least_squares_does(width):
    """A third of the twelve columns of a layer with a bias go, one unit of `width` columns at a time; the weights
    left equal the (dampened) least-squares fit of the layer's outputs on the kept inputs and the constant 1, by
    torch.linalg.lstsq."""
    from lmforge.compress.structured import obs_remove

    x = correlated_inputs(400, 12)
    ones = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    weight = torch.randn(5, 13, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # [W | b]
    units = 12 // width
    refit, kept = obs_remove(weight, (2 / len(x)) * ones.T @ ones, [list(range(units))], width, units // 3)
    columns = [u * width + i for u in kept for i in range(width)]
    assert len(kept) == units - units // 3 and (refit[:, [c for c in range(12) if c not in columns]] == 0).all()
    expected = ridge_refit(weight, ones, [*columns, 12])
    torch.testing.assert_close(refit[:, [*columns, 12]], expected, rtol=1e-8, atol=1e-10)


def test_reconstruction_removes_first_the_unit_whose_loss_raises_the_error_least():
    """With one removal, the chosen column is the one whose least-squares re-fit leaves the smallest output error,
    found by brute force over every column with torch.linalg.lstsq."""
    from lmforge.compress.structured import obs_remove

    x = correlated_inputs(300, 10, seed=5)
    weight = torch.randn(4, 10, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    _, kept = obs_remove(weight, (2 / len(x)) * x.T @ x, [list(range(10))], 1, 1)

    def error(gone: int) -> float:
        keep = [u for u in range(10) if u != gone]
        fit = ridge_refit(weight, x, keep)
        from lmforge.compress.prune import SPARSEGPT_DAMPENING

        lam = SPARSEGPT_DAMPENING * float((2 / len(x)) * x.square().sum(0).mean())
        full = torch.zeros_like(weight)
        full[:, keep] = fit
        return float((x @ (weight - full).T).square().sum() / len(x) + lam / 2 * (weight - full).square().sum())

    errors = [error(u) for u in range(10)]
    assert set(range(10)) - set(kept) == {min(range(10), key=errors.__getitem__)}


def twins(model: nn.Module, copies: int) -> nn.Module:
    """Make FFN channels copies .. 2 copies - 1 of every block read what channels 0 .. copies - 1 read (their gate
    and up rows), so each is the twin of another: one of each pair can go, its down column added to the other's."""
    with torch.no_grad():
        for block in blocks(model).values():
            for layer in (block.ffn.gate, block.ffn.up):
                layer.weight[copies : 2 * copies] = layer.weight[:copies]
    return model


def test_reconstruction_removes_twin_channels_and_folds_them_into_their_twins():
    """A quarter of the channels are twins of others: reconstruction removes one of each pair and re-fits the
    other's down column, so the smaller model's logits stay those of the original (up to the dampening), where
    the activation-norm and Taylor choices, which keep the weights as they were, move them. (Calibrated on more
    tokens than a layer has inputs: with fewer, any channel is a mix of the others on those tokens alone.)"""
    original = twins(tiny("llama-tiny"), 88)  # d_ff 352: 88 pairs, and 25% is 88 channels
    calibration = plenty()
    held_out = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = original(held_out).logits
    moved = {}
    for importance in ("activation", "taylor", "reconstruction"):
        pruned = copy.deepcopy(original)
        removal = remove_units(pruned, "ffn", 0.25, calibration, importance=importance)
        with torch.no_grad():
            moved[importance] = float((pruned(held_out).logits - reference).abs().max())
        if importance == "reconstruction":
            assert all(len({u % 88 for u in kept if u < 176}) == 88 for kept in removal.kept.values())
    assert moved["reconstruction"] < 0.05 * min(moved["activation"], moved["taylor"]), moved
    scores = IMPORTANCES["reconstruction"].scores(original, UNIT_KINDS["ffn"], calibration)  # each twin alone
    assert all(s[:176].max() < s[176:].min() for s in scores.values())  # ... is cheaper to lose than any other


def test_reconstruction_takes_as_many_heads_from_every_key_value_group_and_loads(tmp_path):
    model = tiny("llama-tiny")  # 4 query heads sharing 2 key/value heads: one of each pair goes
    removal = remove_units(model, "heads", 0.5, plenty(), importance="reconstruction")
    assert all(len(kept) == 2 and {h // 2 for h in kept} == {0, 1} for kept in removal.kept.values())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    loaded = load_model(save_model(model, tmp_path / "small"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("importance", ["activation", "reconstruction"])
def test_refinement_trains_the_smaller_blocks_towards_the_original(importance):
    """`refine`: after the cut, each smaller block's weights are trained towards the unpruned block's output on
    the calibration text: same shapes and config as without, logits closer to the original's."""
    original, data = tiny("llama-tiny"), plenty()
    plain, refined = copy.deepcopy(original), copy.deepcopy(original)
    kept = remove_units(plain, "ffn", 0.25, data, importance=importance).kept
    assert remove_units(refined, "ffn", 0.25, data, importance=importance, refine=Refinement(5, 3e-4)).kept == kept
    assert refined.config.to_dict() == plain.config.to_dict()
    assert all(p.requires_grad and p.grad is None for p in refined.parameters())
    with torch.no_grad():
        logits = {
            k: torch.cat([m(ids).logits for ids in data]) for k, m in (("o", original), ("p", plain), ("r", refined))
        }
    assert (logits["r"] - logits["o"]).norm() < 0.95 * (logits["p"] - logits["o"]).norm()


@pytest.mark.parametrize("tied", [True, False])
def test_a_decoding_step_reads_every_weight_once_but_the_input_table(tied):
    """The speed-up bound `lmforge prune --structured` reports: a tied table is read once (as the output layer);
    an untied input table gives one row a step, so it is not counted."""
    from lmforge.compress.structured import weights_read_per_token

    model = tiny("llama-tiny", tie_embeddings=tied)
    table = model.tok_emb.weight.numel()
    every = sum(p.numel() for p in model.parameters())  # parameters() yields a tied table once
    assert weights_read_per_token(model) == (every if tied else every - table)
    pruned = copy.deepcopy(model)
    remove_units(pruned, "ffn", 0.25, batches())
    removed = every - sum(p.numel() for p in pruned.parameters())
    assert removed == 2 * 3 * 88 * model.config.d_model  # 2 blocks, gate/up/down, 88 of 352 channels
    assert weights_read_per_token(pruned) == weights_read_per_token(model) - removed
