"""Training a pruned model without losing its zeros: recovery fine-tuning after `lmforge prune`.

A model pruned to unstructured or N:M sparsity (`lmforge.compress.prune`) stores its weights dense, zeros
included, with sparsity.json naming every pruned Linear layer. Plain training would refill those zeros at the
first step. `SparsityMasks` keeps them, the way sparse fine-tuning does after SparseGPT and Wanda (Frantar &
Alistarh 2023, section 4; Sun et al. 2023, section 5): with M the 0/1 mask of a layer's non-zero weights,

    g <- g * M     on every backward (a hook on the weight), so gradient clipping, AdamW's moments and the
                   logged gradient norm see only the live weights;
    W <- W * M     after every optimizer step (an optimizer post-step hook), so no update can revive a pruned
                   weight, whatever the optimizer: Muon orthogonalises the whole gradient matrix, and a dense
                   update would otherwise land on the zeros.

AdamW alone would already keep a zero at zero once its gradient is masked (its moments stay 0 and decoupled
weight decay scales 0 to 0), but the step hook makes the guarantee independent of the optimizer. The masks are
read from the weights when training starts (W != 0), so a resumed run, whose checkpoint holds the same zeros,
rebuilds exactly the same masks. Structured pruning writes a smaller dense model, which needs none of this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

SPARSITY_FILE = "sparsity.json"  # written by `lmforge prune` next to the pruned weights


def sparsity_record(folder: str | Path) -> dict[str, Any] | None:
    """The sparsity.json of a model folder with unstructured or N:M sparsity; None for any other folder,
    a structurally pruned one included (its smaller weights are dense)."""
    path = Path(folder) / SPARSITY_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); prune the model again with lmforge prune") from None
    if not isinstance(record, dict) or not isinstance(record.get("layers"), dict) or not record["layers"]:
        return None
    return record


class SparsityMasks:
    """Keeps the zeros of `layers` (Linear module names of `model`) at zero through training; see the module
    docstring. `attach(optimizer)` installs the hooks; `detach()` removes them."""

    def __init__(self, model: nn.Module, layers: list[str]) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        for name in layers:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"sparsity.json names layer {name!r}, which this model does not have: the folder's weights and "
                    "its sparsity.json do not belong together; prune the model again"
                ) from None
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise ValueError(f"sparsity.json names {name!r}, which holds no weight matrix; prune the model again")
            self.weights[name] = weight
            self.masks[name] = weight.detach() != 0
        self._handles: list[Any] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> SparsityMasks:
        for name, weight in self.weights.items():
            if weight.requires_grad:
                mask = self.masks[name]
                self._handles.append(weight.register_hook(lambda grad, mask=mask: grad * mask))
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply()))
        self.apply()
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def apply(self) -> None:
        """W <- W * M for every masked layer."""
        for name, weight in self.weights.items():
            weight.mul_(self.masks[name])

    def fractions(self) -> dict[str, float]:
        """Each layer's fraction of zero weights now."""
        return {name: float((weight == 0).float().mean()) for name, weight in self.weights.items()}

    def overall(self) -> float:
        """Fraction of zeros over all masked layers' weights together."""
        zeros = sum(int((w == 0).sum()) for w in self.weights.values())
        return zeros / max(sum(w.numel() for w in self.weights.values()), 1)
