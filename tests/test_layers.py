"""The import direction of docs/architecture.md, enforced: lower layers never import upper ones, a recipe never
imports another recipe, and no package imports another package's private names.

    cli -> commands -> recipes (pretrain, finetune, ...) -> train (the engine) -> models -> nn
    data, hf, eval, generate, io, interrupts sit beside: any layer above nn may use them; they never import the engine,
    a recipe, the server or the commands.

Every `import` statement is read (function-level ones too), so a lazy import cannot hide a wrong direction.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"
RECIPES = {"pretrain", "finetune", "tune", "quantize", "explain"}
TOP = {"cli", "commands", "demo", "__main__"}
# package -> the lmforge packages it must never import
FORBIDDEN: dict[str, set[str]] = {
    "nn": {"models", "data", "hf", "eval", "generate", "train", "serve", "fetch", *RECIPES, *TOP},
    "models": {"data", "hf", "eval", "generate", "train", "serve", "fetch", *RECIPES, *TOP},
    "data": {"train", "serve", "generate", *RECIPES, *TOP},
    "hf": {"train", "serve", *RECIPES, *TOP},
    "eval": {"train", "serve", "generate", *RECIPES, *TOP},
    "generate": {"train", "serve", *RECIPES, *TOP},
    "io": {"nn", "models", "data", "hf", "eval", "generate", "train", "serve", *RECIPES, *TOP},
    "interrupts": {"nn", "models", "data", "hf", "eval", "generate", "train", "serve", *RECIPES, *TOP},
    "train": {"serve", "generate", *RECIPES, *TOP},
    "serve": {*RECIPES, *TOP},
    "pretrain": {"serve", *(RECIPES - {"pretrain"}), *TOP},
    "finetune": {"serve", *(RECIPES - {"finetune"}), *TOP},
    # tune runs the other recipes as they are (each trial is a real run), so it sits above them: it may call
    # their public entry points and schemas, and no recipe may import it
    "tune": {"serve", *TOP},
    "quantize": {"serve", *(RECIPES - {"quantize"}), *TOP},
    # compress prunes and distils models; distillation reuses finetune's task objects (data, heads, metrics),
    # so like tune it sits above the recipes, and no recipe imports it
    "compress": {"serve", "tune", *TOP},
    "explain": {"serve", *(RECIPES - {"explain"}), *TOP},
    # exports and their runtimes sit beside hf/: they read models (hf.load) and never import the engine
    "export": {"train", "serve", *RECIPES, *TOP},
    "fetch": {"nn", "models", "data", "hf", "eval", "generate", "train", "serve", *RECIPES, *TOP},
    "commands": {"cli"},
}


def _package(path: Path) -> str:
    """The top-level lmforge package (or module) a source file belongs to: nn, models, io, cli, ..."""
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported lmforge module, names imported from it) for every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("lmforge")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmforge") and not node.level:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
    return found


SOURCES = sorted(SRC.rglob("*.py"))


def test_every_package_has_a_rule():
    packages = {_package(p) for p in SOURCES} - {"__init__"}
    unruled = packages - set(FORBIDDEN) - TOP
    assert not unruled, f"add a layer rule for {sorted(unruled)} (and place them in docs/architecture.md)"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_one_way(path):
    package = _package(path)
    wrong = []
    for line, module, names in _imports(path):
        parts = module.split(".")
        target = parts[1] if len(parts) > 1 else None
        if target is None:  # `from lmforge import X`: the lazy top-level exports (models, data, hf)
            continue
        if target in FORBIDDEN.get(package, set()):
            wrong.append(f"line {line}: {package} imports {module}")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and target != package:
            wrong.append(f"line {line}: {package} imports private {private} from {module}")
    assert not wrong, f"{path.relative_to(SRC)}: " + "; ".join(wrong)
