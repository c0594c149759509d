"""The weight-only quantisation methods, one object each: its grid, its module, and its saved shapes.

A method quantises one Linear weight W (out, in) column by column, which is what GPTQ needs: before column
j is rounded, `params_at(W[:, j:], j)` may (re)compute the grid from the current, error-corrected weights of
the columns it covers, and `round(w, j)` puts column j on that grid. Round-to-nearest (RTN) is the same loop
with no error feedback. The grids:

  int8   per output channel, symmetric:  s_i = max_j |W_ij| / 127,  W_ij ~= s_i Q_ij,  Q in [-127, 127]
  int4   per group of g inputs, asymmetric:  W_ij ~= (Q_ij - 8) s_ig + z_ig,  Q in [0, 15], g in {32, 64, 128}:
         4 + 64/g bits per weight. Two grids (`GRIDS`): "minmax" spans the group's [min, max]
         (`lmforge.nn.quant.int4_group_params`); "mse" shrinks that range by the factor that minimises the
         group's squared rounding error (`lmforge.nn.quant.int4_clipped_group_params`). Measured on
         SmolLM2-135M (benchmarks/bench_quantize.py --ablation, g64): GPTQ with "mse" +7.2% perplexity over fp32,
         with "minmax" +9.9%; round-to-nearest the other way round, +30.8% "minmax" against +32.3% "mse". A smaller
         weight error is not a smaller output error without GPTQ's compensation; hence the defaults of
         `lmforge.quantize.quantize_model`.

`module(...)` builds the inference layer (`QuantizedLinear`, `Int4Linear`; `lmforge.nn.quant.SHELLS` loads it).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lmforge.nn.quant import (
    QMAX,
    Int4Linear,
    QuantizedLinear,
    int4_clipped_group_params,
    int4_codes,
    int4_group_params,
    quantize_per_channel,
)

GROUP_SIZES = (32, 64, 128)
GRIDS = {"minmax": int4_group_params, "mse": int4_clipped_group_params}
"""--grid name -> the function giving an int4 group's (scale, zero) from its weights (rows, g)."""


class Int8PerChannel:
    name: ClassVar[str] = "int8"

    def __init__(self, group_size: int | None = None, grid: str | None = None, gptq: bool = False) -> None:
        if grid is not None:
            raise ValueError("--grid applies to int4 only: int8's grid is symmetric per channel; drop --grid")
        self.group_size = None  # one scale per row: a group is the whole row

    def check(self, name: str, linear: nn.Linear) -> None:
        """Every width works per channel."""

    def start(self, weight: torch.Tensor) -> None:
        self.codes = torch.zeros_like(weight, dtype=torch.int8)
        _, self.scale = quantize_per_channel(weight)  # fixed for the row, before any error feedback

    def params_at(self, ahead: torch.Tensor, column: int) -> None:
        """The per-channel grid is set once in `start`."""

    def round(self, w: torch.Tensor, column: int) -> torch.Tensor:
        """Column `column` (out,) onto the grid; returns its dequantised values (out,)."""
        q = torch.round(w / self.scale).clamp(-QMAX, QMAX)
        self.codes[:, column] = q.to(torch.int8)
        return q * self.scale

    def module(self, linear: nn.Linear) -> nn.Module:
        return QuantizedLinear(self.codes, self.scale, linear.bias)

    def config(self) -> dict:
        return {"method": self.name}


class Int4Grouped:
    name: ClassVar[str] = "int4"

    def __init__(self, group_size: int | None = None, grid: str | None = None, gptq: bool = False) -> None:
        """`grid` None: "mse" under GPTQ, "minmax" for round-to-nearest (the better of the two for each)."""
        group_size = group_size or 64
        if group_size not in GROUP_SIZES:
            raise ValueError(f"--group-size {group_size} is not supported; choose one of {list(GROUP_SIZES)}")
        grid = grid or ("mse" if gptq else "minmax")
        if grid not in GRIDS:
            raise ValueError(f"--grid {grid!r} is not supported; choose one of {list(GRIDS)}")
        self.group_size = group_size
        self.grid = grid

    def check(self, name: str, linear: nn.Linear) -> None:
        if linear.in_features % self.group_size:
            fits = [g for g in GROUP_SIZES if linear.in_features % g == 0]
            raise ValueError(
                f"--group-size {self.group_size} does not divide the width {linear.in_features} of {name}; "
                f"choose one of {fits or 'none: this model cannot be quantised to int4 groups'}"
            )

    def start(self, weight: torch.Tensor) -> None:
        rows, cols = weight.shape
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8)
        self.scale = torch.ones(rows, cols // self.group_size)
        self.zero = torch.zeros(rows, cols // self.group_size)

    def params_at(self, ahead: torch.Tensor, column: int) -> None:
        """At the first column of a group, its grid from the group's current weights (GPTQ's updated ones);
        `ahead` holds the weights from `column` on."""
        if column % self.group_size == 0:
            g = column // self.group_size
            self.scale[:, g], self.zero[:, g] = GRIDS[self.grid](ahead[:, : self.group_size])

    def round(self, w: torch.Tensor, column: int) -> torch.Tensor:
        g = column // self.group_size
        scale, zero = self.scale[:, g], self.zero[:, g]
        q = int4_codes(w, scale, zero)
        self.codes[:, column] = q.to(torch.uint8)
        return (q - 8) * scale + zero

    def module(self, linear: nn.Linear) -> nn.Module:
        return Int4Linear(self.codes, self.scale, self.zero, linear.bias)

    def config(self) -> dict:
        return {"method": self.name, "group_size": self.group_size, "grid": self.grid}


METHODS = {method.name: method for method in (Int8PerChannel, Int4Grouped)}
"""--method name -> the method's class."""
