import copy
import io
import math

import pytest
import torch
from torch import nn
from transformers import optimization as hf_optimization

from lmforge import build_model
from lmforge.train.optim import (
    Muon,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    lr_at,
    newton_schulz_orthogonalize,
    parameter_roles,
)

SMALL = dict(n_layer=2, d_model=32, n_head=2, vocab_size=64, d_ff=48, max_seq_len=16)


def tiny(name="gpt-tiny", **overrides):
    torch.manual_seed(0)
    return build_model(name, **{**SMALL, **overrides})


def groups_by_role(optimizer):
    return {g["role"]: g for g in optimizer.param_groups}


def names_of(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("name", "sgd", "optimizer name='sgd'"),
        ("schedule", "step", "schedule='step'"),
        ("lr", 0.0, "lr=0.0"),
        ("min_lr", 1.0, "min_lr=1.0"),
        ("beta2", 1.0, "beta2=1.0"),
        ("warmup_steps", -1, "warmup_steps=-1"),
        ("decay_fraction", 1.5, "decay_fraction=1.5"),
        ("grad_clip", -1.0, "grad_clip=-1.0"),
        ("muon_ns_steps", 0, "muon_ns_steps=0"),
        ("muon_ns_steps", 2.5, "muon_ns_steps=2.5"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        OptimConfig(**{field: value})


# ---------------------------------------------------------------- AdamW groups


def test_adamw_decays_linear_weights_only_and_tied_head_appears_once():
    model = tiny("gpt-tiny")  # lm_head.weight is tok_emb.weight
    assert model.lm_head.weight is model.tok_emb.weight
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW)
    groups = groups_by_role(opt)
    all_params = [p for g in opt.param_groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    linear_weights.discard("lm_head.weight")  # the tied head is the embedding
    assert names_of(model, groups["decay"]["params"]) == linear_weights
    no_decay = names_of(model, groups["no_decay"]["params"])
    assert {"tok_emb.weight", "pos_emb.weight", "norm.weight", "norm.bias", "blocks.0.attn.qkv.bias"} <= no_decay
    assert all(p.ndim == 1 or n.endswith("emb.weight") for n, p in model.named_parameters() if n in no_decay)
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0


def test_untied_output_head_is_decayed_like_a_linear_layer():
    model = tiny("llama-tiny", tie_embeddings=False, n_kv_heads=1)
    groups = groups_by_role(build_optimizer(model, OptimConfig()))
    assert "lm_head.weight" in names_of(model, groups["decay"]["params"])
    assert "tok_emb.weight" in names_of(model, groups["no_decay"]["params"])


def test_adamw_matches_torch_adamw_with_hand_built_groups():
    model = tiny()
    reference = copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, beta1=0.8, beta2=0.9, eps=1e-6)
    opt = build_optimizer(model, cfg)
    decay = [p for n, p in reference.named_parameters() if n in names_of(model, groups_by_role(opt)["decay"]["params"])]
    rest = [p for p in reference.parameters() if all(p is not q for q in decay)]
    ref_opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-2, betas=(0.8, 0.9), eps=1e-6,
    )  # fmt: skip
    x = torch.randint(0, 64, (2, 16))
    for m, o in ((model, opt), (reference, ref_opt)):
        for _ in range(3):
            m(x, labels=x).loss.backward()
            o.step()
            o.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


# ---------------------------------------------------------------- Muon


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_newton_schulz_approximates_the_orthogonal_polar_factor(dtype):
    """In fp32 and in bf16 (the default on GPUs and on CPUs with native bf16 products) alike."""
    torch.manual_seed(0)
    for shape in ((32, 64), (64, 32), (48, 48), (256, 1024)):
        g = torch.randn(*shape)
        o = newton_schulz_orthogonalize(g, dtype=dtype)
        assert o.dtype == g.dtype
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        polar = u @ vh  # the exact U V^T
        singular = torch.linalg.svdvals(o)
        # the quintic's coefficients trade exactness for speed: singular values land in about [0.7, 1.2]
        assert singular.min() > 0.6 and singular.max() < 1.25, singular
        cosine = (o * polar).sum() / (o.norm() * polar.norm())
        assert cosine > 0.98
        assert o.shape == g.shape


def test_muon_step_follows_the_published_update():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 4))
    lr, mu, wd = 0.05, 0.9, 0.1
    opt = Muon([{"params": [w], "use_muon": True}], lr=lr, momentum=mu, weight_decay=wd)
    expected = w.detach().clone()
    buf = torch.zeros_like(expected)
    for _ in range(3):
        grad = torch.randn(8, 4)
        w.grad = grad.clone()
        opt.step()
        buf = mu * buf + (1 - mu) * grad
        nesterov = (1 - mu) * grad + mu * buf
        update = newton_schulz_orthogonalize(nesterov)
        expected = expected * (1 - lr * wd) - lr * math.sqrt(8 / 4) * update
        torch.testing.assert_close(w.detach(), expected)


def test_muon_uses_muon_for_hidden_matrices_and_adamw_matching_torch_for_the_rest():
    model = tiny("llama-tiny", tie_embeddings=False, n_kv_heads=1)
    reference = copy.deepcopy(model)
    cfg = OptimConfig(name="muon", lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, Muon)
    groups = groups_by_role(opt)
    muon_names = names_of(model, groups["muon"]["params"])
    roles = parameter_roles(model)
    assert muon_names == {n for n, r in roles.items() if r == "matrix"}
    assert muon_names and all(".attn." in n or ".ffn." in n for n in muon_names)
    adam_names = {n for n, _ in model.named_parameters()} - muon_names
    assert {"tok_emb.weight", "lm_head.weight", "norm.weight"} <= adam_names
    assert groups["muon"]["lr"] == cfg.muon_lr
    assert groups["muon"]["ns_steps"] == 5
    fewer = groups_by_role(build_optimizer(copy.deepcopy(model), OptimConfig(name="muon", muon_ns_steps=3)))
    assert fewer["muon"]["ns_steps"] == 3  # what each update's newton_schulz_orthogonalize runs

    # the AdamW part steps exactly like torch.optim.AdamW on the same parameters and gradients
    ref_named = dict(reference.named_parameters())
    decay_names = names_of(model, groups["decay"]["params"])
    ref_opt = torch.optim.AdamW(
        [{"params": [ref_named[n] for n in sorted(adam_names & decay_names)], "weight_decay": 0.1},
         {"params": [ref_named[n] for n in sorted(adam_names - decay_names)], "weight_decay": 0.0}],
        lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False,
    )  # fmt: skip
    x = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        model(x, labels=x).loss.backward()
        for n, p in reference.named_parameters():
            p.grad = dict(model.named_parameters())[n].grad.clone()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        # keep the hidden matrices equal so the next gradients agree
        with torch.no_grad():
            for n in muon_names:
                ref_named[n].copy_(dict(model.named_parameters())[n])
    for n, p in model.named_parameters():
        if n in adam_names:
            torch.testing.assert_close(p, ref_named[n], msg=n)


def test_muon_trains_a_tiny_model():
    model = tiny()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=3e-3, muon_lr=0.02, weight_decay=0.0))
    x = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(15):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_state_dict_round_trip_continues_identically(name):
    cfg = OptimConfig(name=name, warmup_steps=2)
    x = torch.randint(0, 64, (2, 16))

    def train(model, opt, sched, steps):
        for _ in range(steps):
            model(x, labels=x).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    model = tiny()
    opt, sched = build_optimizer(model, cfg), None
    sched = build_scheduler(opt, cfg, max_steps=10)
    train(model, opt, sched, 3)
    buffers = [io.BytesIO(), io.BytesIO()]
    torch.save(opt.state_dict(), buffers[0])
    torch.save(sched.state_dict(), buffers[1])
    resumed_model = copy.deepcopy(model)
    train(model, opt, sched, 3)

    resumed_opt = build_optimizer(resumed_model, cfg)
    resumed_sched = build_scheduler(resumed_opt, cfg, max_steps=10)
    for b in buffers:
        b.seek(0)
    resumed_opt.load_state_dict(torch.load(buffers[0], weights_only=True))
    resumed_sched.load_state_dict(torch.load(buffers[1], weights_only=True))
    train(resumed_model, resumed_opt, resumed_sched, 3)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in resumed_opt.param_groups]


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedule_boundaries(schedule):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule=schedule, decay_fraction=0.2)
    assert lr_at(0, cfg, 100) == 0.0
    assert lr_at(5, cfg, 100) == pytest.approx(5e-4)
    assert lr_at(10, cfg, 100) == pytest.approx(1e-3)
    final = 1e-3 if schedule == "constant" else 1e-4
    assert lr_at(100, cfg, 100) == pytest.approx(final)
    assert lr_at(1000, cfg, 100) == pytest.approx(final)
    rates = [lr_at(s, cfg, 100) for s in range(10, 101)]
    assert all(a >= b - 1e-15 for a, b in zip(rates, rates[1:], strict=False))  # never increases after warmup
    if schedule == "cosine":
        assert lr_at(55, cfg, 100) == pytest.approx((1e-3 + 1e-4) / 2)
    if schedule == "linear":
        assert lr_at(55, cfg, 100) == pytest.approx((1e-3 + 1e-4) / 2)
    if schedule == "wsd":
        assert lr_at(80, cfg, 100) == pytest.approx(1e-3)  # stable until the last 20% of steps
        assert lr_at(90, cfg, 100) == pytest.approx((1e-3 + 1e-4) / 2)


def hf_rates(factory, steps, **kwargs):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = factory(opt, **kwargs)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize(
    "schedule, min_lr, warmup, factory, kwargs",
    [
        ("cosine", 1e-4, 7, hf_optimization.get_cosine_with_min_lr_schedule_with_warmup,
         dict(num_warmup_steps=7, num_training_steps=50, min_lr=1e-4)),
        ("linear", 0.0, 7, hf_optimization.get_linear_schedule_with_warmup,
         dict(num_warmup_steps=7, num_training_steps=50)),
        ("constant", 1e-4, 7, hf_optimization.get_constant_schedule_with_warmup, dict(num_warmup_steps=7)),
        ("wsd", 0.0, 7, hf_optimization.get_wsd_schedule,
         dict(num_warmup_steps=7, num_decay_steps=10, num_training_steps=50, decay_type="linear")),
        ("wsd", 1e-4, 0, hf_optimization.get_wsd_schedule,
         dict(num_warmup_steps=0, num_decay_steps=10, num_training_steps=50, decay_type="linear", min_lr_ratio=0.1)),
    ],
)  # fmt: skip
def test_schedules_match_transformers(schedule, min_lr, warmup, factory, kwargs):
    cfg = OptimConfig(lr=1e-3, min_lr=min_lr, warmup_steps=warmup, schedule=schedule, decay_fraction=0.2)
    ours = hf_rates(lambda opt: build_scheduler(opt, cfg, max_steps=50), 51)
    theirs = hf_rates(lambda opt: factory(opt, **kwargs), 51)
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[:50] == pytest.approx([lr_at(s, cfg, 50) for s in range(50)], abs=1e-15)


def test_scheduler_scales_muon_group_with_the_same_shape():
    cfg = OptimConfig(name="muon", lr=1e-3, min_lr=1e-4, muon_lr=0.02, warmup_steps=4)
    opt = build_optimizer(tiny(), cfg)
    sched = build_scheduler(opt, cfg, max_steps=20)
    for step in range(20):
        groups = groups_by_role(opt)
        assert groups["no_decay"]["lr"] == pytest.approx(lr_at(step, cfg, 20))
        assert opt.param_groups[0]["lr"] == groups["no_decay"]["lr"]  # the AdamW lr comes first (what logs show)
        assert groups["muon"]["lr"] == pytest.approx(lr_at(step, cfg, 20) * 0.02 / 1e-3)
        opt.step()
        sched.step()


def test_l1_subgradient_is_the_gradient_of_the_penalty_on_decayed_weights():
    from lmforge.train.optim import add_l1_subgradient

    model = tiny("llama-tiny", tie_embeddings=False, n_kv_heads=1)
    optimizer = build_optimizer(model, OptimConfig(l1=0.01))
    decayed = groups_by_role(optimizer)["decay"]["params"]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    add_l1_subgradient(optimizer, 0.01)
    penalty = 0.01 * sum(p.abs().sum() for p in decayed)  # what backpropagating lambda sum|w| would add
    expected = torch.autograd.grad(penalty, decayed)
    for p, g in zip(decayed, expected, strict=True):
        torch.testing.assert_close(p.grad, g)
    decayed_ids = {id(p) for p in decayed}
    assert all(not p.grad.any() for p in model.parameters() if id(p) not in decayed_ids)  # norms, embeddings
