"""`explain(...)`: run the chosen methods on each input and write the page, the PNGs and the scores.

    out/explanation.html   one self-contained page: per input, a token heatmap per method, the grid of attention
                           heads, the logit-lens table (images inline)
    out/scores.json        per input: tokens, target, read-out position, notes, and each method's numbers
    out/input<N>_<method>.png, input<N>_attention_grid.png, input<N>_logit_lens.png

Inputs are a text, or a file whose non-empty lines are each one input. Every input is checked (target, position,
methods against the head) before anything is written, so a bad request leaves no half-written folder.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from lmforge.explain.methods import METHODS, Explanation
from lmforge.explain.render import (
    attention_grid_png,
    inline_png,
    lens_png,
    lens_table_html,
    page,
    token_heatmap_html,
    token_heatmap_png,
)
from lmforge.explain.subject import Subject, build_subject
from lmforge.io import write_json_atomic, write_text_atomic

DEFAULT_STEPS = 50  # integrated-gradients steps: completeness within 1% needs >= 32 on our models


def read_inputs(text_or_file: str) -> list[str]:
    """An existing file's non-empty lines, else the argument itself as the one text."""
    path = Path(text_or_file)
    if len(text_or_file) < 4096 and path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{path} holds no text; give a file with one input per line")
        return lines
    if not text_or_file.strip():
        raise ValueError("--input is empty; give a text or a file of texts")
    return [text_or_file]


def load_subject_model(name: str):
    """(model in eval mode and float32, tokenizer, folder) for a model name, folder, run or .gguf file."""
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.hf.load import load_model
    from lmforge.hf.resolve import resolve_model

    path = resolve_model(name, presets=False).path
    model = load_model(path, dtype="float32").eval()
    return model, load_tokenizer(path), path if path.is_dir() else None


def check_methods(methods: list[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--method {', '.join(unknown) or '(none)'} is unknown; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def explain_subject(subject: Subject, methods: list[str], steps: int) -> list[Explanation]:
    for name in methods:
        METHODS[name].check(subject)
    return [METHODS[name].run(subject, steps) for name in methods]


def explain(
    model: str,
    inputs: str,
    methods: list[str],
    out_dir: str | Path,
    target: str | None = None,
    position: int | None = None,
    steps: int = DEFAULT_STEPS,
) -> dict[str, Any]:
    """Explain `model`'s score on each input with each method; returns what scores.json holds."""
    methods = check_methods(methods)
    if steps < 1:
        raise ValueError(f"--steps {steps} must be >= 1 (32 or more keep IG's completeness error under 1%)")
    texts = read_inputs(inputs)
    net, tokenizer, folder = load_subject_model(model)
    subjects = [build_subject(net, tokenizer, t, target, position, folder, name=model) for t in texts]
    for subject in subjects:
        for name in methods:
            METHODS[name].check(subject)
    results = [(subject, explain_subject(subject, methods, steps)) for subject in subjects]
    return write_outputs(Path(out_dir), model, results)


def write_outputs(out: Path, model: str, results: list[tuple[Subject, list[Explanation]]]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    sections, records = [], []
    for n, (subject, explanations) in enumerate(results, start=1):
        parts = [
            f"<h2>input {n}</h2>",
            f"<p>{html.escape(subject.kind.replace('_', ' '))}; explained score: the logit of "
            f"<b>{html.escape(subject.target_name)}</b> at token {subject.position} "
            f"(<code>{html.escape(subject.tokens[subject.position])}</code>)</p>",
            *(f'<p class="note">{html.escape(note)}</p>' for note in subject.notes),
        ]
        record: dict[str, Any] = {
            "text_tokens": subject.tokens,
            "kind": subject.kind,
            "target": subject.target_name,
            "target_id": subject.target,
            "position": subject.position,
            "notes": subject.notes,
            "methods": {},
        }
        for e in explanations:
            stem = f"input{n}_{e.method}"
            facts = ", ".join(f"{k} {v:.4g}" for k, v in e.values.items())
            parts.append(f"<h3>{html.escape(METHODS[e.method].summary)}</h3>" + (f"<p>{facts}</p>" if facts else ""))
            entry: dict[str, Any] = dict(e.values)
            if e.token_scores is not None:
                png = token_heatmap_png(subject.tokens, e.token_scores, f"{e.method}: {subject.target_name}",
                                        out / f"{stem}.png")  # fmt: skip
                parts += [token_heatmap_html(subject.tokens, e.token_scores), inline_png(png, stem)]
                entry["token_scores"] = e.token_scores
            if e.attention is not None:
                png = attention_grid_png(e.attention, subject.tokens, out / f"input{n}_attention_grid.png")
                parts.append(inline_png(png, "attention heads"))
                entry["attention"] = e.attention.tolist()
            if e.lens is not None:
                png = lens_png(e.lens, subject.tokens, out / f"input{n}_logit_lens.png")
                parts += [lens_table_html(e.lens, subject.tokens), inline_png(png, "logit lens")]
                entry["lens"] = e.lens
            record["methods"][e.method] = entry
        sections.append("\n".join(parts))
        records.append(record)
    summary = {"model": model, "inputs": records}
    write_json_atomic(out / "scores.json", summary)
    write_text_atomic(out / "explanation.html", page(f"lmforge explain: {model}", "\n".join(sections)))
    return summary
