"""docs/attention-by-hand.md must agree with lmforge's modules, number for number.

The page's numbers are computed in plain Python by docs/attention_by_hand.py. Here we read the inputs
(X, W_Q, W_K, W_V, W_O, gamma, beta) back from the page, run them through `reference_attention`,
`sdpa_attention`, `Attention`, `build_attention_bias`, `LayerNorm`, `RMSNorm` and `Block`, and compare
with every other matrix on the page. A page number with 4 decimals is rounded, so it may be off by
5e-5; a shorter one is exact. Attention weights are read from the attention functions by passing the
identity matrix as V: softmax(.) @ I is the weights themselves.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn import LayerNorm, RMSNorm
from lmforge.nn.attention import Attention, build_attention_bias, reference_attention, sdpa_attention
from lmforge.nn.block import Block

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGE_TEXT = (DOCS / "attention-by-hand.md").read_text()
INPUTS = {"X", "W_Q", "W_K", "W_V", "W_O", "gamma", "beta"}
ROUNDED_TOL, EXACT_TOL = 5e-5 + 2e-6, 1e-5  # half a unit in the 4th decimal, plus fp32 slack
BLOCK = re.compile(r"^```text\n(\w+) = .*\n((?:\[.*\]\n)+)```$", re.MULTILINE)
ATTENTION_FNS = {"reference_attention": reference_attention, "sdpa_attention": sdpa_attention}


def parse_page(text: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """label -> (values, tolerance per value) for every `label = ...` block of bracketed rows."""
    blocks = {}
    for label, body in BLOCK.findall(text):
        assert label not in blocks, f"label {label} appears twice on the page"
        rows = [line.strip("[] ").split() for line in body.splitlines()]
        values = torch.tensor([[float(t) for t in row] for row in rows], dtype=torch.float64)
        rounded = [[bool(re.fullmatch(r"-?\d+\.\d{4}", t)) for t in row] for row in rows]
        tol = torch.where(torch.tensor(rounded), ROUNDED_TOL, EXACT_TOL).double()
        blocks[label] = (values, tol)
    return blocks


PAGE = parse_page(PAGE_TEXT)


def page(label: str) -> torch.Tensor:
    return PAGE[label][0].float()


def load_script():
    spec = importlib.util.spec_from_file_location("attention_by_hand", DOCS / "attention_by_hand.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def attention(n_head: int, implementation: str, w_o: torch.Tensor | None = None) -> Attention:
    """Our Attention with the page's weights. nn.Linear computes x W^T, so it stores the transposes."""
    attn = Attention(4, n_head, bias=False, implementation=implementation).eval()
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.cat([page("W_Q").T, page("W_K").T, page("W_V").T]))
        attn.out.weight.copy_((page("W_O") if w_o is None else w_o).T)
    return attn


def layer_norm(gamma: torch.Tensor, beta: torch.Tensor) -> LayerNorm:
    norm = LayerNorm(4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(gamma)
        norm.bias.copy_(beta)
    return norm


def split_heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    return t.view(1, 3, n_head, 4 // n_head).transpose(1, 2)  # (1, H, T, d_head), as Attention does


@functools.cache
@torch.no_grad()
def computed() -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Every derived page label -> [(how it was computed, tensor)] using lmforge modules."""
    out: dict[str, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    x = page("X")[None]  # (1, T=3, d_model=4)
    eye = torch.eye(3)

    # projections: the fused qkv Linear of our Attention
    q, k, v = attention(1, "reference").qkv(x).split(4, dim=-1)
    for label, t in (("Q", q), ("K", k), ("V", v)):
        out[label].append(("Attention.qkv", t))

    # 1. single head
    s = q @ k.transpose(-2, -1)
    out["S"].append(("Q @ K^T", s))
    out["S_scaled"].append(("Q @ K^T / sqrt(4)", s / 2))
    out["E"].append(("torch.exp", torch.exp(s / 2)))
    out["E_sum"].append(("torch.exp(.).sum", torch.exp(s / 2).sum(-1)))
    bias, _ = build_attention_bias(torch.ones(1, 3), 3, 3, causal=True, dtype=torch.float32)
    out["S_causal"].append(("S_scaled + build_attention_bias", s / 2 + bias))
    q1, k1, v1 = (split_heads(t, 1) for t in (q, k, v))
    for name, fn in ATTENTION_FNS.items():
        out["A"].append((f"{name}(V=I)", fn(q1, k1, eye)))
        out["Z"].append((name, fn(q1, k1, v1)))
        out["A_causal"].append((f"{name}(V=I, is_causal)", fn(q1, k1, eye, is_causal=True)))
        out["Z_causal"].append((f"{name}(is_causal)", fn(q1, k1, v1, is_causal=True)))
        out["Z_causal"].append((f"{name}(mask=build_attention_bias)", fn(q1, k1, v1, mask=bias)))
    for impl in ("reference", "sdpa"):
        single = attention(1, impl, w_o=torch.eye(4))  # W_O = I: the module returns A V itself
        out["Z"].append((f"Attention(n_head=1, {impl})", single(x)))
        out["Z_causal"].append((f"Attention(n_head=1, {impl}, is_causal)", single(x, is_causal=True)))
        out["Z_causal"].append((f"Attention(n_head=1, {impl}, mask)", single(x, mask=bias)))

    # 2. two heads of width 2
    q2, k2, v2 = (split_heads(t, 2) for t in (q, k, v))
    scores = q2 @ k2.transpose(-2, -1) / math.sqrt(2)
    for h in (1, 2):
        out[f"S{h}_scaled"].append(("Q_h @ K_h^T / sqrt(2)", scores[0, h - 1]))
    for name, fn in ATTENTION_FNS.items():
        weights, heads = fn(q2, k2, eye.expand(1, 2, 3, 3)), fn(q2, k2, v2)
        for h in (1, 2):
            out[f"A{h}"].append((f"{name}(V=I)", weights[0, h - 1]))
            out[f"Z{h}"].append((name, heads[0, h - 1]))
        out["Z_concat"].append((f"{name}, heads concatenated", heads.transpose(1, 2).reshape(1, 3, 4)))
    for impl in ("reference", "sdpa"):
        concat = attention(2, impl, w_o=torch.eye(4))(x)  # W_O = I: the module returns the concatenation
        out["Z_concat"].append((f"Attention(n_head=2, {impl}) with W_O = I", concat))
        mha = attention(2, impl)
        out["MHA"].append((f"Attention(n_head=2, {impl})", mha(x)))
        out["H"].append((f"x + Attention(n_head=2, {impl})(x)", x + mha(x)))

        # 3. post-norm residual: Block's attention sublayer; a zero FFN and Identity norm make the
        # second sublayer pass its input through unchanged
        ffn = nn.Linear(4, 4)
        nn.init.zeros_(ffn.weight)
        nn.init.zeros_(ffn.bias)
        block = Block(mha, layer_norm(page("gamma")[0], page("beta")[0]), ffn, nn.Identity(), prenorm=False)
        out["Y"].append((f"Block(prenorm=False, {impl})", block.eval()(x)))

    h = x + attention(2, "reference")(x)  # not the page's rounded H: 1/std would amplify its rounding
    out["H_mean"].append(("H.mean", h.mean(-1)))
    out["H_var"].append(("H.var(unbiased=False)", h.var(-1, unbiased=False)))
    out["H_hat"].append(("LayerNorm(gamma=1, beta=0)", layer_norm(torch.ones(4), torch.zeros(4))(h)))
    out["Y"].append(("LayerNorm(gamma, beta)", layer_norm(page("gamma")[0], page("beta")[0])(h)))
    out["H_l2norm"].append(("torch.linalg.vector_norm", torch.linalg.vector_norm(h, dim=-1)))
    out["H_over_l2"].append(("F.normalize", F.normalize(h, dim=-1)))
    out["H_rms"].append(("sqrt(mean(h^2) + eps)", (h.pow(2).mean(-1) + 1e-5).sqrt()))
    out["H_rmsnorm"].append(("RMSNorm(eps=1e-5)", RMSNorm(4, eps=1e-5)(h)))
    return dict(out)


def assert_matches_page(label: str, how: str, actual: torch.Tensor) -> None:
    expected, tol = PAGE[label]
    actual = actual.double().reshape(expected.shape)
    hidden = expected == -math.inf  # masked scores: lmforge uses the most negative finite float
    assert (actual[hidden] < -1e30).all(), f"{label} via {how}: masked entries are not hidden"
    err = (actual - expected).abs()[~hidden]
    assert (err <= tol[~hidden]).all(), f"{label} via {how}: max error {err.max():.2e}\n{actual}\n{expected}"


def test_page_is_what_the_script_generates():
    assert load_script().render() == PAGE_TEXT, "docs are stale: run `python docs/attention_by_hand.py`"


def test_every_number_on_the_page_is_checked():
    assert set(PAGE) - INPUTS == set(computed()), "every derived block needs a check, and vice versa"
    assert set(PAGE) >= INPUTS


@pytest.mark.parametrize("label", sorted(set(PAGE) - INPUTS))
def test_page_matches_lmforge(label):
    for how, actual in computed()[label]:
        assert_matches_page(label, how, actual)


def test_l2_shortcut_is_not_layernorm():
    l2, ln = page("H_over_l2"), page("H_hat")
    assert (l2 - ln).abs().max() > 0.5
    assert torch.allclose(l2.norm(dim=-1), torch.ones(3), atol=1e-3)  # unit length, mean left in
    assert (l2.mean(-1) > 0.2).all()
    assert torch.allclose(ln.mean(-1), torch.zeros(3), atol=1e-3)  # centred, unit variance
    assert torch.allclose(ln.norm(dim=-1), torch.full((3,), 2.0), atol=1e-3)


def test_scaling_keeps_logit_variance_near_one():
    """With unit-variance independent entries, q . k has variance d_k; dividing by sqrt(d_k) gives 1."""
    d_k = 64
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(100_000, d_k, generator=g), torch.randn(100_000, d_k, generator=g)
    logits = (q * k).sum(-1)
    assert abs(logits.var().item() / d_k - 1) < 0.03
    assert abs((logits / math.sqrt(d_k)).var().item() - 1) < 0.03
