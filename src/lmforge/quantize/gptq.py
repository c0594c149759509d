"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323) and round-to-nearest, for one Linear at a time.

For a layer y = W x and calibration inputs X (in, n), GPTQ minimises the output error ||W X - Q X||^2 over
quantised Q, row by row, with the Hessian of that objective, H = 2 X X^T / n (in, in) (eq. 1-2). Quantising
column j with error e_j = (w_j - q_j) / [H^-1]_jj and moving the not-yet-quantised columns k > j by
-e_j [H^-1]_jk compensates it optimally (Optimal Brain Surgeon, eq. 3). The paper's three changes make it fast:
  - every row uses the same column order, so H^-1 is shared (section 3, "arbitrary order insight");
  - the updates of a block of B = 128 columns are applied to the rest of the matrix at once ("lazy batch
    updates", Algorithm 1), turning a rank-1 update per column into one matrix product per block;
  - the rows of H^-1 that the loop needs are those of the upper Cholesky factor of H^-1 (Algorithm 1's
    Cholesky(H^-1)^T), numerically stable where repeated downdates of H^-1 are not; H gets a dampening
    lambda = 0.01 mean(diag H) on its diagonal first.
Inputs that are always zero (diag(H) = 0) carry no error: their weights are zeroed and H_jj set to 1.
`act_order` visits columns by decreasing H_jj (the inputs with the most energy first; the reference
implementation's option, which helps at low bit widths). The int4 grid of each group is then taken up front
from the original weights ("static groups"), so groups stay runs of consecutive inputs as the kernel expects.
"""

from __future__ import annotations

import torch

DAMPENING = 0.01
BLOCK_SIZE = 128


class HessianAccumulator:
    """H = 2 X X^T / n over every input row seen (a running mean, in float64 for long calibration sets)."""

    def __init__(self, in_features: int) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()  # (n, in)
        n = x.shape[0]
        self.hessian *= self.rows / (self.rows + n)
        self.rows += n
        self.hessian += (2 / self.rows) * x.t() @ x


def round_to_nearest(weight: torch.Tensor, method) -> torch.Tensor:
    """Each column on the method's grid, no error feedback; returns the dequantised weight."""
    w = weight.detach().float().clone()
    method.start(w)
    out = torch.empty_like(w)
    for j in range(w.shape[1]):
        method.params_at(w[:, j:], j)
        out[:, j] = method.round(w[:, j], j)
    return out


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    method,
    act_order: bool = False,
    dampening: float = DAMPENING,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """GPTQ's Algorithm 1 on `weight` (out, in) with `hessian` (in, in); the codes and grid end up in `method`
    (as `round_to_nearest` leaves them). Returns the dequantised weight."""
    w = weight.detach().float().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += dampening * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    method.start(w)
    columns = w.shape[1]
    if method.group_size and block_size % method.group_size:
        raise ValueError(f"block_size={block_size} must be a multiple of the group size {method.group_size}")
    if act_order:  # static groups: every grid from the original weights, in the natural column order
        for j in range(columns):
            method.params_at(w[:, j:], j)
        order = torch.argsort(torch.diag(h), descending=True)
    else:
        order = torch.arange(columns)
    w, h = w[:, order], h[order][:, order]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    out = torch.empty_like(w)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()  # (out, B)
        errors = torch.zeros_like(block)
        for i in range(end - start):
            j = int(order[start + i])
            if not act_order:  # a group starting here lies inside the block (block_size is a multiple of it)
                method.params_at(block[:, i:], j)
            q = method.round(block[:, i], j)
            out[:, start + i] = q
            error = (block[:, i] - q) / hinv[start + i, start + i]
            block[:, i:] -= error[:, None] * hinv[start + i, start + i : end][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]  # the lazy batch update of the later columns
        w[:, start:end] = block
    inverse = torch.argsort(order)
    return out[:, inverse]
