"""Pictures of explanations: token heatmaps (HTML spans and PNG), the grid of attention heads, the logit-lens
table, and the one self-contained HTML page that holds them (images inline as base64 PNG, no outside file).

Token scores are coloured on a diverging scale centred at 0 (red: raises the explained score, blue: lowers it),
scaled by the largest |score| of that row, so rows of different methods read alike.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from lmforge.io import atomic_path


def label(token: str) -> str:
    """A token as a plot label: stripped, or its repr when blank or unprintable (fonts lack control glyphs)."""
    text = token.strip()
    return text if text and text.isprintable() else repr(token)


def save_figure(figure: Figure, path: Path) -> bytes:
    """Write the figure as a PNG at `path` (atomically) and return its bytes, for inlining."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path.read_bytes()


def inline_png(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def colour(value: float, scale: float) -> str:
    """rgba of a diverging scale: red for positive, blue for negative, alpha |value| / scale."""
    alpha = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    rgb = "214,39,40" if value >= 0 else "31,119,180"
    return f"rgba({rgb},{alpha:.3f})"


def token_heatmap_html(tokens: list[str], scores: list[float]) -> str:
    scale = max((abs(s) for s in scores), default=0.0)
    spans = [
        f'<span class="tok" style="background:{colour(s, scale)}" title="{s:.4g}">{html.escape(t) or "&nbsp;"}</span>'
        for t, s in zip(tokens, scores, strict=True)
    ]
    return '<div class="tokens">' + "".join(spans) + "</div>"


def token_heatmap_png(tokens: list[str], scores: list[float], title: str, path: Path) -> bytes:
    values = np.asarray(scores, dtype=float)[None]
    scale = float(np.abs(values).max()) or 1.0
    figure = Figure(figsize=(max(4.0, 0.45 * len(tokens)), 1.6))
    ax = figure.subplots()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
    ax.set_xticks(range(len(tokens)), [label(t) for t in tokens], rotation=60, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    figure.colorbar(image, ax=ax, fraction=0.03)
    return save_figure(figure, path)


def attention_grid_png(maps: torch.Tensor, tokens: list[str], path: Path) -> bytes:
    """One small heatmap per (layer, head): rows are layers, columns heads; query rows, key columns."""
    n_layer, n_head = maps.shape[:2]
    figure = Figure(figsize=(1.9 * n_head + 0.5, 1.9 * n_layer + 0.5))
    axes = np.atleast_2d(figure.subplots(n_layer, n_head, squeeze=False))
    labels = [label(t) for t in tokens]
    small = len(tokens) <= 16
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            ax.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"L{layer + 1} H{head + 1}", fontsize=7)
            if small and head == 0:
                ax.set_yticks(range(len(tokens)), labels, fontsize=5)
            else:
                ax.set_yticks([])
            if small and layer == n_layer - 1:
                ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=5)
            else:
                ax.set_xticks([])
    return save_figure(figure, path)


def lens_png(lens: dict, tokens: list[str], path: Path) -> bytes:
    """Layers x positions: each cell the top-1 token of the lens, coloured by its probability."""
    probs = np.asarray(lens["top_probs"])[:, :, 0]
    figure = Figure(figsize=(max(4.0, 0.9 * len(tokens)), 0.45 * len(lens["layers"]) + 1.2))
    ax = figure.subplots()
    ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for layer, row in enumerate(lens["top_tokens"]):
        for pos, top in enumerate(row):
            ax.text(pos, layer, label(top[0])[:8], ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(lens["layers"])), lens["layers"], fontsize=7)
    ax.set_xticks(range(len(tokens)), [label(t) for t in tokens], rotation=60, ha="right", fontsize=7)
    ax.set_title("logit lens: top-1 next token per layer (colour: its probability)", fontsize=9)
    return save_figure(figure, path)


def lens_table_html(lens: dict, tokens: list[str]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tokens)
    rows = []
    for name, row, probs in zip(lens["layers"], lens["top_tokens"], lens["top_probs"], strict=True):
        cells = "".join(
            f'<td style="background:rgba(31,119,180,{p[0]:.3f})" title="{html.escape(", ".join(top))}">'
            f"{html.escape(top[0])}</td>"
            for top, p in zip(row, probs, strict=True)
        )
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f'<table class="lens"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }
.tok { padding: 2px 1px; margin: 1px; border-radius: 3px; white-space: pre; font-family: monospace; }
.tokens { line-height: 2.2em; margin: 0.5em 0 1em; }
.note { color: #a15c00; }
table.lens { border-collapse: collapse; font-family: monospace; font-size: 12px; }
table.lens td, table.lens th { border: 1px solid #ddd; padding: 2px 4px; }
img { max-width: 100%; }
"""


def page(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
