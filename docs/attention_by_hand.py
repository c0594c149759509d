"""Generate docs/attention-by-hand.md: attention, multi-head attention and LayerNorm on 3 tokens.

Every number on the page is computed here in plain Python (lists and `math`, no torch), so the page is
an honest hand computation. `tests/test_docs_by_hand.py` parses the numbers back from the page and
recomputes them with lmforge's own modules, so the page, this script and the code cannot drift apart.

    python docs/attention_by_hand.py            # rewrite docs/attention-by-hand.md
    python docs/attention_by_hand.py --check    # exit 1 if the page is stale

Conventions (the paper's): rows are tokens, a projection is x W with W of shape (d_in, d_out).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

PAGE = Path(__file__).with_name("attention-by-hand.md")

Matrix = list[list[float]]

# The example. X holds the three 4-dimensional inputs of the classic illustrated self-attention tutorial.
X: Matrix = [[1, 0, 1, 0], [0, 2, 0, 2], [1, 1, 1, 1]]
W_Q: Matrix = [[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]]
W_K: Matrix = [[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
W_V: Matrix = [[0, 2, 0, 1], [0, 1, 0, 0], [1, 0, 0, 1], [1, 0, 1, 0]]
W_O: Matrix = [[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5], [0.5, 0, -0.5, 0], [0, 0.5, 0, -0.5]]
GAMMA: list[float] = [2, 1, 1, 0.5]
BETA: list[float] = [0, 0.5, -0.5, 0]
EPS = 1e-5
N_HEAD = 2
BIG_D_K = 64  # the width used in the variance remark (GPT-2 and BERT-base heads)


def matmul(a: Matrix, b: Matrix) -> Matrix:
    return [[sum(x * y for x, y in zip(row, col, strict=True)) for col in zip(*b, strict=True)] for row in a]


def transpose(a: Matrix) -> Matrix:
    return [list(col) for col in zip(*a, strict=True)]


def columns(a: Matrix, lo: int, hi: int) -> Matrix:
    return [row[lo:hi] for row in a]


def scaled(a: Matrix, s: float) -> Matrix:
    return [[v * s for v in row] for row in a]


def exp(a: Matrix) -> Matrix:
    return [[math.exp(v) for v in row] for row in a]


def softmax_rows(a: Matrix) -> Matrix:
    """exp(s - max) / sum: subtracting the row max changes nothing mathematically and avoids overflow."""
    out = []
    for row in a:
        m = max(row)
        e = [math.exp(v - m) for v in row]  # exp(-inf) = 0: masked keys get weight 0
        out.append([v / sum(e) for v in e])
    return out


def causal(a: Matrix) -> Matrix:
    return [[v if j <= i else -math.inf for j, v in enumerate(row)] for i, row in enumerate(a)]


def row_stats(h: Matrix) -> tuple[list[float], list[float]]:
    means = [sum(row) / len(row) for row in h]
    variances = [sum((v - m) ** 2 for v in row) / len(row) for row, m in zip(h, means, strict=True)]  # biased: / d
    return means, variances


def compute() -> dict[str, Matrix]:
    """All the matrices on the page, by label."""
    d_model = len(X[0])
    d_head = d_model // N_HEAD
    v: dict[str, Matrix] = {"X": X, "W_Q": W_Q, "W_K": W_K, "W_V": W_V, "W_O": W_O}
    v["Q"], v["K"], v["V"] = matmul(X, W_Q), matmul(X, W_K), matmul(X, W_V)

    # 1. single head, d_k = d_model
    v["S"] = matmul(v["Q"], transpose(v["K"]))
    v["S_scaled"] = scaled(v["S"], 1 / math.sqrt(d_model))
    v["E"] = exp(v["S_scaled"])
    v["E_sum"] = [[sum(row)] for row in v["E"]]
    v["A"] = softmax_rows(v["S_scaled"])
    v["Z"] = matmul(v["A"], v["V"])
    v["S_causal"] = causal(v["S_scaled"])
    v["A_causal"] = softmax_rows(v["S_causal"])
    v["Z_causal"] = matmul(v["A_causal"], v["V"])

    # 2. multi-head: head h owns columns [h * d_head, (h + 1) * d_head) of Q, K and V
    heads = []
    for h in range(1, N_HEAD + 1):
        lo, hi = (h - 1) * d_head, h * d_head
        q, k, val = columns(v["Q"], lo, hi), columns(v["K"], lo, hi), columns(v["V"], lo, hi)
        v[f"S{h}_scaled"] = scaled(matmul(q, transpose(k)), 1 / math.sqrt(d_head))
        v[f"A{h}"] = softmax_rows(v[f"S{h}_scaled"])
        v[f"Z{h}"] = matmul(v[f"A{h}"], val)
        heads.append(v[f"Z{h}"])
    v["Z_concat"] = [sum(rows, []) for rows in zip(*heads, strict=True)]
    v["MHA"] = matmul(v["Z_concat"], W_O)

    # 3. residual + LayerNorm (post-norm, as in the original Transformer), then the two look-alikes
    v["H"] = [[a + b for a, b in zip(x, m, strict=True)] for x, m in zip(X, v["MHA"], strict=True)]
    means, variances = row_stats(v["H"])
    v["H_mean"], v["H_var"] = [[m] for m in means], [[s] for s in variances]
    v["H_hat"] = [
        [(x - m) / math.sqrt(s + EPS) for x in row] for row, m, s in zip(v["H"], means, variances, strict=True)
    ]
    v["gamma"], v["beta"] = [GAMMA], [BETA]
    v["Y"] = [[x * g + b for x, g, b in zip(row, GAMMA, BETA, strict=True)] for row in v["H_hat"]]
    norms = [math.sqrt(sum(x * x for x in row)) for row in v["H"]]
    v["H_l2norm"] = [[n] for n in norms]
    v["H_over_l2"] = [[x / n for x in row] for row, n in zip(v["H"], norms, strict=True)]
    rms = [math.sqrt(sum(x * x for x in row) / len(row) + EPS) for row in v["H"]]
    v["H_rms"] = [[r] for r in rms]
    v["H_rmsnorm"] = [[x / r for x in row] for row, r in zip(v["H"], rms, strict=True)]
    return v


def fmt(x: float) -> str:
    """Exact values print short (2, 0.5, -0.25); anything else is rounded to 4 decimals."""
    if x == -math.inf:
        return "-inf"
    for decimals in (0, 1, 2):
        if abs(x - round(x, decimals)) < 1e-9:
            return f"{round(x, decimals) + 0.0:.{decimals}f}"  # + 0.0 turns -0 into 0
    return f"{x:.4f}"


def block(label: str, formula: str, a: Matrix) -> str:
    """A fenced block the test reads back: first line `label = formula`, then one `[ ... ]` line per row."""
    cells = [[fmt(x) for x in row] for row in a]
    widths = [max(len(row[j]) for row in cells) for j in range(len(cells[0]))]
    lines = ["[ " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " ]" for row in cells]
    return "\n".join(["```text", f"{label} = {formula}", *lines, "```"])


def vec(a: Matrix, i: int) -> str:
    """Row i of a matrix as an inline vector."""
    return "[" + ", ".join(fmt(x) for x in a[i]) + "]"


TEMPLATE = """\
# Attention by hand

This page works through one Transformer sublayer on a tiny example, with every number written out:
single-head self-attention (with and without a causal mask), multi-head attention, and the residual
connection followed by LayerNorm. The numbers are generated by `docs/attention_by_hand.py` (plain
Python, no torch) and `tests/test_docs_by_hand.py` parses them back from this page and recomputes them
with lmforge's own modules, so the page cannot silently go wrong.

Conventions, as in the paper: **rows are tokens**, and a projection is `x W` with `W` of shape
`(d_in, d_out)`. Numbers with fewer than 4 decimals are exact; the others are rounded to 4 decimals.

## 0. The example

Three tokens with `d_model = {d_model}`, stacked as the rows of X (shape 3 x 4). These are the inputs
of the classic illustrated self-attention tutorial; any vectors would do.

{X}

## 1. Single-head self-attention

One head of width `d_k = d_model = {d_model}`:

```text
Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V,   Q = X W_Q,  K = X W_K,  V = X W_V
```

### 1.1 Queries, keys and values

Three learned matrices (4 x 4 here; we picked small integers) turn each token into a *query* (what it
is looking for), a *key* (what it offers to be found by) and a *value* (what it passes on if chosen).

{W_Q}

{W_K}

{W_V}

Each row of Q is a token times W_Q. For token 1, `{x1} W_Q = {q1}`: the entries of x that are 1 pick
out rows 1 and 3 of W_Q, and the result is their sum.

{Q}

{K}

{V}

### 1.2 Scores

Entry (i, j) of `Q K^T` is the dot product of query i with key j: how well token i's question matches
token j's offer. Row i will decide where token i looks.

{S}

For example `q1 . k3 = {q1} . {k3} = {s13}`.

### 1.3 Scaling by 1/sqrt(d_k)

We divide every score by `sqrt(d_k) = sqrt({d_model}) = {sqrt_d_model}`. Why: if the entries of q and
k are independent with mean 0 and variance 1, each product `q_i k_i` has variance 1, so the sum
`q . k` of d_k of them has **variance d_k**. With `d_k = {big_d_k}` the raw logits would have a standard
deviation of {big_std}, and a softmax over numbers that far apart is nearly one-hot, with almost zero
gradient. Dividing by `sqrt(d_k)` brings the logits' **variance back to about 1**, whatever the width.

{S_scaled}

### 1.4 Softmax, row by row

Softmax turns each row of scores into weights that are positive and sum to 1: exponentiate, then divide
by the row's sum.

{E}

{E_sum}

Row 1: `{e1} / {e1_sum} = {a1}`. Real code subtracts the row's maximum before exponentiating, which
gives the same weights without overflow.

{A}

Token 1 puts most weight ({a13}) on token 3, whose key matched its query best (score {ss13}).

### 1.5 Weighted sum of the values

Each output row is the weighted average of the value rows, with that row's weights:
`z1 = {a11} v1 + {a12} v2 + {a13} v3`, with `v1 = {v1}`, `v2 = {v2}`, `v3 = {v3}`.

{Z}

### 1.6 The causal mask

A language model predicts token i + 1 from tokens 1..i, so token i must not read later tokens: they
would give the answer away. The **causal mask** sets score (i, j) to -inf for every key j > i
*before* the softmax. exp(-inf) = 0, so those keys get weight exactly 0 and the remaining weights
still sum to 1 (masking the weights *after* the softmax would break that).

{S_causal}

{A_causal}

{Z_causal}

What changed: token 1 can only see itself, so its weights are `{ac1}` and its output is just
`v1 = {zc1}`; token 2 shares its attention between tokens 1 and 2 only. The last token already sees
everything, so its row is the same as without the mask. (lmforge writes the most negative finite
number instead of -inf, so a row whose keys are all hidden, such as a padding query, gives finite
values instead of NaN.)

## 2. Multi-head attention: 2 heads of width 2

Instead of one head of width 4, use `H = {n_head}` heads of width `d_head = d_model / H = {d_head}`.
We keep the same W_Q, W_K, W_V: head 1 owns columns 1-2 of Q, K and V, head 2 owns columns 3-4.
Each head attends on its own, with its own scale `1/sqrt(d_head) = 1/sqrt({d_head}) = {inv_sqrt_d_head}`,
so the two heads can look at different tokens for different reasons.

```text
head_h = softmax(Q_h K_h^T / sqrt(d_head)) V_h
MultiHead(X) = concat(head_1, ..., head_H) W_O
```

**Head 1** (columns 1-2). For example `q1 = {q1h1}`, `k2 = {k2h1}`, so score (1, 2) is
`{s12h1} / sqrt({d_head}) = {ss12h1}`.

{S1_scaled}

{A1}

{Z1}

**Head 2** (columns 3-4):

{S2_scaled}

{A2}

{Z2}

Head 1 makes token 1 look mostly at token 2 ({a12h1}); head 2 makes it split between tokens 1 and 3
({a11h2} each). A single head gives each token one set of weights; two heads give it two, each
computed from its own slice of the features.

**Concatenate** the head outputs side by side (head 1 in columns 1-2, head 2 in columns 3-4), then
**project** with the learned output matrix W_O (4 x 4), which mixes the heads: with this W_O, output
feature 1 is the mean of feature 1 of each head and output feature 3 is half their difference.

{Z_concat}

{W_O}

{MHA}

The cost is the same as one wide head: the same Q, K, V projections, cut into pieces.

## 3. Residual connection and LayerNorm

### 3.1 Residual

The sublayer's output is *added* to its input, so the layer only has to learn a correction to x, and
gradients flow straight through the sum in deep stacks. The original Transformer (post-norm) then
normalises: `LayerNorm(x + MultiHead(x))`.

{H}

### 3.2 LayerNorm, step by step

LayerNorm works on each token's vector separately, over its d_model = {d_model} features:

```text
mean = (1/d) sum_i h_i
var  = (1/d) sum_i (h_i - mean)^2          biased: divide by d, not d - 1
LayerNorm(h) = (h - mean) / sqrt(var + eps) * gamma + beta
```

with `eps = {eps}` (it only guards against dividing by zero). Per token:

{H_mean}

{H_var}

Token 1: mean `= sum({h1}) / {d_model} = {m1}`, and var `= {v1var}` (the average squared distance to
the mean). Subtract the mean and divide by the standard deviation `sqrt({v1var} + eps) = {std1}`: each
row of the result has mean 0 and variance 1 (a hair under 1, because of eps).

{H_hat}

Finally scale by gamma and shift by beta, two learned vectors of length d_model (initialised to 1 and
0; we use other values here so you can see them act), which let the model undo the normalisation
where it helps:

{gamma}

{beta}

{Y}

### 3.3 Dividing by the L2 norm is NOT LayerNorm

A common tutorial shortcut "normalises" with `h / ||h||`. That is **not LayerNorm**: LayerNorm
subtracts the mean and divides by the standard deviation, then scales by gamma and shifts by beta.
Dividing by the L2 norm `||h|| = sqrt(sum_i h_i^2)` leaves the mean in, divides by a different number
(`||h||^2 = d (var + mean^2)`, so `||h|| = sqrt(d) * std` only when the mean is 0; for token 1,
`||h|| = {l2n1}` but `sqrt(d) * std = {sqrt_d_std1}`), and has no gamma or beta. Compare with H_hat,
the LayerNorm rows before gamma and beta:

{H_l2norm}

{H_over_l2}

For token 1 the L2 version is `{l2_1}`: every entry is positive, its mean is {l2_mean1} rather than 0,
and its length is 1. LayerNorm gives `{hh1}`: mean 0, variance 1, so length `sqrt(d) = {sqrt_d_model}`,
and the feature that was smallest ({h14}) has become clearly negative. Only when a vector already has
mean 0 do the two agree, and even then up to the factor `sqrt(d)` (ignoring eps).

### 3.4 RMSNorm

RMSNorm (Zhang & Sennrich, 2019; used by Llama and T5) keeps only the rescaling: no mean subtraction
and no beta.

```text
RMSNorm(h) = h / sqrt(mean(h^2) + eps) * gamma,   mean(h^2) = (1/d) sum_i h_i^2
```

It is cheaper and works as well in practice. Ignoring eps, it is `sqrt(d) * h / ||h||`, so the L2
shortcut is, up to that factor, RMSNorm, not LayerNorm. With gamma = 1:

{H_rms}

{H_rmsnorm}

## Where this lives in lmforge

- `src/lmforge/nn/attention.py`: `reference_attention` writes `softmax(Q K^T * scale + M) V` out step
  by step, `sdpa_attention` calls PyTorch's fused kernel, and `Attention` is the multi-head module.
  `Attention` stores W_Q, W_K and W_V as one fused `qkv` `nn.Linear` and W_O as `out`. `nn.Linear`
  computes `x W^T` with its weight stored as (out, in), so to load this page's matrices set
  `qkv.weight = cat([W_Q^T, W_K^T, W_V^T])` (shape 12 x 4) and `out.weight = W_O^T`, biases off.
  `build_attention_bias` builds the causal and padding mask.
- `src/lmforge/nn/norm.py`: `LayerNorm` (weight = gamma, bias = beta) and `RMSNorm`.
- `src/lmforge/nn/block.py`: `Block` wires the residual connections, pre-norm
  (`x + Sublayer(Norm(x))`, GPT-2 and Llama) or post-norm (`Norm(x + Sublayer(x))`, this page,
  the original Transformer and BERT).

`tests/test_docs_by_hand.py` loads X and the weights from this page into those modules and checks
every matrix above against them. To change the example, edit `docs/attention_by_hand.py` and run
`python docs/attention_by_hand.py` to rewrite this page.
"""


def render() -> str:
    v = compute()
    d_model, d_head = len(X[0]), len(X[0]) // N_HEAD
    # the prose below describes these patterns in words; fail loudly if new numbers break them
    assert max(range(3), key=lambda j: v["A"][0][j]) == 2, "token 1 should attend most to token 3"
    assert max(range(3), key=lambda j: v["A1"][0][j]) == 1, "head 1: token 1 should attend most to token 2"
    assert abs(v["A2"][0][0] - v["A2"][0][2]) < 1e-12, "head 2: token 1 should split between tokens 1 and 3"
    assert min(v["H"][0]) == v["H"][0][3] and min(v["H_over_l2"][0]) > 0 > v["H_hat"][0][3]
    formulas = {
        "X": "the inputs, one token per row",
        "W_Q": "query weights (d_model x d_k)",
        "W_K": "key weights",
        "W_V": "value weights",
        "Q": "X W_Q",
        "K": "X W_K",
        "V": "X W_V",
        "S": "Q K^T",
        "S_scaled": f"Q K^T / sqrt({d_model})",
        "E": "exp(S_scaled)",
        "E_sum": "row sums of E",
        "A": "softmax(S_scaled), row-wise",
        "Z": "A V",
        "S_causal": "S_scaled with -inf where key j > query i",
        "A_causal": "softmax(S_causal), row-wise",
        "Z_causal": "A_causal V",
        "S1_scaled": f"Q_1 K_1^T / sqrt({d_head})",
        "A1": "softmax(S1_scaled)",
        "Z1": "A1 V_1",
        "S2_scaled": f"Q_2 K_2^T / sqrt({d_head})",
        "A2": "softmax(S2_scaled)",
        "Z2": "A2 V_2",
        "Z_concat": "concat(Z1, Z2)",
        "W_O": "output projection (H d_head x d_model)",
        "MHA": "Z_concat W_O",
        "H": "X + MHA",
        "H_mean": "mean of each row of H",
        "H_var": "biased variance of each row of H",
        "H_hat": "(H - H_mean) / sqrt(H_var + eps)",
        "gamma": "LayerNorm weight",
        "beta": "LayerNorm bias",
        "Y": "H_hat * gamma + beta = LayerNorm(X + MHA)",
        "H_l2norm": "||h|| of each row of H",
        "H_over_l2": "H / ||h||   (NOT LayerNorm)",
        "H_rms": "sqrt(mean(h^2) + eps) of each row of H",
        "H_rmsnorm": "RMSNorm(H) with gamma = 1",
    }
    fields = {label: block(label, formula, v[label]) for label, formula in formulas.items()}
    h_hat_mean1 = sum(v["H_over_l2"][0]) / d_model
    fields.update(
        d_model=d_model,
        d_head=d_head,
        n_head=N_HEAD,
        eps=f"{EPS:.0e}".replace("e-0", "e-"),
        sqrt_d_model=fmt(math.sqrt(d_model)),
        inv_sqrt_d_head=fmt(1 / math.sqrt(d_head)),
        big_d_k=BIG_D_K,
        big_std=fmt(math.sqrt(BIG_D_K)),
        x1=vec(X, 0),
        q1=vec(v["Q"], 0),
        k3=vec(v["K"], 2),
        s13=fmt(v["S"][0][2]),
        ss13=fmt(v["S_scaled"][0][2]),
        e1=vec(v["E"], 0),
        e1_sum=fmt(v["E_sum"][0][0]),
        a1=vec(v["A"], 0),
        a11=fmt(v["A"][0][0]),
        a12=fmt(v["A"][0][1]),
        a13=fmt(v["A"][0][2]),
        v1=vec(v["V"], 0),
        v2=vec(v["V"], 1),
        v3=vec(v["V"], 2),
        ac1=vec(v["A_causal"], 0),
        zc1=vec(v["Z_causal"], 0),
        q1h1=vec(columns(v["Q"], 0, d_head), 0),
        k2h1=vec(columns(v["K"], 0, d_head), 1),
        s12h1=fmt(matmul(columns(v["Q"], 0, d_head), transpose(columns(v["K"], 0, d_head)))[0][1]),
        ss12h1=fmt(v["S1_scaled"][0][1]),
        a12h1=fmt(v["A1"][0][1]),
        a11h2=fmt(v["A2"][0][0]),
        h1=vec(v["H"], 0),
        h14=fmt(v["H"][0][3]),
        m1=fmt(v["H_mean"][0][0]),
        v1var=fmt(v["H_var"][0][0]),
        std1=fmt(math.sqrt(v["H_var"][0][0] + EPS)),
        l2n1=fmt(v["H_l2norm"][0][0]),
        sqrt_d_std1=fmt(math.sqrt(d_model * v["H_var"][0][0])),
        l2_1=vec(v["H_over_l2"], 0),
        l2_mean1=fmt(h_hat_mean1),
        hh1=vec(v["H_hat"], 0),
    )
    return TEMPLATE.format(**fields)


if __name__ == "__main__":
    page = render()
    if "--check" in sys.argv[1:]:
        sys.exit(0 if PAGE.read_text() == page else 1)
    PAGE.write_text(page)
