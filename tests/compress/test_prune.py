"""Pruning methods against their definitions and peers: torch.nn.utils.prune for magnitude, the Wanda score by
hand, and SparseGPT's defining property (a lower layer reconstruction error than the methods that only mask)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from lmforge import build_model
from lmforge.compress.prune import (
    METHODS,
    SPARSEGPT_DAMPENING,
    InputStatistics,
    Refinement,
    Sparsity,
    calibration_batches,
    calibration_forward,
    dense_target_weight,
    input_statistics,
    prunable_layers,
    prune_model,
    reconstruction_error,
)


def tiny(preset: str = "llama-tiny") -> nn.Module:
    torch.manual_seed(0)
    return build_model(preset, n_layer=2, vocab_size=256).eval()


def batches(n: int = 4, seq_len: int = 32) -> list[torch.Tensor]:
    tokens = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(1))
    return calibration_batches(tokens, n, seq_len, batch_size=2)


def layer_inputs(model: nn.Module, name: str, data: list[torch.Tensor]) -> torch.Tensor:
    """What Linear `name` receives over `data`, (tokens, in_features), caught by a hook of the test's own."""
    seen = []
    hook = model.get_submodule(name).register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    with torch.no_grad():
        for ids in data:
            model(ids)
    hook.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


@pytest.mark.parametrize("preset", ["llama-tiny", "bert-tiny"])
def test_magnitude_masks_equal_torch_l1_unstructured(preset):
    dense = tiny(preset)
    pruned = copy.deepcopy(dense)
    achieved = prune_model(pruned, "magnitude", Sparsity.parse(0.3, None))
    names = [n for layers in prunable_layers(dense).values() for n in layers]
    assert sorted(achieved) == sorted(names) and len(names) >= 8
    for name in names:
        oracle = copy.deepcopy(dense.get_submodule(name))
        torch_prune.l1_unstructured(oracle, "weight", amount=0.3)
        assert torch.equal(oracle.weight_mask.bool(), pruned.get_submodule(name).weight != 0), name
        assert achieved[name] == pytest.approx(0.3, abs=1e-3)
    layer_names = set(names)
    for name, tensor in dense.state_dict().items():  # embeddings, norms and heads stay as they were
        if name.rpartition(".")[0] not in layer_names:
            assert torch.equal(tensor, pruned.state_dict()[name]), name


def test_wanda_keeps_the_largest_weight_times_input_norm_in_each_row():
    dense, data = tiny(), batches()
    pruned = copy.deepcopy(dense)
    prune_model(pruned, "wanda", Sparsity.parse(0.5, None), data)
    name = "blocks.0.ffn.up"  # block 0 sees the dense embeddings, so its inputs are the dense model's
    x = layer_inputs(dense, name, data).numpy().astype(np.float64)
    w = dense.get_submodule(name).weight.detach().numpy().astype(np.float64)
    score = np.abs(w) * np.linalg.norm(x, axis=0)[None, :]  # Sun et al. 2023, eq. 1
    keep = np.argsort(-score, axis=1)[:, : w.shape[1] // 2]
    expected = np.zeros_like(w, dtype=bool)
    np.put_along_axis(expected, keep, True, axis=1)
    assert np.array_equal(pruned.get_submodule(name).weight.detach().numpy() != 0, expected)


@pytest.mark.parametrize("method", list(METHODS))
def test_pattern_keeps_n_of_every_m_weights(method):
    model = tiny()
    prune_model(model, method, Sparsity.parse(None, "2:4"), batches(2))
    for layers in prunable_layers(model).values():
        for name, layer in layers.items():
            groups = (layer.weight != 0).reshape(layer.out_features, -1, 4).sum(-1)
            assert int(groups.max()) <= 2, name
            assert (layer.weight == 0).float().mean() >= 0.5


@pytest.mark.parametrize("target", [(0.5, None), (None, "2:4")])
def test_sparsegpt_reconstructs_each_layer_better_than_magnitude_and_wanda(target):
    """SparseGPT minimises ||W X - W' X|| over the calibration inputs; masking alone cannot do better. Checked
    on the first block, whose inputs are the same for every method."""
    dense, data = tiny(), batches(6)
    sparsity = Sparsity.parse(*target)
    errors = {}
    for method in METHODS:
        pruned = copy.deepcopy(dense)
        prune_model(pruned, method, sparsity, data)
        errors[method] = {
            name: reconstruction_error(
                dense.get_submodule(name).weight, pruned.get_submodule(name).weight, layer_inputs(dense, name, data)
            )
            for name in prunable_layers(dense)["blocks.0"]
        }
    for name, sparsegpt in errors["sparsegpt"].items():
        assert sparsegpt < errors["wanda"][name], (name, errors)
        assert sparsegpt < errors["magnitude"][name], (name, errors)


def test_sparsegpt_with_sparsity_zero_changes_nothing():
    layer = nn.Linear(16, 8)
    stats = InputStatistics(16, hessian=True, device=torch.device("cpu"))
    stats.add(torch.randn(64, 16))
    assert torch.allclose(METHODS["sparsegpt"].prune(layer.weight.data, stats, Sparsity.parse(0.0, None)), layer.weight)


@pytest.mark.parametrize(
    ("sparsity", "pattern", "message"),
    [
        (1.0, None, "--sparsity 1.0 must be a fraction in [0, 1)"),
        (-0.1, None, "--sparsity -0.1 must be a fraction"),
        (None, "4:2", "is not N:M with 0 < N < M"),
        (None, "two:four", "is not N:M"),
        (None, None, "give one of --sparsity"),
        (0.5, "2:4", "give one of --sparsity"),
    ],
)
def test_bad_sparsity_is_one_clear_error(sparsity, pattern, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        Sparsity.parse(sparsity, pattern)


def test_too_little_calibration_text_is_refused():
    with pytest.raises(ValueError, match="too little calibration data: 10 tokens"):
        calibration_batches(torch.arange(10), 4, 32)


def test_one_pass_calibration_prunes_the_first_block_as_the_sequential_one():
    """Block 0 sees the dense embeddings either way; later blocks see pruned inputs only when sequential."""
    dense, data = tiny(), batches()
    one, two = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_model(one, "sparsegpt", Sparsity.parse(0.5, None), data, sequential=False)
    prune_model(two, "sparsegpt", Sparsity.parse(0.5, None), data, sequential=True)
    for name in prunable_layers(dense)["blocks.0"]:
        torch.testing.assert_close(one.get_submodule(name).weight, two.get_submodule(name).weight)
    assert not torch.equal(one.blocks[1].ffn.down.weight, two.blocks[1].ffn.down.weight)


def prune_with_a_forward_per_block(model: nn.Module, method: str, sparsity: Sparsity, data: list[torch.Tensor]):
    """The sequential scheme done the slow, obvious way: each block's inputs come from a forward pass of the
    whole model, earlier blocks already pruned."""
    pruner = METHODS[method]
    for layers in prunable_layers(model).values():
        stats = input_statistics(model, layers, data, pruner.needs_hessian)
        for name, layer in layers.items():
            with torch.no_grad():
                layer.weight.copy_(pruner.prune(layer.weight.data, stats[name], sparsity))


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny", "bert-tiny", "t5-tiny", "transformer-tiny"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_chained_block_inputs_prune_as_a_forward_pass_per_block(preset, method):
    """Blocks fed the previous pruned block's kept output prune exactly as blocks fed a fresh forward pass:
    every family, encoder-decoders included (the decoder's first block reads the pruned encoder's memory)."""
    torch.manual_seed(0)
    dense = build_model(preset, n_layer=3, vocab_size=256).eval()
    data, sparsity = batches(), Sparsity.parse(0.5, None)
    chained, reference = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_model(chained, method, sparsity, data, sequential=True)
    prune_with_a_forward_per_block(reference, method, sparsity, data)
    names = [n for layers in prunable_layers(dense).values() for n in layers]
    assert len(prunable_layers(dense)) >= 3
    for name in names:
        torch.testing.assert_close(chained.get_submodule(name).weight, reference.get_submodule(name).weight)
    last = names[-1]  # the reference is really sequential: the last layer differs from the one-pass result
    one_pass = copy.deepcopy(dense)
    prune_model(one_pass, method, sparsity, data, sequential=False)
    assert not torch.equal(one_pass.get_submodule(last).weight, reference.get_submodule(last).weight)


def test_dense_target_weight_is_the_dampened_least_squares_fit_to_the_dense_outputs():
    """W* minimises (2/n) ||W D - V X||^2 + lambda ||V - W||^2 (lambda: SparseGPT's dampening): the fit to what
    the dense layer gives, shrunk toward W only where the inputs say little. torch.linalg.lstsq on the stacked
    system is the oracle."""
    generator = torch.Generator().manual_seed(0)
    n, d_in, d_out = 200, 12, 5
    dense_inputs = torch.randn(n, d_in, generator=generator, dtype=torch.float64).float()
    inputs = dense_inputs + 0.3 * torch.randn(n, d_in, generator=generator)  # what damaged blocks below pass up
    weight = torch.randn(d_out, d_in, generator=generator)
    stats = InputStatistics(d_in, hessian=True, device=torch.device("cpu"), cross=True)
    for rows in (slice(0, 64), slice(64, 200)):  # two batches: the running means
        stats.add(inputs[rows], dense=dense_inputs[rows])
    fitted = dense_target_weight(weight, stats)

    lam = SPARSEGPT_DAMPENING * float(stats.hessian.diagonal().mean())
    x, d, w = inputs.double(), dense_inputs.double(), weight.double()
    scale = (2 / n) ** 0.5
    a = torch.cat([scale * x, lam**0.5 * torch.eye(d_in, dtype=torch.float64)])
    b = torch.cat([scale * d @ w.T, lam**0.5 * w.T])
    oracle = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(fitted.double(), oracle, atol=1e-4, rtol=1e-4)
    # undamaged inputs: the layer is already the best fit to itself
    same = InputStatistics(d_in, hessian=True, device=torch.device("cpu"), cross=True)
    same.add(dense_inputs, dense=dense_inputs)
    torch.testing.assert_close(dense_target_weight(weight, same), weight, atol=1e-5, rtol=1e-5)


def output_error(model: nn.Module, dense: nn.Module, name: str, data: list[torch.Tensor]) -> float:
    """||W' X - W D|| / ||W D||: layer `name` of `model` on its inputs X against the dense layer on its own D."""
    seen = {}
    for key, m in (("pruned", model), ("dense", dense)):
        layer, forward, outputs = m.get_submodule(name), calibration_forward(m), []
        hook = layer.register_forward_hook(lambda _m, _a, out, outputs=outputs: outputs.append(out.detach()))
        with torch.no_grad():
            for ids in data:
                forward(ids)
        hook.remove()
        seen[key] = torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs])
    return float((seen["pruned"] - seen["dense"]).norm() / seen["dense"].norm())


@pytest.mark.parametrize("preset", ["llama-tiny", "t5-tiny"])
def test_dense_targets_bring_each_pruned_layer_closer_to_the_dense_outputs(preset):
    """With dense targets every pruned layer but the first of each stack (which reads the embeddings, untouched by
    pruning, and prunes exactly as without) reproduces the dense model's output of that layer better than SparseGPT
    fitted to its own output on the damaged inputs. Encoder-decoders too (the decoder reads the dense memory)."""
    torch.manual_seed(0)
    dense = build_model(preset, n_layer=2, vocab_size=256).eval()
    data, sparsity = batches(6), Sparsity.parse(0.5, None)
    plain, targeted = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_model(plain, "sparsegpt", sparsity, data)
    prune_model(targeted, "sparsegpt", sparsity, data, dense_targets=True)
    names = [name for layers in prunable_layers(dense).values() for name in layers]
    firsts = [name for name in names if name.endswith("blocks.0.attn.qkv")]  # each stack's first: embeddings
    assert len(firsts) == (2 if preset == "t5-tiny" else 1)
    for name in firsts:
        torch.testing.assert_close(plain.get_submodule(name).weight, targeted.get_submodule(name).weight)
    for name in [name for name in names if name not in firsts]:
        errors = {label: output_error(m, dense, name, data) for label, m in (("plain", plain), ("dense", targeted))}
        assert errors["dense"] < errors["plain"], (name, errors)
        assert (targeted.get_submodule(name).weight == 0).float().mean() >= 0.5


def test_dense_targets_need_sparsegpt_block_by_block():
    with pytest.raises(ValueError, match=r"--dense-targets .* \(not --method wanda\)"):
        prune_model(tiny(), "wanda", Sparsity.parse(0.5, None), batches(), dense_targets=True)
    with pytest.raises(ValueError, match=r"\(not --method sparsegpt --one-pass\)"):
        prune_model(tiny(), "sparsegpt", Sparsity.parse(0.5, None), batches(), sequential=False, dense_targets=True)


@pytest.mark.parametrize("target", [(0.5, None), (None, "2:4")])
def test_refined_blocks_keep_their_zeros_and_end_closer_to_the_dense_model(target):
    """Block-wise refinement trains only the weights kept: every zero of SparseGPT's mask stays (the first
    block's mask is the unrefined one's; 2:4 stays 2:4), and each block's output on the calibration text ends
    closer to the dense model's than SparseGPT's layer-by-layer solution left it, and so do the logits."""
    dense, data = tiny(), batches(6)
    sparsity = Sparsity.parse(*target)
    plain, refined = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_model(plain, "sparsegpt", sparsity, data)
    prune_model(refined, "sparsegpt", sparsity, data, refine=Refinement(epochs=4, lr=1e-3))
    for name in [n for layers in prunable_layers(dense).values() for n in layers]:
        weight = refined.get_submodule(name).weight
        assert not torch.equal(weight, plain.get_submodule(name).weight), name
        if sparsity.structured:
            assert int((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1).max()) <= 2, name
        else:
            assert (weight == 0).float().mean() >= 0.5, name
        if name.startswith("blocks.0."):  # the same inputs, so the same mask as without refinement
            assert torch.equal(weight == 0, plain.get_submodule(name).weight == 0), name
    assert all(p.requires_grad for p in refined.parameters())  # the model is left as it was found
    assert all(p.grad is None for p in refined.parameters())
    for name in ("blocks.0", "blocks.1"):
        errors = {label: output_error(m, dense, name, data) for label, m in (("plain", plain), ("refined", refined))}
        assert errors["refined"] < errors["plain"], (name, errors)
    with torch.no_grad():
        logits = {
            label: torch.cat([m(ids).logits for ids in data])
            for label, m in (("d", dense), ("p", plain), ("r", refined))
        }
    assert (logits["r"] - logits["d"]).norm() < (logits["p"] - logits["d"]).norm()


def test_refinement_needs_calibration_and_a_positive_schedule():
    with pytest.raises(ValueError, match=r"--refine-epochs .* \(not --method magnitude\)"):
        prune_model(tiny(), "magnitude", Sparsity.parse(0.5, None), batches(), refine=Refinement(2))
    with pytest.raises(ValueError, match=r"--refine-epochs 0 must be at least 1"):
        Refinement(0)
    with pytest.raises(ValueError, match=r"--refine-lr -0.1 must be a positive number"):
        Refinement(2, -0.1)
